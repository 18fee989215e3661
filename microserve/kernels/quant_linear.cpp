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

#include "formats.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define MS_AVX512 1
#define MS_SIMD 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define MS_AVX2 1
#define MS_SIMD 1
#endif

namespace {

using namespace formats;

inline float fp16_to_fp32(uint16_t h) {
#ifdef MS_SIMD
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

// One K-quant super-block to float32, as gguf's reference computes it: d * scale * q - dmin * min
// (Q4_K, Q5_K; every product is exact in float32, so only the subtraction rounds) or d * scale * (q - 32) (Q6_K).
void dequantize_superblock(int64_t type, const uint8_t* blk, float* out) {
  if (type == T_Q6_K) {
    const float d = fp16_to_fp32(load_u16(blk + 208));
    for (int e = 0; e < QKK; e++) {
      const int h = e / 128, r = e % 128, qd = r / 32, l = r % 32;
      const int lo = (blk[64 * h + 32 * (qd & 1) + l] >> (4 * (qd >> 1))) & 15;
      const int hi = (blk[128 + 32 * h + l] >> (2 * qd)) & 3;
      out[e] = d * float(int8_t(blk[192 + e / 16])) * float((lo | (hi << 4)) - 32);
    }
    return;
  }
  uint8_t sm[16];
  unpack_scales_k4(blk + 4, sm);
  const float d = fp16_to_fp32(load_u16(blk)), dmin = fp16_to_fp32(load_u16(blk + 2));
  const uint8_t* qs = blk + (type == T_Q5_K ? 48 : 16);
  for (int j = 0; j < 8; j++) {
    const float dd = d * float(sm[j]), dm = dmin * float(sm[8 + j]);
    for (int l = 0; l < 32; l++) {
      int q = (qs[32 * (j / 2) + l] >> (4 * (j & 1))) & 15;
      if (type == T_Q5_K) q |= ((blk[16 + l] >> j) & 1) << 4;
      out[32 * j + l] = dd * float(q) - dm;
    }
  }
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
    case T_Q5_0:
    case T_Q5_1:
      for (int64_t b = 0; b < nb; b++) {
        float d = fp16_to_fp32(load_u16(scales + 2 * b));
        float m = type == T_Q5_1 ? fp16_to_fp32(load_u16(scales + 2 * (nb + b))) : -16.f * d;
        const uint8_t* q = row + b * 16;
        uint32_t h = load_u32(row + nb * 16 + b * 4);
        for (int j = 0; j < 16; j++) {
          out[b * QK + j] = d * float((q[j] & 15) | (((h >> j) & 1) << 4)) + m;
          out[b * QK + j + 16] = d * float((q[j] >> 4) | (((h >> (j + 16)) & 1) << 4)) + m;
        }
      }
      break;
    case T_Q4_K:
    case T_Q5_K:
    case T_Q6_K:
      for (int64_t b = 0; b < k / QKK; b++) dequantize_superblock(type, row + b * superblock_bytes(type), out + b * QKK);
      break;
    case T_BF16:
      for (int64_t j = 0; j < k; j++) out[j] = bf16_to_fp32(load_u16(row + 2 * j));
      break;
    case T_F16:
      for (int64_t j = 0; j < k; j++) out[j] = fp16_to_fp32(load_u16(row + 2 * j));
      break;
  }
}

#if defined(MS_AVX512)
// 16 floats per vector; a block of 32 weights is 2 vectors.
using vf = __m512;
constexpr int W = 16;
constexpr int MT_MAX = 4;  // rows of x per tile: 4 output rows x 4 = 16 accumulators of 32 registers
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline vf vset1(float a) { return _mm512_set1_ps(a); }
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf vfmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline float hsum(vf v) { return _mm512_reduce_add_ps(v); }
inline vf widen_i8(const uint8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline vf widen_bf16(const uint8_t* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline vf widen_f16(const uint8_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
// 2W bfloat16 values as float32: the even elements, then the odd ones (each 32-bit lane holds an
// even element in its low half and the next odd one in its high half: two instructions, no widening).
inline void split_bf16(const uint8_t* p, vf out[2]) {
  __m512i v = _mm512_loadu_si512(p);
  out[0] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  out[1] = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int(0xffff0000u))));
}
// The 16 bytes of a 4-bit block as floats through a 16-entry table (vpermps reads an index's low
// 4 bits, so low nibbles need no mask): elements 0..15 (low nibbles), then 16..31 (high nibbles).
inline void nibbles(const uint8_t* q, vf table, vf out[]) {
  __m512i t = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
  out[0] = _mm512_permutexvar_ps(t, table);
  out[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(t, 4), table);
}
inline vf nibble_table() { return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
// Up to 16 fp16 values as float32, zeros past n.
inline void load_fp16(const uint8_t* p, int n, float* out) {
  __mmask16 mask = n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1);
  _mm512_storeu_ps(out, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p)));
}
inline void prefetch(const uint8_t* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }
// Q5_0/Q5_1: add 16 where an element's fifth bit (bit j of the block's word h) is set; a mask
// register from h's halves, no unpacking.
inline void fifth_bits(uint32_t h, vf out[]) {
  out[0] = _mm512_mask_add_ps(out[0], __mmask16(h & 0xffff), out[0], vset1(16.f));
  out[1] = _mm512_mask_add_ps(out[1], __mmask16(h >> 16), out[1], vset1(16.f));
}
// 16 bytes as int32 lanes (K-quant groups of 16 elements).
inline __m512i bytes16(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
// Q6_K's 2-bit high parts (lane bits 0-1, higher bits ignored by the table) as 16 * h - 32.
inline vf q6_high_table() { return _mm512_setr_ps(-32, -16, 0, 16, -32, -16, 0, 16, -32, -16, 0, 16, -32, -16, 0, 16); }

// Group g (elements 16g..16g+15) of a K-quant super-block: its integer quants as floats
// (Q6_K's already less 32), nibbles through the 16-entry table.
template <int64_t TYPE>
inline void kquant_group(const uint8_t* blk, int g, vf table, vf out[1]) {
  if constexpr (TYPE == T_Q6_K) {
    const int h = g / 8, qd = (g % 8) / 2, s16 = g % 2;
    __m512i lo = _mm512_srli_epi32(bytes16(blk + 64 * h + 32 * (qd & 1) + 16 * s16), 4 * (qd >> 1));
    __m512i hi = _mm512_srli_epi32(bytes16(blk + 128 + 32 * h + 16 * s16), 2 * qd);
    out[0] = _mm512_add_ps(_mm512_permutexvar_ps(lo, table), _mm512_permutexvar_ps(hi, q6_high_table()));
  } else {
    const int j = g / 2, half = g % 2;
    const uint8_t* qs = blk + (TYPE == T_Q5_K ? 48 : 16) + 32 * (j / 2) + 16 * half;
    out[0] = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes16(qs), 4 * (j & 1)), table);
    if constexpr (TYPE == T_Q5_K) {  // bit j of each qh byte, moved to the byte's top bit for movemask
      __m128i qh = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 16 + 16 * half));
      __mmask16 bit = __mmask16(_mm_movemask_epi8(_mm_slli_epi16(qh, 7 - j)));
      out[0] = _mm512_mask_add_ps(out[0], bit, out[0], vset1(16.f));
    }
  }
}

