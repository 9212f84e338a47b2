"""Fused CPU kernels for inference, compiled from C++ on first use (as DeepSpeed builds its ops).

On CPU a decode step is bound by the number of ATen kernels it launches: each costs 3-15 µs
alone and 2-5x that right after a large GEMM has flushed the caches. Eager PyTorch runs
``F.rms_norm`` as seven kernels (pow, sum, div, add, rsqrt, two multiplies), RoPE as eight and a
SwiGLU activation as two or three; here each is one C++ pass over the rows, in FP32 and BF16
inference (a [16, 256] FP32 RMSNorm: ~3 µs instead of ~14, ~5 µs instead of ~26 after a GEMM).
Whole ``generate`` at prompt 128, A/B in one process (two runs each): FP32 1.11-1.18x at batch
1 and 1.11-1.15x at batch 16, BF16 1.14x and 1.04-1.19x; SwiGLU alone 1.07x at FP32 batch 1.

Values: RoPE and BF16 SwiGLU are the eager ones bit for bit (each product rounded as the eager
op rounds it); RMSNorm sums the squares in another order and FP32 SiLU uses ``std::exp``, so
those agree to rounding.

Built with ``torch.utils.cpp_extension.load_inline`` (g++; cached under ``TORCH_EXTENSIONS_DIR``,
by default ``~/.cache/torch_extensions``; ``make venv`` builds them once, ~30 s, later loads take
~0.1 s). Without a compiler, or with ``EXPERTMESH_CPU_KERNELS=0``, the ``fused_*`` functions
return None and callers keep their eager path; training (autograd) and CUDA always do.

    python -c "from expertmesh.model import cpu_kernels; print(cpu_kernels.status())"   # build or load
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from types import ModuleType

import torch

log = logging.getLogger(__name__)

ENV_SWITCH = "EXPERTMESH_CPU_KERNELS"
_DTYPES = (torch.float32, torch.bfloat16)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <cmath>

// Each eager op rounds its result to the tensor's dtype: rnd<T> does the same here (BF16 rounds
// to nearest even, as c10::BFloat16 does), so a chain of them gives the eager values.
template <typename T> inline float rnd(float v) { return static_cast<float>(static_cast<T>(v)); }

// y = w * (x * 1/sqrt(mean(x^2) + eps)) over the last dimension. float32: the eager composite's
// operations and roundings except the order in which the squares are summed. bfloat16: as the
// module's BF16 form, normalised in float32, rounded, then scaled by the BF16 weight.
template <typename T>
void rms_norm_rows(const T* px, const T* pw, T* po, int64_t rows, int64_t D, float eps) {
  const float fD = static_cast<float>(D);
  // rows split over threads only when there is enough work to pay for waking them
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* a = px + r * D;
      T* o = po + r * D;
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < D; ++i) sum += static_cast<float>(a[i]) * static_cast<float>(a[i]);
      const float inv = 1.0f / std::sqrt(sum / fD + eps);
      for (int64_t i = 0; i < D; ++i)
        o[i] = static_cast<T>(static_cast<float>(pw[i]) * rnd<T>(static_cast<float>(a[i]) * inv));
    }
  });
}

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  const auto dt = x.scalar_type();
  TORCH_CHECK(x.device().is_cpu() && (dt == torch::kFloat || dt == torch::kBFloat16),
              "rms_norm: float32 or bfloat16 CPU input expected");
  TORCH_CHECK(weight.dim() == 1 && weight.scalar_type() == dt && weight.numel() == x.size(-1),
              "rms_norm: weight must be ", dt, " [", x.size(-1), "]");
  auto xc = x.contiguous();
  auto wc = weight.contiguous();
  auto out = torch::empty_like(xc);
  const int64_t D = xc.size(-1);
  const int64_t rows = D ? xc.numel() / D : 0;
  const float feps = static_cast<float>(eps);
  if (dt == torch::kFloat)
    rms_norm_rows<float>(xc.data_ptr<float>(), wc.data_ptr<float>(), out.data_ptr<float>(), rows, D, feps);
  else
    rms_norm_rows<c10::BFloat16>(xc.data_ptr<c10::BFloat16>(), wc.data_ptr<c10::BFloat16>(),
                                 out.data_ptr<c10::BFloat16>(), rows, D, feps);
  return out;
}

// RoPE on x [N, G, R] (G heads sharing a position) with cos/sin [N, R/2] (last dim contiguous, any
// row stride): out[..., :R/2] = x1*cos - x2*sin, out[..., R/2:] = x2*cos + x1*sin, where (x1, x2)
// are the even and odd elements (interleaved) or the two halves. The eager ops' exact roundings.
template <typename T>
void rope_rows(const T* px, const T* pc, const T* ps, T* po, int64_t N, int64_t G, int64_t R, int64_t cs,
               int64_t ss, bool interleave) {
  const int64_t half = R / 2, step = interleave ? 2 : 1, second = interleave ? 1 : half;
  at::parallel_for(0, N, std::max<int64_t>(1, 32768 / std::max<int64_t>(G * R, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const T* c = pc + n * cs;
      const T* s = ps + n * ss;
      for (int64_t g = 0; g < G; ++g) {
        const T* a = px + (n * G + g) * R;
        T* o = po + (n * G + g) * R;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = a[i * step], x2 = a[i * step + second], ci = c[i], si = s[i];
          o[i] = static_cast<T>(rnd<T>(x1 * ci) - rnd<T>(x2 * si));
          o[half + i] = static_cast<T>(rnd<T>(x2 * ci) + rnd<T>(x1 * si));
        }
      }
    }
  });
}

torch::Tensor rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, bool interleave) {
  const auto dt = x.scalar_type();
  TORCH_CHECK(x.device().is_cpu() && (dt == torch::kFloat || dt == torch::kBFloat16) && cos.scalar_type() == dt &&
              sin.scalar_type() == dt, "rope: float32 or bfloat16 CPU tensors of one dtype expected");
  TORCH_CHECK(x.dim() == 3 && cos.dim() == 2 && sin.sizes() == cos.sizes() && cos.size(0) == x.size(0) &&
              2 * cos.size(1) == x.size(2) && cos.stride(1) == 1 && sin.stride(1) == 1,
              "rope: x [N, G, R] with cos/sin [N, R/2] expected");
  auto xc = x.contiguous();
  auto out = torch::empty_like(xc);
  const int64_t N = xc.size(0), G = xc.size(1), R = xc.size(2);
  if (dt == torch::kFloat)
    rope_rows<float>(xc.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), out.data_ptr<float>(),
                     N, G, R, cos.stride(0), sin.stride(0), interleave);
  else
    rope_rows<c10::BFloat16>(xc.data_ptr<c10::BFloat16>(), cos.data_ptr<c10::BFloat16>(),
                             sin.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), N, G, R, cos.stride(0),
                             sin.stride(0), interleave);
  return out;
}

// SwiGLU activation of h [rows, 2F] (gate, then up; last dim contiguous, any row stride):
// out = SiLU(gate) * up, times scale[row] when scale is given ([rows], e.g. a routing weight),
// each product rounded as the eager ops round it. SiLU is x / (1 + exp(-x)) with std::exp, which
// can differ from ATen's vectorised exp in the last bit: agrees to rounding.
template <typename T>
void silu_mul_rows(const T* ph, int64_t hs, const T* pscale, T* po, int64_t rows, int64_t F) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(F, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = ph + r * hs;
      const T* u = g + F;
      T* o = po + r * F;
      const float sc = pscale ? static_cast<float>(pscale[r]) : 1.0f;
      for (int64_t i = 0; i < F; ++i) {
        const float gv = g[i];
        const float act = rnd<T>(gv / (1.0f + std::exp(-gv)));
        const float prod = rnd<T>(act * static_cast<float>(u[i]));
        o[i] = static_cast<T>(pscale ? prod * sc : prod);
      }
    }
  });
}

torch::Tensor silu_mul(const torch::Tensor& h, const c10::optional<torch::Tensor>& scale) {
  const auto dt = h.scalar_type();
  TORCH_CHECK(h.device().is_cpu() && (dt == torch::kFloat || dt == torch::kBFloat16) && h.dim() == 2 &&
              h.size(1) % 2 == 0 && h.stride(1) == 1, "silu_mul: float32 or bfloat16 CPU h [rows, 2F] expected");
  const int64_t rows = h.size(0), F = h.size(1) / 2;
  torch::Tensor sc;
  if (scale.has_value()) {
    sc = scale->contiguous();
    TORCH_CHECK(sc.scalar_type() == dt && sc.numel() == rows, "silu_mul: scale must be ", dt, " [", rows, "]");
  }
  auto out = torch::empty({rows, F}, h.options());
  if (dt == torch::kFloat)
    silu_mul_rows<float>(h.data_ptr<float>(), h.stride(0), sc.defined() ? sc.data_ptr<float>() : nullptr,
                         out.data_ptr<float>(), rows, F);
  else
    silu_mul_rows<c10::BFloat16>(h.data_ptr<c10::BFloat16>(), h.stride(0),
                                 sc.defined() ? sc.data_ptr<c10::BFloat16>() : nullptr,
                                 out.data_ptr<c10::BFloat16>(), rows, F);
  return out;
}
"""


