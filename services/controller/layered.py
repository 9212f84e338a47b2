"""Layer-by-layer re-placement (pure): turn "plan v -> plan w" into one step per MoE layer that
changes, each a full plan that differs from the previous one in that layer only.

Applying step i (PREPARE, SWITCH, RETIRE of the previous step's plan) loads only the experts
that layer i gains on each slot and drops only those it loses, so the extra memory at any time
is one layer's moved experts, not a second copy of every layer's; routers swap one layer's
expert->slot table per step and keep serving every other layer as it was.

Shape letters: L MoE layers, P physical experts (slot positions x experts per slot).
Example: 2 layers, 2 slots x 2 physical. old = [[0, 1, 2, 3], [0, 1, 2, 3]],
EPLB's new = [[1, 0, 3, 2], [0, 2, 1, 3]]: ``align_to_current`` keeps layer 0 as it is (each slot
holds the same experts, only their order differed) and the steps are a single one, for layer 1.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from expertmesh.placement import PlacementPlan


@dataclass(frozen=True)
class LayerStep:
    row: int  # MoE layer row of the plan
    plan: PlacementPlan  # the full plan after this step
    moved: int  # physical positions whose logical expert changes in this step


def align_to_current(current_LP: torch.Tensor, new_LP: torch.Tensor, per_slot: int) -> torch.Tensor:
    """``new_LP`` with each slot's experts reordered so that an expert the slot keeps stays at the
    position it has now (same balance: a slot's load does not depend on the order)."""
    L, P = new_LP.shape
    out = new_LP.clone()
    for row in range(L):
        for start in range(0, P, per_slot):
            old = current_LP[row, start:start + per_slot].tolist()
            want = Counter(new_LP[row, start:start + per_slot].tolist())
            slot = [-1] * per_slot
            for i, e in enumerate(old):  # keep what stays
                if want[e] > 0:
                    slot[i] = e
                    want[e] -= 1
            rest = iter(sorted(want.elements()))
            out[row, start:start + per_slot] = torch.tensor([e if e >= 0 else next(rest) for e in slot])
    return out


def layer_steps(current: PlacementPlan, target: PlacementPlan) -> list[LayerStep]:
    """One step per changed layer, versions current.version + 1, + 2, ...; the last step's plan
    equals ``target`` (aligned) under the last version."""
    if current.phy2log_LP.shape != target.phy2log_LP.shape or current.num_gpus != target.num_gpus:
        raise ValueError(f"layer-by-layer needs the same shape: {tuple(current.phy2log_LP.shape)} over "
                         f"{current.num_gpus} slots vs {tuple(target.phy2log_LP.shape)} over {target.num_gpus}")
    per_slot = current.phy2log_LP.shape[1] // current.num_gpus
    aligned_LP = align_to_current(current.phy2log_LP, target.phy2log_LP, per_slot)
    num_logical = current.logcnt_LE.shape[1]
    steps, phy2log_LP, version = [], current.phy2log_LP.clone(), current.version
    for row in range(phy2log_LP.shape[0]):
        moved = int((aligned_LP[row] != phy2log_LP[row]).sum())
        if moved == 0:
            continue
        phy2log_LP = phy2log_LP.clone()
        phy2log_LP[row] = aligned_LP[row]
        version += 1
        steps.append(LayerStep(row, PlacementPlan.from_phy2log(version, phy2log_LP, num_logical, target.num_gpus,
                                                               target.num_nodes), moved))
    return steps
