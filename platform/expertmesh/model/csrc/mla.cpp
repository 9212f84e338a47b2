// ---- absorbed MLA decode attention, read in place from the paged latent cache ----
// One new token per sequence t: its queries are absorbed (q_nope through W_UK, then the RoPE part,
// times the softmax scale: [H, C + R]), scored against the sequence's first lengths[t] cache
// entries where they lie (block table, no gathered copy, no mask), softmaxed in float32, the
// probabilities applied to the entries' latents ([H, C]) and the result taken through W_UV
// ([H, V]). Sequences are split over the threads. Float32 math; entries float32, bfloat16 or FP8.
#ifdef EXPERTMESH_AVX512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
namespace attn {

using simd::lanes;
using simd::tail_mask;
using simd::vector_mask;

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
    const __mmask16 m = lanes(n - i);
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
  // entries [16 v, 16 v + 16) of a slot as float32 (masked lanes 0; the mask is applied only with
  // TAIL, see simd::load_part)
  template <bool TAIL>
  inline __m512 load(int64_t slot, int64_t v, __mmask16 m) const {
    const E* p = entries + slot * W + 16 * v;
    if constexpr (std::is_same_v<E, uint8_t>) {
      const __m128i c = TAIL ? _mm_maskz_loadu_epi8(m, p) : _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      return _mm512_mul_ps(fp8_e4m3fn_to_float(c), _mm512_set1_ps(scales[slot * NT + vec_tile[v]]));
    } else {
      return simd::load_part<TAIL>(p, m);
    }
  }
};

// The scores of G heads' queries (G rows of nw 16-float vectors, zero past W) against a sequence's
// first L entries (block table `table`): each entry's vectors are loaded once for the G heads,
// whose partial sums stay in registers. probs [G, L]. TAIL: W is not a multiple of 16.
template <int G, bool TAIL, typename E>
void head_scores(const float* q, int64_t nw, __mmask16 w_last, const Rows<E>& rows, const int64_t* table, int64_t BS,
                 int64_t L, float* probs) {
  for (int64_t key = 0, n = 0; key < L; ++n) {
    for (int64_t i = 0; i < BS && key < L; ++i, ++key) {
      const int64_t slot = table[n] * BS + i;
      __m512 s[G];
      for (int g = 0; g < G; ++g) s[g] = _mm512_setzero_ps();
      for (int64_t v = 0; v < nw; ++v) {
        const __m512 r = rows.template load<TAIL>(slot, v, vector_mask(v, nw, w_last));
        for (int g = 0; g < G; ++g) s[g] = _mm512_fmadd_ps(r, _mm512_loadu_ps(q + (g * nw + v) * 16), s[g]);
      }
      for (int g = 0; g < G; ++g) probs[g * L + key] = _mm512_reduce_add_ps(s[g]);
    }
  }
}

// G heads' probabilities [G, L] times the entries' latent vectors v0 .. v0 + NV (register
// accumulators, each entry vector loaded once), stored to acc [H, nc * 16] rows of those heads.
// TAIL: C is not a multiple of 16.
template <int G, int NV, bool TAIL, typename E>
void head_latents(const float* probs, int64_t L, const Rows<E>& rows, const int64_t* table, int64_t BS, int64_t v0,
                  int64_t nc, __mmask16 c_last, float* acc) {
  __m512 a[G][NV];
  for (int g = 0; g < G; ++g)
    for (int v = 0; v < NV; ++v) a[g][v] = _mm512_setzero_ps();
  for (int64_t key = 0, n = 0; key < L; ++n) {
    for (int64_t i = 0; i < BS && key < L; ++i, ++key) {
      const int64_t slot = table[n] * BS + i;
      for (int v = 0; v < NV; ++v) {
        const __m512 latent = rows.template load<TAIL>(slot, v0 + v, vector_mask(v0 + v, nc, c_last));
        for (int g = 0; g < G; ++g) a[g][v] = _mm512_fmadd_ps(_mm512_set1_ps(probs[g * L + key]), latent, a[g][v]);
      }
    }
  }
  for (int g = 0; g < G; ++g)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(acc + g * nc * 16 + (v0 + v) * 16, a[g][v]);
}

template <int G, bool TAIL, typename E>
void head_latents_nv(int64_t nv, const float* probs, int64_t L, const Rows<E>& rows, const int64_t* table, int64_t BS,
                     int64_t v0, int64_t nc, __mmask16 c_last, float* acc) {
  switch (nv) {
    case 1: head_latents<G, 1, TAIL>(probs, L, rows, table, BS, v0, nc, c_last, acc); break;
    case 2: head_latents<G, 2, TAIL>(probs, L, rows, table, BS, v0, nc, c_last, acc); break;
    case 3: head_latents<G, 3, TAIL>(probs, L, rows, table, BS, v0, nc, c_last, acc); break;
    default: head_latents<G, 4, TAIL>(probs, L, rows, table, BS, v0, nc, c_last, acc); break;
  }
}

