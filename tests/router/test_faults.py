"""Faults: an engine dies under load, a KV transfer breaks, a sequence resumes elsewhere."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import pytest
import torch

from conftest import make_engine, run_to_completion
from server_utils import ServerProcess

COMMON = ["--served-model-name", "tiny", "--dtype", "float32", "--kv-cache-memory", "32MiB", "--block-size", "8"]


def prompt_of(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 49152, (n,), generator=g).tolist()


# ---------------------------------------------------------------- engine level: resume


def test_resumed_sequence_continues_exactly(tiny_engine_loaded):
    """A sequence resumed from k tokens (as fail-over does) yields the rest of the same
    tokens and text: nothing repeated, nothing missing, held-back text included."""
    from microserve.sampling import SamplingParams

    prompt = prompt_of(21, 5)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=["@@never@@"])
    full = run_to_completion(make_engine(tiny_engine_loaded), [prompt], params)[0].outputs[0]
    for k in (1, 13, 39):
        # What a client had seen after k tokens: the text then visible (stop strings hold some back).
        first = make_engine(tiny_engine_loaded)
        first.add_request("a", prompt, SamplingParams(temperature=0, max_tokens=k, ignore_eos=True,
                                                      stop=["@@never@@"]))
        seen_text = ""
        while first.has_unfinished_requests():
            for out in first.step():
                c = out.outputs[0]
                if c.finish_reason is None:
                    seen_text += c.delta_text
        engine = make_engine(tiny_engine_loaded)
        engine.add_request("b", prompt, params, resume=(full.token_ids[:k], len(seen_text)))
        ids, text = [], ""
        while engine.has_unfinished_requests():
            for out in engine.step():
                ids += out.outputs[0].delta_token_ids
                text += out.outputs[0].delta_text
                reason = out.outputs[0].finish_reason
        assert full.token_ids[:k] + ids == full.token_ids
        assert seen_text + text == full.text
        assert reason == "length"
        assert engine.pool.num_free_blocks == engine.pool.num_blocks


# ---------------------------------------------------------------- cluster level


@pytest.fixture(scope="module")
def cluster(tiny_llama):
    e0 = ServerProcess(["engine", "--model", tiny_llama, *COMMON])
    e1 = ServerProcess(["engine", "--model", tiny_llama, *COMMON])
    router = ServerProcess(["router", "--engine", e0.url, "--engine", e1.url, "--model", tiny_llama,
                            "--served-model-name", "tiny", "--strategy", "round_robin"])
    procs = {"e0": e0, "e1": e1, "router": router}
    yield procs
    for p in procs.values():
        p.stop()


LOAD = [  # (prompt seed, prompt length, extra body)
    (1, 30, {}), (2, 41, {"n": 2}), (3, 25, {"stop": ["@@never@@"]}), (4, 52, {}),
    (5, 33, {}), (6, 28, {"n": 2}), (7, 47, {}), (8, 36, {"stop": ["@@never@@"]}),
]


async def _stream_all(url: str, max_tokens: int, on_progress=None) -> list[dict]:
    """Streaming completions for LOAD, concurrently: text per choice, chunk times, usage."""
    async def one(client, seed, n, extra):
        body = {"model": "tiny", "prompt": prompt_of(n, seed), "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, **extra}
        texts, times, finish, usage = {}, [], {}, None
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            assert r.status_code == 200, await r.aread()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for ch in chunk["choices"]:
                    texts[ch["index"]] = texts.get(ch["index"], "") + ch["text"]
                    if ch["finish_reason"]:
                        finish[ch["index"]] = ch["finish_reason"]
                times.append(time.monotonic())
                if on_progress:
                    on_progress()
        return {"texts": texts, "finish": finish, "usage": usage,
                "max_gap": max((b - a for a, b in zip(times, times[1:])), default=0.0)}

    async with httpx.AsyncClient(timeout=120) as client:
        return await asyncio.gather(*(one(client, seed, n, extra) for seed, n, extra in LOAD))


@pytest.mark.slow
def test_engine_killed_under_streaming_load(cluster, tiny_llama):
    router, e1 = cluster["router"], cluster["e1"]
    max_tokens = 160
    expected = asyncio.run(_stream_all(router.url, max_tokens))

    chunks = {"n": 0}
    killed = {}

    def on_progress():  # kill one engine once every stream is well under way
        chunks["n"] += 1
        if chunks["n"] == 8 * 6 and not killed:
            os.killpg(e1.proc.pid, signal.SIGKILL)
            killed["at"] = time.monotonic()

    got = asyncio.run(_stream_all(router.url, max_tokens, on_progress))
    assert killed, "the load finished before the engine could be killed"
    for want, have in zip(expected, got):
        assert have["texts"] == want["texts"]  # no token duplicated or lost, same greedy text
        assert set(have["finish"].values()) == {"length"}
        assert have["usage"]["completion_tokens"] == max_tokens * len(have["texts"])
    pause = max(r["max_gap"] for r in got)
    print(f"\nlongest pause in a stream across the fail-over: {pause * 1000:.0f} ms")
    health = httpx.get(router.url + "/health").json()
    assert health["engines_up"] == 1
    assert router.metric("microserve_router:failovers_total") >= 1

    # The engine comes back (same port): the router takes it back into rotation.
    e1.proc.wait()
    cluster["e1"] = back = ServerProcess(e1.args, port=e1.port)
    deadline = time.monotonic() + 30
    while httpx.get(router.url + "/health").json()["engines_up"] < 2 and time.monotonic() < deadline:
        time.sleep(0.25)
    assert httpx.get(router.url + "/health").json()["engines_up"] == 2
    again = asyncio.run(_stream_all(router.url, 8))
    assert all(set(r["finish"].values()) == {"length"} for r in again)
    assert back.metric("microserve:generation_tokens_total") > 0


@pytest.mark.slow
def test_broken_kv_transfer_falls_back_to_local_prefill(cluster):
    """The prefill engine is unreachable: the decode engine prefills itself; same output,
    and its reservation is not left behind."""
    from microserve.router.cluster import Engine
    from microserve.router.strategies import RoutedRequest, split
    from server_utils import free_port

    e0 = cluster["e0"]
    prompt = prompt_of(40, 11)
    sampling = {"max_tokens": 12, "temperature": 0, "ignore_eos": True}

    async def run():
        dead, decode = Engine(f"http://127.0.0.1:{free_port()}"), Engine(e0.url)
        text = ""
        try:
            async for chunk in split(RoutedRequest("fallback-1", prompt, sampling), dead, decode, 32):
                text += chunk.choices[0].text
        finally:
            await dead.close()
            await decode.close()
        return text

    text = asyncio.run(run())
    direct = httpx.post(e0.url + "/v1/completions", json={"model": "tiny", "prompt": prompt, **sampling}).json()
    assert text == direct["choices"][0]["text"]
    status = httpx.get(e0.url + "/microserving/status").json()
    assert status["reservations"] == 0 and status["running"] == 0


def test_abort_then_new_request_under_the_same_id(tiny_engine_loaded):
    """A router aborts a reservation and at once starts the request under the same id (the
    fall-back above): the queued abort must land before the new request, not end it."""
    from conftest import make_engine
    from microserve.sampling import SamplingParams
    from microserve.server.async_engine import AsyncEngine

    aengine = AsyncEngine(make_engine(tiny_engine_loaded))

    async def run():
        aengine.abort("same-id")  # both are queued before the loop thread runs
        gen = aengine.generate("same-id", list(range(3, 20)), SamplingParams(max_tokens=5, temperature=0))
        aengine.start()
        outs = [out async for out in gen]
        return outs[-1]

    try:
        last = asyncio.run(run())
    finally:
        aengine.shutdown()
    assert last.finished and len(last.outputs[0].token_ids) == 5
