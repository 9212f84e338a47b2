"""Ray actor hosting one expert slot; every slot can forward for its node.

Ray does not restart a dead shard by itself (a restarted actor would come back on a new port
with its first plan): the controller notices, routes around it and recreates it by name,
loading the current plan's experts for its slot from the serving checkpoint."""

from __future__ import annotations

import ray

from expertmesh.placement import PlacementPlan
from expertmesh.protos import load
from expertmesh.services.expert_shard.servicer import ExpertShardServicer
from expertmesh.services.expert_shard.shard import ExpertSlot
from expertmesh.services.server import create_server

pb_grpc = load("expert_shard_pb2_grpc")


def slot_experts(plan: PlacementPlan, moe_layers: list[int], position: int | None) -> dict[int, dict[int, int]]:
    """layer -> {physical id -> logical id} for the physical experts at plan ``position`` (None: none)."""
    per_slot = plan.phy2log_LP.shape[1] // plan.num_gpus
    physical = range(position * per_slot, (position + 1) * per_slot) if position is not None else range(0)
    return {layer: {p: int(plan.phy2log_LP[row, p]) for p in physical} for row, layer in enumerate(moe_layers)}


def shard_actor_name(plane_id: str, slot: int) -> str:
    return f"expertmesh-shard-{plane_id}-{slot}"


def named_shard_actors(prefix: str):
    """Handles of the live named actors (this namespace) whose name starts with ``prefix``, e.g.
    ``shard_actor_name(plane, slot) + "-"`` for one slot's generations, or the plane's prefix for all."""
    for entry in ray.util.list_named_actors(all_namespaces=False):
        name = entry if isinstance(entry, str) else entry.get("name", "")
        if name.startswith(prefix):
            try:
                yield ray.get_actor(name)
            except ValueError:  # gone between the listing and the lookup
                continue


@ray.remote(num_cpus=0.01, max_restarts=0)
class ExpertShardActor:
    def __init__(self, checkpoint: str, plan: dict, slot: int, node_index: int, quantization: str = "auto",
                 bind_host: str = "127.0.0.1", torch_threads: int = 1, position: int | None = -1):
        """``position``: this slot's index in ``plan`` (-1: the slot id itself; None: hosts nothing yet)."""
        import torch

        from expertmesh.model.checkpoint import read_config
        from expertmesh.services.expert_shard.shard import load_serving_experts

        torch.set_num_threads(torch_threads)
        self.plan = PlacementPlan.from_dict(plan)
        config = read_config(checkpoint)
        logical_of = slot_experts(self.plan, config.moe_layers, slot if position == -1 else position)

        def loader(wanted):
            return load_serving_experts(checkpoint, wanted, quantization)

        wanted = {(layer, e) for layer, m in logical_of.items() for e in m.values()}
        modules = loader(wanted) if wanted else {}
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
        """Forward for this node; ``peer_addresses`` is slot -> address for every slot of the node
        (the plan's own layout is the fallback for requests without slot ids)."""
        per_slot = self.plan.phy2log_LP.shape[1] // self.plan.num_gpus
        slot_of_physical = {p: s for s in peer_addresses for p in range(s * per_slot, (s + 1) * per_slot)
                            if s < self.plan.num_gpus}
        self.servicer.become_forwarder(slot_of_physical, peer_addresses)

    def stop(self) -> None:
        self.server.stop(grace=1.0)
