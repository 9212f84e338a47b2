"""The controller's view of the data plane over gRPC: shards (prepare/retire/adopt/peers/health)
and routers (switch/slots/stats). Calls to all shards or all routers go out concurrently; the
shards addressed are the live slots of the current slot table."""

from __future__ import annotations

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from expertmesh.placement import PlacementPlan
from expertmesh.protos import load
from expertmesh.services import wire
from expertmesh.services.server import channel
from expertmesh.services.topology import SlotTable

shard_pb = load("expert_shard_pb2")
shard_grpc = load("expert_shard_pb2_grpc")
router_pb = load("router_pb2")
router_grpc = load("router_pb2_grpc")
placement_pb = load("placement_pb2")

PREPARE_TIMEOUT_S = 300.0  # loading experts from the checkpoint
SWITCH_TIMEOUT_S = 60.0
PUBLISH_TIMEOUT_S = 5.0
HEALTH_TIMEOUT_S = 1.0
HEALTH_RECHECK_TIMEOUT_S = 3.0  # a slot is dead only when a second, longer check fails too
SLOW_ROUNDS_DEAD = 5  # a slot that answers nothing in time (but accepts connections) for this many rounds


class GrpcPlaneClient:
    def __init__(self, shard_addresses: list[str], router_addresses: list[str], moe_layers: list[int],
                 num_logical: int, table: SlotTable | None = None):
        self._channels: dict[str, object] = {}
        self.routers = [router_grpc.RouterStub(self._channel(a)) for a in router_addresses]
        self.moe_layers = list(moe_layers)
        self.row_of_layer = {layer: row for row, layer in enumerate(moe_layers)}
        self.num_logical = num_logical
        self.table = table
        self.shard_addresses = [s.address for s in table.live()] if table else list(shard_addresses)
        self._slow_rounds: dict[tuple[int, str], int] = {}  # (slot, address) -> consecutive timed-out rounds

    def _channel(self, address: str):
        if address not in self._channels:
            self._channels[address] = channel(address)
        return self._channels[address]

    def _shard(self, address: str):
        return shard_grpc.ExpertShardStub(self._channel(address))

    @property
    def shards(self) -> list:
        return [self._shard(a) for a in self.shard_addresses]

    def set_table(self, table: SlotTable) -> None:
        self.table = table
        self.shard_addresses = [s.address for s in table.live()]

    # ---- re-placement -------------------------------------------------------------------------------
    def prepare(self, plan: PlacementPlan, plan_slots: tuple[int, ...] | None = None) -> list:
        """PlanAck per live shard (experts_loaded: modules it loaded for this plan)."""
        msg = wire.encode_plan(plan, plan_slots)
        return [f.result() for f in [s.PreparePlan.future(msg, timeout=PREPARE_TIMEOUT_S) for s in self.shards]]

    def switch(self, plan: PlacementPlan, plan_slots: tuple[int, ...] | None = None) -> list:
        """PlanAck per router (install_seconds: table swap; seconds: drain of older dispatches)."""
        msg = wire.encode_plan(plan, plan_slots)
        return [f.result() for f in [r.SetPlan.future(msg, timeout=SWITCH_TIMEOUT_S) for r in self.routers]]

    def retire(self, version: int) -> None:
        msg = placement_pb.PlanVersion(version=version)
        for f in [s.RetirePlan.future(msg, timeout=SWITCH_TIMEOUT_S) for s in self.shards]:
            f.result()

    # ---- fault recovery -----------------------------------------------------------------------------
    def publish_slots(self, table: SlotTable) -> None:
        """Every live shard learns its node's peers first, then every router the table: a router never
        names a slot its forwarder does not know."""
        self.set_table(table)
        msg = table.to_proto()
        for f in [s.SetPeers.future(msg, timeout=PUBLISH_TIMEOUT_S) for s in self.shards]:
            f.result()
        for f in [r.SetSlots.future(msg, timeout=PUBLISH_TIMEOUT_S) for r in self.routers]:
            f.result()

    def adopt(self, address: str, plan: PlacementPlan, physical_ids: list[int]) -> int:
        """Have the shard at ``address`` host ``physical_ids`` of ``plan`` too; returns experts loaded."""
        logical = [int(plan.phy2log_LP[row, p]) for row in range(len(self.moe_layers)) for p in physical_ids]
        ack = self._shard(address).Adopt(shard_pb.AdoptRequest(
            plan_version=plan.version, physical_ids=physical_ids, layers=self.moe_layers, logical_ids=logical),
            timeout=PREPARE_TIMEOUT_S)
        return ack.experts_loaded

    def unhealthy_slots(self, table: SlotTable, only: set[int] | None = None) -> set[int]:
        """Live slots of ``table`` that are gone: the health check is refused twice (a dead process or
        node), or times out in ``SLOW_ROUNDS_DEAD`` rounds in a row (a hung one). A shard that is only
        slow on a loaded machine is not taken for a dead one."""
        def probe(slots, timeout_s):
            req = health_pb2.HealthCheckRequest(service="")
            futures = [(s, health_pb2_grpc.HealthStub(self._channel(s.address)).Check.future(req, timeout=timeout_s))
                       for s in slots]
            refused, slow = [], []
            for s, f in futures:
                try:
                    if f.result().status != health_pb2.HealthCheckResponse.SERVING:
                        refused.append(s)
                except grpc.RpcError as exc:
                    (slow if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED else refused).append(s)
            return refused, slow

        candidates = [s for s in table.live() if only is None or s.slot in only]
        refused, slow = probe(candidates, HEALTH_TIMEOUT_S)
        dead: set[int] = set()
        if refused or slow:
            refused, slow = probe(refused + slow, HEALTH_RECHECK_TIMEOUT_S)
            dead = {s.slot for s in refused}
        if only is not None:  # a targeted re-probe does not count rounds
            return dead
        slow_keys = {(s.slot, s.address) for s in slow}
        self._slow_rounds = {k: self._slow_rounds.get(k, 0) + 1 for k in slow_keys}
        dead |= {slot for (slot, _), n in self._slow_rounds.items() if n >= SLOW_ROUNDS_DEAD}
        return dead

    # ---- statistics ---------------------------------------------------------------------------------
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
