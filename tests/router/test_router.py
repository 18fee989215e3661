"""The router over real engine processes: every strategy, hot swaps, admin auth, `serve`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from server_utils import TOKEN, ServerProcess, complete, free_port, prompt_of, wait_healthy

pytestmark = pytest.mark.slow  # every test here starts server processes or loads the built-in model

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "shortest_queue_split.py"


# Real engines (a tiny model) and simulated ones (a cost model for the forward pass, the same
# engine otherwise): every strategy must give one engine's answer on both.
@pytest.fixture(scope="module", params=["model", "simulated"])
def setup(request, tiny_llama):
    source = ["--model", tiny_llama, "--kv-cache-memory", "32MiB"] if request.param == "model" \
        else ["--simulate", "llama-3.1-8b@h100"]
    common = [*source, "--served-model-name", "tiny", "--dtype", "float32", "--block-size", "8"]
    e0, e1, ref = (ServerProcess(["engine", *common]) for _ in range(3))
    os.environ["MICROSERVE_ADMIN_TOKEN"] = TOKEN
    try:
        router = ServerProcess(["router", "--engine", e0.url, "--engine", e1.url, "--model", tiny_llama,
                                "--served-model-name", "tiny"])
    finally:
        del os.environ["MICROSERVE_ADMIN_TOKEN"]
    yield {"e0": e0, "e1": e1, "ref": ref, "router": router}
    for p in (router, e0, e1, ref):
        p.stop()


def switch(router, body, token=TOKEN):
    return httpx.post(router.url + "/admin/strategy", json=body, headers={"Authorization": f"Bearer {token}"})


def hits(server):
    return httpx.get(server.url + "/microserving/status").json()["prefix_hit_tokens"]


STRATEGIES = [
    {"name": "round_robin"}, {"name": "least_loaded"}, {"name": "prefix_aware"}, {"name": "disagg"},
    {"name": "disagg", "roles": ["prefill", "decode"]}, {"name": "balanced_disagg", "params": {"fraction": 0.3}},
    {"name": "context_migration"}, {"name": "adaptive", "params": {"long_prompt": 8, "busy": 0}},
    {"name": "custom", "source": EXAMPLE.read_text(), "params": {"long_prompt": 8}},
    {"name": "elastic_disagg", "roles": ["prefill", "decode"]}, {"name": "elastic_disagg", "params": {"idle_load": 0}},
]


@pytest.mark.parametrize("spec", STRATEGIES, ids=lambda s: s["name"] + ("-roles" if "roles" in s else ""))
def test_every_strategy_matches_one_engine(setup, spec):
    router = setup["router"]
    r = switch(router, {**spec, "roles": spec.get("roles", ["both", "both"])})
    assert r.status_code == 200, r.text
    for seed in (1, 2, 3):
        prompt = prompt_of(30 + 7 * seed, seed)
        assert complete(router, prompt) == complete(setup["ref"], prompt)


def test_chat_and_stream_through_the_router(setup):
    from openai import OpenAI

    router = setup["router"]
    switch(router, {"name": "disagg", "roles": ["both", "both"]})
    client = OpenAI(base_url=router.url + "/v1", api_key="none", max_retries=0)
    msgs = [{"role": "user", "content": "Tell me something"}]
    full = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0,
                                          extra_body={"ignore_eos": True})
    direct = OpenAI(base_url=setup["ref"].url + "/v1", api_key="none").chat.completions.create(
        model="tiny", messages=msgs, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    assert full.choices[0].message.content == direct.choices[0].message.content
    assert full.usage.prompt_tokens == direct.usage.prompt_tokens and full.usage.completion_tokens == 10
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert httpx.post(router.url + "/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
    assert httpx.post(router.url + "/v1/completions", json={"model": "tiny", "prompt": "x",
                                                            "temperature": 9}).status_code == 400


def test_prefix_aware_goes_where_the_prefix_is(setup):
    router, engines = setup["router"], [setup["e0"], setup["e1"]]
    switch(router, {"name": "prefix_aware", "roles": ["both", "both"]})
    shared = prompt_of(64, seed=40)
    before = [hits(e) for e in engines]
    complete(router, shared + [5, 6, 7])
    time.sleep(1.0)  # the router's prefix index follows the engines' events
    mid = [hits(e) for e in engines]
    complete(router, shared + [8, 9, 10])
    after = [hits(e) for e in engines]
    gained = [a - m for a, m in zip(after, mid)]
    assert max(gained) >= 64 and min(gained) == 0
    assert [m - b for m, b in zip(mid, before)] == [0, 0]  # the first time, nothing was cached


def test_context_migration_moves_kv_instead_of_recomputing(setup):
    router, e1 = setup["router"], setup["e1"]
    # e0 decodes; e1 holds the prompt's prefix.
    switch(router, {"name": "context_migration", "params": {"min_tokens": 16}, "roles": ["decode", "prefill"]})
    prompt = prompt_of(57, seed=50)  # end = 56 = 7 blocks of 8
    complete(e1, prompt)
    time.sleep(1.0)
    before = hits(e1)
    assert complete(router, prompt) == complete(setup["ref"], prompt)
    assert hits(e1) - before >= 56  # e1 sent its cached KV: no recompute there


def test_switch_during_50_requests_loses_none(setup):
    router = setup["router"]
    prompts = [prompt_of(20 + i % 17, 100 + i) for i in range(50)]
    results = [None] * 50

    def run(i):
        try:
            results[i] = complete(router, prompts[i], max_tokens=8)
        except AssertionError as e:
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for spec in ({"name": "least_loaded"}, {"name": "disagg"}, {"name": "balanced_disagg", "params": {"fraction": 0.2}},
                 {"name": "round_robin"}):
        time.sleep(0.2)
        assert switch(router, {**spec, "roles": ["both", "both"]}).status_code == 200
    for t in threads:
        t.join(timeout=300)
    assert all(isinstance(r, str) for r in results), [r for r in results if not isinstance(r, str)][:3]
    for i in (0, 17, 49):
        assert results[i] == complete(setup["ref"], prompts[i], max_tokens=8)


def test_admin_needs_the_token(setup):
    router = setup["router"]
    assert httpx.post(router.url + "/admin/strategy", json={"name": "round_robin"}).status_code == 401
    assert switch(router, {"name": "round_robin"}, token="wrong").status_code == 401
    assert switch(router, {"name": "no_such_strategy"}).status_code == 400
    assert switch(router, {"source": "this is not python"}).status_code == 400
    got = httpx.get(router.url + "/admin/strategy", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert got["name"] == "round_robin"


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


def start_serve(tiny_llama, port, *extra, **popen):
    return subprocess.Popen([sys.executable, "-m", "microserve.cli", "serve", "--engines", "2", "--model", tiny_llama,
                             "--served-model-name", "tiny", "--dtype", "float32", "--port", str(port), *extra],
                            **popen)


def test_serve_starts_everything_and_sigterm_stops_everything(tiny_llama):
    port = free_port()
    proc = start_serve(tiny_llama, port, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url)
        assert complete(type("S", (), {"url": url}), prompt_of(20, 7))
        kids = children_of(proc.pid)
        assert len(kids) == 3  # two engines and the router
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(alive(k) for k in kids):
            time.sleep(0.2)
        assert not any(alive(k) for k in kids)
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.stdout.read()
        assert "[engine-0]" in out or "microserve is up" in out


def test_serve_restarts_a_crashed_engine_then_gives_up(tiny_llama):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_serve(tiny_llama, port, "--max-restarts", "1", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(url)
        kids = children_of(proc.pid)
        assert len(kids) == 3
        os.kill(kids[0], signal.SIGKILL)  # an engine dies: serve starts it again on the same port
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            up = httpx.get(url + "/health").json()["engines_up"]
            now = children_of(proc.pid)
            if up == 2 and len(now) == 3 and kids[0] not in now:
                break
            time.sleep(0.5)
        assert up == 2 and len(now) == 3, (up, now)
        assert complete(type("S", (), {"url": url}), prompt_of(20, 8))
        os.kill([k for k in now if k not in kids][0], signal.SIGKILL)  # once more than --max-restarts allows
        assert proc.wait(timeout=60) != 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(alive(k) for k in now):
            time.sleep(0.2)
        assert not any(alive(k) for k in now)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_logprobs_through_the_router_match_the_engine(setup):
    router, ref = setup["router"], setup["ref"]
    switch(router, {"name": "disagg", "roles": ["both", "both"]})
    body = {"model": "tiny", "prompt": prompt_of(25, 60), "max_tokens": 5, "temperature": 0, "logprobs": 2}
    via = httpx.post(router.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["logprobs"]
    direct = httpx.post(ref.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["logprobs"]
    assert via["tokens"] == direct["tokens"] and via["text_offset"] == direct["text_offset"]
    # The split path computes the last prompt token in a batch of its own: float32 GEMMs of
    # another shape may sum in another order (seen: 1.1e-5 on a logprob of -4.09 with AVX-512).
    assert via["token_logprobs"] == pytest.approx(direct["token_logprobs"], rel=1e-5, abs=1e-5)
    assert [list(t) for t in via["top_logprobs"]] == [list(t) for t in direct["top_logprobs"]]
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0,
            "logprobs": True, "top_logprobs": 2}
    via = httpx.post(router.url + "/v1/chat/completions", json=chat, timeout=60).json()["choices"][0]["logprobs"]
    direct = httpx.post(ref.url + "/v1/chat/completions", json=chat, timeout=60).json()["choices"][0]["logprobs"]
    assert [c["token"] for c in via["content"]] == [c["token"] for c in direct["content"]]
    assert all(len(c["top_logprobs"]) == 2 for c in via["content"])


def test_several_prompts_in_one_completion_call(setup):
    router, ref = setup["router"], setup["ref"]
    switch(router, {"name": "round_robin", "roles": ["both", "both"]})
    body = {"model": "tiny", "prompt": [prompt_of(20, 70), prompt_of(26, 71)], "max_tokens": 6, "temperature": 0,
            "ignore_eos": True, "n": 2}
    via = httpx.post(router.url + "/v1/completions", json=body, timeout=60).json()
    direct = httpx.post(ref.url + "/v1/completions", json=body, timeout=60).json()
    assert sorted((c["index"], c["text"]) for c in via["choices"]) == sorted((c["index"], c["text"]) for c in direct["choices"])
    assert via["usage"] == direct["usage"]
    with httpx.stream("POST", router.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        import json as _json

        texts = {}
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for c in _json.loads(line[6:])["choices"]:
                    texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    assert texts == {c["index"]: c["text"] for c in direct["choices"]}
