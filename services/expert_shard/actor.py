"""Ray actor hosting one expert slot (and, for one slot per node, the node's forwarder)."""

from __future__ import annotations

import ray

from expertmesh.placement import PlacementPlan
from expertmesh.protos import load
from expertmesh.services.expert_shard.servicer import ExpertShardServicer
from expertmesh.services.expert_shard.shard import ExpertSlot
from expertmesh.services.server import create_server

pb_grpc = load("expert_shard_pb2_grpc")


def slot_experts(plan: PlacementPlan, moe_layers: list[int], slot: int) -> dict[int, dict[int, int]]:
    """layer -> {physical id -> logical id} for the physical experts of ``slot``."""
    per_slot = plan.phy2log_LP.shape[1] // plan.num_gpus
    physical = range(slot * per_slot, (slot + 1) * per_slot)
    return {layer: {p: int(plan.phy2log_LP[row, p]) for p in physical} for row, layer in enumerate(moe_layers)}


@ray.remote(num_cpus=0.01, max_restarts=3)
class ExpertShardActor:
    def __init__(self, checkpoint: str, plan: dict, slot: int, node_index: int, quantization: str = "auto",
                 bind_host: str = "127.0.0.1", torch_threads: int = 1):
        import torch

        from expertmesh.model.checkpoint import load_experts, read_config

        torch.set_num_threads(torch_threads)
        self.plan = PlacementPlan.from_dict(plan)
        config = read_config(checkpoint)
        logical_of = slot_experts(self.plan, config.moe_layers, slot)
        def loader(wanted):
            return load_experts(checkpoint, wanted, quantization)

        modules = loader({(layer, e) for layer, m in logical_of.items() for e in m.values()})
        experts = {layer: {p: modules[(layer, e)] for p, e in m.items()} for layer, m in logical_of.items()}
        self.slot = ExpertSlot(slot, {self.plan.version: experts}, config.hidden_size)
        self.servicer = ExpertShardServicer(self.slot, logical_of, node_index,
                                            ray.get_runtime_context().get_node_id(), moe_layers=config.moe_layers,
                                            loader=loader, modules=modules)
        self.server, port = create_server(f"{bind_host}:0", [
            (pb_grpc.add_ExpertShardServicer_to_server, self.servicer, "expertmesh.v1.ExpertShard")])
        self.address = f"{bind_host}:{port}"
        self.servicer.address = self.address

    def get_address(self) -> str:
        return self.address

    def become_forwarder(self, peer_addresses: dict[int, str]) -> None:
        """Forward for this node; ``peer_addresses`` is slot -> address for every slot of the node."""
        per_slot = self.plan.phy2log_LP.shape[1] // self.plan.num_gpus
        slot_of_physical = {p: s for s in peer_addresses for p in range(s * per_slot, (s + 1) * per_slot)}
        self.servicer.become_forwarder(slot_of_physical, peer_addresses)

    def stop(self) -> None:
        self.server.stop(grace=1.0)
