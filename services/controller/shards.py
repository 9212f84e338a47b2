"""The controller's hands on Ray: start expert-shard actors by name on a node, stop them, and ask
which nodes are alive. Everything Ray-specific for recovery and elastic scaling lives here, so
the controller logic runs with a fake in unit tests."""

from __future__ import annotations

import itertools
import logging
import socket
from typing import Protocol

from expertmesh.placement import PlacementPlan

log = logging.getLogger(__name__)
SHARD_START_TIMEOUT_S = 120.0  # start a worker, import torch, load the slot's experts
RAYLET_PROBE_TIMEOUT_S = 0.5  # Ray's own view of a node lags its death by its heartbeat timeout


class ShardStartFailed(RuntimeError):
    """A shard actor could not be started on its node (the node is gone or out of resources)."""


class ShardFactory(Protocol):
    def create(self, slot: int, node: int, plan: PlacementPlan, position: int | None) -> str: ...

    def stop(self, slot: int) -> None: ...

    def node_alive(self, node: int) -> bool: ...

    def alive_node_ids(self) -> list[str]: ...


class RayShardFactory:
    """Shard actors named ``expertmesh-shard-<plane>-<slot>-g<generation>``, detached (they must not
    die with the controller that started them; the data plane stops them by name)."""

    def __init__(self, plane_id: str, checkpoint: str, quantization: str, node_ids: list[str]):
        self.plane_id = plane_id
        self.checkpoint = checkpoint
        self.quantization = quantization
        self.node_ids = list(node_ids)
        self._generation = itertools.count(1)

    def _handle(self, slot: int):
        from expertmesh.services.expert_shard.actor import named_shard_actors, shard_actor_name

        return named_shard_actors(f"{shard_actor_name(self.plane_id, slot)}-")

    def create(self, slot: int, node: int, plan: PlacementPlan, position: int | None) -> str:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from expertmesh.services.expert_shard.actor import ExpertShardActor, shard_actor_name

        self.stop(slot)
        if node >= len(self.node_ids):
            raise ShardStartFailed(f"node index {node} is unknown (nodes: {len(self.node_ids)})")
        name = f"{shard_actor_name(self.plane_id, slot)}-g{next(self._generation)}"
        actor = ExpertShardActor.options(
            name=name, lifetime="detached",
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=self.node_ids[node], soft=False),
        ).remote(self.checkpoint, plan.to_dict(), slot, node, self.quantization, position=position)
        try:
            return ray.get(actor.get_address.remote(), timeout=SHARD_START_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - typed for the caller, the actor is cleaned up
            ray.kill(actor)
            raise ShardStartFailed(f"slot {slot} did not start on node {node}: {type(exc).__name__}: {exc}") from exc

    def stop(self, slot: int) -> None:
        import ray

        for handle in list(self._handle(slot)):
            try:
                ray.kill(handle)
            except Exception:  # noqa: BLE001 - already gone
                pass

    def node_alive(self, node: int) -> bool:
        """Ray lists the node alive and its raylet accepts a connection (a killed raylet refuses at once,
        while the cluster's view takes its heartbeat timeout to notice)."""
        return 0 <= node < len(self.node_ids) and self.node_ids[node] in set(self.alive_node_ids())

    def alive_node_ids(self) -> list[str]:
        import ray

        return [n["NodeID"] for n in ray.nodes() if n["Alive"] and _raylet_answers(n)]

    def add_node(self, node_id: str) -> int:
        """Index of a (re)joined node, appended when new."""
        if node_id not in self.node_ids:
            self.node_ids.append(node_id)
        return self.node_ids.index(node_id)


def _raylet_answers(node: dict) -> bool:
    try:
        with socket.create_connection((node["NodeManagerAddress"], int(node["NodeManagerPort"])),
                                      timeout=RAYLET_PROBE_TIMEOUT_S):
            return True
    except (OSError, KeyError, ValueError):
        return False
