"""gRPC face of an expert shard: ``Compute`` for its own slot, ``Dispatch`` when it forwards for its node."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch

from expertmesh.protos import load
from expertmesh.services import wire
from expertmesh.services.expert_shard.shard import ExpertSlot, NodeForwarder, validate_routing
from expertmesh.services.server import DEFAULT_RPC_TIMEOUT_S, StalePlan, channel, rpc

pb = load("expert_shard_pb2")
pb_grpc = load("expert_shard_pb2_grpc")
placement_pb = load("placement_pb2")
COMBINE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "": torch.float32}


def _combine_dtype(name: str) -> torch.dtype:
    if name not in COMBINE_DTYPES:
        raise ValueError(f"combine_dtype must be float32 or bfloat16, got {name!r}")
    return COMBINE_DTYPES[name]


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
        self._peers: dict[int, object] = {}

    def become_forwarder(self, slot_of_physical: dict[int, int], peer_addresses: dict[int, str]) -> None:
        """Forward for this node: peers are the node's other slots (slot -> address)."""
        self._peers = {s: pb_grpc.ExpertShardStub(channel(a)) for s, a in peer_addresses.items()
                       if s != self.slot.slot}
        self.forwarder = NodeForwarder(self.node_index, slot_of_physical)

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
        if self.forwarder is None:
            raise ValueError(f"slot {self.slot.slot} does not forward for node {self.node_index}")
        if request.plan_version not in self.slot.plans:
            raise StalePlan(f"node {self.node_index} serves plan(s) {sorted(self.slot.plans)}, "
                            f"request names {request.plan_version}")
        combine = _combine_dtype(request.combine_dtype)
        x, ids, weights = self._decode(request)
        validate_routing(x, ids, weights, self.slot.hidden_size)
        timeout = max(0.1, (context.time_remaining() or DEFAULT_RPC_TIMEOUT_S) - 0.05)
        pending, local, intra = [], None, 0
        for slot, (rows, slot_ids) in self.forwarder.split(ids).items():
            w = weights[rows]
            if slot == self.slot.slot:
                local = (rows, slot_ids, w)
                continue
            sub = pb.ExpertRequest(layer=request.layer, plan_version=request.plan_version,
                                   hidden=wire.encode_any(wire.take_rows(x, rows)), physical_ids=wire.encode(slot_ids.int()),
                                   weights=wire.encode(w.float()), combine_dtype="float32")
            intra += sub.ByteSize()
            pending.append((rows, self._peers[slot].Compute.future(sub, timeout=timeout)))
        out = torch.zeros(wire.num_rows(x), self.slot.hidden_size, dtype=torch.float32)
        if local is not None:  # own slot: same process, no serialization; overlaps the peers' work
            rows, slot_ids, w = local
            out.index_add_(0, rows, self.slot.compute(request.layer, request.plan_version, wire.take_rows(x, rows), slot_ids, w))
        for rows, future in pending:
            resp = future.result()
            intra += resp.ByteSize()
            out.index_add_(0, rows, wire.decode(resp.partial, "partial").float())
        return pb.ExpertResponse(partial=wire.encode(out.to(combine)), intra_node_bytes=intra)

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
        if self.slot.slot >= plan.num_gpus:
            raise ValueError(f"plan has {plan.num_gpus} slots; this is slot {self.slot.slot}")
        physical = range(self.slot.slot * per_slot, (self.slot.slot + 1) * per_slot)
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
    def RetirePlan(self, request, context):
        """Drop a plan no router dispatches under any more, and the experts only it used."""
        with self._plan_lock:
            self.slot.retire(request.version)
            self.logical_of.pop(request.version, None)
            live = {(layer, e) for m in self.logical_of.values() for layer, pe in m.items() for e in pe.values()}
            for key in [k for k in self.modules if k not in live]:
                del self.modules[key]
        return placement_pb.PlanAck(version=request.version)
