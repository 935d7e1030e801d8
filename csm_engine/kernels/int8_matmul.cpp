// int8 x int8 matmul for batch-1 CSM inference on x86 CPUs with AVX2.
//
// y (M, N) float32 = x (M, K) float32 @ (w (N, K) int8 * w_scale (N,)).T, w packed (see below)
//
// Each row of x is quantized on entry to int8 in blocks of 32 values, one float32 scale per
// block (absmax / 127). The products run as u8 x s8 pairs (_mm256_maddubs_epi16) with the sign
// of x moved onto w (_mm256_sign_epi8), so |x| <= 127 and |w| <= 127 never saturate the int16
// pair sums (2 * 127 * 127 < 32767), unlike a plain u8 x s8 product of full-range activations.
// Weights must lie in [-127, 127] (csm_engine.quantize rounds them so).
//
// A row's result depends only on that row, not on how many rows share the call: prefilling a
// prompt in blocks and feeding it one row at a time give the same numbers.
//
// Work is split over output channels with at::parallel_for (torch's own thread pool).
// A tile of 4 output channels x R rows keeps 4 * R float accumulators in registers and reuses
// each loaded weight vector R times and each activation vector 4 times.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace {

constexpr int64_t kBlock = 32;

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// Quantize one row of K floats: q (signed), a = |q| (unsigned), s = one scale per 32 values.
// With a norm weight g, the row is first RMS-normalized: x * g is quantized, and the returned
// factor 1 / sqrt(mean(x^2) + eps) is applied to the row's outputs (a per-row scalar commutes
// with the matmul). Without one, the factor is 1.
float quantize_row(const float* x, int64_t K, const float* g, float eps, int8_t* q, uint8_t* a, float* s) {
  const __m256 sign_mask = _mm256_set1_ps(-0.0f);
  __m256 sumsq = _mm256_setzero_ps();
  for (int64_t b = 0; b < K / kBlock; ++b) {
    const float* xb = x + b * kBlock;
    __m256 v[4];
    __m256 m = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(xb + 8 * i);
      if (g != nullptr) {
        sumsq = _mm256_fmadd_ps(v[i], v[i], sumsq);
        v[i] = _mm256_mul_ps(v[i], _mm256_loadu_ps(g + b * kBlock + 8 * i));
      }
      m = _mm256_max_ps(m, _mm256_andnot_ps(sign_mask, v[i]));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    const float scale = amax / 127.0f;
    s[b] = scale;
    const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    __m256i i32[4];
    for (int i = 0; i < 4; ++i) {
      i32[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    // Pack 4 x 8 int32 -> 32 int8 in order (packs work per 128-bit lane: fix the order after).
    __m256i i16a = _mm256_packs_epi32(i32[0], i32[1]);
    __m256i i16b = _mm256_packs_epi32(i32[2], i32[3]);
    __m256i i8 = _mm256_packs_epi16(i16a, i16b);
    i8 = _mm256_permutevar8x32_epi32(i8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * kBlock), i8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a + b * kBlock), _mm256_sign_epi8(i8, i8));
  }
  if (g == nullptr) return 1.0f;
  return 1.0f / std::sqrt(hsum(sumsq) / static_cast<float>(K) + eps);
}

// Weights are packed in tiles of 4 output channels: packed (N/4, K/32, 4, 32) holds, for each
// 32-wide block of K, the 4 channels' blocks next to each other, so a tile streams one
// contiguous run of memory (4 * K bytes), and a thread's share of the matrix is one sequential
// stream. With plain (N, K) rows a tile reads 4 short streams at once and the hardware
// prefetcher, which stops at 4 KiB pages, restarts cold on every page: measured here at about
// 60% of the packed layout's speed for K = 1024.
constexpr int kTile = 4;
// Software prefetch distance (bytes ahead in the packed stream): crosses the pages the
// hardware prefetcher will not.
constexpr int64_t kPrefetch = 1024;

