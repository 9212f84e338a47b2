"""EPLB balancedness and speed on DeepSeek-V3 shapes: no redundancy, naive, plain greedy, ours.

    .venv/bin/python benchmarks/bench_eplb.py            # ~30 s on 2 cores
    .venv/bin/python benchmarks/bench_eplb.py --seeds 2  # quicker

balancedness = mean(load per GPU) / max(load per GPU) per layer (1.0 = perfect); the table shows
its median over seeds x layers. Methods:
  no-redund  P = E = 256, experts laid out contiguously (8 per GPU on 32 GPUs)
  naive      experts in order, redundant slots filled with experts 0, 1, 2, ... (no load awareness)
  greedy     rebalance_experts(..., refinement=None): DeepSeek's reference algorithm (hierarchical
             packing + min-max replication + greedy packing), reimplemented
  ours       rebalance_experts(...) with the default Refinement (swaps, spread, allocation search)
  ceiling    the best any placement can do while each group stays whole on one node (the
             hierarchical policy's rule) with the node assignment ours chose:
             mean(node load) / max(node load). With 1 group per node it is fixed by the load.
Loads (per layer, 256 experts; ranks shuffled per layer):
  lognormal  exp(N(0, sigma=1.0)) per expert
  zipf       load proportional to 1 / rank (s = 1.0): the top expert carries 16% of all load
  zipf-top8  4096 tokens per layer, each picks 8 distinct experts with P proportional to 1 / rank
             (top-8 routing caps an expert at one pick per token: top expert ~7% of picks)
Shapes: 256 logical experts, 8 groups, physical 288 and 320, (4 nodes, 32 GPUs) and (8 nodes, 64 GPUs).
288 physical on 64 GPUs is not a valid shape (288 % 64 != 0) and is skipped.
"""

from __future__ import annotations

import argparse
import functools
import shlex
import statistics
import sys
import time

import torch
from expertmesh.placement import balancedness, gpu_loads, naive_placement, no_redundancy_placement, rebalance_experts

NUM_LOGICAL = 256
NUM_GROUPS = 8
SHAPES = [  # (physical, nodes, gpus)
    (288, 4, 32),
    (320, 4, 32),
    (288, 8, 64),
    (320, 8, 64),
]
LOAD_KINDS = ["lognormal", "zipf", "zipf-top8"]
TOKENS_PER_LAYER = 4096
TOPK = 8


