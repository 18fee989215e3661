"""The Responses API through the openai SDK, on one engine and through `serve`'s router, with
the built-in model: text and message input, instructions, max_output_tokens, multi-turn via
previous_response_id, json_schema output, function calls and their round trip, streams."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from server_utils import SERVE_TOKEN as TOKEN

pytestmark = pytest.mark.slow  # starts `serve` on the built-in model

MODEL = "SmolLM2-135M-Instruct"
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                          "required": ["city"], "additionalProperties": False}}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(params=["router", "engine"])
def client(request, serve) -> openai.OpenAI:
    router, engine = serve
    url, key = (router, "none") if request.param == "router" else (engine, TOKEN)
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


def create(client: openai.OpenAI, **fields):
    return client.responses.create(model=MODEL, temperature=0, **{"max_output_tokens": 12, **fields})


def test_text_and_message_input_with_instructions(client):
    r = create(client, input="Say hello.")
    assert r.status in ("completed", "incomplete") and r.output_text and r.id.startswith("resp_")
    assert r.usage.input_tokens > 0 and 0 < r.usage.output_tokens <= 12
    r = create(client, instructions="Answer in French.",
               input=[{"role": "user", "content": [{"type": "input_text", "text": "Say hello."}]}])
    assert r.output[0].type == "message" and r.output_text and r.instructions == "Answer in French."


def test_max_output_tokens_makes_it_incomplete(client):
    r = create(client, input="Write a long story about a dragon.", max_output_tokens=3)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3


def test_previous_response_id_continues_and_unknown_is_400(client):
    first = create(client, input="My name is Ada. Remember it.")
    second = create(client, input="What is my name?", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    # the second prompt holds the first turn (its input and its answer) before the new question
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    with pytest.raises(openai.BadRequestError) as e:
        create(client, input="x", previous_response_id="resp_unknown")
    assert e.value.body["param"] == "previous_response_id"


def test_json_schema_output_validates(client):
    r = create(client, input="Describe a person as JSON.", max_output_tokens=60,
               text={"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}})
    assert r.status == "completed", r
    jsonschema.validate(json.loads(r.output_text), PERSON)


def test_function_call_and_its_round_trip(client):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = create(client, input=ask, tools=[WEATHER], tool_choice="required", max_output_tokens=40,
               parallel_tool_calls=False)
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and calls[0].call_id.startswith("call_")
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])
    output = {"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"temp": 21}'}
    # sent back whole, as the SDK's items ...
    again = create(client, input=ask + [c.model_dump(exclude_none=True) for c in calls] + [output], tools=[WEATHER],
                   tool_choice="none")
    assert again.status in ("completed", "incomplete") and again.output_text
    # ... or only the output, continuing the stored response
    follow = create(client, input=[output], previous_response_id=r.id, tools=[WEATHER], tool_choice="none")
    assert follow.output_text == again.output_text  # the same conversation, hence the same prompt
    assert follow.usage.input_tokens == again.usage.input_tokens


def test_stream_events_and_final_text(client):
    with client.responses.stream(model=MODEL, input="Say hello.", temperature=0, max_output_tokens=60) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text and text == final.output_text
