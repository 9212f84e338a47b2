"""Expert-parallel load balancing (EPLB): decide which logical expert each physical slot holds.

Same contract as DeepSeek's open-source EPLB (``rebalance_experts`` in deepseek-ai/EPLB), so the two
can be compared table for table. On top of the reference's greedy it refines the packing (pair
swaps) and the replica allocation (spreading, single-replica moves); see "Refinement" below.

Glossary
  logical expert   one of the E routed experts of a MoE layer, as trained (ids 0..E-1).
  physical expert  a replica of a logical expert loaded into one slot; a logical expert has >= 1.
                   Its load is split evenly across its replicas (each carries load / logcnt).
  slot             room for one physical expert on a GPU; every GPU has P / num_gpus slots, and
                   physical ids run GPU by GPU: physical p lives on GPU p // (P / num_gpus).
  GPU (rank)       one expert-parallel rank.
  node             a server of num_gpus / num_nodes GPUs joined by NVLink; GPU g is on node
                   g // (num_gpus / num_nodes).
  group            E / num_groups consecutive logical experts. Node-limited routing sends a token to
                   few groups, so the hierarchical policy keeps a group (and all its replicas) on one node.
  plan             the tables phy2log / log2phy / logcnt for every layer (see ``plan.PlacementPlan``).

Numbers (DeepSeek-V3 prefill): 256 logical + 32 redundant = 288 physical; /32 GPUs = 9 slots per GPU;
  4 nodes x 8 GPUs; 8 groups of 32 experts -> 2 groups per node -> 64 logical in 72 slots per node.

Algorithm (hierarchical policy, used when num_groups % num_nodes == 0):
  1. pack groups to nodes, num_groups / num_nodes per node, balancing group load;
  2. inside each node, add replicas one at a time to the expert with the highest load per replica
     until the node's P / num_nodes slots are full;
  3. pack each node's replicas onto its GPUs, exactly P / num_gpus per GPU, balancing load.
  Otherwise the global policy runs the same steps with one group and one node.
  Packing (steps 1 and 3) is greedy largest-first into the lightest pack with room (the reference).

Refinement (``Refinement``; ``refinement=None`` gives the reference's plain greedy):
  * swaps: after greedy packing, while some pair swap between the heaviest pack and another pack
    (GPUs of the same node, or nodes for groups) lowers the heavier of the two, apply the swap that
    lowers it most. A swap never lifts a pack above the old maximum.
  * spread: also try replicas capped at one per GPU of the node; keep it where it packs better.
  * allocation search: move single replicas between experts while the packed maximum drops.
  Each layer's result is compared with the plain greedy one and the better kept, so balancedness is
  never below the reference-style greedy, layer by layer.

Shape letters: L layers, E logical experts, P physical experts, R max replicas of one logical expert,
  G groups, N nodes, D GPUs (devices); for the packing kernels B independent problems (layers x
  nodes), X items (experts) per problem, S slots per problem, M packs per problem, K items per pack;
  A problems still being improved, C candidate moves per problem (Y donors x Z recipients).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from expertmesh.placement.balance import gpu_loads
from expertmesh.placement.plan import PlacementPlan, logical_to_physical

# Cap on refinement swaps per packing call; every swap strictly improves the sorted pack loads, so
# this only bounds the time. DeepSeek-V3 shapes (up to 64 GPUs in one pool) converge within it.
DEFAULT_MAX_SWAP_ROUNDS = 256
# Cap on replica moves per (layer, node) in the allocation search (Refinement.allocation_rounds).
DEFAULT_ALLOCATION_ROUNDS = 8
# Donor and recipient experts tried per allocation round: up to this many of each.
_ALLOCATION_CANDIDATES = 4
# Relative tolerance on load comparisons: a swap must change loads by more than this share of the
# heaviest pack, so float round-off never triggers a swap (or an endless cycle).
_REL_TOL = 1e-9


@dataclass(frozen=True)
class Refinement:
    """What ExpertMesh adds on top of the reference greedy; ``None`` in its place = the reference.

    max_swap_rounds: cap on pair swaps per packing (module doc); 0 = greedy packing only.
    spread_replicas: also try, for each (layer, node), replicas capped at one per GPU of the node
        (a second replica on the same GPU adds no capacity there), and keep whichever allocation
        packs to the lower GPU maximum.
    allocation_rounds: cap on replica moves per (layer, node); 0 = keep the allocation. Each round
        tries moving one replica from a donor expert (one that loses least) to a recipient (one with
        the heaviest replicas), ranks the candidates by greedy packing and keeps the best one only if
        its refined packing lowers the GPU maximum. This fixes "pigeonhole" losses that the
        min-max-replica rule cannot see, e.g. 10 equal big replicas on 8 GPUs.
    """

    max_swap_rounds: int = DEFAULT_MAX_SWAP_ROUNDS
    spread_replicas: bool = True
    allocation_rounds: int = DEFAULT_ALLOCATION_ROUNDS

    def __post_init__(self) -> None:
        for name in ("max_swap_rounds", "allocation_rounds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} must be an int >= 0")


DEFAULT_REFINEMENT = Refinement()


def rebalance_experts(
    weight_LE: Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    refinement: Refinement | None = DEFAULT_REFINEMENT,
) -> tuple[Tensor, Tensor, Tensor]:
    """Place ``num_replicas`` physical experts for every layer from observed load.

    Args:
        weight_LE: load per logical expert (e.g. tokens routed), Shape: [L, E], non-negative.
        num_replicas: P, physical experts per layer; a multiple of ``num_gpus`` and >= E.
        num_groups: expert groups; E must be a multiple of it. Hierarchical policy when it is a
            multiple of ``num_nodes``, global policy otherwise.
        num_nodes: server nodes; ``num_gpus`` must be a multiple of it.
        num_gpus: expert-parallel GPUs (ranks).
        refinement: swaps, replica spreading, allocation search; None = the reference's plain
            greedy. With a refinement, no layer is less balanced than with the plain greedy.

    Returns:
        phy2log_LP: int64 [L, P], logical expert held by each physical expert.
        log2phy_LER: int64 [L, E, R], physical ids of each logical expert's replicas in ascending
            order, padded with -1; R = the largest replica count over all layers.
        logcnt_LE: int64 [L, E], replicas per logical expert (>= 1).
        All on CPU. Within a GPU, slots hold their logical experts in ascending id order.

    Raises:
        ValueError: a shape, value or divisibility rule is broken (the message names the values).
    """
    load_LE = _check_arguments(weight_LE, num_replicas, num_groups, num_nodes, num_gpus, refinement)
    if num_groups % num_nodes == 0:
        policy_groups, policy_nodes = num_groups, num_nodes  # hierarchical
    else:
        policy_groups, policy_nodes = 1, 1  # global: every GPU is one pack pool
    phy2log_LP = _place_hierarchical(load_LE, num_replicas, policy_groups, policy_nodes, num_gpus, refinement)
    if refinement is not None:
        # Group swaps change which experts share a node, so better nodes do not by themselves
        # guarantee a better layer: keep the plain greedy layer wherever it has the lower peak.
        greedy_LP = _place_hierarchical(load_LE, num_replicas, policy_groups, policy_nodes, num_gpus, None)
        greedy_wins_L = _peak_gpu_load(load_LE, greedy_LP, num_gpus) < _peak_gpu_load(load_LE, phy2log_LP, num_gpus)
        phy2log_LP = torch.where(greedy_wins_L.unsqueeze(1), greedy_LP, phy2log_LP)
    log2phy_LER, logcnt_LE = logical_to_physical(phy2log_LP, load_LE.shape[1])
    return phy2log_LP, log2phy_LER, logcnt_LE


def _peak_gpu_load(load_LE: Tensor, phy2log_LP: Tensor, num_gpus: int) -> Tensor:
    """Heaviest GPU load per layer, float64 [L] (each replica carries load / replicas)."""
    logcnt_LE = torch.zeros(load_LE.shape, dtype=torch.int64).scatter_add_(1, phy2log_LP, torch.ones_like(phy2log_LP))
    return gpu_loads(load_LE, phy2log_LP, logcnt_LE, num_gpus).max(dim=-1).values  # [L, D] -> [L]


def plan_placement(
    weight_LE: Tensor,
    *,
    version: int,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    refinement: Refinement | None = DEFAULT_REFINEMENT,
) -> PlacementPlan:
    """``rebalance_experts`` wrapped into a versioned ``PlacementPlan`` (what the controller stores)."""
    phy2log_LP, log2phy_LER, logcnt_LE = rebalance_experts(
        weight_LE, num_replicas, num_groups, num_nodes, num_gpus, refinement=refinement
    )
    return PlacementPlan(
        version=version,
        phy2log_LP=phy2log_LP,
        logcnt_LE=logcnt_LE,
        log2phy_LER=log2phy_LER,
        num_gpus=num_gpus,
        num_nodes=num_nodes,
    )


def replicate_experts(load_BX: Tensor, num_slots: int, *, max_replicas: int | None = None) -> Tensor:
    """Share ``num_slots`` slots among X experts, minimising the largest load per replica.

    Every expert gets one replica, then each extra replica goes to the expert with the highest
    load / replicas; ties go to the expert with fewer replicas, then the lower index (so an all-zero
    load spreads the extra replicas round-robin instead of piling them on expert 0). With
    ``max_replicas``, experts at the cap are passed over while any expert is below it.

    Returns:
        count_BX: int64 [B, X], replicas per expert; rows sum to ``num_slots``.
    """
    num_problems, num_items = load_BX.shape
    if num_slots < num_items:
        raise ValueError(f"num_slots={num_slots} must be >= experts={num_items}")
    rows_B = torch.arange(num_problems)
    count_BX = torch.ones(num_problems, num_items, dtype=torch.int64)
    for _ in range(num_slots - num_items):
        per_replica_BX = load_BX / count_BX
        if max_replicas is not None:
            below_cap_BX = count_BX < max_replicas
            below_cap_BX |= ~below_cap_BX.any(dim=-1, keepdim=True)  # everyone at the cap: cap off
            per_replica_BX = per_replica_BX.masked_fill(~below_cap_BX, -1.0)  # loads are >= 0
        is_top_BX = per_replica_BX == per_replica_BX.max(dim=-1, keepdim=True).values
        # fewest replicas among the tied top, then lowest index (argmin returns the first minimum)
        chosen_B = count_BX.masked_fill(~is_top_BX, num_slots + 1).argmin(dim=-1)
        count_BX[rows_B, chosen_B] += 1
    return count_BX


def pack_balanced(weight_BX: Tensor, num_packs: int, *, max_swap_rounds: int = DEFAULT_MAX_SWAP_ROUNDS) -> Tensor:
    """Split X weighted items into ``num_packs`` packs of exactly X / num_packs items, balancing load.

    Greedy: items by descending weight (ties: lower index first) each go to the lightest pack that
    still has room (ties: lower pack). Then up to ``max_swap_rounds`` refinement swaps (module doc).

    Returns:
        pack_BX: int64 [B, X], pack index of each item.
    """
    num_problems, num_items = weight_BX.shape
    if num_items % num_packs != 0:
        raise ValueError(f"items={num_items} must be a multiple of num_packs={num_packs}")
    per_pack = num_items // num_packs
    item_BMK = _greedy_pack(weight_BX, num_packs, per_pack)  # [B, M, K] item ids
    if max_swap_rounds > 0 and num_packs > 1:
        item_BMK = _refine_by_swaps(weight_BX, item_BMK, max_swap_rounds)
    pack_BX = torch.empty(num_problems, num_items, dtype=torch.int64)
    pack_ids_BMK = torch.arange(num_packs).view(1, num_packs, 1).expand_as(item_BMK)
    pack_BX.scatter_(1, item_BMK.flatten(1), pack_ids_BMK.flatten(1))
    return pack_BX


def _greedy_pack(weight_BX: Tensor, num_packs: int, per_pack: int) -> Tensor:
    """Largest-first into the lightest non-full pack; returns item ids laid out as [B, M, K]."""
    num_problems, num_items = weight_BX.shape
    rows_B = torch.arange(num_problems)
    order_BX = torch.sort(weight_BX, dim=-1, descending=True, stable=True).indices
    item_BMK = torch.empty(num_problems, num_packs, per_pack, dtype=torch.int64)
    load_BM = torch.zeros(num_problems, num_packs, dtype=weight_BX.dtype)
    fill_BM = torch.zeros(num_problems, num_packs, dtype=torch.int64)
    for step in range(num_items):
        item_B = order_BX[:, step]
        open_load_BM = load_BM.masked_fill(fill_BM >= per_pack, float("inf"))
        pack_B = open_load_BM.argmin(dim=-1)  # first minimum: lower pack wins ties
        item_BMK[rows_B, pack_B, fill_BM[rows_B, pack_B]] = item_B
        load_BM[rows_B, pack_B] += weight_BX[rows_B, item_B]
        fill_BM[rows_B, pack_B] += 1
    return item_BMK


def _refine_by_swaps(weight_BX: Tensor, item_BMK: Tensor, max_swap_rounds: int) -> Tensor:
    """Swap item pairs between the heaviest pack and another pack while that lowers the heavier one.

    Per round and problem: with A the heaviest pack (load a) and items i in A, j in pack Q (load q),
    swapping moves d = w_i - w_j from A to Q; it helps iff 0 < d < a - q, leaving the pair at
    max(a - d, q + d) < a. The swap with the smallest such pair maximum is applied. A problem whose
    heaviest pack admits no helping swap is finished (its state no longer changes).
    """
    num_problems, num_packs, per_pack = item_BMK.shape
    rows_B = torch.arange(num_problems)
    item_BMK = item_BMK.clone()
    w_BMK = weight_BX.gather(1, item_BMK.flatten(1)).view_as(item_BMK).clone()
    active_B = torch.ones(num_problems, dtype=torch.bool)
    for _ in range(max_swap_rounds):
        load_BM = w_BMK.sum(dim=-1)
        top_B = load_BM.argmax(dim=-1)
        top_load_B = load_BM[rows_B, top_B]
        tol_B = (_REL_TOL * top_load_B).view(-1, 1, 1, 1)
        w_top_BK = w_BMK[rows_B, top_B]
        delta_BKMK = w_top_BK.view(num_problems, per_pack, 1, 1) - w_BMK.unsqueeze(1)  # [B, K(i), M(q), K(j)]
        gap_B1M1 = (top_load_B.unsqueeze(1) - load_BM).view(num_problems, 1, num_packs, 1)
        helps_BKMK = (delta_BKMK > tol_B) & (delta_BKMK < gap_B1M1 - tol_B) & active_B.view(-1, 1, 1, 1)
        pair_max_BKMK = torch.maximum(
            top_load_B.view(-1, 1, 1, 1) - delta_BKMK, load_BM.view(num_problems, 1, num_packs, 1) + delta_BKMK
        )
        score_BC = pair_max_BKMK.masked_fill(~helps_BKMK, float("inf")).flatten(1)  # C = K*M*K candidate swaps
        best_B = score_BC.argmin(dim=-1)
        active_B = torch.isfinite(score_BC[rows_B, best_B])
        if not bool(active_B.any()):
            break
        rows = rows_B[active_B]
        best = best_B[active_B]
        i, q, j = best // (num_packs * per_pack), (best // per_pack) % num_packs, best % per_pack
        a = top_B[active_B]
        for table in (w_BMK, item_BMK):
            from_top = table[rows, a, i].clone()
            table[rows, a, i] = table[rows, q, j]
            table[rows, q, j] = from_top
    return item_BMK


def _place_hierarchical(
    load_LE: Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int, refinement: Refinement | None
) -> Tensor:
    """Steps 1-3 of the module doc; returns phy2log_LP (node-major, GPU-major, logical id ascending)."""
    num_layers, num_logical = load_LE.shape
    group_size = num_logical // num_groups
    logical_per_node = num_logical // num_nodes
    slots_per_node = num_replicas // num_nodes
    gpus_per_node = num_gpus // num_nodes
    swap_rounds = 0 if refinement is None else refinement.max_swap_rounds

    # 1. groups -> nodes
    group_load_LG = load_LE.view(num_layers, num_groups, group_size).sum(dim=-1)  # [L, G]
    node_of_group_LG = pack_balanced(group_load_LG, num_nodes, max_swap_rounds=swap_rounds)
    # groups ordered node by node (then by group id); expand each group to its experts
    groups_node_major_LG = torch.argsort(node_of_group_LG * num_groups + torch.arange(num_groups), dim=-1)
    node_logical_LE = (groups_node_major_LG.unsqueeze(-1) * group_size + torch.arange(group_size)).flatten(
        1
    )  # [L, G, E/G] -> [L, E]: entry n*(E/N) + x is the x-th logical expert of node n
    node_load_BX = load_LE.gather(1, node_logical_LE).view(num_layers * num_nodes, logical_per_node)  # B = L*N

    # 2 + 3. replicate inside each node, pack the node's replicas to its GPUs
    count_BX = replicate_experts(node_load_BX, slots_per_node)
    gpu_BS, peak_B = _pack_counts(node_load_BX, count_BX, gpus_per_node, swap_rounds)
    if refinement is not None and refinement.spread_replicas:
        spread_count_BX = replicate_experts(node_load_BX, slots_per_node, max_replicas=gpus_per_node)
        spread_gpu_BS, spread_peak_B = _pack_counts(node_load_BX, spread_count_BX, gpus_per_node, swap_rounds)
        better_B = spread_peak_B < peak_B
        count_BX = torch.where(better_B.unsqueeze(1), spread_count_BX, count_BX)
        gpu_BS = torch.where(better_B.unsqueeze(1), spread_gpu_BS, gpu_BS)
        peak_B = torch.minimum(peak_B, spread_peak_B)
    if refinement is not None and refinement.allocation_rounds > 0:
        # a layer's GPU maximum is at least its heaviest node's mean GPU load: below that, nothing to gain
        node_mean_LN = node_load_BX.sum(dim=-1).view(num_layers, num_nodes) / gpus_per_node
        floor_B = node_mean_LN.max(dim=-1, keepdim=True).values.expand(-1, num_nodes).reshape(-1)
        count_BX, gpu_BS = _improve_allocation(
            node_load_BX, count_BX, gpu_BS, peak_B, floor_B, gpus_per_node, refinement
        )
    slot2x_BS = _slots_from_counts(count_BX, slots_per_node)

    # lay out: GPU by GPU inside the node, logical id ascending inside a GPU
    logical_BS = node_logical_LE.view(num_layers * num_nodes, logical_per_node).gather(1, slot2x_BS)
    order_BS = torch.argsort(gpu_BS * num_logical + logical_BS, dim=-1, stable=True)
    phy2log_BS = logical_BS.gather(1, order_BS)
    return phy2log_BS.reshape(num_layers, num_replicas)  # [L*N, P/N] -> [L, P], nodes contiguous


def _slots_from_counts(count_BX: Tensor, num_slots: int) -> Tensor:
    """Expert of each slot when expert x fills count[x] consecutive slots: int64 [B, S]."""
    end_BX = torch.cumsum(count_BX, dim=-1)
    slots_BS = torch.arange(num_slots).expand(count_BX.shape[0], num_slots).contiguous()
    return torch.searchsorted(end_BX, slots_BS, right=True)


def _pack_counts(load_BX: Tensor, count_BX: Tensor, num_gpus: int, swap_rounds: int) -> tuple[Tensor, Tensor]:
    """Pack the replicas given by ``count_BX`` (slots as in ``_slots_from_counts``) onto GPUs.

    Returns gpu_BS (GPU of each slot) and peak_B (heaviest GPU load).
    """
    num_slots = int(count_BX[0].sum())
    slot2x_BS = _slots_from_counts(count_BX, num_slots)
    replica_load_BS = (load_BX / count_BX).gather(1, slot2x_BS)
    gpu_BS = pack_balanced(replica_load_BS, num_gpus, max_swap_rounds=swap_rounds)
    gpu_load_BD = torch.zeros(load_BX.shape[0], num_gpus, dtype=load_BX.dtype).scatter_add_(1, gpu_BS, replica_load_BS)
    return gpu_BS, gpu_load_BD.max(dim=-1).values


def _improve_allocation(
    load_BX: Tensor,
    count_BX: Tensor,
    gpu_BS: Tensor,
    peak_B: Tensor,
    floor_B: Tensor,
    num_gpus: int,
    refinement: Refinement,
) -> tuple[Tensor, Tensor]:
    """Hill-climb on replica counts (see ``Refinement.allocation_rounds``); never raises a peak.

    A problem is searched only while its peak is above ``floor_B``, the lowest peak its layer can
    reach (the heaviest node's mean GPU load), since below it balancedness cannot change.
    """
    num_problems, num_items = load_BX.shape
    count_BX, gpu_BS, peak_B = count_BX.clone(), gpu_BS.clone(), peak_B.clone()
    tol_B = _REL_TOL * load_BX.sum(dim=-1)
    active_B = peak_B > floor_B + tol_B
    num_pick = min(_ALLOCATION_CANDIDATES, num_items)
    for _ in range(refinement.allocation_rounds):
        rows_A = active_B.nonzero().squeeze(1)  # A = problems still improving
        if rows_A.numel() == 0:
            break
        load_AX, count_AX = load_BX[rows_A], count_BX[rows_A]
        # recipients: heaviest replicas; donors: experts that lose least by giving one up
        # (stable sorts: ties go to the lower expert index, so results are reproducible)
        per_replica_AX = load_AX / count_AX
        recipient_AZ = torch.sort(per_replica_AX, dim=-1, descending=True, stable=True).indices[:, :num_pick]
        loss_AX = torch.where(count_AX >= 2, load_AX / (count_AX - 1).clamp_min(1), float("inf"))
        donor_AY = torch.sort(loss_AX, dim=-1, stable=True).indices[:, :num_pick]
        donor_ok_AY = count_AX.gather(1, donor_AY) >= 2
        donor_AC = donor_AY.repeat_interleave(num_pick, dim=1)  # C = Y*Z candidate moves, donor-major
        recipient_AC = recipient_AZ.repeat(1, num_pick)
        valid_AC = donor_ok_AY.repeat_interleave(num_pick, dim=1) & (donor_AC != recipient_AC)
        cand_ACX = count_AX.unsqueeze(1).repeat(1, donor_AC.shape[1], 1)
        cand_ACX.scatter_add_(2, donor_AC.unsqueeze(2), -valid_AC.long().unsqueeze(2))
        cand_ACX.scatter_add_(2, recipient_AC.unsqueeze(2), valid_AC.long().unsqueeze(2))
        # rank candidates by plain greedy packing (cheap), refine only the best one
        flat_count = cand_ACX.flatten(0, 1)  # [A*C, X]
        greedy_peak_AC = _pack_counts(load_AX.repeat_interleave(donor_AC.shape[1], dim=0), flat_count, num_gpus, 0)[1]
        greedy_peak_AC = greedy_peak_AC.view_as(valid_AC).masked_fill(~valid_AC, float("inf"))
        best_A = greedy_peak_AC.argmin(dim=-1)
        has_move_A = valid_AC.any(dim=-1)
        best_count_AX = cand_ACX[torch.arange(rows_A.numel()), best_A]
        best_gpu_AS, best_peak_A = _pack_counts(load_AX, best_count_AX, num_gpus, refinement.max_swap_rounds)
        improved_A = has_move_A & (best_peak_A < peak_B[rows_A] - tol_B[rows_A])
        keep = rows_A[improved_A]
        count_BX[keep], gpu_BS[keep], peak_B[keep] = (
            best_count_AX[improved_A],
            best_gpu_AS[improved_A],
            best_peak_A[improved_A],
        )
        active_B[rows_A[~improved_A]] = False
        active_B &= peak_B > floor_B + tol_B
    return count_BX, gpu_BS


def _check_arguments(
    weight_LE: Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int, refinement: Refinement | None
) -> Tensor:
    """Raise ValueError naming the values on bad input; return the load as float64 on CPU."""
    if not isinstance(weight_LE, Tensor):
        raise ValueError(f"weight_LE must be a torch.Tensor [layers, logical experts], got {type(weight_LE).__name__}")
    if weight_LE.dim() != 2 or weight_LE.shape[0] == 0 or weight_LE.shape[1] == 0:
        raise ValueError(
            f"weight_LE must be a non-empty 2-D tensor [layers, logical experts], got shape {tuple(weight_LE.shape)}"
        )
    if weight_LE.is_complex():
        raise ValueError(f"weight_LE must be real, got dtype {weight_LE.dtype}")
    for name, value in (
        ("num_replicas", num_replicas),
        ("num_groups", num_groups),
        ("num_nodes", num_nodes),
        ("num_gpus", num_gpus),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive int")
    if refinement is not None and not isinstance(refinement, Refinement):
        raise ValueError(f"refinement must be a Refinement or None, got {type(refinement).__name__}")
    load_LE = weight_LE.detach().to(device="cpu", dtype=torch.float64)  # NOTE: syncs GPU->host for CUDA input
    if not bool(torch.isfinite(load_LE).all()):
        raise ValueError("weight_LE must be finite; it holds NaN or inf")
    if bool((load_LE < 0).any()):
        layer, expert = (int(v) for v in (load_LE < 0).nonzero()[0])
        raise ValueError(
            f"weight_LE must be non-negative, got {load_LE[layer, expert].item()} at layer={layer}, expert={expert}"
        )
    num_logical = weight_LE.shape[1]
    if num_replicas % num_gpus != 0:
        raise ValueError(f"num_replicas={num_replicas} must be a multiple of num_gpus={num_gpus}")
    if num_gpus % num_nodes != 0:
        raise ValueError(f"num_gpus={num_gpus} must be a multiple of num_nodes={num_nodes}")
    if num_replicas < num_logical:
        raise ValueError(f"num_replicas={num_replicas} must be >= logical experts E={num_logical}")
    if num_logical % num_groups != 0:
        raise ValueError(f"logical experts E={num_logical} must be a multiple of num_groups={num_groups}")
    return load_LE