// g (1-4) heads' scores, then their probabilities times latent vectors v0 .. v0 + nv (up to 4)
template <bool TAIL, typename E>
void heads_scores(int64_t g, const float* q, int64_t nw, __mmask16 w_last, const Rows<E>& rows, const int64_t* table,
                  int64_t BS, int64_t L, float* probs) {
  switch (g) {
    case 1: head_scores<1, TAIL>(q, nw, w_last, rows, table, BS, L, probs); break;
    case 2: head_scores<2, TAIL>(q, nw, w_last, rows, table, BS, L, probs); break;
    case 3: head_scores<3, TAIL>(q, nw, w_last, rows, table, BS, L, probs); break;
    default: head_scores<4, TAIL>(q, nw, w_last, rows, table, BS, L, probs); break;
  }
}

template <bool TAIL, typename E>
void heads_latents(int64_t g, int64_t nv, const float* probs, int64_t L, const Rows<E>& rows, const int64_t* table,
                   int64_t BS, int64_t v0, int64_t nc, __mmask16 c_last, float* acc) {
  switch (g) {
    case 1: head_latents_nv<1, TAIL>(nv, probs, L, rows, table, BS, v0, nc, c_last, acc); break;
    case 2: head_latents_nv<2, TAIL>(nv, probs, L, rows, table, BS, v0, nc, c_last, acc); break;
    case 3: head_latents_nv<3, TAIL>(nv, probs, L, rows, table, BS, v0, nc, c_last, acc); break;
    default: head_latents_nv<4, TAIL>(nv, probs, L, rows, table, BS, v0, nc, c_last, acc); break;
  }
}

template <typename E>
void decode(const float* q_nope, const float* q_rope, const float* w_uk, const float* w_uv, float scale,
            const Rows<E>& rows, const int64_t* blocks, const int64_t* lengths, int64_t T, int64_t H, int64_t N,
            int64_t R, int64_t C, int64_t V, int64_t Nb, int64_t BS, float* out) {
  const int64_t W = C + R, nw = (W + 15) / 16, nc = (C + 15) / 16;
  const __mmask16 w_last = tail_mask(W), c_last = tail_mask(C);
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
            a = _mm512_fmadd_ps(_mm512_set1_ps(qn[n]), _mm512_maskz_loadu_ps(vector_mask(v, nc, c_last), w_uk + (h * N + n) * C + 16 * v), a);
          _mm512_mask_storeu_ps(qh + 16 * v, vector_mask(v, nc, c_last), _mm512_mul_ps(a, _mm512_set1_ps(scale)));
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
        const int64_t g = std::min<int64_t>(4, H - h0);
        if (w_last != 0xFFFF) heads_scores<true>(g, qg, nw, w_last, rows, table, BS, L, pg);
        else heads_scores<false>(g, qg, nw, w_last, rows, table, BS, L, pg);
      }
      for (int64_t h = 0; h < H; ++h) {  // softmax of each head's scores
        float* p = probs.data() + h * L;
        float mx = -INFINITY, sum = 0.0f;
        for (int64_t k = 0; k < L; ++k) mx = std::max(mx, p[k]);
        for (int64_t k = 0; k < L; k += 16) {
          const __mmask16 m = lanes(L - k);
          const __m512 e = simd::exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p + k), _mm512_set1_ps(mx)));
          _mm512_mask_storeu_ps(p + k, m, e);
          sum += _mm512_mask_reduce_add_ps(m, e);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / sum);
        for (int64_t k = 0; k < L; k += 16) {
          const __mmask16 m = lanes(L - k);
          _mm512_mask_storeu_ps(p + k, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p + k), inv));
        }
      }
      // probabilities times the latents: [H, C], blocks of four heads by four latent vectors
      for (int64_t h0 = 0; h0 < H; h0 += 4)
        for (int64_t v0 = 0; v0 < nc; v0 += 4) {
          const int64_t nv = std::min<int64_t>(4, nc - v0);
          const float* pg = probs.data() + h0 * L;
          float* ag = acc.data() + h0 * nc * 16;
          const int64_t g = std::min<int64_t>(4, H - h0);
          if (c_last != 0xFFFF) heads_latents<true>(g, nv, pg, L, rows, table, BS, v0, nc, c_last, ag);
          else heads_latents<false>(g, nv, pg, L, rows, table, BS, v0, nc, c_last, ag);
        }
      // through W_UV [H, V, C]: out[t, h * V + j] = <acc[h], W_UV[h, j]>
      for (int64_t h = 0; h < H; ++h)
        for (int64_t j = 0; j < V; ++j) {
          const float* w = w_uv + (h * V + j) * C;
          __m512 s = _mm512_setzero_ps();
          for (int64_t v = 0; v < nc; ++v)
            s = _mm512_fmadd_ps(_mm512_loadu_ps(acc.data() + (h * nc + v) * 16),
                                _mm512_maskz_loadu_ps(vector_mask(v, nc, c_last), w + 16 * v), s);
          out[(t * H + h) * V + j] = _mm512_reduce_add_ps(s);
        }
    }
  });
}

}  // namespace attn
#pragma GCC pop_options
#endif  // EXPERTMESH_AVX512

