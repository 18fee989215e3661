"""Structured outputs in the engine, on the built-in model: every output fits its schema,
regex or choice list at temperature 1 because the logits are masked, not because the model
is good; bad specs are refused; compiles are bounded and never stall the engine loop."""

from __future__ import annotations

import asyncio
import json
import re
import time

import jsonschema
import pytest

from conftest import run_requests

from microserve.config import EngineConfig
from microserve.engine.engine import LLMEngine
from microserve.errors import UserError
from microserve.sampling import SamplingParams, StructuredOutput

pytestmark = pytest.mark.slow  # loads the built-in model or starts server processes

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}, "zip": {"type": "string",
                    "pattern": "^[0-9]{5}$"}}, "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}
PROMPT = "<|im_start|>user\nDescribe a person as JSON.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module", params=["builtin", "simulated"])
def engine(request):
    sim = {"simulate": "llama-3.1-8b@h100"} if request.param == "simulated" else {}
    return LLMEngine(EngineConfig(kv_cache_memory="64MiB", **sim), progress=False)


def run(engine, requests: dict[str, tuple]) -> dict:
    """All requests in one batch; the finished outputs by id (and no KV left held)."""
    done = run_requests(engine, requests)
    assert engine.pool.num_free_blocks == engine.pool.num_blocks
    return done


def sampled(spec: StructuredOutput, seed: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=kw.pop("max_tokens", 200), structured=spec, **kw)


def test_outputs_fit_the_schema_at_temperature_1(engine):
    spec = StructuredOutput(json_schema=json.dumps(PERSON))
    done = run(engine, {f"s{seed}": (PROMPT, sampled(spec, seed)) for seed in range(12)})
    for out in done.values():
        assert out.error is None
        c = out.outputs[0]
        assert c.finish_reason == "stop", c.text  # the document completed within max_tokens
        jsonschema.validate(json.loads(c.text), PERSON)


def test_json_object_regex_and_choice(engine):
    specs = {"obj": StructuredOutput(json_object=True), "re": StructuredOutput(regex=r"\d{3}-[a-z]{2,4}"),
             "choice": StructuredOutput(choice=("red", "green", "blue"))}
    done = run(engine, {f"{k}{seed}": (PROMPT, sampled(spec, seed, max_tokens=200 if k == "obj" else 16))
                        for k, spec in specs.items() for seed in range(6)})
    for rid, out in done.items():
        text = out.outputs[0].text
        if rid.startswith("re"):
            assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", text), text
        elif rid.startswith("choice"):
            assert text in ("red", "green", "blue")
        elif out.outputs[0].finish_reason == "stop":
            assert isinstance(json.loads(text), dict)


def test_min_tokens_yields_to_a_complete_grammar_and_n_siblings(engine):
    spec = StructuredOutput(choice=("yes", "no"))
    done = run(engine, {
        "min": (PROMPT, SamplingParams(temperature=0, max_tokens=8, min_tokens=6, structured=spec)),
        "n": (PROMPT, SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=8, structured=spec)),
        "bias": (PROMPT, SamplingParams(temperature=0, max_tokens=8, structured=spec,
                                        logit_bias={t: -100 for t in engine.tokenize("yes")[:1]})),
    })
    assert done["min"].outputs[0].text in ("yes", "no")
    assert all(c.text in ("yes", "no") for c in done["n"].outputs)
    assert done["bias"].outputs[0].text == "no"  # its first token banned, "yes" cannot be written


def test_a_resumed_request_continues_its_grammar(engine):
    """Fail-over: a request resumed elsewhere with its tokens so far stays inside the grammar."""
    spec = StructuredOutput(json_schema=json.dumps(PERSON))
    first = run(engine, {"a": (PROMPT, sampled(spec, 5))})["a"].outputs[0]
    prompt = engine.tokenize(PROMPT)
    cut = first.token_ids[:7]
    engine.add_request("b", prompt, sampled(spec, 5), resume=(cut, 0))
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    resumed = done["b"].outputs[0].token_ids
    assert resumed[:7] == cut
    jsonschema.validate(json.loads(engine.tokenizer.decode(resumed)), PERSON)
    with pytest.raises(UserError, match="do not fit"):
        engine.add_request("c", prompt, sampled(spec, 5), resume=(engine.tokenize("hello"), 0))


@pytest.mark.parametrize("spec, message", [
    (dict(json_schema="{not json"), "not valid JSON"),
    (dict(json_schema=json.dumps({"type": "array", "uniqueItems": True})), "uniqueItems"),
    (dict(json_schema=json.dumps({"type": "object", "not": {"required": ["a"]}})), "not"),
    (dict(regex="[a-"), "cannot be used"),
    (dict(grammar="start: nothing_defined"), "cannot be used"),
    (dict(regex="(" + "|".join(f"w{i}x" for i in range(20000)) + ")"), "cannot be used"),
])
def test_bad_specs_are_refused_quickly(engine, spec, message):
    start = time.monotonic()
    with pytest.raises(UserError, match=message):
        asyncio.run(engine.grammars.compile_async(StructuredOutput(**spec)))
    assert time.monotonic() - start < 1.0


def test_spec_and_bias_validation():
    with pytest.raises(UserError):
        StructuredOutput()
    with pytest.raises(UserError):
        StructuredOutput(regex="a", choice=("a",))
    with pytest.raises(UserError):
        StructuredOutput(choice=())
    assert SamplingParams(logit_bias={"5": 300}).logit_bias == {5: 100.0}
    with pytest.raises(UserError):
        SamplingParams(logit_bias={"x": 1})
