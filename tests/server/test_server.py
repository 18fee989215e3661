"""A real `microserve engine` process driven with the official openai SDK and raw HTTP."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from server_utils import ServerProcess

pytestmark = pytest.mark.slow  # every test here starts server processes or loads the built-in model

MODEL = "tiny"


@pytest.fixture(scope="module")
def server(tiny_llama):
    s = ServerProcess(["engine", "--model", tiny_llama, "--served-model-name", MODEL, "--dtype", "float32",
                       "--kv-cache-memory", "64MiB", "--max-model-len", "512"])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    text = httpx.get(server.url + "/metrics").text
    for name in ("microserve:num_requests_running", "microserve:kv_blocks_free", "microserve:prefix_cache_hit_rate",
                 "microserve:time_to_first_token_seconds_bucket", "microserve:inter_token_latency_seconds_bucket",
                 "microserve:e2e_request_latency_seconds_bucket", "microserve:generation_tokens_total"):
        assert name in text


def test_completion_and_stream_agree(client):
    r = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    assert r.id.startswith("cmpl-") and r.object == "text_completion"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12
    chunks = list(client.completions.create(model=MODEL, prompt="Hello there", max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_and_stream(client):
    msgs = [{"role": "user", "content": "Say something"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_completion_tokens=10, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.refusal is None
    assert r.usage.completion_tokens == 10
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_completion_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == msg.content
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens


def test_n_stop_logprobs_seed_echo(client):
    r = client.completions.create(model=MODEL, prompt="abc", max_tokens=8, n=2, temperature=1.0, seed=7)
    assert sorted(c.index for c in r.choices) == [0, 1]
    again = client.completions.create(model=MODEL, prompt="abc", max_tokens=8, n=2, temperature=1.0, seed=7)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]

    base = client.completions.create(model=MODEL, prompt="abc", max_tokens=30, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = base[8:12]
    cut = client.completions.create(model=MODEL, prompt="abc", max_tokens=30, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert cut.finish_reason == "stop" and cut.text == base[: base.find(stop)]

    lp = client.completions.create(model=MODEL, prompt="abc", max_tokens=4, temperature=0, logprobs=3).choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 4
    assert all(len(t) == 3 for t in lp.top_logprobs)
    assert all(v <= 0 for v in lp.token_logprobs)

    chat_lp = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                             temperature=0, logprobs=True, top_logprobs=2).choices[0].logprobs
    assert len(chat_lp.content) >= 1 and len(chat_lp.content[0].top_logprobs) == 2

    echo = client.completions.create(model=MODEL, prompt="abc", max_tokens=3, temperature=0, echo=True)
    assert echo.choices[0].text.startswith("abc")

    ids = client.completions.create(model=MODEL, prompt=[[5, 6, 7], [8, 9]], max_tokens=3, temperature=0)
    assert sorted(c.index for c in ids.choices) == [0, 1]


BAD_INPUTS = [
    (b"{not json", 400),
    ({"prompt": "hi"}, 400),  # no model
    ({"model": "nope", "prompt": "hi"}, 404),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 600}, 400),  # beyond the 512-token window
    ({"model": MODEL, "prompt": "hi", "temperature": 3}, 400),
    ({"model": MODEL, "prompt": "hi", "top_p": 1.5}, 400),
    ({"model": MODEL, "prompt": [1, 2, 10**7]}, 400),
    ({"model": MODEL, "prompt": "hi", "n": 1000}, 400),
    ({"model": MODEL, "prompt": ""}, 400),
]


def test_bad_input_answered_while_others_are_served(server, client):
    good = {}

    def run_good():
        good["r"] = client.completions.create(model=MODEL, prompt="steady", max_tokens=40, temperature=0,
                                              extra_body={"ignore_eos": True})

    t = threading.Thread(target=run_good)
    t.start()
    for body, code in BAD_INPUTS:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = httpx.post(server.url + "/v1/completions", content=content, headers={"content-type": "application/json"})
        assert r.status_code == code, (body, r.text)
        err = r.json()["error"]
        assert err["message"] and "Traceback" not in err["message"]
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert r.status_code == 400
    t.join(timeout=60)
    assert good["r"].usage.completion_tokens == 40
    assert httpx.get(server.url + "/health").status_code == 200


def test_disconnect_mid_stream_frees_blocks(server):
    free_before = server.metric("microserve:kv_blocks_free")
    body = {"model": MODEL, "prompt": "a long story " * 20, "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        for _ in range(5):
            next(lines)
        assert server.metric("microserve:kv_blocks_free") < free_before
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if (server.metric("microserve:kv_blocks_free") == free_before
                and server.metric("microserve:num_requests_running") == 0):
            break
        time.sleep(0.1)
    assert server.metric("microserve:kv_blocks_free") == free_before
    assert server.metric("microserve:num_requests_running") == 0


def test_full_queue_answers_429(tiny_llama):
    s = ServerProcess(["engine", "--model", tiny_llama, "--served-model-name", MODEL, "--dtype", "float32",
                       "--kv-cache-memory", "64MiB", "--max-num-seqs", "1", "--max-waiting", "1"])
    try:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 1500, "ignore_eos": True}
        with httpx.Client(timeout=60) as c:
            results = []
            threads = [threading.Thread(target=lambda: results.append(c.post(s.url + "/v1/completions", json=body)))
                       for _ in range(2)]
            for t in threads:
                t.start()
                time.sleep(0.3)  # the first runs, the second waits
            r = c.post(s.url + "/v1/completions", json=body)
            assert r.status_code == 429 and r.headers["retry-after"]
            for t in threads:
                t.join()
            assert [x.status_code for x in results] == [200, 200]
    finally:
        s.stop()


def test_builtin_model_knows_paris():
    s = ServerProcess(["engine", "--served-model-name", "smollm2"])
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(model="smollm2", messages=[
            {"role": "user", "content": "What is the capital of France?"}], max_tokens=30, temperature=0)
        assert "Paris" in r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop"
    finally:
        s.stop()
