"""Fused CPU kernels for inference, compiled from C++ on first use (as DeepSpeed builds its ops).

On CPU a decode step is bound by the number of ATen kernels it launches (each costs 3-15 µs
alone and 2-5x that right after a large GEMM has flushed the caches) and by how the expert
weights are streamed. Here, one C++ call each, in FP32 and BF16 inference:

  rms_norm      RMSNorm (seven eager kernels); agrees to rounding (another summation order).
  rope          RoPE (eight); the eager values bit for bit.
  silu_mul      SwiGLU's SiLU(gate) * up (two or three); BF16 bit for bit, FP32 to rounding
                (vectorised on AVX-512).
  moe_route     the gate's group-limited top-k from its FP32 sigmoid scores (about twelve).
  moe_experts   every routed and shared expert of a decode batch (AVX-512): ``fused_moe``.
  mla_decode    a decode step's MLA from the fused input projection to o_proj's input, cache
                write included, the cache read in place on AVX-512: ``fused_mla_decode``.
  argmax_rows   greedy sampling's first maximum per row (AVX-512).

The AVX-512 kernels are compiled for that instruction set whatever the build machine (a
``#pragma GCC target`` region) and run only where ``moe_supported()`` finds it at run time.
Measurements are with the functions that use them (``grouped_experts``, ``mla``, the README).

Built with ``torch.utils.cpp_extension.load_inline`` (g++, ``-fopenmp`` so that ATen's inline
``parallel_for`` uses torch's threads; cached under ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``; ``make venv`` builds them once, ~40 s, later loads take ~0.1 s).
Without a compiler, or with ``EXPERTMESH_CPU_KERNELS=0``, the ``fused_*`` functions return None
and callers keep their eager path; training (autograd) and CUDA always do.

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
#include <c10/util/Float8_e4m3fn.h>
#include <algorithm>
#include <cmath>
#include <numeric>
#include <type_traits>
#include <vector>
// x86-64 with GCC: the AVX-512 kernels are compiled (in a target region) and chosen at run time
#if defined(__x86_64__) && defined(__GNUC__)
#define EXPERTMESH_MOE_AVX512 1
#include <immintrin.h>
#endif

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

bool moe_supported();
#ifdef EXPERTMESH_MOE_AVX512
namespace act {
void silu_mul_rows(const float* h, int64_t hs, const float* scale, float* out, int64_t rows, int64_t F);
}
#endif

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
#ifdef EXPERTMESH_MOE_AVX512
  if (dt == torch::kFloat && moe_supported()) {  // vectorised exp (AVX-512): any size
    act::silu_mul_rows(h.data_ptr<float>(), h.stride(0), sc.defined() ? sc.data_ptr<float>() : nullptr,
                       out.data_ptr<float>(), rows, F);
    return out;
  }
#endif
  if (dt == torch::kFloat)
    silu_mul_rows<float>(h.data_ptr<float>(), h.stride(0), sc.defined() ? sc.data_ptr<float>() : nullptr,
                         out.data_ptr<float>(), rows, F);
  else
    silu_mul_rows<c10::BFloat16>(h.data_ptr<c10::BFloat16>(), h.stride(0),
                                 sc.defined() ? sc.data_ptr<c10::BFloat16>() : nullptr,
                                 out.data_ptr<c10::BFloat16>(), rows, F);
  return out;
}

// ---- MoE experts: gate/up GEMM + SwiGLU + routing weight, then down GEMM into each token's sum ----
// Decode batches put a few rows on each expert (16 tokens x top-4 over 16 experts: ~5), where
// BLAS GEMMs stream the expert's weights at a fraction of the bandwidth and the eager glue
// (gather, activation, weighting, scatter-add) costs more than the arithmetic. Here each expert's
// weights are streamed once per block of up to six rows, with the rows' partial sums in registers:
// a [rows x 16*NV] tile takes one weight load per 16 columns and k, and NR FMAs on it. Threads
// split the output columns, never the experts, so every token's expert outputs are added in
// expert order (routed experts ascending, then the shared ones), whatever the thread count.
// AVX-512 only (checked at run time by moe_supported); weights input-major (w13 [E, D, 2F], the
// gate's F columns then the up's; w2 [E, F, D]), float32 or bfloat16, math in float32.
#ifdef EXPERTMESH_MOE_AVX512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
namespace moe {

inline __m512 load(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load(const c10::BFloat16* p, __mmask16 m) {  // bf16 -> f32 is a 16-bit shift
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// exp(x) = 2^n * exp(r), n = round(x / ln 2), |r| <= ln(2)/2; exp(r) by its Taylor series to r^7
// (the first term left out is below 2^-24 relative), 2^n applied by vscalefps.
inline __m512 exp(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.7f)), _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // ln 2 in two parts (the first exact in float), so r keeps its low bits
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.4286068203094173e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// The weight rows AHEAD rows on are requested while this one is used: a tile reads a narrow
// column strip of each row, a stride the hardware prefetchers miss (16 tokens: 1.2-1.5x; 1 and 64
// tokens: the same). A prefetch past the matrix's end is harmless (it cannot fault).
constexpr int64_t AHEAD = 16;
template <typename W> inline void prefetch(const W* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }

inline __mmask16 mask_for(int v, int NV, __mmask16 last) { return v == NV - 1 ? last : __mmask16(0xFFFF); }

// NR rows (pointers to D floats each) through gate columns [c, c + 16 NV) and the matching up
// columns (F further on) of one expert's w13 [D, 2F]; writes SiLU(gate) * up * weight to the rows'
// activations. `last` masks the last 16-column vector (a block narrower than 16 NV columns).
template <int NR, int NV, typename W>
void gate_up_block(const float* const* x, const float* weight, const W* w13, int64_t D, int64_t F, int64_t c,
                   __mmask16 last, float* const* act) {
  __m512 g[NR][NV], u[NR][NV];
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < NV; ++v) g[r][v] = u[r][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < D; ++k) {
    const W* wk = w13 + k * 2 * F + c;
    for (int v = 0; v < NV; ++v) {
      prefetch(wk + AHEAD * 2 * F + 16 * v);
      prefetch(wk + AHEAD * 2 * F + F + 16 * v);
    }
    __m512 wg[NV], wu[NV];
    for (int v = 0; v < NV; ++v) {
      wg[v] = load(wk + 16 * v, mask_for(v, NV, last));
      wu[v] = load(wk + F + 16 * v, mask_for(v, NV, last));
    }
    for (int r = 0; r < NR; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r][k]);
      for (int v = 0; v < NV; ++v) {
        g[r][v] = _mm512_fmadd_ps(xv, wg[v], g[r][v]);
        u[r][v] = _mm512_fmadd_ps(xv, wu[v], u[r][v]);
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < NV; ++v) {
      const __m512 silu = _mm512_div_ps(g[r][v], _mm512_add_ps(_mm512_set1_ps(1.0f), exp(-g[r][v])));
      const __m512 a = _mm512_mul_ps(_mm512_mul_ps(silu, u[r][v]), _mm512_set1_ps(weight[r]));
      _mm512_mask_storeu_ps(act[r] + c + 16 * v, mask_for(v, NV, last), a);
    }
}

// NR activation rows [F] through columns [c, c + 16 NV) of one expert's w2 [F, D], added into
// the rows' token outputs.
template <int NR, int NV, typename W>
void down_block(const float* const* act, const W* w2, int64_t F, int64_t D, int64_t c, __mmask16 last,
                float* const* y) {
  __m512 acc[NR][NV];
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < F; ++k) {
    const W* wk = w2 + k * D + c;
    for (int v = 0; v < NV; ++v) prefetch(wk + AHEAD * D + 16 * v);
    __m512 wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = load(wk + 16 * v, mask_for(v, NV, last));
    for (int r = 0; r < NR; ++r) {
      const __m512 av = _mm512_set1_ps(act[r][k]);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(av, wv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < NV; ++v) {
      float* out = y[r] + c + 16 * v;
      const __mmask16 m = mask_for(v, NV, last);
      _mm512_mask_storeu_ps(out, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, out), acc[r][v]));
    }
}

constexpr int ROWS = 6;  // rows per register tile: 6 x 4 accumulators + 4 weights + 1 broadcast of 32 registers

template <int NV, typename W>
void gate_up_tiles(int n, const float* const* x, const float* weight, const W* w13, int64_t D, int64_t F, int64_t c,
                   __mmask16 last, float* const* act) {
  for (int r = 0; r < n; r += ROWS) {
    const float* const* xr = x + r;
    const float* wr = weight + r;
    float* const* ar = act + r;
    switch (std::min(ROWS, n - r)) {
      case 1: gate_up_block<1, NV>(xr, wr, w13, D, F, c, last, ar); break;
      case 2: gate_up_block<2, NV>(xr, wr, w13, D, F, c, last, ar); break;
      case 3: gate_up_block<3, NV>(xr, wr, w13, D, F, c, last, ar); break;
      case 4: gate_up_block<4, NV>(xr, wr, w13, D, F, c, last, ar); break;
      case 5: gate_up_block<5, NV>(xr, wr, w13, D, F, c, last, ar); break;
      default: gate_up_block<6, NV>(xr, wr, w13, D, F, c, last, ar); break;
    }
  }
}

template <int NV, typename W>
void down_tiles(int n, const float* const* act, const W* w2, int64_t F, int64_t D, int64_t c, __mmask16 last,
                float* const* y) {
  for (int r = 0; r < n; r += ROWS) {
    const float* const* ar = act + r;
    float* const* yr = y + r;
    switch (std::min(ROWS, n - r)) {
      case 1: down_block<1, NV>(ar, w2, F, D, c, last, yr); break;
      case 2: down_block<2, NV>(ar, w2, F, D, c, last, yr); break;
      case 3: down_block<3, NV>(ar, w2, F, D, c, last, yr); break;
      case 4: down_block<4, NV>(ar, w2, F, D, c, last, yr); break;
      case 5: down_block<5, NV>(ar, w2, F, D, c, last, yr); break;
      default: down_block<6, NV>(ar, w2, F, D, c, last, yr); break;
    }
  }
}

// Column blocks of `width` columns over `cols`: [start, vectors, mask of the last vector].
struct Block { int64_t col; int nv; __mmask16 last; };
inline std::vector<Block> blocks(int64_t cols, int64_t width) {
  std::vector<Block> out;
  for (int64_t c = 0; c < cols; c += width) {
    const int64_t w = std::min(width, cols - c);
    const int64_t tail = w % 16;
    out.push_back({c, static_cast<int>((w + 15) / 16), tail ? __mmask16((1u << tail) - 1) : __mmask16(0xFFFF)});
  }
  return out;
}

// x32 [T, D] float32 rows; y32 [T, D] float32 output (overwritten). Pairs are sorted by expert
// (tokens in order within one), the shared experts' pairs (every token, weight 1) after them.
template <typename W>
void run(const float* x32, int64_t T, int64_t D, int64_t F, const int64_t* ids, const float* weights, int64_t K,
         const W* w13, const W* w2, int64_t E, int64_t num_routed, float* y32, int64_t* counts) {
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t i = 0; i < T * K; ++i) ++start[ids[i] + 1];
  for (int64_t e = 0; e < num_routed; ++e) counts[e] = start[e + 1];
  for (int64_t e = num_routed; e < E; ++e) start[e + 1] = T;
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  const int64_t S = start[E];
  std::vector<int64_t> next(start.begin(), start.end() - 1);
  std::vector<const float*> x_rows(S);
  std::vector<float*> y_rows(S), act_rows(S);
  std::vector<float> pair_weight(S), act(S * F);
  for (int64_t i = 0; i < T * K; ++i) {
    const int64_t s = next[ids[i]]++, t = i / K;
    x_rows[s] = x32 + t * D, y_rows[s] = y32 + t * D, pair_weight[s] = weights[i];
  }
  for (int64_t e = num_routed; e < E; ++e)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t s = next[e]++;
      x_rows[s] = x32 + t * D, y_rows[s] = y32 + t * D, pair_weight[s] = 1.0f;
    }
  for (int64_t s = 0; s < S; ++s) act_rows[s] = act.data() + s * F;
  std::fill(y32, y32 + T * D, 0.0f);
  const auto up_blocks = blocks(F, 32), down_blocks = blocks(D, 64);
  at::parallel_for(0, static_cast<int64_t>(up_blocks.size()), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t e = 0; e < E; ++e) {
      const int n = static_cast<int>(start[e + 1] - start[e]);
      if (!n) continue;
      const W* w = w13 + e * D * 2 * F;
      for (int64_t b = b0; b < b1; ++b) {
        const Block& blk = up_blocks[b];
        const auto* xr = x_rows.data() + start[e];
        const float* wr = pair_weight.data() + start[e];
        float* const* ar = act_rows.data() + start[e];
        if (blk.nv == 1) gate_up_tiles<1>(n, xr, wr, w, D, F, blk.col, blk.last, ar);
        else gate_up_tiles<2>(n, xr, wr, w, D, F, blk.col, blk.last, ar);
      }
    }
  });
  at::parallel_for(0, static_cast<int64_t>(down_blocks.size()), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t e = 0; e < E; ++e) {
      const int n = static_cast<int>(start[e + 1] - start[e]);
      if (!n) continue;
      const W* w = w2 + e * F * D;
      for (int64_t b = b0; b < b1; ++b) {
        const Block& blk = down_blocks[b];
        const float* const* ar = act_rows.data() + start[e];
        float* const* yr = y_rows.data() + start[e];
        switch (blk.nv) {
          case 1: down_tiles<1>(n, ar, w, F, D, blk.col, blk.last, yr); break;
          case 2: down_tiles<2>(n, ar, w, F, D, blk.col, blk.last, yr); break;
          case 3: down_tiles<3>(n, ar, w, F, D, blk.col, blk.last, yr); break;
          default: down_tiles<4>(n, ar, w, F, D, blk.col, blk.last, yr); break;
        }
      }
    }
  });
}

}  // namespace moe

// ---- absorbed MLA decode attention, read in place from the paged latent cache ----
// One new token per sequence t: its queries are absorbed (q_nope through W_UK, then the RoPE part,
// times the softmax scale: [H, C + R]), scored against the sequence's first lengths[t] cache
// entries where they lie (block table, no gathered copy, no mask), softmaxed in float32, the
// probabilities applied to the entries' latents ([H, C]) and the result taken through W_UV
// ([H, V]). Sequences are split over the threads. Float32 math; entries float32 or bfloat16.
namespace attn {

inline __mmask16 tail_mask(int64_t n) { return n % 16 ? __mmask16((1u << (n % 16)) - 1) : __mmask16(0xFFFF); }

// 16 float8 e4m3fn codes -> float32, exactly: sign, exponent - 7 + 127, the 3 mantissa bits on top;
// exponent 0 is subnormal (mantissa * 2^-9); S.1111.111 is NaN (e4m3fn has no infinities).
inline __m512 fp8_e4m3fn_to_float(__m128i codes) {
  const __m512i b = _mm512_cvtepu8_epi32(codes);
  const __m512i exponent = _mm512_and_si512(_mm512_srli_epi32(b, 3), _mm512_set1_epi32(0xF));
  const __m512i mantissa = _mm512_and_si512(b, _mm512_set1_epi32(0x7));
  const __m512i normal = _mm512_or_si512(_mm512_slli_epi32(_mm512_add_epi32(exponent, _mm512_set1_epi32(120)), 23),
                                         _mm512_slli_epi32(mantissa, 20));
  const __m512 subnormal = _mm512_mul_ps(_mm512_cvtepi32_ps(mantissa), _mm512_set1_ps(1.0f / 512));
  __m512 magnitude = _mm512_mask_blend_ps(_mm512_cmpeq_epi32_mask(exponent, _mm512_setzero_si512()),
                                          _mm512_castsi512_ps(normal), subnormal);
  magnitude = _mm512_mask_mov_ps(magnitude, _mm512_cmpeq_epi32_mask(_mm512_and_si512(b, _mm512_set1_epi32(0x7F)),
                                                                     _mm512_set1_epi32(0x7F)), _mm512_set1_ps(NAN));
  const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x80)), 24);
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(magnitude), sign));
}

inline void fp8_to_float(const uint8_t* codes, int64_t n, float* out) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(out + i, m, fp8_e4m3fn_to_float(_mm_maskz_loadu_epi8(m, codes + i)));
  }
}

// One layer's cache entries [slots, W]: float32, bfloat16, or float8 e4m3fn codes (uint8_t) with a
// float32 scale per token and tile (scales [slots, NT]; vec_tile: the tile of each 16-entry vector).
template <typename E>
struct Rows {
  const E* entries;
  int64_t W;
  const float* scales = nullptr;
  int64_t NT = 0;
  const int64_t* vec_tile = nullptr;
  // entries [16 v, 16 v + 16) of a slot as float32 (masked lanes 0)
  inline __m512 load(int64_t slot, int64_t v, __mmask16 m) const {
    if constexpr (std::is_same_v<E, uint8_t>) {
      const __m512 codes = fp8_e4m3fn_to_float(_mm_maskz_loadu_epi8(m, entries + slot * W + 16 * v));
      return _mm512_mul_ps(codes, _mm512_set1_ps(scales[slot * NT + vec_tile[v]]));
    } else {
      return moe::load(entries + slot * W + 16 * v, m);
    }
  }
};

// The scores of G heads' queries (G rows of nw 16-float vectors, zero past W) against a sequence's
// first L entries (block table `table`): each entry's vectors are loaded once for the G heads,
// whose partial sums stay in registers. probs [G, L].
template <int G, typename E>
void head_scores(const float* q, int64_t nw, __mmask16 w_last, const Rows<E>& rows, const int64_t* table, int64_t BS,
                 int64_t L, float* probs) {
  for (int64_t key = 0, n = 0; key < L; ++n) {
    for (int64_t i = 0; i < BS && key < L; ++i, ++key) {
      const int64_t slot = table[n] * BS + i;
      __m512 s[G];
      for (int g = 0; g < G; ++g) s[g] = _mm512_setzero_ps();
      for (int64_t v = 0; v < nw; ++v) {
        const __m512 r = rows.load(slot, v, v == nw - 1 ? w_last : __mmask16(0xFFFF));
        for (int g = 0; g < G; ++g) s[g] = _mm512_fmadd_ps(r, _mm512_loadu_ps(q + (g * nw + v) * 16), s[g]);
      }
      for (int g = 0; g < G; ++g) probs[g * L + key] = _mm512_reduce_add_ps(s[g]);
    }
  }
}

// G heads' probabilities [G, L] times the entries' latent vectors v0 .. v0 + NV (register
// accumulators, each entry vector loaded once), stored to acc [H, nc * 16] rows of those heads.
template <int G, int NV, typename E>
void head_latents(const float* probs, int64_t L, const Rows<E>& rows, const int64_t* table, int64_t BS, int64_t v0,
                  int64_t nc, __mmask16 c_last, float* acc) {
  __m512 a[G][NV];
  for (int g = 0; g < G; ++g)
    for (int v = 0; v < NV; ++v) a[g][v] = _mm512_setzero_ps();
  for (int64_t key = 0, n = 0; key < L; ++n) {
    for (int64_t i = 0; i < BS && key < L; ++i, ++key) {
      const int64_t slot = table[n] * BS + i;
      for (int v = 0; v < NV; ++v) {
        const __m512 latent = rows.load(slot, v0 + v, v0 + v == nc - 1 ? c_last : __mmask16(0xFFFF));
        for (int g = 0; g < G; ++g) a[g][v] = _mm512_fmadd_ps(_mm512_set1_ps(probs[g * L + key]), latent, a[g][v]);
      }
    }
  }
  for (int g = 0; g < G; ++g)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(acc + g * nc * 16 + (v0 + v) * 16, a[g][v]);
}

template <int G, typename E>
void head_latents_any(int64_t nv, const float* probs, int64_t L, const Rows<E>& rows, const int64_t* table, int64_t BS,
                      int64_t v0, int64_t nc, __mmask16 c_last, float* acc) {
  switch (nv) {
    case 1: head_latents<G, 1>(probs, L, rows, table, BS, v0, nc, c_last, acc); break;
    case 2: head_latents<G, 2>(probs, L, rows, table, BS, v0, nc, c_last, acc); break;
    case 3: head_latents<G, 3>(probs, L, rows, table, BS, v0, nc, c_last, acc); break;
    default: head_latents<G, 4>(probs, L, rows, table, BS, v0, nc, c_last, acc); break;
  }
}

template <typename E>
void decode(const float* q_nope, const float* q_rope, const float* w_uk, const float* w_uv, float scale,
            const Rows<E>& rows, const int64_t* blocks, const int64_t* lengths, int64_t T, int64_t H, int64_t N,
            int64_t R, int64_t C, int64_t V, int64_t Nb, int64_t BS, float* out) {
  const int64_t W = C + R, nw = (W + 15) / 16, nc = (C + 15) / 16;
  const __mmask16 w_last = tail_mask(W), c_last = tail_mask(C);
  auto mask = [](int64_t v, int64_t n, __mmask16 last) { return v == n - 1 ? last : __mmask16(0xFFFF); };
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> q(H * nw * 16, 0.0f), probs, acc(H * nc * 16);
    for (int64_t t = t0; t < t1; ++t) {
      // absorbed, scaled queries [H, W] (zero past W, so whole vectors can be read)
      for (int64_t h = 0; h < H; ++h) {
        float* qh = q.data() + h * nw * 16;
        const float* qn = q_nope + (t * H + h) * N;
        for (int64_t v = 0; v < nc; ++v) {
          __m512 a = _mm512_setzero_ps();
          for (int64_t n = 0; n < N; ++n)
            a = _mm512_fmadd_ps(_mm512_set1_ps(qn[n]), _mm512_maskz_loadu_ps(mask(v, nc, c_last), w_uk + (h * N + n) * C + 16 * v), a);
          _mm512_mask_storeu_ps(qh + 16 * v, mask(v, nc, c_last), _mm512_mul_ps(a, _mm512_set1_ps(scale)));
        }
        for (int64_t r = 0; r < R; ++r) qh[C + r] = q_rope[(t * H + h) * R + r] * scale;
      }
      const int64_t L = lengths[t];
      probs.resize(H * L);
      // scores, four heads at a time
      const int64_t* table = blocks + t * Nb;
      for (int64_t h0 = 0; h0 < H; h0 += 4) {
        const float* qg = q.data() + h0 * nw * 16;
        float* pg = probs.data() + h0 * L;
        switch (std::min<int64_t>(4, H - h0)) {
          case 1: head_scores<1>(qg, nw, w_last, rows, table, BS, L, pg); break;
          case 2: head_scores<2>(qg, nw, w_last, rows, table, BS, L, pg); break;
          case 3: head_scores<3>(qg, nw, w_last, rows, table, BS, L, pg); break;
          default: head_scores<4>(qg, nw, w_last, rows, table, BS, L, pg); break;
        }
      }
      for (int64_t h = 0; h < H; ++h) {  // softmax of each head's scores
        float* p = probs.data() + h * L;
        float mx = -INFINITY, sum = 0.0f;
        for (int64_t k = 0; k < L; ++k) mx = std::max(mx, p[k]);
        for (int64_t k = 0; k < L; k += 16) {
          const __mmask16 m = L - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (L - k)) - 1);
          const __m512 e = moe::exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p + k), _mm512_set1_ps(mx)));
          _mm512_mask_storeu_ps(p + k, m, e);
          sum += _mm512_mask_reduce_add_ps(m, e);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / sum);
        for (int64_t k = 0; k < L; k += 16) {
          const __mmask16 m = L - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (L - k)) - 1);
          _mm512_mask_storeu_ps(p + k, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p + k), inv));
        }
      }
      // probabilities times the latents: [H, C], blocks of four heads by four latent vectors
      for (int64_t h0 = 0; h0 < H; h0 += 4)
        for (int64_t v0 = 0; v0 < nc; v0 += 4) {
          const int64_t nv = std::min<int64_t>(4, nc - v0);
          const float* pg = probs.data() + h0 * L;
          float* ag = acc.data() + h0 * nc * 16;
          switch (std::min<int64_t>(4, H - h0)) {
            case 1: head_latents_any<1>(nv, pg, L, rows, table, BS, v0, nc, c_last, ag); break;
            case 2: head_latents_any<2>(nv, pg, L, rows, table, BS, v0, nc, c_last, ag); break;
            case 3: head_latents_any<3>(nv, pg, L, rows, table, BS, v0, nc, c_last, ag); break;
            default: head_latents_any<4>(nv, pg, L, rows, table, BS, v0, nc, c_last, ag); break;
          }
        }
      // through W_UV [H, V, C]: out[t, h * V + j] = <acc[h], W_UV[h, j]>
      for (int64_t h = 0; h < H; ++h)
        for (int64_t j = 0; j < V; ++j) {
          const float* w = w_uv + (h * V + j) * C;
          __m512 s = _mm512_setzero_ps();
          for (int64_t v = 0; v < nc; ++v)
            s = _mm512_fmadd_ps(_mm512_loadu_ps(acc.data() + (h * nc + v) * 16),
                                _mm512_maskz_loadu_ps(mask(v, nc, c_last), w + 16 * v), s);
          out[(t * H + h) * V + j] = _mm512_reduce_add_ps(s);
        }
    }
  });
}

}  // namespace attn

// ---- SwiGLU activation, FP32, vectorised ----
namespace act {

// o = SiLU(g) * u (times scale when given) over n floats: SiLU as g / (1 + exp(-g)) with moe::exp;
// the products rounded as the eager ops round them (float32 throughout).
inline void silu_mul(const float* g, const float* u, const float* scale, float* o, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    const __m512 gv = _mm512_maskz_loadu_ps(m, g + i);
    const __m512 silu = _mm512_div_ps(gv, _mm512_add_ps(one, moe::exp(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
    __m512 prod = _mm512_mul_ps(silu, _mm512_maskz_loadu_ps(m, u + i));
    if (scale) prod = _mm512_mul_ps(prod, _mm512_set1_ps(*scale));
    _mm512_mask_storeu_ps(o + i, m, prod);
  }
}

// rows of h [rows, 2F] (row stride hs; gate then up) -> out [rows, F], times scale[r] when given
void silu_mul_rows(const float* h, int64_t hs, const float* scale, float* out, int64_t rows, int64_t F) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(F, 1)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) silu_mul(h + r * hs, h + r * hs + F, scale ? scale + r : nullptr, out + r * F, F);
  });
}

}  // namespace act

// ---- greedy sampling: the first maximum of each row ----
namespace pick {

// index of the first maximum of x[0..n), NaN counting as the maximum (the first NaN), as torch.max
inline int64_t first_max(const float* x, int64_t n) {
  __m512 best = _mm512_set1_ps(-INFINITY);
  __m512i best_i = _mm512_set1_epi32(-1), idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  bool nan = false;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    const __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), m, x + i);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) != 0;
    const __mmask16 gt = _mm512_mask_cmp_ps_mask(m, v, best, _CMP_GT_OQ);
    best = _mm512_mask_mov_ps(best, gt, v);
    best_i = _mm512_mask_mov_epi32(best_i, gt, idx);
    idx = _mm512_add_epi32(idx, step);
  }
  if (nan) {
    for (int64_t i = 0; i < n; ++i)
      if (std::isnan(x[i])) return i;
  }
  const float mx = _mm512_reduce_max_ps(best);
  int64_t found = n;
  alignas(64) float vals[16];
  alignas(64) int32_t ids[16];
  _mm512_store_ps(vals, best);
  _mm512_store_si512(ids, best_i);
  for (int j = 0; j < 16; ++j)
    if (vals[j] == mx && ids[j] >= 0 && ids[j] < found) found = ids[j];
  return found == n ? 0 : found;  // every value -inf: the first one
}

}  // namespace pick
#pragma GCC pop_options
#endif

// ---- MLA decode step of one layer, from the input projection's output to o_proj's input ----
// The engine's decode path (runner.attention -> MLA.project -> cache.write -> attend_latent_rows)
// as one call: the same ATen ops and fused kernels in the same order, so the same values, without
// ~150 Python-level tensor ops (views included) per layer. `both` [T, Qin + C + R] is the fused
// input projection's output; q_b_weight is [H * (N + R), Qin] (or undefined when q_lora_rank is
// None: then Qin = H * (N + R) is the query); with q_b_upcast the query GEMM runs in float32 on
// q_b_weight (the FP32 shadow of a BF16 weight) and rounds back. Entries [slots, W] of one layer
// (exact: the cache dtype, no FP8 scales) receive the step's rows at `slots`; keys are read from
// whole blocks [T, Nb], the first `keys` of them unmasked (keys > 0), or all under bias [T, 1, Nb*BS].
bool moe_supported();

torch::Tensor mla_decode(const torch::Tensor& both, const c10::optional<torch::Tensor>& q_a_norm_weight, double q_a_eps,
                         const c10::optional<torch::Tensor>& q_b_weight, bool q_b_upcast,
                         const torch::Tensor& kv_norm_weight, double kv_eps, const torch::Tensor& cos,
                         const torch::Tensor& sin, bool interleave, torch::Tensor entries, const torch::Tensor& slots,
                         const torch::Tensor& w_uk, const torch::Tensor& w_uv, const torch::Tensor& blocks,
                         const torch::Tensor& lengths, int64_t keys, const c10::optional<torch::Tensor>& bias,
                         const c10::optional<torch::Tensor>& scales, const c10::optional<torch::Tensor>& tiles,
                         int64_t block_size, int64_t heads, int64_t nope_dim, int64_t rope_dim, int64_t v_dim,
                         double softmax_scale) {
  const int64_t T = both.size(0), C = kv_norm_weight.size(0), W = C + rope_dim, H = heads;
  const bool fp8 = scales.has_value();
  TORCH_CHECK(!fp8 || (moe_supported() && tiles.has_value() && entries.scalar_type() == at::kFloat8_e4m3fn &&
                       scales->scalar_type() == torch::kFloat && scales->is_contiguous() && scales->dim() == 2 &&
                       scales->size(0) == entries.size(0) && tiles->scalar_type() == torch::kLong &&
                       tiles->dim() == 2 && tiles->size(0) == scales->size(1) && tiles->size(1) == 2 && C % 16 == 0),
              "mla_decode: an FP8 cache needs AVX-512, float32 scales [slots, NT], int64 tiles [NT, 2] and a latent "
              "width divisible by 16");
  TORCH_CHECK(both.dim() == 2 && entries.dim() == 2 && entries.size(1) == W && entries.is_contiguous() &&
              w_uk.scalar_type() == torch::kFloat && w_uv.scalar_type() == torch::kFloat,
              "mla_decode: both [T, Qin + C + R], contiguous entries [slots, C + R] and float32 W_UK/W_UV expected");
  const int64_t q_width = both.size(1) - W;
  auto parts = both.split_with_sizes({q_width, C, rope_dim}, -1);
  torch::Tensor q = parts[0];
  if (q_b_weight.has_value()) {
    q = rms_norm(q, *q_a_norm_weight, q_a_eps);
    q = q_b_upcast ? at::linear(q.to(torch::kFloat), *q_b_weight).to(both.scalar_type()) : at::linear(q, *q_b_weight);
  }
  q = q.view({T, H, nope_dim + rope_dim});
  auto q_split = q.split_with_sizes({nope_dim, rope_dim}, -1);
  // the heads' RoPE parts and the shared RoPE key, rotated in one call: [T, H + 1, R]
  auto ropes = rope(at::cat({q_split[1], parts[2].unsqueeze(1)}, 1), cos, sin, interleave);
  auto latent = rms_norm(parts[1], kv_norm_weight, kv_eps);
  auto rows_TW = at::cat({latent, ropes.select(1, H)}, -1);
  std::vector<int64_t> vec_tile;  // FP8: the scale tile of each 16-entry vector
  if (fp8) {
    // as PagedLatentCache.write: per token and tile, scale = max(|x|, 1e-12) / 448, codes x / scale
    auto rows32 = rows_TW.to(torch::kFloat).contiguous();
    auto sc = slots.contiguous();
    auto tc = tiles->contiguous();
    const float* px = rows32.data_ptr<float>();
    const int64_t* ps = sc.data_ptr<int64_t>();
    const int64_t* pt = tc.data_ptr<int64_t>();
    const int64_t NT = tc.size(0);
    float* pscale = scales->data_ptr<float>();
    auto* pcode = static_cast<c10::Float8_e4m3fn*>(entries.data_ptr());
    for (int64_t t = 0; t < T; ++t) {
      TORCH_CHECK(ps[t] >= 0 && ps[t] < entries.size(0), "mla_decode: slot ", ps[t], " outside the cache");
      for (int64_t j = 0; j < NT; ++j) {
        float amax = 0.0f;
        for (int64_t w = pt[2 * j]; w < pt[2 * j + 1]; ++w) amax = std::max(amax, std::abs(px[t * W + w]));
        const float scale = std::max(amax, 1e-12f) / 448.0f;
        pscale[ps[t] * NT + j] = scale;
        for (int64_t w = pt[2 * j]; w < pt[2 * j + 1]; ++w)
          pcode[ps[t] * W + w] = c10::Float8_e4m3fn(px[t * W + w] / scale);
      }
    }
    for (int64_t v = 0; v < (W + 15) / 16; ++v) {
      int64_t j = 0;
      while (j + 1 < NT && pt[2 * (j + 1)] <= 16 * v) ++j;
      vec_tile.push_back(j);
    }
  } else {
    entries.index_copy_(0, slots, rows_TW.to(entries.scalar_type()));
  }
  // absorbed attention over the decode sequences' blocks, in float32
  const int64_t Nb = blocks.size(1);
#ifdef EXPERTMESH_MOE_AVX512
  if (moe_supported()) {  // read in place (attn::decode); the ATen ops below otherwise
    TORCH_CHECK(lengths.scalar_type() == torch::kLong && lengths.numel() == T && blocks.scalar_type() == torch::kLong &&
                blocks.size(0) == T && w_uk.is_contiguous() && w_uv.is_contiguous(),
                "mla_decode: int64 lengths [T] and blocks [T, Nb], contiguous W_UK/W_UV expected");
    auto bc = blocks.contiguous();
    auto lc = lengths.contiguous();
    const int64_t* pl = lc.data_ptr<int64_t>();
    const int64_t* pb = bc.data_ptr<int64_t>();
    const int64_t num_blocks = entries.size(0) / block_size;
    for (int64_t t = 0; t < T; ++t) {
      TORCH_CHECK(pl[t] >= 1 && pl[t] <= Nb * block_size, "mla_decode: length ", pl[t], " outside [1, ",
                  Nb * block_size, "]");
      for (int64_t n = 0; n < (pl[t] + block_size - 1) / block_size; ++n)
        TORCH_CHECK(pb[t * Nb + n] >= 0 && pb[t * Nb + n] < num_blocks, "mla_decode: block id ", pb[t * Nb + n],
                    " outside [0, ", num_blocks, ")");
    }
    auto qn = q_split[0].to(torch::kFloat).contiguous();
    auto qr = ropes.narrow(1, 0, H).to(torch::kFloat).contiguous();
    auto out = torch::empty({T, H * v_dim}, qn.options());
    auto run = [&](const auto& rows) {
      attn::decode(qn.data_ptr<float>(), qr.data_ptr<float>(), w_uk.data_ptr<float>(), w_uv.data_ptr<float>(),
                   static_cast<float>(softmax_scale), rows, pb, pl, T, H, nope_dim, rope_dim, C, v_dim, Nb, block_size,
                   out.data_ptr<float>());
    };
    if (fp8)
      run(attn::Rows<uint8_t>{static_cast<const uint8_t*>(entries.data_ptr()), W, scales->data_ptr<float>(),
                              scales->size(1), vec_tile.data()});
    else if (entries.scalar_type() == torch::kFloat)
      run(attn::Rows<float>{entries.data_ptr<float>(), W});
    else
      run(attn::Rows<c10::BFloat16>{entries.data_ptr<c10::BFloat16>(), W});
    return out.to(both.scalar_type());
  }
#endif
  auto cache_rows = entries.view({entries.size(0) / block_size, block_size * W})
                        .index_select(0, blocks.reshape(-1)).view({T, Nb * block_size, W}).to(torch::kFloat);
  if (!bias.has_value()) cache_rows = cache_rows.narrow(1, 0, keys);
  auto q_latent = at::bmm(q_split[0].to(torch::kFloat).transpose(0, 1), w_uk).transpose(0, 1);  // [T, H, C]
  auto q_THW = at::cat({q_latent, ropes.narrow(1, 0, H).to(torch::kFloat)}, -1) * softmax_scale;
  auto scores = at::bmm(q_THW, cache_rows.transpose(1, 2));  // [T, H, keys]
  if (bias.has_value()) scores = scores + *bias;
  auto probs = scores.softmax(-1, torch::kFloat);
  auto out_THC = at::bmm(probs, cache_rows.narrow(2, 0, C));
  auto out_HTV = at::bmm(out_THC.transpose(0, 1), w_uv.transpose(1, 2));
  return out_HTV.transpose(0, 1).reshape({T, H * v_dim}).to(both.scalar_type());
}

// ---- MoE routing: from the gate's sigmoid scores to each token's experts and weights ----
// Gate.forward's selection in one pass per token (T x E is small: the eager form is ~12 kernels):
// choice = score + bias; with groups, each group is scored by the sum of its two best choices,
// the topk_group best groups kept and the others' experts excluded; then the top_k choices, in
// descending order (ties: the lower index first), weighted by their unbiased scores, normalised to
// sum 1 when `normalize`, times `scale`.
std::vector<torch::Tensor> moe_route(const torch::Tensor& scores, const torch::Tensor& bias, int64_t n_group,
                                     int64_t topk_group, int64_t top_k, bool normalize, double scale) {
  TORCH_CHECK(scores.device().is_cpu() && scores.scalar_type() == torch::kFloat && scores.dim() == 2,
              "moe_route: float32 CPU scores [T, E] expected");
  const int64_t T = scores.size(0), E = scores.size(1);
  TORCH_CHECK(bias.scalar_type() == torch::kFloat && bias.numel() == E, "moe_route: float32 bias [", E, "] expected");
  TORCH_CHECK(top_k >= 1 && top_k <= E, "moe_route: top_k must be in [1, ", E, "]");
  const bool grouped = n_group > 1 && topk_group < n_group;
  TORCH_CHECK(!grouped || (E % n_group == 0 && E / n_group >= 2 && topk_group >= 1),
              "moe_route: groups need E divisible by n_group, two experts per group and topk_group >= 1");
  auto sc = scores.contiguous();
  auto bc = bias.contiguous();
  auto ids = torch::empty({T, top_k}, torch::TensorOptions().dtype(torch::kLong));
  auto weights = torch::empty({T, top_k}, sc.options());
  const float* ps = sc.data_ptr<float>();
  const float* pb = bc.data_ptr<float>();
  int64_t* pi = ids.data_ptr<int64_t>();
  float* pw = weights.data_ptr<float>();
  const int64_t per_group = grouped ? E / n_group : E;
  const float fscale = static_cast<float>(scale);
  std::vector<float> choice(E), group_score(std::max<int64_t>(n_group, 1));
  std::vector<int64_t> order(std::max(E, n_group));
  // a before b in descending order of v, the lower index first among equals
  auto before = [](const std::vector<float>& v) {
    return [&v](int64_t a, int64_t b) { return v[a] > v[b] || (v[a] == v[b] && a < b); };
  };
  for (int64_t t = 0; t < T; ++t) {
    const float* s = ps + t * E;
    for (int64_t e = 0; e < E; ++e) choice[e] = s[e] + pb[e];
    if (grouped) {
      for (int64_t g = 0; g < n_group; ++g) {
        float best = -INFINITY, second = -INFINITY;
        for (int64_t e = g * per_group; e < (g + 1) * per_group; ++e) {
          if (choice[e] > best) second = best, best = choice[e];
          else if (choice[e] > second) second = choice[e];
        }
        group_score[g] = best + second;
      }
      std::iota(order.begin(), order.begin() + n_group, 0);
      std::partial_sort(order.begin(), order.begin() + topk_group, order.begin() + n_group, before(group_score));
      std::vector<bool> kept(n_group, false);
      for (int64_t i = 0; i < topk_group; ++i) kept[order[i]] = true;
      for (int64_t e = 0; e < E; ++e)
        if (!kept[e / per_group]) choice[e] = -INFINITY;
    }
    std::iota(order.begin(), order.begin() + E, 0);
    std::partial_sort(order.begin(), order.begin() + top_k, order.begin() + E, before(choice));
    float sum = 0.f;
    for (int64_t k = 0; k < top_k; ++k) {
      pi[t * top_k + k] = order[k];
      pw[t * top_k + k] = s[order[k]];
      sum += s[order[k]];
    }
    for (int64_t k = 0; k < top_k; ++k) {
      float w = pw[t * top_k + k];
      if (normalize) w = w / (sum + 1e-20f);
      pw[t * top_k + k] = w * fscale;
    }
  }
  return {ids, weights};
}

bool moe_supported() {
#ifdef EXPERTMESH_MOE_AVX512
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

// The first maximum of each row of float32 x [B, V] as int64 [B] (NaN counts as the maximum), as
// x.max(dim=-1).indices; rows over the threads.
torch::Tensor argmax_rows(const torch::Tensor& x) {
  TORCH_CHECK(moe_supported(), "argmax_rows: needs an x86-64 CPU with AVX-512 (F, BW, VL, DQ)");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat && x.dim() == 2 && x.size(1) >= 1 &&
              x.size(1) < (int64_t(1) << 31), "argmax_rows: float32 CPU x [B, V] with 1 <= V < 2^31 expected");
  auto xc = x.contiguous();
  const int64_t B = xc.size(0), V = xc.size(1);
  auto out = torch::empty({B}, torch::TensorOptions().dtype(torch::kLong));
  const float* px = xc.data_ptr<float>();
  int64_t* po = out.data_ptr<int64_t>();
#ifdef EXPERTMESH_MOE_AVX512
  at::parallel_for(0, B, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) po[b] = pick::first_max(px + b * V, V);
  });
#endif
  return out;
}

// float8 e4m3fn codes (any shape, as uint8 or float8_e4m3fn) -> float32 through the decode the
// attention kernel uses on FP8 caches (attn::fp8_e4m3fn_to_float); exposed for its tests.
torch::Tensor fp8_to_float(const torch::Tensor& codes) {
  TORCH_CHECK(moe_supported(), "fp8_to_float: needs an x86-64 CPU with AVX-512 (F, BW, VL, DQ)");
  TORCH_CHECK(codes.device().is_cpu() && codes.element_size() == 1, "fp8_to_float: one-byte CPU codes expected");
  auto c = codes.contiguous();
  auto out = torch::empty(c.sizes(), c.options().dtype(torch::kFloat));
#ifdef EXPERTMESH_MOE_AVX512
  attn::fp8_to_float(static_cast<const uint8_t*>(c.data_ptr()), c.numel(), out.data_ptr<float>());
#endif
  return out;
}

// y [T, D] (x's dtype) = sum over each token's routed experts of weight * SwiGLU expert(x), then
// its shared experts (weight 1); and the routed experts' token counts [num_routed] (int64).
// x [T, D] float32 or bfloat16; ids [T, K] int64 in [0, num_routed); weights [T, K] float32;
// w13 [E, D, 2F] and w2 [E, F, D] contiguous, x's dtype, E = num_routed + shared experts.
std::vector<torch::Tensor> moe_experts(const torch::Tensor& x, const torch::Tensor& ids, const torch::Tensor& weights,
                                       const torch::Tensor& w13, const torch::Tensor& w2, int64_t num_routed) {
  TORCH_CHECK(moe_supported(), "moe_experts: needs an x86-64 CPU with AVX-512 (F, BW, VL, DQ)");
  const auto dt = x.scalar_type();
  TORCH_CHECK(x.device().is_cpu() && (dt == torch::kFloat || dt == torch::kBFloat16) && x.dim() == 2,
              "moe_experts: float32 or bfloat16 CPU x [T, D] expected");
  const int64_t T = x.size(0), D = x.size(1);
  TORCH_CHECK(w13.dim() == 3 && w2.dim() == 3 && w13.scalar_type() == dt && w2.scalar_type() == dt &&
              w13.is_contiguous() && w2.is_contiguous() && w13.size(1) == D && w13.size(2) % 2 == 0 &&
              w2.size(0) == w13.size(0) && w2.size(1) == w13.size(2) / 2 && w2.size(2) == D,
              "moe_experts: contiguous w13 [E, ", D, ", 2F] and w2 [E, F, ", D, "] of x's dtype expected");
  const int64_t E = w13.size(0), F = w2.size(1);
  TORCH_CHECK(num_routed >= 1 && num_routed <= E, "moe_experts: num_routed must be in [1, ", E, "]");
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == T && ids.scalar_type() == torch::kLong && weights.sizes() == ids.sizes() &&
              weights.scalar_type() == torch::kFloat, "moe_experts: ids [T, K] int64 and weights [T, K] float32 expected");
  auto ic = ids.contiguous();
  auto wc = weights.contiguous();
  const int64_t K = ic.size(1);
  const int64_t* pid = ic.data_ptr<int64_t>();
  for (int64_t i = 0; i < T * K; ++i)
    TORCH_CHECK(pid[i] >= 0 && pid[i] < num_routed, "moe_experts: expert id ", pid[i], " outside [0, ", num_routed, ")");
  auto x32 = x.to(torch::kFloat).contiguous();
  auto y32 = torch::empty({T, D}, x32.options());
  auto counts = torch::zeros({num_routed}, ids.options());
#ifdef EXPERTMESH_MOE_AVX512
  if (dt == torch::kFloat)
    moe::run<float>(x32.data_ptr<float>(), T, D, F, pid, wc.data_ptr<float>(), K, w13.data_ptr<float>(),
                    w2.data_ptr<float>(), E, num_routed, y32.data_ptr<float>(), counts.data_ptr<int64_t>());
  else
    moe::run<c10::BFloat16>(x32.data_ptr<float>(), T, D, F, pid, wc.data_ptr<float>(), K,
                            w13.data_ptr<c10::BFloat16>(), w2.data_ptr<c10::BFloat16>(), E, num_routed,
                            y32.data_ptr<float>(), counts.data_ptr<int64_t>());
#endif
  return {dt == torch::kFloat ? y32 : y32.to(dt), counts};
}
"""


