"""EPLB (expertmesh.placement): exact outputs on hand-worked examples, validity on random loads,
balance against the baselines, plans and their diffs. CPU only, a few seconds.

Shape letters: L layers, E logical experts, P physical experts, R max replicas, D GPUs.
"""

from __future__ import annotations

import json

import pytest
import torch
from expertmesh.placement import (
    ExpertMove,
    PlacementPlan,
    Refinement,
    apply_moves,
    balancedness,
    diff_plans,
    gpu_loads,
    logical_to_physical,
    mirrored_misfit,
    moves_by_layer,
    naive_placement,
    no_redundancy_placement,
    pack_balanced,
    plan_mirrored,
    plan_placement,
    rebalance_experts,
    replicate_experts,
)
from hypothesis import given, settings
from hypothesis import strategies as st

SWAPS_ONLY = Refinement(spread_replicas=False, allocation_rounds=0)


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# ---- exact outputs, worked by hand -------------------------------------------------------------
# Global policy (1 node), E=4 logical, P=6 physical, 2 GPUs x 3 slots.
# Layer 0, load [10, 2, 5, 3]: extra replicas go to e0 (10 -> 5 per replica), then e0 and e2 tie
#   at 5 and e2 wins (fewer replicas): counts [2, 1, 2, 1], replicas 5, 5, 3, 2.5, 2.5, 2.
#   Greedy largest-first: 5->G0, 5->G1, 3->G0 (tie), 2.5->G1, 2.5->G1 (full), 2->G0: loads 10, 10.
#   G0 = {e0, e3, e1} -> slots [0, 1, 3]; G1 = {e0, e2, e2} -> [0, 2, 2].
# Layer 1, load [1, 1, 2, 8] (total 12, ideal 6 per GPU):
#   plain greedy: e3 gets both extras (8 -> 4 -> 2.67): replicas 2.67 x3, 2, 1, 1.
#     2.67->G0, 2.67->G1, 2.67->G0, 2->G1, 1->G1 (full), 1->G0: loads 6.33, 5.67 -> 6/6.33 = 18/19.
#     G0 = {e3, e3, e1} -> [1, 3, 3]; G1 = {e3, e2, e0} -> [0, 2, 3].
#   ours: spreading caps e3 at 2 replicas (one per GPU), so the second extra goes to e2:
#     counts [1, 1, 2, 2], replicas 4, 4, 1, 1, 1, 1 -> 4+1+1 on each GPU, perfect.
#     G0 = {e3, e0, e2} -> [0, 2, 3]; G1 = {e3, e1, e2} -> [1, 2, 3].
GLOBAL_LOAD_LE = [[10, 2, 5, 3], [1, 1, 2, 8]]


def test_global_policy_exact_ours():
    phy2log_LP, log2phy_LER, logcnt_LE = rebalance_experts(_t(GLOBAL_LOAD_LE), 6, 1, 1, 2)
    assert phy2log_LP.tolist() == [[0, 1, 3, 0, 2, 2], [0, 2, 3, 1, 2, 3]]
    assert logcnt_LE.tolist() == [[2, 1, 2, 1], [1, 1, 2, 2]]
    assert log2phy_LER.tolist() == [
        [[0, 3], [1, -1], [4, 5], [2, -1]],
        [[0, -1], [3, -1], [1, 4], [2, 5]],
    ]
    assert balancedness(_t(GLOBAL_LOAD_LE), phy2log_LP, logcnt_LE, 2).tolist() == [1.0, 1.0]
    # the spreading alone finds it (the allocation search would too, so switch that off to see it)
    spread_only = rebalance_experts(_t(GLOBAL_LOAD_LE), 6, 1, 1, 2, refinement=Refinement(allocation_rounds=0))
    assert spread_only[0].tolist() == phy2log_LP.tolist()


