"""Simulated engines: the real engine with a cost model for a forward pass, in process and served."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from server_utils import free_port, wait_healthy

PROFILE = "llama-3.1-8b@h100"


@pytest.fixture(scope="module")
def engine_cls():
    from microserve.config import EngineConfig
    from microserve.engine.engine import LLMEngine

    return lambda **kw: LLMEngine(EngineConfig(simulate=PROFILE, **kw))


def run(engine, prompts, params):
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[f"r{i}"] for i in range(len(prompts))]


def test_steps_last_what_the_cost_model_says(engine_cls):
    from microserve.sampling import SamplingParams

    engine = engine_cls()
    cost = engine.runner.cost
    engine.add_request("a", list(range(100, 612)), SamplingParams(max_tokens=3, ignore_eos=True))
    start = time.perf_counter()
    engine.step()  # the whole 512-token prompt: one prefill chunk, sampled once
    took = time.perf_counter() - start
    expected = cost.step_seconds([(512, 0)], [], 1)
    assert engine.runner.busy_seconds == pytest.approx(expected)
    assert expected <= took < expected + 0.05
    engine.step()  # one decode step at context 513
    assert engine.runner.busy_seconds == pytest.approx(expected + cost.step_seconds([], [513], 1))


def test_outputs_are_words_and_deterministic_whatever_the_batch_or_chunking(engine_cls):
    from microserve.sampling import SamplingParams

    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [f"Question {i}: tell me about rivers and mountains, please." * (1 + i) for i in range(6)]
    alone = [run(engine_cls(), [p], params)[0].outputs[0] for p in prompts]
    batched = run(engine_cls(max_num_batched_tokens=32), prompts, params)
    assert [o.outputs[0].token_ids for o in batched] == [o.token_ids for o in alone]
    text = alone[0].text
    assert len(text.split()) == 12 and all(w.isalpha() for w in text.split())
    seeded = SamplingParams(max_tokens=8, temperature=1.0, seed=7)
    assert run(engine_cls(), prompts[:1], seeded)[0].outputs[0].token_ids == \
        run(engine_cls(), prompts[:1], seeded)[0].outputs[0].token_ids


def test_kv_capacity_follows_the_profile(engine_cls):
    engine = engine_cls()
    assert engine.pool.num_blocks == engine.runner.cost.kv_capacity_tokens() // engine.cfg.block_size
    small = engine_cls(kv_cache_memory="1GiB")
    assert small.pool.num_blocks == (1 << 30) // small.runner.cost.kv_bytes_per_token() // 16


def test_unknown_profile_is_a_clear_error():
    from microserve.config import EngineConfig
    from microserve.engine.engine import LLMEngine
    from microserve.errors import UserError

    with pytest.raises(UserError, match="llama-3.1-8b@h100"):
        LLMEngine(EngineConfig(simulate="gpt-9@tpu"))


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


@pytest.mark.slow
def test_serve_64_simulated_engines():
    """The whole stack at 64 engines: every request completes, every process stops."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "microserve.cli", "serve", "--simulate", PROFILE, "--engines", "64",
                             "--strategy", "least_loaded", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        wait_healthy(url, timeout=60)
        assert httpx.get(url + "/health").json()["engines_up"] == 64
        results = []

        def one(i):
            body = {"model": PROFILE, "prompt": f"Request {i}: " + "a long story " * 40, "max_tokens": 16,
                    "ignore_eos": True, "temperature": 0}
            r = httpx.post(url + "/v1/completions", json=body, timeout=60)
            results.append((r.status_code, r.json()["usage"]["completion_tokens"] if r.status_code == 200 else r.text))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(128)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert results == [(200, 16)] * 128
        kids = children_of(proc.pid)
        assert len(kids) == 2  # one process holds the 64 engines, one is the router
        proc.send_signal(signal.SIGTERM)  # serve stops what it started
        assert proc.wait(timeout=30) == 0
        time.sleep(0.5)
        assert not [k for k in kids if os.path.exists(f"/proc/{k}") and
                    open(f"/proc/{k}/stat").read().split()[2] != "Z"]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
