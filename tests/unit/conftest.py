"""Unit tier: no Ray. Tests of state kept in Redis use a real embedded Valkey, one per module."""

from __future__ import annotations

import pytest

from expertmesh.store import EmbeddedValkey, ValkeyConfig, connect


@pytest.fixture(scope="module")
def valkey(tmp_path_factory):
    """An embedded Valkey with the AOF fsynced on every write (what restart tests rely on)."""
    server = EmbeddedValkey(ValkeyConfig(tmp_path_factory.mktemp("valkey"), appendfsync="always")).start()
    yield server
    server.stop()


@pytest.fixture
def client(valkey):
    """A client on an empty database."""
    c = connect(valkey.url)
    c.flushdb()
    yield c
    c.close()
