// ---- greedy sampling: the first maximum of each row of the logits ----
#ifdef EXPERTMESH_AVX512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
namespace pick {

// index of the first maximum of x[0..n), NaN counting as the maximum (the first NaN), as torch.max
inline int64_t first_max(const float* x, int64_t n) {
  __m512 best = _mm512_set1_ps(-INFINITY);
  __m512i best_i = _mm512_set1_epi32(-1), idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  bool nan = false;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = simd::lanes(n - i);
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
#endif  // EXPERTMESH_AVX512


// The first maximum of each row of float32 x [B, V] as int64 [B] (NaN counts as the maximum), as
// x.max(dim=-1).indices; rows over the threads.
torch::Tensor argmax_rows(const torch::Tensor& x) {
  TORCH_CHECK(avx512_supported(), "argmax_rows: needs an x86-64 CPU with AVX-512 (F, BW, VL, DQ)");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat && x.dim() == 2 && x.size(1) >= 1 &&
              x.size(1) < (int64_t(1) << 31), "argmax_rows: float32 CPU x [B, V] with 1 <= V < 2^31 expected");
  auto xc = x.contiguous();
  const int64_t B = xc.size(0), V = xc.size(1);
  auto out = torch::empty({B}, torch::TensorOptions().dtype(torch::kLong));
  const float* px = xc.data_ptr<float>();
  int64_t* po = out.data_ptr<int64_t>();
#ifdef EXPERTMESH_AVX512
  at::parallel_for(0, B, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) po[b] = pick::first_max(px + b * V, V);
  });
#endif
  return out;
}
