"""The controller: observe load -> policy decides -> execute a live re-placement.

Re-placement without stopping the world (double-buffered plans):
  1. PREPARE  every shard loads its experts for plan v+1 beside plan v (both served);
  2. COMMIT   plan v+1 becomes current in Redis (one transaction);
  3. SWITCH   every router installs v+1 atomically, then drains: it returns once the
              dispatches it launched under v have completed;
  4. RETIRE   shards drop plan v and the experts only v used.
A controller that dies between COMMIT and RETIRE finishes the job on restart (``reconcile``).
Requests never fail for a re-placement: each dispatch names the plan it was routed with,
and that plan stays served until no router uses it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from expertmesh.placement import PlacementPlan
from expertmesh.services.controller.policy import RebalancePolicy
from expertmesh.services.controller.store import ControllerStore

log = logging.getLogger(__name__)


class PlaneClient(Protocol):
    """What the controller needs from the data plane (gRPC in production, fakes in unit tests)."""

    def prepare(self, plan: PlacementPlan) -> None: ...

    def switch(self, plan: PlacementPlan) -> None: ...

    def retire(self, version: int) -> None: ...

    def collect_load(self) -> torch.Tensor | None: ...

    def router_versions(self) -> list[int]: ...


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


class Controller:
    def __init__(self, store: ControllerStore, plane: PlaneClient, policy: RebalancePolicy, moe_layers: list[int],
                 window_s: float = 600.0, clock: Callable[[], float] = time.time):
        self.store = store
        self.moe_rows = {layer: row for row, layer in enumerate(moe_layers)}
        self.plane = plane
        self.policy = policy
        self.window_s = window_s
        self.clock = clock
        self._lock = threading.Lock()  # one re-placement at a time

    def bootstrap(self, initial: PlacementPlan) -> PlacementPlan:
        """The stored current plan (a restarted controller) or ``initial`` (first start)."""
        current = self.store.current_plan()
        if current is None:
            self.store.save_plan(initial)
            current = initial
        return current

    @property
    def plan(self) -> PlacementPlan:
        plan = self.store.current_plan()
        assert plan is not None, "bootstrap() first"
        return plan

    def collect(self) -> None:
        load = self.plane.collect_load()
        if load is not None and float(load.sum()) > 0:
            self.store.append_load(load, self.window_s, self.clock())

    def reconcile(self) -> None:
        """Bring routers and shards to the current plan (after a restart mid re-placement)."""
        current = self.plan
        if any(v != current.version for v in self.plane.router_versions()):
            log.info("RECONCILE: routers %s -> plan %d", self.plane.router_versions(), current.version)
            self.plane.prepare(current)
            self.plane.switch(current)
        for stale in range(max(1, current.version - 2), current.version):
            self.plane.retire(stale)

    def rebalance(self, force: bool = False) -> RebalanceResult:
        with self._lock:
            started = time.perf_counter()
            self.collect()
            current = self.plan
            decision = self.policy.decide(self.store.load_window(self.window_s, self.clock()), current, force)
            log.info("%s", decision.reason)
            if not decision.replace:
                return RebalanceResult(False, decision.reason, current.version, current.version,
                                       decision.balancedness_before, decision.balancedness_after, 0.0, 0)
            new = decision.plan
            moves = int((new.phy2log_LP != current.phy2log_LP).sum())
            self.plane.prepare(new)                 # 1. PREPARE
            self.store.save_plan(new)               # 2. COMMIT
            self.plane.switch(new)                  # 3. SWITCH (+ drain)
            self.plane.retire(current.version)      # 4. RETIRE
            seconds = time.perf_counter() - started
            self.store.record_replacement(current.version, new.version, decision.balancedness_before,
                                          decision.balancedness_after, seconds)
            return RebalanceResult(True, decision.reason, current.version, new.version,
                                   decision.balancedness_before, decision.balancedness_after, seconds, moves)
