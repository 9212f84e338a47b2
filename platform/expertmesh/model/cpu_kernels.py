"""Fused CPU kernels for inference, compiled from C++ on first use (as DeepSpeed builds its ops).

On CPU, eager PyTorch runs ``F.rms_norm`` as seven ATen kernels (pow, sum, div, add, rsqrt and two
multiplies). A decode step is bound by the number of such kernels: each costs 3-15 µs alone and
2-5x that right after a large GEMM has flushed the caches. One pass in C++ does the same work in
~3 µs (~15 µs after a GEMM) for a [16, 256] FP32 input; the 21 RMSNorms of a demo-model step
then cost a fraction of their eager time (whole ``generate``, A/B in one process: FP32 batch 1
1.14x, batch 16 1.05x).

The kernels are built with ``torch.utils.cpp_extension.load_inline`` (g++, cached under
``TORCH_EXTENSIONS_DIR``; ``make venv`` builds them once, later loads take ~0.1 s). Without a
compiler, or with ``EXPERTMESH_CPU_KERNELS=0``, :func:`kernels` returns None and callers keep
their eager path. Results agree with eager to rounding (the sum of squares is accumulated in
another order), not bit for bit.

    python -c "from expertmesh.model import cpu_kernels; print(cpu_kernels.status())"   # build or load
"""

from __future__ import annotations

import functools
import logging
import os
from types import ModuleType

import torch

log = logging.getLogger(__name__)

ENV_SWITCH = "EXPERTMESH_CPU_KERNELS"

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>

// y = w * (x * 1/sqrt(mean(x^2) + eps)) over the last dimension, float32; the same operations
// and roundings as the eager composite except the order in which the squares are summed.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat, "rms_norm: float32 CPU input expected");
  TORCH_CHECK(weight.dim() == 1 && weight.scalar_type() == torch::kFloat && weight.numel() == x.size(-1),
              "rms_norm: weight must be float32 [", x.size(-1), "]");
  auto xc = x.contiguous();
  auto wc = weight.contiguous();
  auto out = torch::empty_like(xc);
  const int64_t D = xc.size(-1);
  const int64_t rows = D ? xc.numel() / D : 0;
  const float* px = xc.data_ptr<float>();
  const float* pw = wc.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const float feps = static_cast<float>(eps);
  const float fD = static_cast<float>(D);
  // rows split over threads only when there is enough work to pay for waking them
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* a = px + r * D;
      float* o = po + r * D;
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < D; ++i) sum += a[i] * a[i];
      const float inv = 1.0f / std::sqrt(sum / fD + feps);
#pragma omp simd
      for (int64_t i = 0; i < D; ++i) o[i] = pw[i] * (a[i] * inv);
    }
  });
  return out;
}

// RoPE on x [N, G, R] (G heads sharing a position) with cos/sin [N, R/2] (last dim contiguous, any
// row stride): out[..., :R/2] = x1*cos - x2*sin, out[..., R/2:] = x2*cos + x1*sin, where (x1, x2)
// are the even and odd elements (interleaved) or the two halves. The eager ops' exact roundings.
torch::Tensor rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, bool interleave) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat && cos.scalar_type() == torch::kFloat &&
              sin.scalar_type() == torch::kFloat, "rope: float32 CPU tensors expected");
  TORCH_CHECK(x.dim() == 3 && cos.dim() == 2 && sin.sizes() == cos.sizes() && cos.size(0) == x.size(0) &&
              2 * cos.size(1) == x.size(2) && cos.stride(1) == 1 && sin.stride(1) == 1,
              "rope: x [N, G, R] with cos/sin [N, R/2] expected");
  auto xc = x.contiguous();
  auto out = torch::empty_like(xc);
  const int64_t N = xc.size(0), G = xc.size(1), R = xc.size(2), half = R / 2;
  const int64_t cs = cos.stride(0), ss = sin.stride(0);
  const float* px = xc.data_ptr<float>();
  const float* pc = cos.data_ptr<float>();
  const float* ps = sin.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const int64_t step = interleave ? 2 : 1, second = interleave ? 1 : half;
  at::parallel_for(0, N, std::max<int64_t>(1, 32768 / std::max<int64_t>(G * R, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float* c = pc + n * cs;
      const float* s = ps + n * ss;
      for (int64_t g = 0; g < G; ++g) {
        const float* a = px + (n * G + g) * R;
        float* o = po + (n * G + g) * R;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = a[i * step], x2 = a[i * step + second];
          const float x1c = x1 * c[i], x2s = x2 * s[i], x2c = x2 * c[i], x1s = x1 * s[i];
          o[i] = x1c - x2s;
          o[half + i] = x2c + x1s;
        }
      }
    }
  });
  return out;
}
"""


def enabled() -> bool:
    """Whether the kernels may be used at all (``EXPERTMESH_CPU_KERNELS=0`` turns them off)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


@functools.cache
def kernels() -> ModuleType | None:
    """The compiled kernels, built on first call; None when turned off or when they cannot be
    built here (no compiler, a failed build: logged once)."""
    if not enabled():
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        return load_inline("expertmesh_cpu_kernels", cpp_sources=_SOURCE, functions=["rms_norm", "rope"],
                           extra_cflags=["-O3", "-fopenmp-simd"], verbose=False)
    except Exception as exc:  # noqa: BLE001 - any build failure means "use the eager path"
        log.warning("expertmesh CPU kernels unavailable, using eager PyTorch: %s", str(exc).splitlines()[0])
        return None


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """The fused RMSNorm for an FP32 CPU input with FP32 weight in inference, else None (the caller
    runs its eager form): autograd needs the eager graph, other devices and dtypes keep theirs."""
    if (x.dtype != torch.float32 or weight.dtype != torch.float32 or x.device.type != "cpu"
            or torch.is_grad_enabled() or x.shape[-1] != weight.shape[0] or not enabled()):
        return None
    k = kernels()
    return None if k is None else k.rms_norm(x, weight, eps)


def fused_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor | None:
    """RoPE of ``x`` [B, S, H, R] or [B, S, R] by cos/sin [B, S, R/2] in one pass (FP32 CPU
    inference), else None for the caller's eager form; same values as the eager ops."""
    if (x.dtype != torch.float32 or cos.dtype != torch.float32 or x.device.type != "cpu"
            or torch.is_grad_enabled() or not enabled() or cos.shape[:-1] != x.shape[:cos.dim() - 1]):
        return None
    k = kernels()
    if k is None:
        return None
    rows = cos.shape[:-1].numel()
    out = k.rope(x.reshape(rows, -1, x.shape[-1]), cos.reshape(rows, -1), sin.reshape(rows, -1), interleave)
    return out.view(x.shape)


def status() -> str:
    """One line for the install step (``make venv`` builds the kernels through this)."""
    if not enabled():
        return f"expertmesh CPU kernels: off ({ENV_SWITCH}=0)"
    return "expertmesh CPU kernels: " + ("ready" if kernels() is not None else "unavailable, eager PyTorch is used")
