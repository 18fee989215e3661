"""Penalties and min_tokens on the built-in model, on every path users run: the GGUF kept in
its format (bfloat16 and float32, the C++ decode step), dequantized, deterministic mode, and
a simulated engine. Each is checked against what the parameter means, not only that it runs."""

from __future__ import annotations

import pytest

from conftest import run_requests

from microserve.config import EngineConfig
from microserve.engine.engine import LLMEngine
from microserve.sampling import SamplingParams

pytestmark = pytest.mark.slow  # loads the built-in model or starts server processes

PATHS = {
    "gguf-bf16": dict(dtype="bfloat16"),
    "gguf-float32": dict(dtype="float32"),
    "dequantized-bf16": dict(dtype="bfloat16", quantization="none"),
    "deterministic": dict(dtype="bfloat16", deterministic=True),
}
# A pattern the model goes on repeating: penalties have something to push against.
PROMPT = "one, two, one, two, one, two, one, two, one,"
SHORT = "<|im_start|>user\nSay yes.<|im_end|>\n<|im_start|>assistant\n"
TOP = 20


@pytest.fixture(scope="module", params=sorted(PATHS))
def engine(request):
    return LLMEngine(EngineConfig(kv_cache_memory="64MiB", **PATHS[request.param]), progress=False)


def run(engine, requests: dict[str, tuple]) -> dict:
    """All requests in one batch; the finished outputs by id (and no KV left held)."""
    done = run_requests(engine, requests)
    assert engine.pool.num_free_blocks == engine.pool.num_blocks
    return done


def greedy(**kw):
    return SamplingParams(temperature=0, max_tokens=24, logprobs=TOP, **kw)


def check_additive_penalties(out, frequency: float, presence: float) -> int:
    """Greedy under frequency/presence penalties picks argmax(logprob - f*count - p*[count > 0]).
    Logprobs are the model's own, so the choice is checked from the top-20 alternatives
    wherever the winner is certain to be among them. Returns the steps checked."""
    ids, counts, checked = out.token_ids, {}, 0
    for token, (_, top) in zip(ids, out.logprobs):
        scores = {t: lp - frequency * counts.get(t, 0) - presence * (counts.get(t, 0) > 0) for t, lp in top}
        best = max(scores, key=scores.get)
        if scores[best] >= min(lp for _, lp in top):  # nothing outside the top 20 can beat it
            # (bfloat16 logits tie often, and logprobs round: a near-tie may go either way)
            assert token in scores and scores[token] >= scores[best] - 1e-4, (token, best, scores[best])
            checked += 1
        counts[token] = counts.get(token, 0) + 1
    return checked


def test_penalties_and_min_tokens(engine):
    done = run(engine, {
        "plain": (PROMPT, greedy()),
        "frequency": (PROMPT, greedy(frequency_penalty=1.5)),
        "presence": (PROMPT, greedy(presence_penalty=1.5)),
        "both": (PROMPT, greedy(frequency_penalty=0.7, presence_penalty=0.3)),
        "repetition": (PROMPT, greedy(repetition_penalty=1.8)),
        "short": (SHORT, greedy()),
        "min_tokens": (SHORT, greedy(min_tokens=20)),
        "everything": (SHORT, SamplingParams(temperature=0.8, seed=7, max_tokens=16, min_tokens=10,
                                             frequency_penalty=0.5, presence_penalty=0.5, repetition_penalty=1.2)),
    })
    assert all(o.error is None for o in done.values())
    plain = done["plain"].outputs[0]
    assert check_additive_penalties(plain, 0, 0) == len(plain.token_ids)  # the check itself holds without penalties
    assert len(set(plain.token_ids)) <= 4  # " two", ",", " one", ...
    for rid, f, p in [("frequency", 1.5, 0), ("presence", 0, 1.5), ("both", 0.7, 0.3)]:
        out = done[rid].outputs[0]
        assert check_additive_penalties(out, f, p) >= len(out.token_ids) // 2, rid
    assert done["frequency"].outputs[0].token_ids != plain.token_ids
    assert done["repetition"].outputs[0].token_ids != plain.token_ids
    # The short answer stops early on its own; min_tokens keeps its end-of-turn token away until 20 are out.
    short = done["short"].outputs[0]
    assert short.finish_reason == "stop" and len(short.token_ids) < 20
    forced = done["min_tokens"].outputs[0]
    assert len(forced.token_ids) >= 20 and not set(forced.token_ids[:19]) & engine.eos_token_ids
    assert len(done["everything"].outputs[0].token_ids) >= 10


def test_penalties_on_a_simulated_engine():
    engine = LLMEngine(EngineConfig(simulate="llama-3.1-8b@h100"), progress=False)
    done = run(engine, {
        "p": ("one two three", SamplingParams(max_tokens=12, min_tokens=6, frequency_penalty=1, presence_penalty=1,
                                              repetition_penalty=1.3, logprobs=2)),
        "q": ("one two three", SamplingParams(max_tokens=12, temperature=0)),
    })
    assert all(o.error is None and len(o.outputs[0].token_ids) == 12 for o in done.values())
