"""tcmalloc under engine processes, where it is installed.

PyTorch's CPU ops allocate and free large buffers every step; glibc's malloc returns many of
them to the kernel and faults them back in. With tcmalloc preloaded (as vLLM's and PyTorch's
CPU guides advise) a 512-token prefill of the built-in model took 140 ms instead of 154 and
offline throughput rose 5% on a 2-core Xeon (docs/benchmarks.md). It is an optimization only:
without the library, or with MICROSERVE_ALLOCATOR=system, engines run on glibc's malloc.

A library can only be preloaded when a process starts, so `microserve engine` re-executes
itself once with LD_PRELOAD set (same pid, same arguments); `serve`'s engines are such
processes. In-process use (`microserve.LLM`) needs LD_PRELOAD set by the caller.
"""

from __future__ import annotations

import os
import sys

SWITCH = "MICROSERVE_ALLOCATOR"  # "system": keep glibc's malloc
# Debian / Ubuntu (libtcmalloc-minimal4) and Fedora / RHEL (gperftools-libs) locations.
CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
)


def tcmalloc_path() -> str | None:
    return next((p for p in CANDIDATES if os.path.exists(p)), None)


def preloaded_env(environ: dict[str, str]) -> dict[str, str] | None:
    """`environ` with tcmalloc added to LD_PRELOAD, or None where there is nothing to do: switched
    off, not installed, or already preloaded (so a re-executed process does not loop)."""
    if environ.get(SWITCH, "tcmalloc") == "system":
        return None
    path = tcmalloc_path()
    preload = environ.get("LD_PRELOAD", "")
    if path is None or "tcmalloc" in preload:
        return None
    # tcmalloc reports every allocation over 1 GiB on stderr (a large KV cache is one); not news.
    return {**environ, "LD_PRELOAD": f"{path}:{preload}" if preload else path,
            "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": environ.get("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD",
                                                                 str(1 << 40))}


def reexec_with_tcmalloc(cli_args: list[str]) -> None:
    """Replace this process with `python -m microserve.cli CLI_ARGS` under tcmalloc, if it applies."""
    env = preloaded_env(dict(os.environ))
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", "microserve.cli", *cli_args], env)
