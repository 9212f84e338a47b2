"""The ``expertmesh`` command line (also ``python -m expertmesh``).

Each command group lives in its own module and is registered here; errors a user can
fix are printed as one readable line with a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import sys

import typer

from expertmesh import __version__

app = typer.Typer(
    name="expertmesh",
    help="Train and serve DeepSeek-V3-style Mixture-of-Experts models on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


@app.command()
def version() -> None:
    """Print the ExpertMesh version."""
    typer.echo(__version__)


def _register() -> None:
    # each module registers its commands on `app` when imported
    from expertmesh.cli import dataplane, demo, generate, train  # noqa: F401
    from expertmesh.cli import platform  # noqa: F401  (platform up/down, tenants, keys, endpoints, jobs)
    from expertmesh.cli import toplevel  # noqa: F401  (up/down/status over both)
    from expertmesh.cli import checkpoint  # noqa: F401  (checkpoint list/validate)
    from expertmesh.cli import scale  # noqa: F401  (scale --expert-slots N)


def main(argv: list[str] | None = None) -> None:
    _register()
    try:
        app(args=argv, standalone_mode=True)
    except (CLIError, ValueError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
