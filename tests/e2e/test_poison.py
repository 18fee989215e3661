"""Poison requests under `microserve serve`: a request that kills the engine serving it is
replayed on one more engine at most, then its client gets an error; the engines it killed
exit and are restarted, and the rest of the cluster serves on. A request that fails only
its own sampling gets a 500 from an engine, which goes on serving."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest

from server_utils import start_serve, stop_serve

pytestmark = pytest.mark.slow  # loads the built-in model or starts server processes

FORWARD, SAMPLE = 777, 778  # prompts holding these token ids trip the injected faults
FAULTS = str(Path(__file__).parent.parent / "faults")
TOKEN = "poison-test-token"


@pytest.fixture(scope="module")
def cluster(tiny_llama):
    env = {"PYTHONPATH": os.pathsep.join([FAULTS, os.environ.get("PYTHONPATH", "")]),
           "MICROSERVE_TEST_POISON": f"forward:{FORWARD},sample:{SAMPLE}", "MICROSERVE_CLUSTER_TOKEN": TOKEN}
    url, proc = start_serve("--engines", "3", "--model", tiny_llama, "--served-model-name", "tiny", "--dtype",
                            "float32", "--kv-cache-memory", "16MiB", env=env, timeout=240)
    yield url, proc
    stop_serve(proc)


def engines(url: str) -> list[dict]:
    return httpx.get(url + "/admin/engines", headers={"Authorization": f"Bearer {TOKEN}"}).json()["engines"]


def statuses(url: str) -> dict[str, dict]:
    return {e["url"]: httpx.get(e["url"] + "/microserving/status", headers={"Authorization": f"Bearer {TOKEN}"},
                                timeout=5).json() for e in engines(url)}


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def complete(url: str, prompt, **kw) -> httpx.Response:
    return httpx.post(url + "/v1/completions", timeout=120,
                      json={"model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0, **kw})


def wait_all_up(url: str, count: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(url + "/health").json().get("engines_up") == count:
            return
        time.sleep(0.5)
    raise TimeoutError(httpx.get(url + "/health").text)


def test_a_request_failing_its_own_sampling_gets_an_error_and_kills_nothing(cluster):
    url, _ = cluster
    before = {u: s["pid"] for u, s in statuses(url).items()}
    r = complete(url, [5, 6, SAMPLE, 7])
    assert r.status_code == 502 and r.json()["error"]["type"] == "engine_error", r.text
    engine_url = next(iter(before))
    direct = httpx.post(engine_url + "/v1/completions", headers={"Authorization": f"Bearer {TOKEN}"},
                        json={"model": "tiny", "prompt": [5, 6, SAMPLE, 7], "max_tokens": 4})
    assert direct.status_code == 500 and direct.json()["error"]["type"] == "internal_error"
    assert "Traceback" not in direct.text and "injected" not in direct.text
    streamed = httpx.post(engine_url + "/v1/completions", headers={"Authorization": f"Bearer {TOKEN}"},
                          json={"model": "tiny", "prompt": [5, 6, SAMPLE, 7], "max_tokens": 4, "stream": True})
    events = [line for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert '"internal_error"' in events[-2] and events[-1] == "data: [DONE]"
    assert complete(url, [5, 6, 7]).status_code == 200
    failures = sum(metric(u, "microserve:request_failures_total") for u in before)
    assert failures == 4  # two engines under the router's one replay, two asked directly
    after = statuses(url)
    assert {u: s["pid"] for u, s in after.items()} == before  # no engine died
    assert all(s["running"] == 0 and s["free_blocks"] == s["num_blocks"] for s in after.values())


def test_a_request_killing_engines_is_replayed_once_then_refused(cluster):
    url, proc = cluster
    before = {u: s["pid"] for u, s in statuses(url).items()}
    r = complete(url, [5, 6, FORWARD, 7])
    assert r.status_code == 502 and "not tried again" in r.json()["error"]["message"], r.text
    # The rest of the cluster serves at once; the engine nobody poisoned is still the same process.
    assert complete(url, [5, 6, 7]).status_code == 200
    wait_all_up(url, 3)
    after = {u: s["pid"] for u, s in statuses(url).items()}
    assert sum(after[u] != before[u] for u in before) == 2  # two engines died under it and were restarted
    assert complete(url, [8, 9, 10], stream=True).status_code == 200
    assert proc.poll() is None
