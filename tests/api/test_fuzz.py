"""Property-based fuzzing of the public and microserving endpoints (hypothesis).

Bodies mix valid values with junk of every JSON type (huge ints, NaN, nested lists, wrong
types) field by field. Every answer must be a clean 2xx or 4xx, never a 5xx; and once the
fuzzing stops, the engine holds no request, reservation or KV block.
"""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server_utils import ServerProcess

pytestmark = pytest.mark.slow  # every test here starts server processes or loads the built-in model

CLUSTER = "fuzz-cluster-token"
EXAMPLES = int(os.environ.get("MICROSERVE_FUZZ_EXAMPLES", "150"))
IDS = ["a", "b", "c"]  # few request ids, so conflicts and aborts of live requests happen too
VOCAB = 49152
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
COUNTS = {"cases": 0, "by_status": {}}

junk = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.lists(st.integers(min_value=-5, max_value=VOCAB + 5), max_size=6),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


def field(valid):
    return st.one_of(valid, valid, junk)  # valid twice as often as junk


token_ids = st.lists(st.integers(min_value=0, max_value=VOCAB - 1), min_size=1, max_size=40)
prompts = st.one_of(st.text(max_size=60), token_ids, st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=3),
                    st.lists(token_ids, min_size=1, max_size=3))
SAMPLING = {
    "max_tokens": field(st.integers(min_value=1, max_value=24)), "temperature": field(st.floats(0, 2)),
    "top_p": field(st.floats(0.01, 1)), "top_k": field(st.integers(-1, 200)), "min_p": field(st.floats(0, 1)),
    "n": field(st.integers(1, 3)), "seed": field(st.integers(0, 2**40)),
    "stop": field(st.lists(st.text(min_size=1, max_size=3), max_size=3)),
    "stop_token_ids": field(st.lists(st.integers(0, VOCAB - 1), max_size=3)),
    "ignore_eos": field(st.booleans()), "min_tokens": field(st.integers(0, 8)),
    "presence_penalty": field(st.floats(-2, 2)), "frequency_penalty": field(st.floats(-2, 2)),
    "repetition_penalty": field(st.floats(0.5, 2)), "stream": field(st.booleans()),
    "stream_options": field(st.fixed_dictionaries({"include_usage": st.booleans()})),
}
completions = st.fixed_dictionaries({"model": field(st.just("tiny"))}, optional={
    "prompt": field(prompts), "echo": field(st.booleans()), "logprobs": field(st.integers(0, 5)), **SAMPLING})
messages = st.lists(st.fixed_dictionaries({"role": field(st.sampled_from(["system", "user", "assistant"])),
                                           "content": field(st.text(max_size=40))}), max_size=3)
chats = st.fixed_dictionaries({"model": field(st.just("tiny"))}, optional={
    "messages": field(messages), "logprobs": field(st.booleans()), "top_logprobs": field(st.integers(0, 5)),
    "max_completion_tokens": field(st.integers(1, 16)), **SAMPLING})
request_ids = field(st.sampled_from(IDS))
prep_recvs = st.fixed_dictionaries({"request_id": request_ids, "prompt": field(token_ids)},
                                   optional={"end": field(st.integers(-45, 45)), "lease_s": field(st.floats(0.01, 5))})
start_generates = st.fixed_dictionaries({"request_id": request_ids, "prompt": field(token_ids)}, optional={
    "begin": field(st.integers(0, 45)), "generated": field(st.lists(st.integers(0, VOCAB - 1), max_size=8)),
    "generated_text_len": field(st.integers(0, 50)), "logprobs": field(st.integers(0, 3)), **SAMPLING})
MICRO = {
    "/microserving/prep_recv": prep_recvs,
    "/microserving/start_generate": start_generates,
    "/microserving/abort": st.fixed_dictionaries({"request_id": request_ids}),
    "/microserving/remote_send": st.fixed_dictionaries({
        "request_id": request_ids, "prompt": field(token_ids), "begin": field(st.integers(0, 40)),
        "end": field(st.integers(-40, 40)), "kv_addr_info": field(st.dictionaries(
            st.sampled_from(["request_id", "host", "port", "block_ids", "begin", "end", "offset", "fingerprint",
                             "token", "shm", "transport"]), junk, max_size=11))}),
}


