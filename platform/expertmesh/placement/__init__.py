"""Expert placement: EPLB as pure tensor functions, placement plans and their diffs.

``record → decide → describe → apply``: load counters are recorded elsewhere; this package decides
(``rebalance_experts`` / ``plan_placement``) and describes (``diff_plans`` → ``ExpertMove``); the
controller applies the moves.

    from expertmesh.placement import rebalance_experts, balancedness
    phy2log_LP, log2phy_LER, logcnt_LE = rebalance_experts(load_LE, 288, 8, 4, 32)
    balancedness(load_LE, phy2log_LP, logcnt_LE, 32)  # [L], 1.0 = perfect

Glossary and shape letters: see ``expertmesh.placement.eplb``.
"""

from expertmesh.placement.balance import balancedness, gpu_loads, naive_placement, no_redundancy_placement
from expertmesh.placement.eplb import (
    DEFAULT_ALLOCATION_ROUNDS,
    DEFAULT_MAX_SWAP_ROUNDS,
    DEFAULT_REFINEMENT,
    Refinement,
    pack_balanced,
    plan_placement,
    rebalance_experts,
    replicate_experts,
)
from expertmesh.placement.mirrored import mirrored_layout, mirrored_misfit, plan_mirrored
from expertmesh.placement.plan import (
    NO_REPLICA,
    ExpertMove,
    PlacementPlan,
    apply_moves,
    diff_plans,
    logical_to_physical,
    moves_by_layer,
)

__all__ = [
    "DEFAULT_ALLOCATION_ROUNDS",
    "DEFAULT_MAX_SWAP_ROUNDS",
    "DEFAULT_REFINEMENT",
    "NO_REPLICA",
    "Refinement",
    "ExpertMove",
    "PlacementPlan",
    "apply_moves",
    "balancedness",
    "diff_plans",
    "gpu_loads",
    "logical_to_physical",
    "mirrored_layout",
    "mirrored_misfit",
    "moves_by_layer",
    "naive_placement",
    "no_redundancy_placement",
    "pack_balanced",
    "plan_mirrored",
    "plan_placement",
    "rebalance_experts",
    "replicate_experts",
]
