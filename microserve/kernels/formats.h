// GGUF weight formats as the kernels hold them (quant_linear.cpp): type ids and row layout.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <cstring>

namespace formats {

// ggml type ids, as in the GGUF file.
constexpr int64_t T_F16 = 1, T_Q4_0 = 2, T_Q4_1 = 3, T_Q8_0 = 8, T_BF16 = 30;
constexpr int64_t QK = 32;  // elements per block of the block formats

// Block formats are repacked at load (`repack`) from the file's array of blocks into, per row:
// all blocks' quants, then all blocks' fp16 scales d, then (Q4_1) all fp16 minimums m. Same
// bytes as the file; the scales of a row then convert to float 16 at a time.
constexpr int64_t quant_bytes(int64_t type) { return type == T_Q8_0 ? 32 : 16; }
constexpr int64_t block_bytes(int64_t type) { return type == T_Q8_0 ? 34 : type == T_Q4_0 ? 18 : 20; }
constexpr bool is_block_type(int64_t type) { return type == T_Q8_0 || type == T_Q4_0 || type == T_Q4_1; }

inline int64_t row_bytes(int64_t type, int64_t k) {
  switch (type) {
    case T_Q8_0: return k / QK * 34;
    case T_Q4_0: return k / QK * 18;
    case T_Q4_1: return k / QK * 20;
    case T_BF16: case T_F16: return 2 * k;
  }
  TORCH_CHECK(false, "unsupported weight type ", type);
}

inline uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

}  // namespace formats