def test_global_policy_exact_plain_greedy():
    phy2log_LP, log2phy_LER, logcnt_LE = rebalance_experts(_t(GLOBAL_LOAD_LE), 6, 1, 1, 2, refinement=None)
    assert phy2log_LP.tolist() == [[0, 1, 3, 0, 2, 2], [1, 3, 3, 0, 2, 3]]
    assert logcnt_LE.tolist() == [[2, 1, 2, 1], [1, 1, 1, 3]]
    assert log2phy_LER.tolist() == [
        [[0, 3, -1], [1, -1, -1], [4, 5, -1], [2, -1, -1]],
        [[3, -1, -1], [0, -1, -1], [4, -1, -1], [1, 2, 5]],
    ]
    assert balancedness(_t(GLOBAL_LOAD_LE), phy2log_LP, logcnt_LE, 2).tolist() == pytest.approx([1.0, 18 / 19])


# Swap refinement alone. E = P = 6 (no replicas), 2 GPUs x 3 slots, load [8, 7, 6, 5, 4, 2] (ideal 16).
#   Greedy: 8->G0, 7->G1, 6->G1, 5->G0, 4->G0 (tie 13/13, G0 now full), 2->G1: loads 17, 15.
#   The only helping swap moves 0 < d < 2 from G0 to G1: 8 <-> 7 (d = 1): loads 16, 16.
def test_swap_refinement_exact():
    load_LE = _t([[8, 7, 6, 5, 4, 2]])
    assert pack_balanced(load_LE, 2, max_swap_rounds=0).tolist() == [[0, 1, 1, 0, 0, 1]]
    assert pack_balanced(load_LE, 2).tolist() == [[1, 0, 1, 0, 0, 1]]
    greedy_LP = rebalance_experts(load_LE, 6, 1, 1, 2, refinement=None)[0]
    ours_LP = rebalance_experts(load_LE, 6, 1, 1, 2, refinement=SWAPS_ONLY)[0]
    assert greedy_LP.tolist() == [[0, 3, 4, 1, 2, 5]]
    assert ours_LP.tolist() == [[1, 3, 4, 0, 2, 5]]


# Allocation search. E=3, P=6, 3 GPUs x 2 slots, load [4, 4, 2] (total 10, ideal 3.33 per GPU).
#   Min-max-replica rule: e0 (tie with e1, lower index), e1, then e2 (all tie at 2, fewest replicas):
#   counts [2, 2, 2], replicas 2, 2, 2, 2, 1, 1 -> GPUs {e0,e1} 4, {e0,e2} 3, {e1,e2} 3: 3.33/4.
#   No swap helps (2 <-> 1 moves 1, not < the gap of 1); the cap (3 per expert) changes nothing.
#   Allocation search: donor e2 (loses least: 2/1), recipient e0 (heaviest replica, lowest index):
#   counts [3, 2, 1], replicas 2, 2, 2 | 1.33 x3 -> every GPU 2 + 1.33. Perfect.
def test_allocation_search_exact():
    load_LE = _t([[4, 4, 2]])
    no_search = rebalance_experts(load_LE, 6, 1, 1, 3, refinement=Refinement(allocation_rounds=0))
    assert no_search[0].tolist() == [[0, 1, 0, 2, 1, 2]] and no_search[2].tolist() == [[2, 2, 2]]
    ours = rebalance_experts(load_LE, 6, 1, 1, 3)
    assert ours[0].tolist() == [[0, 1, 0, 1, 0, 2]] and ours[2].tolist() == [[3, 2, 1]]
    assert balancedness(load_LE, no_search[0], no_search[2], 3).tolist() == pytest.approx([10 / 12])
    assert balancedness(load_LE, ours[0], ours[2], 3).tolist() == pytest.approx([1.0])


# Hierarchical policy: E=4 in 2 groups ({0,1}, {2,3}), P=8, 2 nodes x 2 GPUs x 2 slots.
# Layer 0, load [6, 2, 3, 1]: groups 8, 4 -> group 0 on node 0 (GPUs 0-1), group 1 on node 1.
#   Node 0: 4 slots for e0 (6), e1 (2): extras to e0 twice -> 2, 2, 2 | 2 -> GPUs {e0,e0}, {e0,e1}.
#   Node 1: e2 (3), e3 (1): extras to e2 twice -> 1, 1, 1 | 1 -> GPUs {e2,e2}, {e2,e3}.
#   GPU loads 4, 4, 2, 2 -> 3/4 (the node ceiling: group 0 alone outweighs group 1).
# Layer 1, load [1, 1, 4, 2]: groups 2, 6 -> the heavier group 1 goes to node 0.
#   Node 0: e2 (4) gets an extra (2), then e2 and e3 tie at 2 and e3 wins (fewer): 2, 2 | 1, 1
#     -> GPUs {e2,e3}, {e2,e3}.  Node 1: e0, e1 tie at 1: one extra each -> {e0,e1}, {e0,e1}.
HIER_LOAD_LE = [[6, 2, 3, 1], [1, 1, 4, 2]]


