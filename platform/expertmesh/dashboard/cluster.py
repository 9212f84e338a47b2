"""The cluster and experts pages: the data plane's controller state (Redis, through
``ControllerStore``) joined with live slot health (gRPC, ``describe_services``).

Glossary (the dashboard's words for the plan's): a *slot* is one expert-shard actor, what
EPLB calls a GPU (``plan.num_gpus`` = slots); a *physical expert* is one replica of a
*logical expert* placed in a slot; a *node* is a Ray node holding ``slots_per_node`` slots.
Example: 3 nodes x 2 slots, 12 logical + 6 redundant = 18 physical experts, 3 per slot.

A data plane is *attached* when its controller keeps its state in the platform's store: the
pages show the plane that started last there (``em:ctl:current``), looked up on every view, so
a plane that replaces it is shown at once and one that stopped is no longer shown; otherwise
both pages say so and how to attach one.

Balancedness (mean load per slot / max load per slot, averaged over MoE layers, 1.0 = perfect):
- *now*: the load window under the current plan (what the controller would score it);
- *over time*: each load report (one per controller poll) under the plan in force when it
  was reported, with re-placement and recovery events as markers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
import torch

from expertmesh.placement import PlacementPlan, balancedness, gpu_loads

if TYPE_CHECKING:
    from expertmesh.services.controller.store import ControllerStore

log = logging.getLogger(__name__)

NOT_ATTACHED = ("No data plane is attached to this platform. Start one while the platform is up: "
                "`expertmesh up --model DIR --nodes N` keeps its controller's state in the platform's store, "
                "where these pages read it.")
STALE = ("The data plane recorded in the platform's store is not answering (no slot and no controller "
         "responds): it was probably stopped. `expertmesh up --model DIR --nodes N` starts one.")


@dataclass(frozen=True)
class ClusterConfig:
    namespace: str | None = None  # None: the data plane that started last on the store (em:ctl:current)
    load_window_s: float = 600.0  # the controller's default window
    history_s: float = 1800.0  # balancedness-over-time span
    cache_s: float = 1.0  # several viewers polling share one gRPC sweep per second
    grpc_timeout_s: float = 2.0


def score(load_LE: torch.Tensor, plan: PlacementPlan) -> float | None:
    """Mean over loaded MoE layers of mean/max load per slot under ``plan`` (None: no load)."""
    loaded = load_LE.float().sum(dim=1) > 0  # [L]
    if not bool(loaded.any()):
        return None
    b_L = balancedness(load_LE.float(), plan.phy2log_LP, plan.logcnt_LE, plan.num_gpus)
    return float(b_L[loaded].mean())


def plan_version_at(t_s: float, replacements: list[dict[str, Any]], current: int) -> int:
    """The plan in force at ``t_s`` from the replacement events (``at``, ``old``, ``new``)."""
    version = None
    for event in sorted(replacements, key=lambda e: e["at"]):
        if event["at"] <= t_s:
            version = event["new"]
        elif version is None:
            return int(event["old"])
    return int(version) if version is not None else current


def heatmap(plan: PlacementPlan, row: int) -> list[list[int]]:
    """Replicas of each logical expert in each slot for MoE row ``row``: [slots][experts]."""
    counts = torch.zeros(plan.num_gpus, plan.num_logical, dtype=torch.long)  # [D, E]
    slots_D = torch.arange(plan.num_physical) // plan.slots_per_gpu  # [P]
    counts.index_put_((slots_D, plan.phy2log_LP[row]), torch.ones(plan.num_physical, dtype=torch.long),
                      accumulate=True)
    return counts.tolist()


def slot_entries(topology: dict[str, Any]) -> list[dict[str, Any]]:
    """The data plane's slots as {slot, node, address, alive}: from the live slot table when the
    controller keeps one (``topology["slots"]``, slot ids stable across recoveries), else the
    shard addresses in slot order (slot = index, node = index // slots_per_node)."""
    table = topology.get("slots")
    if isinstance(table, dict) and isinstance(table.get("slots"), list):
        return [{"slot": int(s["slot"]), "node": int(s["node"]), "address": s["address"],
                 "alive": bool(s.get("alive", True))} for s in table["slots"]]
    per_node = int(topology.get("slots_per_node", 1))
    return [{"slot": i, "node": i // per_node, "address": a, "alive": True}
            for i, a in enumerate(topology.get("shards", []))]


def _node_entries(topology: dict[str, Any], slots: list[dict[str, Any]]) -> list[dict[str, Any]]:
    nodes = []
    for index, node in enumerate(topology.get("nodes", [])):
        node_id = node.get("node_id", "") if isinstance(node, dict) else str(node)
        mine = [s for s in slots if s["node"] == index]
        nodes.append({"index": index, "node_id": node_id, "slots": [s["slot"] for s in mine],
                      "healthy_slots": sum(1 for s in mine if s["healthy"]),
                      "healthy": bool(mine) and all(s["healthy"] for s in mine)})
    return nodes


class ClusterView:
    """Reads for the two pages. ``describe`` and ``controller_status`` are injected (gRPC in the
    gateway, fakes in unit tests); ``ray_nodes`` lists the platform's Ray nodes (None: no Ray)."""

    def __init__(self, client: redis.Redis, config: ClusterConfig | None = None,
                 describe: Callable[[list[str], list[str], int], dict] | None = None,
                 controller_status: Callable[[str], dict | None] | None = None,
                 ray_nodes: Callable[[], list[dict] | None] | None = None, clock: Callable[[], float] = time.time):
        from expertmesh.services.controller.store import ControllerStore

        self.config = config or ClusterConfig()
        self.client = client
        self._fixed = None if self.config.namespace is None else ControllerStore(client, self.config.namespace)
        self.describe = describe or _grpc_describe
        self.controller_status = controller_status or (lambda address: _grpc_controller_status(
            address, self.config.grpc_timeout_s))
        self.ray_nodes = ray_nodes or _ray_nodes
        self.clock = clock
        self._cache: tuple[float, dict] | None = None
        self._lock = threading.Lock()
        self._plans: dict[tuple[str, int], PlacementPlan] = {}

    def shown_store(self) -> ControllerStore | None:
        """The controller state of the plane these pages show, looked up per page view: a plane
        that starts later replaces the one shown, one that stopped (and dropped its state) is gone;
        None when no plane is attached."""
        from expertmesh.services.controller.store import ControllerStore

        if self._fixed is not None:
            return self._fixed
        return ControllerStore.current(self.client)

    def _plan(self, store: ControllerStore, version: int) -> PlacementPlan | None:
        key = (store.ns, version)
        if key not in self._plans:
            try:
                self._plans[key] = store.plan(version)
            except KeyError:
                return None
        return self._plans[key]

    # ---- cluster page ----------------------------------------------------------------------------
    def cluster(self) -> dict[str, Any]:
        with self._lock:
            if self._cache is not None and self.clock() - self._cache[0] < self.config.cache_s:
                return self._cache[1]
        view = self._cluster()
        with self._lock:
            self._cache = (self.clock(), view)
        return view

    def _cluster(self) -> dict[str, Any]:
        ray_nodes = self.ray_nodes()
        store = self.shown_store()
        topology = store.topology() if store is not None else None
        if store is None or topology is None:
            return {"attached": False, "message": NOT_ATTACHED, "ray_nodes": ray_nodes}
        known = slot_entries(topology)
        live = self.describe([s["address"] for s in known], topology.get("routers", []), 1)
        slots = []
        for entry, seen in zip(known, live["slots"], strict=True):
            slots.append({**entry, "healthy": bool(seen["healthy"]), "forwarder": bool(seen.get("forwarder", False)),
                          "experts_per_layer": len(next(iter(seen.get("experts", {}).values()), []))})
        current, stats = store.current_with_stats()
        controller = None
        if topology.get("controller"):
            controller = {"address": topology["controller"], **(self.controller_status(topology["controller"])
                                                                 or {"healthy": False})}
        silent = (controller is None or not controller.get("healthy")) and not any(s["healthy"] for s in slots)
        return {
            "attached": True, "checkpoint": topology.get("checkpoint", ""),
            "message": STALE if silent else None,
            "plan_version": current.version if current else None,
            "nodes": _node_entries(topology, slots), "slots": slots, "attention": live["attention"],
            "controller": controller,
            "failures_recovered": int(stats.get("failures_recovered", 0)),
            "replacements": int(stats.get("replacements", 0)),
            "events": list(reversed(store.events(20))),
            "ray_nodes": ray_nodes,
        }

    def _position_labels(self, store: ControllerStore, plan: PlacementPlan, topology: dict[str, Any]) -> list[str]:
        """A label per plan position: the slot id there (plans re-made after a failure skip dead
        slots) and its node."""
        slot_ids = store.plan_slots(plan.version)
        slot_ids = list(slot_ids) if slot_ids else list(range(plan.num_gpus))
        node_of = {s["slot"]: s["node"] for s in slot_entries(topology)}
        per_node = max(1, plan.num_gpus // plan.num_nodes)
        return [f"slot {sid} (node {node_of.get(sid, position // per_node)})"
                for position, sid in enumerate(slot_ids)]

    # ---- experts page ------------------------------------------------------------------------------
    def experts(self, layer: int | None = None) -> dict[str, Any]:
        store = self.shown_store()
        topology = store.topology() if store is not None else None
        current, stats = store.current_with_stats() if store is not None else (None, {})
        if store is None or topology is None or current is None:
            return {"attached": False, "message": NOT_ATTACHED}
        moe_layers = list(topology.get("moe_layers", range(current.num_layers)))
        layer = moe_layers[0] if layer is None else layer
        if layer not in moe_layers:
            raise ValueError(f"layer {layer} is not an MoE layer of this model; MoE layers: {moe_layers}")
        row = moe_layers.index(layer)
        now = self.clock()
        window_LE = store.load_window(self.config.load_window_s, now)  # [L, E] or None
        events = store.events(200)
        replacements = [e for e in events if e.get("kind") == "replacement"]
        history = []
        for t_s, load_LE in store.load_reports(self.config.history_s, now):
            plan = self._plan(store, plan_version_at(t_s, replacements, current.version))
            value = score(load_LE, plan) if plan is not None and load_LE.shape == plan.logcnt_LE.shape else None
            if value is not None:
                history.append({"t": t_s, "balancedness": round(value, 4), "plan_version": plan.version})
        expert_load = window_LE[row].tolist() if window_LE is not None else [0] * current.num_logical
        slot_load = (gpu_loads(window_LE.float(), current.phy2log_LP, current.logcnt_LE, current.num_gpus)[row]
                     .tolist() if window_LE is not None else [0.0] * current.num_gpus)
        return {
            "attached": True, "plan_version": current.version, "moe_layers": moe_layers, "layer": layer,
            "num_slots": current.num_gpus, "num_nodes": current.num_nodes, "num_logical": current.num_logical,
            "num_physical": current.num_physical, "slots_per_node": current.num_gpus // current.num_nodes,
            "heatmap": heatmap(current, row), "heatmap_slots": self._position_labels(store, current, topology),
            "expert_load": expert_load,
            "slot_load": [round(v, 2) for v in slot_load],
            "balancedness_now": None if window_LE is None else score(window_LE, current),
            "balancedness_before_last_replacement": stats.get("balancedness_before_last"),
            "replacements": int(stats.get("replacements", 0)), "load_window_s": self.config.load_window_s,
            "history": history,
            "events": [{"at": e["at"], "kind": e.get("kind", "event"), "label": _event_label(e),
                        "before": e.get("before"), "after": e.get("after")} for e in events
                       if e.get("at", 0) >= now - self.config.history_s],
        }


def _event_label(event: dict[str, Any]) -> str:
    if event.get("kind") == "replacement":
        return (f"re-placement v{event.get('old')} → v{event.get('new')} ({event.get('before', 0):.3f} → "
                f"{event.get('after', 0):.3f})")
    detail = ", ".join(f"{k}={v}" for k, v in event.items() if k not in ("kind", "at") and not isinstance(v, (dict,
                                                                                                            list)))
    return f"{event.get('kind', 'event')}" + (f": {detail}" if detail else "")


# ---- the real sources (gRPC, Ray) ------------------------------------------------------------------------
def _grpc_describe(shards: list[str], routers: list[str], slots_per_node: int) -> dict:
    from expertmesh.services.dataplane import describe_services

    try:
        return describe_services(shards, routers, slots_per_node)
    except Exception as exc:  # noqa: BLE001 - a shard dying between health and Describe: report it down
        log.info("describe_services failed (%s); reporting health only", exc)
        from expertmesh.services.server import check_health

        return {"slots": [{"slot": i, "node": i // slots_per_node, "address": a, "healthy": check_health(a)}
                          for i, a in enumerate(shards)],
                "attention": [{"rank": r, "address": a, "healthy": check_health(a)} for r, a in enumerate(routers)]}


def _grpc_controller_status(address: str, timeout_s: float) -> dict | None:
    import grpc

    from expertmesh.protos import load
    from expertmesh.services.server import channel

    pb, pb_grpc = load("controller_pb2"), load("controller_pb2_grpc")
    try:
        with channel(address) as ch:
            st = pb_grpc.ControllerStub(ch).GetStatus(pb.ControllerStatusRequest(), timeout=timeout_s)
    except grpc.RpcError:
        return None
    return {"healthy": True, "plan_version": st.plan_version}


def _ray_nodes() -> list[dict] | None:
    """The platform's Ray nodes when this process is connected to Ray (a gateway replica is)."""
    import ray

    if not ray.is_initialized():
        return None
    return [{"node_id": n["NodeID"], "alive": bool(n["Alive"]), "address": n.get("NodeManagerAddress", ""),
             "cpus": float(n.get("Resources", {}).get("CPU", 0.0))}
            for n in ray.nodes()]
