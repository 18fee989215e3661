"""The Responses API in-process: request conversion, the store's bounds, bodies and event
streams rendered from hand-made Deltas (checked against the openai SDK's types), and the
400s, through a FastAPI app whose "run chat" is a fake."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter, ValidationError

from microserve.api.errors import install_error_handlers
from microserve.api.protocol import ChatMessage
from microserve.api.render import Delta
from microserve.api.responses import ResponsesAPI, ResponsesRequest
from microserve.api.responses_store import InvalidPreviousResponse, ResponseStore
from microserve.api.streams import ChatRun
from microserve.api.tools import NamedToolChoice
from microserve.errors import RequestFailed, UserError

MODEL = "m"
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
EVENTS = TypeAdapter(ResponseStreamEvent)


def request(**fields) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": MODEL, "input": "hi", **fields})


class FakeChat:
    """A front's run-chat: records each chat request and answers with the next list of deltas."""

    def __init__(self, *answers: list[Delta], fail: Exception | None = None):
        self.answers = list(answers)
        self.seen = []
        self.fail = fail

    async def __call__(self, chat) -> ChatRun:
        self.seen.append(chat)
        deltas, fail = self.answers.pop(0), self.fail

        async def gen():
            for d in deltas:
                yield d
            if fail is not None:
                raise fail

        return ChatRun("chatcmpl-x", 7 * len(self.seen), gen())


def text_deltas(*pieces: str, finish: str = "stop") -> list[Delta]:
    return [Delta(0, p, [i], finish_reason=finish if i == len(pieces) - 1 else None) for i, p in enumerate(pieces)]


def create(api: ResponsesAPI, req: ResponsesRequest, chat: FakeChat):
    return asyncio.run(api.create(req, chat))


def events_of(api: ResponsesAPI, req: ResponsesRequest, chat: FakeChat) -> list:
    async def collect():
        response = await api.create(req, chat)
        return [chunk async for chunk in response.body_iterator]

    out = []
    for chunk in asyncio.run(collect()):
        head, data = chunk.split("\n", 1)
        assert chunk.endswith("\n\n") and head.startswith("event: ") and data.startswith("data: ")
        event = EVENTS.validate_python(json.loads(data[len("data: "):]))
        assert head == f"event: {event.type}"
        out.append(event)
    assert [e.sequence_number for e in out] == list(range(len(out)))
    return out


# -- conversion


def test_text_input_and_instructions_become_a_chat_request():
    req = request(instructions="Be brief.", max_output_tokens=5, temperature=0, top_p=0.5, seed=3)
    chat = req.chat_request(req.input_messages())
    assert [(m.role, m.content) for m in chat.messages] == [("system", "Be brief."), ("user", "hi")]
    assert (chat.max_completion_tokens, chat.temperature, chat.top_p, chat.seed) == (5, 0, 0.5, 3)
    assert request().chat_request(request().input_messages()).completion_max_tokens is None  # the context window


def test_input_items_become_messages():
    req = request(input=[
        {"role": "user", "content": "weather?"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me see.",
                                                              "annotations": []}], "id": "msg_1"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}',
         "id": "fc_1", "status": "completed"},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        {"role": "user", "content": [{"type": "input_text", "text": "and "}, {"type": "input_text", "text": "then?"}]},
    ])
    messages = [m.as_dict() for m in req.input_messages()]
    assert messages == [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "Let me see.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
        {"role": "user", "content": "and then?"},
    ]


def test_text_format_tools_and_choice_map_to_the_chat_fields():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    req = request(text={"format": {"type": "json_schema", "name": "a", "schema": schema, "strict": True}})
    spec = req.chat_request(req.input_messages()).structured()
    assert json.loads(spec.json_schema) == schema
    req = request(tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"},
                  parallel_tool_calls=False)
    chat = req.chat_request(req.input_messages())
    assert chat.tools[0].function.name == "get_weather" and chat.tools[0].function.parameters == WEATHER["parameters"]
    assert chat.tool_choice == NamedToolChoice.model_validate({"type": "function", "function": {"name": "get_weather"}})
    assert chat.choice.forced and chat.parallel_tool_calls is False
    req = request(include=["message.output_text.logprobs"], top_logprobs=2)
    assert req.chat_request(req.input_messages()).top_logprobs_wanted == 2


