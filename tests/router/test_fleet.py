"""The router's view of many engines: status streams instead of polling, one prefix index."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from server_utils import ServerProcess, free_port

PROFILE = "llama-3.1-8b@h100"


def test_prefix_index_hashes_each_prompt_once_and_agrees_with_each_engine(monkeypatch):
    from microserve.engine.block_pool import hash_prompt_blocks
    from microserve.router import cluster as cluster_module
    from microserve.router.cluster import Cluster

    cluster = Cluster([f"http://127.0.0.1:{9000 + i}" for i in range(100)])
    prompt = list(range(1000, 1100))  # 6 full blocks of 16
    hashes = hash_prompt_blocks(prompt, 16)
    for i, engine in enumerate(cluster.engines):
        engine._apply({"instance": "x"}, [[j, "stored", h.hex()] for j, h in enumerate(hashes[: i % 7])], i % 7)
    calls = []
    monkeypatch.setattr(cluster_module, "hash_prompt_blocks", lambda *a: calls.append(a) or hash_prompt_blocks(*a))
    cached = cluster.cached_tokens(prompt)
    assert len(calls) == 1  # once for 100 engines
    assert cached == {e: e.cached_tokens(prompt) for e in cluster.engines}
    assert sorted(set(cached.values())) == [0, 16, 32, 48, 64, 80, 96]
    cluster.engines[6]._apply({"instance": "x"}, [[6, "removed", hashes[2].hex()]], 7)
    assert cluster.cached_tokens(prompt)[cluster.engines[6]] == 32
    cluster.engines[6]._apply({"instance": "restarted"}, [], 0)  # a new process: nothing cached
    assert cluster.cached_tokens(prompt)[cluster.engines[6]] == 0


@pytest.mark.slow
def test_status_streams_follow_engines_without_polling():
    from microserve.router.cluster import Cluster

    ports = [free_port(), free_port()]
    hosts = ServerProcess(["engine", "--simulate", PROFILE, "--ports", ",".join(map(str, ports))], port=ports[0])
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    prompt = list(range(2000, 2100))

    async def run():
        cluster = Cluster(urls)
        await cluster.start()
        try:
            e0, e1 = cluster.engines
            assert e0.healthy and e1.healthy
            await asyncio.sleep(0.5)  # each stream's first message
            polled = [e.messages for e in cluster.engines]
            assert min(polled) >= 2  # the start-up poll and the stream's first line
            await asyncio.sleep(1.0)
            # Idle engines send nothing but the occasional heartbeat.
            assert [e.messages for e in cluster.engines] == polled
            async with httpx.AsyncClient() as client:
                r = await client.post(urls[1] + "/microserving/start_generate",
                                      json={"request_id": "a", "prompt": prompt, "max_tokens": 4})
                assert r.status_code == 200
            deadline = time.monotonic() + 3
            while cluster.cached_tokens(prompt)[e1] < 96 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert cluster.cached_tokens(prompt) == {e0: 0, e1: 96}
            assert e1.status.running == 0
        finally:
            await cluster.stop()

    try:
        asyncio.run(run())
    finally:
        hosts.stop()


@pytest.mark.slow
def test_a_dead_engine_is_marked_down_and_taken_back_after_restart():
    from microserve.router.cluster import Cluster

    port = free_port()
    engine = ServerProcess(["engine", "--simulate", PROFILE], port=port)
    url = f"http://127.0.0.1:{port}"

    async def run():
        nonlocal engine
        cluster = Cluster([url])
        await cluster.start()
        try:
            e = cluster.engines[0]
            assert e.healthy
            engine.stop()
            deadline = time.monotonic() + 10
            while e.healthy and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert not e.healthy
            first = e._instance
            engine = await asyncio.to_thread(ServerProcess, ["engine", "--simulate", PROFILE], port=port)
            deadline = time.monotonic() + 10
            while not e.healthy and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert e.healthy and e._instance != first
        finally:
            await cluster.stop()

    try:
        asyncio.run(run())
    finally:
        engine.stop()
