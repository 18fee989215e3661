"""Tool calling, model side: schemas and their 400s, prompts for a template without tool
syntax, the forcing grammar (against the real tokenizer) and the parsers, streamed vs whole."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from microserve.api.tools import (
    ToolCallStream, ToolChoice, parse_tool_calls, parse_tools, render_messages, resolve_tool_choice,
    tool_call_spec)
from microserve.errors import UserError

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"},
                                                                          "unit": {"enum": ["c", "f"]}},
                                                           "required": ["city"]}}}
NOW = {"type": "function", "function": {"name": "now"}}
TOOLS = parse_tools([WEATHER, NOW])


# -- schemas

@pytest.mark.parametrize("tools, choice, message", [
    ([WEATHER, WEATHER], None, "unique"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "not in `tools`"),
    (None, "required", "only allowed when `tools`"),
    ([WEATHER], "sometimes", "must be none"),
])
def test_tool_choice_errors(tools, choice, message):
    with pytest.raises(UserError, match=message):
        resolve_tool_choice(parse_tools(tools), choice)


@pytest.mark.parametrize("function, message", [
    ({"name": "has space"}, "must match"), ({"name": "x" * 65}, "must match"),
    ({"name": "f", "parameters": {"type": "string"}}, "type object"),
    ({"name": "f", "parameters": True}, "type object"),
])
def test_bad_tools_are_user_errors(function, message):
    with pytest.raises(UserError, match=message):
        parse_tools([{"type": "function", "function": function}])
    with pytest.raises(UserError):
        parse_tools([{"type": "function"}])


def test_tool_choice_resolves():
    assert resolve_tool_choice(TOOLS, None) == ToolChoice("auto")
    assert resolve_tool_choice(None, None) == ToolChoice("none")
    assert resolve_tool_choice(TOOLS, "required").forced
    named = resolve_tool_choice(TOOLS, {"type": "function", "function": {"name": "now"}})
    assert named == ToolChoice("named", "now") and [t.name for t in named.allowed(TOOLS)] == ["now"]


# -- prompts

def test_render_messages_for_a_template_without_tools():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                    {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                {"role": "tool", "tool_call_id": "call_2", "content": "noon"}]
    out = render_messages(messages, TOOLS, template_supports_tools=False)
    assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in out)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.\n\n# Tools") and '"get_weather"' in out[0]["content"]
    assert "<tool_call>" in out[0]["content"]
    assert out[2]["content"] == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
                                 '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>')
    assert out[3]["content"] == "<tool_response>\nsunny\n</tool_response>\n<tool_response>\nnoon\n</tool_response>"
    assert render_messages(messages, TOOLS, True) is messages
    plain = render_messages([{"role": "user", "content": "hi"}], TOOLS, False)
    assert plain[0]["role"] == "system" and plain[1] == {"role": "user", "content": "hi"}


def test_rendered_round_trip_fits_the_builtin_template():
    from microserve.tokenizer import builtin_model_path, chat_ids, gguf_tokenizer

    tok = gguf_tokenizer(Path(builtin_model_path()))
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "Let me check.", "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "noon"}]
    assert chat_ids(tok, render_messages(messages, TOOLS, False))


# -- the grammar

@pytest.fixture(scope="module")
def compiler():
    from microserve.engine.structured import GrammarCompiler
    from microserve.tokenizer import builtin_model_path, gguf_tokenizer

    tok = gguf_tokenizer(Path(builtin_model_path()))
    return tok, GrammarCompiler(tok, 49152, tok.eos_token_id)


def _fits(compiler, spec, text) -> bool:
    tok, gc = compiler
    m = gc.compile(spec).matcher()
    try:
        for t in tok(text, add_special_tokens=False).input_ids:
            m.accept(t)
    except RuntimeError:
        return False
    return m._m.is_accepting()


def call(name, args, ws=" "):
    return f'<tool_call>\n{{"name":{ws}"{name}",{ws}"arguments":{ws}{args}}}\n</tool_call>'


def test_json_options_match_the_engine():
    from microserve.api import tools
    from microserve.engine.structured import JSON_OPTIONS

    assert tools.JSON_OPTIONS == JSON_OPTIONS


def test_no_grammar_when_the_model_chooses():
    assert tool_call_spec(TOOLS, ToolChoice("auto"), True) is None
    assert tool_call_spec(TOOLS, ToolChoice("none"), True) is None


def test_required_grammar_accepts_valid_calls_only(compiler):
    spec = tool_call_spec(TOOLS, ToolChoice("required"), parallel=False)
    assert _fits(compiler, spec, call("get_weather", '{"city": "Paris"}'))
    assert _fits(compiler, spec, call("get_weather", '{"city":"Paris","unit":"c"}', ws=""))
    assert _fits(compiler, spec, call("now", "{}"))
    assert not _fits(compiler, spec, call("nope", "{}"))  # wrong name
    assert not _fits(compiler, spec, call("get_weather", '{"unit": "c"}'))  # required field missing
    assert not _fits(compiler, spec, call("now", '{"x": 1}'))  # a parameterless tool
    assert not _fits(compiler, spec, call("now", "{}", ws="      "))  # whitespace bounded
    assert not _fits(compiler, spec, '{"arguments": {}, "name": "now"}')
    assert not _fits(compiler, spec, call("now", "{}") + "\n" + call("now", "{}"))  # not parallel
    parallel = tool_call_spec(TOOLS, ToolChoice("required"), parallel=True)
    assert _fits(compiler, parallel, call("now", "{}") + "\n" + call("get_weather", '{"city": "Oslo"}'))


def test_named_grammar_allows_that_tool_only(compiler):
    spec = tool_call_spec(TOOLS, ToolChoice("named", "get_weather"), parallel=False)
    assert _fits(compiler, spec, call("get_weather", '{"city": "Paris"}'))
    assert not _fits(compiler, spec, call("now", "{}"))


def test_a_schema_the_engine_cannot_enforce_is_refused_naming_the_tool(compiler):
    tools = parse_tools([{"type": "function", "function": {"name": "tags", "parameters": {
        "type": "object", "properties": {"t": {"type": "array", "uniqueItems": True}},
        "x-guidance": {"lenient": True}}}}])
    with pytest.raises(UserError, match="uniqueItems.*|tags"):
        compiler[1].compile(tool_call_spec(tools, ToolChoice("required"), False))


# -- parsing, whole and streamed

TEXTS = [
    call("get_weather", '{"city": "Paris"}'),
    "Sure, checking.\n" + call("now", "{}") + "\nDone.",
    call("now", "{}") + "\n" + call("get_weather", '{ "city" : "Pa\\"ris}{", "unit": "c" }'),
    '<tool_call>\n{"name": "f", "arguments": {"a": {"b": [1, {"c": "}"}], "d": "x\\\\"}, "e": null}}\n</tool_call>',
    '<tool_call>{"arguments": {"x": 1}, "name": "late"}</tool_call> after',  # name not first
    '<tool_call>\n{"name": "s", "arguments": "{\\"q\\": 1}"}\n</tool_call>',  # arguments as a string
    '<tool_call>\n{"name": "bare"}\n</tool_call>',  # no arguments
    "text <tool_call>not json</tool_call> more " + call("now", "{}"),
    '<tool_call>{"x": 1}</tool_call>',  # no name: content
    "a < b and <tool_ca but no call",
    "<tool_call> <tool_call>\n" + '{"name": "n", "arguments": {}}' + "\n</tool_call>",
    "just text",
    "  ",
]


def _stream(text, cuts):
    stream, deltas, pieces = ToolCallStream(), [], []
    last = 0
    for cut in cuts + [len(text)]:
        deltas += stream.feed(text[last:cut])
        last = cut
    deltas += stream.finish()
    content = "".join(d.get("content", "") for d in deltas) or None
    calls: dict[int, dict] = {}
    for d in deltas:
        for c in d.get("tool_calls", []):
            if "id" in c:
                assert c["index"] == len(calls) and c["function"]["arguments"] == ""
                assert c["id"].startswith("call_") and len(c["id"]) == 29
                calls[c["index"]] = {"name": c["function"]["name"], "arguments": ""}
            else:
                calls[c["index"]]["arguments"] += c["function"]["arguments"]
    pieces = [calls[i] for i in sorted(calls)]
    return content, pieces, stream


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_calls_equal_the_whole_parse(text):
    content, calls = parse_tool_calls(text)
    whole = [{"name": c.function.name, "arguments": c.function.arguments} for c in calls]
    rng = random.Random(text)
    chunkings = [list(range(1, len(text)))]  # one character at a time
    chunkings += [sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 8))))
                  for _ in range(20) if len(text) > 1]
    for cuts in chunkings:
        got_content, got_calls, stream = _stream(text, cuts)
        assert (got_content, got_calls) == (content, whole), cuts
        assert [(c.function.name, c.function.arguments) for c in stream.tool_calls] == \
            [(c["name"], c["arguments"]) for c in whole]


def test_parse_results():
    content, calls = parse_tool_calls(TEXTS[1])
    assert content == "Sure, checking.\n\nDone." and [c.function.name for c in calls] == ["now"]
    assert calls[0].id.startswith("call_") and calls[0].function.arguments == "{}"
    _, calls = parse_tool_calls(TEXTS[2])
    assert json.loads(calls[1].function.arguments) == {"city": 'Pa"ris}{', "unit": "c"}
    assert calls[1].function.arguments == '{"city":"Pa\\"ris}{","unit":"c"}'
    assert parse_tool_calls(TEXTS[4])[1][0].function.arguments == '{"x":1}'
    assert parse_tool_calls(TEXTS[5])[1][0].function.arguments == '{"q":1}'
    assert parse_tool_calls(TEXTS[6])[1][0].function.arguments == "{}"
    content, calls = parse_tool_calls(TEXTS[7])
    assert content == "text <tool_call>not json</tool_call> more" and len(calls) == 1
    assert parse_tool_calls(TEXTS[8]) == ('<tool_call>{"x": 1}</tool_call>', [])
    assert parse_tool_calls("  ") == (None, [])


def test_stream_sends_content_and_name_early():
    stream = ToolCallStream()
    assert stream.feed("Hi <tool") == [{"content": "Hi"}]  # a possible tag is held back
    assert stream.feed('_call>\n{"name": "get_weather"') == [{"tool_calls": [{
        "index": 0, "id": stream.tool_calls[0].id, "type": "function",
        "function": {"name": "get_weather", "arguments": ""}}]}]
    assert stream.feed(', "arguments": {"city": "Pa') == [
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city":"Pa'}}]}]
    assert stream.feed('ris"}}\n</tool_call>') == [{"tool_calls": [{"index": 0, "function": {"arguments": 'ris"}'}}]}]
    assert stream.finish() == []
