"""Where ExpertMesh keeps its state on this machine (read once, at the edge)."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """``$EXPERTMESH_HOME``, else ``~/.expertmesh``: demo runs, embedded Valkey data, CLI state."""
    return Path(os.environ.get("EXPERTMESH_HOME") or Path.home() / ".expertmesh").expanduser()


def demo_checkpoint() -> Path:
    return home() / "runs" / "demo" / "checkpoint"