// A super-block's 16 group scales (d * scale) and offsets (-dmin * min; 0 for Q6_K) as float32.
template <int64_t TYPE>
inline void kquant_scales(const uint8_t* blk, float sc[16], float mn[16]) {
  if constexpr (TYPE == T_Q6_K) {
    vf s = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 192))));
    _mm512_store_ps(sc, _mm512_mul_ps(vset1(_cvtsh_ss(load_u16(blk + 208))), s));
    _mm512_store_ps(mn, vzero());
  } else {
    alignas(16) uint8_t sm[16];
    unpack_scales_k4(blk + 4, sm);
    vf v = _mm512_cvtepi32_ps(bytes16(sm));  // 8 scales, then 8 mins
    vf dv = _mm512_mask_blend_ps(__mmask16(0xff00), vset1(_cvtsh_ss(load_u16(blk))), vset1(-_cvtsh_ss(load_u16(blk + 2))));
    v = _mm512_mul_ps(v, dv);
    const __m512i pairs = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    _mm512_store_ps(sc, _mm512_permutexvar_ps(pairs, v));
    _mm512_store_ps(mn, _mm512_permutexvar_ps(_mm512_add_epi32(pairs, _mm512_set1_epi32(8)), v));
  }
}
#elif defined(MS_AVX2)
// 8 floats per vector; a block of 32 weights is 4 vectors.
using vf = __m256;
constexpr int W = 8;
constexpr int MT_MAX = 2;  // 16 registers: 4 output rows x 2 = 8 accumulators
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline vf vset1(float a) { return _mm256_set1_ps(a); }
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf vfmadd(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline float hsum(vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline vf widen_i8(const uint8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline vf widen_bf16(const uint8_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline vf widen_f16(const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline void split_bf16(const uint8_t* p, vf out[2]) {
  __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  out[0] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  out[1] = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int(0xffff0000u))));
}
inline void nibbles(const uint8_t* q, vf, vf out[]) {
  __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  __m128i mask = _mm_set1_epi8(15);
  __m128i lo = _mm_and_si128(t, mask), hi = _mm_and_si128(_mm_srli_epi16(t, 4), mask);
  out[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
  out[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
  out[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
  out[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}
inline vf nibble_table() { return _mm256_setzero_ps(); }  // unused: AVX2 converts the integers
inline void load_fp16(const uint8_t* p, int n, float* out) {
  if (n == 16) {
    _mm256_storeu_ps(out, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    _mm256_storeu_ps(out + 8, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
    return;
  }
  for (int i = 0; i < 16; i++) out[i] = i < n ? _cvtsh_ss(load_u16(p + 2 * i)) : 0.f;
}
inline void prefetch(const uint8_t* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }
// Q5_0/Q5_1: 16 * the fifth bit of each element (bit 8v + lane of the block's word h) added.
inline void fifth_bits(uint32_t h, vf out[]) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int v = 0; v < 4; v++) {
    __m256i bit = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(int(h >> (8 * v))), lanes), _mm256_set1_epi32(1));
    out[v] = _mm256_add_ps(out[v], _mm256_cvtepi32_ps(_mm256_slli_epi32(bit, 4)));
  }
}
// 8 bytes as int32 lanes.
inline __m256i bytes8(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }

// Group g (elements 16g..16g+15) of a K-quant super-block as two vectors of integer quants in
// float (Q6_K's already less 32).
template <int64_t TYPE>
inline void kquant_group(const uint8_t* blk, int g, vf, vf out[2]) {
  const __m256i m4 = _mm256_set1_epi32(15);
  for (int v = 0; v < 2; v++) {
    __m256i q;
    if constexpr (TYPE == T_Q6_K) {
      const int h = g / 8, qd = (g % 8) / 2, s16 = g % 2;
      __m256i lo = _mm256_and_si256(_mm256_srli_epi32(bytes8(blk + 64 * h + 32 * (qd & 1) + 16 * s16 + 8 * v), 4 * (qd >> 1)), m4);
      __m256i hi = _mm256_and_si256(_mm256_srli_epi32(bytes8(blk + 128 + 32 * h + 16 * s16 + 8 * v), 2 * qd), _mm256_set1_epi32(3));
      q = _mm256_sub_epi32(_mm256_or_si256(lo, _mm256_slli_epi32(hi, 4)), _mm256_set1_epi32(32));
    } else {
      const int j = g / 2, half = g % 2;
      const uint8_t* qs = blk + (TYPE == T_Q5_K ? 48 : 16) + 32 * (j / 2) + 16 * half + 8 * v;
      q = _mm256_and_si256(_mm256_srli_epi32(bytes8(qs), 4 * (j & 1)), m4);
      if constexpr (TYPE == T_Q5_K) {
        __m256i hb = _mm256_and_si256(_mm256_srli_epi32(bytes8(blk + 16 + 16 * half + 8 * v), j), _mm256_set1_epi32(1));
        q = _mm256_or_si256(q, _mm256_slli_epi32(hb, 4));
      }
    }
    out[v] = _mm256_cvtepi32_ps(q);
  }
}

// A super-block's 16 group scales (d * scale) and offsets (-dmin * min; 0 for Q6_K) as float32.
template <int64_t TYPE>
inline void kquant_scales(const uint8_t* blk, float sc[16], float mn[16]) {
  if constexpr (TYPE == T_Q6_K) {
    const float d = _cvtsh_ss(load_u16(blk + 208));
    for (int g = 0; g < 16; g++) sc[g] = d * float(int8_t(blk[192 + g])), mn[g] = 0.f;
  } else {
    uint8_t sm[16];
    unpack_scales_k4(blk + 4, sm);
    const float d = _cvtsh_ss(load_u16(blk)), dmin = -_cvtsh_ss(load_u16(blk + 2));
    for (int g = 0; g < 16; g++) sc[g] = d * float(sm[g / 2]), mn[g] = dmin * float(sm[8 + g / 2]);
  }
}
#endif

#ifdef MS_SIMD
constexpr int NV = QK / W;   // vectors per block of 32 weights
constexpr int NR = 4;        // output rows per tile: each x load serves 4 rows, 4+ independent sums
constexpr int CHUNK = 16;    // blocks whose scales are converted to float32 together
constexpr int PREFETCH = 4;  // tiles ahead whose weights are fetched into the cache
// Batches of more rows than this unpack a tile's weights once into a buffer for all their passes over x
// (measured: at 8 rows, two passes, unpacking twice in registers is faster; from 12 the buffer is).
constexpr int BUFFER_FROM = 2 * MT_MAX;
// Formats whose unpacking costs more than a load: the 5-bit and K-quant ones (measured: Q4_1 and Q8_0
// are as fast or faster unpacking in registers every pass).
constexpr bool buffered(int64_t type) { return has_fifth_bit(type) || is_kquant(type); }

constexpr bool scaled(int64_t type) { return is_block_type(type); }
// 4- and 5-bit formats add a minimum m per block: Q4_1's and Q5_1's own, Q4_0's -8 d and Q5_0's -16 d
// (their quants are q - 8 and q - 16).
constexpr bool has_min(int64_t type) { return type == T_Q4_0 || type == T_Q4_1 || type == T_Q5_0 || type == T_Q5_1; }
constexpr float implied_min(int64_t type) { return type == T_Q4_0 ? -8.f : type == T_Q5_0 ? -16.f : 0.f; }

// Block b of a row as float32 vectors in the order its dot product reads them: for the block
// formats the integer quants q, scaled by d after the dot product; BF16 even elements
// first, then odd ones, in groups of 2W (x is reordered to match, `reorder_for_bf16`); F16 as is.
template <int64_t TYPE>
inline void quants(const uint8_t* row, int64_t b, int64_t nb, vf table, vf out[NV]) {
  if constexpr (TYPE == T_BF16) {
    for (int v = 0; v < NV; v += 2) split_bf16(row + 2 * (b * QK + v * W), out + v);
  } else if constexpr (TYPE == T_F16) {
    for (int v = 0; v < NV; v++) out[v] = widen_f16(row + 2 * (b * QK + v * W));
  } else if constexpr (TYPE == T_Q8_0) {
    for (int v = 0; v < NV; v++) out[v] = widen_i8(row + b * QK + v * W);
  } else {
    nibbles(row + b * 16, table, out);
    if constexpr (has_fifth_bit(TYPE)) fifth_bits(load_u32(row + nb * 16 + b * 4), out);
  }
}

// x rows with each group of 2W values reordered even elements first, as `quants` gives BF16 weights.
std::vector<float> reorder_for_bf16(const float* x, int64_t m, int64_t k) {
  std::vector<float> out(m * k);
  for (int64_t i = 0; i < m * k; i += 2 * W)
    for (int j = 0; j < W; j++) {
      out[i + j] = x[i + 2 * j];
      out[i + W + j] = x[i + 2 * j + 1];
    }
  return out;
}

// The sum of each block of each x row ([m, nbp], zero past nb): the 4-bit formats' minimums multiply it.
std::vector<float> block_sums(const float* x, int64_t m, int64_t k, int64_t nbp) {
  std::vector<float> out(m * nbp, 0.f);
  for (int64_t i = 0; i < m; i++)
    for (int64_t b = 0; b < k / QK; b++) {
      vf s = vload(x + i * k + b * QK);
      for (int v = 1; v < NV; v++) s = vadd(s, vload(x + i * k + b * QK + v * W));
      out[i * nbp + b] = hsum(s);
    }
  return out;
}

// While a tile reads its `bytes` of weight rows, fetch the span PREFETCH tiles ahead, spread over
// its nb blocks: weights stream from memory at batch 1, and the hardware prefetcher alone leaves
// the loop waiting on it (measured on the built-in model's layers).
inline void prefetch_ahead(const uint8_t* tile, int64_t bytes, int64_t b, int64_t nb) {
  const uint8_t* next = tile + PREFETCH * bytes;
  int64_t lines = (bytes + 63) / 64, from = b * lines / nb, to = (b + 1) * lines / nb;
  for (int64_t l = from; l < to; l++) prefetch(next + 64 * l);
}

constexpr int GV = 16 / W;  // vectors per K-quant group of 16 elements

// A group of a K-quant super-block dequantized in registers: q * (d * scale) - dmin * min, exact
// as gguf's reference (the product is exact in float32), so the dot products that follow are
// those of the dequantized weight.
template <int64_t TYPE>
inline void kquant_weights(const uint8_t* blk, int g, vf table, const float* sc, const float* mn, vf out[GV]) {
  kquant_group<TYPE>(blk, g, table, out);
  for (int v = 0; v < GV; v++)
    out[v] = TYPE == T_Q6_K ? vmul(out[v], vset1(sc[g])) : vfmadd(out[v], vset1(sc[g]), vset1(mn[g]));
}

// The K-quant version of `dot_tile`: per super-block the R rows' scales and mins are unpacked
// once into float32, then each group of 16 weights is dequantized in registers once for all MT
// rows of x. One vector accumulator per output, over the super-blocks in order (batch invariance).
template <int64_t TYPE, int R, int MT, bool BUF>
void dot_tile_k(const uint8_t* w, int64_t rb, const float* x, int64_t k, float* y, int64_t n_total, int64_t n,
                int64_t m0, const float* ub) {
  const vf table = nibble_table();
  const int64_t nsb = k / QKK, bb = superblock_bytes(TYPE);
  vf acc[R][MT];
  for (int r = 0; r < R; r++)
    for (int i = 0; i < MT; i++) acc[r][i] = vzero();
  for (int64_t sb = 0; sb < nsb; sb++) {
    alignas(64) float sc[R][16], mn[R][16];
    if constexpr (!BUF) {
      prefetch_ahead(w + n * rb, R * rb, sb, nsb);
      for (int r = 0; r < R; r++) kquant_scales<TYPE>(w + (n + r) * rb + sb * bb, sc[r], mn[r]);
    }
#pragma GCC unroll 16
    for (int g = 0; g < 16; g++) {
      vf wv[R][GV];  // all R rows' weights first, so that each x vector is loaded once for all of them
      for (int r = 0; r < R; r++) {
        if constexpr (BUF) {
          for (int v = 0; v < GV; v++) wv[r][v] = vload(ub + r * k + sb * QKK + 16 * g + v * W);
        } else {
          kquant_weights<TYPE>(w + (n + r) * rb + sb * bb, g, table, sc[r], mn[r], wv[r]);
        }
      }
      for (int i = 0; i < MT; i++)
        for (int v = 0; v < GV; v++) {
          const vf xv = vload(x + (m0 + i) * k + sb * QKK + 16 * g + v * W);
          for (int r = 0; r < R; r++) acc[r][i] = vfmadd(wv[r][v], xv, acc[r][i]);
        }
    }
  }
  for (int r = 0; r < R; r++)
    for (int i = 0; i < MT; i++) y[(m0 + i) * n_total + n + r] = hsum(acc[r][i]);
}

// y[m0..m0+MT) x [n..n+R) for R consecutive weight rows: each block of a row is unpacked once and
// multiplied with MT rows of x. A block format's block sums q.x are scaled by d once (and the
// 4-bit formats add m * the block's sum of x). Each output is one vector accumulator, summed at the end, so its
// value does not depend on R, MT or where a thread's range starts (batch invariance).
// With BUF the unpacked quants come from `ub` (R rows of k floats, `unpack_rows`) instead.
template <int64_t TYPE, int R, int MT, bool BUF>
void dot_tile(const uint8_t* w, int64_t rb, int64_t nb, const float* x, const float* xsum, int64_t nbp, int64_t k,
              float* y, int64_t n_total, int64_t n, int64_t m0, const float* ub) {
  if constexpr (is_kquant(TYPE)) {
    dot_tile_k<TYPE, R, MT, BUF>(w, rb, x, k, y, n_total, n, m0, ub);
    return;
  }
  const vf table = nibble_table();
  vf acc[R][MT], macc[R][MT];
  for (int r = 0; r < R; r++)
    for (int i = 0; i < MT; i++) acc[r][i] = macc[r][i] = vzero();
  for (int64_t b0 = 0; b0 < nb; b0 += CHUNK) {
    const int cnt = int(std::min<int64_t>(CHUNK, nb - b0));
    alignas(64) float d[R][CHUNK];
    if constexpr (scaled(TYPE)) {
      for (int r = 0; r < R; r++) {
        const uint8_t* sc = w + (n + r) * rb + nb * quant_bytes(TYPE);
        load_fp16(sc + 2 * b0, cnt, d[r]);
        if constexpr (has_min(TYPE)) {
          alignas(64) float mins[CHUNK];
          if constexpr (has_own_min(TYPE)) {
            load_fp16(sc + 2 * (nb + b0), cnt, mins);
          } else {
            for (int c = 0; c < CHUNK; c++) mins[c] = implied_min(TYPE) * d[r][c];
          }
          for (int i = 0; i < MT; i++)
            for (int c = 0; c < CHUNK; c += W)
              macc[r][i] = vfmadd(vload(mins + c), vload(xsum + (m0 + i) * nbp + b0 + c), macc[r][i]);
        }
      }
    }
    for (int j = 0; j < cnt; j++) {
      const int64_t b = b0 + j;
      if constexpr (!BUF) prefetch_ahead(w + n * rb, R * rb, b, nb);
      vf wv[R][NV];  // all R rows' quants first, so that each x vector is loaded once for all of them
      for (int r = 0; r < R; r++) {
        if constexpr (BUF) {
          for (int v = 0; v < NV; v++) wv[r][v] = vload(ub + r * k + b * QK + v * W);
        } else {
          quants<TYPE>(w + (n + r) * rb, b, nb, table, wv[r]);
        }
      }
      for (int i = 0; i < MT; i++) {
        const float* xb = x + (m0 + i) * k + b * QK;
        vf xv[NV];
        for (int v = 0; v < NV; v++) xv[v] = vload(xb + v * W);
        for (int r = 0; r < R; r++) {
          if constexpr (scaled(TYPE)) {
            vf s = vmul(wv[r][0], xv[0]);
            for (int v = 1; v < NV; v++) s = vfmadd(wv[r][v], xv[v], s);
            acc[r][i] = vfmadd(s, vset1(d[r][j]), acc[r][i]);
          } else {
            for (int v = 0; v < NV; v++) acc[r][i] = vfmadd(wv[r][v], xv[v], acc[r][i]);
          }
        }
      }
    }
  }
  for (int r = 0; r < R; r++)
    for (int i = 0; i < MT; i++)
      y[(m0 + i) * n_total + n + r] = hsum(acc[r][i]) + (has_min(TYPE) ? hsum(macc[r][i]) : 0.f);
}

// R rows' quants unpacked to float32 as `dot_tile` reads them (K-quants: dequantized), so that
// the several passes over x of a larger batch unpack each weight once, not once per pass. The
// values and the multiplications that follow are the same either way (batch invariance).
template <int64_t TYPE, int R>
void unpack_rows(const uint8_t* w, int64_t rb, int64_t nb, int64_t k, int64_t n, float* ub) {
  const vf table = nibble_table();
  for (int64_t b = 0; b < nb; b++) prefetch_ahead(w + n * rb, R * rb, b, nb);
  for (int r = 0; r < R; r++) {
    const uint8_t* row = w + (n + r) * rb;
    if constexpr (is_kquant(TYPE)) {
      for (int64_t sb = 0; sb < k / QKK; sb++) {
        alignas(64) float sc[16], mn[16];
        kquant_scales<TYPE>(row + sb * superblock_bytes(TYPE), sc, mn);
        for (int g = 0; g < 16; g++) {
          vf wv[GV];
          kquant_weights<TYPE>(row + sb * superblock_bytes(TYPE), g, table, sc, mn, wv);
          for (int v = 0; v < GV; v++) vstore(ub + r * k + sb * QKK + 16 * g + v * W, wv[v]);
        }
      }
    } else {
      for (int64_t b = 0; b < nb; b++) {
        vf wv[NV];
        quants<TYPE>(row, b, nb, table, wv);
        for (int v = 0; v < NV; v++) vstore(ub + r * k + b * QK + v * W, wv[v]);
      }
    }
  }
}

template <int64_t TYPE, int R, bool BUF>
void tiles_over_x(const uint8_t* w, int64_t rb, int64_t nb, const float* x, const float* xsum, int64_t nbp, int64_t m,
                  int64_t k, float* y, int64_t n_total, int64_t n, const float* ub) {
  int64_t m0 = 0;
  for (; m0 + MT_MAX <= m; m0 += MT_MAX) dot_tile<TYPE, R, MT_MAX, BUF>(w, rb, nb, x, xsum, nbp, k, y, n_total, n, m0, ub);
  switch (m - m0) {
    case 3: if constexpr (MT_MAX > 3) dot_tile<TYPE, R, 3, BUF>(w, rb, nb, x, xsum, nbp, k, y, n_total, n, m0, ub); break;
    case 2: if constexpr (MT_MAX > 2) dot_tile<TYPE, R, 2, BUF>(w, rb, nb, x, xsum, nbp, k, y, n_total, n, m0, ub); break;
    case 1: dot_tile<TYPE, R, 1, BUF>(w, rb, nb, x, xsum, nbp, k, y, n_total, n, m0, ub); break;
  }
}

// One pass over x unpacks in registers; more passes first unpack the R rows into a buffer.
template <int64_t TYPE, int R>
void rows_times_x(const uint8_t* w, int64_t rb, int64_t nb, const float* x, const float* xsum, int64_t nbp, int64_t m,
                  int64_t k, float* y, int64_t n_total, int64_t n) {
  if (!buffered(TYPE) || m <= BUFFER_FROM) return tiles_over_x<TYPE, R, false>(w, rb, nb, x, xsum, nbp, m, k, y, n_total, n, nullptr);
  thread_local std::vector<float> buffer;
  buffer.resize(R * k);
  unpack_rows<TYPE, R>(w, rb, nb, k, n, buffer.data());
  tiles_over_x<TYPE, R, true>(w, rb, nb, x, xsum, nbp, m, k, y, n_total, n, buffer.data());
}

// Rows [n0, n1) of y = x W^T for all m rows of x (x reordered for BF16, xsum for 4-bit formats).
template <int64_t TYPE>
void small_batch(const uint8_t* w, int64_t rb, const float* x, const float* xsum, int64_t nbp, int64_t m, int64_t k,
                 float* y, int64_t n0, int64_t n1, int64_t n_total) {
  int64_t nb = k / QK, n = n0;
  // The first PREFETCH tiles, which no earlier tile fetches ahead.
  const uint8_t* first = w + n0 * rb;
  for (int64_t off = 0; off < std::min<int64_t>(PREFETCH * NR, n1 - n0) * rb; off += 64) prefetch(first + off);
  for (; n + NR <= n1; n += NR) rows_times_x<TYPE, NR>(w, rb, nb, x, xsum, nbp, m, k, y, n_total, n);
  for (; n < n1; n++) rows_times_x<TYPE, 1>(w, rb, nb, x, xsum, nbp, m, k, y, n_total, n);
}

// One row to float32 (prefill's dense GEMM path): d * q (+ m), or the 16-bit values widened.
template <int64_t TYPE>
void dequantize_row_simd(const uint8_t* row, int64_t k, float* out) {
  int64_t nb = k / QK;
  const vf table = nibble_table();
  if constexpr (is_kquant(TYPE)) {
    for (int64_t sb = 0; sb < k / QKK; sb++) {
      const uint8_t* blk = row + sb * superblock_bytes(TYPE);
      alignas(64) float sc[16], mn[16];
      kquant_scales<TYPE>(blk, sc, mn);
      for (int g = 0; g < 16; g++) {
        vf wv[GV];
        kquant_weights<TYPE>(blk, g, table, sc, mn, wv);
        for (int v = 0; v < GV; v++) vstore(out + sb * QKK + 16 * g + v * W, wv[v]);
      }
    }
    return;
  }
  for (int64_t b = 0; b < nb; b++) {
    if constexpr (TYPE == T_BF16 || TYPE == T_F16) {
      for (int v = 0; v < NV; v++) {
        const uint8_t* p = row + 2 * (b * QK + v * W);
        vstore(out + b * QK + v * W, TYPE == T_BF16 ? widen_bf16(p) : widen_f16(p));
      }
    } else {
      const uint8_t* sc = row + nb * quant_bytes(TYPE);
      float scale = _cvtsh_ss(load_u16(sc + 2 * b));
      vf d = vset1(scale);
      vf m = vset1(has_own_min(TYPE) ? _cvtsh_ss(load_u16(sc + 2 * (nb + b))) : implied_min(TYPE) * scale);
      vf wv[NV];
      quants<TYPE>(row, b, nb, table, wv);
      for (int v = 0; v < NV; v++) vstore(out + b * QK + v * W, vfmadd(wv[v], d, m));
    }
  }
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

struct Part {
  int64_t type, rows;
  torch::Tensor data;  // [rows, bytes per row], a view into the stacked weight
};

// The parts of a T_STACKED weight (layout in formats.h).
std::vector<Part> stacked_parts(const torch::Tensor& w, int64_t k) {
  TORCH_CHECK(w.dtype() == torch::kUInt8 && w.dim() == 2 && w.size(0) == 1 && w.is_contiguous(),
              "stacked weight: contiguous uint8 [1, bytes]");
  const int64_t* head = reinterpret_cast<const int64_t*>(w.data_ptr<uint8_t>());
  std::vector<Part> parts;
  int64_t offset = stack_align(8 * (1 + 2 * head[0]));
  for (int64_t i = 0; i < head[0]; i++) {
    int64_t type = head[1 + 2 * i], rows = head[2 + 2 * i], rb = row_bytes(type, k);
    TORCH_CHECK(offset + rows * rb <= w.size(1), "stacked weight truncated");
    parts.push_back({type, rows, w[0].narrow(0, offset, rows * rb).view({rows, rb})});
    offset += stack_align(rows * rb);
  }
  return parts;
}

}  // namespace

torch::Tensor stack(const std::vector<torch::Tensor>& parts, const std::vector<int64_t>& types, int64_t k) {
  TORCH_CHECK(parts.size() == types.size() && !parts.empty(), "one type per part");
  int64_t count = int64_t(parts.size()), total = stack_align(8 * (1 + 2 * count));
  for (size_t i = 0; i < parts.size(); i++) {
    TORCH_CHECK(parts[i].dtype() == torch::kUInt8 && parts[i].dim() == 2 && parts[i].size(1) == row_bytes(types[i], k),
                "part ", i, ": uint8 rows of ", row_bytes(types[i], k), " bytes expected");
    total += stack_align(parts[i].numel());
  }
  auto out = torch::zeros({1, total}, torch::kUInt8);
  uint8_t* op = out.data_ptr<uint8_t>();
  std::vector<int64_t> head{count};
  for (size_t i = 0; i < parts.size(); i++) head.insert(head.end(), {types[i], parts[i].size(0)});
  std::memcpy(op, head.data(), 8 * head.size());
  int64_t offset = stack_align(8 * (1 + 2 * count));
  for (const auto& p : parts) {
    auto c = p.contiguous();
    std::memcpy(op + offset, c.data_ptr<uint8_t>(), c.numel());
    offset += stack_align(c.numel());
  }
  return out;
}

torch::Tensor repack(const torch::Tensor& raw, int64_t type, int64_t k) {
  TORCH_CHECK(raw.dtype() == torch::kUInt8 && raw.dim() == 2, "weight: uint8 [N, bytes]");
  TORCH_CHECK(k % block_elems(type) == 0 && raw.size(1) == row_bytes(type, k), "weight rows have ", raw.size(1),
              " bytes, expected ", row_bytes(type, k), " for ", k, " columns");
  auto src = raw.contiguous();
  if (!is_block_type(type)) return src.clone();
  auto out = torch::empty_like(src);
  int64_t nb = k / QK, rb = src.size(1), qb = quant_bytes(type), bb = block_bytes(type);
  int64_t head = has_own_min(type) ? 4 : 2;  // bytes of scales before each block's quants in the file
  const uint8_t* sp = src.data_ptr<uint8_t>();
  uint8_t* op = out.data_ptr<uint8_t>();
  at::parallel_for(0, src.size(0), 64, [&](int64_t a, int64_t e) {
    for (int64_t n = a; n < e; n++) {
      const uint8_t* in = sp + n * rb;
      uint8_t* row = op + n * rb;
      uint8_t* scales = row + nb * qb;
      for (int64_t b = 0; b < nb; b++) {
        if (has_fifth_bit(type)) {  // file: d, (m), qh[4], qs[16]; here all qs, then all qh
          std::memcpy(row + b * 16, in + b * bb + head + 4, 16);
          std::memcpy(row + nb * 16 + b * 4, in + b * bb + head, 4);
        } else {
          std::memcpy(row + b * qb, in + b * bb + head, qb);
        }
        std::memcpy(scales + 2 * b, in + b * bb, 2);
        if (has_own_min(type)) std::memcpy(scales + 2 * (nb + b), in + b * bb + 2, 2);
      }
    }
  });
  return out;
}

// One repacked row of W to float32.
inline void dequantize_one_row(int64_t type, const uint8_t* row, int64_t k, float* out) {
#ifdef MS_SIMD
  switch (type) {
    case T_Q8_0: dequantize_row_simd<T_Q8_0>(row, k, out); break;
    case T_Q4_0: dequantize_row_simd<T_Q4_0>(row, k, out); break;
    case T_Q4_1: dequantize_row_simd<T_Q4_1>(row, k, out); break;
    case T_Q5_0: dequantize_row_simd<T_Q5_0>(row, k, out); break;
    case T_Q5_1: dequantize_row_simd<T_Q5_1>(row, k, out); break;
    case T_Q4_K: dequantize_row_simd<T_Q4_K>(row, k, out); break;
    case T_Q5_K: dequantize_row_simd<T_Q5_K>(row, k, out); break;
    case T_Q6_K: dequantize_row_simd<T_Q6_K>(row, k, out); break;
    case T_BF16: dequantize_row_simd<T_BF16>(row, k, out); break;
    case T_F16: dequantize_row_simd<T_F16>(row, k, out); break;
  }
#else
  dequantize_row(type, row, k, out);
#endif
}

torch::Tensor dequantize(const torch::Tensor& w, int64_t type, int64_t k, const c10::optional<torch::Tensor>& rows) {
  if (type == T_STACKED) {
    TORCH_CHECK(!rows.has_value(), "row lookups need a weight in one format");
    std::vector<torch::Tensor> dense;
    for (const auto& p : stacked_parts(w, k)) dense.push_back(dequantize(p.data, p.type, k, c10::nullopt));
    return torch::cat(dense);
  }
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
      dequantize_one_row(type, wp + r * rb, k, op + i * k);
    }
  });
  return out;
}

// float32 to bfloat16, rounded to nearest even with NaN kept quiet: the same bits as torch's cast.
// Plain integer arithmetic, so the compiler vectorizes it.
inline void floats_to_bf16(const float* x, int64_t k, uint16_t* out) {
  for (int64_t j = 0; j < k; j++) {
    uint32_t u;
    std::memcpy(&u, x + j, 4);
    bool nan = (u & 0x7fffffffu) > 0x7f800000u;
    out[j] = nan ? uint16_t(0x7fc0) : uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
}

// W as a bfloat16 matrix for the bfloat16 GEMM, each row dequantized into a float32 buffer and
// rounded there: no float32 copy of the whole weight is written and read back (the same values as
// dequantize(...).to(bfloat16)).
torch::Tensor dequantize_bf16(const torch::Tensor& w, int64_t type, int64_t k) {
  if (type == T_STACKED) {
    std::vector<torch::Tensor> dense;
    for (const auto& p : stacked_parts(w, k)) dense.push_back(dequantize_bf16(p.data, p.type, k));
    return torch::cat(dense);
  }
  TORCH_CHECK(w.dtype() == torch::kUInt8 && w.dim() == 2 && w.is_contiguous(), "weight: contiguous uint8 [N, bytes]");
  int64_t n = w.size(0), rb = w.size(1);
  auto out = torch::empty({n, k}, torch::kBFloat16);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, n, 16, [&](int64_t a, int64_t b) {
    std::vector<float> row(k);
    for (int64_t i = a; i < b; i++) {
      dequantize_one_row(type, wp + i * rb, k, row.data());
      floats_to_bf16(row.data(), k, op + i * k);
    }
  });
  return out;
}

torch::Tensor linear(const torch::Tensor& x_in, const torch::Tensor& w, int64_t type, const c10::optional<torch::Tensor>& bias,
                     int64_t gemm_from) {
  if (type == T_STACKED) {  // each part on its own kernels, side by side in y's columns
    std::vector<torch::Tensor> ys;
    for (const auto& p : stacked_parts(w, x_in.size(1))) ys.push_back(linear(x_in, p.data, p.type, c10::nullopt, gemm_from));
    auto y = torch::cat(ys, 1);
    return bias.has_value() ? y.add_(*bias) : y;
  }
  const bool bf16 = x_in.dtype() == torch::kBFloat16;
  TORCH_CHECK(x_in.dim() == 2 && (bf16 || x_in.dtype() == torch::kFloat32), "x: float32 or bfloat16 [M, K]");
  int64_t m = x_in.size(0), k = x_in.size(1), n = w.size(0);
  TORCH_CHECK(w.dtype() == torch::kUInt8 && w.dim() == 2 && w.is_contiguous(), "weight: contiguous uint8 [N, bytes]");
  TORCH_CHECK(w.size(1) == row_bytes(type, k), "weight rows have ", w.size(1), " bytes, expected ",
              row_bytes(type, k), " for K=", k);
  TORCH_CHECK(k % block_elems(type) == 0, "K must be a multiple of ", block_elems(type));
  auto with_bias = [&](torch::Tensor y) { return bias.has_value() ? y.add_(*bias) : y; };
  if (gemm_from > 0 && m > gemm_from) {
    if (bf16) {  // bfloat16 GEMM (oneDNN): BF16 weights as they are, others dequantized to bfloat16
      auto dense = type == T_BF16 ? w.view(torch::kBFloat16) : dequantize_bf16(w, type, k);
      return with_bias(at::linear(x_in, dense).to(torch::kFloat32));
    }
    auto dense = dequantize(w, type, k, c10::nullopt);
    return bias.has_value() ? at::addmm(*bias, x_in, dense.t()) : at::mm(x_in, dense.t());
  }
  if (bf16) return linear(x_in.to(torch::kFloat32), w, type, bias, gemm_from);
  auto x = x_in.contiguous();
  auto y = torch::empty({m, n}, torch::kFloat32);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  int64_t rb = w.size(1);
  int64_t grain = std::max<int64_t>(8, n / (4 * at::get_num_threads()));
#ifdef MS_SIMD
  std::vector<float> reordered, xsum;
  int64_t nbp = (k / QK + CHUNK - 1) / CHUNK * CHUNK;
  if (type == T_BF16) {
    reordered = reorder_for_bf16(xp, m, k);
    xp = reordered.data();
  }
  if (has_min(type)) xsum = block_sums(xp, m, k, nbp);
  const float* xs = xsum.data();
  at::parallel_for(0, n, grain, [&](int64_t a, int64_t b) {
    switch (type) {
      case T_Q8_0: small_batch<T_Q8_0>(wp, rb, xp, xs, nbp, m, k, yp, a, b, n); break;
      case T_Q4_0: small_batch<T_Q4_0>(wp, rb, xp, xs, nbp, m, k, yp, a, b, n); break;
      case T_Q4_1: small_batch<T_Q4_1>(wp, rb, xp, xs, nbp, m, k, yp, a, b, n); break;
      case T_Q5_0: small_batch<T_Q5_0>(wp, rb, xp, xs, nbp, m, k, yp, a, b, n); break;
      case T_Q5_1: small_batch<T_Q5_1>(wp, rb, xp, xs, nbp, m, k, yp, a, b, n); break;
      case T_Q4_K: small_batch<T_Q4_K>(wp, rb, xp, xs, nbp, m, k, yp, a, b, n); break;
      case T_Q5_K: small_batch<T_Q5_K>(wp, rb, xp, xs, nbp, m, k, yp, a, b, n); break;
      case T_Q6_K: small_batch<T_Q6_K>(wp, rb, xp, xs, nbp, m, k, yp, a, b, n); break;
      case T_BF16: small_batch<T_BF16>(wp, rb, xp, xs, nbp, m, k, yp, a, b, n); break;
      case T_F16: small_batch<T_F16>(wp, rb, xp, xs, nbp, m, k, yp, a, b, n); break;
    }
  });
#else
  at::parallel_for(0, n, grain, [&](int64_t a, int64_t b) { small_batch_generic(type, wp, rb, xp, m, k, yp, a, b, n); });
#endif
  return with_bias(y);
}

std::string simd() {
#if defined(MS_AVX512)
  return "avx512";
#elif defined(MS_AVX2)
  return "avx2";
#else
  return "none";
#endif
}
