"""gRPC face of the controller."""

from __future__ import annotations

import torch

from expertmesh.protos import load
from expertmesh.services import wire
from expertmesh.services.controller.controller import Controller
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
        r = self.controller.rebalance(force=request.force)
        return pb.RebalanceResult(replaced=r.replaced, reason=r.reason, old_version=r.old_version,
                                  new_version=r.new_version, balancedness_before=r.balancedness_before,
                                  balancedness_after=r.balancedness_after, seconds=r.seconds, moves=r.moves)

    @rpc
    def GetStatus(self, request, context):
        stats = self.controller.store.stats()
        return pb.ControllerStatus(
            plan_version=self.controller.plan.version, balancedness_now=stats.get("balancedness_now", 0.0),
            balancedness_before_last=stats.get("balancedness_before_last", 0.0),
            replacements=int(stats.get("replacements", 0)), failures_recovered=int(stats.get("failures_recovered", 0)),
            store=self.store_url)
