"""C++ CPU kernels, compiled on first use with torch's extension builder and cached on disk.

The build takes about a minute once per machine (and again only when a source changes); engines
that start together wait on the same build. `load()` returns None where no compiler is found,
and callers fall back to their plain PyTorch path.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(f) for f in ("bindings.cpp", "quant_linear.cpp", "decode_step.cpp")]


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.cache
def load():
    """The compiled module (`repack`, `linear`, `dequantize`, `DecodeStep`), or None if it cannot be built here."""
    if os.environ.get("MICROSERVE_NO_KERNELS"):
        return None
    import torch
    from torch.utils import cpp_extension

    simd = {"avx2", "fma", "f16c"} <= _cpu_flags()
    # -fopenmp: at::parallel_for is a header template that needs it to run in parallel; the module
    # then shares torch's own libgomp (same soname, already loaded), so one thread pool.
    flags = ["-O3", "-fopenmp"] + (["-mavx2", "-mfma", "-mf16c"] if simd else [])
    try:
        return cpp_extension.load(
            name="microserve_kernels" + ("_avx2" if simd else ""),
            sources=[str(s) for s in SOURCES],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, a failed build: run without the kernels
        log.warning("CPU kernels unavailable (%s); quantized GGUF weights will be dequantized",
                    str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None
    finally:
        torch.set_num_threads(torch.get_num_threads())  # the build must not change the engine's threads
