"""A local multi-raylet cluster that misses Ray's startup deadline is cleaned up and started again."""

from __future__ import annotations

import psutil
import pytest
from ray.cluster_utils import Cluster

from expertmesh.services.dataplane import LocalCluster


def _running(pids) -> list[int]:
    """The pids that still run (not exited, not zombies)."""
    running = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                running.append(pid)
        except psutil.NoSuchProcess:
            pass
    return running


def test_failed_start_is_cleaned_up_and_retried(monkeypatch):
    real_wait, calls, leftovers = Cluster.wait_for_nodes, [], []
    before = {p.pid for p in psutil.Process().children(recursive=True)}  # e.g. other modules' servers

    def first_attempt_times_out(self, *args, **kwargs):
        calls.append(self)
        if len(calls) == 1:  # the head and the second raylet are running: fail like a startup timeout
            leftovers.extend(p.pid for p in psutil.Process().children(recursive=True) if p.pid not in before)
            raise Exception("The current node timed out during startup.")
        return real_wait(self, *args, **kwargs)

    monkeypatch.setattr(Cluster, "wait_for_nodes", first_attempt_times_out)
    local = LocalCluster(2)
    try:
        assert len(calls) >= 2  # the injected failure, then a real start (retried again if it times out)
        assert leftovers and _running(leftovers) == []
        assert len([n for n in local.cluster.list_all_nodes()]) == 2
    finally:
        local.shutdown()


def test_start_gives_up_after_the_last_attempt(monkeypatch):
    def always_times_out(self, *args, **kwargs):
        raise Exception("The current node timed out during startup.")

    monkeypatch.setattr(Cluster, "wait_for_nodes", always_times_out)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(Exception, match="timed out during startup"):
        LocalCluster(2)
    assert _running(p.pid for p in psutil.Process().children(recursive=True) if p.pid not in before) == []