// Raw dot products of R activation rows with one tile of 4 channels: out[r][n] (w_scale not applied).
template <int R>
inline void tile_dot(const int8_t* w, int64_t K, const int8_t* q, const uint8_t* a, const float* s, int64_t lds,
                     float (*out)[kTile]) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[kTile][R];
  for (int n = 0; n < kTile; ++n)
    for (int r = 0; r < R; ++r) acc[n][r] = _mm256_setzero_ps();
  const int64_t nb = K / kBlock;
  for (int64_t b = 0; b < nb; ++b) {
    const int8_t* wb = w + b * kTile * kBlock;
    _mm_prefetch(reinterpret_cast<const char*>(wb + kPrefetch), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wb + kPrefetch + 64), _MM_HINT_T0);
    __m256i wv[kTile];
    for (int n = 0; n < kTile; ++n) wv[n] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + n * kBlock));
    for (int r = 0; r < R; ++r) {
      const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + r * K + b * kBlock));
      const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + r * K + b * kBlock));
      const __m256 sv = _mm256_broadcast_ss(s + r * lds + b);
      for (int n = 0; n < kTile; ++n) {
        const __m256i p16 = _mm256_maddubs_epi16(av, _mm256_sign_epi8(wv[n], qv));
        const __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
        acc[n][r] = _mm256_fmadd_ps(p, sv, acc[n][r]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < kTile; ++n) out[r][n] = hsum(acc[n][r]);
}

// Quantized activation rows (see quantize_row): q, a (M, K) and block scales s (M, K / 32).
struct Rows {
  const int8_t* q;
  const uint8_t* a;
  const float* s;
  int64_t M, K, lds;
};

// Every row against one tile, the tile's weights read from memory once (they stay in L1/L2
// while the rows go by two at a time): out (M, 4).
inline void tile_all_rows(const int8_t* w, const Rows& x, float (*out)[kTile]) {
  int64_t m = 0;
  for (; m + 2 <= x.M; m += 2) tile_dot<2>(w, x.K, x.q + m * x.K, x.a + m * x.K, x.s + m * x.lds, x.lds, out + m);
  if (m < x.M) tile_dot<1>(w, x.K, x.q + m * x.K, x.a + m * x.K, x.s + m * x.lds, x.lds, out + m);
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& w_scale,
                       const std::optional<at::Tensor>& norm_weight, double norm_eps) {
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu(), "int8_linear: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "int8_linear: x must be float32");
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.dim() == 4 && packed.size(2) == kTile &&
                  packed.size(3) == kBlock && packed.is_contiguous(),
              "int8_linear: weights must be packed int8 (N/4, K/32, 4, 32); see pack_int8");
  const int64_t N = w_scale.numel(), K = packed.size(1) * kBlock, n_tiles = packed.size(0);
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous() && (N + kTile - 1) / kTile == n_tiles,
              "int8_linear: w_scale must be contiguous float32 (N,) for the packed weights");
  TORCH_CHECK(x.size(-1) == K, "int8_linear: x has ", x.size(-1), " features, the weights expect ", K);
  const float* g = nullptr;
  if (norm_weight.has_value()) {
    TORCH_CHECK(norm_weight->scalar_type() == at::kFloat && norm_weight->is_contiguous() && norm_weight->numel() == K,
                "int8_linear: norm_weight must be contiguous float32 (K,)");
    g = norm_weight->data_ptr<float>();
  }
  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  const at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y.view(out_shape);
  const int64_t lds = K / kBlock;
  at::Tensor qa = at::empty({2, M, K}, x.options().dtype(at::kChar));
  at::Tensor s = at::empty({M, lds}, x.options());
  int8_t* q = qa.data_ptr<int8_t>();
  uint8_t* a = reinterpret_cast<uint8_t*>(q + M * K);
  const float* xp = x2.data_ptr<float>();
  float* sp = s.data_ptr<float>();
  std::vector<float> row_factor(M);
  for (int64_t m = 0; m < M; ++m)
    row_factor[m] = quantize_row(xp + m * K, K, g, static_cast<float>(norm_eps), q + m * K, a + m * K, sp + m * lds);

  const Rows rows{q, a, sp, M, K, lds};
  const int8_t* wp = packed.data_ptr<int8_t>();
  const float* wsp = w_scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Grain: 4 tiles (16 channels) at least per task.
  at::parallel_for(0, n_tiles, 4, [&](int64_t t0, int64_t t1) {
    std::vector<float> buf(M * kTile);
    auto* out = reinterpret_cast<float(*)[kTile]>(buf.data());
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kTile;
      tile_all_rows(wp + n0 * K, rows, out);
      const int64_t n_valid = std::min<int64_t>(kTile, N - n0);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < n_valid; ++n) yp[m * N + n0 + n] = out[m][n] * wsp[n0 + n] * row_factor[m];
    }
  });
  return y.view(out_shape);
}

