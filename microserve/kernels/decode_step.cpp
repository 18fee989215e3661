// One decode step (every sequence in the batch has one new token) of a Llama-family decoder,
// all layers in C++.
//
// At batch 1 a layer's arithmetic takes less time than the ~40 PyTorch calls the Python model
// makes for it, so the step runs here: norms, rope, the paged KV write, attention over the
// block table and the residuals are plain loops; the linears call the GGUF-format kernels
// (quant_linear.cpp) or BLAS for float32 weights. Same math as models/llama.py, in float32
// whatever the model's dtype; the KV cache is float32 or bfloat16 (rounded on write, widened on
// read). The prefill path and every other case stay in Python.

#include "decode_step.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "quant_linear.h"

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#define MS_VEC 1
#endif

#include <c10/util/BFloat16.h>

namespace {

struct Linear {
  torch::Tensor weight;  // repacked GGUF-format bytes, or float32 [out, in] when type is 0
  int64_t type;
  int64_t gemm_from;
  c10::optional<torch::Tensor> bias;

  // In a bfloat16 model, batches past `gemm_from` rows go to oneDNN's bfloat16 GEMM with the
  // activations rounded to bfloat16, as the Python path feeds them; smaller ones stay in float32.
  torch::Tensor operator()(const torch::Tensor& x, bool bf16_model) const {
    if (type == 0) return bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
    bool bf16_gemm = bf16_model && gemm_from > 0 && x.size(0) > gemm_from;
    return linear(bf16_gemm ? x.to(torch::kBFloat16) : x, weight, type, bias, gemm_from);
  }
};

struct Layer {
  Linear qkv, o, gate_up, down;
  torch::Tensor input_norm, post_norm;
  c10::optional<torch::Tensor> q_norm, k_norm;
};

// Vectors of VW float32 for attention: cached values load widened from bfloat16 (its bits are
// float32's upper half).
#if defined(__AVX512F__)
using vec = __m512;
constexpr int VW = 16;
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline vec vload(const c10::BFloat16* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vset1(float a) { return _mm512_set1_ps(a); }
inline vec vfmadd(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
inline vec vround(vec v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vec vscale2(vec y, vec n) { return _mm512_scalef_ps(y, n); }  // y * 2^n
inline vec vclamp(vec v, float lo, float hi) { return _mm512_max_ps(_mm512_min_ps(v, vset1(hi)), vset1(lo)); }
#elif defined(MS_VEC)
using vec = __m256;
constexpr int VW = 8;
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline vec vload(const c10::BFloat16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vset1(float a) { return _mm256_set1_ps(a); }
inline vec vfmadd(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
inline float vsum(vec v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}
inline vec vround(vec v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vec vscale2(vec y, vec n) {
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
inline vec vclamp(vec v, float lo, float hi) { return _mm256_max_ps(_mm256_min_ps(v, vset1(hi)), vset1(lo)); }
#endif

#ifdef MS_VEC
// e^x for VW floats: x = n ln2 + r, e^r by Cephes' expf polynomial (about 1 ulp), times 2^n. The
// clamp keeps 2^n a normal float32 (e^-87.3 ~ 1e-38 stands in for 0, e^88 for overflow).
inline vec vexp(vec x) {
  x = vclamp(x, -87.3f, 88.0f);
  vec n = vround(vfmadd(x, vset1(1.44269504088896341f), vzero()));
  x = vfmadd(n, vset1(-0.693359375f), x);
  x = vfmadd(n, vset1(2.12194440e-4f), x);
  vec p = vset1(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = vfmadd(p, x, vset1(c));
  vec y = vfmadd(p, vfmadd(x, x, vzero()), vfmadd(x, vset1(1.f), vset1(1.f)));
  return vscale2(y, n);
}
#endif

// x[i] = e^(x[i] - shift); returns their sum.
inline float exp_shifted(float* x, int64_t n, float shift) {
  int64_t i = 0;
  float sum = 0.f;
#ifdef MS_VEC
  vec acc = vzero();
  for (; i + VW <= n; i += VW) {
    vec e = vexp(vload(x + i) - vset1(shift));
    vstore(x + i, e);
    acc = acc + e;
  }
  sum = vsum(acc);
#endif
  for (; i < n; i++) sum += (x[i] = std::exp(x[i] - shift));
  return sum;
}

// out[i] = silu(g[i]) * u[i] = g / (1 + e^-g) * u.
inline void silu_mul(const float* g, const float* u, float* out, int64_t n) {
  int64_t i = 0;
#ifdef MS_VEC
  for (; i + VW <= n; i += VW) {
    vec gv = vload(g + i);
    vstore(out + i, gv / (vset1(1.f) + vexp(vzero() - gv)) * vload(u + i));
  }
#endif
  for (; i < n; i++) out[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

// q . k for a cached key k of n values.
template <typename KV>
inline float dot(const float* q, const KV* k, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#ifdef MS_VEC
  vec acc0 = vzero(), acc1 = vzero();
  for (; i + 2 * VW <= n; i += 2 * VW) {
    acc0 = vfmadd(vload(q + i), vload(k + i), acc0);
    acc1 = vfmadd(vload(q + i + VW), vload(k + i + VW), acc1);
  }
  s = vsum(acc0) + vsum(acc1);
#endif
  for (; i < n; i++) s += q[i] * float(k[i]);
  return s;
}

// o = sum over tokens of p[t] * v[t] (d values each), v[t] the cached row `rows[t]` of `v`. The
// output stays in registers over all tokens, 64 values at a time (a store and reload of o per
// token would chain every token's multiply-add through memory).
template <typename KV>
void weighted_sum(const float* p, const int64_t* rows, int64_t len, const KV* v, int64_t d, float* o) {
  int64_t c = 0;
#ifdef MS_VEC
  constexpr int NA = 64 / VW;
  for (; c + 64 <= d; c += 64) {
    vec acc[NA];
    for (int j = 0; j < NA; j++) acc[j] = vzero();
    for (int64_t t = 0; t < len; t++) {
      vec pt = vset1(p[t]);
      const KV* vt = v + rows[t] * d + c;
      for (int j = 0; j < NA; j++) acc[j] = vfmadd(pt, vload(vt + VW * j), acc[j]);
    }
    for (int j = 0; j < NA; j++) vstore(o + c + VW * j, acc[j]);
  }
#endif
  for (; c < d; c++) {
    float acc = 0.f;
    for (int64_t t = 0; t < len; t++) acc += p[t] * float(v[rows[t] * d + c]);
    o[c] = acc;
  }
}

#ifdef MS_VEC
// The sum of each of VW vectors' lanes, as one vector (lane j: the sum of v[j]): pairs are
// interleaved and added, then 64-bit halves, then 128-bit lanes, so VW sums cost about 3 VW
// instructions instead of VW horizontal reductions.
inline vec sum_each(const vec* v) {
#if defined(__AVX512F__)
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; i++)  // per 128-bit lane: [x0+x2, y0+y2, x1+x3, y1+y3]
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; i++) {  // per 128-bit lane: that lane's partial sums of v[4i .. 4i+3]
    __m512d p = _mm512_castps_pd(a[2 * i]), r = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(p, r)), _mm512_castpd_ps(_mm512_unpackhi_pd(p, r)));
  }
  for (int i = 0; i < 2; i++)  // lanes 0+1 and 2+3 of b[2i], then of b[2i+1]
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
#else
  __m256 a[4], b[2];
  for (int i = 0; i < 4; i++)
    a[i] = _mm256_add_ps(_mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 2; i++) {
    __m256d p = _mm256_castps_pd(a[2 * i]), r = _mm256_castps_pd(a[2 * i + 1]);
    b[i] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(p, r)), _mm256_castpd_ps(_mm256_unpackhi_pd(p, r)));
  }
  return _mm256_add_ps(_mm256_permute2f128_ps(b[0], b[1], 0x20), _mm256_permute2f128_ps(b[0], b[1], 0x31));
#endif
}
#endif

// Query heads that share a kv head, attended together so each cached key and value is loaded
// once for all of them (grouped-query attention: 3 query heads per kv head in SmolLM2).
constexpr int MAX_GROUP = 8;

#ifdef MS_VEC
// scores[h * len + t] = q_h . k_t * scale for NH heads, keys VW at a time: each key is loaded once
// for all heads (products accumulated in registers), then VW keys' sums are formed at once.
template <int NH, typename KV>
void group_scores_vec(const float* const* q, const int64_t* rows, int64_t len, const KV* k, int64_t d, float scale,
                      float* scores) {
  vec acc[NH][VW];
  for (int64_t t = 0; t + VW <= len; t += VW) {
    for (int j = 0; j < VW; j++) {
      const KV* kt = k + rows[t + j] * d;
      vec a[NH];
      for (int h = 0; h < NH; h++) a[h] = vzero();
      for (int64_t c = 0; c < d; c += VW) {
        vec kv = vload(kt + c);
        for (int h = 0; h < NH; h++) a[h] = vfmadd(vload(q[h] + c), kv, a[h]);
      }
      for (int h = 0; h < NH; h++) acc[h][j] = a[h];
    }
    for (int h = 0; h < NH; h++) vstore(scores + h * len + t, sum_each(acc[h]) * vset1(scale));
  }
}

// o_h = sum over tokens of p_h[t] * v_t for NH <= 4 heads (p_h = p + h * len), 64 values at a
// time: each value row is loaded once for all heads, whose outputs stay in registers.
template <int NH, typename KV>
void group_weighted_sum_vec(const float* p, const int64_t* rows, int64_t len, const KV* v, int64_t d,
                            float* const* o) {
  constexpr int NA = 64 / VW;
  for (int64_t c = 0; c < d; c += 64) {
    vec acc[NH][NA];
    for (int h = 0; h < NH; h++)
      for (int j = 0; j < NA; j++) acc[h][j] = vzero();
    for (int64_t t = 0; t < len; t++) {
      const KV* vt = v + rows[t] * d + c;
      vec vv[NA];
      for (int j = 0; j < NA; j++) vv[j] = vload(vt + VW * j);
      for (int h = 0; h < NH; h++) {
        vec pt = vset1(p[h * len + t]);
        for (int j = 0; j < NA; j++) acc[h][j] = vfmadd(pt, vv[j], acc[h][j]);
      }
    }
    for (int h = 0; h < NH; h++)
      for (int j = 0; j < NA; j++) vstore(o[h] + c + VW * j, acc[h][j]);
  }
}
#endif

template <typename KV>
void group_scores(const float* const* q, int nh, const int64_t* rows, int64_t len, const KV* k, int64_t d,
                  float scale, float* scores) {
  int64_t t = 0;
#ifdef MS_VEC
  if (d % VW == 0) {
    switch (nh) {
      case 1: group_scores_vec<1>(q, rows, len, k, d, scale, scores); break;
      case 2: group_scores_vec<2>(q, rows, len, k, d, scale, scores); break;
      case 3: group_scores_vec<3>(q, rows, len, k, d, scale, scores); break;
      case 4: group_scores_vec<4>(q, rows, len, k, d, scale, scores); break;
      case 5: group_scores_vec<5>(q, rows, len, k, d, scale, scores); break;
      case 6: group_scores_vec<6>(q, rows, len, k, d, scale, scores); break;
      case 7: group_scores_vec<7>(q, rows, len, k, d, scale, scores); break;
      default: group_scores_vec<8>(q, rows, len, k, d, scale, scores); break;
    }
    t = len / VW * VW;
  }
#endif
  for (; t < len; t++)
    for (int h = 0; h < nh; h++) scores[h * len + t] = dot(q[h], k + rows[t] * d, d) * scale;
}

template <typename KV>
void group_weighted_sum(const float* p, int nh, const int64_t* rows, int64_t len, const KV* v, int64_t d,
                        float* const* o) {
#ifdef MS_VEC
  if (d % 64 == 0) {
    for (int h0 = 0; h0 < nh; h0 += 4) {
      const float* ph = p + h0 * len;
      switch (std::min(4, nh - h0)) {
        case 1: group_weighted_sum_vec<1>(ph, rows, len, v, d, o + h0); break;
        case 2: group_weighted_sum_vec<2>(ph, rows, len, v, d, o + h0); break;
        case 3: group_weighted_sum_vec<3>(ph, rows, len, v, d, o + h0); break;
        default: group_weighted_sum_vec<4>(ph, rows, len, v, d, o + h0); break;
      }
    }
    return;
  }
#endif
  for (int h = 0; h < nh; h++) weighted_sum(p + h * len, rows, len, v, d, o[h]);
}

inline void store(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
inline void store(const float* src, c10::BFloat16* dst, int64_t n) {
  for (int64_t i = 0; i < n; i++) dst[i] = c10::BFloat16(src[i]);  // round to nearest even, as .to(bfloat16)
}

// out = x / rms(x) * w, row by row (out may be x).
void rms_norm(const float* x, const float* w, float* out, int64_t rows, int64_t n, float eps) {
  for (int64_t r = 0; r < rows; r++) {
    const float* xr = x + r * n;
    float ss = 0.f;
    for (int64_t i = 0; i < n; i++) ss += xr[i] * xr[i];
    float inv = 1.f / std::sqrt(ss / float(n) + eps);
    for (int64_t i = 0; i < n; i++) out[r * n + i] = (xr[i] * inv) * w[i];
  }
}

// x * cos + rotate_half(x) * sin for one head of d values (sin already signed: [-sin, sin]).
void rope(float* x, const float* cos, const float* sin, int64_t d) {
  float tmp[512];
  int64_t half = d / 2;
  for (int64_t i = 0; i < half; i++) tmp[i] = x[i] * cos[i] + x[i + half] * sin[i];
  for (int64_t i = half; i < d; i++) tmp[i] = x[i] * cos[i] + x[i - half] * sin[i];
  std::memcpy(x, tmp, d * sizeof(float));
}

class DecodeStep {
 public:
  DecodeStep(int64_t hq, int64_t hkv, int64_t d, int64_t inter, double eps)
      : hq_(hq), hkv_(hkv), d_(d), inter_(inter), eps_(float(eps)) {
    TORCH_CHECK(d <= 512 && hq % hkv == 0, "unsupported head layout");
  }

  void add_layer(std::vector<torch::Tensor> weights, std::vector<int64_t> types, std::vector<int64_t> gemm_from,
                 c10::optional<torch::Tensor> qkv_bias, torch::Tensor input_norm, torch::Tensor post_norm,
                 c10::optional<torch::Tensor> q_norm, c10::optional<torch::Tensor> k_norm) {
    TORCH_CHECK(weights.size() == 4 && types.size() == 4 && gemm_from.size() == 4, "four linears per layer");
    // Everything but the weights in float32, whatever the model's dtype.
    auto f32 = [](const torch::Tensor& t) { return t.to(torch::kFloat32).contiguous(); };
    auto f32_opt = [&](const c10::optional<torch::Tensor>& t) -> c10::optional<torch::Tensor> {
      if (!t.has_value()) return c10::nullopt;
      return f32(*t);
    };
    auto lin = [&](int i, c10::optional<torch::Tensor> bias) {
      return Linear{weights[i], types[i], gemm_from[i], f32_opt(bias)};
    };
    layers_.push_back(Layer{lin(0, qkv_bias), lin(1, {}), lin(2, {}), lin(3, {}), f32(input_norm), f32(post_norm),
                            f32_opt(q_norm), f32_opt(k_norm)});
  }

  // x: [B, hidden] embeddings of the new tokens; cos, sin: [B, d] for their positions;
  // k_cache, v_cache: [layers, slots, hkv, d]; slots: [B] where the new tokens' KV goes;
  // blocks: [B, max blocks] block tables; lengths: [B] context lengths including the new token.
  // Returns the last layer's output, before the final norm.
  torch::Tensor forward(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, torch::Tensor k_cache,
                        torch::Tensor v_cache, torch::Tensor slots, torch::Tensor blocks, torch::Tensor lengths,
                        int64_t block_size) {
    TORCH_CHECK(k_cache.dtype() == v_cache.dtype() &&
                (k_cache.dtype() == torch::kFloat32 || k_cache.dtype() == torch::kBFloat16),
                "KV cache: float32 or bfloat16");
    TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous KV cache");
    if (k_cache.dtype() == torch::kBFloat16)
      return run<c10::BFloat16>(x, cos, sin, k_cache, v_cache, slots, blocks, lengths, block_size);
    return run<float>(x, cos, sin, k_cache, v_cache, slots, blocks, lengths, block_size);
  }

 private:
  template <typename KV>
  torch::Tensor run(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, torch::Tensor k_cache,
                    torch::Tensor v_cache, torch::Tensor slots, torch::Tensor blocks, torch::Tensor lengths,
                    int64_t block_size) {
    const bool bf16_model = std::is_same_v<KV, c10::BFloat16>;  // a bfloat16 model
    x = x.to(torch::kFloat32).contiguous().clone();
    cos = cos.to(torch::kFloat32).contiguous();
    sin = sin.to(torch::kFloat32).contiguous();
    slots = slots.to(torch::kLong).contiguous();
    blocks = blocks.to(torch::kLong).contiguous();
    lengths = lengths.to(torch::kLong).contiguous();
    const int64_t batch = x.size(0), hidden = x.size(1), width = (hq_ + 2 * hkv_) * d_;
    const int64_t slots_per_layer = k_cache.size(1), max_blocks = blocks.size(1);
    const int64_t* slot = slots.data_ptr<int64_t>();
    for (int64_t b = 0; b < batch; b++)
      TORCH_CHECK(slot[b] >= 0 && slot[b] < slots_per_layer, "slot out of range");
    auto h = torch::empty_like(x);
    auto attn = torch::empty({batch, hq_ * d_}, x.options());
    auto act = torch::empty({batch, inter_}, x.options());
    float* xp = x.data_ptr<float>();
    float* hp = h.data_ptr<float>();
    for (size_t l = 0; l < layers_.size(); l++) {
      const Layer& layer = layers_[l];
      rms_norm(xp, layer.input_norm.data_ptr<float>(), hp, batch, hidden, eps_);
      auto qkv = layer.qkv(h, bf16_model).contiguous();
      float* qp = qkv.template data_ptr<float>();
      KV* kc = k_cache.data_ptr<KV>() + l * slots_per_layer * hkv_ * d_;
      KV* vc = v_cache.data_ptr<KV>() + l * slots_per_layer * hkv_ * d_;
      for (int64_t b = 0; b < batch; b++) {
        float* row = qp + b * width;
        for (int64_t hd = 0; hd < hq_ + hkv_; hd++) {  // q heads, then k heads
          float* head = row + hd * d_;
          const c10::optional<torch::Tensor>& norm = hd < hq_ ? layer.q_norm : layer.k_norm;
          if (norm.has_value()) rms_norm(head, norm->data_ptr<float>(), head, 1, d_, eps_);
          rope(head, cos.data_ptr<float>() + b * d_, sin.data_ptr<float>() + b * d_, d_);
        }
        store(row + hq_ * d_, kc + slot[b] * hkv_ * d_, hkv_ * d_);
        store(row + (hq_ + hkv_) * d_, vc + slot[b] * hkv_ * d_, hkv_ * d_);
      }
      attention(qp, kc, vc, blocks.data_ptr<int64_t>(), lengths.data_ptr<int64_t>(), batch, max_blocks, block_size,
                slots_per_layer, attn.data_ptr<float>());
      x.add_(layer.o(attn, bf16_model));
      rms_norm(xp, layer.post_norm.data_ptr<float>(), hp, batch, hidden, eps_);
      auto gu = layer.gate_up(h, bf16_model).contiguous();
      const float* gp = gu.template data_ptr<float>();
      float* ap = act.data_ptr<float>();
      for (int64_t b = 0; b < batch; b++)
        silu_mul(gp + b * 2 * inter_, gp + b * 2 * inter_ + inter_, ap + b * inter_, inter_);
      x.add_(layer.down(act, bf16_model));
    }
    return x;
  }

  // Each sequence's query heads over its cached keys, read through the block table. A task is a
  // (sequence, kv head) with the query heads that share it (at most MAX_GROUP of them); where that
  // gives fewer tasks than two per thread (batch 1 of a model with few kv heads), one query head each.
  template <typename KV>
  void attention(const float* qkv, const KV* kc, const KV* vc, const int64_t* blocks, const int64_t* lengths,
                 int64_t batch, int64_t max_blocks, int64_t block_size, int64_t num_slots, float* out) const {
    const int64_t group = hq_ / hkv_, width = (hq_ + 2 * hkv_) * d_;
    const float scale = 1.f / std::sqrt(float(d_));
    for (int64_t b = 0; b < batch; b++) {
      TORCH_CHECK(lengths[b] >= 1 && lengths[b] <= max_blocks * block_size, "context length out of range");
      for (int64_t i = 0; i < (lengths[b] + block_size - 1) / block_size; i++)
        TORCH_CHECK(blocks[b * max_blocks + i] >= 0 && (blocks[b * max_blocks + i] + 1) * block_size <= num_slots,
                    "block table points outside the KV cache");
    }
    int64_t per_task = std::min<int64_t>(group, MAX_GROUP);
    if (batch * hq_ / per_task < 2 * at::get_num_threads()) per_task = 1;
    const int64_t chunks = (group + per_task - 1) / per_task;  // tasks per kv head
    at::parallel_for(0, batch * hkv_ * chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores;
      std::vector<int64_t> rows;
      for (int64_t task = begin; task < end; task++) {
        const int64_t b = task / (hkv_ * chunks), kvh = task / chunks % hkv_, h0 = kvh * group + task % chunks * per_task;
        const int nh = int(std::min(per_task, (kvh + 1) * group - h0)), len = int(lengths[b]);
        const int64_t* table = blocks + b * max_blocks;
        const float* q[MAX_GROUP];
        float* o[MAX_GROUP];
        for (int h = 0; h < nh; h++) {
          q[h] = qkv + b * width + (h0 + h) * d_;
          o[h] = out + b * hq_ * d_ + (h0 + h) * d_;
        }
        // Token t's KV row: slot table[t / block_size] * block_size + t % block_size, for this kv head.
        rows.resize(len);
        for (int64_t t0 = 0; t0 < len; t0 += block_size) {
          int64_t slot = table[t0 / block_size] * block_size, n = std::min<int64_t>(block_size, len - t0);
          for (int64_t j = 0; j < n; j++) rows[t0 + j] = (slot + j) * hkv_ + kvh;
        }
        scores.resize(size_t(nh) * len);
        group_scores(q, nh, rows.data(), len, kc, d_, scale, scores.data());
        for (int h = 0; h < nh; h++) {
          float* sh = scores.data() + h * len;
          const float mx = *std::max_element(sh, sh + len);
          const float inv = 1.f / exp_shifted(sh, len, mx);
          for (int64_t t = 0; t < len; t++) sh[t] *= inv;
        }
        group_weighted_sum(scores.data(), nh, rows.data(), len, vc, d_, o);
      }
    });
  }

  int64_t hq_, hkv_, d_, inter_;
  float eps_;
  std::vector<Layer> layers_;
};

}  // namespace

void bind_decode_step(pybind11::module& m) {
  pybind11::class_<DecodeStep>(m, "DecodeStep")
      .def(pybind11::init<int64_t, int64_t, int64_t, int64_t, double>())
      .def("add_layer", &DecodeStep::add_layer)
      .def("forward", &DecodeStep::forward, pybind11::call_guard<pybind11::gil_scoped_release>());
}
