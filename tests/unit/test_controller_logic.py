"""Controller state machine with a fake data plane and shard factory (pure logic) and a real
embedded Valkey: re-placement order, restart, fault recovery decisions, elastic scale."""

from __future__ import annotations

import pytest
import redis
import torch

from expertmesh.placement import plan_mirrored, plan_placement
from expertmesh.services.controller.controller import Controller, ScaleError
from expertmesh.services.controller.policy import PlanShape, RebalancePolicy
from expertmesh.services.controller.recovery import decide_recovery
from expertmesh.services.controller.shards import ShardStartFailed
from expertmesh.services.controller.store import ControllerStore
from expertmesh.services.topology import SlotTable, hosting

E, L, GROUPS, NODES, SLOTS = 8, 2, 4, 2, 4


class FakePlane:
    def __init__(self, version: int):
        self.calls: list[tuple[str, int]] = []
        self.versions = [version]
        self.load: torch.Tensor | None = None

        self.table = None
        self.published: list[SlotTable] = []
        self.adopted: list[tuple[str, list[int]]] = []
        self.dead: set[int] = set()

    def prepare(self, plan, plan_slots=None):
        self.calls.append(("prepare", plan.version))

    def switch(self, plan, plan_slots=None):
        self.calls.append(("switch", plan.version))
        self.versions = [plan.version]

    def publish_slots(self, table):
        self.table = table
        self.published.append(table)

    def set_table(self, table):
        self.table = table

    def adopt(self, address, plan, physical_ids):
        self.adopted.append((address, list(physical_ids)))
        return len(physical_ids)

    def unhealthy_slots(self, table, only=None):
        return {s.slot for s in table.live() if s.slot in self.dead and (only is None or s.slot in only)}

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
    result = ctl.rebalance(whole_plan=True)
    assert result.replaced and (result.old_version, result.new_version) == (1, 2)
    assert result.balancedness_after > result.balancedness_before + 0.02
    assert plane.calls == [("prepare", 2), ("switch", 2), ("retire", 1)]
    assert store.current_plan().version == 2
    assert store.stats()["replacements"] == 1


def test_layer_by_layer_runs_the_four_steps_once_per_changed_layer(store):
    plane = FakePlane(1)
    ctl = make(store, plane)
    plane.load = skewed_load()
    target = ctl.policy.decide(skewed_load(), ctl.plan).plan
    result = ctl.rebalance()
    assert result.replaced and result.layer_steps == L and result.new_version == 1 + L
    assert plane.calls == [c for v in range(2, 2 + L) for c in (("prepare", v), ("switch", v), ("retire", v - 1))]
    final = store.current_plan()
    for row in range(L):  # same experts on every slot as the EPLB target (order inside a slot is free)
        per_slot = final.phy2log_LP.shape[1] // final.num_gpus
        got = final.phy2log_LP[row].view(-1, per_slot).sort(dim=1).values
        assert torch.equal(got, target.phy2log_LP[row].view(-1, per_slot).sort(dim=1).values)
    assert result.balancedness_after > result.balancedness_before


def test_layer_steps_change_one_layer_each_and_skip_reordering_only():
    from expertmesh.placement import PlacementPlan
    from expertmesh.services.controller.layered import align_to_current, layer_steps

    old = PlacementPlan.from_phy2log(1, torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]]), 4, num_gpus=2, num_nodes=1)
    new = PlacementPlan.from_phy2log(2, torch.tensor([[1, 0, 3, 2], [0, 2, 1, 3]]), 4, num_gpus=2, num_nodes=1)
    assert align_to_current(old.phy2log_LP, new.phy2log_LP, 2)[0].tolist() == [0, 1, 2, 3]
    steps = layer_steps(old, new)
    assert [(s.row, s.moved, s.plan.version) for s in steps] == [(1, 2, 2)]
    assert steps[0].plan.phy2log_LP.tolist() == [[0, 1, 2, 3], [0, 2, 1, 3]]


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


# ---- fault recovery and elastic scale (fake shard factory) -----------------------------------------