// x [T, D] through `weight` as layers.fast_linear would run it (layers.weight_operand): blocked
// ([strips, D, 32], blocked_linear, `out_features` outputs), or [out, D] by at::linear, in float32
// on it and rounded back when `upcast` (the FP32 copy of a BF16 weight).
torch::Tensor operand_linear(const torch::Tensor& x, const torch::Tensor& weight, bool upcast, int64_t out_features) {
  if (weight.dim() == 3) return blocked_linear(x, weight, out_features);
  return upcast ? at::linear(x.to(torch::kFloat), weight).to(x.scalar_type()) : at::linear(x, weight);
}

// ---- MLA decode step of one layer, from the input projection's output to o_proj's input ----
// The engine's decode path (runner.attention -> MLA.project -> cache.write -> attend_latent_rows)
// as one call: the same ATen ops and fused kernels in the same order, so the same values, without
// ~150 Python-level tensor ops (views included) per layer. `both` [T, Qin + C + R] is the fused
// input projection's output; q_b_weight is [H * (N + R), Qin] (or undefined when q_lora_rank is
// None: then Qin = H * (N + R) is the query), or that weight blocked for blocked_linear
// ([strips, Qin, 32]); with q_b_upcast the query GEMM runs in float32 on q_b_weight (the FP32
// shadow of a BF16 weight) and rounds back. Entries [slots, W] of one layer
// (exact: the cache dtype, no FP8 scales) receive the step's rows at `slots`; keys are read from
// whole blocks [T, Nb], the first `keys` of them unmasked (keys > 0), or all under bias [T, 1, Nb*BS].
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
  TORCH_CHECK(!fp8 || (avx512_supported() && tiles.has_value() && entries.scalar_type() == at::kFloat8_e4m3fn &&
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
    q = operand_linear(q, *q_b_weight, q_b_upcast, H * (nope_dim + rope_dim));
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
#ifdef EXPERTMESH_AVX512
  if (avx512_supported()) {  // read in place (attn::decode); the ATen ops below otherwise
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

// A decode step's whole attention half of one layer: input RMSNorm of the residual rows x [T, D],
// the fused input projection (in_weight, `in_features_out` = Qin + C + R outputs), mla_decode, and
// o_proj (o_weight): [T, D] in x's dtype, before the residual add. The GEMM operands are what
// layers.weight_operand resolves (see operand_linear), so the values are those of the Python steps.
torch::Tensor mla_decode_layer(const torch::Tensor& x, const torch::Tensor& in_norm_weight, double in_eps,
                               const torch::Tensor& in_weight, bool in_upcast, int64_t in_features_out,
                               const torch::Tensor& o_weight, bool o_upcast,
                               const c10::optional<torch::Tensor>& q_a_norm_weight, double q_a_eps,
                               const c10::optional<torch::Tensor>& q_b_weight, bool q_b_upcast,
                               const torch::Tensor& kv_norm_weight, double kv_eps, const torch::Tensor& cos,
                               const torch::Tensor& sin, bool interleave, torch::Tensor entries,
                               const torch::Tensor& slots, const torch::Tensor& w_uk, const torch::Tensor& w_uv,
                               const torch::Tensor& blocks, const torch::Tensor& lengths, int64_t keys,
                               const c10::optional<torch::Tensor>& bias, const c10::optional<torch::Tensor>& scales,
                               const c10::optional<torch::Tensor>& tiles, int64_t block_size, int64_t heads,
                               int64_t nope_dim, int64_t rope_dim, int64_t v_dim, double softmax_scale) {
  TORCH_CHECK(x.dim() == 2, "mla_decode_layer: residual rows x [T, D] expected");
  auto both = operand_linear(rms_norm(x, in_norm_weight, in_eps), in_weight, in_upcast, in_features_out);
  auto out = mla_decode(both, q_a_norm_weight, q_a_eps, q_b_weight, q_b_upcast, kv_norm_weight, kv_eps, cos, sin,
                        interleave, entries, slots, w_uk, w_uv, blocks, lengths, keys, bias, scales, tiles, block_size,
                        heads, nope_dim, rope_dim, v_dim, softmax_scale);
  return operand_linear(out, o_weight, o_upcast, x.size(1));
}

// float8 e4m3fn codes (any shape, as uint8 or float8_e4m3fn) -> float32 through the decode the
// attention kernel uses on FP8 caches (attn::fp8_e4m3fn_to_float); exposed for its tests.
torch::Tensor fp8_to_float(const torch::Tensor& codes) {
  TORCH_CHECK(avx512_supported(), "fp8_to_float: needs an x86-64 CPU with AVX-512 (F, BW, VL, DQ)");
  TORCH_CHECK(codes.device().is_cpu() && codes.element_size() == 1, "fp8_to_float: one-byte CPU codes expected");
  auto c = codes.contiguous();
  auto out = torch::empty(c.sizes(), c.options().dtype(torch::kFloat));
#ifdef EXPERTMESH_AVX512
  attn::fp8_to_float(static_cast<const uint8_t*>(c.data_ptr()), c.numel(), out.data_ptr<float>());
#endif
  return out;
}
