"""Tool calling through the OpenAI surface, on one engine and through `serve`, with the
built-in model (whose own template knows no tools: api/tools.py's format stands in)."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from server_utils import SERVE_TOKEN as TOKEN

pytestmark = pytest.mark.slow  # starts `serve` on the built-in model

MODEL = "SmolLM2-135M-Instruct"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                   "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time now"}}  # no parameters
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def targets(serve):
    url, engine = serve
    return [(url, {}), (engine, {"Authorization": f"Bearer {TOKEN}"})]


def chat(target, headers, body: dict) -> httpx.Response:
    return httpx.post(target + "/v1/chat/completions", headers=headers, timeout=120,
                      json={"model": MODEL, "messages": ASK, "tools": [WEATHER, TIME], "max_tokens": 80, **body})


def schema_of(name: str) -> dict:
    return {"get_weather": WEATHER, "get_time": TIME}[name]["function"].get("parameters", {"type": "object"})


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}},
                                    {"type": "function", "function": {"name": "get_time"}}])
def test_forced_calls_always_parse_and_fit(serve, choice):
    for target, headers in targets(serve):
        for seed in range(3):
            r = chat(target, headers, {"tool_choice": choice, "temperature": 1.0, "seed": seed,
                                       "parallel_tool_calls": seed != 0})
            assert r.status_code == 200, r.text
            c = r.json()["choices"][0]
            calls = c["message"]["tool_calls"]
            # One call ends at its block; parallel calls may go on until max_tokens, each complete one parsed.
            assert c["finish_reason"] == "tool_calls" or (seed and c["finish_reason"] == "length"), c
            assert calls and all(call["id"].startswith("call_") and call["type"] == "function" for call in calls)
            for call in calls:
                if isinstance(choice, dict):
                    assert call["function"]["name"] == choice["function"]["name"]
                jsonschema.validate(json.loads(call["function"]["arguments"]), schema_of(call["function"]["name"]))


def test_streamed_tool_calls_reassemble_to_the_whole_answer(serve):
    for target, headers in targets(serve):
        body = {"tool_choice": "required", "temperature": 0}
        whole = chat(target, headers, body).json()["choices"][0]
        r = chat(target, headers, {**body, "stream": True})
        chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        calls: dict[int, dict] = {}
        finish = None
        for chunk in chunks:
            choice = chunk["choices"][0]
            finish = choice["finish_reason"] or finish
            for d in choice["delta"].get("tool_calls", []):
                call = calls.setdefault(d["index"], {"name": None, "arguments": "", "id": None})
                if "id" in d:
                    call["id"], call["name"] = d["id"], d["function"]["name"]
                call["arguments"] += d["function"].get("arguments", "")
        assert finish == "tool_calls"
        assert [(c["name"], c["arguments"]) for c in calls.values()] == \
            [(c["function"]["name"], c["function"]["arguments"]) for c in whole["message"]["tool_calls"]]


def test_none_and_auto(serve):
    for target, headers in targets(serve):
        r = chat(target, headers, {"tool_choice": "none", "temperature": 0}).json()["choices"][0]
        assert "tool_calls" not in r["message"] and r["finish_reason"] in ("stop", "length")
        r = chat(target, headers, {"tool_choice": "auto", "temperature": 0})
        assert r.status_code == 200  # the model chooses; whatever it wrote is parsed or left as content
        message = r.json()["choices"][0]["message"]
        for call in message.get("tool_calls") or []:
            json.loads(call["function"]["arguments"])


def test_a_tool_round_trip(serve):
    for target, headers in targets(serve):
        first = chat(target, headers, {"tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                                       "temperature": 0}).json()["choices"][0]["message"]
        messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": first["tool_calls"]},
                    {"role": "tool", "tool_call_id": first["tool_calls"][0]["id"], "content": '{"temp": 21}'}]
        r = chat(target, headers, {"messages": messages, "tool_choice": "none", "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("body, message", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not in `tools`"),
    ({"tools": [WEATHER, WEATHER]}, "unique"),
    ({"tools": None, "tool_choice": "required"}, "only allowed when `tools`"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "name"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "cannot be combined"),
])
def test_bad_tool_requests_are_400s(serve, body, message):
    for target, headers in targets(serve):
        r = chat(target, headers, body)
        assert r.status_code == 400, r.text
        assert message in r.json()["error"]["message"], r.text


def test_openai_sdk_and_langchain_bind_tools(serve):
    from langchain_openai import ChatOpenAI
    from openai import OpenAI

    client = OpenAI(base_url=serve[0] + "/v1", api_key="none")
    done = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                          max_tokens=80)
    call = done.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["unit"] in ("c", "f")
    llm = ChatOpenAI(base_url=serve[0] + "/v1", api_key="none", model=MODEL, max_tokens=80, temperature=0)
    answer = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke("Weather in Rome?")
    assert answer.tool_calls and answer.tool_calls[0]["name"] == "get_weather"
    assert set(answer.tool_calls[0]["args"]) == {"city", "unit"}
