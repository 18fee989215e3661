"""Where a GGUF-format linear switches from the kernels' loop to the bfloat16 GEMM, timed on this CPU.

The loop multiplies in float32 straight from the file's blocks; its time grows with every row of
activations. The GEMM first dequantizes the weight to bfloat16 (a fixed cost per call) and then
runs oneDNN, which on CPUs with AMX or AVX512-BF16 is many times faster per row. Which one wins
at a decode batch of 8, 16 or 32 depends on the CPU (on a 2-core AMX Xeon the GEMM wins from
16 rows; on AVX2-only CPUs the loop holds to 32), so the engine times both at start-up on
the weights it serves, once per distinct (format, shape), and keeps the fewest rows from which
the GEMM is faster for that batch and every larger one it tried.
"""

from __future__ import annotations

import logging
import time

import torch

from microserve.models.quant import GEMM_FROM_ROWS, QuantLinear

log = logging.getLogger(__name__)

# Batch sizes timed; the switch is never set past GEMM_FROM_ROWS, the loop's measured limit.
TRIED_ROWS = (8, 12, 16, 24, 32)
REPEATS = 5


def _median_ms(fn, repeats: int = REPEATS) -> float:
    fn()  # first call: oneDNN builds its kernel for the shape
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def time_paths(lin: QuantLinear, rows: int) -> tuple[float, float]:
    """(loop ms, GEMM ms) of one call at `rows` rows of bfloat16 activations."""
    x = torch.randn(rows, lin.in_features).to(torch.bfloat16)
    w = lin.weight
    loop = _median_ms(lambda: lin.kernels.linear(x, w.data, w.type_id, None, 0))
    gemm = _median_ms(lambda: lin.kernels.linear(x, w.data, w.type_id, None, rows - 1))
    return loop, gemm


def gemm_from_rows(timings: dict[int, tuple[float, float]], default: int = GEMM_FROM_ROWS) -> int:
    """The `gemm_from` (GEMM for batches of more rows) from {rows: (loop ms, GEMM ms)}: just below the
    fewest rows from which the GEMM is faster at every tried size; `default` if it never is."""
    best = default
    for rows in sorted(timings, reverse=True):
        loop, gemm = timings[rows]
        if gemm >= loop:
            break
        best = rows - 1
    return min(best, default)


def choose_gemm_from(linears: list[QuantLinear]) -> dict[tuple, int]:
    """Time each distinct (format, shape) among `linears` and set every linear's `gemm_from`.
    Linears already fixed to the loop (gemm_from 0: batch-invariant mode) are left alone."""
    chosen: dict[tuple, int] = {}
    for lin in linears:
        if lin.gemm_from <= 0:
            continue
        key = (lin.weight.type_name, lin.out_features, lin.in_features, tuple(lin.weight.data.shape))
        if key not in chosen:
            chosen[key] = gemm_from_rows({rows: time_paths(lin, rows) for rows in TRIED_ROWS})
        lin.gemm_from = chosen[key]
    if chosen:
        log.info("bfloat16 GEMM from rows (format, out, in): %s",
                 ", ".join(f"{k[0]} {k[1]}x{k[2]}: >{v}" for k, v in chosen.items()))
    return chosen
