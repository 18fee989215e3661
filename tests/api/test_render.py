"""OpenAI rendering, in process: the bodies and SSE chunks both fronts answer with."""

from __future__ import annotations

import asyncio
import json

from microserve.api.protocol import ChatCompletionRequest, CompletionRequest, prompt_list
from microserve.api.render import ChatRender, CompletionRender, Delta, accumulate, engine_chunk

TEXT = {1: "a", 2: "bc", 3: "d", 5: "a", 6: "b", 9: "z"}.__getitem__  # token id -> text


async def _aiter(items):
    for x in items:
        yield x


def events(render_stream) -> list:
    async def go():
        return [line async for line in render_stream]

    lines = asyncio.run(go())
    assert lines[-1] == "data: [DONE]\n\n"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_wire_deltas_round_trip_and_accumulate():
    d = Delta(0, "bc", [2], [(-0.5, [(2, -0.5), (3, -1.0)])], None)
    wire = json.loads(engine_chunk({"id": "x"}, [d])[6:])["choices"][0]
    assert wire == {"index": 0, "text": "bc", "token_ids": [2], "finish_reason": None,
                    "logprobs": [[-0.5, [[2, -0.5], [3, -1.0]]]]}
    more = Delta.from_wire({**wire, "text": "d", "token_ids": [3], "finish_reason": "stop"})
    (whole,) = asyncio.run(accumulate(_aiter([Delta.from_wire(wire), more])))
    assert (whole.text, whole.token_ids, whole.finish_reason, len(whole.logprobs)) == ("bcd", [2, 3], "stop", 2)


def test_completion_body_numbers_choices_per_prompt_and_offsets_logprobs():
    render = CompletionRender("cmpl-1", "m", 2, [[5, 6, 7], [8, 9, 5, 6]], TEXT, echoes=["hi ", ""])
    finals = [[Delta(0, "a", [1], [(-1.0, [])], "length"), Delta(1, "bc", [2], [(-2.0, [])], "stop")],
              [Delta(0, "d", [3], None, "stop"), Delta(1, "", [], None, "stop")]]
    body = render.body(finals)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["choices"][0]["text"] == "hi a"
    assert body["choices"][0]["logprobs"]["text_offset"] == [3]  # after the echoed prompt
    assert body["choices"][2]["logprobs"] is None
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def test_completion_stream_echoes_once_skips_empty_deltas_and_ends_with_usage():
    render = CompletionRender("cmpl-1", "m", 1, [[5, 6, 7, 8]], TEXT, echoes=["hi "], include_usage=True)
    deltas = [(0, Delta(0, "a", [1])), (0, Delta(0, "", [])), (0, Delta(0, "bc", [2], None, "stop"))]
    chunks = events(render.stream(_aiter(deltas)))
    assert [c["choices"][0]["text"] for c in chunks[:-1]] == ["hi a", "bc"]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2


def test_echo_logprobs_put_the_prompts_tokens_first_and_stream_offsets_count_all_text_sent():
    render = CompletionRender("cmpl-1", "m", 1, [[5, 6]], TEXT, echoes=["ab"])
    prompt = [None, (-0.7, [(6, -0.7), (9, -1.5)])]
    deltas = [(0, Delta(0, "c", [1], [(-0.1, [])], prompt_logprobs=prompt)), (0, Delta(0, "de", [2], [(-0.2, [])]))]
    first, second = [c["choices"][0] for c in events(render.stream(_aiter(deltas)))]
    assert first["text"] == "abc"
    assert first["logprobs"]["token_logprobs"] == [None, -0.7, -0.1]
    assert first["logprobs"]["top_logprobs"][:2] == [None, {TEXT(6): -0.7, TEXT(9): -1.5}]
    assert first["logprobs"]["tokens"] == [TEXT(5), TEXT(6), TEXT(1)]
    assert first["logprobs"]["text_offset"][2] == 2 and second["logprobs"]["text_offset"] == [3]
    body = render.body([[Delta(0, "cde", [1, 2], [(-0.1, []), (-0.2, [])], "stop", prompt)]])
    assert body["choices"][0]["logprobs"]["token_logprobs"] == [None, -0.7, -0.1, -0.2]


def test_chat_stream_role_first_then_content_then_finish_and_an_abort_just_ends():
    render = ChatRender("chatcmpl-1", "m", 2, 5, TEXT)
    deltas = [Delta(0, "a", [1], [(-0.1, [(1, -0.1)])]), Delta(0, "", [], None, "stop"),
              Delta(1, "d", [3], None, "abort")]
    chunks = events(render.stream(_aiter(deltas)))
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"role": "assistant", "content": ""}, {"role": "assistant", "content": ""},
        {"content": "a"}, {}, {"content": "d"}]
    assert chunks[2]["choices"][0]["logprobs"]["content"][0]["bytes"] == [97]
    assert chunks[3]["choices"][0]["finish_reason"] == "stop"
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)


def test_chat_body():
    body = ChatRender("chatcmpl-1", "m", 1, 5, TEXT).body([Delta(0, "abc", [1, 2], None, "stop")])
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "abc", "refusal": None}
    assert body["usage"]["total_tokens"] == 7


def test_requests_forward_only_the_fields_set():
    req = CompletionRequest(model="m", prompt="x", temperature=0.5, seed=3, max_tokens=8)
    assert req.forwarded(req.max_tokens, None) == {"n": 1, "temperature": 0.5, "seed": 3, "ignore_eos": False,
                                                   "min_tokens": 0, "max_tokens": 8}
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], logprobs=True,
                                 max_completion_tokens=4)
    assert chat.top_logprobs_wanted == 0 and chat.completion_max_tokens == 4
    assert chat.message_dicts() == [{"role": "user", "content": "hi"}]


def test_prompt_lists():
    assert prompt_list("a") == ["a"]
    assert prompt_list([1, 2]) == [[1, 2]]
    assert prompt_list(["a", "b"]) == ["a", "b"]