@pytest.mark.parametrize("refinement", [Refinement(), None], ids=["ours", "greedy"])
def test_hierarchical_policy_exact(refinement):
    phy2log_LP, log2phy_LER, logcnt_LE = rebalance_experts(_t(HIER_LOAD_LE), 8, 2, 2, 4, refinement=refinement)
    assert phy2log_LP.tolist() == [[0, 0, 0, 1, 2, 2, 2, 3], [2, 3, 2, 3, 0, 1, 0, 1]]
    assert logcnt_LE.tolist() == [[3, 1, 3, 1], [2, 2, 2, 2]]
    assert log2phy_LER.tolist() == [
        [[0, 1, 2], [3, -1, -1], [4, 5, 6], [7, -1, -1]],
        [[4, 6, -1], [5, 7, -1], [0, 2, -1], [1, 3, -1]],
    ]
    assert balancedness(_t(HIER_LOAD_LE), phy2log_LP, logcnt_LE, 4).tolist() == pytest.approx([3 / 4, 2 / 3])


def test_global_fallback_when_groups_do_not_split_over_nodes():
    load_LE = torch.rand(3, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fallback = rebalance_experts(load_LE, 8, 3, 2, 4)  # 3 groups % 2 nodes != 0 -> global policy
    global_ = rebalance_experts(load_LE, 8, 1, 1, 4)
    for got, want in zip(fallback, global_, strict=True):
        assert torch.equal(got, want)


def test_replicate_experts_ties_and_cap():
    assert replicate_experts(_t([[0, 0, 0]]), 6).tolist() == [[2, 2, 2]]  # zero load: round-robin
    assert replicate_experts(_t([[9, 1, 1]]), 6).tolist() == [[4, 1, 1]]
    assert replicate_experts(_t([[9, 1, 1]]), 6, max_replicas=2).tolist() == [[2, 2, 2]]
    assert replicate_experts(_t([[9, 1]]), 6, max_replicas=2).tolist() == [[4, 2]]  # all at cap: cap off


def test_baselines_exact():
    phy2log_LP, log2phy_LER, logcnt_LE = naive_placement(4, 6, 2, num_layers=2)
    assert phy2log_LP.tolist() == [[0, 1, 2, 3, 0, 1]] * 2
    assert logcnt_LE.tolist() == [[2, 2, 1, 1]] * 2
    assert log2phy_LER[0].tolist() == [[0, 4], [1, 5], [2, -1], [3, -1]]
    phy2log_LP, _, logcnt_LE = no_redundancy_placement(4, 2)
    assert phy2log_LP.tolist() == [[0, 1, 2, 3]] and logcnt_LE.tolist() == [[1, 1, 1, 1]]
    # GPU 0 holds e0, e1 (4 + 0), GPU 1 holds e2, e3 (0 + 0): mean 2 / max 4
    assert gpu_loads(_t([[4, 0, 0, 0]]), phy2log_LP, logcnt_LE, 2).tolist() == [[4.0, 0.0]]
    assert balancedness(_t([[4, 0, 0, 0]]), phy2log_LP, logcnt_LE, 2).tolist() == [0.5]
    assert balancedness(_t([[0, 0, 0, 0]]), phy2log_LP, logcnt_LE, 2).tolist() == [1.0]


# ---- validity on random loads ------------------------------------------------------------------
@st.composite
def topologies(draw):
    num_nodes = draw(st.integers(1, 3))
    num_gpus = num_nodes * draw(st.integers(1, 3))
    num_groups = draw(st.integers(1, 6))
    num_logical = num_groups * draw(st.integers(1, 4))
    slots_per_gpu = -(-num_logical // num_gpus) + draw(st.integers(0, 2))
    num_layers = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["lognormal", "zipf", "sparse", "ints"]))
    seed = draw(st.integers(0, 2**16))
    return (
        num_layers,
        num_logical,
        slots_per_gpu * num_gpus,
        num_groups,
        num_nodes,
        num_gpus,
        _loads(kind, num_layers, num_logical, seed),
    )