@pytest.fixture(scope="module")
def engine(tiny_llama):
    server = ServerProcess(["engine", "--model", tiny_llama, "--served-model-name", "tiny", "--dtype", "float32",
                            "--kv-cache-memory", "16MiB", "--block-size", "8", "--max-model-len", "160"],
                           env={"MICROSERVE_CLUSTER_TOKEN": CLUSTER})
    client = httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {CLUSTER}"})
    yield server, client
    client.close()
    server.stop()
    print(f"\nfuzz cases sent: {COUNTS['cases']}, answers by status: {dict(sorted(COUNTS['by_status'].items()))}")


def send(client, path: str, body, headers: dict | None = None) -> httpx.Response:
    r = client.post(path, content=json.dumps(body), headers={"content-type": "application/json", **(headers or {})})
    COUNTS["cases"] += 1
    COUNTS["by_status"][r.status_code] = COUNTS["by_status"].get(r.status_code, 0) + 1
    assert r.status_code < 500, (path, body, r.status_code, r.text)
    if r.status_code >= 400:
        assert "error" in r.json() and "Traceback" not in r.text
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]"), r.text[-300:]
    return r


@SETTINGS
@given(body=completions)
def test_fuzz_completions(engine, body):
    send(engine[1], "/v1/completions", body)


@SETTINGS
@given(body=chats)
def test_fuzz_chat(engine, body):
    send(engine[1], "/v1/chat/completions", body)


@pytest.fixture(scope="module")
def router(engine, tiny_llama):
    server = ServerProcess(["router", "--engine", engine[0].url, "--model", tiny_llama, "--served-model-name", "tiny"],
                           env={"MICROSERVE_CLUSTER_TOKEN": CLUSTER})
    client = httpx.Client(base_url=server.url, timeout=60)
    yield client
    client.close()
    server.stop()


@SETTINGS
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), data=st.data())
def test_fuzz_through_the_router(router, path, data):
    send(router, path, data.draw(completions if path == "/v1/completions" else chats))


@SETTINGS
@given(body=st.one_of(st.fixed_dictionaries({}, optional={"name": field(st.sampled_from(["round_robin", "disagg"])),
                                                          "params": junk, "roles": junk, "source": junk}), junk))
def test_fuzz_admin(router, body):
    send(router, "/admin/strategy", body, {"Authorization": f"Bearer {CLUSTER}"})


@SETTINGS
@given(path=st.sampled_from(sorted(MICRO)), data=st.data())
def test_fuzz_microserving(engine, path, data):
    send(engine[1], path, data.draw(MICRO[path]))


@SETTINGS
@given(mutation=st.sampled_from(["request_id", "block_ids", "begin", "end", "offset", "fingerprint", "token",
                                 "shm", "transport"]), value=junk)
def test_fuzz_kv_transfer_address(engine, mutation, value):
    """A real reservation, then remote_send with one field of its address replaced by junk."""
    client = engine[1]
    prompt = list(range(100, 140))
    r = send(client, "/microserving/prep_recv", {"request_id": "kv", "prompt": prompt, "end": 32, "lease_s": 5})
    if r.status_code != 200:
        return
    addr = {**r.json()["kv_addr_info"], mutation: value}
    send(client, "/microserving/remote_send", {"request_id": "kv", "prompt": prompt, "begin": 0, "end": 32,
                                               "kv_addr_info": addr})
    send(client, "/microserving/abort", {"request_id": "kv"})


def test_fuzzing_leaked_nothing(engine):
    """Runs after the fuzz tests (file order): abort what may still be reserved, then the
    engine must be back to empty."""
    client = engine[1]
    for rid in [*IDS, "kv"]:
        client.post("/microserving/abort", json={"request_id": rid})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        s = client.get("/microserving/status").json()
        if not (s["running"] or s["waiting"] or s["reservations"]) and s["free_blocks"] == s["num_blocks"]:
            break
        time.sleep(0.2)
    assert s["running"] == s["waiting"] == s["reservations"] == 0, s
    assert s["free_blocks"] == s["num_blocks"], s
    assert httpx.get(engine[0].url + "/health").status_code == 200
