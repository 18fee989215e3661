"""Engines joining and leaving a running router: add, drain (nothing dropped, no reservation
stranded), remove, and router replicas over the same engines."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time

import httpx
import pytest

from server_utils import TOKEN, ServerProcess, complete, prompt_of

pytestmark = pytest.mark.slow  # every test here starts server processes or loads the built-in model

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def setup(tiny_llama):
    common = ["--model", tiny_llama, "--kv-cache-memory", "32MiB", "--served-model-name", "tiny",
              "--dtype", "float32", "--block-size", "8"]
    env = {"MICROSERVE_ADMIN_TOKEN": TOKEN}
    engines = [ServerProcess(["engine", *common], env=env) for _ in range(3)]
    router_args = ["router", "--model", tiny_llama, "--served-model-name", "tiny"]
    routers = [ServerProcess([*router_args, "--engine", engines[0].url, "--engine", engines[1].url], env=env)
               for _ in range(2)]  # two replicas over the same two engines
    yield {"engines": engines, "router": routers[0], "replica": routers[1], "env": env, "common": common}
    for p in routers + engines:
        p.stop()


def admin(router, method, path, body=None, token=TOKEN):
    return httpx.request(method, router.url + path, json=body, timeout=120,
                         headers={"Authorization": f"Bearer {token}"})


def members(router):
    return {e["url"]: e for e in admin(router, "GET", "/admin/engines").json()["engines"]}


def served(engine) -> float:
    return engine.metric("microserve:generation_tokens_total")


def stream(server, prompt, max_tokens=40):
    """A streamed greedy completion; returns its text."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    text = ""
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                import json

                text += json.loads(line[6:])["choices"][0]["text"]
    return text


def test_list_add_remove(setup):
    router, (e0, e1, e2) = setup["router"], setup["engines"]
    assert admin(router, "GET", "/admin/engines", token="wrong").status_code == 401
    listed = members(router)
    assert set(listed) == {e0.url, e1.url}
    assert all(m["healthy"] and not m["draining"] and m["role"] == "both" for m in listed.values())
    assert all(0 <= m["kv_used"] <= 1 for m in listed.values())

    r = admin(router, "POST", "/admin/engines", {"action": "add", "url": e2.url, "role": "both"})
    assert r.status_code == 200, r.text
    assert set(members(router)) == {e0.url, e1.url, e2.url}
    before = served(e2)
    for seed in range(6):  # round robin: the new engine takes its share
        complete(router, prompt_of(20, seed), max_tokens=4)
    assert served(e2) >= before + 1

    r = admin(router, "POST", "/admin/engines", {"action": "remove", "url": e2.url})
    assert r.status_code == 200 and r.json()["url"] == e2.url
    assert set(members(router)) == {e0.url, e1.url}
    before = served(e2)
    for seed in range(4):
        complete(router, prompt_of(20, seed), max_tokens=4)
    assert served(e2) == before


def test_bad_membership_changes(setup):
    router = setup["router"]
    assert admin(router, "POST", "/admin/engines", {"action": "explode", "url": "x"}).status_code == 400
    assert admin(router, "POST", "/admin/engines", {"action": "drain", "url": "http://127.0.0.1:9"}).status_code == 404
    r = admin(router, "POST", "/admin/engines", {"action": "add", "url": "http://127.0.0.1:9"})
    assert r.status_code == 400 and "did not answer" in r.json()["error"]["message"]
    r = admin(router, "POST", "/admin/engines", {"action": "add", "url": setup["engines"][0].url})
    assert r.status_code == 400 and "already" in r.json()["error"]["message"]
    r = admin(router, "POST", "/admin/scale", {"role": "decode", "engines": 2})
    assert r.status_code == 409
    assert set(members(router)) == {e.url for e in setup["engines"][:2]}


def test_drain_under_load_drops_nothing(setup):
    router, (e0, _, e2) = setup["router"], setup["engines"]
    assert admin(router, "POST", "/admin/engines", {"action": "add", "url": e2.url}).status_code == 200
    prompts = [prompt_of(24, 100 + i) for i in range(9)]
    expected = [complete(e0, p, max_tokens=40) for p in prompts]  # one engine's answers
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(stream, router, p) for p in prompts]
        time.sleep(0.5)  # streams are running on all three engines
        r = admin(router, "POST", "/admin/engines", {"action": "drain", "url": e2.url})
        assert r.status_code == 200, r.text
        assert r.json()["drained"] is True
        # Drain returns once the engine is idle: nothing of its streams is still running.
        status = httpx.get(e2.url + "/microserving/status", headers=AUTH).json()
        assert status["running"] == status["waiting"] == status["reservations"] == 0
        assert [f.result() for f in futures] == expected
    assert e2.url not in members(router)


def test_drain_waits_for_a_reservation(setup):
    """An engine holding a reservation (a prep_recv whose KV and start_generate are still to
    come) is not removed under it: the drain ends when the reservation does."""
    router, e1 = setup["router"], setup["engines"][1]
    r = httpx.post(e1.url + "/microserving/prep_recv", headers=AUTH,
                   json={"request_id": "held", "prompt": prompt_of(30, 7), "end": 29, "lease_s": 2})
    assert r.status_code == 200, r.text
    start = time.monotonic()
    r = admin(router, "POST", "/admin/engines", {"action": "drain", "url": e1.url})
    assert r.status_code == 200 and r.json()["drained"] is True
    assert time.monotonic() - start >= 1.5  # waited for the lease to run out
    assert e1.url not in members(router)
    # Back in rotation for the tests after this one.
    assert admin(router, "POST", "/admin/engines", {"action": "add", "url": e1.url}).status_code == 200


def test_drain_timeout_removes_anyway(setup):
    router, e1 = setup["router"], setup["engines"][1]
    r = httpx.post(e1.url + "/microserving/prep_recv", headers=AUTH,
                   json={"request_id": "held-long", "prompt": prompt_of(30, 8), "end": 29, "lease_s": 60})
    assert r.status_code == 200
    r = admin(router, "POST", "/admin/engines", {"action": "drain", "url": e1.url, "timeout_s": 0.5})
    assert r.status_code == 200 and r.json()["drained"] is False
    httpx.post(e1.url + "/microserving/abort", headers=AUTH, json={"request_id": "held-long"})
    assert admin(router, "POST", "/admin/engines", {"action": "add", "url": e1.url}).status_code == 200


def test_replica_survives_the_other_router(setup, tiny_llama):
    """Two routers over the same engines: killing one loses none of the other's requests."""
    router, replica, (e0, _, _) = setup["router"], setup["replica"], setup["engines"]
    prompts = [prompt_of(24, 200 + i) for i in range(6)]
    expected = [complete(e0, p, max_tokens=160) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(2 * len(prompts)) as pool:
        doomed = [pool.submit(stream, router, p, 160) for p in prompts]
        kept = [pool.submit(stream, replica, p, 160) for p in prompts]
        time.sleep(0.3)
        assert not any(f.done() for f in kept)  # the kill lands while both routers stream
        os.killpg(router.proc.pid, signal.SIGKILL)
        assert [f.result() for f in kept] == expected
        concurrent.futures.wait(doomed)  # their connections break; nothing else happens to them
    # The engines are left with nothing of the dead router's requests (they abort on disconnect).
    for e in setup["engines"]:
        deadline = time.monotonic() + 10
        while (s := httpx.get(e.url + "/microserving/status", headers=AUTH).json())["running"] and \
                time.monotonic() < deadline:
            time.sleep(0.2)
        assert s["running"] == s["waiting"] == 0