def make_loads(kind: str, num_layers: int, seed: int) -> torch.Tensor:
    """Synthetic per-expert load, float64 [L, E]."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "lognormal":
        return torch.exp(torch.randn(num_layers, NUM_LOGICAL, generator=gen, dtype=torch.float64)) * 1000
    inv_rank_E = 1.0 / torch.arange(1, NUM_LOGICAL + 1, dtype=torch.float64)
    prob_LE = torch.stack([inv_rank_E[torch.randperm(NUM_LOGICAL, generator=gen)] for _ in range(num_layers)])
    prob_LE = prob_LE / prob_LE.sum(dim=-1, keepdim=True)
    if kind == "zipf":
        return prob_LE * 1e6
    # zipf-top8: sampling 8 experts without replacement = top-8 of log p + Gumbel noise
    load_LE = torch.zeros(num_layers, NUM_LOGICAL, dtype=torch.float64)
    for layer in range(num_layers):
        uniform_TE = torch.rand(TOKENS_PER_LAYER, NUM_LOGICAL, generator=gen).clamp_min(1e-12)
        keys_TE = prob_LE[layer].log().float() - torch.log(-torch.log(uniform_TE))
        picks_TK = keys_TE.topk(TOPK, dim=-1).indices
        load_LE[layer] = torch.bincount(picks_TK.flatten(), minlength=NUM_LOGICAL).double()
    return load_LE


def node_ceiling(
    load_LE: torch.Tensor, phy2log_LP: torch.Tensor, logcnt_LE: torch.Tensor, num_nodes: int, num_gpus: int
) -> torch.Tensor:
    node_load_LN = gpu_loads(load_LE, phy2log_LP, logcnt_LE, num_gpus).view(load_LE.shape[0], num_nodes, -1).sum(dim=-1)
    return node_load_LN.mean(dim=-1) / node_load_LN.max(dim=-1).values


def median_ms(fn, repeats: int) -> float:
    times_s = []
    for _ in range(repeats):
        start_s = time.perf_counter()
        fn()
        times_s.append(time.perf_counter() - start_s)
    return statistics.median(times_s) * 1e3


def run_table(args: argparse.Namespace, loads: dict, num_groups: int, timings: list | None) -> None:
    header = (
        f"{'shape P/N/gpus':<15}{'load':<11}{'no-redund':>10}{'naive':>8}{'greedy':>8}{'ours':>8}{'ceiling':>9}"
        f"{'ours/naive':>11}{'greedy/naive':>13}{'ours/greedy':>12}{'worst-layer g->o':>18}"
    )
    print(header)
    print("-" * len(header))
    for num_physical, num_nodes, num_gpus in SHAPES:
        shape = f"{num_physical}/{num_nodes}/{num_gpus}"
        if num_physical % num_gpus:
            print(f"{shape:<15}skipped: {num_physical} physical % {num_gpus} GPUs != 0 (slots per GPU must be whole)")
            continue
        naive = naive_placement(NUM_LOGICAL, num_physical, num_gpus, num_layers=args.layers)
        bare = no_redundancy_placement(NUM_LOGICAL, num_gpus, num_layers=args.layers)
        for kind in LOAD_KINDS:
            scores: dict[str, list[torch.Tensor]] = {m: [] for m in ("bare", "naive", "greedy", "ours", "ceiling")}
            for seed in range(args.seeds):
                load_LE = loads[(kind, seed)]
                greedy = rebalance_experts(load_LE, num_physical, num_groups, num_nodes, num_gpus, refinement=None)
                ours = rebalance_experts(load_LE, num_physical, num_groups, num_nodes, num_gpus)
                scores["bare"].append(balancedness(load_LE, bare[0], bare[2], num_gpus))
                scores["naive"].append(balancedness(load_LE, naive[0], naive[2], num_gpus))
                scores["greedy"].append(balancedness(load_LE, greedy[0], greedy[2], num_gpus))
                scores["ours"].append(balancedness(load_LE, ours[0], ours[2], num_gpus))
                scores["ceiling"].append(node_ceiling(load_LE, ours[0], ours[2], num_nodes, num_gpus))
            flat = {m: torch.cat(v) for m, v in scores.items()}
            med = {m: float(v.median()) for m, v in flat.items()}
            ceiling = f"{med['ceiling']:>9.4f}" if num_groups % num_nodes == 0 and num_groups > 1 else f"{'-':>9}"
            worst = int(flat["greedy"].argmin())
            print(
                f"{shape:<15}{kind:<11}{med['bare']:>10.4f}{med['naive']:>8.4f}{med['greedy']:>8.4f}{med['ours']:>8.4f}"
                f"{ceiling}{med['ours'] / med['naive']:>11.3f}{med['greedy'] / med['naive']:>13.3f}"
                f"{med['ours'] / med['greedy']:>12.4f}"
                f"{flat['greedy'][worst].item():>11.3f}->{flat['ours'][worst].item():.3f}"
            )
        if timings is not None:
            load_LE = loads[("lognormal", 0)]
            call = functools.partial(rebalance_experts, load_LE, num_physical, num_groups, num_nodes, num_gpus)
            greedy_ms = median_ms(functools.partial(call, refinement=None), args.timing_repeats)
            ours_ms = median_ms(call, args.timing_repeats)
            timings.append((shape, greedy_ms, ours_ms))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="load samples per (shape, load kind)")
    parser.add_argument("--layers", type=int, default=58, help="MoE layers per sample (DeepSeek-V3: 58)")
    parser.add_argument("--timing-repeats", type=int, default=5, help="rebalance_experts calls per timing")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(
        f"E={NUM_LOGICAL} logical, {NUM_GROUPS} groups, {args.layers} layers x {args.seeds} seeds per row, "
        f"torch threads={args.threads}; balancedness median over seeds x layers\n"
    )
    loads = {(kind, seed): make_loads(kind, args.layers, seed) for kind in LOAD_KINDS for seed in range(args.seeds)}

    timings = []
    print(f"hierarchical policy: {NUM_GROUPS} groups, each group (and its replicas) kept on one node")
    run_table(args, loads, NUM_GROUPS, timings)
    print("\nglobal policy for reference: num_groups=1, replicas may go to any GPU (no node limit)")
    run_table(args, loads, 1, None)

    print(
        f"\nrebalance_experts wall time, hierarchical policy, {args.layers} layers "
        f"(median of {args.timing_repeats} calls, lognormal load, CPU):"
    )
    for shape, greedy_ms, ours_ms in timings:
        print(f"  {shape:<12} greedy {greedy_ms:7.1f} ms   ours {ours_ms:7.1f} ms")
    print(
        "\nworst-layer g->o: the layer where plain greedy is least balanced, greedy -> ours."
        "\nceiling < 1 is the cost of keeping groups whole on nodes (node-limited routing), not of the packer."
    )


if __name__ == "__main__":
    main()
