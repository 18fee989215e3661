"""Deterministic serving (--deterministic): bitwise the same logprobs whatever the batch, the
prefill chunking, the prefix cache, the strategy, the KV transport or a fail-over.

The built-in model in bfloat16, as users run it; every comparison is exact (==), not approximate.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal

import httpx
import jsonschema
import pytest

from microserve.config import EngineConfig
from microserve.engine.engine import LLMEngine
from microserve.models.loader import load_model
from microserve.sampling import SamplingParams
from server_utils import ServerProcess

pytestmark = pytest.mark.slow  # every test here starts server processes or loads the built-in model

TOKEN = "deterministic-admin-token"
GREEDY = dict(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3)


def random_prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 49000) for _ in range(n)]


# ---------------------------------------------------------------- inside one engine


@pytest.fixture(scope="module")
def bf16_model(builtin_gguf):
    return load_model(builtin_gguf, dtype="bfloat16", device="cpu", progress=False)


def make_engine(loaded, **options) -> LLMEngine:
    cfg = EngineConfig(dtype="bfloat16", deterministic=True, kv_cache_memory="96MiB", **options)
    return LLMEngine(cfg, loaded=loaded, progress=False)


def run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, warm_steps: int = 0) -> dict:
    """Run `prompts[1:]` (the company), then after `warm_steps` steps `prompts[0]` (the target);
    return the target's (token ids, logprobs with their top alternatives)."""
    tag = f"{id(prompts)}-{warm_steps}"
    for i, p in enumerate(prompts[1:]):
        engine.add_request(f"{tag}-other{i}", p, params)
    for _ in range(warm_steps):
        engine.step()
    engine.add_request(f"{tag}-target", prompts[0], params)
    result = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == f"{tag}-target" and out.finished:
                result = out
    assert result is not None
    return {"tokens": result.outputs[0].token_ids, "logprobs": result.outputs[0].logprobs,
            "cached": result.num_cached_tokens}


SHORT = random_prompt(0, 150)
LONG = random_prompt(1, 520)  # longer than the largest prefill chunk tested
COMPANY = [random_prompt(100 + i, random.Random(i).randrange(5, 48)) for i in range(32)]


@pytest.fixture(scope="module")
def alone(bf16_model):
    """Each target alone: the short one's prompt in one step, the long one's in chunks of 512."""
    return {"short": run(make_engine(bf16_model, enable_prefix_caching=False), [SHORT], SamplingParams(**GREEDY)),
            "long": run(make_engine(bf16_model, enable_prefix_caching=False), [LONG], SamplingParams(**GREEDY))}


@pytest.mark.parametrize("company", [1, 8, 32])
def test_same_logprobs_inside_any_batch(bf16_model, alone, company):
    engine = make_engine(bf16_model, enable_prefix_caching=False)
    # The company starts first, so the target's prefill shares steps with their decodes.
    got = run(engine, [SHORT, *COMPANY[:company]], SamplingParams(**GREEDY), warm_steps=2)
    assert got["tokens"] == alone["short"]["tokens"]
    assert got["logprobs"] == alone["short"]["logprobs"]


@pytest.mark.parametrize("chunk", [16, 100])
def test_same_logprobs_whatever_the_prefill_chunks(bf16_model, alone, chunk):
    engine = make_engine(bf16_model, max_num_batched_tokens=chunk, enable_prefix_caching=False)
    got = run(engine, [LONG], SamplingParams(**GREEDY))
    assert got["logprobs"] == alone["long"]["logprobs"]


def test_same_logprobs_on_a_cached_prefix(bf16_model, alone):
    engine = make_engine(bf16_model)
    run(engine, [LONG[:333] + [7, 8, 9]], SamplingParams(**GREEDY))  # caches 320 tokens of the long prompt
    got = run(engine, [LONG], SamplingParams(**GREEDY))
    assert got["cached"] == 320
    assert got["logprobs"] == alone["long"]["logprobs"]


def test_seeded_sampling_is_the_same_in_any_batch(bf16_model):
    params = SamplingParams(temperature=1.0, seed=1234, max_tokens=12, ignore_eos=True, logprobs=0)
    first = run(make_engine(bf16_model), [SHORT[:50]], params)
    crowded = run(make_engine(bf16_model), [SHORT[:50], *COMPANY[:8]], params, warm_steps=1)
    assert crowded["tokens"] == first["tokens"]
    assert crowded["logprobs"] == first["logprobs"]


# ---------------------------------------------------------------- across engines


def engine_process(*extra) -> ServerProcess:
    return ServerProcess(["engine", "--dtype", "bfloat16", "--deterministic", "--threads", "1",
                          "--kv-cache-memory", "64MiB", "--served-model-name", "smol", *extra])


