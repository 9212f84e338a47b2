// ---- linear layers of a few rows over a column-blocked weight ----
// At decode sizes (up to ~64 rows) a GEMM is bound by streaming its weight, and BLAS re-packs an
// [out, in] weight on every call: MKL runs 16 rows through the 8192x256 lm_head in ~0.7 ms (12 GB/s).
// Stored once as strips of STRIP output columns, [ceil(out / STRIP), in, STRIP] (each strip
// contiguous, zero past `out`), the weight is read front to back once per tile of up to MAX_ROWS
// rows, whose partial sums stay in registers: one weight load per 16 columns and k, then an FMA
// per row. Each output is one dot product summed in input order (k = 0, 1, ...), whatever the
// thread count. Threads split the strips. Weights float32 or bfloat16, math in float32.
#ifdef EXPERTMESH_AVX512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
namespace gemm {

constexpr int64_t STRIP = 32;  // output columns per strip: two vectors
constexpr int MAX_ROWS = 12;   // rows per tile: 2 x 12 accumulators, 2 weight vectors, 1 broadcast
constexpr int64_t AHEAD = 32;  // the weight row requested this many k ahead (4 KB)

// NR rows of x (row stride ldx) through one strip [K, STRIP]; columns past the layer's width are
// masked off by m0/m1 when stored to y (row stride ldy).
template <int NR, typename W>
void tile(const float* x, int64_t ldx, const W* strip, int64_t K, float* y, int64_t ldy, __mmask16 m0, __mmask16 m1) {
  __m512 acc[NR][2];
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < 2; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    simd::prefetch(strip + (k + AHEAD) * STRIP);
    __m512 w[2];
    for (int v = 0; v < 2; ++v) w[v] = simd::load(strip + k * STRIP + 16 * v);  // strips are whole
    for (int r = 0; r < NR; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * ldx + k]);
      for (int v = 0; v < 2; ++v) acc[r][v] = _mm512_fmadd_ps(xv, w[v], acc[r][v]);
    }
  }
  for (int r = 0; r < NR; ++r) {
    _mm512_mask_storeu_ps(y + r * ldy, m0, acc[r][0]);
    _mm512_mask_storeu_ps(y + r * ldy + 16, m1, acc[r][1]);
  }
}

template <typename W>
void tile_any(int nr, const float* x, int64_t ldx, const W* strip, int64_t K, float* y, int64_t ldy, __mmask16 m0,
              __mmask16 m1) {
  switch (nr) {
#define EXPERTMESH_TILE(n) \
  case n: tile<n>(x, ldx, strip, K, y, ldy, m0, m1); break;
    EXPERTMESH_TILE(1) EXPERTMESH_TILE(2) EXPERTMESH_TILE(3) EXPERTMESH_TILE(4) EXPERTMESH_TILE(5) EXPERTMESH_TILE(6)
    EXPERTMESH_TILE(7) EXPERTMESH_TILE(8) EXPERTMESH_TILE(9) EXPERTMESH_TILE(10) EXPERTMESH_TILE(11)
    default: tile<MAX_ROWS>(x, ldx, strip, K, y, ldy, m0, m1); break;
#undef EXPERTMESH_TILE
  }
}

// y [M, N] = x [M, K] (float32, contiguous) through the blocked weight [ceil(N / STRIP), K, STRIP].
template <typename W>
void run(const float* x, int64_t M, int64_t K, const W* blocked, int64_t N, float* y) {
  const int64_t strips = (N + STRIP - 1) / STRIP;
  // a chunk of strips worth at least ~64K multiply-adds: smaller GEMMs stay on the calling thread
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, M * K * STRIP));
  at::parallel_for(0, strips, grain, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t cols = std::min(STRIP, N - s * STRIP);
      const __mmask16 m0 = simd::lanes(cols), m1 = simd::lanes(cols - 16 > 0 ? cols - 16 : 0);
      for (int64_t r0 = 0; r0 < M; r0 += MAX_ROWS)
        tile_any(static_cast<int>(std::min<int64_t>(MAX_ROWS, M - r0)), x + r0 * K, K, blocked + s * K * STRIP, K,
                 y + r0 * N + s * STRIP, N, m0, m1);
    }
  });
}

}  // namespace gemm
#pragma GCC pop_options
#endif  // EXPERTMESH_AVX512

// x [..., K] (float32 or bfloat16) through a weight blocked as gemm::run reads it, [ceil(N / 32),
// K, 32] of float32 or bfloat16: [..., N] in x's dtype (bfloat16 rounded once, from the float32 sums).
torch::Tensor blocked_linear(const torch::Tensor& x, const torch::Tensor& blocked, int64_t out_features) {
  TORCH_CHECK(avx512_supported(), "blocked_linear: needs an x86-64 CPU with AVX-512 (F, BW, VL, DQ)");
  const auto dt = x.scalar_type(), wt = blocked.scalar_type();
  TORCH_CHECK(x.device().is_cpu() && blocked.device().is_cpu() && (dt == torch::kFloat || dt == torch::kBFloat16) &&
              (wt == torch::kFloat || wt == torch::kBFloat16) && x.dim() >= 1 && blocked.dim() == 3 &&
              blocked.is_contiguous(),
              "blocked_linear: float32/bfloat16 CPU x [..., K] and a contiguous blocked weight [strips, K, 32] "
              "expected");
  const int64_t K = x.size(-1), N = out_features;
  TORCH_CHECK(blocked.size(1) == K && blocked.size(2) == 32 && N >= 1 && N <= blocked.size(0) * 32 &&
              N > (blocked.size(0) - 1) * 32, "blocked_linear: weight [", blocked.size(0), ", ", blocked.size(1), ", ",
              blocked.size(2), "] does not hold ", N, " outputs of ", K, " inputs");
  auto x32 = x.to(torch::kFloat).contiguous();
  const int64_t M = x32.numel() / std::max<int64_t>(K, 1);
  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  auto y = torch::empty(out_shape, x32.options());
#ifdef EXPERTMESH_AVX512
  if (M && K) {
    if (wt == torch::kFloat)
      gemm::run(x32.data_ptr<float>(), M, K, blocked.data_ptr<float>(), N, y.data_ptr<float>());
    else
      gemm::run(x32.data_ptr<float>(), M, K, blocked.data_ptr<c10::BFloat16>(), N, y.data_ptr<float>());
  } else {
    y.zero_();
  }
#endif
  return dt == torch::kFloat ? y : y.to(dt);
}
