"""Mirrored placement: every expert group whole on two nodes, so a whole node can fail without
losing an expert.

Node n hosts the groups g with ``g % N == n`` and, as mirrors, those with ``(g + 1) % N == n``.
Each group is whole on each node that holds it, so node-limited routing still reaches at most
``topk_group`` nodes. Every logical expert has exactly two replicas (P = 2E), one per node, so
the only freedom left to a load-aware re-placement is which GPU (slot) of a node holds which of
the node's experts: ``plan_mirrored`` packs each node's experts over its GPUs by observed load
(``pack_balanced``, as step 3 of hierarchical EPLB) and keeps the node map, so re-balancing never
gives the mirror up.

Example: 12 experts, 3 groups, 3 nodes x 2 GPUs -> node 1 holds groups 1 and 0 (experts 4-7,
then 0-3): 8 physical experts per node, 4 per GPU, 24 in all.

Shape letters as in ``expertmesh.placement.eplb``; B = layers x nodes packing problems, X the
experts of one node.
"""

from __future__ import annotations

import torch
from torch import Tensor

from expertmesh.placement.eplb import pack_balanced
from expertmesh.placement.plan import PlacementPlan

REPLICAS = 2  # every logical expert on two nodes


def mirrored_misfit(num_logical: int, num_groups: int, num_nodes: int, num_gpus: int,
                    num_replicas: int | None = None) -> str | None:
    """Why a mirrored layout cannot cover this shape (None when it can). ``num_replicas``:
    physical experts per layer the slot set holds (None: as many as the layout needs)."""
    if num_nodes < 2:
        return f"it needs >= 2 nodes, got {num_nodes}"
    if num_groups % num_nodes:
        return f"it maps groups to nodes: n_group={num_groups} is not a multiple of {num_nodes} nodes"
    if num_gpus % num_nodes:
        return f"{num_gpus} slots do not spread evenly over {num_nodes} nodes"
    per_node = REPLICAS * num_logical // num_nodes
    if per_node % (num_gpus // num_nodes):
        return f"it puts {per_node} experts on each node: not divisible by {num_gpus // num_nodes} slots per node"
    if num_replicas is not None and num_replicas != REPLICAS * num_logical:
        return f"it holds {REPLICAS * num_logical} physical experts per layer, the slots hold {num_replicas}"
    return None


def mirrored_layout(num_logical: int, num_groups: int, num_layers: int, num_nodes: int, num_gpus: int) -> Tensor:
    """phy2log [L, 2E]: node by node its own groups then its mirrors, experts in id order."""
    why = mirrored_misfit(num_logical, num_groups, num_nodes, num_gpus)
    if why is not None:
        raise ValueError(f"mirrored placement does not fit: {why}")
    per_group = num_logical // num_groups
    rows = []
    for node in range(num_nodes):
        groups = [g for g in range(num_groups) if g % num_nodes == node] + \
                 [g for g in range(num_groups) if (g + 1) % num_nodes == node]
        rows.extend(e for g in groups for e in range(g * per_group, (g + 1) * per_group))
    return torch.tensor(rows, dtype=torch.long).repeat(num_layers, 1)  # [L, P]


def plan_mirrored(weight_LE: Tensor | None, *, version: int, num_groups: int, num_nodes: int, num_gpus: int,
                  num_logical: int | None = None, num_layers: int | None = None) -> PlacementPlan:
    """A mirrored plan. With ``weight_LE`` (observed load) each node's experts are packed over its
    GPUs to balance load; without, the experts sit in id order (the static version-1 plan).
    ``num_logical``/``num_layers`` are needed only without a load."""
    if weight_LE is not None:
        num_layers, num_logical = weight_LE.shape
    if num_logical is None or num_layers is None:
        raise ValueError("plan_mirrored needs weight_LE or num_logical and num_layers")
    phy2log_LP = mirrored_layout(num_logical, num_groups, num_layers, num_nodes, num_gpus)
    if weight_LE is not None:
        per_node = phy2log_LP.shape[1] // num_nodes
        gpus_per_node = num_gpus // num_nodes
        experts_BX = phy2log_LP.view(num_layers * num_nodes, per_node)
        # each replica carries half its expert's load; the factor is the same for all, so pack the load
        weight_BX = weight_LE.double().gather(1, phy2log_LP).view_as(experts_BX)
        gpu_BX = pack_balanced(weight_BX, gpus_per_node)
        # GPU by GPU, each GPU's experts in id order (stable: experts_BX is in id order per group)
        key_BX = gpu_BX * (num_logical + 1) + experts_BX
        phy2log_LP = experts_BX.gather(1, key_BX.argsort(dim=1)).view(num_layers, -1)
    return PlacementPlan.from_phy2log(version, phy2log_LP, num_logical, num_gpus, num_nodes)