# The scalar kernel's exp is std::exp, ATen's is vectorised: past ~2K outputs the two eager
# kernels win (Xeon, hot: 192 outputs 1.6 vs 5.5 us, 1536 6.0 vs 6.8, 3072 10.7 vs 7.8, the
# 17-expert dense kernel's 52K 174 vs 27). Batch-1 experts and small dense MLPs fit. FP32 on
# AVX-512 runs the vectorised kernel (act::silu_mul, moe::exp) at any size instead: [600, 384]
# 74 -> 52 us, [2048, 1536] 1240 -> 653 us against the eager pair.
SILU_MUL_MAX_OUTPUTS = 2048

_FUNCTIONS = ("rms_norm", "rope", "silu_mul", "mla_decode", "fp8_to_float", "argmax_rows", "moe_route", "moe_experts", "moe_supported")
# -fopenmp: ATen's parallel_for is inline OpenMP in its headers (without the flag it runs on one
# thread); the symbols resolve to the libgomp torch has loaded, no second OpenMP runtime is linked.
_CFLAGS = ("-O3", "-fopenmp")


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
    one pass (CPU inference, FP32 or BF16, up to ``SILU_MUL_MAX_OUTPUTS`` outputs but FP32 on
    AVX-512 at any size), else None for
    the caller's eager form."""
    if ((h.numel() > 2 * SILU_MUL_MAX_OUTPUTS and not (h.dtype == torch.float32 and _moe_supported()))
            or (scale is not None and (scale.dtype != h.dtype or scale.shape != h.shape[:-1]))
            or (k := _kernels_for(h)) is None):
        return None
    rows = h.shape[:-1].numel()
    out = k.silu_mul(h.reshape(rows, h.shape[-1]), None if scale is None else scale.reshape(rows))
    return out.view(*h.shape[:-1], h.shape[-1] // 2)


def fused_mla_decode(both_TO: torch.Tensor, q_a_norm_weight: torch.Tensor | None, q_a_eps: float,
                     q_b_weight: torch.Tensor | None, q_b_upcast: bool, kv_norm_weight: torch.Tensor, kv_eps: float,
                     cos_TR: torch.Tensor, sin_TR: torch.Tensor, interleave: bool, entries_SW: torch.Tensor,
                     slots_T: torch.Tensor, w_uk: torch.Tensor, w_uv: torch.Tensor, blocks_TN: torch.Tensor,
                     lengths_T: torch.Tensor, keys: int, bias_T1K: torch.Tensor | None, scales_SN: torch.Tensor | None,
                     tiles_N2: torch.Tensor | None, block_size: int, heads: int, nope_dim: int, rope_dim: int,
                     v_dim: int, softmax_scale: float) -> torch.Tensor | None:
    """One layer's MLA decode from the fused input projection's output to ``o_proj``'s input in one
    call (see ``MLA.decode_fused``, which resolves the arguments): [T, H*V] in ``both_TO``'s dtype,
    the new entries written to ``entries_SW`` (FP8 codes and ``scales_SN`` per tile of ``tiles_N2``
    when those are given). None where the kernels do not run (the caller's Python steps then)."""
    if ((k := _kernels_for(both_TO)) is None or not entries_SW.is_contiguous()
            or (scales_SN is not None and not _moe_supported())):
        return None
    return k.mla_decode(both_TO, q_a_norm_weight, q_a_eps, q_b_weight, q_b_upcast, kv_norm_weight, kv_eps, cos_TR,
                        sin_TR, interleave, entries_SW, slots_T, w_uk, w_uv, blocks_TN, lengths_T, keys, bias_T1K,
                        scales_SN, tiles_N2, block_size, heads, nope_dim, rope_dim, v_dim, softmax_scale)


def fused_moe_route(scores_TE: torch.Tensor, bias_E: torch.Tensor, n_group: int, topk_group: int, top_k: int,
                    normalize: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``Gate``'s expert selection from its FP32 sigmoid scores in one pass (CPU inference):
    ``(ids_TK int64, weights_TK float32)``, ids in descending order of choice; else None for the
    eager form (other devices, autograd, groups of one expert, which the eager form rejects)."""
    E = scores_TE.shape[-1]
    if (scores_TE.dtype != torch.float32 or bias_E.dtype != torch.float32
            or (n_group > 1 and topk_group < n_group and (E % n_group or E // n_group < 2 or topk_group < 1))
            or (k := _kernels_for(scores_TE)) is None):
        return None
    ids_TK, weights_TK = k.moe_route(scores_TE, bias_E, n_group, topk_group, top_k, normalize, scale)
    return ids_TK, weights_TK


def fused_argmax(logits_BV: torch.Tensor) -> torch.Tensor | None:
    """``logits_BV.max(dim=-1).indices`` (the first maximum; NaN counts as the maximum) of FP32 CPU
    logits in one vectorised pass (~10x faster at [16, 8192]), or None where it does not apply."""
    if (logits_BV.dim() != 2 or logits_BV.dtype != torch.float32 or logits_BV.device.type != "cpu"
            or not logits_BV.shape[1] or not enabled() or not _moe_supported()):
        return None  # (autograd may be on: indices carry no gradient)
    return kernels().argmax_rows(logits_BV)


def moe_supported() -> bool:
    """Whether :func:`fused_moe` can run here at all: the kernels are built and the CPU has AVX-512
    (F, BW, VL, DQ). Says nothing of the switch (:func:`enabled`) or of any input."""
    return _moe_supported()


@functools.cache
def _moe_supported() -> bool:
    k = kernels()
    return k is not None and bool(k.moe_supported())


def fused_moe(x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor, w13_EDH: torch.Tensor,
              w2_EFD: torch.Tensor, num_routed: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The routed experts and then the shared ones (``w13_EDH[num_routed:]``, weight 1 for every
    token) of a batch in one pass: ``(y_TD, routed_counts_E)``, as ``StackedExperts`` returns them.
    Weights input-major and contiguous ([E, D, 2F] gate then up, [E, F, D]), of x's dtype (FP32 or
    BF16, CPU inference, AVX-512); else None for the caller's other kernels. Expert ids outside
    ``[0, num_routed)`` raise ``RuntimeError`` before anything is computed."""
    if (w13_EDH.dtype != x_TD.dtype or w2_EFD.dtype != x_TD.dtype or not w13_EDH.is_contiguous()
            or not w2_EFD.is_contiguous() or (k := _kernels_for(x_TD)) is None or not _moe_supported()):
        return None
    y_TD, counts_E = k.moe_experts(x_TD, ids_TK, weights_TK.float(), w13_EDH, w2_EFD, num_routed)
    return y_TD, counts_E


def status() -> str:
    """One line for the install step (``make venv`` builds the kernels through this)."""
    if not enabled():
        return f"expertmesh CPU kernels: off ({ENV_SWITCH}=0)"
    if kernels() is None:
        return "expertmesh CPU kernels: unavailable, eager PyTorch is used"
    return "expertmesh CPU kernels: ready" + ("" if moe_supported() else " (no AVX-512 here: the MoE, attention and "
                                                                        "argmax kernels fall back to eager PyTorch)")
