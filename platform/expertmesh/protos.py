"""Generated gRPC/protobuf stubs for ``protos/expertmesh/v1``.

Stubs are never committed. The proto package ``expertmesh.v1`` becomes the Python
package ``expertmesh.v1``: ``setup.py`` generates it at build time for wheels, and in
a source checkout (editable install) it is generated on first use, or again when a
.proto file changes (a digest of the sources is kept beside the stubs)::

    from expertmesh.protos import load
    tensor_pb2 = load("tensor_pb2")
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import tempfile
import threading
from pathlib import Path
from types import ModuleType

_PACKAGE_DIR = Path(__file__).resolve().parent      # .../expertmesh
_STUBS_DIR = _PACKAGE_DIR / "v1"                     # generated: expertmesh/v1/*_pb2*.py
_DIGEST_FILE = _STUBS_DIR / ".digest"
# Source checkout: <repo>/protos; built wheel: expertmesh/proto_src (copied by setup.py).
_CANDIDATE_ROOTS = (_PACKAGE_DIR.parents[1] / "protos", _PACKAGE_DIR / "proto_src")
_lock = threading.Lock()


class ProtoGenerationError(RuntimeError):
    """protoc failed on the .proto sources, or they could not be found."""


def proto_root() -> Path:
    for root in _CANDIDATE_ROOTS:
        if (root / "expertmesh" / "v1").is_dir():
            return root
    raise ProtoGenerationError(
        f"no .proto files found in {', '.join(str(r) for r in _CANDIDATE_ROOTS)}; "
        "reinstall the package (`make venv`)"
    )


def _digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def generate_into(root: Path, package_parent: Path) -> None:
    """Run protoc on ``root/expertmesh/v1/*.proto``, writing ``package_parent/expertmesh/v1``."""
    from grpc_tools import protoc  # lazy: only needed when stubs are (re)generated

    files = sorted((root / "expertmesh" / "v1").glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{root}",
        f"-I{include}",
        f"--python_out={package_parent}",
        f"--pyi_out={package_parent}",
        f"--grpc_python_out={package_parent}",
        *[str(f.relative_to(root)) for f in files],
    ]
    if protoc.main(args) != 0:
        raise ProtoGenerationError(f"protoc failed: {' '.join(args[1:])}")
    v1 = package_parent / "expertmesh" / "v1"
    (v1 / "__init__.py").write_text('"""Generated from protos/expertmesh/v1; do not edit."""\n')
    (v1 / ".digest").write_text(_digest(files))


def ensure_generated() -> None:
    """Generate ``expertmesh.v1`` when missing or older than the .proto sources."""
    with _lock:
        try:
            root = proto_root()
        except ProtoGenerationError:
            if (_STUBS_DIR / "__init__.py").exists():
                return  # installed wheel without sources: stubs were built at install time
            raise
        files = sorted((root / "expertmesh" / "v1").glob("*.proto"))
        want = _digest(files)
        if _DIGEST_FILE.exists() and _DIGEST_FILE.read_text() == want:
            return
        tmp = Path(tempfile.mkdtemp(prefix=".gen-", dir=_PACKAGE_DIR))
        try:
            generate_into(root, tmp)
            staged = tmp / "expertmesh" / "v1"
            old = _PACKAGE_DIR / f".v1-old-{os.getpid()}"
            if _STUBS_DIR.exists():
                os.replace(_STUBS_DIR, old)
            os.replace(staged, _STUBS_DIR)  # readers see a complete folder or the old one
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        importlib.invalidate_caches()


def load(name: str) -> ModuleType:
    """Import a generated module by short name, e.g. ``load("router_pb2_grpc")``."""
    ensure_generated()
    return importlib.import_module(f"expertmesh.v1.{name}")
