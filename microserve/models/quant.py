"""Weights kept in their GGUF format (Q8_0, Q4_0, Q4_1, BF16, F16) and the layers that use them.

A GGUF file loaded with `quantization="auto"` keeps each linear and the embedding in the file's
own blocks: the engine's memory follows the file's size, and a decode step reads that many bytes
instead of float32 weights. The matmuls run in microserve/kernels; `quantization="none"`
dequantizes everything at load instead, which is the correctness reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from microserve.config import QUANTIZATION_CHOICES  # noqa: F401  (re-exported for the loader)

# ggml type ids the kernels take, by name.
KERNEL_TYPES = {"F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14,
                "BF16": 30}
# Columns a row must be a multiple of: the K-quants' super-blocks hold 256 elements.
BLOCK_ELEMS = {name: 256 if name.endswith("_K") else 32 for name in KERNEL_TYPES}
# A weight whose row blocks are in different formats (kernels' T_STACKED): a fused q/k/v whose v
# llama.cpp's _M mixes store in more bits than q and k (Q6_K beside Q4_K, Q8_0 beside Q5_0).
STACKED = "STACKED"
STACKED_TYPE_ID = 1000

# Batches of more rows than this dequantize the weight and use the BLAS GEMM (prefill); fewer
# use the kernels' own loop (decode), which reads only the file's bytes. Measured on a 2-core
# AVX2 CPU: the loop is as fast up to about 32 rows of a 576-wide layer.
GEMM_FROM_ROWS = 32
# BF16 weights in a bfloat16 model need no dequantizing for oneDNN's bfloat16 GEMM. Measured on
# the BF16 SmolLM2 file (AVX512-BF16, 2 threads): decode batch 32 192 tok/s with it against 158
# with the loop, batch 8 81 against 137; so past 16 rows.
BF16_GEMM_FROM_ROWS = 16


def padded_rows(n: int) -> int:
    """The row count a packed GEMM runs with for `n` tokens: exact up to 16 (decode
    batches), then rounded up to a multiple of 16, and of 128 past 1024.

    oneDNN builds and caches a kernel for every distinct shape it sees (up to 1024 of
    them), so a token count that varies step by step would grow the engine's memory by
    hundreds of MB over a long run. Rounding keeps it to ~100 shapes per weight up to 4096
    tokens. Steps of 16 up to 1024 (the default token budget): a 530-token prompt, a
    512-token one with its chat template, ran as 640 rows with steps of 128 past 512 and
    took 186 ms against 140 for 512 tokens.
    """
    if n <= 16:
        return n
    step = 16 if n <= 1024 else 128
    return -(-n // step) * step


@dataclass
class GGUFWeight:
    """One weight as stored in a GGUF file: `data` is uint8 [rows, bytes per row] (stacked: [1, bytes])."""

    data: torch.Tensor
    type_name: str
    shape: tuple[int, int]  # (rows, columns) of the dense weight
    packed: bool = False  # True once in the kernels' layout (`repacked`); rows are rows either way

    @property
    def type_id(self) -> int:
        return STACKED_TYPE_ID if self.type_name == STACKED else KERNEL_TYPES[self.type_name]

    def repacked(self) -> GGUFWeight:
        from microserve import kernels

        if self.packed:
            return self
        data = kernels.load().repack(self.data.contiguous(), self.type_id, self.shape[1])
        return GGUFWeight(data, self.type_name, self.shape, packed=True)

    def dequantize(self) -> torch.Tensor:
        from microserve import kernels

        return kernels.load().dequantize(self.repacked().data, self.type_id, self.shape[1], None)


def concat_rows(parts: list[GGUFWeight]) -> GGUFWeight | None:
    """One weight from row blocks (q, k, v or gate, up): in their format, or stacked when their
    formats differ (each block then runs on its own format's kernels)."""
    if any(p.packed for p in parts) or len({p.shape[1] for p in parts}) != 1:
        return None
    shape = (sum(p.shape[0] for p in parts), parts[0].shape[1])
    if len({p.type_name for p in parts}) > 1:
        from microserve import kernels

        packed = [p.repacked() for p in parts]
        data = kernels.load().stack([p.data for p in packed], [p.type_id for p in packed], shape[1])
        return GGUFWeight(data, STACKED, shape, packed=True)
    data = torch.cat([p.data for p in parts]) if len(parts) > 1 else parts[0].data.contiguous()
    return GGUFWeight(data, parts[0].type_name, shape)


class QuantLinear(nn.Module):
    """y = x W^T (+ b) with W in a GGUF format, computed in float32."""

    def __init__(self, weight: GGUFWeight, bias: torch.Tensor | None):
        super().__init__()
        from microserve import kernels

        self.kernels = kernels.load()
        self.weight = weight.repacked()
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.bias_bf16 = None if bias is None else self.bias.to(torch.bfloat16)
        self.gemm_from = GEMM_FROM_ROWS

    def use_bf16_gemm(self) -> None:
        """In a bfloat16 model: a BF16 weight goes to the bfloat16 GEMM from a few rows on."""
        if self.weight.type_name == "BF16" and self.gemm_from > 0:
            self.gemm_from = BF16_GEMM_FROM_ROWS

    def make_batch_invariant(self) -> None:
        """Always the kernels' own loop, whose result for a row does not depend on the other rows."""
        self.gemm_from = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # bfloat16 activations past `gemm_from` rows go to the bfloat16 GEMM, several times faster
        # than float32's there (BF16 files: on the file's bytes, no copy), on `padded_rows` rows
        # so that oneDNN keeps a bounded number of kernels. Smaller batches run the kernels'
        # float32 loop.
        n = x.shape[0]
        if x.dtype == torch.bfloat16 and x.dim() == 2 and 0 < self.gemm_from < n:
            if padded_rows(n) != n:
                return self(torch.cat([x, x.new_zeros(padded_rows(n) - n, x.shape[1])]))[:n]
            return F.linear(x, self.dense_bf16(), self.bias_bf16)  # bfloat16 out: no float32 round trip
        y = self.kernels.linear(x if x.dtype == torch.bfloat16 else x.float(), self.weight.data,
                                self.weight.type_id, self.bias, self.gemm_from)
        return y.to(x.dtype)

    def dense_bf16(self) -> torch.Tensor:
        """W as bfloat16 [out, in]: a BF16 file's bytes as they are, other formats dequantized."""
        if self.weight.type_name == "BF16":
            return self.weight.data.view(torch.bfloat16)
        return self.kernels.dequantize_bf16(self.weight.data, self.weight.type_id, self.in_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, format={self.weight.type_name}"


class QuantEmbedding(nn.Module):
    """Token embeddings looked up in GGUF-format rows (dequantized per lookup)."""

    def __init__(self, weight: GGUFWeight, dtype: torch.dtype):
        super().__init__()
        from microserve import kernels

        self.kernels = kernels.load()
        self.weight = weight.repacked()
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.kernels.dequantize(self.weight.data, self.weight.type_id, self.weight.shape[1], ids.reshape(-1))
        return rows.to(self.dtype).view(*ids.shape, -1)
