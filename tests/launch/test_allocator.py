"""tcmalloc under engine processes: when LD_PRELOAD is set, and that a started engine has it mapped."""

from __future__ import annotations

import httpx
import pytest

from microserve.launch import allocator
from server_utils import ServerProcess


def test_preload_added_once_and_switchable(monkeypatch):
    monkeypatch.setattr(allocator, "tcmalloc_path", lambda: "/lib/libtcmalloc_minimal.so.4")
    env = allocator.preloaded_env({"LD_PRELOAD": "/lib/other.so"})
    assert env["LD_PRELOAD"] == "/lib/libtcmalloc_minimal.so.4:/lib/other.so"
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40
    assert allocator.preloaded_env(env) is None  # already there: a re-executed engine does not loop
    assert allocator.preloaded_env({allocator.SWITCH: "system"}) is None
    monkeypatch.setattr(allocator, "tcmalloc_path", lambda: None)
    assert allocator.preloaded_env({}) is None  # not installed: glibc's malloc


@pytest.mark.slow
@pytest.mark.skipif(allocator.tcmalloc_path() is None, reason="tcmalloc is not installed")
@pytest.mark.parametrize("switch", ["tcmalloc", "system"])
def test_engine_process_runs_under_tcmalloc(tiny_llama, switch):
    """`microserve engine` re-executes itself under tcmalloc (same pid, so whoever started it still
    holds it); MICROSERVE_ALLOCATOR=system keeps glibc's malloc."""
    env = {"LD_PRELOAD": "", allocator.SWITCH: switch}
    server = ServerProcess(["engine", "--model", tiny_llama, "--dtype", "float32", "--kv-cache-memory", "16MiB"],
                           env=env)
    try:
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        with open(f"/proc/{server.proc.pid}/maps") as f:
            assert ("libtcmalloc" in f.read()) == (switch == "tcmalloc")
    finally:
        server.stop()