# The kernel's exp is scalar (std::exp), ATen's is vectorised: past ~2K outputs the two eager
# kernels win (Xeon, hot: 192 outputs 1.6 vs 5.5 us, 1536 6.0 vs 6.8, 3072 10.7 vs 7.8, the
# 17-expert dense kernel's 52K 174 vs 27). Batch-1 experts and small dense MLPs fit.
SILU_MUL_MAX_OUTPUTS = 2048

_FUNCTIONS = ("rms_norm", "rope", "silu_mul")
_CFLAGS = ("-O3", "-fopenmp-simd")


def _build_name() -> str:
    """The extension's name, unique to this source and these flags: checkouts with other kernel
    sources (another version, a branch) keep their own builds in the shared cache instead of
    rebuilding over each other."""
    digest = hashlib.sha256("\0".join([_SOURCE, *_FUNCTIONS, *_CFLAGS, torch.__version__]).encode()).hexdigest()
    return f"expertmesh_cpu_kernels_{digest[:12]}"


def enabled() -> bool:
    """Whether the kernels may be used at all (``EXPERTMESH_CPU_KERNELS=0`` turns them off)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


@functools.cache
def kernels() -> ModuleType | None:
    """The compiled kernels, built (or loaded from the cache) on first call; None when they cannot
    be built here (no compiler, a failed build: logged once). Callers check :func:`enabled` first."""
    try:
        from torch.utils.cpp_extension import load_inline

        return load_inline(_build_name(), cpp_sources=_SOURCE, functions=list(_FUNCTIONS), extra_cflags=list(_CFLAGS),
                           verbose=False)
    except Exception as exc:  # noqa: BLE001 - any build failure means "use the eager path"
        log.warning("expertmesh CPU kernels unavailable, using eager PyTorch: %s", str(exc).splitlines()[0])
        return None


def _kernels_for(x: torch.Tensor) -> ModuleType | None:
    """The kernels, where they apply to ``x`` at all: a non-empty FP32 or BF16 CPU tensor with
    autograd off (training needs the eager graph), switched on, and built here; else None."""
    if x.dtype not in _DTYPES or x.device.type != "cpu" or not x.numel() or torch.is_grad_enabled() or not enabled():
        return None
    return kernels()


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """The fused RMSNorm of an FP32 or BF16 CPU input with a weight of its dtype, in inference; else
    None (the caller runs its eager form): other devices, dtypes and mixed dtypes keep theirs."""
    if weight.dtype != x.dtype or x.shape[-1] != weight.shape[0] or (k := _kernels_for(x)) is None:
        return None
    return k.rms_norm(x, weight, eps)


def fused_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor | None:
    """RoPE of ``x`` [B, S, H, R] or [B, S, R] by cos/sin [B, S, R/2] of its dtype in one pass (FP32
    or BF16 CPU inference), else None for the caller's eager form; same values as the eager ops."""
    if (cos.dtype != x.dtype or sin.dtype != x.dtype or cos.shape[:-1] != x.shape[:cos.dim() - 1]
            or (k := _kernels_for(x)) is None):
        return None
    rows = cos.shape[:-1].numel()
    out = k.rope(x.reshape(rows, -1, x.shape[-1]), cos.reshape(rows, -1), sin.reshape(rows, -1), interleave)
    return out.view(x.shape)


def fused_silu_mul(h: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor | None:
    """SiLU(gate) * up of ``h`` [..., 2F] -> [..., F] (times ``scale`` [...] per row when given) in
    one pass (CPU inference, FP32 or BF16, up to ``SILU_MUL_MAX_OUTPUTS`` outputs), else None for
    the caller's eager form."""
    if (h.numel() > 2 * SILU_MUL_MAX_OUTPUTS
            or (scale is not None and (scale.dtype != h.dtype or scale.shape != h.shape[:-1]))
            or (k := _kernels_for(h)) is None):
        return None
    rows = h.shape[:-1].numel()
    out = k.silu_mul(h.reshape(rows, h.shape[-1]), None if scale is None else scale.reshape(rows))
    return out.view(*h.shape[:-1], h.shape[-1] // 2)


def status() -> str:
    """One line for the install step (``make venv`` builds the kernels through this)."""
    if not enabled():
        return f"expertmesh CPU kernels: off ({ENV_SWITCH}=0)"
    return "expertmesh CPU kernels: " + ("ready" if kernels() is not None else "unavailable, eager PyTorch is used")
