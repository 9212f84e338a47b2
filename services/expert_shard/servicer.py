"""gRPC face of an expert shard: ``Compute`` for its own slot, ``Dispatch`` to forward for its node.

Every shard can forward for its node (the router picks a live one): ``Dispatch`` fans the tokens
out by the slot ids the router put in the request (or, without them, by the plan's own layout)
and sums inside the node. A peer that does not answer (a dead actor) makes the dispatch fail
fast with UNAVAILABLE naming that slot, so the router re-routes around it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import torch

from expertmesh.protos import load
from expertmesh.services import wire
from expertmesh.services.expert_shard.shard import ExpertSlot, NodeForwarder, validate_routing
from expertmesh.services.server import DEFAULT_RPC_TIMEOUT_S, StalePlan, Unavailable, channel, rpc
from expertmesh.services.topology import SlotTable, position_slots

PEER_ERRORS = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)

pb = load("expert_shard_pb2")
pb_grpc = load("expert_shard_pb2_grpc")
placement_pb = load("placement_pb2")
COMBINE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "": torch.float32}


def _combine_dtype(name: str) -> torch.dtype:
    if name not in COMBINE_DTYPES:
        raise ValueError(f"combine_dtype must be float32 or bfloat16, got {name!r}")
    return COMBINE_DTYPES[name]


@dataclass(frozen=True)
class Peers:
    """The node's other slots as this shard's forwarding sees them (one slot table's worth)."""

    stubs: dict[int, object]  # slot -> stub, live peers only
    addresses: dict[int, str]  # slot -> address, as the table lists them
    dead: frozenset[int]


class ExpertShardServicer(pb_grpc.ExpertShardServicer):
    def __init__(self, slot: ExpertSlot, logical_of: dict[int, dict[int, int]], node_index: int, node_id: str = "",
                 address: str = "", moe_layers: list[int] | None = None,
                 loader: Callable[[set[tuple[int, int]]], dict[tuple[int, int], object]] | None = None,
                 modules: dict[tuple[int, int], object] | None = None):
        self.slot = slot
        self.logical_of = {slot.plan_version: logical_of}  # version -> layer -> physical -> logical
        self.moe_layers = moe_layers or sorted(logical_of)
        self.loader = loader  # loads (layer, logical) experts from the serving checkpoint
        self.modules = modules or {}  # (layer, logical) -> expert module, shared across plans
        self._plan_lock = threading.Lock()
        self.node_index = node_index
        self.node_id = node_id
        self.address = address
        self.forwarder: NodeForwarder | None = None
        self._peers = Peers({}, {}, frozenset())  # replaced whole: a dispatch reads one view
        self._peers_lock = threading.Lock()  # SetPeers: epoch check and swap together
        self._peer_epoch = 0

    def become_forwarder(self, slot_of_physical: dict[int, int], peer_addresses: dict[int, str]) -> None:
        """Forward for this node: peers are the node's other slots (slot -> address)."""
        self._set_peers(peer_addresses, set())
        self.forwarder = NodeForwarder(self.node_index, slot_of_physical)

    def _set_peers(self, peer_addresses: dict[int, str], dead: set[int]) -> None:
        old = self._peers
        stubs = {s: (old.stubs[s] if old.addresses.get(s) == a and s in old.stubs
                     else pb_grpc.ExpertShardStub(channel(a)))
                 for s, a in peer_addresses.items() if s != self.slot.slot and s not in dead}
        self._peers = Peers(stubs, dict(peer_addresses), frozenset(dead))

    @rpc
    def SetPeers(self, request, context):
        """The slot table: this shard keeps the live slots of its own node as forwarding peers."""
        table = SlotTable.from_proto(request)
        with self._peers_lock:  # two tables in flight at once: the newer epoch wins whichever lands last
            if table.epoch >= self._peer_epoch:
                mine = table.node_slots(self.node_index, alive_only=False)
                self._set_peers({s.slot: s.address for s in mine}, {s.slot for s in mine if not s.alive})
                self._peer_epoch = table.epoch
        return placement_pb.PlanAck(version=self.slot.plan_version)

    def _decode(self, request):
        x = wire.decode_activation(request.hidden)
        ids = wire.decode(request.physical_ids, "physical_ids")
        weights = wire.decode(request.weights, "weights")
        return x, ids, weights

    @rpc
    def Compute(self, request, context):
        x, ids, weights = self._decode(request)
        out = self.slot.compute(request.layer, request.plan_version, x, ids, weights)
        return pb.ExpertResponse(partial=wire.encode(out.to(_combine_dtype(request.combine_dtype))))

    @rpc
    def Dispatch(self, request, context):
        if request.plan_version not in self.slot.plans:
            raise StalePlan(f"node {self.node_index} serves plan(s) {sorted(self.slot.plans)}, "
                            f"request names {request.plan_version}")
        combine = _combine_dtype(request.combine_dtype)
        x, ids, weights = self._decode(request)
        validate_routing(x, ids, weights, self.slot.hidden_size)
        peers = self._peers  # one view for the whole dispatch (SetPeers may swap it meanwhile)
        split = self._split(request, ids, peers)
        timeout = max(0.1, (context.time_remaining() or DEFAULT_RPC_TIMEOUT_S) - 0.05)
        pending, local, intra = [], None, 0
        for slot, (rows, slot_ids) in split.items():
            w = weights[rows]
            if slot == self.slot.slot:
                local = (rows, slot_ids, w)
                continue
            sub = pb.ExpertRequest(layer=request.layer, plan_version=request.plan_version,
                                   hidden=wire.encode_any(wire.take_rows(x, rows)), physical_ids=wire.encode(slot_ids.int()),
                                   weights=wire.encode(w.float()), combine_dtype="float32")
            intra += sub.ByteSize()
            pending.append((slot, rows, peers.stubs[slot].Compute.future(sub, timeout=timeout)))
        out = torch.zeros(wire.num_rows(x), self.slot.hidden_size, dtype=torch.float32)
        if local is not None:  # own slot: same process, no serialization; overlaps the peers' work
            rows, slot_ids, w = local
            out.index_add_(0, rows, self.slot.compute(request.layer, request.plan_version, wire.take_rows(x, rows), slot_ids, w))
        dead = []
        for slot, rows, future in pending:
            try:
                resp = future.result()
            except grpc.RpcError as exc:
                if exc.code() not in PEER_ERRORS:
                    raise
                dead.append(slot)
                continue
            intra += resp.ByteSize()
            out.index_add_(0, rows, wire.decode(resp.partial, "partial").float())
        if dead:
            raise Unavailable(f"node {self.node_index}: slot(s) {dead} do not answer", tuple(dead))
        return pb.ExpertResponse(partial=wire.encode(out.to(combine)), intra_node_bytes=intra)

    def _split(self, request, ids: torch.Tensor, peers: Peers) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Per slot of this node: (token rows, physical ids masked to that slot [n, K])."""
        if not request.HasField("slot_ids"):
            if self.forwarder is None:
                raise ValueError(f"slot {self.slot.slot} has no plan layout to forward by: send slot_ids")
            return self.forwarder.split(ids)
        slots = wire.decode(request.slot_ids, "slot_ids").long()
        if slots.shape != ids.shape:
            raise ValueError(f"slot_ids shape {list(slots.shape)} != physical_ids shape {list(ids.shape)}")
        if bool(((ids >= 0) != (slots >= 0)).any()):
            raise ValueError("slot_ids must be -1 exactly where physical_ids are -1")
        out = {}
        for slot in slots[slots >= 0].unique().tolist():
            if slot != self.slot.slot and slot not in peers.stubs:
                if slot in peers.dead:
                    raise Unavailable(f"node {self.node_index}: slot {slot} is down", (slot,))
                raise ValueError(f"slot {slot} is not on node {self.node_index} "
                                 f"(node slots: {sorted([self.slot.slot, *peers.stubs])})")
            mask = slots == slot
            rows = mask.any(dim=1).nonzero(as_tuple=True)[0]
            out[slot] = (rows, torch.where(mask[rows], ids[rows], torch.full_like(ids[rows], -1)))
        return out

    @rpc
    def Describe(self, request, context):
        version = self.slot.plan_version
        logical = self.logical_of[version]
        layers = [pb.LayerExperts(layer=layer, physical_ids=sorted(experts),
                                  logical_ids=[logical[layer][p] for p in sorted(experts)])
                  for layer, experts in sorted(self.slot.plans[version].items())]
        return pb.ShardInfo(node_id=self.node_id, node_index=self.node_index, slot=self.slot.slot,
                            plan_version=version, layers=layers, forwarder=self.forwarder is not None,
                            address=self.address, plan_versions=sorted(self.slot.plans))

    @rpc
    def PreparePlan(self, request, context):
        """Load this slot's experts for a new plan (reusing modules it already holds)."""
        started = time.perf_counter()
        plan = wire.decode_plan(request)
        if plan.phy2log_LP.shape[0] != len(self.moe_layers):
            raise ValueError(f"plan has {plan.phy2log_LP.shape[0]} MoE layers, the model {len(self.moe_layers)}")
        per_slot = plan.phy2log_LP.shape[1] // plan.num_gpus
        plan_slots = position_slots(plan, wire.decode_plan_slots(request))
        if not request.slot_ids and self.slot.slot >= plan.num_gpus:
            raise ValueError(f"plan has {plan.num_gpus} slots; this is slot {self.slot.slot}")
        # a slot the plan leaves out (elastic scale-down) hosts nothing under it
        position = plan_slots.index(self.slot.slot) if self.slot.slot in plan_slots else None
        physical = range(position * per_slot, (position + 1) * per_slot) if position is not None else range(0)
        logical = {layer: {p: int(plan.phy2log_LP[row, p]) for p in physical}
                   for row, layer in enumerate(self.moe_layers)}
        with self._plan_lock:
            if plan.version in self.slot.plans:
                return placement_pb.PlanAck(version=plan.version, seconds=0.0)
            wanted = {(layer, e) for layer, m in logical.items() for e in m.values()} - set(self.modules)
            if wanted and self.loader is None:
                raise ValueError(f"slot {self.slot.slot} cannot load new experts (no loader)")
            self.modules.update(self.loader(wanted) if wanted else {})
            experts = {layer: {p: self.modules[(layer, e)] for p, e in m.items()} for layer, m in logical.items()}
            self.logical_of[plan.version] = logical
            self.slot.add_plan(plan.version, experts)
        return placement_pb.PlanAck(version=plan.version, experts_loaded=len(wanted),
                                    seconds=time.perf_counter() - started)

    @rpc
    def Adopt(self, request, context):
        """Host extra physical experts of a served plan (a dead slot's), loaded from the checkpoint."""
        started = time.perf_counter()
        physical, layers = list(request.physical_ids), list(request.layers)
        if list(layers) != list(self.moe_layers):
            raise ValueError(f"Adopt must list the MoE layers {self.moe_layers}, got {layers}")
        if len(request.logical_ids) != len(layers) * len(physical):
            raise ValueError(f"logical_ids must be [layers={len(layers)}] x [physical={len(physical)}], "
                             f"got {len(request.logical_ids)} entries")
        with self._plan_lock:
            version = request.plan_version
            if version not in self.slot.plans:
                raise StalePlan(f"slot {self.slot.slot} serves plan(s) {sorted(self.slot.plans)}, adopt names {version}")
            logical = {layer: {p: int(request.logical_ids[i * len(physical) + j]) for j, p in enumerate(physical)}
                       for i, layer in enumerate(layers)}
            wanted = {(layer, e) for layer, m in logical.items() for e in m.values()} - set(self.modules)
            if wanted and self.loader is None:
                raise ValueError(f"slot {self.slot.slot} cannot load new experts (no loader)")
            self.modules.update(self.loader(wanted) if wanted else {})
            merged_logical = {layer: {**self.logical_of[version].get(layer, {}), **m} for layer, m in logical.items()}
            experts = {layer: {p: self.modules[(layer, e)] for p, e in m.items()} for layer, m in merged_logical.items()}
            self.logical_of[version] = merged_logical
            self.slot.add_plan(version, experts)  # copy-on-write: in-flight computes keep their view
        return placement_pb.PlanAck(version=version, experts_loaded=len(wanted), seconds=time.perf_counter() - started)

    @rpc
    def RetirePlan(self, request, context):
        """Drop a plan no router dispatches under any more, and the experts only it used."""
        with self._plan_lock:
            self.slot.retire(request.version)
            self.logical_of.pop(request.version, None)
            live = {(layer, e) for m in self.logical_of.values() for layer, pe in m.items() for e in pe.values()}
            for key in [k for k in self.modules if k not in live]:
                del self.modules[key]
        return placement_pb.PlanAck(version=request.version)
