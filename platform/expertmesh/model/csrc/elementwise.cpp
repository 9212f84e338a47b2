// Row-wise kernels: RMSNorm, RoPE and the SwiGLU activation, FP32 and BF16.

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

#ifdef EXPERTMESH_AVX512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
// ---- SwiGLU activation, FP32, vectorised ----
namespace act {

// o = SiLU(g) * u (times scale when given) over n floats: SiLU as g / (1 + exp(-g)) with simd::exp;
// the products rounded as the eager ops round them (float32 throughout).
inline void silu_mul(const float* g, const float* u, const float* scale, float* o, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = simd::lanes(n - i);
    const __m512 gv = _mm512_maskz_loadu_ps(m, g + i);
    const __m512 silu = _mm512_div_ps(gv, _mm512_add_ps(one, simd::exp(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
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
#pragma GCC pop_options
#endif  // EXPERTMESH_AVX512

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
#ifdef EXPERTMESH_AVX512
  if (dt == torch::kFloat && avx512_supported()) {  // vectorised exp (AVX-512): any size
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
