"""Model-core benchmark: KV-cache bytes per token, absorbed vs naive MLA decode, FP8 vs BF16 GEMM.

    .venv/bin/python benchmarks/bench_model.py [--model CHECKPOINT] [--contexts 512 2048 8192]

Everything is measured in this run on this machine and printed as ratios against a
baseline measured in the same run (medians of repeated timings after a warm-up).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from fp8_gemm import measure_gemm  # noqa: E402

from expertmesh.model import ModelConfig, load_pretrained  # noqa: E402
from expertmesh.model.memory import DEEPSEEK_V3, kv_bytes_per_token  # noqa: E402
from expertmesh.model.mla import MLA, LatentKV  # noqa: E402


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def kv_table(name: str, config: ModelConfig) -> None:
    kv = kv_bytes_per_token(config)
    print(f"\n(a) KV-cache bytes per token, {name} ({config.num_hidden_layers} layers)")
    print(f"  {'layout':<28}{'bytes/token':>14}{'vs MLA BF16':>14}")
    rows = [("MLA latent, BF16", kv.mla_bf16), ("MLA latent, FP8 (+scales)", kv.mla_fp8),
            ("MLA latent, FP32", kv.mla_fp32), ("GQA-8 K/V, BF16", kv.gqa8_bf16), ("full MHA K/V, BF16", kv.mha_bf16)]
    for label, n in rows:
        print(f"  {label:<28}{n:>14,}{n / kv.mla_bf16:>13.2f}x")


@torch.inference_mode()
def attention_bench(contexts: list[int], batch: int, repeats: int, device: str) -> None:
    # one MLA layer with DeepSeek-V3's attention shapes (128 heads, latent 512 + rope 64)
    cfg = DEEPSEEK_V3
    mla = MLA(cfg).to(device=device, dtype=torch.bfloat16)
    for p in mla.parameters():
        p.data.normal_(0, 0.02)
    print(f"\n(b) decode attention, one MLA layer with V3 shapes (H={cfg.num_attention_heads}, "
          f"C={cfg.kv_lora_rank}, R={cfg.qk_rope_head_dim}), batch {batch}, BF16, {device}")
    print(f"  {'context':>8}{'naive ms':>12}{'absorbed ms':>14}{'naive/absorbed':>16}")
    for T in contexts:
        kv = LatentKV(torch.randn(batch, T, cfg.kv_lora_rank, device=device, dtype=torch.bfloat16),
                      torch.randn(batch, T, cfg.qk_rope_head_dim, device=device, dtype=torch.bfloat16))
        q_nope = torch.randn(batch, 1, cfg.num_attention_heads, cfg.qk_nope_head_dim, device=device,
                             dtype=torch.bfloat16)
        q_rope = torch.randn(batch, 1, cfg.num_attention_heads, cfg.qk_rope_head_dim, device=device,
                             dtype=torch.bfloat16)
        naive = median_time(lambda: mla.attend_naive(q_nope, q_rope, kv, None), repeats)
        absorbed = median_time(lambda: mla.attend_absorbed(q_nope, q_rope, kv, None), repeats)
        print(f"  {T:>8}{naive * 1e3:>12.2f}{absorbed * 1e3:>14.2f}{naive / absorbed:>15.1f}x")


def gemm_bench(device: str, repeats: int) -> None:
    print(f"\n(c) FP8 (1x128 / 128x128 block scales, FP32 accumulation) vs BF16 GEMM, {device}")
    print(f"  {'M x N x K':>18}{'bf16 TFLOP/s':>14}{'fp8 TFLOP/s':>14}{'fp8/bf16':>10}  fp8 path")
    for m, n, k in ((256, 512, 1024), (1024, 1024, 1024), (2048, 2048, 2048)):
        r = measure_gemm(m, n, k, device=device, repeats=repeats)
        best = max((b for b in r["tflops"] if b != "bf16" and b != "scaled_mm_tensorwise"),
                   key=lambda b: r["tflops"][b])
        print(f"  {f'{m}x{n}x{k}':>18}{r['tflops']['bf16']:>14.3f}{r['tflops'][best]:>14.3f}"
              f"{r['tflops'][best] / r['tflops']['bf16']:>9.2f}x  {best}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="checkpoint to account for (default: the demo checkpoint if present)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]))
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}")

    from expertmesh import paths

    model_path = args.model or (paths.demo_checkpoint() if (paths.demo_checkpoint() / "config.json").exists() else None)
    if model_path is not None:
        kv_table(f"loaded model {model_path}", load_pretrained(model_path).config)
    kv_table("DeepSeek-V3", DEEPSEEK_V3)
    attention_bench(args.contexts, args.batch, args.repeats, args.device)
    gemm_bench(args.device, args.repeats)


if __name__ == "__main__":
    main()
