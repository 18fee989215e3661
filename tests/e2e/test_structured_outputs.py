"""Structured outputs through the OpenAI surface, on one engine and through `serve` under
every strategy (the constraint travels with the request through the sub-request API), with
the built-in model: outputs fit at temperature 1 because the engine masks the logits."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import pytest

from server_utils import SERVE_TOKEN as TOKEN

pytestmark = pytest.mark.slow  # starts `serve` on the built-in model

MODEL = "SmolLM2-135M-Instruct"
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 2}},
          "required": ["name", "age", "pets"], "additionalProperties": False}
STRATEGIES = ["round_robin", "disagg", "balanced_disagg", "context_migration", "prefix_aware"]
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


def chat(url: str, body: dict, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": ASK, **body},
                      headers=headers, timeout=120)


def switch(url: str, name: str) -> None:
    r = httpx.post(url + "/admin/strategy", json={"name": name}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200, r.text


def json_schema_format(schema: dict) -> dict:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema,
                                                                       "strict": True}}}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_schema_valid_through_every_strategy(serve, strategy):
    url, _ = serve
    switch(url, strategy)
    for seed in range(3):
        r = chat(url, {**json_schema_format(PERSON), "temperature": 1.0, "seed": seed, "max_tokens": 120})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)


def test_deterministic_strategies_agree(serve):
    """Greedy, the same tokens whichever strategy splits the request."""
    url, _ = serve
    answers = set()
    for strategy in ("round_robin", "disagg", "context_migration"):
        switch(url, strategy)
        r = chat(url, {**json_schema_format(PERSON), "temperature": 0, "max_tokens": 120})
        answers.add(r.json()["choices"][0]["message"]["content"])
    switch(url, "round_robin")
    assert len(answers) == 1


def test_every_constraint_field_on_the_engine_and_the_router(serve):
    url, engine = serve
    bodies = {
        "json_object": ({"response_format": {"type": "json_object"}, "max_tokens": 150}, None),
        "structured_outputs regex": ({"structured_outputs": {"regex": r"\d{3}-\d{2}"}}, r"[0-9]{3}-[0-9]{2}"),
        "structured_outputs choice": ({"structured_outputs": {"choice": ["alpha", "beta"]}}, "alpha|beta"),
        "guided_choice": ({"guided_choice": ["yes", "no"]}, "yes|no"),
        "guided_regex": ({"guided_regex": "[A-Z]{4}"}, "[A-Z]{4}"),
        "guided_json": ({"guided_json": PERSON, "max_tokens": 120}, None),
        "grammar": ({"structured_outputs": {"grammar": 'start: "ok" | "fine"'}}, "ok|fine"),
    }
    for target, token in ((url, None), (engine, TOKEN)):
        for name, (body, pattern) in bodies.items():
            r = chat(target, {"temperature": 1.0, "seed": 3, **body}, token)
            assert r.status_code == 200, (name, r.text)
            text = r.json()["choices"][0]["message"]["content"]
            if pattern:
                assert re.fullmatch(pattern, text), (name, text)
            elif r.json()["choices"][0]["finish_reason"] == "stop":
                value = json.loads(text)
                assert isinstance(value, dict)
                if name == "guided_json":
                    jsonschema.validate(value, PERSON)
        # completions take them too
        r = httpx.post(target + "/v1/completions", headers={"Authorization": f"Bearer {token}"} if token else {},
                       json={"model": MODEL, "prompt": "The answer:", "guided_choice": ["up", "down"]}, timeout=60)
        assert r.json()["choices"][0]["text"] in ("up", "down")


def test_logit_bias(serve):
    from microserve.tokenizer import load_tokenizer

    url, engine = serve
    tok = load_tokenizer(None)

    def first_token(target, bias=None, token=None):
        body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 1, "temperature": 0}
        r = httpx.post(target + "/v1/completions", json={**body, **({"logit_bias": bias} if bias else {})},
                       headers={"Authorization": f"Bearer {token}"} if token else {}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    for target, token in ((url, None), (engine, TOKEN)):
        free = first_token(target, token=token)
        (banned,) = tok(free, add_special_tokens=False).input_ids
        assert first_token(target, {str(banned): -100}, token) != free
        forced = tok(" banana", add_special_tokens=False).input_ids[0]
        assert first_token(target, {str(forced): 100}, token) == tok.decode([forced])


@pytest.mark.parametrize("body, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array",
                                                                                        "uniqueItems": True}}}},
     "uniqueItems"),
    ({"guided_regex": "[a-"}, "cannot be used"),
    ({"guided_json": "{not json"}, "not valid JSON"),
    ({"guided_choice": ["a"], "response_format": {"type": "json_object"}}, "one structured-output constraint"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "exactly one"),
    ({"frobnicate": 1}, "unrecognized request argument supplied: frobnicate"),
    ({"suffix": "x"}, "`suffix` is not supported"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
])
def test_bad_requests_are_400s_and_harm_nothing(serve, body, message):
    url, engine = serve
    for target, token in ((url, None), (engine, TOKEN)):
        r = chat(target, body, token)
        assert r.status_code == 400, (target, r.text)
        assert message in r.json()["error"]["message"], r.text
    assert chat(url, {"max_tokens": 2}).status_code == 200


def test_fields_that_change_nothing_are_accepted(serve):
    url, _ = serve
    r = chat(url, {"max_tokens": 2, "store": False, "metadata": {"a": "b"}, "user": "u", "service_tier": "auto"})
    assert r.status_code == 200, r.text


def test_openai_sdk_parse(serve):
    from openai import OpenAI
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        population: int

    client = OpenAI(base_url=serve[0] + "/v1", api_key="none")
    for seed in range(3):
        done = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "A city as JSON."}],
                                             response_format=City, temperature=1.0, seed=seed, max_tokens=80)
        city = done.choices[0].message.parsed
        assert isinstance(city, City) and isinstance(city.population, int)


def test_a_streamed_n_2_reports_each_finish_once(serve):
    url, engine = serve
    for target, token in ((url, None), (engine, TOKEN)):
        for path, body in (("/v1/chat/completions", {"messages": ASK}), ("/v1/completions", {"prompt": "Hi"})):
            r = httpx.post(target + path, json={"model": MODEL, "n": 2, "max_tokens": 6, "stream": True,
                                                "temperature": 1.0, "seed": 1, **body},
                           headers={"Authorization": f"Bearer {token}"} if token else {}, timeout=60)
            chunks = [json.loads(line[6:]) for line in r.text.splitlines()
                      if line.startswith("data: {")]
            finishes = [c["choices"][0]["index"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
            assert sorted(finishes) == [0, 1], (target, path, finishes)


def test_instructor_and_langchain_as_their_users_call_them(serve):
    import instructor
    from langchain_openai import ChatOpenAI
    from openai import OpenAI
    from pydantic import BaseModel, Field

    class Pet(BaseModel):
        name: str = Field(max_length=20)
        legs: int = Field(ge=0, le=8)

    client = instructor.from_openai(OpenAI(base_url=serve[0] + "/v1", api_key="none"), mode=instructor.Mode.JSON_SCHEMA)
    pet = client.chat.completions.create(model=MODEL, response_model=Pet, max_retries=0, temperature=1.0, seed=2,
                                         max_tokens=150, messages=[{"role": "user", "content": "Describe a pet."}])
    assert isinstance(pet, Pet)
    llm = ChatOpenAI(base_url=serve[0] + "/v1", api_key="none", model=MODEL, temperature=1.0, max_tokens=150, seed=4)
    pet = llm.with_structured_output(Pet, method="json_schema").invoke("Describe a pet.")
    assert isinstance(pet, Pet)
