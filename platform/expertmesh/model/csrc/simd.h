// AVX-512 building blocks of the kernels: loads that widen to float32, exp, lane masks, prefetch.
#ifdef EXPERTMESH_AVX512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
namespace simd {

inline __m512 load(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load(const c10::BFloat16* p, __mmask16 m) {  // bf16 -> f32 is a 16-bit shift
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Whole vectors. GCC 12 at -O3 keeps the register accumulators of a loop that holds a masked load
// in memory as well, one store each per iteration (a fused expert block of 6 x 4 accumulators ran
// 48 stores a step): hot loops read whole vectors and mask only in a TAIL instantiation, chosen
// where a width is not a multiple of 16.
inline __m512 load(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
template <bool TAIL, typename T> inline __m512 load_part(const T* p, __mmask16 m) {
  if constexpr (TAIL) return load(p, m);
  else return load(p);
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

// the first min(n, 16) lanes (n >= 0): the vector at [i, i + 16) of an n-long array is lanes(n - i)
inline __mmask16 lanes(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }
// the lanes of the last 16-wide vector of an n-long array (n >= 1)
inline __mmask16 tail_mask(int64_t n) { return lanes((n - 1) % 16 + 1); }
// vector v of n: all lanes, but `last` for the last one
inline __mmask16 vector_mask(int64_t v, int64_t n, __mmask16 last) { return v == n - 1 ? last : __mmask16(0xFFFF); }

template <typename T> inline void prefetch(const T* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }

}  // namespace simd
#pragma GCC pop_options
#endif  // EXPERTMESH_AVX512
