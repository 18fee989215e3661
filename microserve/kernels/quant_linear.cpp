// Linear layers on GGUF weights kept in their file's block format (CPU).
//
// Weights stay as the GGUF blocks (Q8_0, Q4_0, Q4_1) or 16-bit floats (BF16, F16), so an engine's
// memory follows the file's size and a decode step reads 2-7x fewer bytes than float32 weights.
//
// Small batches (decode): each weight block's quants are widened to float32 in registers and
// multiplied with the float32 activations, scaled once per block (weight-only: activations are
// not quantized, so results match the dequantized reference up to float32 summation order;
// int8 activations, as llama.cpp uses, were faster here but flipped answers of small models).
// Large batches (prefill): the weight is dequantized to float32 and multiplied with the BLAS
// GEMM, which is faster there than any loop of ours.
//
// Every output element is computed by the same instructions in the same order whatever the batch
// size on the small-batch path, so the results of a row do not depend on its batch.

#include "quant_linear.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define MS_AVX2 1
#endif

namespace {

// ggml type ids, as in the GGUF file.
constexpr int64_t T_F16 = 1, T_Q4_0 = 2, T_Q4_1 = 3, T_Q8_0 = 8, T_BF16 = 30;
constexpr int64_t QK = 32;  // elements per block of the block formats

// Block formats are repacked at load (`repack`) from the file's array of blocks into, per row:
// all blocks' quants, then all blocks' fp16 scales d, then (Q4_1) all fp16 minimums m. Same
// bytes as the file; the scales of a row then convert to float 8 at a time.
int64_t quant_bytes(int64_t type) { return type == T_Q8_0 ? 32 : 16; }
int64_t block_bytes(int64_t type) { return type == T_Q8_0 ? 34 : type == T_Q4_0 ? 18 : 20; }

int64_t row_bytes(int64_t type, int64_t k) {
  switch (type) {
    case T_Q8_0: return k / QK * 34;
    case T_Q4_0: return k / QK * 18;
    case T_Q4_1: return k / QK * 20;
    case T_BF16: case T_F16: return 2 * k;
  }
  TORCH_CHECK(false, "unsupported weight type ", type);
}

bool is_block_type(int64_t type) { return type == T_Q8_0 || type == T_Q4_0 || type == T_Q4_1; }

inline uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

inline float fp16_to_fp32(uint16_t h) {
#ifdef MS_AVX2
  return _cvtsh_ss(h);
#else
  uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: renormalize
      exp = 127 - 15 + 1;
      while (!(mant & 0x400)) { mant <<= 1; exp--; }
      bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

inline float bf16_to_fp32(uint16_t h) {
  uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// One weight row (packed layout) to float32.
void dequantize_row(int64_t type, const uint8_t* row, int64_t k, float* out) {
  int64_t nb = k / QK;
  const uint8_t* scales = row + nb * quant_bytes(type);
  switch (type) {
    case T_Q8_0:
      for (int64_t b = 0; b < nb; b++) {
        float d = fp16_to_fp32(load_u16(scales + 2 * b));
        const int8_t* q = reinterpret_cast<const int8_t*>(row + b * QK);
        for (int j = 0; j < QK; j++) out[b * QK + j] = d * float(q[j]);
      }
      break;
    case T_Q4_0:
    case T_Q4_1:
      for (int64_t b = 0; b < nb; b++) {
        float d = fp16_to_fp32(load_u16(scales + 2 * b));
        float m = type == T_Q4_1 ? fp16_to_fp32(load_u16(scales + 2 * (nb + b))) : -8.f * d;
        const uint8_t* q = row + b * 16;
        for (int j = 0; j < 16; j++) {
          out[b * QK + j] = d * float(q[j] & 15) + m;
          out[b * QK + j + 16] = d * float(q[j] >> 4) + m;
        }
      }
      break;
    case T_BF16:
      for (int64_t j = 0; j < k; j++) out[j] = bf16_to_fp32(load_u16(row + 2 * j));
      break;
    case T_F16:
      for (int64_t j = 0; j < k; j++) out[j] = fp16_to_fp32(load_u16(row + 2 * j));
      break;
  }
}

// Row scales to float: d[b], and m[b] (the constant term per block: Q4_1's minimum, Q4_0's -8 d).
void row_scales(int64_t type, const uint8_t* row, int64_t nb, float* d, float* m) {
  const uint8_t* scales = row + nb * quant_bytes(type);
  int64_t b = 0;
#ifdef MS_AVX2
  for (; b + 8 <= nb; b += 8) {
    _mm256_storeu_ps(d + b, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + 2 * b))));
    if (type == T_Q4_1)
      _mm256_storeu_ps(m + b, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + 2 * (nb + b)))));
  }
