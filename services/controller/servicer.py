"""gRPC face of the controller."""

from __future__ import annotations

import torch

from expertmesh.protos import load
from expertmesh.services import wire
from expertmesh.services.controller.controller import Controller, RebalanceResult
from expertmesh.services.server import rpc

pb = load("controller_pb2")
pb_grpc = load("controller_pb2_grpc")


class ControllerServicer(pb_grpc.ControllerServicer):
    def __init__(self, controller: Controller, store_url: str):
        self.controller = controller
        self.store_url = store_url

    @rpc
    def GetPlan(self, request, context):
        plan = self.controller.plan if request.version == 0 else self.controller.store.plan(request.version)
        return wire.encode_plan(plan)

    @rpc
    def ReportLoad(self, request, context):
        plan = self.controller.plan
        rows, E = len(request.layers), request.num_logical
        if E != plan.logcnt_LE.shape[1] or len(request.tokens_per_expert) != rows * E:
            raise ValueError(f"load report must be [layers={rows}] x [num_logical={plan.logcnt_LE.shape[1]}]")
        load_LE = torch.zeros_like(plan.logcnt_LE, dtype=torch.long)
        moe_rows = self.controller.moe_rows
        for i, layer in enumerate(request.layers):
            if layer not in moe_rows:
                raise ValueError(f"layer {layer} is not an MoE layer")
            load_LE[moe_rows[layer]] += torch.tensor(list(request.tokens_per_expert[i * E:(i + 1) * E]))
        self.controller.store.append_load(load_LE, self.controller.window_s, self.controller.clock())
        return pb.LoadReportAck(current_plan_version=plan.version)

    @rpc
    def Rebalance(self, request, context):
        return rebalance_to_proto(self.controller.rebalance(force=request.force, whole_plan=request.whole_plan))

    @rpc
    def Scale(self, request, context):
        if request.expert_slots <= 0:
            raise ValueError(f"expert_slots must be a positive integer, got {request.expert_slots}")
        r = self.controller.scale(request.expert_slots)
        out = pb.ScaleResult(slots_before=r.slots_before, slots_after=r.slots_after, added=list(r.added),
                             removed=list(r.removed))
        if r.replan is not None:
            out.replan.CopyFrom(rebalance_to_proto(r.replan))
        return out

    @rpc
    def GetStatus(self, request, context):
        plan, stats = self.controller.store.current_with_stats()
        status = pb.ControllerStatus(
            plan_version=plan.version, balancedness_now=stats.get("balancedness_now", 0.0),
            balancedness_before_last=stats.get("balancedness_before_last", 0.0),
            replacements=int(stats.get("replacements", 0)), failures_recovered=int(stats.get("failures_recovered", 0)),
            store=self.store_url)
        table = self.controller.slot_table()
        if table is not None:
            status.live_slots = len(table.live())
            status.dead_slots.extend(sorted(s.slot for s in table.slots if not s.alive))
            status.live_nodes = len({s.node for s in table.live()})
            status.slot_epoch = table.epoch
            status.slots.CopyFrom(table.to_proto())
        status.full_redundancy = self.controller.full_redundancy()
        return status


def rebalance_to_proto(r: RebalanceResult):
    return pb.RebalanceResult(replaced=r.replaced, reason=r.reason, old_version=r.old_version,
                              new_version=r.new_version, balancedness_before=r.balancedness_before,
                              balancedness_after=r.balancedness_after, seconds=r.seconds, moves=r.moves,
                              layer_steps=r.layer_steps, layer_pause_ms_p50=r.layer_pause_ms_p50,
                              layer_pause_ms_max=r.layer_pause_ms_max, layer_drain_ms_max=r.layer_drain_ms_max,
                              peak_extra_experts=r.peak_extra_experts, total_experts_loaded=r.total_experts_loaded)