@pytest.mark.parametrize("fields, words", [
    ({"reasoning": {"effort": "low"}}, "reasoning"),
    ({"truncation": "auto"}, "truncation"),
    ({"include": ["file_search_call.results"]}, "file_search_call.results"),
    ({"background": True}, "background"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "schema"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input_image"),
    ({"input": []}, "empty"),
])
def test_unsupported_settings_are_refused_by_name(fields, words):
    req = request(**fields)
    with pytest.raises(UserError, match=words):
        req.chat_request(req.input_messages())


def test_unknown_fields_other_tools_and_items_are_refused():
    with pytest.raises(ValidationError, match="extra"):
        request(frobnicate=1)
    with pytest.raises(UserError, match="web_search"):
        request(tools=[{"type": "web_search"}])
    with pytest.raises(UserError, match="reasoning"):
        request(input=[{"type": "reasoning", "id": "r", "summary": []}])
    assert request(truncation="disabled", background=False, store=False).store is False


# -- the store


def conversation(text: str) -> list[ChatMessage]:
    return [ChatMessage(role="user", content=text)]


def test_store_evicts_the_least_recently_used_beyond_its_count():
    store = ResponseStore(max_responses=2)
    store.put("a", conversation("1"))
    store.put("b", conversation("2"))
    assert store.conversation("a")[0].content == "1"  # a is now the most recent
    store.put("c", conversation("3"))
    assert "b" not in store and "a" in store and "c" in store and len(store) == 2
    with pytest.raises(InvalidPreviousResponse):
        store.conversation("b")


def test_store_keeps_its_size_bound():
    one = len(conversation("x" * 10)[0].model_dump_json())
    store = ResponseStore(max_chars=2 * one)
    assert store.put("a", conversation("x" * 10)) and store.put("b", conversation("y" * 10))
    assert store.chars == 2 * one
    store.put("c", conversation("z" * 10))
    assert "a" not in store and store.chars == 2 * one
    assert not store.put("big", conversation("x" * 3 * one)) and "big" not in store and len(store) == 2


def test_stored_conversations_are_copies():
    store = ResponseStore()
    store.put("a", conversation("1"))
    store.conversation("a")[0].content = "changed"
    assert store.conversation("a")[0].content == "1"


# -- bodies


def test_body_is_an_sdk_response_with_usage_and_echoes():
    api = ResponsesAPI(MODEL, str)
    req = request(instructions="Be brief.", max_output_tokens=9, metadata={"k": "v"})
    body = create(api, req, FakeChat(text_deltas("Hel", "lo")))
    r = Response.model_validate(body)
    assert r.id.startswith("resp_") and r.object == "response" and r.status == "completed"
    assert r.output_text == "Hello" and r.output[0].id.startswith("msg_") and r.output[0].status == "completed"
    assert r.usage.input_tokens == 7 and r.usage.output_tokens == 2 and r.usage.total_tokens == 9
    assert (r.instructions, r.max_output_tokens, r.metadata, r.store) == ("Be brief.", 9, {"k": "v"}, True)
    assert r.incomplete_details is None and r.text.format.type == "text"


def test_length_makes_the_response_incomplete():
    body = create(ResponsesAPI(MODEL, str), request(max_output_tokens=2), FakeChat(text_deltas("a", "b", finish="length")))
    r = Response.model_validate(body)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output[0].status == "incomplete"


def test_tool_calls_become_function_call_items():
    body = create(ResponsesAPI(MODEL, str), request(tools=[WEATHER]), FakeChat(text_deltas("Sure. ", CALL_TEXT)))
    r = Response.model_validate(body)
    assert [o.type for o in r.output] == ["message", "function_call"]
    assert r.output_text == "Sure."
    call = r.output[1]
    assert call.call_id.startswith("call_") and call.id.startswith("fc_") and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"} and r.tools[0].name == "get_weather"


def test_logprobs_when_included():
    deltas = [Delta(0, "a", [5], [(-0.5, [(5, -0.5), (6, -1.0)])], "stop")]
    body = create(ResponsesAPI(MODEL, lambda t: f"t{t}"), request(include=["message.output_text.logprobs"]),
                  FakeChat(deltas))
    lp = Response.model_validate(body).output[0].content[0].logprobs[0]
    assert (lp.token, lp.logprob, [a.token for a in lp.top_logprobs]) == ("t5", -0.5, ["t5", "t6"])


# -- conversations


def test_previous_response_id_continues_the_conversation():
    api = ResponsesAPI(MODEL, str)
    chat = FakeChat([Delta(0, "", [1], finish_reason="stop")], text_deltas("It is ", CALL_TEXT),
                    text_deltas("ok"))
    first = create(api, request(instructions="Old rules.", input="hello"), chat)
    second = create(api, request(tools=[WEATHER], input="weather?", previous_response_id=first["id"]), chat)
    call = second["output"][-1]
    output = {"type": "function_call_output", "call_id": call["call_id"], "output": "sunny"}
    create(api, request(tools=[WEATHER], input=[output], previous_response_id=second["id"], instructions="New."), chat)
    last = [m.as_dict() for m in chat.seen[2].messages]
    assert [m["role"] for m in last] == ["system", "user", "assistant", "user", "assistant", "tool"]
    assert last[0]["content"] == "New." and last[1]["content"] == "hello"  # old instructions are not carried
    assert last[4]["content"] == "It is" and last[4]["tool_calls"][0]["id"] == call["call_id"]
    assert last[5] == {"role": "tool", "content": "sunny", "tool_call_id": call["call_id"]}


def test_store_false_is_not_kept():
    api = ResponsesAPI(MODEL, str)
    body = create(api, request(store=False), FakeChat(text_deltas("x")))
    assert body["store"] is False and body["id"] not in api.store


# -- streams


def test_stream_events_in_order_and_deltas_join_to_the_text():
    api = ResponsesAPI(MODEL, str)
    events = events_of(api, request(stream=True), FakeChat(text_deltas("Hel", "lo", "")))
    assert [e.type for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Hello"
    done = events[-1].response
    assert done.output_text == "Hello" and done.usage.output_tokens == 3 and done.id in api.store
    assert events[2].item.id == events[4].item_id == done.output[0].id


def test_streamed_tool_calls_and_their_arguments():
    events = events_of(ResponsesAPI(MODEL, str), request(stream=True, tools=[WEATHER]),
                       FakeChat(text_deltas("Sure. ", CALL_TEXT[:30], CALL_TEXT[30:])))
    types = [e.type for e in events]
    assert types[-3:] == ["response.function_call_arguments.done", "response.output_item.done",
                          "response.completed"]
    added = [e for e in events if e.type == "response.output_item.added"]
    assert [a.item.type for a in added] == ["message", "function_call"]
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert json.loads(args) == {"city": "Paris"} and done.arguments == args and done.name == "get_weather"
    final = events[-1].response
    assert final.output[1].arguments == args and final.output[1].call_id == added[1].item.call_id
    assert types.index("response.function_call_arguments.done") < types.index("response.completed")


def test_streamed_length_is_incomplete():
    events = events_of(ResponsesAPI(MODEL, str), request(stream=True), FakeChat(text_deltas("a", "b", finish="length")))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"


def test_an_empty_stream_still_answers_one_message():
    events = events_of(ResponsesAPI(MODEL, str), request(stream=True), FakeChat([Delta(0, "", [], None, "stop")]))
    assert events[-1].response.output_text == "" and [e.type for e in events].count("response.output_item.added") == 1


def test_a_stream_that_breaks_ends_with_error_and_failed():
    api = ResponsesAPI(MODEL, str)
    events = events_of(api, request(stream=True), FakeChat(text_deltas("a", finish=None), fail=RequestFailed("r1")))
    assert [e.type for e in events[-2:]] == ["error", "response.failed"]
    assert "r1" in events[-2].message and events[-1].response.status == "failed"
    assert events[-1].response.id not in api.store


# -- over HTTP (in-process)


@pytest.fixture
def client():
    app = FastAPI()
    install_error_handlers(app)
    api = ResponsesAPI(MODEL, str)

    @app.post("/v1/responses")
    async def responses(req: ResponsesRequest):
        return await api.create(req, FakeChat(text_deltas("hi")))

    return TestClient(app)


@pytest.mark.parametrize("body, param, words", [
    ({"previous_response_id": "resp_nope"}, "previous_response_id", "not found"),
    ({"reasoning": {"effort": "high"}}, None, "reasoning"),
    ({"tools": [{"type": "file_search"}]}, None, "file_search"),
    ({"frobnicate": 1}, "frobnicate", "unrecognized"),
])
def test_http_400s(client, body, param, words):
    r = client.post("/v1/responses", json={"model": MODEL, "input": "x", **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and words in error["message"]


def test_http_round_trip(client):
    first = client.post("/v1/responses", json={"model": MODEL, "input": "x"}).json()
    r = client.post("/v1/responses", json={"model": MODEL, "input": "y", "previous_response_id": first["id"]})
    assert r.status_code == 200 and r.json()["previous_response_id"] == first["id"]
