"""Engine throughput vs transformers: ``LLM.generate`` against ``DeepseekV3ForCausalLM.generate``.

    .venv/bin/python benchmarks/bench_engine.py [--model CHECKPOINT] [--batches 1 16] [--prompts 128 1024]
        [--dtypes fp32 bf16] [--repeats 3] [--threads N]

Same checkpoint, same process, same torch thread count, same compute dtype on both sides:
greedy decoding of ``--new-tokens`` tokens for a batch of random prompts of the given length;
output tokens/s of each side (wall time includes prefill) and the ratio ours/transformers.
transformers runs its normal ``generate`` (default cache, ``use_cache=True``, greedy, under
``torch.inference_mode``). Every repetition uses fresh prompts (the same for every side), so
the engine's prefix cache never serves a repeated prompt; the sides alternate within each
repetition (the order flips every repetition) and each cell reports the median of
``--repeats`` runs, because this machine is shared and noisy: the ratio is what counts.
Also the KV-cache bytes each side holds per token. Without ``--model``, a random model of the
demo preset's shape is used (speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def demo_shaped_checkpoint(path: Path) -> Path:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from expertmesh.train.spec import preset

    if not (path / "config.json").exists():
        hf = preset("demo").to_hf_config_dict()
        hf["max_position_embeddings"] = max(hf["max_position_embeddings"], 2048)  # room for 1024 + 128
        torch.manual_seed(0)
        DeepseekV3ForCausalLM(DeepseekV3Config(**hf)).save_pretrained(path)
    return path


def cpu_model() -> str:
    """The CPU's model name and vendor from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    import platform

    from expertmesh.model.layers import CPU_VENDOR, cpuinfo_field

    name = cpuinfo_field("model name") or platform.processor() or "unknown"
    return f"{name} ({CPU_VENDOR or 'vendor unknown'})"


def hf_cache_bytes_per_token(cache) -> float:
    """Bytes per token of transformers' cache, over all layers (its MLA caches keys and values)."""
    total, tokens = 0, 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None and t.numel():
                total += t.numel() * t.element_size()
        tokens = max(tokens, layer.keys.shape[0] * layer.keys.shape[-2])  # [B, heads, T, dim]
    return total / tokens


def time_ours(llm, prompts: list[list[int]], new_tokens: int) -> float:
    from expertmesh.engine import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    assert all(len(o.token_ids) == new_tokens for o in outs)
    return elapsed


@torch.inference_mode()
def time_hf(hf, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    out = hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                      return_dict_in_generate=True, pad_token_id=0)
    elapsed = time.perf_counter() - start
    assert out.sequences.shape[1] == ids.shape[1] + new_tokens
    return elapsed, hf_cache_bytes_per_token(out.past_key_values)


@dataclass
class Cell:
    dtype: str
    prompt_len: int
    batch: int
    new_tokens: int
    hf_s: list[float]
    ours_s: list[float]  # cache in the compute dtype
    fp8_s: list[float]  # FP8 cache

    def tok_s(self, runs: list[float]) -> float:
        return self.batch * self.new_tokens / statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompts", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per cell and side (median)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print("command: " + " ".join([".venv/bin/python", *sys.argv]))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()} (both sides)")
    print(f"cpu: {cpu_model()}")  # the kernel choices, and so the ratios, depend on it (``model/layers.py``)

    from transformers import DeepseekV3ForCausalLM
    from transformers import __version__ as hf_version
    from transformers.utils import logging as hf_logging

    from expertmesh import paths
    from expertmesh.engine import LLM

    hf_logging.set_verbosity_error()
    print(f"transformers {hf_version}")
    # speed does not depend on the weights; the demo's shapes with room for 1024 + 128 positions
    path = args.model or demo_shaped_checkpoint(paths.home() / "bench" / "demo-shaped-random")
    print(f"checkpoint: {path}")
    max_len = max(args.prompts) + args.new_tokens + 16
    gen = torch.Generator().manual_seed(0)
    cells: list[Cell] = []
    kv_bytes: dict[str, float] = {}
    for dtype in args.dtypes:
        hf = DeepseekV3ForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).eval()
        ours = {cache: LLM(path, dtype=dtype, kv_cache_dtype=cache, max_num_seqs=max(args.batches),
                           max_model_len=max_len, max_num_batched_tokens=2048)
                for cache in (dtype, "fp8")}
        kv_bytes.update({f"ours {c}": llm.engine.layout.bytes_per_token for c, llm in ours.items()})
        vocab = hf.config.vocab_size
        for prompt_len in args.prompts:
            for batch in args.batches:
                warm = torch.randint(3, vocab, (1, prompt_len), generator=gen).tolist()
                time_hf(hf, warm, 4)
                for llm in ours.values():
                    time_ours(llm, warm, 4)
                cell = Cell(dtype, prompt_len, batch, args.new_tokens, [], [], [])
                for rep in range(args.repeats):
                    prompts = torch.randint(3, vocab, (batch, prompt_len), generator=gen).tolist()  # fresh each run
                    sides = [("hf", None), ("ours", ours[dtype]), ("fp8", ours["fp8"])]
                    for name, llm in sides if rep % 2 == 0 else sides[::-1]:
                        if llm is None:
                            elapsed, kv_bytes[f"transformers {dtype}"] = time_hf(hf, prompts, args.new_tokens)
                            cell.hf_s.append(elapsed)
                        else:
                            (cell.ours_s if name == "ours" else cell.fp8_s).append(time_ours(llm, prompts,
                                                                                             args.new_tokens))
                cells.append(cell)
                h, o, f = cell.tok_s(cell.hf_s), cell.tok_s(cell.ours_s), cell.tok_s(cell.fp8_s)
                print(f"  {dtype} prompt {prompt_len:>5} batch {batch:>3}: transformers {h:8.1f} tok/s | ours "
                      f"{dtype} cache {o:8.1f} ({o / h:.2f}x) | ours fp8 cache {f:8.1f} ({f / h:.2f}x)", flush=True)
        del hf, ours

    print(f"\nmedian of {args.repeats} runs per cell, {args.new_tokens} new tokens, output tok/s incl. prefill\n")
    print("| compute dtype | prompt | batch | transformers tok/s | ours (cache = dtype) | ratio "
          "| ours (FP8 cache) | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for c in cells:
        h, o, f = c.tok_s(c.hf_s), c.tok_s(c.ours_s), c.tok_s(c.fp8_s)
        print(f"| {c.dtype} | {c.prompt_len} | {c.batch} | {h:.1f} | {o:.1f} | {o / h:.2f}x | {f:.1f} | {f / h:.2f}x |")
    print("\nKV-cache bytes per token (all layers):")
    for dtype in args.dtypes:
        hb = kv_bytes[f"transformers {dtype}"]
        print(f"  {dtype}: transformers {hb:.0f} | ours {dtype} {kv_bytes[f'ours {dtype}']} "
              f"({kv_bytes[f'ours {dtype}'] / hb:.2f}x) | ours fp8 {kv_bytes['ours fp8']} "
              f"({kv_bytes['ours fp8'] / hb:.2f}x)")


if __name__ == "__main__":
    main()
