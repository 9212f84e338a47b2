"""Package discovery for the two source roots (pyproject.toml holds the metadata).

`expertmesh` comes from platform/expertmesh and `expertmesh.services` from services/.
Generated protobuf stubs are never committed: wheels get them at build time, a
source checkout on first import (see platform/expertmesh/protos.py).
"""

import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent


class BuildPyWithProtos(build_py):
    """For wheels: ship protos/ as expertmesh/proto_src and generate expertmesh/v1 stubs."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return  # a source checkout generates its stubs on first import
        package = Path(self.build_lib) / "expertmesh"
        target = package / "proto_src"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(ROOT / "protos", target)
        import importlib.util

        spec = importlib.util.spec_from_file_location("_em_protos", ROOT / "platform/expertmesh/protos.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.generate_into(target, Path(self.build_lib))


packages = ["expertmesh"] + [f"expertmesh.{p}" for p in find_packages("platform/expertmesh")]
packages += ["expertmesh.services"] + [f"expertmesh.services.{p}" for p in find_packages("services")]

setup(
    packages=packages,
    package_dir={"expertmesh": "platform/expertmesh", "expertmesh.services": "services"},
    cmdclass={"build_py": BuildPyWithProtos},
)
