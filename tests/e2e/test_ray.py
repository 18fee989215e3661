"""`serve --ray` on a two-node Ray cluster on this machine: engines on different nodes, KV over
TCP between them, an engine actor killed under load, decode scaled 1 -> 2 -> 1 under load,
and a router replica."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time

import httpx
import pytest
from ray.cluster_utils import Cluster as RayCluster

from server_utils import TOKEN, ServerProcess, complete, prompt_of

pytestmark = pytest.mark.slow  # every test here starts server processes or loads the built-in model

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def ray_cluster():
    # Two Ray nodes (two raylets) on this machine; our servers stay on 127.0.0.1.
    cluster = RayCluster(initialize_head=True, connect=False,
                         head_node_args={"num_cpus": 4, "resources": {"node_a": 8}, "include_dashboard": False})
    cluster.add_node(num_cpus=4, resources={"node_b": 8})
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


@pytest.fixture(scope="module")
def served(ray_cluster, tiny_llama):
    serve = ServerProcess(["serve", "--ray", ray_cluster.address, "--model", tiny_llama, "--served-model-name", "tiny",
                           "--dtype", "float32", "--kv-cache-memory", "32MiB", "--roles", "prefill,decode",
                           "--placement", "prefill:node_a", "--placement", "decode:node_b", "--strategy", "disagg",
                           "--engine-host", "127.0.0.1", "--routers", "2"],
                          env={"MICROSERVE_ADMIN_TOKEN": TOKEN}, timeout=180)
    replica = type("Replica", (), {"url": f"http://127.0.0.1:{serve.port + 1}"})()
    yield {"serve": serve, "replica": replica}
    serve.stop()


def members(router) -> list[dict]:
    return httpx.get(router.url + "/admin/engines", headers=AUTH, timeout=30).json()["engines"]


def wait_for(cond, timeout=60, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.3)


def stream(url, prompt, max_tokens):
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    text = ""
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=180) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text += json.loads(line[6:])["choices"][0]["text"]
    return text


@pytest.fixture(scope="module")
def reference(served):
    """One engine's greedy answers (round_robin sends a whole request to one engine)."""
    serve = served["serve"]
    prompts = [prompt_of(40, 300 + i) for i in range(8)]
    assert httpx.post(serve.url + "/admin/strategy", json={"name": "round_robin"}, headers=AUTH).status_code == 200
    expected = [complete(serve, p, max_tokens=48) for p in prompts]
    assert httpx.post(serve.url + "/admin/strategy", json={"name": "disagg"}, headers=AUTH).status_code == 200
    return prompts, expected


def test_engines_on_different_nodes_and_kv_over_tcp(served, reference):
    serve = served["serve"]
    engines = members(serve)
    assert sorted(e["role"] for e in engines) == ["decode", "prefill"]
    assert len({e["node"] for e in engines}) == 2 and all(e["healthy"] for e in engines)
    # 1P1D across the two nodes gives one engine's greedy text.
    prompts, expected = reference
    assert [complete(serve, p, max_tokens=48) for p in prompts[:3]] == expected[:3]
    # The KV went over TCP: the nodes differ, even on one machine.
    p, d = (next(e for e in engines if e["role"] == r) for r in ("prefill", "decode"))
    prompt = prompt_of(40, 999)
    r = httpx.post(d["url"] + "/microserving/prep_recv", headers=AUTH,
                   json={"request_id": "tcp-check", "prompt": prompt, "end": 39}).json()
    sent = httpx.post(p["url"] + "/microserving/remote_send", headers=AUTH,
                      json={"request_id": "tcp-check", "prompt": prompt, "begin": 0, "end": 39,
                            "kv_addr_info": r["kv_addr_info"]}).json()
    assert sent["transport"] == "tcp" and sent["tokens"] == 39
    assert r["kv_addr_info"]["node"] == d["node"]
    httpx.post(d["url"] + "/microserving/abort", headers=AUTH, json={"request_id": "tcp-check"})


def test_scale_decode_under_load(served, reference):
    serve = served["serve"]
    prompts, expected = reference

    def scale(k):
        r = httpx.post(serve.url + "/admin/scale", json={"role": "decode", "engines": k}, headers=AUTH, timeout=180)
        assert r.status_code == 200, r.text
        return r.json()

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        first = [pool.submit(stream, serve.url, p, 48) for p in prompts]
        up = scale(2)
        assert len(up["started"]) == 1 and len(up["engines"]) == 2
        second = [pool.submit(stream, serve.url, p, 48) for p in prompts]
        down = scale(1)
        assert len(down["drained"]) == 1 and len(down["engines"]) == 1
        assert [f.result() for f in first] == expected
        assert [f.result() for f in second] == expected
    assert sorted(e["role"] for e in members(serve)) == ["decode", "prefill"]


def test_engine_actor_killed_under_load(served, reference):
    serve = served["serve"]
    prompts, expected = reference
    decode = next(e for e in members(serve) if e["role"] == "decode")
    pid = httpx.get(decode["url"] + "/microserving/status", headers=AUTH).json()["pid"]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(stream, serve.url, p, 48) for p in prompts]
        time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)  # the actor's process: Ray starts it again
        assert [f.result() for f in futures] == expected  # fail-over: nothing lost or repeated
    # Ray restarted the actor; the router took the new engine back under the same role.
    wait_for(lambda: (m := members(serve)) and len(m) == 2 and all(e["healthy"] for e in m)
             and any(e["role"] == "decode" and e["url"] != decode["url"] for e in m), 120, "decode restarted")
    assert [complete(serve, p, max_tokens=48) for p in prompts[:2]] == expected[:2]


def test_replica_follows_and_survives(served, reference):
    serve, replica = served["serve"], served["replica"]
    prompts, expected = reference
    wait_for(lambda: {e["url"] for e in members(replica)} == {e["url"] for e in members(serve)}, 30, "replica follows")
    assert [complete(replica, p, max_tokens=48) for p in prompts[:2]] == expected[:2]
    # Killing the replica loses none of the primary's requests.
    replica_pid = next(int(pid) for pid in os.listdir("/proc") if pid.isdigit() and _is_replica(pid, serve.port + 1))
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(stream, serve.url, p, 48) for p in prompts]
        kept = [pool.submit(stream, replica.url, p, 48) for p in prompts[:2]]
        time.sleep(0.3)
        os.kill(replica_pid, signal.SIGKILL)
        assert [f.result() for f in futures] == expected
        concurrent.futures.wait(kept)


def _is_replica(pid: str, port: int) -> bool:
    try:
        args = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
    except OSError:
        return False
    return b"--follow" in args and str(port).encode() in args
