"""A property-based fuzz of valid OpenAI requests against a running `microserve serve`.

Unlike tests/test_fuzz.py (junk in every field, so that nearly every case is a 400), every
body here is valid: each field of completions and chat, alone or combined with the others,
streamed and not, under a drawn routing strategy. So every case reaches the engines' real
path (sampling, penalties, stop handling, KV transfer between engines) and must answer 200
with a well-formed body. Used by tests/e2e/test_fuzz_serve.py (short) and
benchmarks/fuzz_serve.py (long).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import httpx
from hypothesis import strategies as st

TOKEN = "fuzz-serve-token"  # the cluster token of the fleets fuzzed
FLEETS = {"builtin": ["--engines", "2"], "simulated": ["--engines", "4", "--simulate", "llama-3.1-8b@h100"]}
VOCAB = 49152  # the built-in model's vocabulary (the simulated fleet uses the same tokenizer)
STRATEGIES = ["round_robin", "least_loaded", "prefix_aware", "disagg", "balanced_disagg", "context_migration"]

words = st.text(st.sampled_from("abcdefghij klmnop,.?!\n"), min_size=1, max_size=60).filter(str.strip)
token_ids = st.lists(st.integers(min_value=0, max_value=VOCAB - 1), min_size=1, max_size=40)
SAMPLING = {
    "temperature": st.floats(0, 2), "top_p": st.floats(0.05, 1), "top_k": st.sampled_from([-1, 0, 1, 5, 50]),
    "min_p": st.floats(0, 1), "n": st.integers(1, 3), "seed": st.integers(0, 2**40),
    "stop": st.one_of(st.text("abcde ,.", min_size=1, max_size=3), st.lists(st.text("abcde ,.", min_size=1,
                                                                                    max_size=3), max_size=3)),
    "stop_token_ids": st.lists(st.integers(0, VOCAB - 1), max_size=3), "ignore_eos": st.booleans(),
    "min_tokens": st.integers(0, 12), "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}), "user": st.text(max_size=8),
}
COMPLETION = {**SAMPLING, "max_tokens": st.integers(1, 12), "echo": st.booleans(), "logprobs": st.integers(0, 5),
              "prompt": st.one_of(words, token_ids, st.lists(words, min_size=1, max_size=3),
                                  st.lists(token_ids, min_size=1, max_size=3))}
content = st.one_of(words, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": words}),
                                    min_size=1, max_size=2))
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                           "content": content}), min_size=1, max_size=3)
CHAT = {**SAMPLING, "max_tokens": st.integers(1, 12), "max_completion_tokens": st.integers(1, 12),
        "logprobs": st.booleans(), "top_logprobs": st.integers(0, 5)}


def bodies(fields: dict, required: dict):
    """One optional field alone, or any combination of them."""
    alone = st.sampled_from(sorted(fields)).flatmap(
        lambda name: st.fixed_dictionaries({**required, name: fields[name]}))
    return st.one_of(alone, st.fixed_dictionaries(required, optional=fields))


def cases(model: str):
    completion = bodies({k: v for k, v in COMPLETION.items() if k != "prompt"},
                        {"model": st.just(model), "prompt": COMPLETION["prompt"]})
    # max_tokens always set: unset, an answer may run to the end of the context window
    chat = bodies({k: v for k, v in CHAT.items() if k != "max_tokens"},
                  {"model": st.just(model), "messages": messages, "max_tokens": CHAT["max_tokens"]})
    request = st.one_of(st.tuples(st.just("/v1/completions"), completion),
                        st.tuples(st.just("/v1/chat/completions"), chat))
    # Half of all cases streamed, whatever else they hold.
    streamed = st.tuples(request, st.booleans()).map(lambda rs: (rs[0][0], {**rs[0][1], "stream": rs[1]}))
    return st.tuples(st.sampled_from(STRATEGIES), streamed)


@dataclass
class Tally:
    cases: int = 0
    by_field: Counter = field(default_factory=Counter)
    by_strategy: Counter = field(default_factory=Counter)
    streamed: int = 0
    tokens: int = 0


class Fuzzer:
    """Sends cases to a router, switching its strategy as drawn, and checks every answer."""

    def __init__(self, url: str, token: str):
        self.client = httpx.Client(base_url=url, timeout=120)
        self.admin = {"Authorization": f"Bearer {token}"}
        self.strategy = None
        self.tally = Tally()
        self.model = self.client.get("/v1/models").json()["data"][0]["id"]

    def close(self) -> None:
        self.client.close()

    def run(self, case) -> None:
        strategy, (path, body) = case
        if strategy != self.strategy:
            r = self.client.post("/admin/strategy", json={"name": strategy},
                                 headers=self.admin)
            assert r.status_code == 200, r.text
            self.strategy = strategy
        r = self.client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
        assert r.status_code == 200, (strategy, path, body, r.status_code, r.text[:500])
        tokens = check_stream(body, r.text) if body.get("stream") else check_body(path, body, r.json())
        t = self.tally
        t.cases += 1
        t.by_field.update(k for k in body if k not in ("model", "prompt", "messages", "stream"))
        t.by_strategy[strategy] += 1
        t.streamed += bool(body.get("stream"))
        t.tokens += tokens


def expected_choices(path: str, body: dict) -> int:
    prompt = body.get("prompt")
    prompts = len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1
    return body.get("n", 1) * (prompts if path == "/v1/completions" else 1)


def max_tokens_of(path: str, body: dict) -> int | None:
    if path == "/v1/chat/completions":
        return body.get("max_completion_tokens") or body.get("max_tokens")
    return body.get("max_tokens", 16)


def check_body(path: str, body: dict, answer: dict) -> int:
    choices, usage = answer["choices"], answer["usage"]
    assert len(choices) == expected_choices(path, body), answer
    assert sorted(c["index"] for c in choices) == list(range(len(choices)))
    assert all(c["finish_reason"] in ("stop", "length") for c in choices), answer
    limit = max_tokens_of(path, body)
    if limit is not None:
        assert usage["completion_tokens"] <= limit * len(choices), answer
    if body.get("logprobs") not in (None, False):
        assert all(c["logprobs"] is not None for c in choices), answer
    # A choice may end before min_tokens only on a stop string (stop ids and EOS are held back).
    if len(choices) == 1 and choices[0]["finish_reason"] == "stop" and not body.get("stop"):
        assert usage["completion_tokens"] >= min(body.get("min_tokens", 0), limit or 10**9), answer
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    return usage["completion_tokens"]


def check_stream(body: dict, text: str) -> int:
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", text[-500:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert not any("error" in c for c in chunks), text[-500:]
    usage = [c["usage"] for c in chunks if c.get("usage")]
    if (body.get("stream_options") or {}).get("include_usage"):
        assert len(usage) == 1 and chunks[-1]["usage"] == usage[0], text[-500:]
        return usage[0]["completion_tokens"]
    assert not usage
    return 0


def check_cluster(url: str, token: str) -> dict:
    """After fuzzing: every engine up and empty (no request, reservation or KV block held) and
    a plain request answered. Returns the engines' statuses by URL."""
    admin = {"Authorization": f"Bearer {token}"}
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["engines_up"] == health["engines"], health
    model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
    r = httpx.post(url + "/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 4}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"], r.text
    statuses = {}
    for e in httpx.get(url + "/admin/engines", headers=admin).json()["engines"]:
        s = httpx.get(e["url"] + "/microserving/status", headers=admin).json()
        assert s["healthy"] and s["running"] == s["waiting"] == s["reservations"] == 0, s
        assert s["free_blocks"] == s["num_blocks"], s
        statuses[e["url"]] = s
    return statuses
