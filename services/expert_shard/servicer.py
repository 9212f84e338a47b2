"""gRPC face of an expert shard: ``Compute`` for its own slot, ``Dispatch`` when it forwards for its node."""

from __future__ import annotations

import torch

from expertmesh.protos import load
from expertmesh.services import wire
from expertmesh.services.expert_shard.shard import ExpertSlot, NodeForwarder, _num_tokens, _rows, validate_routing
from expertmesh.services.server import DEFAULT_RPC_TIMEOUT_S, StalePlan, channel, rpc

pb = load("expert_shard_pb2")
pb_grpc = load("expert_shard_pb2_grpc")
COMBINE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "": torch.float32}


def _combine_dtype(name: str) -> torch.dtype:
    if name not in COMBINE_DTYPES:
        raise ValueError(f"combine_dtype must be float32 or bfloat16, got {name!r}")
    return COMBINE_DTYPES[name]


class ExpertShardServicer(pb_grpc.ExpertShardServicer):
    def __init__(self, slot: ExpertSlot, logical_of: dict[int, dict[int, int]], node_index: int, node_id: str = "",
                 address: str = ""):
        self.slot = slot
        self.logical_of = logical_of  # layer -> physical -> logical, for Describe
        self.node_index = node_index
        self.node_id = node_id
        self.address = address
        self.forwarder: NodeForwarder | None = None
        self._peers: dict[int, object] = {}

    def become_forwarder(self, slot_of_physical: dict[int, int], peer_addresses: dict[int, str]) -> None:
        """Forward for this node: peers are the node's other slots (slot -> address)."""
        self._peers = {s: pb_grpc.ExpertShardStub(channel(a)) for s, a in peer_addresses.items()
                       if s != self.slot.slot}
        slots = {s: None for s in peer_addresses} | {self.slot.slot: None}
        self.forwarder = NodeForwarder(self.node_index, slot_of_physical, slots, self.slot.plan_version)

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
        if request.plan_version != self.forwarder.plan_version:
            raise StalePlan(f"node {self.node_index} serves plan {self.forwarder.plan_version}, "
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
                                   hidden=wire.encode_any(_rows(x, rows)), physical_ids=wire.encode(slot_ids.int()),
                                   weights=wire.encode(w.float()), combine_dtype="float32")
            intra += sub.ByteSize()
            pending.append((rows, self._peers[slot].Compute.future(sub, timeout=timeout)))
        out = torch.zeros(_num_tokens(x), self.slot.hidden_size, dtype=torch.float32)
        if local is not None:  # own slot: same process, no serialization; overlaps the peers' work
            rows, slot_ids, w = local
            out.index_add_(0, rows, self.slot.compute(request.layer, request.plan_version, _rows(x, rows), slot_ids, w))
        for rows, future in pending:
            resp = future.result()
            intra += resp.ByteSize()
            out.index_add_(0, rows, wire.decode(resp.partial, "partial").float())
        return pb.ExpertResponse(partial=wire.encode(out.to(combine)), intra_node_bytes=intra)

    @rpc
    def Describe(self, request, context):
        layers = [pb.LayerExperts(layer=layer, physical_ids=sorted(experts),
                                  logical_ids=[self.logical_of[layer][p] for p in sorted(experts)])
                  for layer, experts in sorted(self.slot.experts.items())]
        return pb.ShardInfo(node_id=self.node_id, node_index=self.node_index, slot=self.slot.slot,
                            plan_version=self.slot.plan_version, layers=layers, forwarder=self.forwarder is not None,
                            address=self.address)
