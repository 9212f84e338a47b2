"""Router fail-over with a fake transport (pure logic): a dead slot's pairs are re-routed to
surviving replicas in the same dispatch with the same result; an expert with no live replica
fails fast with a retriable error; the slot table drives forwarder choice and adoption."""

from __future__ import annotations

import pytest
import torch
from servicer_context import Aborted, ServicerContext

from expertmesh.placement import PlacementPlan
from expertmesh.protos import load
from expertmesh.services import wire
from expertmesh.services.router.router import ExpertsUnavailable, Router, RouterConfig
from expertmesh.services.router.transport import NodeUnavailable
from expertmesh.services.topology import SlotTable

pb = load("expert_shard_pb2")
E, D, K = 4, 8, 2

# 2 nodes x 2 slots, 2 physical per slot: every expert on both slots of one node
#   node 0: slot 0 = (0, 1), slot 1 = (0, 1); node 1: slot 2 = (2, 3), slot 3 = (2, 3)
PHY2LOG = torch.tensor([[0, 1, 0, 1, 2, 3, 2, 3]])


class ExpertMath:
    """Expert e multiplies by (e + 1): any replica of e gives the same answer."""

    def __init__(self, plan: PlacementPlan, dead: set[int]):
        self.plan, self.dead = plan, dead
        self.sent: list[tuple[int, list[int]]] = []
        self.forwarders: list[tuple[int, list[tuple[int, str]] | None]] = []

    def send(self, node, request, forwarders=None):
        if forwarders is not None and not forwarders:  # as GrpcTransport: nowhere to send
            raise NodeUnavailable(f"no live forwarder known for node {node}")
        slots = wire.decode(request.slot_ids).long()
        named = sorted(set(slots[slots >= 0].tolist()))
        self.sent.append((node, named))
        self.forwarders.append((node, forwarders))
        return request

    def result(self, request):
        slots = wire.decode(request.slot_ids).long()
        hit = sorted(set(slots[slots >= 0].tolist()) & self.dead)
        if hit:
            raise NodeUnavailable("peer down", tuple(hit))
        x = wire.decode_activation(request.hidden).float()  # fp32 dispatch in these tests
        ids = wire.decode(request.physical_ids).long()
        w = wire.decode(request.weights)
        logical = torch.where(ids >= 0, self.plan.phy2log_LP[0][ids.clamp(min=0)], -1)
        scale = ((logical + 1).float() * w * (ids >= 0)).sum(dim=1, keepdim=True)  # [T, 1]
        return pb.ExpertResponse(partial=wire.encode(x * scale))


def router(dead: set[int], phy2log: torch.Tensor = PHY2LOG, source_node: int = 0):
    plan = PlacementPlan.from_phy2log(1, phy2log, E, num_gpus=4, num_nodes=2)
    table = SlotTable.initial([f"a{s}" for s in range(4)], 2)
    fake = ExpertMath(plan, dead)
    r = Router(plan, [1], D, source_node=source_node, transport=fake,
               config=RouterConfig(max_nodes_per_token=2, dispatch_dtype="fp32"), slots=table)
    return r, fake


def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, D, generator=g)
    ids = torch.tensor([[0, 1], [1, 0], [2, 3], [3, 2], [0, 2], [1, 3]])
    return x, ids, torch.full((6, K), 0.5)


def test_dead_slot_is_routed_around_in_the_same_dispatch():
    x, ids, w = batch()
    healthy, _ = router(set())
    reference = healthy.route(1, x, ids, w)
    r, fake = router({1})  # slot 1 dies; the router does not know yet
    out = r.route(1, x, ids, w)
    assert torch.allclose(out, reference)
    assert r.counters.rerouted_sends >= 1 and r.dead_slots == [1]
    fake.sent.clear()
    assert torch.allclose(r.route(1, x, ids, w), reference)  # next dispatch avoids it up front
    assert all(1 not in named for _, named in fake.sent) and r.counters.rerouted_sends >= 1


def test_a_dispatch_sends_by_its_own_tables_while_another_thread_marks_a_node_dead():
    """Node 1 is gone. Another dispatch finds out and marks both of its slots dead between this
    dispatch's choice of replicas (node 1 still live in its tables) and its send there. The send
    goes to the forwarders of this dispatch's tables, fails, and is re-routed to node 0's mirror
    copies in the same dispatch. (With the forwarders read from the newest tables instead, node 1
    had none: "no live forwarder known for node 1", a failed request.)"""
    mirrored = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])  # node 0 and node 1 each hold every expert
    x, ids, w = batch()
    reference = router(set(), mirrored)[0].route(1, x, ids, w)
    r, fake = router({2, 3}, mirrored, source_node=1)  # node 1's replicas preferred
    choose = r.choose_replicas

    def then_another_thread_marks(*args, **kwargs):
        chosen = choose(*args, **kwargs)
        r.mark_dead([2, 3])
        return chosen

    r.choose_replicas = then_another_thread_marks
    assert torch.allclose(r.route(1, x, ids, w), reference)
    assert fake.forwarders[0] == (1, [(2, "a2"), (3, "a3")])  # as this dispatch's tables had them
    assert r.counters.rerouted_sends >= 1 and r.counters.unavailable_dispatches == 0 and r.dead_slots == [2, 3]
    fake.forwarders.clear()
    assert torch.allclose(r.route(1, x, ids, w), reference) and {n for n, _ in fake.forwarders} == {0}


