// Linear layers on GGUF-format weights (quant_linear.cpp).
#pragma once

#include <torch/extension.h>

// The file's blocks ([N, bytes per row] uint8) in the layout the kernels read (same size).
torch::Tensor repack(const torch::Tensor& raw, int64_t type, int64_t k);

// Row blocks in different formats (each repacked, [rows_i, bytes]) as one weight of type T_STACKED.
torch::Tensor stack(const std::vector<torch::Tensor>& parts, const std::vector<int64_t>& types, int64_t k);

// Rows of a repacked weight (all of them when `rows` is empty) as float32 [rows, k].
torch::Tensor dequantize(const torch::Tensor& w, int64_t type, int64_t k, const c10::optional<torch::Tensor>& rows);
// The whole weight as bfloat16, rounded as torch's cast rounds (what the bfloat16 GEMM reads)
torch::Tensor dequantize_bf16(const torch::Tensor& w, int64_t type, int64_t k);

// y = x W^T (+ bias) as float32, x float32 or bfloat16 [M, K], W repacked. Batches of more than
// `gemm_from` rows dequantize W and use the BLAS GEMM (bfloat16's for bfloat16 x); 0 never does
// (each row's result is then batch-invariant). Smaller batches run the kernels' own loop in float32.
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& w, int64_t type,
                     const c10::optional<torch::Tensor>& bias, int64_t gemm_from);

// The instruction set the kernels were built for: "avx512", "avx2" or "none".
std::string simd();
