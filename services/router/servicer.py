"""gRPC face of the router: remote dispatch (``Route``) and its counters (``GetStats``)."""

from __future__ import annotations

import numpy as np
import torch

from expertmesh.protos import load
from expertmesh.services import wire
from expertmesh.services.router.router import Router
from expertmesh.services.server import rpc
from expertmesh.services.topology import SlotTable

pb = load("router_pb2")
pb_grpc = load("router_pb2_grpc")
placement_pb = load("placement_pb2")


class RouterServicer(pb_grpc.RouterServicer):
    def __init__(self, router: Router):
        self.router = router

    @rpc
    def Route(self, request, context):
        x = wire.decode_activation(request.hidden)
        if not hasattr(x, "dtype"):
            raise ValueError("Route takes float activations; the router quantizes for dispatch itself")
        ids = wire.decode(request.topk_ids, "topk_ids")
        weights = wire.decode(request.topk_weights, "topk_weights")
        if ids.dtype not in (torch.int32, torch.int64) or not weights.dtype.is_floating_point:
            raise ValueError(f"topk_ids must be integers and topk_weights floats, got {ids.dtype} / {weights.dtype}")
        out = self.router.route(request.layer, x.float(), ids, weights.float(), plan_version=request.plan_version)
        return pb.RouteResponse(output=wire.encode(out))

    @rpc
    def SetPlan(self, request, context):
        waited = self.router.set_plan(wire.decode_plan(request),
                                      drain_timeout_s=max(1.0, (context.time_remaining() or 30.0) - 0.5),
                                      plan_slots=wire.decode_plan_slots(request))
        return placement_pb.PlanAck(version=request.version, seconds=waited,
                                    install_seconds=self.router.last_install_s)

    @rpc
    def SetSlots(self, request, context):
        self.router.set_slots(SlotTable.from_proto(request))
        return placement_pb.PlanAck(version=self.router.plan.version)

    @rpc
    def GetStats(self, request, context):
        return router_stats(self.router, reset=request.reset, reset_load=request.reset_load)


def router_stats(router: Router, reset: bool = False, reset_load: bool = False):
    c = router.reset_counters() if reset else router.counters
    load = router.take_load() if reset_load and not reset else dict(c.load)
    layers = sorted(c.latency_s)
    p50 = [float(np.percentile(list(c.latency_s[l]), 50)) * 1e3 for l in layers]
    p99 = [float(np.percentile(list(c.latency_s[l]), 99)) * 1e3 for l in layers]
    return pb.RouterStats(
        plan_version=router.plan.version, dispatches=c.dispatches, tokens=c.tokens,
        inter_node_bytes=c.inter_node_bytes, intra_node_bytes=c.intra_node_bytes,
        naive_inter_node_bytes=c.naive_inter_node_bytes, dispatch_inter_node_bytes=c.dispatch_inter_node_bytes,
        naive_dispatch_inter_node_bytes=c.naive_dispatch_inter_node_bytes, max_nodes_per_token=c.max_nodes_per_token,
        node_sends=c.node_sends, duplicate_node_sends=c.node_sends - c.token_node_pairs,
        load=[pb.LayerLoad(layer=l, tokens_per_expert=t.tolist()) for l, t in sorted(load.items())],
        latency_ms_p50=p50, latency_ms_p99=p99, rerouted_sends=c.rerouted_sends,
        unavailable_dispatches=c.unavailable_dispatches, dead_slots=router.dead_slots, slot_epoch=router.slot_epoch,
    )
