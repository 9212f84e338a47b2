"""Bring the distributed data plane up on a Ray cluster and drive it.

``DataPlane.start`` places one expert-shard actor per device slot (``slots_per_node`` per
node) pinned to its node (every shard can forward for its node), builds the static placement
plan (EPLB over uniform load: groups packed to nodes, redundant replicas inside nodes; or
``placement="mirrored"``: every expert group on two nodes, so a whole node can fail without
losing an expert), the slot table, and starts the data-parallel attention actors, each with
its router beside it, and the controller (health checks, fault recovery, re-placement).
Without a cluster address it first starts a local multi-node cluster: several raylets on
this machine, each a real Ray node with its own resources.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import uuid
from pathlib import Path
from dataclasses import dataclass, field
from typing import Literal

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from expertmesh.engine import SamplingParams
from expertmesh.model import read_config
from expertmesh.placement import PlacementPlan, plan_mirrored, plan_placement
from expertmesh.protos import load
from expertmesh.services.attention.actor import AttentionActor
from expertmesh.services.attention.servicer import params_to_proto
from expertmesh.services.expert_shard.actor import ExpertShardActor, named_shard_actors, shard_actor_name
from expertmesh.services.server import channel, check_health
from expertmesh.services.topology import SlotTable

log = logging.getLogger(__name__)
attention_pb = load("attention_pb2")
attention_grpc = load("attention_pb2_grpc")
router_pb = load("router_pb2")
router_grpc = load("router_pb2_grpc")
shard_pb = load("expert_shard_pb2")
shard_grpc = load("expert_shard_pb2_grpc")

GENERATE_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class DataPlaneConfig:
    checkpoint: str
    num_nodes: int = 3
    slots_per_node: int = 1
    redundant_experts: int | None = None  # default: one per slot
    dispatch_dtype: Literal["fp8", "bf16", "fp32"] = "fp8"
    combine_dtype: Literal["float32", "bfloat16"] = "float32"
    # Two micro-batches per step (attention of one while the other's dispatch is out). Off by
    # default: it pays off when compute and network are separate resources (GPU + NIC); on a
    # 2-core CPU box it only doubles the messages (see benchmarks/bench_dataplane.py).
    overlap: bool = False
    quantization: Literal["auto", "fp8", "none"] = "auto"
    attention_replicas: int = 1
    kv_cache_dtype: str = "auto"
    max_num_seqs: int = 16
    controller: bool = True
    redis_url: str | None = None  # None: an embedded Valkey started for this data plane
    load_window_s: float = 600.0  # sliding window of expert load the controller balances over
    rebalance_interval_s: float | None = 600.0  # None: re-place on demand only
    min_gain: float = 0.02
    # "eplb": groups packed to nodes, redundant replicas inside nodes (survives a shard loss);
    # "mirrored": every group also on the next node (survives a whole node loss, 2x the experts)
    placement: Literal["eplb", "mirrored"] = "eplb"
    health_interval_s: float | None = 0.5  # controller health checks (None: no fault recovery)

    def __post_init__(self) -> None:
        for name in ("num_nodes", "slots_per_node", "attention_replicas"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.placement not in ("eplb", "mirrored"):
            raise ValueError(f"placement must be eplb or mirrored, got {self.placement!r}")

    @property
    def num_slots(self) -> int:
        return self.num_nodes * self.slots_per_node


def static_plan(config: DataPlaneConfig) -> PlacementPlan:
    """Version-1 plan from the model config: hierarchical EPLB over uniform load."""
    model = read_config(config.checkpoint)
    if not model.has_moe:
        raise ValueError(f"{config.checkpoint} has no MoE layers to distribute")
    if model.n_group % config.num_nodes:
        raise ValueError(
            f"node-limited routing maps expert groups to nodes: n_group={model.n_group} must be a multiple of "
            f"--nodes={config.num_nodes}"
        )
    if config.placement == "mirrored":
        return plan_mirrored(None, version=1, num_groups=model.n_group, num_nodes=config.num_nodes,
                             num_gpus=config.num_slots, num_logical=model.n_routed_experts,
                             num_layers=len(model.moe_layers))
    extra = config.num_slots if config.redundant_experts is None else config.redundant_experts
    physical = math.ceil((model.n_routed_experts + extra) / config.num_slots) * config.num_slots
    load_LE = torch.ones(len(model.moe_layers), model.n_routed_experts)
    return plan_placement(load_LE, version=1, num_replicas=physical, num_groups=model.n_group,
                          num_nodes=config.num_nodes, num_gpus=config.num_slots)


class LocalCluster:
    """Several raylets on this machine, each a Ray node (for demos and tests)."""

    START_ATTEMPTS = 3
    RETRY_PAUSE_S = 2.0

    def __init__(self, num_nodes: int, cpus_per_node: int = 1, object_store_bytes: int = 200 << 20):
        for attempt in range(1, self.START_ATTEMPTS + 1):
            try:
                self.cluster = self._start(num_nodes, cpus_per_node, object_store_bytes)
                break
            except Exception as exc:  # noqa: BLE001 - Ray raises plain Exception on a startup timeout
                # On a loaded machine a raylet can miss Ray's 30 s registration deadline; the
                # attempt's processes are ours to clean up (Ray keeps no handle to a failed node).
                log.warning("local Ray cluster failed to start (attempt %d of %d): %s", attempt,
                               self.START_ATTEMPTS, exc)
                if attempt == self.START_ATTEMPTS:
                    raise
                time.sleep(self.RETRY_PAUSE_S)
        self.address = self.cluster.address

    @staticmethod
    def _start(num_nodes: int, cpus_per_node: int, object_store_bytes: int):
        import psutil
        from ray.cluster_utils import Cluster

        before = {p.pid for p in psutil.Process().children(recursive=True)}
        cluster = None
        try:
            cluster = Cluster(initialize_head=True, head_node_args={
                "num_cpus": cpus_per_node, "object_store_memory": object_store_bytes, "include_dashboard": False})
            for _ in range(num_nodes - 1):
                cluster.add_node(num_cpus=cpus_per_node, object_store_memory=object_store_bytes)
            cluster.wait_for_nodes()
            return cluster
        except Exception:
            if cluster is not None:
                cluster.shutdown()
            for proc in psutil.Process().children(recursive=True):
                if proc.pid not in before:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        proc.kill()
            raise

    def shutdown(self) -> None:
        self.cluster.shutdown()


@dataclass
class DataPlane:
    config: DataPlaneConfig
    plan: PlacementPlan
    node_ids: list[str]
    shards: list = field(default_factory=list)  # actor handles, slot order
    shard_addresses: list[str] = field(default_factory=list)
    attention: list = field(default_factory=list)
    attention_addresses: list[str] = field(default_factory=list)
    local_cluster: LocalCluster | None = None
    controller: object | None = None  # ControllerActor handle
    controller_address: str = ""
    valkey: object | None = None  # expertmesh.store.Store of the embedded server when no redis_url was given
    plane_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])  # names this plane's shard actors
    slots: SlotTable | None = None  # the slot table at start (the controller keeps the live one)
    _channels: dict = field(default_factory=dict)  # address -> grpc.Channel

    # ---- lifecycle ---------------------------------------------------------------------------------
    @classmethod
    def start(cls, config: DataPlaneConfig, address: str | None = None) -> DataPlane:
        plan = static_plan(config)  # validates before anything starts
        local = None
        if not ray.is_initialized():
            if address is None:
                local = LocalCluster(config.num_nodes)
                address = local.address
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        nodes = sorted((n for n in ray.nodes() if n["Alive"]), key=lambda n: (not n.get("IsHeadNode", False),
                                                                              n["NodeID"]))
        if len(nodes) < config.num_nodes:
            raise ValueError(f"the cluster has {len(nodes)} alive nodes, --nodes={config.num_nodes} needs more")
        node_ids = [n["NodeID"] for n in nodes[: config.num_nodes]]
        plane = cls(config, plan, node_ids, local_cluster=local)
        plane._start_actors()
        return plane

    def _pin(self, node: int):
        return NodeAffinitySchedulingStrategy(node_id=self.node_ids[node], soft=False)

    def _start_actors(self) -> None:
        cfg, plan_dict = self.config, self.plan.to_dict()
        self.shards = [
            ExpertShardActor.options(name=f"{shard_actor_name(self.plane_id, slot)}-g0",
                                     scheduling_strategy=self._pin(slot // cfg.slots_per_node)).remote(
                cfg.checkpoint, plan_dict, slot, slot // cfg.slots_per_node, cfg.quantization)
            for slot in range(cfg.num_slots)
        ]
        self.shard_addresses = ray.get([s.get_address.remote() for s in self.shards])
        forwarders = {}
        for node in range(cfg.num_nodes):  # every slot can forward for its node; the first is preferred
            slots = range(node * cfg.slots_per_node, (node + 1) * cfg.slots_per_node)
            ray.get([self.shards[s].become_forwarder.remote({p: self.shard_addresses[p] for p in slots})
                     for s in slots])
            forwarders[node] = self.shard_addresses[slots[0]]
        self.forwarders = forwarders
        self.slots = SlotTable.initial(self.shard_addresses, cfg.slots_per_node)
        self.attention = [
            AttentionActor.options(scheduling_strategy=self._pin(rank % cfg.num_nodes)).remote(
                cfg.checkpoint, plan_dict, forwarders, rank % cfg.num_nodes, rank, cfg.dispatch_dtype,
                cfg.combine_dtype, cfg.overlap, cfg.quantization, cfg.max_num_seqs, cfg.kv_cache_dtype,
                slots=self.slots.to_dict())
            for rank in range(cfg.attention_replicas)
        ]
        self.attention_addresses = ray.get([a.get_address.remote() for a in self.attention])
        if cfg.controller:
            self._start_controller()

    def _start_controller(self) -> None:
        from expertmesh.services.controller.actor import CONTROLLER_NAME, ControllerActor

        cfg = self.config
        url = cfg.redis_url
        if url is None:  # an embedded Valkey (AOF on) for this data plane's controller
            import tempfile

            from expertmesh.store import open_store

            self.valkey = open_store(None, Path(tempfile.mkdtemp(prefix="expertmesh-dataplane-valkey-")))
            url = self.valkey.url
        model = read_config(cfg.checkpoint)
        topology = {"shards": self.shard_addresses, "routers": self.attention_addresses,
                    "moe_layers": model.moe_layers, "num_logical": model.n_routed_experts, "n_group": model.n_group,
                    "checkpoint": cfg.checkpoint, "nodes": self.node_ids, "slots_per_node": cfg.slots_per_node,
                    "slots": self.slots.to_dict(), "plane_id": self.plane_id, "quantization": cfg.quantization,
                    "placement": cfg.placement}
        self.controller = ControllerActor.options(
            name=f"{CONTROLLER_NAME}-{self.plane_id}", lifetime="detached",
            scheduling_strategy=self._pin(0)).remote(
            url, topology, self.plan.to_dict(), cfg.load_window_s, cfg.min_gain, cfg.rebalance_interval_s,
            health_interval_s=cfg.health_interval_s)
        self.controller_address = ray.get(self.controller.get_address.remote())
        self.redis_url = url

    def stop(self) -> None:
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()
        try:
            for actor in ([self.controller] if self.controller is not None else []) + self.attention + self.shards:
                try:
                    ray.get(actor.stop.remote(), timeout=5)
                except Exception:  # noqa: BLE001 - stopping what may already be gone (a removed node)
                    pass
                try:
                    ray.kill(actor)
                except Exception:  # noqa: BLE001 - same
                    pass
            self._kill_started_shards()
            self._drop_controller_state()
            if self.local_cluster is not None:
                ray.shutdown()
                self.local_cluster.shutdown()
        finally:  # the embedded Valkey is a process of ours: never leave it behind
            if self.valkey is not None:
                self.valkey.close()

    def _drop_controller_state(self) -> None:
        """Remove this plane's controller namespace from the store (after the controller stopped)."""
        if self.controller is None or not getattr(self, "redis_url", None):
            return
        import redis

        from expertmesh.services.controller.store import ControllerStore

        try:
            ControllerStore.for_plane(redis.Redis.from_url(self.redis_url), self.plane_id).drop()
        except redis.RedisError as exc:  # the store is down: its keys are a later plane's to ignore
            log.warning("could not remove data plane %s's controller state: %s", self.plane_id, exc)

    def _kill_started_shards(self) -> None:
        """Shards the controller started (recovery, scale) are detached: stop them by name."""
        try:
            handles = list(named_shard_actors(f"expertmesh-shard-{self.plane_id}-"))
        except Exception:  # noqa: BLE001 - the cluster may already be gone
            return
        for handle in handles:
            try:
                ray.kill(handle)
            except Exception:  # noqa: BLE001 - already gone
                pass

    def controller_status(self):
        ctl_pb, ctl_grpc = load("controller_pb2"), load("controller_pb2_grpc")
        return ctl_grpc.ControllerStub(self._channel(self.controller_address)).GetStatus(
            ctl_pb.ControllerStatusRequest(), timeout=10)

    def live_slots(self) -> SlotTable:
        """The controller's slot table (addresses change when it recreates a shard)."""
        if not self.controller_address:
            return self.slots
        return SlotTable.from_proto(self.controller_status().slots)

    # ---- use -----------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[tuple[list[int], str]]:
        """Prompts spread over the attention ranks (data parallel); results in prompt order."""
        ranks = len(self.attention_addresses)
        futures = []
        for rank, address in enumerate(self.attention_addresses):
            mine = [i for i in range(len(prompts)) if i % ranks == rank]
            if not mine:
                continue
            stub = attention_grpc.AttentionStub(self._channel(address))
            request = attention_pb.GenerateRequest(
                prompts=[attention_pb.Prompt(token_ids=prompts[i]) for i in mine], params=params_to_proto(params))
            futures.append((mine, stub.Generate.future(request, timeout=GENERATE_TIMEOUT_S)))
        out: list = [None] * len(prompts)
        for mine, future in futures:
            for i, completion in zip(mine, future.result().completions):
                out[i] = (list(completion.token_ids), completion.finish_reason)
        return out

    def router_stats(self, reset: bool = False):
        """Counters of every attention rank's router, summed."""
        total = router_pb.RouterStats()
        for address in self.attention_addresses:
            s = router_grpc.RouterStub(self._channel(address)).GetStats(router_pb.RouterStatsRequest(reset=reset),
                                                                         timeout=10)
            for name in ("dispatches", "tokens", "inter_node_bytes", "intra_node_bytes", "naive_inter_node_bytes",
                         "dispatch_inter_node_bytes", "naive_dispatch_inter_node_bytes", "node_sends",
                         "duplicate_node_sends"):
                setattr(total, name, getattr(total, name) + getattr(s, name))
            total.max_nodes_per_token = max(total.max_nodes_per_token, s.max_nodes_per_token)
            total.plan_version = s.plan_version
            if not total.load:
                total.load.extend(s.load)
                total.latency_ms_p50.extend(s.latency_ms_p50)
                total.latency_ms_p99.extend(s.latency_ms_p99)
        return total

    def status(self) -> dict:
        return {
            "plan_version": self.plan.version,
            "nodes": [{"index": i, "node_id": nid, "forwarder": self.forwarders[i]}
                      for i, nid in enumerate(self.node_ids)],
            **describe_services(self.shard_addresses, self.attention_addresses, self.config.slots_per_node,
                                self._channel, self.live_slots() if self.controller_address else None),
        }

    def _channel(self, address: str):
        """One channel per service address for the life of the data plane."""
        if address not in self._channels:
            self._channels[address] = channel(address)
        return self._channels[address]


def describe_services(shard_addresses: list[str], attention_addresses: list[str], slots_per_node: int,
                      channel_of=channel, table: SlotTable | None = None) -> dict:
    """Live view over gRPC: each slot's health, node, forwarder role and hosted logical experts per
    MoE layer; each attention rank's health. Needs no Ray connection. With the controller's slot
    ``table`` the slots are the live ones (recreated shards at their new addresses)."""
    listing = [(s.slot, s.node, s.address) for s in table.slots] if table is not None else \
        [(slot, slot // slots_per_node, a) for slot, a in enumerate(shard_addresses)]
    slots = []
    for slot, node, address in listing:
        entry = {"slot": slot, "node": node, "address": address,
                 "healthy": check_health(address) if address else False}
        if entry["healthy"]:
            info = shard_grpc.ExpertShardStub(channel_of(address)).Describe(shard_pb.DescribeShardRequest(),
                                                                            timeout=10)
            entry.update(forwarder=info.forwarder, node_id=info.node_id,
                         experts={str(layer.layer): list(layer.logical_ids) for layer in info.layers})
        slots.append(entry)
    return {"slots": slots, "attention": [{"rank": r, "address": a, "healthy": check_health(a)}
                                          for r, a in enumerate(attention_addresses)]}