@pytest.fixture(scope="module")
def fleet():
    """A prefill engine `p` and two decode engines that receive KV by shared memory (`d_shm`) and
    by TCP (`d_tcp`), with a router over p and each. `p` alone is the single-engine reference."""
    engines = {"p": engine_process(), "d_shm": engine_process(), "d_tcp": engine_process("--kv-transport", "tcp")}
    os.environ["MICROSERVE_ADMIN_TOKEN"] = TOKEN
    try:
        routers = {transport: ServerProcess(["router", "--engine", engines["p"].url, "--engine",
                                             engines[f"d_{transport}"].url, "--roles", "prefill,decode",
                                             "--served-model-name", "smol"])
                   for transport in ("shm", "tcp")}
    finally:
        del os.environ["MICROSERVE_ADMIN_TOKEN"]
    yield {**engines, **routers}
    for p in [*routers.values(), *engines.values()]:
        p.stop()


def switch(router, spec):
    r = httpx.post(router.url + "/admin/strategy", json={**spec, "roles": ["prefill", "decode"]},
                   headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200, r.text


def complete(server, prompt, **sampling) -> dict:
    body = {"model": "smol", "prompt": prompt, **GREEDY, **sampling}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return {"text": choice["text"], "logprobs": choice["logprobs"]}


PROMPTS = ["def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n" * 3,
           "A short story about a lighthouse keeper who finds a message in a bottle. " * 4]
SEEDED = {"temperature": 0.8, "seed": 77, "max_tokens": 8}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"], "additionalProperties": False}

STRATEGIES = [
    {"name": "disagg"},  # 1P1D
    {"name": "balanced_disagg", "params": {"fraction": 0.3}},
    {"name": "context_migration", "params": {"min_tokens": 16}},
]


@pytest.mark.parametrize("transport", ["shm", "tcp"])
@pytest.mark.parametrize("spec", STRATEGIES, ids=lambda s: s["name"])
def test_every_strategy_gives_one_engines_logprobs(fleet, transport, spec):
    router, decode = fleet[transport], fleet[f"d_{transport}"]
    switch(router, spec)
    for i, base in enumerate(PROMPTS):
        prompt = f"{spec['name']} over {transport}: {base}"  # new to both engines
        seeded = SEEDED if i == 1 else {}
        # The prefill engine alone is the reference; that leaves the prompt cached there, so
        # context_migration moves its KV, and the disaggregating strategies send it from there.
        want = complete(fleet["p"], prompt, **seeded)
        before = decode.metric("microserve:generation_tokens_total")
        assert complete(router, prompt, **seeded) == want
        assert decode.metric("microserve:generation_tokens_total") > before  # decoded on the other engine


async def _stream(url: str, prompt: str, on_chunk, **sampling) -> dict:
    body = {"model": "smol", "prompt": prompt, **GREEDY, **sampling, "stream": True}
    text, logprobs = "", []
    async with httpx.AsyncClient(timeout=300) as client:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            assert r.status_code == 200, await r.aread()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                for ch in json.loads(line[6:])["choices"]:
                    text += ch["text"]
                    if ch.get("logprobs"):
                        logprobs += ch["logprobs"]["token_logprobs"]
                on_chunk()
    return {"text": text, "logprobs": logprobs}


def test_fail_over_resumes_with_the_same_logprobs(fleet):
    """Last in this module: it kills an engine. Four requests stream from the two engines (two
    under a JSON schema); one engine dies part-way; the resumed sequences carry on with the
    reference's logprobs, and a constrained one's grammar resumes where it was."""
    router, victim = fleet["shm"], fleet["d_shm"]
    long = {"max_tokens": 24}
    seeded = {"max_tokens": 24, "temperature": 0.8, "seed": 5}
    constrained = {"max_tokens": 48, "temperature": 0.8, "seed": 9, "structured_outputs": {"json": PERSON}}
    # Round robin in this order puts one constrained request on each engine.
    cases = [(PROMPTS[0], long), (PROMPTS[1], seeded), ("A person, as JSON: ", constrained),
             ("Another person, as JSON: ", {**constrained, "seed": 10})]
    want = [asyncio.run(_stream(fleet["p"].url, prompt, lambda: None, **body)) for prompt, body in cases]
    r = httpx.post(router.url + "/admin/strategy", json={"name": "round_robin", "roles": ["both", "both"]},
                   headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200, r.text
    chunks = {"n": 0}

    def on_chunk():  # kill once the streams are well under way
        chunks["n"] += 1
        if chunks["n"] == 12:
            os.killpg(victim.proc.pid, signal.SIGKILL)

    async def all_of_them():
        return await asyncio.gather(*(_stream(router.url, prompt, on_chunk, **body) for prompt, body in cases))

    before = router.metric("microserve_router:failovers_total")
    got = asyncio.run(all_of_them())
    assert victim.proc.poll() is not None, "the engine was not killed part-way"
    assert router.metric("microserve_router:failovers_total") - before == 2  # the victim's two went on elsewhere
    assert got == want
    for resumed in got[2:]:
        jsonschema.validate(json.loads(resumed["text"]), PERSON)
