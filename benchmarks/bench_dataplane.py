"""Distributed data-plane benchmark: inter-node bytes vs naive expert parallelism, decode
throughput of the distributed path vs the single-process engine (overlap on/off), and
per-layer dispatch+combine latency.

    .venv/bin/python benchmarks/bench_dataplane.py [--tokens 512] [--batch 8] [--new-tokens 32]

(1) uses the real router code over a byte-counting transport (no network needed): every
message is the protobuf that would cross the wire. (2) and (3) start a 3-node local Ray
cluster (raylets on this machine) and measure end to end.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from expertmesh.model import ModelConfig
from expertmesh.model.moe import Gate
from expertmesh.placement import plan_placement
from expertmesh.protos import load
from expertmesh.services import wire
from expertmesh.services.router.router import Router, RouterConfig

shard_pb = load("expert_shard_pb2")


class CountingTransport:
    """Answers every dispatch with zeros of the right shape, so byte counts are exact."""

    def send(self, node, request, forwarders=None):
        rows, dim = request.hidden.shape
        return shard_pb.ExpertResponse(partial=wire.encode(torch.zeros(rows, dim, dtype=torch.bfloat16)))

    def result(self, handle):
        return handle


def simulated_routing(name: str, n_experts: int, top_k: int, n_group: int, topk_group: int, nodes: int,
                      hidden: int, tokens: int, skew: float, seed: int = 0) -> dict:
    cfg = ModelConfig(vocab_size=8, hidden_size=64, intermediate_size=8, moe_intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=1, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                      n_routed_experts=n_experts, num_experts_per_tok=top_k, n_group=n_group, topk_group=topk_group,
                      n_shared_experts=1, routed_scaling_factor=2.5)
    g = torch.Generator().manual_seed(seed)
    gate = Gate(cfg)
    gate.weight.data.normal_(0, 0.5, generator=g)
    # skewed popularity: a lognormal per-expert offset on the gate's bias (selection only)
    gate.e_score_correction_bias.copy_(torch.randn(n_experts, generator=g) * skew * 0.1)
    choice = gate(torch.randn(tokens, 64, generator=g))
    load_LE = torch.bincount(choice.topk_ids_TK.flatten(), minlength=n_experts).float()[None]
    plan = plan_placement(load_LE, version=1, num_replicas=n_experts + nodes * 4, num_groups=n_group,
                          num_nodes=nodes, num_gpus=nodes * 4)
    rows = {}
    for dispatch in ("fp8", "bf16"):
        router = Router(plan, [0], hidden, source_node=0, transport=CountingTransport(),
                        config=RouterConfig(max_nodes_per_token=topk_group, dispatch_dtype=dispatch,
                                            combine_dtype="bfloat16"))
        x = torch.randn(tokens, hidden, generator=g)
        router.route(0, x, choice.topk_ids_TK, choice.topk_weights_TK)
        c = router.counters
        rows[dispatch] = (c.dispatch_inter_node_bytes / tokens, c.naive_dispatch_inter_node_bytes / tokens,
                          c.inter_node_bytes / tokens, c.naive_inter_node_bytes / tokens, c.max_nodes_per_token)
    print(f"  {name}: {n_experts} experts, top-{top_k}, {n_group} groups over {nodes} nodes, M={topk_group}, "
          f"hidden {hidden}, {tokens} tokens, max nodes/token {rows['fp8'][4]}")
    print(f"    {'dispatch':<10}{'ours B/tok':>12}{'naive B/tok':>13}{'ratio':>8} | {'+combine ours':>14}"
          f"{'naive':>10}{'ratio':>8}")
    for d, (ours, naive, ours_all, naive_all, _) in rows.items():
        print(f"    {d:<10}{ours:>12.0f}{naive:>13.0f}{ours / naive:>7.2f}x | {ours_all:>14.0f}{naive_all:>10.0f}"
              f"{ours_all / naive_all:>7.2f}x")
    return rows


def end_to_end(batch: int, new_tokens: int, prompt_len: int) -> None:
    from expertmesh.engine import LLM, SamplingParams
    from expertmesh.model import build_model, save_pretrained
    from expertmesh.services.dataplane import DataPlane, DataPlaneConfig

    cfg = ModelConfig(vocab_size=2048, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                      num_hidden_layers=4, num_attention_heads=4, kv_lora_rank=64, q_lora_rank=128,
                      qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=12,
                      n_shared_experts=1, num_experts_per_tok=4, n_group=3, topk_group=2, first_k_dense_replace=1,
                      routed_scaling_factor=2.5, max_position_embeddings=1024)
    path = Path(tempfile.mkdtemp(prefix="bench-dp-")) / "ckpt"
    model = build_model(cfg)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    save_pretrained(model, path)
    prompts = torch.randint(3, cfg.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    llm = LLM(path)
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0))
    start = time.perf_counter()
    llm.generate(prompts, params)
    single = batch * new_tokens / (time.perf_counter() - start)
    print(f"\n(2) decode throughput, 3 local Ray nodes, batch {batch}, prompt {prompt_len}, {new_tokens} new tokens")
    print(f"  single-process engine: {single:8.1f} tok/s (1.00x)")
    results = {}
    plane = None
    for overlap in (False, True):
        cfg_dp = DataPlaneConfig(str(path), num_nodes=3, slots_per_node=1, dispatch_dtype="fp8", overlap=overlap,
                                 combine_dtype="bfloat16")
        plane = DataPlane.start(cfg_dp)
        plane.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0))
        plane.router_stats(reset=True)
        start = time.perf_counter()
        plane.generate(prompts, params)
        results[overlap] = batch * new_tokens / (time.perf_counter() - start)
        stats = plane.router_stats()
        for actor in plane.attention + plane.shards:
            import ray

            ray.kill(actor)
        print(f"  distributed, overlap {'on ' if overlap else 'off'}: {results[overlap]:8.1f} tok/s "
              f"({results[overlap] / single:.2f}x single)")
        if overlap:
            print("\n(3) per-layer dispatch+combine latency (ms), overlap on")
            for layer, p50, p99 in zip(sorted(l.layer for l in stats.load), stats.latency_ms_p50,
                                       stats.latency_ms_p99):
                print(f"  layer {layer}: p50 {p50:6.2f}  p99 {p99:6.2f}")
            print(f"  demo-shaped model, live counters: dispatch {stats.dispatch_inter_node_bytes / stats.tokens:.0f}"
                  f" B/token/layer vs naive {stats.naive_dispatch_inter_node_bytes / stats.tokens:.0f} "
                  f"({stats.dispatch_inter_node_bytes / stats.naive_dispatch_inter_node_bytes:.2f}x)")
    print(f"  overlap on / off: {results[True] / results[False]:.2f}x")
    if plane is not None and plane.local_cluster is not None:
        import ray

        ray.shutdown()
        plane.local_cluster.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--skip-e2e", action="store_true")
    args = ap.parse_args()
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]))
    print("\n(1) inter-node bytes per token per MoE layer (source node 0; naive = BF16, one copy per remote expert)")
    simulated_routing("DeepSeek-V3 routing", 256, 8, 8, 4, 8, 7168, args.tokens, skew=1.0)
    simulated_routing("demo-like routing", 16, 4, 4, 2, 4, 256, args.tokens, skew=1.0)
    if not args.skip_e2e:
        end_to_end(args.batch, args.new_tokens, args.prompt_len)


if __name__ == "__main__":
    main()