#endif
  for (; b < nb; b++) {
    d[b] = fp16_to_fp32(load_u16(scales + 2 * b));
    if (type == T_Q4_1) m[b] = fp16_to_fp32(load_u16(scales + 2 * (nb + b)));
  }
  if (type == T_Q4_0)
    for (b = 0; b < nb; b++) m[b] = -8.f * d[b];
}

// Per block of 32, the sum of the activations: a block's constant term (Q4_1's minimum, Q4_0's
// -8 d) multiplies it once instead of being added to every weight.
std::vector<float> block_sums(const float* x, int64_t m, int64_t k) {
  std::vector<float> sums(m * (k / QK));
  for (size_t i = 0; i < sums.size(); i++) {
    float s = 0.f;
    for (int j = 0; j < QK; j++) s += x[i * QK + j];  // blocks of consecutive rows are consecutive
    sums[i] = s;
  }
  return sums;
}

#ifdef MS_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// A block's 32 quants as 4 x 8 floats (before its scale).
template <int64_t TYPE>
inline void block_quants(const uint8_t* q, __m256 out[4]) {
  if constexpr (TYPE == T_Q8_0) {
    for (int j = 0; j < 4; j++)
      out[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * j))));
  } else {  // 16 bytes: low nibbles are elements 0..15, high nibbles 16..31
    __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    __m128i mask = _mm_set1_epi8(15);
    __m128i lo = _mm_and_si128(t, mask), hi = _mm_and_si128(_mm_srli_epi16(t, 4), mask);
    out[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    out[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    out[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    out[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
  }
}

// Rows [n0, n1) of y = x W^T for MT rows of x at once, block formats: each block's quants are
// widened to float in registers and multiplied with the float32 activations (weight-only).
template <int64_t TYPE, int MT>
void block_dot_rows(const uint8_t* w, int64_t rb, int64_t nb, const float* x, const std::vector<float>& xsum,
                    int64_t m0, int64_t k, float* y, int64_t n_total, int64_t n0, int64_t n1) {
  constexpr int64_t qb = TYPE == T_Q8_0 ? 32 : 16;
  std::vector<float> dw(nb), mw(nb);
  for (int64_t n = n0; n < n1; n++) {
    const uint8_t* row = w + n * rb;
    row_scales(TYPE, row, nb, dw.data(), mw.data());
    __m256 acc[MT];
    for (int i = 0; i < MT; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
      __m256 q[4];
      block_quants<TYPE>(row + b * qb, q);
      __m256 d = _mm256_set1_ps(dw[b]);
      for (int i = 0; i < MT; i++) {
        const float* xb = x + (m0 + i) * k + b * QK;
        __m256 s = _mm256_mul_ps(q[0], _mm256_loadu_ps(xb));
        s = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(xb + 8), s);
        s = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(xb + 16), s);
        s = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(xb + 24), s);
        acc[i] = _mm256_fmadd_ps(d, s, acc[i]);
      }
    }
    for (int i = 0; i < MT; i++) {
      float extra = 0.f;  // sum over blocks of m * sum(x): the constant term of each block
      if constexpr (TYPE != T_Q8_0) {
        const float* s = xsum.data() + (m0 + i) * nb;
        for (int64_t b = 0; b < nb; b++) extra += mw[b] * s[b];
      }
      y[(m0 + i) * n_total + n] = hsum(acc[i]) + extra;
    }
  }
}

