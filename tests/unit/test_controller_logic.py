"""Controller state machine with a fake data plane (pure logic) and a real embedded Valkey."""

from __future__ import annotations

import pytest
import redis
import torch

from expertmesh.placement import plan_placement
from expertmesh.services.controller.controller import Controller
from expertmesh.services.controller.policy import RebalancePolicy
from expertmesh.services.controller.store import ControllerStore

E, L, GROUPS, NODES, SLOTS = 8, 2, 4, 2, 4


class FakePlane:
    def __init__(self, version: int):
        self.calls: list[tuple[str, int]] = []
        self.versions = [version]
        self.load: torch.Tensor | None = None

    def prepare(self, plan):
        self.calls.append(("prepare", plan.version))

    def switch(self, plan):
        self.calls.append(("switch", plan.version))
        self.versions = [plan.version]

    def retire(self, version):
        self.calls.append(("retire", version))

    def collect_load(self):
        load, self.load = self.load, None
        return load

    def router_versions(self):
        return list(self.versions)


@pytest.fixture
def store(valkey, request):
    client = redis.Redis.from_url(valkey.url)
    s = ControllerStore(client, namespace=f"test:{request.node.name}")
    yield s
    for key in client.scan_iter(f"test:{request.node.name}:*"):
        client.delete(key)


def initial_plan():
    return plan_placement(torch.ones(L, E), version=1, num_replicas=12, num_groups=GROUPS, num_nodes=NODES,
                          num_gpus=SLOTS)


def skewed_load():
    # groups 0 and 2 (experts 0-1, 4-5) hot: the uniform-load plan put both on node 0
    load = torch.ones(L, E)
    load[:, 0] = 30.0
    load[:, 4] = 30.0
    return load


def make(store, plane, clock=lambda: 1000.0, min_gain=0.02):
    ctl = Controller(store, plane, RebalancePolicy(GROUPS, min_gain), moe_layers=[1, 2], window_s=60, clock=clock)
    ctl.bootstrap(initial_plan())
    return ctl


def test_replacement_runs_prepare_commit_switch_retire_in_order(store):
    plane = FakePlane(1)
    ctl = make(store, plane)
    plane.load = skewed_load()
    result = ctl.rebalance()
    assert result.replaced and (result.old_version, result.new_version) == (1, 2)
    assert result.balancedness_after > result.balancedness_before + 0.02
    assert plane.calls == [("prepare", 2), ("switch", 2), ("retire", 1)]
    assert store.current_plan().version == 2
    assert store.stats()["replacements"] == 1


def test_small_gain_keeps_the_plan(store):
    plane = FakePlane(1)
    ctl = make(store, plane)
    plane.load = torch.ones(L, E)  # uniform: the current plan is already balanced
    result = ctl.rebalance()
    assert not result.replaced and result.reason.startswith("KEEP")
    assert plane.calls == [] and store.current_plan().version == 1


def test_no_load_is_not_a_reason_to_move(store):
    plane = FakePlane(1)
    result = make(store, plane).rebalance(force=True)
    assert not result.replaced and "no load" in result.reason


def test_load_window_forgets_old_reports(store):
    now = [1000.0]
    plane = FakePlane(1)
    ctl = make(store, plane, clock=lambda: now[0])
    plane.load = skewed_load()
    ctl.collect()
    now[0] += 120  # past the 60 s window
    plane.load = torch.ones(L, E)
    ctl.collect()
    assert torch.equal(store.load_window(60, now[0]), torch.ones(L, E))


def test_restarted_controller_keeps_the_stored_plan_and_reconciles(store):
    plane = FakePlane(1)
    ctl = make(store, plane)
    plane.load = skewed_load()
    ctl.collect()
    decision = ctl.policy.decide(store.load_window(60, 1000.0), ctl.plan)
    store.save_plan(decision.plan)  # crash right after COMMIT: routers still on v1
    restarted = make(store, FakePlane(1))
    assert restarted.plan.version == 2  # bootstrap does not overwrite what Redis holds
    restarted.reconcile()
    assert restarted.plane.calls[:2] == [("prepare", 2), ("switch", 2)]
    assert ("retire", 1) in restarted.plane.calls
