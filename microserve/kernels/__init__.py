"""C++ CPU kernels, compiled on first use with torch's extension builder and cached on disk.

The build takes about a minute once per machine (`make` does it at install) and again only
when a source, the flags or the torch install change: the cache folder is named by a hash of
all of them, and a finished build is imported directly, without taking the builder's lock.
`load()` returns None where no compiler is found, and callers fall back to their PyTorch path.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(f) for f in ("bindings.cpp", "quant_linear.cpp", "decode_step.cpp")]
HEADERS = [Path(__file__).with_name(f) for f in ("formats.h", "quant_linear.h", "decode_step.h")]
STALE_LOCK_S = 600  # a build lock older than this was left by a killed build


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _simd_flags(cpu: set[str]) -> list[str]:
    """The widest vector instructions this CPU has that the kernels are written for."""
    if not {"avx2", "fma", "f16c"} <= cpu:
        return []
    flags = ["-mavx2", "-mfma", "-mf16c"]
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= cpu:
        flags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
    return flags


def _cache_root() -> Path:
    return Path(os.environ.get("MICROSERVE_CACHE", Path.home() / ".cache" / "microserve")) / "kernels"


@functools.cache
def load():
    """The compiled module (`repack`, `linear`, `dequantize`, `DecodeStep`), or None if it cannot be built here."""
    if os.environ.get("MICROSERVE_NO_KERNELS"):
        return None
    import torch
    from torch.utils import cpp_extension

    # -fopenmp: at::parallel_for is a header template that needs it to run in parallel; the module
    # then shares torch's own libgomp (same soname, already loaded), so one thread pool.
    flags = ["-O3", "-fopenmp"] + _simd_flags(_cpu_flags())
    key = hashlib.sha256()
    for part in [*(p.read_bytes() for p in SOURCES + HEADERS), " ".join(flags).encode(), torch.__version__.encode(),
                 torch.__file__.encode()]:
        key.update(part)
    name = f"microserve_kernels_{key.hexdigest()[:16]}"
    folder = _cache_root() / name
    built = folder / f"{name}.so"
    threads = torch.get_num_threads()
    try:
        if built.exists():
            spec = importlib.util.spec_from_file_location(name, built)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        folder.mkdir(parents=True, exist_ok=True)
        lock = folder / "lock"
        if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink(missing_ok=True)
        return cpp_extension.load(name=name, sources=[str(s) for s in SOURCES], extra_cflags=flags,
                                  extra_ldflags=["-fopenmp"], build_directory=str(folder), verbose=False)
    except Exception as e:  # no compiler, no ninja, a failed build: run without the kernels
        log.warning("CPU kernels unavailable (%s); quantized GGUF weights will be dequantized",
                    str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None
    finally:
        torch.set_num_threads(threads)  # the build must not change the engine's threads
