"""The router answers exactly as one engine does: the same matrix of requests (sampling fields,
structured outputs, tools, n > 1, echo with logprobs, streamed and not, errors) against one
engine of `serve --deterministic` and against its router under every strategy, on the
built-in model. Bodies must be identical apart from ids and timestamps; status codes and error
bodies identical too."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from server_utils import SERVE_TOKEN as TOKEN
from server_utils import start_serve, stop_serve

pytestmark = pytest.mark.slow  # starts `serve` on the built-in model

MODEL = "SmolLM2-135M-Instruct"
STRATEGIES = ["round_robin", "disagg", "balanced_disagg", "context_migration", "prefix_aware"]
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
# differ between any two answers
VOLATILE = {"id", "created", "created_at", "system_fingerprint", "item_id", "call_id", "response_id"}

PROMPT = "The three primary colours are"
ASK = [{"role": "user", "content": "Name a fruit."}]
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                                                           "required": ["city"]}}}

COMPLETIONS = {
    "greedy": {"prompt": PROMPT, "max_tokens": 8, "temperature": 0},
    "seeded n=2": {"prompt": PROMPT, "max_tokens": 8, "temperature": 0.9, "seed": 11, "n": 2},
    "two prompts": {"prompt": [PROMPT, "Once upon a time"], "max_tokens": 6, "temperature": 0},
    "token ids": {"prompt": [504, 1029, 3681, 4401], "max_tokens": 6, "temperature": 0},
    "stop and penalties": {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stop": [","],
                           "frequency_penalty": 0.5, "presence_penalty": 0.3},
    "logprobs": {"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "logprobs": 2},
    "echo logprobs": {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "logprobs": 1, "echo": True},
    "min_tokens ignore_eos": {"prompt": PROMPT, "max_tokens": 6, "min_tokens": 6, "temperature": 0,
                              "ignore_eos": True},
    "regex": {"prompt": PROMPT, "max_tokens": 10, "temperature": 1.0, "seed": 2,
              "structured_outputs": {"regex": "[a-z]+, [a-z]+"}},
}
CHATS = {
    "no max_tokens": {"messages": [{"role": "user", "content": "Write two sentences about the sea."}],
                      "temperature": 0},
    "seeded": {"messages": ASK, "max_tokens": 10, "temperature": 0.8, "seed": 5, "top_p": 0.9},
    "top_logprobs": {"messages": ASK, "max_tokens": 4, "temperature": 0, "logprobs": True, "top_logprobs": 2},
    "json_schema": {"messages": [{"role": "user", "content": "A person as JSON."}], "max_tokens": 40,
                    "temperature": 1.0, "seed": 1,
                    "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}},
    "tool required": {"messages": [{"role": "user", "content": "Weather in Oslo?"}], "max_tokens": 60,
                      "temperature": 0, "tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False},
    "n=2 logit_bias": {"messages": ASK, "max_tokens": 6, "temperature": 0.7, "seed": 3, "n": 2,
                       "logit_bias": {"28": -100}},
}
RESPONSES = {
    "text": {"input": "Name a colour.", "max_output_tokens": 8, "temperature": 0},
    "messages and instructions": {"input": [{"role": "user", "content": "Name a fruit."}],
                                  "instructions": "Answer in one word.", "max_output_tokens": 8, "temperature": 0},
    "json_schema": {"input": "A person as JSON.", "max_output_tokens": 40, "temperature": 1.0, "seed": 4,
                    "text": {"format": {"type": "json_schema", "name": "p", "schema": PERSON}}},
    "tool required": {"input": "Weather in Oslo?", "max_output_tokens": 60, "temperature": 0,
                      "tools": [{"type": "function", **WEATHER["function"]}], "tool_choice": "required",
                      "parallel_tool_calls": False},
}
ERRORS = {
    ("completions", "wrong model"): {"model": "other", "prompt": PROMPT},
    ("completions", "unknown field"): {"prompt": PROMPT, "frobnicate": 1},
    ("completions", "over the context"): {"prompt": PROMPT, "max_tokens": 10 ** 6},
    ("completions", "token id outside the vocabulary"): {"prompt": [10 ** 7]},
    ("completions", "n = 0"): {"prompt": PROMPT, "n": 0},
    ("chat", "no messages"): {"messages": []},
    ("chat", "tool_choice names no tool"): {"messages": ASK, "tools": [WEATHER],
                                            "tool_choice": {"type": "function", "function": {"name": "nope"}}},
    ("chat", "bad regex"): {"messages": ASK, "structured_outputs": {"regex": "(unclosed"}},
    ("chat", "refused field"): {"messages": ASK, "functions": [{"name": "f"}]},
    ("chat", "bad schema"): {"messages": ASK, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "uniqueItems": True}}}},
}


@pytest.fixture(scope="module")
def cluster():
    """(router URL, one engine's URL) of `serve --engines 2 --deterministic`."""
    url, proc = start_serve("--engines", "2", "--deterministic", env={"MICROSERVE_CLUSTER_TOKEN": TOKEN})
    try:
        deadline = time.monotonic() + 120
        while True:  # every engine in rotation, so each strategy has both to choose from
            engines = httpx.get(url + "/admin/engines", headers=ADMIN).json()["engines"]
            if sum(e["healthy"] for e in engines) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        yield url, engines[0]["url"]
    finally:
        stop_serve(proc)


def normalized(value):
    """The answer without what differs between any two answers (ids, timestamps)."""
    if isinstance(value, dict):
        return {k: normalized(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [normalized(v) for v in value]
    return value


def call(url: str, route: str, body: dict, stream: bool, token: str | None = None) -> tuple[int, object]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {"model": MODEL, **body, **({"stream": True} if stream else {})}
    if not stream:
        r = httpx.post(f"{url}/v1/{route}", json=body, headers=headers, timeout=300)
        return r.status_code, normalized(r.json())
    with httpx.stream("POST", f"{url}/v1/{route}", json=body, headers=headers, timeout=300) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, normalized(r.json())
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    return 200, by_choice([e if e == "[DONE]" else normalized(json.loads(e)) for e in events])


def by_choice(events: list) -> dict:
    """A stream's chunks in order per choice (how choices interleave depends on timing), and
    the others (usage, [DONE]) in order."""
    out: dict = {"other": []}
    for e in events:
        if isinstance(e, dict) and len(e.get("choices", [])) == 1:
            choice = e["choices"][0]
            out.setdefault(choice["index"], []).append({**e, "choices": [choice]})
        else:
            out["other"].append(e)
    return out


def matrix(url: str, token: str | None = None) -> dict:
    out = {}
    for stream in (False, True):
        for name, body in COMPLETIONS.items():
            out[("completions", name, stream)] = call(url, "completions", body, stream, token)
        for name, body in CHATS.items():
            out[("chat/completions", name, stream)] = call(url, "chat/completions", body, stream, token)
        for name, body in RESPONSES.items():
            out[("responses", name, stream)] = call(url, "responses", body, stream, token)
    for (route, name), body in ERRORS.items():
        out[(route, name, False)] = call(url, "chat/completions" if route == "chat" else route, body, False, token)
    return out


@pytest.fixture(scope="module")
def reference(cluster):
    _, engine = cluster
    return matrix(engine, TOKEN)


def test_the_reference_is_what_it_should_be(reference):
    """The matrix means something: answers are real, the errors are errors."""
    status, body = reference[("chat/completions", "no max_tokens", False)]
    assert status == 200 and body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] > 16  # not cut at a default of 16
    status, body = reference[("completions", "echo logprobs", False)]
    lps = body["choices"][0]["logprobs"]
    assert body["choices"][0]["text"].startswith(PROMPT)
    assert lps["token_logprobs"][0] is None and all(v < 0 for v in lps["token_logprobs"][1:])
    assert len(lps["tokens"]) == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    status, body = reference[("chat/completions", "tool required", False)]
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    status, body = reference[("responses", "tool required", False)]
    assert status == 200 and [item["type"] for item in body["output"]] == ["function_call"]
    status, body = reference[("responses", "json_schema", False)]
    assert set(json.loads(body["output"][0]["content"][0]["text"])) == {"name", "age"}
    for key in (("chat/completions", "n=2 logit_bias", True), ("completions", "seeded n=2", True)):
        status, streamed = reference[key]
        for index in (0, 1):  # each choice's finish_reason once
            assert [c["choices"][0]["finish_reason"] for c in streamed[index]].count(None) == len(streamed[index]) - 1
    for (route, name), _ in ERRORS.items():
        status, body = reference[(route, name, False)]
        assert 400 <= status < 500 and body["error"]["message"], (name, status, body)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_router_answers_as_one_engine(cluster, reference, strategy):
    url, _ = cluster
    r = httpx.post(url + "/admin/strategy", json={"name": strategy}, headers=ADMIN)
    assert r.status_code == 200, r.text
    got = matrix(url)
    differ = [key for key in reference if got[key] != reference[key]]
    assert not differ, {key: (reference[key], got[key]) for key in differ[:2]}


def test_models_agree(cluster):
    url, engine = cluster
    router_models = httpx.get(url + "/v1/models").json()
    engine_models = httpx.get(engine + "/v1/models", headers=ADMIN).json()
    assert normalized(router_models) == normalized(engine_models)
