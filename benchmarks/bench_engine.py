"""Engine throughput vs transformers: ``LLM.generate`` against ``DeepseekV3ForCausalLM.generate``.

    .venv/bin/python benchmarks/bench_engine.py [--model CHECKPOINT] [--batches 1 16] [--prompts 128 1024]

Same checkpoint, same machine, same run: greedy decoding of ``--new-tokens`` tokens for a
batch of prompts of the given length; output tokens/s of each side (wall time includes
prefill) and the ratio ours/transformers. Also the KV-cache bytes each side holds per
token. Without ``--model``, a random model of the demo preset's shape is used (speed does not
depend on the weights).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch


def demo_shaped_checkpoint(path: Path) -> Path:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from expertmesh.train.spec import preset

    if not (path / "config.json").exists():
        hf = preset("demo").to_hf_config_dict()
        hf["max_position_embeddings"] = max(hf["max_position_embeddings"], 2048)  # room for 1024 + 128
        torch.manual_seed(0)
        DeepseekV3ForCausalLM(DeepseekV3Config(**hf)).save_pretrained(path)
    return path


def hf_cache_bytes_per_token(cache) -> float:
    total, tokens = 0, 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None and t.numel():
                total += t.numel() * t.element_size()
        tokens = max(tokens, layer.keys.shape[0] * layer.keys.shape[-2])
    return total / tokens


def time_ours(llm, prompts, new_tokens: int) -> float:
    from expertmesh.engine import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    assert all(len(o.token_ids) == new_tokens for o in outs)
    return elapsed


@torch.inference_mode()
def time_hf(hf, prompts, new_tokens: int) -> tuple[float, float]:
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    out = hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                      return_dict_in_generate=True, pad_token_id=0)
    elapsed = time.perf_counter() - start
    return elapsed, hf_cache_bytes_per_token(out.past_key_values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompts", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per cell (median)")
    args = ap.parse_args()
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")

    from transformers import DeepseekV3ForCausalLM
    from transformers.utils import logging as hf_logging

    from expertmesh import paths
    from expertmesh.engine import LLM

    hf_logging.set_verbosity_error()
    # speed does not depend on the weights; the demo's shapes with room for 1024 + 128 positions
    path = args.model or demo_shaped_checkpoint(paths.home() / "bench" / "demo-shaped-random")
    print(f"checkpoint: {path}")
    hf = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    vocab = hf.config.vocab_size
    gen = torch.Generator().manual_seed(0)

    rows = []
    for prompt_len in args.prompts:
        for batch in args.batches:
            prompts = torch.randint(3, vocab, (batch, prompt_len), generator=gen).tolist()
            ours = {}
            for cache in ("fp32", "fp8"):
                llm = LLM(path, kv_cache_dtype=cache, max_num_seqs=max(args.batches),
                          max_model_len=prompt_len + args.new_tokens + 16, max_num_batched_tokens=2048)
                time_ours(llm, prompts[:1], 4)  # warm-up
                ours[cache] = statistics.median(time_ours(llm, prompts, args.new_tokens) for _ in range(args.repeats))
                ours[cache + "_bytes"] = llm.engine.layout.bytes_per_token
                del llm
                gc.collect()
            time_hf(hf, prompts[:1], 4)
            hf_runs = [time_hf(hf, prompts, args.new_tokens) for _ in range(args.repeats)]
            hf_s, hf_bytes = statistics.median(r[0] for r in hf_runs), hf_runs[0][1]
            toks = batch * args.new_tokens
            rows.append((prompt_len, batch, toks / hf_s, toks / ours["fp32"], toks / ours["fp8"], hf_bytes,
                         ours["fp32_bytes"], ours["fp8_bytes"]))
            r = rows[-1]
            print(f"  prompt {prompt_len:>5} batch {batch:>3}: transformers {r[2]:8.1f} tok/s | ours fp32 cache "
                  f"{r[3]:8.1f} tok/s ({r[3] / r[2]:.2f}x) | ours fp8 cache {r[4]:8.1f} tok/s ({r[4] / r[2]:.2f}x)",
                  flush=True)

    print("\n| prompt | batch | transformers tok/s | ours (fp32 cache) | ratio | ours (fp8 cache) | ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for p, b, h, o32, o8, *_ in rows:
        print(f"| {p} | {b} | {h:.1f} | {o32:.1f} | {o32 / h:.2f}x | {o8:.1f} | {o8 / h:.2f}x |")
    hb, ob32, ob8 = rows[0][5], rows[0][6], rows[0][7]
    print(f"\nKV-cache bytes per token: transformers {hb:.0f} | ours fp32 {ob32} ({ob32 / hb:.2f}x) | "
          f"ours fp8 {ob8} ({ob8 / hb:.2f}x)")


if __name__ == "__main__":
    main()
