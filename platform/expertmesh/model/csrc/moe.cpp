// ---- MoE experts: gate/up GEMM + SwiGLU + routing weight, then down GEMM into each token's sum ----
// Decode batches put a few rows on each expert (16 tokens x top-4 over 16 experts: ~5), where
// BLAS GEMMs stream the expert's weights at a fraction of the bandwidth and the eager glue
// (gather, activation, weighting, scatter-add) costs more than the arithmetic. Here each expert's
// weights are streamed once per block of up to six rows, with the rows' partial sums in registers:
// a [rows x 16*NV] tile takes one weight load per 16 columns and k, and NR FMAs on it. Threads
// split the output columns, never the experts, so every token's expert outputs are added in
// expert order (routed experts ascending, then the shared ones), whatever the thread count.
// AVX-512 only (checked at run time by avx512_supported); weights input-major (w13 [E, D, 2F], the
// gate's F columns then the up's; w2 [E, F, D]), float32 or bfloat16, math in float32.
#ifdef EXPERTMESH_AVX512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
namespace moe {

using simd::exp;
using simd::load;
using simd::load_part;
using simd::prefetch;
using simd::vector_mask;

// The weight rows AHEAD rows on are requested while this one is used: a tile reads a narrow
// column strip of each row, a stride the hardware prefetchers miss (16 tokens: 1.2-1.5x; 1 and 64
// tokens: the same). A prefetch past the matrix's end is harmless (it cannot fault).
constexpr int64_t AHEAD = 16;

// NR rows (pointers to D floats each) through gate columns [c, c + 16 NV) and the matching up
// columns (F further on) of one expert's w13 [D, 2F]; writes SiLU(gate) * up * weight to the rows'
// activations. `last` masks the last 16-column vector (a block narrower than 16 NV columns: TAIL).
template <int NR, int NV, bool TAIL, typename W>
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
      wg[v] = load_part<TAIL>(wk + 16 * v, vector_mask(v, NV, last));
      wu[v] = load_part<TAIL>(wk + F + 16 * v, vector_mask(v, NV, last));
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
      _mm512_mask_storeu_ps(act[r] + c + 16 * v, vector_mask(v, NV, last), a);
    }
}

// NR activation rows [F] through columns [c, c + 16 NV) of one expert's w2 [F, D], added into
// the rows' token outputs.
template <int NR, int NV, bool TAIL, typename W>
void down_block(const float* const* act, const W* w2, int64_t F, int64_t D, int64_t c, __mmask16 last,
                float* const* y) {
  __m512 acc[NR][NV];
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < F; ++k) {
    const W* wk = w2 + k * D + c;
    for (int v = 0; v < NV; ++v) prefetch(wk + AHEAD * D + 16 * v);
    __m512 wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = load_part<TAIL>(wk + 16 * v, vector_mask(v, NV, last));
    for (int r = 0; r < NR; ++r) {
      const __m512 av = _mm512_set1_ps(act[r][k]);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(av, wv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < NV; ++v) {
      float* out = y[r] + c + 16 * v;
      const __mmask16 m = vector_mask(v, NV, last);
      _mm512_mask_storeu_ps(out, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, out), acc[r][v]));
    }
}

constexpr int ROWS = 6;  // rows per register tile: 6 x 4 accumulators + 4 weights + 1 broadcast of 32 registers

template <int NV, bool TAIL, typename W>
void gate_up_tiles(int n, const float* const* x, const float* weight, const W* w13, int64_t D, int64_t F, int64_t c,
                   __mmask16 last, float* const* act) {
  for (int r = 0; r < n; r += ROWS) {
    const float* const* xr = x + r;
    const float* wr = weight + r;
    float* const* ar = act + r;
    switch (std::min(ROWS, n - r)) {
      case 1: gate_up_block<1, NV, TAIL>(xr, wr, w13, D, F, c, last, ar); break;
      case 2: gate_up_block<2, NV, TAIL>(xr, wr, w13, D, F, c, last, ar); break;
      case 3: gate_up_block<3, NV, TAIL>(xr, wr, w13, D, F, c, last, ar); break;
      case 4: gate_up_block<4, NV, TAIL>(xr, wr, w13, D, F, c, last, ar); break;
      case 5: gate_up_block<5, NV, TAIL>(xr, wr, w13, D, F, c, last, ar); break;
      default: gate_up_block<6, NV, TAIL>(xr, wr, w13, D, F, c, last, ar); break;
    }
  }
}