// Rows [n0, n1) of y = x W^T for MT rows of x at once, 16-bit float weights, float32 FMA.
template <int64_t TYPE, int MT>
void half_dot_rows(const uint8_t* w, const float* x, int64_t m0, int64_t k, float* y, int64_t n_total, int64_t n0,
                   int64_t n1) {
  for (int64_t n = n0; n < n1; n++) {
    const uint8_t* row = w + n * 2 * k;
    __m256 acc[MT];
    for (int i = 0; i < MT; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t j = 0; j < k; j += 8) {
      __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * j));
      __m256 wv = TYPE == T_BF16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                                 : _mm256_cvtph_ps(h);
      for (int i = 0; i < MT; i++) acc[i] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + (m0 + i) * k + j), acc[i]);
    }
    for (int i = 0; i < MT; i++) y[(m0 + i) * n_total + n] = hsum(acc[i]);
  }
}

template <int64_t TYPE>
void small_batch(const uint8_t* w, int64_t rb, const float* x, const std::vector<float>& xsum, int64_t m, int64_t k,
                 float* y, int64_t n0, int64_t n1, int64_t n_total) {
  int64_t nb = k / QK;
  int64_t m0 = 0;
  auto tile = [&](auto mt_const) {
    constexpr int MT = decltype(mt_const)::value;
    if constexpr (TYPE == T_BF16 || TYPE == T_F16) {
      half_dot_rows<TYPE, MT>(w, x, m0, k, y, n_total, n0, n1);
    } else {
      block_dot_rows<TYPE, MT>(w, rb, nb, x, xsum, m0, k, y, n_total, n0, n1);
    }
    m0 += MT;
  };
  while (m - m0 >= 4) tile(std::integral_constant<int, 4>());
  if (m - m0 == 3) tile(std::integral_constant<int, 3>());
  if (m - m0 == 2) tile(std::integral_constant<int, 2>());
  if (m - m0 == 1) tile(std::integral_constant<int, 1>());
}
#endif

// Reference loops for CPUs without AVX2 (and for checking): float32 dot products.
void small_batch_generic(int64_t type, const uint8_t* w, int64_t rb, const float* x, int64_t m, int64_t k, float* y,
                         int64_t n0, int64_t n1, int64_t n_total) {
  std::vector<float> row(k);
  for (int64_t n = n0; n < n1; n++) {
    dequantize_row(type, w + n * rb, k, row.data());
    for (int64_t i = 0; i < m; i++) {
      float acc = 0.f;
      for (int64_t j = 0; j < k; j++) acc += row[j] * x[i * k + j];
      y[i * n_total + n] = acc;
    }
  }
}

}  // namespace

torch::Tensor repack(const torch::Tensor& raw, int64_t type, int64_t k) {
  TORCH_CHECK(raw.dtype() == torch::kUInt8 && raw.dim() == 2, "weight: uint8 [N, bytes]");
  TORCH_CHECK(k % QK == 0 && raw.size(1) == row_bytes(type, k), "weight rows have ", raw.size(1),
              " bytes, expected ", row_bytes(type, k), " for ", k, " columns");
  auto src = raw.contiguous();
  if (!is_block_type(type)) return src.clone();
  auto out = torch::empty_like(src);
  int64_t nb = k / QK, rb = src.size(1), qb = quant_bytes(type), bb = block_bytes(type);
  int64_t head = type == T_Q4_1 ? 4 : 2;  // bytes of scales before each block's quants in the file
  const uint8_t* sp = src.data_ptr<uint8_t>();
  uint8_t* op = out.data_ptr<uint8_t>();
  at::parallel_for(0, src.size(0), 64, [&](int64_t a, int64_t e) {
    for (int64_t n = a; n < e; n++) {
      const uint8_t* in = sp + n * rb;
      uint8_t* row = op + n * rb;
      uint8_t* scales = row + nb * qb;
      for (int64_t b = 0; b < nb; b++) {
        std::memcpy(row + b * qb, in + b * bb + head, qb);
        std::memcpy(scales + 2 * b, in + b * bb, 2);
        if (type == T_Q4_1) std::memcpy(scales + 2 * (nb + b), in + b * bb + 2, 2);
      }
    }
  });
  return out;
}