def test_a_dead_mark_rebuilding_the_tables_during_a_plan_switch_keeps_the_new_plan():
    """A dead mark rebuilds the routing tables for the plan in force. While it builds, the
    controller switches the router to plan 2. The switch waits for that build, then installs plan 2
    with the mark. (Unserialized, the mark's tables for plan 1 were swapped in after the switch,
    putting plan 1 back.)"""
    import threading
    import time

    r, _ = router(set())
    build, building, finish = r._build, threading.Event(), threading.Event()

    def held_build(plan, plan_slots):
        if threading.current_thread().name == "marker":
            building.set()
            finish.wait(10)
        return build(plan, plan_slots)

    r._build = held_build
    marker = threading.Thread(target=r.mark_dead, args=([1],), name="marker")
    marker.start()
    assert building.wait(10)
    switch = threading.Thread(target=r.set_plan,
                              args=(PlacementPlan.from_phy2log(2, PHY2LOG, E, num_gpus=4, num_nodes=2),))
    switch.start()
    time.sleep(0.2)  # room for the switch to overtake the mark's build, as it could before
    finish.set()
    marker.join(10)
    switch.join(10)
    assert r.plan.version == 2 and r.dead_slots == [1]


def test_expert_without_live_replica_fails_fast_and_retriable():
    x, ids, w = batch()
    r, _ = router({0, 1})  # node 0 gone: experts 0 and 1 have no replica left
    with pytest.raises(ExpertsUnavailable, match="no live replica"):
        r.route(1, x, ids, w)
    assert r.counters.unavailable_dispatches == 1
    survivors = torch.tensor([[2, 3], [3, 2]])
    assert r.route(1, x[:2], survivors, w[:2]).shape == (2, D)  # other experts still served


def test_slot_table_recreation_and_adoption_restore_routing():
    x, ids, w = batch()
    r, fake = router({1})
    r.route(1, x, ids, w)
    table = SlotTable.initial([f"a{s}" for s in range(4)], 2)
    recreated = table.with_slots([s if s.slot != 1 else type(s)(1, 0, "a1-new") for s in table.slots])
    r.set_slots(recreated)  # a new address clears the router's own dead mark
    fake.dead = set()
    assert r.dead_slots == []
    # node 1 lost, its four physical experts adopted by slots 0 and 1 (node 0)
    lost = recreated.mark({2, 3})
    from dataclasses import replace

    adopted = replace(lost.with_slots(list(lost.slots)), adopted={4: 0, 5: 0, 6: 1, 7: 1}, plan_version=1)
    r.set_slots(adopted)
    fake.sent.clear()
    healthy, _ = router(set())
    assert torch.allclose(r.route(1, x, ids, w), healthy.route(1, x, ids, w))
    assert {node for node, _ in fake.sent} == {0}  # everything served by node 0 now


def test_a_forwarding_shard_reads_one_peer_view_per_dispatch():
    """A new slot table lands on a forwarding shard (its peer, slot 1, is dead) while a dispatch
    is being split. The dispatch sends by the peers it split by: the send to slot 1 fails and the
    answer is UNAVAILABLE naming slot 1, which the router routes around. (With the peers read
    twice, the stub had gone: INTERNAL KeyError, a failed request.)"""
    import grpc

    from expertmesh.services.expert_shard.servicer import ExpertShardServicer
    from expertmesh.services.expert_shard.shard import ExpertSlot
    from expertmesh.services.server import DEAD_SLOTS_KEY

    # slot 0 of node 0 hosts nothing asked for here; slot 1 (its peer) has an address nobody serves
    servicer = ExpertShardServicer(ExpertSlot(0, {1: {1: {}}}, D), {1: {}}, node_index=0, moe_layers=[1])
    table = SlotTable.initial(["127.0.0.1:9", "127.0.0.1:1"], 2)
    assert servicer.SetPeers(table.to_proto(), ServicerContext()) is not None
    split = servicer._split

    def then_the_table_marks_slot_1_dead(*args):
        out = split(*args)
        servicer.SetPeers(table.mark({1}).to_proto(), ServicerContext())
        return out

    servicer._split = then_the_table_marks_slot_1_dead
    request = pb.ExpertRequest(layer=1, plan_version=1, hidden=wire.encode_any(torch.randn(3, D)),
                               physical_ids=wire.encode(torch.tensor([[2, 3]] * 3, dtype=torch.int32)),
                               weights=wire.encode(torch.full((3, 2), 0.5)), combine_dtype="float32",
                               slot_ids=wire.encode(torch.ones(3, 2, dtype=torch.int32)))
    context = ServicerContext()
    with pytest.raises(Aborted):
        servicer.Dispatch(request, context)
    assert context.code == grpc.StatusCode.UNAVAILABLE and "slot(s) [1]" in context.details
    assert context.trailing == ((DEAD_SLOTS_KEY, "1"),)