// ---------------------------------------------------------------------------------------------
// Attention for a few new rows (the audio decoder: 1-2 rows over at most 33 positions), in one
// call instead of the ~20 small torch ops it takes (split, rope, cache writes, sdpa, reshape):
// at this size every op costs far more in dispatch than in arithmetic.
//
// qkv (B, T, (H + 2G) * D): the fused projection's [q | k | v] for T new rows at positions
// pos..pos+T-1; cos, sin (T, 1, D) rope tables in the interleaved-pair convention of
// csm_engine.model.rope_cache (out = x * cos + swap_pairs(x) * sin, sin carrying the signs);
// k_cache, v_cache (B, G, S, D). Writes the rotated keys and the values into the caches, then
// returns (B, T, H * D): each row attends causally over positions 0..its own, 1/sqrt(D) scale,
// query head h reading key/value head h / (H / G).
// The file is compiled with -ffp-contract=off, so the rope's products and sums round exactly
// as torch's separate mul and add do: keys written here equal the ones the torch path writes.
// ---------------------------------------------------------------------------------------------

inline float dot(const float* a, const float* b, int64_t D) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < D; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  return hsum(acc);
}

inline void rope(const float* x, const float* c, const float* s, int64_t D, float* out) {
  for (int64_t i = 0; i < D; i += 2) {
    const float x0 = x[i], x1 = x[i + 1];
    const float a0 = x0 * c[i], b0 = x1 * s[i];
    const float a1 = x1 * c[i + 1], b1 = x0 * s[i + 1];
    out[i] = a0 + b0;
    out[i + 1] = a1 + b1;
  }
}

at::Tensor attend_rows(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor k_cache,
                       at::Tensor v_cache, int64_t pos, int64_t n_heads) {
  TORCH_CHECK(qkv.scalar_type() == at::kFloat && qkv.dim() == 3, "attend_rows: qkv must be float32 (B, T, W)");
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.sizes() == v_cache.sizes() && k_cache.dim() == 4,
              "attend_rows: caches must be contiguous float32 (B, G, S, D)");
  const int64_t B = qkv.size(0), T = qkv.size(1), G = k_cache.size(1), S = k_cache.size(2), D = k_cache.size(3);
  const int64_t H = n_heads, W = (H + 2 * G) * D;
  TORCH_CHECK(qkv.size(2) == W && H % G == 0 && D % 8 == 0, "attend_rows: qkv width does not match the heads");
  TORCH_CHECK(k_cache.size(0) >= B && pos >= 0 && pos + T <= S, "attend_rows: positions outside the cache");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == T * D && sin.numel() == T * D &&
                  cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
              "attend_rows: cos/sin must be contiguous float32 (T, 1, D)");
  const at::Tensor x = qkv.contiguous();
  at::Tensor y = at::empty({B, T, H * D}, qkv.options());
  const float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  std::vector<float> q(D), scores(pos + T);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T; ++t) {  // keys and values of the new rows first: row t sees rows <= t
      const float* row = xp + (b * T + t) * W;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t at_pos = ((b * G + g) * S + pos + t) * D;
        rope(row + (H + g) * D, cp + t * D, sp + t * D, D, kc + at_pos);
        std::copy(row + (H + G + g) * D, row + (H + G + g + 1) * D, vc + at_pos);
      }
    }
    for (int64_t t = 0; t < T; ++t) {
      const float* row = xp + (b * T + t) * W;
      const int64_t n_keys = pos + t + 1;
      for (int64_t h = 0; h < H; ++h) {
        const int64_t g = h / (H / G);
        rope(row + h * D, cp + t * D, sp + t * D, D, q.data());
        const float* kg = kc + (b * G + g) * S * D;
        const float* vg = vc + (b * G + g) * S * D;
        float mx = -INFINITY;
        for (int64_t j = 0; j < n_keys; ++j) {
          scores[j] = dot(q.data(), kg + j * D, D) * scale;
          mx = std::max(mx, scores[j]);
        }
        float total = 0.0f;
        for (int64_t j = 0; j < n_keys; ++j) {
          scores[j] = std::exp(scores[j] - mx);
          total += scores[j];
        }
        float* out = yp + (b * T + t) * H * D + h * D;
        std::fill(out, out + D, 0.0f);
        const float inv = 1.0f / total;
        for (int64_t j = 0; j < n_keys; ++j) {
          const __m256 p = _mm256_set1_ps(scores[j] * inv);
          for (int64_t i = 0; i < D; i += 8)
            _mm256_storeu_ps(out + i, _mm256_fmadd_ps(p, _mm256_loadu_ps(vg + j * D + i), _mm256_loadu_ps(out + i)));
        }
      }
    }
  }
  return y;
}

