"""Integration tier: real Ray (multi-node local clusters), real gRPC, real Valkey."""

from __future__ import annotations

import pytest
import ray


@pytest.fixture(autouse=True, scope="module")
def _fresh_ray():
    """Every module starts and ends without a Ray connection of its own making."""
    if ray.is_initialized():
        ray.shutdown()
    yield
    if ray.is_initialized():
        ray.shutdown()
