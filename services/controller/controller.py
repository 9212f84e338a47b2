"""The controller: observe load and health -> policies decide -> execute, one change at a time.

Re-placement without stopping the world (double-buffered plans):
  1. PREPARE  every shard loads its experts for plan v+1 beside plan v (both served);
  2. COMMIT   plan v+1 becomes current in Redis (one transaction);
  3. SWITCH   every router installs v+1 atomically, then drains: it returns once the
              dispatches it launched under v have completed;
  4. RETIRE   shards drop plan v and the experts only v used.
A controller that dies between COMMIT and RETIRE finishes the job on restart (``reconcile``).
Requests never fail for a re-placement: each dispatch names the plan it was routed with,
and that plan stays served until no router uses it.

Layer by layer (the default when the slot set is unchanged; see layered.py): the four steps
run once per MoE layer that changes, each step's plan differing from the last in that layer
only, so shards hold one layer's moved experts extra (not a second copy of the whole plan) and
routers swap one layer's expert->slot table at a time. The result reports the per-layer pause
(the routers' table swap, p50/max) and the drain each step waited for.

Fault recovery (``check_health`` every ``health_interval_s``; see recovery.py for the policy):
  1. DETECT   a slot's gRPC health fails twice;
  2. ROUTE    the slot table marks it dead and goes to every shard and router: they stop sending
              to it at once (routers that hit the failure first already re-routed by themselves);
  3. RESTORE  a dead actor on a live node is recreated by name on that node; the experts of a
              lost node are adopted by survivors; both load from the serving checkpoint. The
              table with the new addresses / adoptions is published: full redundancy again.
Elastic scale (``scale``): start or stop slots, then a re-placement over the new slot set.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from expertmesh.placement import PlacementPlan
from expertmesh.services.controller.layered import layer_steps
from expertmesh.services.controller.policy import PlanShape, RebalancePolicy
from expertmesh.services.controller.recovery import decide_recovery
from expertmesh.services.controller.shards import ShardFactory, ShardStartFailed
from expertmesh.services.controller.store import ControllerStore
from expertmesh.services.server import Unavailable
from expertmesh.services.topology import SlotInfo, SlotTable, hosting, position_slots

log = logging.getLogger(__name__)
SIBLING_RECHECK_S = 0.3  # before recreating a dead slot on its node, look at the node's other slots again


class PlaneClient(Protocol):
    """What the controller needs from the data plane (gRPC in production, fakes in unit tests)."""

    def prepare(self, plan: PlacementPlan, plan_slots: tuple[int, ...] | None = None) -> None: ...

    def switch(self, plan: PlacementPlan, plan_slots: tuple[int, ...] | None = None) -> None: ...

    def retire(self, version: int) -> None: ...

    def collect_load(self) -> torch.Tensor | None: ...

    def router_versions(self) -> list[int]: ...

    def publish_slots(self, table: SlotTable) -> None: ...

    def adopt(self, address: str, plan: PlacementPlan, physical_ids: list[int]) -> int: ...

    def unhealthy_slots(self, table: SlotTable, only: set[int] | None = None) -> set[int]: ...

    def set_table(self, table: SlotTable) -> None: ...


class ScaleError(ValueError):
    """A slot count the data plane cannot take; the message says which counts it can."""


@dataclass(frozen=True)
class RebalanceResult:
    replaced: bool
    reason: str
    old_version: int
    new_version: int
    balancedness_before: float
    balancedness_after: float
    seconds: float
    moves: int
    layer_steps: int = 0  # 0: the whole plan in one double-buffered step
    layer_pause_ms_p50: float = 0.0  # routers' table swap per step
    layer_pause_ms_max: float = 0.0
    layer_drain_ms_max: float = 0.0
    peak_extra_experts: int = 0  # expert modules loaded for one step, all shards
    total_experts_loaded: int = 0


@dataclass(frozen=True)
class RecoveryRecord:
    dead: tuple[int, ...]
    recreated: tuple[int, ...]
    adopted: dict[int, tuple[int, ...]]
    lost_nodes: tuple[int, ...]
    route_around_s: float
    restore_s: float
    full_redundancy: bool


@dataclass(frozen=True)
class ScaleOutcome:
    slots_before: int
    slots_after: int
    added: tuple[int, ...]
    removed: tuple[int, ...]
    replan: RebalanceResult | None


class Controller:
    def __init__(self, store: ControllerStore, plane: PlaneClient, policy: RebalancePolicy, moe_layers: list[int],
                 window_s: float = 600.0, clock: Callable[[], float] = time.time, shards: ShardFactory | None = None):
        self.store = store
        self.moe_rows = {layer: row for row, layer in enumerate(moe_layers)}
        self.plane = plane
        self.policy = policy
        self.window_s = window_s
        self.clock = clock
        self.shards = shards
        self._lock = threading.RLock()  # one change (re-placement, recovery, scale) at a time

    def bootstrap(self, initial: PlacementPlan, table: SlotTable | None = None) -> PlacementPlan:
        """The stored current plan (a restarted controller) or ``initial`` (first start)."""
        current = self.store.current_plan()
        if current is None:
            self.store.save_plan(initial)
            current = initial
        if table is not None and self.slot_table() is None:
            self._save_table(table)
        return current

    @property
    def plan(self) -> PlacementPlan:
        plan = self.store.current_plan()
        assert plan is not None, "bootstrap() first"
        return plan

    def plan_slots(self, plan: PlacementPlan) -> tuple[int, ...]:
        return position_slots(plan, self.store.plan_slots(plan.version))

    def slot_table(self) -> SlotTable | None:
        topo = self.store.topology() or {}
        return SlotTable.from_dict(topo["slots"]) if topo.get("slots") else None

    def _save_table(self, table: SlotTable) -> None:
        topo = self.store.topology() or {}
        by_id = table.by_id()
        topo.update(slots=table.to_dict(), shards=[by_id[s].address for s in sorted(by_id)],
                    nodes_alive=sorted({s.node for s in table.live()}))
        if getattr(self.shards, "node_ids", None):  # nodes that joined since the start get indices too
            topo["nodes"] = list(self.shards.node_ids)
        self.store.save_topology(topo)

    def _publish(self, table: SlotTable) -> None:
        self._save_table(table)
        self.plane.publish_slots(table)

    def full_redundancy(self) -> bool:
        table = self.slot_table()
        if table is None:
            return True
        plan = self.plan
        return hosting(plan, self.plan_slots(plan), table).complete

    def collect(self) -> None:
        load = self.plane.collect_load()
        if load is not None and float(load.sum()) > 0:
            self.store.append_load(load, self.window_s, self.clock())

    def reconcile(self) -> None:
        """Bring routers and shards to the current plan (after a restart mid re-placement)."""
        current = self.plan
        slots = self.plan_slots(current)
        if any(v != current.version for v in self.plane.router_versions()):
            log.info("RECONCILE: routers %s -> plan %d", self.plane.router_versions(), current.version)
            self.plane.prepare(current, slots)
            self.plane.switch(current, slots)
        for stale in range(max(1, current.version - 2), current.version):
            self.plane.retire(stale)

    # ---- re-placement ------------------------------------------------------------------------------
    def _live_shape(self, table: SlotTable | None, current: PlacementPlan) -> tuple[tuple[int, ...], PlanShape]:
        """Plan positions over the live slots (node by node) and the shape EPLB gets for them."""
        if table is None:
            return self.plan_slots(current), PlanShape(current.phy2log_LP.shape[1], current.num_gpus,
                                                       current.num_nodes)
        live = sorted(table.live(), key=lambda s: (s.node, s.slot))
        per_slot = current.phy2log_LP.shape[1] // current.num_gpus
        per_node = {n: sum(1 for s in live if s.node == n) for n in {s.node for s in live}}
        nodes = len(per_node) if len(set(per_node.values())) == 1 else 1
        return tuple(s.slot for s in live), PlanShape(per_slot * len(live), len(live), nodes)

    def rebalance(self, force: bool = False, whole_plan: bool = False) -> RebalanceResult:
        with self._lock:
            started = time.perf_counter()
            self.collect()
            current = self.plan
            table = self.slot_table()
            new_slots, shape = self._live_shape(table, current)
            moved = new_slots != self.plan_slots(current) or bool(table and table.adopted)
            decision = self.policy.decide(self.store.load_window(self.window_s, self.clock()), current,
                                          force or moved, shape if moved or table is not None else None)
            log.info("%s", decision.reason)
            if not decision.replace:
                return RebalanceResult(False, decision.reason, current.version, current.version,
                                       decision.balancedness_before, decision.balancedness_after, 0.0, 0)
            scores = (decision.balancedness_before, decision.balancedness_after)
            if moved or whole_plan:
                applied = self._apply_whole(current, decision.plan, new_slots, table, scores)
            else:
                applied = self._apply_layered(current, decision.plan, new_slots, scores)
                if applied is None:
                    return RebalanceResult(False, "the new plan moves no expert", current.version, current.version,
                                           decision.balancedness_before, decision.balancedness_after, 0.0, 0)
            new, extra = applied
            seconds = time.perf_counter() - started
            self.store.record_replacement(current.version, new.version, decision.balancedness_before,
                                          decision.balancedness_after, seconds)
            return RebalanceResult(True, decision.reason, current.version, new.version,
                                   decision.balancedness_before, decision.balancedness_after, seconds, **extra)

    def _apply_whole(self, current: PlacementPlan, new: PlacementPlan, new_slots: tuple[int, ...],
                     table: SlotTable | None, scores: tuple[float, float]) -> tuple[PlacementPlan, dict]:
        """The whole plan double-buffered at once (a new slot set, or asked for). ``scores``
        (balancedness before, after) are counted with the commit."""
        moves = int((new.phy2log_LP != current.phy2log_LP).sum()) if new.phy2log_LP.shape == \
            current.phy2log_LP.shape else int(new.phy2log_LP.numel())
        loaded = sum(a.experts_loaded for a in self.plane.prepare(new, new_slots) or [])  # 1. PREPARE
        self.store.save_plan(new, plan_slots=new_slots, replaced=scores)               # 2. COMMIT
        acks = self.plane.switch(new, new_slots) or []                                 # 3. SWITCH (+ drain)
        if table is not None and table.adopted:  # adoptions belonged to the old plan
            self._publish(replace(table.with_slots(list(table.slots)), adopted={}, plan_version=new.version))
        self.plane.retire(current.version)                                             # 4. RETIRE
        pause_ms = max((a.install_seconds for a in acks), default=0.0) * 1e3
        return new, {"moves": moves, "layer_pause_ms_p50": pause_ms, "layer_pause_ms_max": pause_ms,
                     "layer_drain_ms_max": max((a.seconds for a in acks), default=0.0) * 1e3,
                     "peak_extra_experts": loaded, "total_experts_loaded": loaded}

    def _apply_layered(self, current: PlacementPlan, target: PlacementPlan,
                       plan_slots: tuple[int, ...], scores: tuple[float, float]
                       ) -> tuple[PlacementPlan, dict] | None:
        """PREPARE / COMMIT / SWITCH / RETIRE once per changed MoE layer; the last commit counts the
        re-placement (``scores``: balancedness before, after)."""
        steps = layer_steps(current, target)
        if not steps:
            return None
        pauses_ms, drains_ms, loaded, previous = [], [], [], current
        for step in steps:
            loaded.append(sum(a.experts_loaded for a in self.plane.prepare(step.plan, plan_slots) or []))
            self.store.save_plan(step.plan, plan_slots=plan_slots, replaced=scores if step is steps[-1] else None)
            acks = self.plane.switch(step.plan, plan_slots) or []
            pauses_ms.append(max((a.install_seconds for a in acks), default=0.0) * 1e3)
            drains_ms.append(max((a.seconds for a in acks), default=0.0) * 1e3)
            self.plane.retire(previous.version)
            log.info("LAYER STEP: MoE row %d, %d moved, v%d -> v%d, swap %.2f ms, drain %.1f ms", step.row,
                     step.moved, previous.version, step.plan.version, pauses_ms[-1], drains_ms[-1])
            previous = step.plan
        ordered = sorted(pauses_ms)
        return previous, {"moves": sum(s.moved for s in steps), "layer_steps": len(steps),
                          "layer_pause_ms_p50": ordered[(len(ordered) - 1) // 2], "layer_pause_ms_max": ordered[-1],
                          "layer_drain_ms_max": max(drains_ms), "peak_extra_experts": max(loaded),
                          "total_experts_loaded": sum(loaded)}

    # ---- fault recovery ----------------------------------------------------------------------------
    def check_health(self) -> RecoveryRecord | None:
        """One health round: recover the slots that do not answer (None when all do)."""
        table = self.slot_table()
        if table is None or self.shards is None:
            return None
        dead = self.plane.unhealthy_slots(table)
        return self.recover(dead) if dead else None

    def recover(self, dead: set[int], detected_s: float | None = None) -> RecoveryRecord | None:
        with self._lock:
            t0 = detected_s if detected_s is not None else time.perf_counter()
            table = self.slot_table()
            info = table.by_id()
            dead = {s for s in dead if s in info and info[s].alive}
            if not dead:
                return None
            plan = self.plan
            plan_slots = self.plan_slots(plan)
            table = replace(table.mark(dead), plan_version=plan.version)
            self._publish(table)  # routers stop sending there
            route_around_s = time.perf_counter() - t0
            dying = self._dying_siblings(table, dead)
            if dying:  # the rest of a node going down
                dead |= dying
                table = table.mark(dying)
                self._publish(table)
            decision = decide_recovery(table, plan, plan_slots, dead, self.shards.node_alive)
            log.warning("%s", decision.reason)
            started: dict[int, str] = {}
            for slot in decision.recreate:
                position = plan_slots.index(slot) if slot in plan_slots else None
                try:
                    started[slot] = self.shards.create(slot, info[slot].node, plan, position)
                except ShardStartFailed as exc:
                    log.warning("RECOVER: %s; its experts go to survivors instead", exc)
            failed_nodes = {info[s].node for s in decision.recreate if s not in started}
            if failed_nodes:  # nodes that would not take a new actor count as lost
                decision = decide_recovery(table, plan, plan_slots, set(),
                                           lambda n: n not in failed_nodes and self.shards.node_alive(n))
            lost = {s for s in dead if s not in started}
            adopted = {p: s for p, s in table.adopted.items() if s not in lost}
            for slot, physical in decision.adopt.items():
                self.plane.adopt(info[slot].address, plan, list(physical))
                adopted.update({p: slot for p in physical})
            for slot, address in started.items():  # a recreated slot takes back what it had adopted
                mine = sorted(p for p, s in adopted.items() if s == slot)
                if mine:
                    self.plane.adopt(address, plan, mine)
            slots = [replace(s, address=started[s.slot], alive=True) if s.slot in started else s for s in table.slots]
            table = replace(table.with_slots(slots), adopted=adopted, plan_version=plan.version)
            self._publish(table)  # full redundancy: every physical expert hosted again
            restore_s = time.perf_counter() - t0
            full = hosting(plan, plan_slots, table).complete
            record = RecoveryRecord(tuple(sorted(dead)), tuple(sorted(started)), dict(decision.adopt),
                                    tuple(sorted(failed_nodes | set(decision.lost_nodes))), route_around_s, restore_s,
                                    full)
            self._record(record, info)
            return record

    def _dying_siblings(self, table: SlotTable, dead: set[int]) -> set[int]:
        """Other slots of the dead slots' nodes that stop answering too: a node going down takes its
        processes down one by one, so look again before deciding to recreate on that node."""
        info = table.by_id()
        siblings = {s.slot for d in dead for s in table.node_slots(info[d].node) if s.slot not in dead}  # live ones
        if not siblings:
            return set()
        time.sleep(SIBLING_RECHECK_S)
        return self.plane.unhealthy_slots(table, only=siblings)

    def _record(self, r: RecoveryRecord, info: dict[int, SlotInfo]) -> None:
        common = {"route_around_s": r.route_around_s, "restore_s": r.restore_s, "full_redundancy": r.full_redundancy}
        for node in r.lost_nodes:
            slots = sorted(s for s in r.dead if info[s].node == node)
            if slots:
                self.store.record_recovery({"node": node, "slots": slots, "adopted_by": sorted(r.adopted), **common})
        for slot in r.recreated:
            self.store.record_recovery({"slot": slot, "node": info[slot].node, "recreated": True, **common})

    # ---- elastic expert parallelism -------------------------------------------------------------------
    def min_slots(self) -> int:
        plan = self.plan
        per_slot = plan.phy2log_LP.shape[1] // plan.num_gpus
        return math.ceil(plan.logcnt_LE.shape[1] / per_slot)

    def scale(self, expert_slots: int) -> ScaleOutcome:
        """Grow or shrink the live slot set to ``expert_slots`` (nodes that joined since are used
        too), then re-place over it. Slots are added on the nodes with fewest slots and removed from
        the nodes with most."""
        if self.shards is None:
            raise ScaleError("this controller cannot start or stop shards (no shard factory)")
        with self._lock:
            table = self.slot_table()
            if table is None:
                raise ScaleError("no slot table: the data plane was started without one")
            low = self.min_slots()
            if expert_slots < low:
                per_slot = self.plan.phy2log_LP.shape[1] // self.plan.num_gpus
                raise ScaleError(f"--expert-slots {expert_slots} cannot hold every logical expert once: "
                                 f"{self.plan.logcnt_LE.shape[1]} experts at {per_slot} per slot need >= {low}")
            live = table.live()
            before = len(live)
            nodes = self._alive_nodes(table)
            added, removed = [], []
            slots = list(table.slots)
            next_id = max(s.slot for s in table.slots) + 1
            plan = self.plan
            refused: list[str] = []
            while len([s for s in slots if s.alive]) < expert_slots:
                if not nodes:
                    for slot in added:
                        self.shards.stop(slot)
                    raise Unavailable(f"no live node takes a new expert slot: {'; '.join(refused)}")
                count = {n: sum(1 for s in slots if s.alive and s.node == n) for n in nodes}
                node = min(nodes, key=lambda n: (count[n], n))
                try:
                    address = self.shards.create(next_id, node, plan, None)  # empty until the re-placement
                except ShardStartFailed as exc:  # that node is dying or full: try the others
                    refused.append(str(exc))
                    nodes = [n for n in nodes if n != node]
                    continue
                slots.append(SlotInfo(next_id, node, address))
                added.append(next_id)
                next_id += 1
            kept = [s for s in slots if s.alive]
            while len(kept) > expert_slots:
                count = {n: sum(1 for s in kept if s.node == n) for n in {s.node for s in kept}}
                victim = max(kept, key=lambda s: (count[s.node], s.slot))
                removed.append(victim.slot)
                kept.remove(victim)
            if not added and not removed:
                return ScaleOutcome(before, before, (), (), None)
            grown = table.with_slots(slots)
            self._publish(grown)  # new slots known to peers and routers (they host nothing yet)
            shrunk = grown.with_slots([s for s in grown.slots if s.slot not in removed])
            self.plane.set_table(shrunk)  # prepare/retire go to the kept slots only
            try:
                self._save_table(shrunk)  # the re-placement plans over the kept slots only
                result = self.rebalance(force=True)
            except Exception:
                self._publish(grown)
                raise
            self._publish(replace(shrunk.with_slots(list(shrunk.slots)), adopted={}, plan_version=self.plan.version))
            for slot in removed:
                self.shards.stop(slot)
            self.store.record_event("scale", slots_before=before, slots_after=expert_slots, added=added,
                                    removed=removed, plan_version=self.plan.version)
            return ScaleOutcome(before, expert_slots, tuple(added), tuple(removed), result)

    def _alive_nodes(self, table: SlotTable) -> list[int]:
        """Node indices alive in the cluster now, including nodes that joined since the start."""
        alive_ids = self.shards.alive_node_ids()
        if hasattr(self.shards, "add_node"):
            for node_id in alive_ids:
                self.shards.add_node(node_id)
        return [n for n in range(len(getattr(self.shards, "node_ids", []))) if self.shards.node_alive(n)] or \
            sorted({s.node for s in table.live()})