class FakeShards:
    def __init__(self, nodes: int, fail_nodes: set[int] | None = None):
        self.node_ids = [f"n{i}" for i in range(nodes)]
        self.dead_nodes: set[int] = set()
        self.fail_nodes = fail_nodes or set()
        self.created: list[tuple[int, int, int | None]] = []
        self.stopped: list[int] = []

    def create(self, slot, node, plan, position):
        if node in self.fail_nodes:
            raise ShardStartFailed(f"node {node} refuses actors")
        self.created.append((slot, node, position))
        return f"new-{slot}-{len(self.created)}"

    def stop(self, slot):
        self.stopped.append(slot)

    def node_alive(self, node):
        return node not in self.dead_nodes

    def alive_node_ids(self):
        return [n for i, n in enumerate(self.node_ids) if i not in self.dead_nodes]

    def add_node(self, node_id):
        if node_id not in self.node_ids:
            self.node_ids.append(node_id)
        return self.node_ids.index(node_id)


def table4() -> SlotTable:  # 4 slots, 2 per node, as initial_plan() lays them out
    return SlotTable.initial([f"addr-{s}" for s in range(SLOTS)], SLOTS // NODES)


def make_ft(store, shards):
    plane = FakePlane(1)
    ctl = Controller(store, plane, RebalancePolicy(GROUPS, 0.02), moe_layers=[1, 2], window_s=60,
                     clock=lambda: 1000.0, shards=shards)
    ctl.bootstrap(initial_plan(), table4())
    return ctl, plane


def test_recovery_decision_recreates_on_live_nodes_and_spreads_orphans_of_lost_nodes():
    plan, table = initial_plan(), table4()
    one = decide_recovery(table, plan, tuple(range(SLOTS)), {1}, lambda n: True)
    assert one.recreate == (1,) and one.adopt == {} and one.lost_nodes == ()
    node = decide_recovery(table, plan, tuple(range(SLOTS)), {2, 3}, lambda n: True)  # all of node 1
    assert node.recreate == () and node.lost_nodes == (1,)
    adopted = sorted(p for ps in node.adopt.values() for p in ps)
    assert adopted == list(range(6, 12)) and set(node.adopt) == {0, 1}
    assert abs(len(node.adopt[0]) - len(node.adopt[1])) <= 1  # spread evenly over the survivors
    gone = decide_recovery(table, plan, tuple(range(SLOTS)), {1}, lambda n: n != 0)  # Ray says node 0 died
    assert gone.recreate == () and gone.lost_nodes == (0,)


def test_killed_shard_is_marked_dead_first_then_recreated_and_recorded(store):
    shards = FakeShards(NODES)
    ctl, plane = make_ft(store, shards)
    plane.dead = {1}
    record = ctl.check_health()
    assert record.dead == (1,) and record.recreated == (1,) and record.full_redundancy
    assert shards.created == [(1, 0, 1)]  # same slot, same node, its plan position
    first, last = plane.published[0], plane.published[-1]
    assert not first.by_id()[1].alive  # routers route around before anything is recreated
    assert last.by_id()[1].alive and last.by_id()[1].address == "new-1-1" and last.epoch > first.epoch
    assert store.stats()["failures_recovered"] == 1
    event = store.events()[-1]
    assert event["kind"] == "recovery" and event["slot"] == 1 and event["restore_s"] >= event["route_around_s"]
    assert ctl.slot_table().by_id()[1].address == "new-1-1"  # the topology in Redis follows


def test_lost_node_experts_are_adopted_by_survivors(store):
    shards = FakeShards(NODES)
    ctl, plane = make_ft(store, shards)
    shards.dead_nodes = {1}
    plane.dead = {2, 3}
    record = ctl.check_health()
    assert record.recreated == () and record.lost_nodes == (1,) and record.full_redundancy
    assert sorted(p for _, ps in plane.adopted for p in ps) == list(range(6, 12))
    table = ctl.slot_table()
    assert set(table.adopted.values()) <= {0, 1} and table.plan_version == 1
    assert hosting(ctl.plan, ctl.plan_slots(ctl.plan), table).complete
    assert store.events()[-1]["node"] == 1 and store.stats()["failures_recovered"] == 1


def test_node_that_refuses_a_new_actor_counts_as_lost(store):
    shards = FakeShards(NODES, fail_nodes={0})
    ctl, plane = make_ft(store, shards)
    plane.dead = {0}
    record = ctl.check_health()
    assert record.recreated == () and 0 in record.lost_nodes
    assert sorted(p for _, ps in plane.adopted for p in ps) == [0, 1, 2]  # slot 0's physical experts
    assert record.full_redundancy


def test_scale_adds_slots_on_new_nodes_and_replans_over_them(store):
    shards = FakeShards(NODES)
    ctl, plane = make_ft(store, shards)
    shards.node_ids.append("n2")  # a node joined
    out = ctl.scale(6)
    assert out.added == (4, 5) and out.removed == () and out.slots_after == 6
    assert {node for _, node, _ in shards.created} == {2}  # the fewest-slot node first
    assert out.replan.replaced and ctl.plan.num_gpus == 6 and ctl.plan.phy2log_LP.shape[1] == 18
    assert ctl.plan_slots(ctl.plan) == (0, 1, 2, 3, 4, 5)
    assert ("prepare", 2) in plane.calls and ("retire", 1) in plane.calls


def test_scale_down_removes_slots_after_the_switch_and_refuses_too_few(store):
    shards = FakeShards(NODES)
    ctl, plane = make_ft(store, shards)
    with pytest.raises(ScaleError, match="need >= 3"):
        ctl.scale(2)  # 8 experts at 3 per slot
    assert plane.calls == [] and shards.stopped == []
    out = ctl.scale(3)
    assert out.removed == (3,) and shards.stopped == [3]
    assert ctl.plan.num_gpus == 3 and 3 not in ctl.plan_slots(ctl.plan)
    assert [s.slot for s in ctl.slot_table().slots] == [0, 1, 2]


def test_scale_cli_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    from expertmesh.cli import main

    monkeypatch.setenv("EXPERTMESH_HOME", str(tmp_path))
    for argv, says in ((["scale", "--expert-slots", "two"], "positive integer"),
                       (["scale", "--expert-slots", "0"], "positive integer"),
                       (["scale", "--expert-slots", "4"], "no data plane is up")):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and says in err and "\n" not in err, err


def test_mirrored_deployment_stays_mirrored_through_replacement_and_says_when_it_cannot(store):
    plane = FakePlane(1)
    ctl = Controller(store, plane, RebalancePolicy(GROUPS, 0.02, mirrored=True), moe_layers=[1, 2], window_s=60,
                     clock=lambda: 1000.0)
    mirrored = plan_mirrored(None, version=1, num_groups=GROUPS, num_nodes=NODES, num_gpus=SLOTS, num_logical=E,
                             num_layers=L)
    ctl.bootstrap(mirrored)
    load = torch.ones(L, E)
    load[:, 0:2] = 30.0  # group 0's two experts hot: id order puts them on one slot of each node
    plane.load = load
    result = ctl.rebalance()
    assert result.replaced and "mirrored" in result.reason and "not mirrored" not in result.reason
    assert result.balancedness_after > result.balancedness_before + 0.02
    plan, per_node = ctl.plan, 2 * E // NODES
    for row in range(L):  # each node holds the same experts as before, so every group is still on two nodes
        for node in range(NODES):
            cut = slice(node * per_node, (node + 1) * per_node)
            assert sorted(plan.phy2log_LP[row, cut].tolist()) == sorted(mirrored.phy2log_LP[row, cut].tolist())
    # a slot set that cannot hold two copies of every group: EPLB, and the reason says what is given up
    decision = ctl.policy.decide(load, plan, shape=PlanShape(12, 3, 1))
    assert decision.replace and "not mirrored (it needs >= 2 nodes" in decision.reason
    assert "whole-node loss is not survived" in decision.reason