def _loads(kind: str, num_layers: int, num_logical: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "lognormal":
        return torch.exp(torch.randn(num_layers, num_logical, generator=gen, dtype=torch.float64))
    if kind == "zipf":  # load ~ 1 / rank, experts in random order per layer
        inv_rank_E = 1.0 / torch.arange(1, num_logical + 1, dtype=torch.float64)
        return torch.stack([inv_rank_E[torch.randperm(num_logical, generator=gen)] for _ in range(num_layers)])
    if kind == "sparse":  # many idle experts, ties everywhere
        return (torch.rand(num_layers, num_logical, generator=gen) < 0.3).double() * 5
    return torch.randint(0, 4, (num_layers, num_logical), generator=gen)  # small ints, int dtype


def _check_valid(load_LE, phy2log_LP, log2phy_LER, logcnt_LE, num_replicas, num_gpus):
    num_layers, num_logical = load_LE.shape
    assert phy2log_LP.shape == (num_layers, num_replicas) and phy2log_LP.dtype == torch.int64
    assert logcnt_LE.shape == (num_layers, num_logical)
    assert bool((logcnt_LE >= 1).all()), "every logical expert needs a replica"
    assert logcnt_LE.sum(dim=-1).tolist() == [num_replicas] * num_layers
    assert log2phy_LER.shape == (num_layers, num_logical, int(logcnt_LE.max()))
    for layer in range(num_layers):
        counted_E = torch.bincount(phy2log_LP[layer], minlength=num_logical)
        assert torch.equal(counted_E, logcnt_LE[layer])
        for logical in range(num_logical):
            row = log2phy_LER[layer, logical].tolist()
            count = int(logcnt_LE[layer, logical])
            assert row[count:] == [-1] * (len(row) - count)
            assert row[:count] == sorted(set(row[:count]))
            assert all(int(phy2log_LP[layer, p]) == logical for p in row[:count])
    plan = PlacementPlan(0, phy2log_LP, logcnt_LE, log2phy_LER, num_gpus, 1)
    assert all(
        len(plan.experts_on_gpu(layer, gpu)) == num_replicas // num_gpus
        for layer in range(num_layers)
        for gpu in range(num_gpus)
    )


@settings(max_examples=40, deadline=None)
@given(topologies())
def test_random_loads_give_valid_plans_never_worse_than_greedy(topology):
    num_layers, num_logical, num_replicas, num_groups, num_nodes, num_gpus, load_LE = topology
    before_LE = load_LE.clone()
    ours = rebalance_experts(load_LE, num_replicas, num_groups, num_nodes, num_gpus)
    greedy = rebalance_experts(load_LE, num_replicas, num_groups, num_nodes, num_gpus, refinement=None)
    assert torch.equal(load_LE, before_LE), "input must not be modified"
    for result in (ours, greedy):
        _check_valid(load_LE, *result, num_replicas, num_gpus)
        if num_groups % num_nodes == 0:
            _check_groups_stay_on_one_node(result[0], num_logical // num_groups, num_replicas // num_nodes)
    ours_L = balancedness(load_LE, ours[0], ours[2], num_gpus)
    greedy_L = balancedness(load_LE, greedy[0], greedy[2], num_gpus)
    assert bool((ours_L >= greedy_L - 1e-12).all()), (ours_L, greedy_L)


def _check_groups_stay_on_one_node(phy2log_LP, group_size, slots_per_node):
    node_of_physical_P = torch.arange(phy2log_LP.shape[1]) // slots_per_node
    for layer in range(phy2log_LP.shape[0]):
        nodes_of_group: dict[int, set[int]] = {}
        for physical, logical in enumerate(phy2log_LP[layer].tolist()):
            nodes_of_group.setdefault(logical // group_size, set()).add(int(node_of_physical_P[physical]))
        assert all(len(nodes) == 1 for nodes in nodes_of_group.values()), nodes_of_group


# ---- balance against the baselines on skewed loads ---------------------------------------------
# DeepSeek-V3 in miniature: 64 logical in 8 groups, 80 physical, 4 nodes x 4 GPUs x 5 slots.
@pytest.mark.parametrize("kind", ["lognormal", "zipf"])
@pytest.mark.parametrize("num_groups", [8, 2], ids=["hierarchical", "global"])  # 2 % 4 nodes != 0: global
def test_skewed_loads_beat_baselines(kind, num_groups):
    num_logical, num_replicas, num_nodes, num_gpus = 64, 80, 4, 16
    load_LE = torch.cat([_loads(kind, 8, num_logical, seed) for seed in range(4)])  # [32, E]
    ours_L = balancedness(
        load_LE, *_pick(rebalance_experts(load_LE, num_replicas, num_groups, num_nodes, num_gpus)), num_gpus
    )
    greedy_L = balancedness(
        load_LE,
        *_pick(rebalance_experts(load_LE, num_replicas, num_groups, num_nodes, num_gpus, refinement=None)),
        num_gpus,
    )
    num_layers = load_LE.shape[0]
    naive_L = balancedness(
        load_LE, *_pick(naive_placement(num_logical, num_replicas, num_gpus, num_layers=num_layers)), num_gpus
    )
    bare_L = balancedness(
        load_LE, *_pick(no_redundancy_placement(num_logical, num_gpus, num_layers=num_layers)), num_gpus
    )
    assert ours_L.mean() > naive_L.mean() and ours_L.mean() > bare_L.mean()
    assert bool((ours_L >= greedy_L - 1e-12).all())
    assert ours_L.mean() > greedy_L.mean()  # the refinement must buy something on skewed loads


def _pick(result):
    phy2log_LP, _, logcnt_LE = result
    return phy2log_LP, logcnt_LE


# ---- argument checks ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("weight", "args", "message"),
    [
        (torch.ones(2, 4), (7, 1, 1, 2), "num_replicas=7 must be a multiple of num_gpus=2"),
        (torch.ones(2, 4), (6, 1, 4, 6), "num_gpus=6 must be a multiple of num_nodes=4"),
        (torch.ones(2, 4), (2, 1, 1, 2), "num_replicas=2 must be >= logical experts E=4"),
        (torch.ones(2, 4), (8, 3, 1, 2), "logical experts E=4 must be a multiple of num_groups=3"),
        (torch.ones(4), (8, 1, 1, 2), "2-D"),
        (torch.tensor([[1.0, -2.0]]), (2, 1, 1, 2), "-2.0 at layer=0, expert=1"),
        (torch.tensor([[1.0, float("nan")]]), (2, 1, 1, 2), "finite"),
        (torch.ones(2, 4), (8, 0, 1, 2), "num_groups=0 must be a positive int"),
    ],
)
def test_invalid_arguments_raise_value_error_naming_values(weight, args, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(".", r"\.")):
        rebalance_experts(weight, *args)


def test_invalid_refinement_and_baseline_arguments():
    with pytest.raises(ValueError, match="max_swap_rounds=-1"):
        Refinement(max_swap_rounds=-1)
    with pytest.raises(ValueError, match="num_replicas=5 must be a multiple of num_gpus=2"):
        naive_placement(4, 5, 2)
    with pytest.raises(ValueError, match="num_replicas=3 must be >= num_logical=4"):
        naive_placement(4, 3, 1)


# ---- plans ---------------------------------------------------------------------------------------
def _plan(version: int, seed: int) -> PlacementPlan:
    load_LE = _loads("lognormal", 3, 16, seed)
    return plan_placement(load_LE, version=version, num_replicas=24, num_groups=4, num_nodes=2, num_gpus=4)


def test_plan_lookups_on_deepseek_numbers():
    # 256 logical + 32 redundant = 288 physical; /32 GPUs = 9 slots per GPU; 4 nodes x 8 GPUs
    plan = PlacementPlan.from_phy2log(1, naive_placement(256, 288, 32)[0], 256, num_gpus=32, num_nodes=4)
    assert (plan.slots_per_gpu, plan.gpus_per_node, plan.num_physical, plan.num_logical) == (9, 8, 288, 256)
    assert (plan.gpu_of(40), plan.slot_of(40), plan.node_of_gpu(plan.gpu_of(40))) == (4, 4, 0)
    assert plan.node_of_gpu(31) == 3
    assert plan.experts_on_gpu(0, 31) == [23, 24, 25, 26, 27, 28, 29, 30, 31]  # redundant copies of 23..31
    assert plan.replicas_of(0, 0) == [0, 256] and plan.replicas_of(0, 200) == [200]
    with pytest.raises(IndexError, match="gpu=32 out of range"):
        plan.experts_on_gpu(0, 32)


def test_plan_dict_round_trip_through_json():
    plan = _plan(7, seed=0)
    data = json.loads(json.dumps(plan.to_dict()))
    assert PlacementPlan.from_dict(data) == plan
    assert data["version"] == 7 and isinstance(data["phy2log_LP"][0][0], int)


def test_plan_rejects_inconsistent_tables():
    plan = _plan(1, seed=0)
    data = plan.to_dict()
    data["logcnt_LE"][0][0] += 1
    with pytest.raises(ValueError, match="logcnt_LE does not match"):
        PlacementPlan.from_dict(data)
    data = plan.to_dict()
    del data["log2phy_LER"]
    with pytest.raises(ValueError, match="missing keys \\['log2phy_LER'\\]"):
        PlacementPlan.from_dict(data)
    with pytest.raises(ValueError, match="P=24 must be a multiple of num_gpus=5"):
        PlacementPlan(1, plan.phy2log_LP, plan.logcnt_LE, plan.log2phy_LER, num_gpus=5, num_nodes=1)
    swapped_LER = plan.log2phy_LER.clone()
    swapped_LER[0, [0, 1]] = swapped_LER[0, [1, 0]]
    with pytest.raises(ValueError):
        PlacementPlan(1, plan.phy2log_LP, plan.logcnt_LE, swapped_LER, plan.num_gpus, plan.num_nodes)
    with pytest.raises(ValueError, match="logical expert 3 has no replica in layer 0"):
        PlacementPlan.from_phy2log(1, torch.tensor([[0, 1, 2, 2]]), 4, num_gpus=2, num_nodes=1)


def test_plan_accepts_replicas_in_any_order():
    # the reference lists replicas by replica rank, not by physical id
    plan = PlacementPlan.from_phy2log(1, torch.tensor([[0, 1, 2, 0]]), 3, num_gpus=2, num_nodes=1)
    reordered = PlacementPlan(1, plan.phy2log_LP, plan.logcnt_LE, torch.tensor([[[3, 0], [1, -1], [2, -1]]]), 2, 1)
    assert reordered.replicas_of(0, 0) == [3, 0]


def test_diff_of_identical_plans_is_empty():
    assert diff_plans(_plan(1, seed=0), _plan(2, seed=0)) == []


def test_diff_applied_to_old_gives_new():
    old, new = _plan(1, seed=0), _plan(2, seed=1)
    moves = diff_plans(old, new)
    assert moves and all(m.drop_logical != m.load_logical for m in moves)
    assert torch.equal(apply_moves(old.phy2log_LP, moves), new.phy2log_LP)
    assert all((m.gpu, m.slot) == (new.gpu_of(m.physical), new.slot_of(m.physical)) for m in moves)
    grouped = moves_by_layer(moves)
    assert sorted(grouped) == sorted({m.layer for m in moves})
    assert [m for layer in sorted(grouped) for m in grouped[layer]] == moves
    with pytest.raises(ValueError, match="stale plan"):
        apply_moves(new.phy2log_LP, moves)


def test_diff_exact_and_shape_mismatch():
    old = PlacementPlan.from_phy2log(1, torch.tensor([[0, 1, 2, 0]]), 3, num_gpus=2, num_nodes=1)
    new = PlacementPlan.from_phy2log(2, torch.tensor([[0, 1, 2, 2]]), 3, num_gpus=2, num_nodes=1)
    assert diff_plans(old, new) == [ExpertMove(layer=0, physical=3, gpu=1, slot=1, drop_logical=0, load_logical=2)]
    other = PlacementPlan.from_phy2log(2, torch.tensor([[0, 1, 2, 0, 1, 2]]), 3, num_gpus=2, num_nodes=1)
    with pytest.raises(ValueError, match="plans differ"):
        diff_plans(old, other)


def test_logical_to_physical_docstring_example():
    log2phy_LER, logcnt_LE = logical_to_physical(torch.tensor([[0, 1, 2, 0], [2, 0, 1, 2]]), 3)
    assert log2phy_LER.tolist() == [[[0, 3], [1, -1], [2, -1]], [[1, -1], [2, -1], [0, 3]]]
    assert logcnt_LE.tolist() == [[2, 1, 1], [1, 1, 2]]


# ---- mirrored placement ------------------------------------------------------------------------
def _groups_per_node(plan: PlacementPlan, layer: int, per_group: int) -> list[list[int]]:
    """For each node of ``plan``: the groups it holds, after checking each is whole and held once."""
    per_node = plan.phy2log_LP.shape[1] // plan.num_nodes
    out = []
    for node in range(plan.num_nodes):
        experts = sorted(plan.phy2log_LP[layer, node * per_node:(node + 1) * per_node].tolist())
        groups = sorted({e // per_group for e in experts})
        assert experts == [e for g in groups for e in range(g * per_group, (g + 1) * per_group)], (node, experts)
        out.append(groups)
    return out


def test_mirrored_layout_holds_every_group_whole_on_two_nodes():
    plan = plan_mirrored(None, version=1, num_groups=3, num_nodes=3, num_gpus=6, num_logical=12, num_layers=2)
    assert plan.phy2log_LP[0].tolist() == [0, 1, 2, 3, 8, 9, 10, 11,  # node 0: group 0, mirror of group 2
                                           4, 5, 6, 7, 0, 1, 2, 3,  # node 1: group 1, mirror of group 0
                                           8, 9, 10, 11, 4, 5, 6, 7]  # node 2: group 2, mirror of group 1
    assert _groups_per_node(plan, 0, 4) == [[0, 2], [0, 1], [1, 2]]
    assert (plan.logcnt_LE == 2).all() and plan.num_nodes == 3 and plan.num_gpus == 6


@pytest.mark.parametrize("shape, message", [
    (dict(num_groups=4, num_nodes=1, num_gpus=2), "needs >= 2 nodes"),
    (dict(num_groups=4, num_nodes=3, num_gpus=6), "not a multiple of 3 nodes"),
    (dict(num_groups=4, num_nodes=2, num_gpus=5), "do not spread evenly"),
    (dict(num_groups=4, num_nodes=2, num_gpus=6), "not divisible by 3 slots per node"),
])
def test_mirrored_layout_refuses_shapes_it_cannot_cover(shape, message):
    assert message in mirrored_misfit(8, **shape)
    with pytest.raises(ValueError, match=message):
        plan_mirrored(None, version=1, num_logical=8, num_layers=1, **shape)
    assert "the slots hold 12" in mirrored_misfit(8, 4, 2, 4, num_replicas=12)  # a slot set of another size
    assert mirrored_misfit(8, 4, 2, 4, num_replicas=16) is None


def test_load_aware_mirrored_plan_keeps_the_node_map_and_balances_slots():
    torch.manual_seed(0)
    E, G, N, D, L = 16, 4, 2, 4, 3
    load = torch.rand(L, E) + 0.1
    load[:, 0:2] = 20.0  # experts 0 and 1 hot: id order puts both on node 0's first slot
    static = plan_mirrored(None, version=1, num_groups=G, num_nodes=N, num_gpus=D, num_logical=E, num_layers=L)
    plan = plan_mirrored(load, version=2, num_groups=G, num_nodes=N, num_gpus=D)
    for layer in range(L):
        assert _groups_per_node(plan, layer, E // G) == _groups_per_node(static, layer, E // G)
        for node in range(N):  # the same experts on each node, only their slots change
            half = slice(node * E, (node + 1) * E)
            assert sorted(plan.phy2log_LP[layer, half].tolist()) == sorted(static.phy2log_LP[layer, half].tolist())
    before, after = balancedness(load, static.phy2log_LP, static.logcnt_LE, D), \
        balancedness(load, plan.phy2log_LP, plan.logcnt_LE, D)
    assert (after > before + 0.2).all(), (before, after)
    for layer in range(L):  # the two hot experts on different slots of each node
        slots = {p // (2 * E // D) for p in range(2 * E) if plan.phy2log_LP[layer, p] in (0, 1)}
        assert len(slots) == 4
