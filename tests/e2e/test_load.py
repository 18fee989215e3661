"""Load: bounded queues answer 429, a stalled client stalls nothing else, the router holds
thousands of connections."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest

from server_utils import ServerProcess

COMMON = ["--served-model-name", "tiny", "--dtype", "float32", "--kv-cache-memory", "32MiB", "--block-size", "8"]


@pytest.fixture(scope="module")
def servers(tiny_llama):
    e0 = ServerProcess(["engine", "--model", tiny_llama, *COMMON, "--max-waiting", "4"])
    e1 = ServerProcess(["engine", "--model", tiny_llama, *COMMON])
    router = ServerProcess(["router", "--engine", e1.url, "--model", tiny_llama, "--served-model-name", "tiny",
                            "--max-active", "64", "--max-queued", "3000"])
    yield e0, e1, router
    for p in (router, e0, e1):
        p.stop()


def status(engine):
    return httpx.get(engine.url + "/microserving/status").json()


def wait_idle(engine, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = status(engine)
        if s["running"] == 0 and s["waiting"] == 0 and s["free_blocks"] == s["num_blocks"]:
            return s
        time.sleep(0.1)
    raise AssertionError(f"engine not idle: {status(engine)}")


async def _flood(url, n, body, timeout=300):
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=None)) as client:
        return await asyncio.gather(*(client.post(url, json=body) for _ in range(n)))


@pytest.mark.slow
def test_full_engine_queue_answers_429_and_recovers(servers):
    e0, _, _ = servers
    body = {"model": "tiny", "prompt": list(range(1, 40)), "max_tokens": 24, "ignore_eos": True}
    replies = asyncio.run(_flood(e0.url + "/v1/completions", 80, body))
    codes = [r.status_code for r in replies]
    assert set(codes) == {200, 429}, codes
    busy = next(r for r in replies if r.status_code == 429)
    assert busy.headers["retry-after"] == "1" and busy.json()["error"]["type"] == "rate_limit_error"
    wait_idle(e0)  # nothing leaked by the refusals
    assert httpx.post(e0.url + "/v1/completions", json=body).status_code == 200


@pytest.mark.slow
def test_router_queue_is_bounded(tiny_llama, servers):
    _, e1, _ = servers
    small = ServerProcess(["router", "--engine", e1.url, "--model", tiny_llama, "--served-model-name", "tiny",
                           "--max-active", "2", "--max-queued", "3"])
    try:
        body = {"model": "tiny", "prompt": "hello there", "max_tokens": 32, "ignore_eos": True}
        codes = [r.status_code for r in asyncio.run(_flood(small.url + "/v1/completions", 30, body))]
        assert codes.count(200) >= 5 and codes.count(429) >= 1 and set(codes) == {200, 429}, codes
        assert small.metric("microserve_router:rejected_total") == codes.count(429)
    finally:
        small.stop()
    wait_idle(e1)


@pytest.mark.slow
def test_stalled_client_does_not_stall_the_engine(servers):
    e0, _, _ = servers
    # A client that asks for a long stream and never reads it, with a tiny receive window.
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    stalled.connect(("127.0.0.1", e0.port))
    body = json.dumps({"model": "tiny", "prompt": list(range(1, 30)), "max_tokens": 400, "ignore_eos": True,
                       "stream": True}).encode()
    stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    try:
        time.sleep(0.5)
        start = time.monotonic()
        for _ in range(5):  # others are served at full speed meanwhile
            r = httpx.post(e0.url + "/v1/completions", json={"model": "tiny", "prompt": "go", "max_tokens": 30,
                                                              "ignore_eos": True}, timeout=30)
            assert r.status_code == 200
        assert time.monotonic() - start < 20
        # The stalled request itself was generated to the end in the engine (its output waits
        # in its own queue), so it holds no KV and no batch slot.
        deadline = time.monotonic() + 30
        while status(e0)["running"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status(e0)["running"] == 0
    finally:
        stalled.close()
    wait_idle(e0)


@pytest.mark.slow
def test_router_holds_thousands_of_connections(servers):
    _, e1, router = servers
    n = 2000
    body = {"model": "tiny", "prompt": "a short one", "max_tokens": 2, "ignore_eos": True}
    start = time.monotonic()
    replies = asyncio.run(_flood(router.url + "/v1/completions", n, body))
    seconds = time.monotonic() - start
    codes = [r.status_code for r in replies]
    assert codes.count(200) == n, {c: codes.count(c) for c in set(codes)}
    assert all(r.json()["usage"]["completion_tokens"] == 2 for r in replies)
    print(f"\n{n} concurrent connections through the router: all served in {seconds:.1f} s")
    wait_idle(e1)


@pytest.mark.parametrize("shared", [True, False])
def test_kv_cache_larger_than_memory_is_refused_up_front(shared):
    """A KV cache the host cannot hold is a clear error at start, not an OOM kill (or a
    SIGBUS on a full /dev/shm) in the middle of serving; nothing is left behind."""
    import glob
    import os
    import types

    import torch

    from microserve.errors import UserError
    from microserve.kv_transfer.address import KV_POOL_FOLDER
    from microserve.models.llama import KVCache

    if not os.path.exists("/proc/meminfo"):
        pytest.skip("needs Linux /proc/meminfo")
    cfg = types.SimpleNamespace(num_layers=4, num_kv_heads=2, head_dim=64)
    per_block = KVCache.bytes_per_block(cfg, 16, torch.float32)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    before = set(glob.glob(os.path.join(KV_POOL_FOLDER, f"microserve-kv-{os.getpid()}-*")))
    with pytest.raises(UserError, match="lower --kv-cache-memory"):
        KVCache(cfg, 2 * total // per_block, 16, torch.float32, "cpu", shared=shared)
    assert set(glob.glob(os.path.join(KV_POOL_FOLDER, f"microserve-kv-{os.getpid()}-*"))) == before
