"""Placement policy: observed load in, a decision out (pure; side effects live in the controller).

    decision = RebalancePolicy(min_gain=0.02, ...).decide(load_LE, current_plan)
    # REPLACE when the new plan's balancedness beats the current one's by >= min_gain

A mirrored deployment (``mirrored=True``: every group whole on two nodes) stays mirrored: its
candidates keep the node map and only re-pack each node's experts over its slots by load
(``plan_mirrored``). Where the slot set cannot hold a mirrored layout (survivors of a node loss,
a scale to another slot count) the candidate is hierarchical EPLB, the decision's reason says
so, and the next plan over a slot set that fits is mirrored again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from expertmesh.placement import PlacementPlan, balancedness, mirrored_misfit, plan_mirrored, plan_placement


@dataclass(frozen=True)
class RebalanceDecision:
    replace: bool
    reason: str
    plan: PlacementPlan | None
    balancedness_before: float
    balancedness_after: float


@dataclass(frozen=True)
class PlanShape:
    """The slot set a new plan covers (elastic scale, or survivors after a failure)."""

    num_replicas: int  # physical experts per layer (experts per slot x slots)
    num_gpus: int  # slot positions
    num_nodes: int  # 1 when the live slots are not spread evenly over nodes (global policy)


@dataclass(frozen=True)
class RebalancePolicy:
    num_groups: int
    min_gain: float = 0.02  # absolute balancedness gain below which a re-placement is not worth it
    mirrored: bool = False  # keep every group on two nodes wherever the slot set allows it

    def score(self, load_LE: torch.Tensor, plan: PlacementPlan) -> float:
        """Mean over layers of mean/max load per slot under ``plan``."""
        return float(balancedness(load_LE.float(), plan.phy2log_LP, plan.logcnt_LE, plan.num_gpus).mean())

    def decide(self, load_LE: torch.Tensor | None, current: PlacementPlan, force: bool = False,
               shape: PlanShape | None = None) -> RebalanceDecision:
        """``shape``: plan over a different slot set (then a plan is always made; uniform load when
        none was observed)."""
        if shape is not None and (load_LE is None or float(load_LE.sum()) == 0):
            load_LE = torch.ones_like(current.logcnt_LE, dtype=torch.float32)
        if load_LE is None or float(load_LE.sum()) == 0:
            return RebalanceDecision(False, "no load observed in the window", None, 1.0, 1.0)
        before = self.score(load_LE, current)
        shape = shape or PlanShape(current.phy2log_LP.shape[1], current.num_gpus, current.num_nodes)
        force = force or (shape.num_gpus, shape.num_replicas) != (current.num_gpus, current.phy2log_LP.shape[1])
        candidate, note = self._candidate(load_LE.float(), current.version + 1, shape)
        after = self.score(load_LE, candidate)
        gain = after - before
        if force:
            return RebalanceDecision(True, f"forced: balancedness {before:.3f} -> {after:.3f}{note}", candidate,
                                     before, after)
        if gain < self.min_gain:
            return RebalanceDecision(False, f"KEEP: gain {gain:.3f} < min_gain={self.min_gain} "
                                            f"({before:.3f} -> {after:.3f}){note}", None, before, after)
        return RebalanceDecision(True, f"REPLACE: gain {gain:.3f} >= min_gain={self.min_gain} "
                                       f"({before:.3f} -> {after:.3f}){note}", candidate, before, after)

    def _candidate(self, load_LE: torch.Tensor, version: int, shape: PlanShape) -> tuple[PlacementPlan, str]:
        """The plan to compare against the current one, and a note for the reason ("" normally)."""
        note = ""
        if self.mirrored:
            why = mirrored_misfit(load_LE.shape[1], self.num_groups, shape.num_nodes, shape.num_gpus,
                                  shape.num_replicas)
            if why is None:
                return plan_mirrored(load_LE, version=version, num_groups=self.num_groups, num_nodes=shape.num_nodes,
                                     num_gpus=shape.num_gpus), "; mirrored"
            note = f"; not mirrored ({why}): a whole-node loss is not survived under this plan"
        return plan_placement(load_LE, version=version, num_replicas=shape.num_replicas, num_groups=self.num_groups,
                              num_nodes=shape.num_nodes, num_gpus=shape.num_gpus), note
