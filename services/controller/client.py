"""The controller's view of the data plane over gRPC: shards (prepare/retire) and routers
(switch/stats). Calls to all shards or all routers go out concurrently."""

from __future__ import annotations

import torch

from expertmesh.placement import PlacementPlan
from expertmesh.protos import load
from expertmesh.services import wire
from expertmesh.services.server import channel

shard_grpc = load("expert_shard_pb2_grpc")
router_pb = load("router_pb2")
router_grpc = load("router_pb2_grpc")
placement_pb = load("placement_pb2")

PREPARE_TIMEOUT_S = 300.0  # loading experts from the checkpoint
SWITCH_TIMEOUT_S = 60.0


class GrpcPlaneClient:
    def __init__(self, shard_addresses: list[str], router_addresses: list[str], moe_layers: list[int],
                 num_logical: int):
        self.shards = [shard_grpc.ExpertShardStub(channel(a)) for a in shard_addresses]
        self.routers = [router_grpc.RouterStub(channel(a)) for a in router_addresses]
        self.row_of_layer = {layer: row for row, layer in enumerate(moe_layers)}
        self.num_logical = num_logical

    def prepare(self, plan: PlacementPlan) -> None:
        msg = wire.encode_plan(plan)
        for f in [s.PreparePlan.future(msg, timeout=PREPARE_TIMEOUT_S) for s in self.shards]:
            f.result()

    def switch(self, plan: PlacementPlan) -> None:
        msg = wire.encode_plan(plan)
        for f in [r.SetPlan.future(msg, timeout=SWITCH_TIMEOUT_S) for r in self.routers]:
            f.result()

    def retire(self, version: int) -> None:
        msg = placement_pb.PlanVersion(version=version)
        for f in [s.RetirePlan.future(msg, timeout=SWITCH_TIMEOUT_S) for s in self.shards]:
            f.result()

    def collect_load(self) -> torch.Tensor | None:
        """Token counts per (MoE layer, logical expert) since the last collection, all routers."""
        total = torch.zeros(len(self.row_of_layer), self.num_logical, dtype=torch.long)
        for stub in self.routers:
            stats = stub.GetStats(router_pb.RouterStatsRequest(reset_load=True), timeout=10)
            for layer in stats.load:
                total[self.row_of_layer[layer.layer]] += torch.tensor(list(layer.tokens_per_expert), dtype=torch.long)
        return total

    def router_versions(self) -> list[int]:
        return [stub.GetStats(router_pb.RouterStatsRequest(), timeout=10).plan_version for stub in self.routers]