torch::Tensor dequantize(const torch::Tensor& w, int64_t type, int64_t k, const c10::optional<torch::Tensor>& rows) {
  TORCH_CHECK(w.dtype() == torch::kUInt8 && w.dim() == 2 && w.is_contiguous(), "weight: contiguous uint8 [N, bytes]");
  TORCH_CHECK(w.size(1) == row_bytes(type, k), "weight rows have ", w.size(1), " bytes, expected ",
              row_bytes(type, k));
  torch::Tensor idx = rows.has_value() ? rows->to(torch::kLong).contiguous() : torch::Tensor();
  int64_t n = rows.has_value() ? idx.numel() : w.size(0);
  auto out = torch::empty({n, k}, torch::kFloat32);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const int64_t* ip = rows.has_value() ? idx.data_ptr<int64_t>() : nullptr;
  int64_t rb = w.size(1), total = w.size(0);
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; i++) {
      int64_t r = ip ? ip[i] : i;
      TORCH_CHECK(r >= 0 && r < total, "row ", r, " out of range");
      dequantize_row(type, wp + r * rb, k, op + i * k);
    }
  });
  return out;
}

torch::Tensor linear(const torch::Tensor& x_in, const torch::Tensor& w, int64_t type, const c10::optional<torch::Tensor>& bias,
                     int64_t gemm_from) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.dtype() == torch::kFloat32, "x: float32 [M, K]");
  int64_t m = x_in.size(0), k = x_in.size(1), n = w.size(0);
  TORCH_CHECK(w.dtype() == torch::kUInt8 && w.dim() == 2 && w.is_contiguous(), "weight: contiguous uint8 [N, bytes]");
  TORCH_CHECK(w.size(1) == row_bytes(type, k), "weight rows have ", w.size(1), " bytes, expected ",
              row_bytes(type, k), " for K=", k);
  TORCH_CHECK(k % QK == 0, "K must be a multiple of 32");
  if (gemm_from > 0 && m > gemm_from) {
    auto dense = dequantize(w, type, k, c10::nullopt);
    return bias.has_value() ? at::addmm(*bias, x_in, dense.t()) : at::mm(x_in, dense.t());
  }
  auto x = x_in.contiguous();
  auto y = torch::empty({m, n}, torch::kFloat32);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  int64_t rb = w.size(1);
  int64_t grain = std::max<int64_t>(8, n / (4 * at::get_num_threads()));
#ifdef MS_AVX2
  std::vector<float> xsum = is_block_type(type) ? block_sums(xp, m, k) : std::vector<float>();
  at::parallel_for(0, n, grain, [&](int64_t a, int64_t b) {
    switch (type) {
      case T_Q8_0: small_batch<T_Q8_0>(wp, rb, xp, xsum, m, k, yp, a, b, n); break;
      case T_Q4_0: small_batch<T_Q4_0>(wp, rb, xp, xsum, m, k, yp, a, b, n); break;
      case T_Q4_1: small_batch<T_Q4_1>(wp, rb, xp, xsum, m, k, yp, a, b, n); break;
      case T_BF16: small_batch<T_BF16>(wp, rb, xp, xsum, m, k, yp, a, b, n); break;
      case T_F16: small_batch<T_F16>(wp, rb, xp, xsum, m, k, yp, a, b, n); break;
    }
  });
#else
  at::parallel_for(0, n, grain, [&](int64_t a, int64_t b) { small_batch_generic(type, wp, rb, xp, m, k, yp, a, b, n); });
#endif
  if (bias.has_value()) y.add_(*bias);
  return y;
}

bool has_avx2() {
#ifdef MS_AVX2
  return true;
#else
  return false;
#endif
}
