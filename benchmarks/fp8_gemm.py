"""FP8 block-scaled GEMM throughput vs BF16 matmul.

Times (median of `repeats` runs after `warmup` runs) for y[M, N] = x[M, K] @ w[N, K].T:
  bf16                  torch.matmul on BF16 operands (the baseline)
  fp8_emulated          expertmesh fp8_gemm, backend="emulated" (FP8 blocks upcast to FP32)
  fp8_scaled_mm         expertmesh fp8_gemm, backend="scaled_mm" (per-K-block torch._scaled_mm)
  scaled_mm_tensorwise  one torch._scaled_mm with tensor-wise scales (reference; no block scaling)
FP8 timings exclude quantization: x and w are quantized once before timing, as in DeepGEMM's
benchmarks. Rates are 2·M·N·K / median seconds.

Usage:
  python benchmarks/fp8_gemm.py [--device cpu|cuda] [--repeats 5] [--shapes 256x512x1024 ...]
As a module (benchmarks/ on sys.path):
  from fp8_gemm import measure_gemm; measure_gemm(256, 512, 1024)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable

import torch

from expertmesh.model.fp8 import FP8_DTYPE, fp8_backend, fp8_gemm, quantize_activation, quantize_weight

DEFAULT_SHAPES_MNK = ((256, 512, 1024), (1024, 1024, 1024), (2048, 2048, 2048))
DEFAULT_REPEATS = 5
DEFAULT_WARMUP = 1
COLUMNS = ("bf16", "fp8_emulated", "fp8_scaled_mm", "scaled_mm_tensorwise")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_s(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times_s = []
    for _ in range(repeats):
        _sync(device)
        start_s = time.perf_counter()
        fn()
        _sync(device)
        times_s.append(time.perf_counter() - start_s)
    return statistics.median(times_s)


def _tensorwise_scaled_mm(x: torch.Tensor, w: torch.Tensor) -> Callable[[], torch.Tensor] | None:
    """A closure running one tensor-wise-scaled torch._scaled_mm, or None when unsupported."""
    if not hasattr(torch, "_scaled_mm"):
        return None
    scale_x = (x.abs().amax() / 448.0).float()  # []
    scale_w = (w.abs().amax() / 448.0).float()  # []
    x_fp8 = (x / scale_x).to(FP8_DTYPE)  # [M, K]
    w_fp8 = (w / scale_w).to(FP8_DTYPE)  # [N, K], .t() is column-major [K, N]

    def run() -> torch.Tensor:
        return torch._scaled_mm(x_fp8, w_fp8.t(), scale_a=scale_x, scale_b=scale_w, out_dtype=torch.bfloat16)

    try:
        run()
    except Exception:  # unsupported build/device/shape: leave the column empty
        return None
    return run


def measure_gemm(
    m: int,
    n: int,
    k: int,
    device: str = "cpu",
    repeats: int = DEFAULT_REPEATS,
    warmup: int = DEFAULT_WARMUP,
    seed: int = 0,
) -> dict:
    """Time BF16 matmul vs fp8_gemm (each backend available) for [M, K] @ [N, K].T.

    Returns {"m", "n", "k", "device", "active_backend", "median_s": {name: s},
    "tflops": {name: TFLOP/s}, "ratio_vs_bf16": {name: tflops / bf16 tflops}}; names
    that cannot run here are absent.
    """
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(m, k, device=dev, generator=gen)  # [M, K]
    w = torch.randn(n, k, device=dev, generator=gen) * 0.05  # [N, K]
    x_bf16, w_bf16 = x.bfloat16(), w.bfloat16()
    x_q = quantize_activation(x)
    w_fp8, w_scale_inv = quantize_weight(w)
    active = fp8_backend(dev)

    runs: dict[str, Callable[[], object]] = {
        "bf16": lambda: torch.matmul(x_bf16, w_bf16.t()),
        "fp8_emulated": lambda: fp8_gemm(x_q, w_fp8, w_scale_inv, backend="emulated"),
    }
    if active == "scaled_mm":
        runs["fp8_scaled_mm"] = lambda: fp8_gemm(x_q, w_fp8, w_scale_inv, backend="scaled_mm")
    tensorwise = _tensorwise_scaled_mm(x, w)
    if tensorwise is not None:
        runs["scaled_mm_tensorwise"] = tensorwise

    flop = 2.0 * m * n * k
    median_s = {name: _median_s(fn, dev, repeats, warmup) for name, fn in runs.items()}
    tflops = {name: flop / s / 1e12 for name, s in median_s.items()}
    ratio = {name: rate / tflops["bf16"] for name, rate in tflops.items()}
    return {
        "m": m, "n": n, "k": k, "device": str(dev), "active_backend": active,
        "median_s": median_s, "tflops": tflops, "ratio_vs_bf16": ratio,
    }


def _parse_shape(text: str) -> tuple[int, int, int]:
    m, n, k = (int(part) for part in text.lower().split("x"))
    return m, n, k


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS)
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP)
    parser.add_argument("--shapes", nargs="+", type=_parse_shape, default=list(DEFAULT_SHAPES_MNK),
                        help="MxNxK, e.g. 256x512x1024")
    args = parser.parse_args(argv)

    print(f"$ python {' '.join(sys.argv if argv is None else ['benchmarks/fp8_gemm.py', *argv])}")
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    print(f"torch {torch.__version__}, device {name}, active fp8 backend: {fp8_backend(args.device)}")
    print(f"median of {args.repeats} runs after {args.warmup} warm-up; TFLOP/s (ratio vs bf16)")
    header = f"{'M x N x K':>16} | " + " | ".join(f"{c:>22}" for c in COLUMNS)
    print(header)
    print("-" * len(header))
    for m, n, k in args.shapes:
        result = measure_gemm(m, n, k, args.device, args.repeats, args.warmup)
        cells = []
        for col in COLUMNS:
            if col in result["tflops"]:
                cells.append(f"{result['tflops'][col]:>12.4f} ({result['ratio_vs_bf16'][col]:5.2f}x)")
            else:
                cells.append(f"{'n/a':>22}")
        print(f"{f'{m}x{n}x{k}':>16} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