// ---------------------------------------------------------------------------------------------
// One whole int8-block transformer layer for a few new rows at an int position (the audio
// decoder's steps: 124 layer steps a frame), in one call: from Python each of its ~20 ops and
// module calls costs more than the arithmetic of a 1-row step. It runs exactly the ops the
// Python path runs, in the same order (the same kernels, residual adds, silu(gate) * up), so
// the result is identical:
//   h = x + o(attend_rows(qkv(rms_norm(x)))), out = h + w2(silu(w1(rms_norm(h))) * w3(...)).
// The norms are folded into the q|k|v and w1|w3 calls (their weights given, see int8_linear).
// ---------------------------------------------------------------------------------------------

at::Tensor block_layer(const at::Tensor& x, const at::Tensor& qkv_w, const at::Tensor& qkv_s,
                       const at::Tensor& sa_norm, const at::Tensor& o_w, const at::Tensor& o_s,
                       const at::Tensor& w13_w, const at::Tensor& w13_s, const at::Tensor& mlp_norm,
                       const at::Tensor& w2_w, const at::Tensor& w2_s, double eps, const at::Tensor& cos,
                       const at::Tensor& sin, at::Tensor k_cache, at::Tensor v_cache, int64_t pos, int64_t n_heads) {
  const at::Tensor qkv = int8_linear(x, qkv_w, qkv_s, sa_norm, eps);
  const at::Tensor attn = attend_rows(qkv, cos, sin, k_cache, v_cache, pos, n_heads);
  const at::Tensor h = x + int8_linear(attn, o_w, o_s, std::nullopt, 0.0);
  const at::Tensor gu = int8_linear(h, w13_w, w13_s, mlp_norm, eps);
  const int64_t inter = gu.size(-1) / 2;
  const at::Tensor act = at::silu(gu.narrow(-1, 0, inter)).mul_(gu.narrow(-1, inter, inter));
  return h + int8_linear(act, w2_w, w2_s, std::nullopt, 0.0);
}

}  // namespace

TORCH_LIBRARY(csm_kernels, m) {
  m.def("int8_linear(Tensor x, Tensor packed, Tensor w_scale, Tensor? norm_weight=None, float norm_eps=0.0) -> Tensor");
  m.def("attend_rows(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, int pos, int n_heads) -> Tensor");
  m.def("block_layer(Tensor x, Tensor qkv_w, Tensor qkv_s, Tensor sa_norm, Tensor o_w, Tensor o_s, Tensor w13_w, "
        "Tensor w13_s, Tensor mlp_norm, Tensor w2_w, Tensor w2_s, float eps, Tensor cos, Tensor sin, "
        "Tensor(a!) k_cache, Tensor(b!) v_cache, int pos, int n_heads) -> Tensor");
}

TORCH_LIBRARY_IMPL(csm_kernels, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("attend_rows", &attend_rows);
  m.impl("block_layer", &block_layer);
}
