"""Where GGUF-format linears switch from the kernels' loop to the bfloat16 GEMM: the rule on given
timings, and the start-up measurement on real kernels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from microserve import kernels
from microserve.models.gemm_choice import TRIED_ROWS, choose_gemm_from, gemm_from_rows
from microserve.models.quant import GEMM_FROM_ROWS, GGUFWeight, QuantLinear


def test_gemm_from_the_fewest_rows_it_wins_from_upward():
    t = {8: (1.0, 2.0), 12: (1.5, 1.6), 16: (2.0, 1.7), 24: (3.0, 1.8), 32: (4.0, 1.9)}
    assert gemm_from_rows(t) == 15  # the GEMM for 16 rows and more


def test_a_win_below_a_loss_does_not_count():
    # Noise at 12 rows: the GEMM must win at every larger size too.
    t = {8: (1.0, 2.0), 12: (1.5, 1.4), 16: (2.0, 2.1), 24: (3.0, 1.8), 32: (4.0, 1.9)}
    assert gemm_from_rows(t) == 23


def test_the_loop_keeps_its_rows_where_the_gemm_never_wins():
    t = {rows: (1.0, 2.0) for rows in TRIED_ROWS}
    assert gemm_from_rows(t) == GEMM_FROM_ROWS
    assert gemm_from_rows({rows: (2.0, 1.0) for rows in TRIED_ROWS}) == TRIED_ROWS[0] - 1


@pytest.mark.skipif(kernels.load() is None, reason="no C++ compiler for the CPU kernels")
def test_measured_choice_is_set_once_per_shape_and_keeps_results():
    rng = np.random.default_rng(0)

    def q8_linear(rows: int, cols: int) -> QuantLinear:
        # Q8_0 blocks: an fp16 scale and 32 int8 values.
        blocks = np.zeros((rows, cols // 32), dtype=[("d", "<f2"), ("q", "i1", 32)])
        blocks["d"] = 0.01
        blocks["q"] = rng.integers(-127, 128, size=(rows, cols // 32, 32))
        data = torch.from_numpy(blocks.view(np.uint8).reshape(rows, -1).copy())
        return QuantLinear(GGUFWeight(data, "Q8_0", (rows, cols)), None)

    a, b, fixed = q8_linear(256, 256), q8_linear(256, 256), q8_linear(256, 256)
    fixed.make_batch_invariant()
    x = torch.randn(32, 256).to(torch.bfloat16)
    before = a(x).float()
    chosen = choose_gemm_from([a, b, fixed])
    assert len(chosen) == 1  # one measurement for the shape, shared by both linears
    assert a.gemm_from == b.gemm_from and TRIED_ROWS[0] - 1 <= a.gemm_from <= GEMM_FROM_ROWS
    assert fixed.gemm_from == 0  # batch-invariant linears stay on the loop
    # Either path gives the same product up to bfloat16 rounding.
    torch.testing.assert_close(a(x).float(), before, rtol=2e-2, atol=2e-2)