template <int NV, bool TAIL, typename W>
void down_tiles(int n, const float* const* act, const W* w2, int64_t F, int64_t D, int64_t c, __mmask16 last,
                float* const* y) {
  for (int r = 0; r < n; r += ROWS) {
    const float* const* ar = act + r;
    float* const* yr = y + r;
    switch (std::min(ROWS, n - r)) {
      case 1: down_block<1, NV, TAIL>(ar, w2, F, D, c, last, yr); break;
      case 2: down_block<2, NV, TAIL>(ar, w2, F, D, c, last, yr); break;
      case 3: down_block<3, NV, TAIL>(ar, w2, F, D, c, last, yr); break;
      case 4: down_block<4, NV, TAIL>(ar, w2, F, D, c, last, yr); break;
      case 5: down_block<5, NV, TAIL>(ar, w2, F, D, c, last, yr); break;
      default: down_block<6, NV, TAIL>(ar, w2, F, D, c, last, yr); break;
    }
  }
}

template <bool TAIL, typename W>
void gate_up_tiles_any(int nv, int n, const float* const* x, const float* weight, const W* w13, int64_t D, int64_t F,
                       int64_t c, __mmask16 last, float* const* act) {
  if (nv == 1) gate_up_tiles<1, TAIL>(n, x, weight, w13, D, F, c, last, act);
  else gate_up_tiles<2, TAIL>(n, x, weight, w13, D, F, c, last, act);
}

template <bool TAIL, typename W>
void down_tiles_any(int nv, int n, const float* const* act, const W* w2, int64_t F, int64_t D, int64_t c,
                    __mmask16 last, float* const* y) {
  switch (nv) {
    case 1: down_tiles<1, TAIL>(n, act, w2, F, D, c, last, y); break;
    case 2: down_tiles<2, TAIL>(n, act, w2, F, D, c, last, y); break;
    case 3: down_tiles<3, TAIL>(n, act, w2, F, D, c, last, y); break;
    default: down_tiles<4, TAIL>(n, act, w2, F, D, c, last, y); break;
  }
}

// Column blocks of `width` columns over `cols`: [start, vectors, mask of the last vector].
struct Block { int64_t col; int nv; __mmask16 last; };
inline std::vector<Block> blocks(int64_t cols, int64_t width) {
  std::vector<Block> out;
  for (int64_t c = 0; c < cols; c += width) {
    const int64_t w = std::min(width, cols - c);
    out.push_back({c, static_cast<int>((w + 15) / 16), simd::tail_mask(w)});
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
        if (blk.last != 0xFFFF)  // a width that is not a multiple of 16: masked loads
          gate_up_tiles_any<true>(blk.nv, n, xr, wr, w, D, F, blk.col, blk.last, ar);
        else
          gate_up_tiles_any<false>(blk.nv, n, xr, wr, w, D, F, blk.col, blk.last, ar);
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
        if (blk.last != 0xFFFF)
          down_tiles_any<true>(blk.nv, n, ar, w, F, D, blk.col, blk.last, yr);
        else
          down_tiles_any<false>(blk.nv, n, ar, w, F, D, blk.col, blk.last, yr);
      }
    }
  });
}

}  // namespace moe
#pragma GCC pop_options
#endif  // EXPERTMESH_AVX512

// y [T, D] (x's dtype) = sum over each token's routed experts of weight * SwiGLU expert(x), then
// its shared experts (weight 1); and the routed experts' token counts [num_routed] (int64).
// x [T, D] float32 or bfloat16; ids [T, K] int64 in [0, num_routed); weights [T, K] float32;
// w13 [E, D, 2F] and w2 [E, F, D] contiguous, x's dtype, E = num_routed + shared experts.
std::vector<torch::Tensor> moe_experts(const torch::Tensor& x, const torch::Tensor& ids, const torch::Tensor& weights,
                                       const torch::Tensor& w13, const torch::Tensor& w2, int64_t num_routed) {
  TORCH_CHECK(avx512_supported(), "moe_experts: needs an x86-64 CPU with AVX-512 (F, BW, VL, DQ)");
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
#ifdef EXPERTMESH_AVX512
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

// A decode batch's whole MoE layer on normalised rows x [T, D]: the gate's FP32 scores (the eager
// Gate's linear and sigmoid, so the same values), moe_route, then moe_experts; returns what
// moe_experts returns. gate_weight [E_routed, D]; the other arguments as those two take them.
std::vector<torch::Tensor> moe_layer(const torch::Tensor& x, const torch::Tensor& gate_weight, const torch::Tensor& bias,
                                     int64_t n_group, int64_t topk_group, int64_t top_k, bool normalize, double scale,
                                     const torch::Tensor& w13, const torch::Tensor& w2, int64_t num_routed) {
  auto scores = at::linear(x.to(torch::kFloat), gate_weight.to(torch::kFloat)).sigmoid();
  auto routed = moe_route(scores, bias, n_group, topk_group, top_k, normalize, scale);
  return moe_experts(x, routed[0], routed[1], w13, w2, num_routed);
}
