// GGUF weight formats as the kernels hold them (quant_linear.cpp): type ids and row layout.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <cstring>

namespace formats {

// ggml type ids, as in the GGUF file.
constexpr int64_t T_F16 = 1, T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8, T_Q4_K = 12,
                  T_Q5_K = 13, T_Q6_K = 14, T_BF16 = 30;
constexpr int64_t QK = 32;    // elements per block of the block formats
constexpr int64_t QKK = 256;  // elements per super-block of the K-quant formats

// Block formats are repacked at load (`repack`) from the file's array of blocks into, per row:
// all blocks' quants (Q5_0/Q5_1: all 16-byte nibble runs, then all 4-byte fifth-bit words), then
// all blocks' fp16 scales d, then (Q4_1, Q5_1) all fp16 minimums m. Same bytes as the file; the
// scales of a row then convert to float 16 at a time.
constexpr int64_t quant_bytes(int64_t type) { return type == T_Q8_0 ? 32 : (type == T_Q5_0 || type == T_Q5_1) ? 20 : 16; }
constexpr int64_t block_bytes(int64_t type) {
  switch (type) {
    case T_Q8_0: return 34;
    case T_Q4_0: return 18;
    case T_Q4_1: return 20;
    case T_Q5_0: return 22;
    case T_Q5_1: return 24;
  }
  return 0;
}
constexpr bool is_block_type(int64_t type) {
  return type == T_Q8_0 || type == T_Q4_0 || type == T_Q4_1 || type == T_Q5_0 || type == T_Q5_1;
}
constexpr bool has_fifth_bit(int64_t type) { return type == T_Q5_0 || type == T_Q5_1; }
constexpr bool has_own_min(int64_t type) { return type == T_Q4_1 || type == T_Q5_1; }

// K-quant formats keep the file's super-blocks as they are (256 elements each):
//   Q4_K: fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins for 8 sub-blocks of 32, 128 bytes of nibbles
//   Q5_K: the same, then 32 bytes of fifth bits, then 128 bytes of nibbles
//   Q6_K: 128 bytes of low nibbles, 64 bytes of 2-bit high parts, 16 int8 scales (sub-blocks of 16), fp16 d
constexpr bool is_kquant(int64_t type) { return type == T_Q4_K || type == T_Q5_K || type == T_Q6_K; }
constexpr int64_t superblock_bytes(int64_t type) { return type == T_Q4_K ? 144 : type == T_Q5_K ? 176 : 210; }

inline int64_t row_bytes(int64_t type, int64_t k) {
  if (is_block_type(type)) return k / QK * block_bytes(type);
  if (is_kquant(type)) return k / QKK * superblock_bytes(type);
  if (type == T_BF16 || type == T_F16) return 2 * k;
  TORCH_CHECK(false, "unsupported weight type ", type);
}

// A weight whose row blocks are in different formats (a fused q/k/v whose v is Q6_K and q/k Q4_K,
// as llama.cpp's _M mixes make): one uint8 tensor [1, bytes] holding an int64 header (part count,
// then type and rows of each part) and each part's repacked rows, every part 64-byte aligned.
constexpr int64_t T_STACKED = 1000;
constexpr int64_t STACK_ALIGN = 64;
inline int64_t stack_align(int64_t bytes) { return (bytes + STACK_ALIGN - 1) / STACK_ALIGN * STACK_ALIGN; }

// Columns a row of this format must be a multiple of.
inline int64_t block_elems(int64_t type) { return is_kquant(type) ? QKK : QK; }

inline uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

inline uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// The 8 6-bit scales and 8 6-bit mins of a Q4_K/Q5_K super-block (12 packed bytes), as bytes
// sc[0..7], then m[0..7] (ggml's get_scale_min_k4 on four words at once).
inline void unpack_scales_k4(const uint8_t* packed, uint8_t out[16]) {
  uint32_t u[4];
  std::memcpy(u, packed, 12);
  const uint32_t m6 = 0x3f3f3f3f, m4 = 0x0f0f0f0f, m2 = 0x03030303;
  u[3] = ((u[2] >> 4) & m4) | (((u[1] >> 6) & m2) << 4);
  const uint32_t mins_lo = u[1] & m6;
  u[1] = (u[2] & m4) | (((u[0] >> 6) & m2) << 4);
  u[2] = mins_lo;
  u[0] &= m6;
  std::memcpy(out, u, 16);
}

}  // namespace formats
