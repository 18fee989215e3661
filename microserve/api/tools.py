"""Tool calling, model side: OpenAI's tool schemas, prompts for templates without tool
syntax, the grammar that forces a call, and the parsers (whole and streamed) of what the
model wrote.

The tool-call format (Hermes / Qwen style), used when the chat template has none of its own
(the built-in SmolLM2 template ignores `tools`):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

one block per call, blocks separated by a newline. The tools are described in a system
message (`render_messages`), which shows this syntax and lists each tool as OpenAI's
`{"type": "function", "function": {...}}` JSON inside `<tools></tools>`. A past call is
rendered back as the assistant's text with these blocks; a tool's result as a user message
`<tool_response>\\n...\\n</tool_response>`. `<tool_call>` is five ordinary tokens for the
built-in model: no special tokens are needed.

Parsing rules, shared by `parse_tool_calls` and `ToolCallStream` so both give the same calls:
a block is `<tool_call>`, JSON whitespace, one JSON object, JSON whitespace, `</tool_call>`;
the object needs a string "name"; "arguments" is an object (a JSON string holding an object,
null, or absent are accepted too: absent or null mean `{}`). Anything else, e.g. a block whose
JSON does not parse, stays content, its `<tool_call>` included. Arguments are returned as the
model wrote them minus the whitespace outside strings (compact JSON, key order and number
spelling kept), which is what lets a stream send them as they come.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from microserve.errors import UserError
from microserve.sampling import StructuredOutput
from microserve.schema import closed
from microserve.tokenizer import chat_ids, template_supports_tools

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
NAME_PATTERN = re.compile(r"[a-zA-Z0-9_-]{1,64}")
JSON_WS = " \t\n\r"
# The same bounded whitespace as engine/structured.py's JSON_OPTIONS (a test keeps them equal;
# importing it here would pull torch into the router). Ours replace any "x-guidance" a client
# put in a schema: its `lenient` would otherwise turn off the refusal of unenforced keywords.
JSON_OPTIONS = {"whitespace_pattern": r"[ \n]{0,2}"}
WS = r"[ \n]{0,2}"  # whitespace the call grammar allows between the JSON tokens it writes itself
MAX_HEADER_CHARS = 256  # `{"name": "..."` longer than this is not streamed as a call early


# ---------------------------------------------------------------------------------------------
# Request side: OpenAI's schemas


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str | None = None
    parameters: Any = None  # a JSON schema of an object; None: the function takes no arguments
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        # UserError, not ValueError: pydantic lets it through, so the client reads this message
        if not NAME_PATTERN.fullmatch(name):
            raise UserError(f"tool name {name!r} must match ^[a-zA-Z0-9_-]{{1,64}}$")
        return name

    @field_validator("parameters")
    @classmethod
    def _parameters(cls, parameters: Any) -> Any:
        if parameters is None:
            return None
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise UserError("a tool's `parameters` must be a JSON schema of type object, got "
                            f"{json.dumps(parameters)[:100]}")
        return parameters


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition

    @property
    def name(self) -> str:
        return self.function.name

    def arguments_schema(self) -> dict:
        """The schema the arguments are forced to fit, whitespace bounded."""
        params = self.function.parameters
        schema = {"type": "object", "properties": {}, "additionalProperties": False} if params is None else closed(params)
        if not schema.get("properties") and "additionalProperties" not in schema:
            schema = {**schema, "properties": {}, "additionalProperties": False}  # no parameters: "{}"
        return {**schema, "type": "object", "x-guidance": JSON_OPTIONS}


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    """`{"type": "function", "function": {"name": ...}}`"""

    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionName


ToolChoiceParam = Literal["none", "auto", "required"] | NamedToolChoice  # the request field's type


@dataclass(frozen=True)
class ToolChoice:
    """What the model may do: no call, its choice, at least one call, or a call of `name`."""

    mode: Literal["none", "auto", "required", "named"]
    name: str | None = None

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "named")

    def allowed(self, tools: list[Tool]) -> list[Tool]:
        return [t for t in tools if self.mode != "named" or t.name == self.name]


def parse_tools(raw: list | None) -> list[Tool] | None:
    """Tools from request JSON, with UserError (not pydantic's error) for a bad one."""
    if raw is None:
        return None
    try:
        return [t if isinstance(t, Tool) else Tool.model_validate(t) for t in raw]
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UserError(f"tools: {where}: {first['msg']}") from None


def resolve_tool_choice(tools: list[Tool] | None, tool_choice: ToolChoiceParam | dict | None) -> ToolChoice:
    """Check the tools together and the choice against them; the default is OpenAI's
    ("auto" with tools, "none" without)."""
    if not tools:
        if tool_choice is not None:
            raise UserError("`tool_choice` is only allowed when `tools` are specified")
        return ToolChoice("none")
    names = [t.name for t in tools]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise UserError(f"tool names must be unique; repeated: {', '.join(duplicated)}")
    if tool_choice is None:
        return ToolChoice("auto")
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise UserError(f"`tool_choice` must be none, auto, required or a named function, got {tool_choice!r}")
        return ToolChoice(tool_choice)
    try:
        named = tool_choice if isinstance(tool_choice, NamedToolChoice) else NamedToolChoice.model_validate(tool_choice)
    except ValidationError:
        raise UserError('`tool_choice` must be none, auto, required or {"type": "function", '
                        '"function": {"name": ...}}') from None
    if named.function.name not in names:
        raise UserError(f"`tool_choice` names the function {named.function.name!r}, which is not in `tools`")
    return ToolChoice("named", named.function.name)


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str  # JSON text


class ToolCall(BaseModel):
    """A call in an assistant message: what we answer, and what clients send back."""

    model_config = ConfigDict(extra="ignore")  # clients echo extra keys (e.g. a stream's index)
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


# ---------------------------------------------------------------------------------------------
# Prompts for templates without tool syntax


def tools_prompt(tools: list[Tool]) -> str:
    """The system text that describes the tools and the call syntax."""
    listed = "\n".join(json.dumps(t.model_dump(exclude_none=True), ensure_ascii=False) for t in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{listed}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n"
            f'{CALL_OPEN}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{CALL_CLOSE}')


def call_block(name: str, arguments: str) -> str:
    """One call as the model writes it; arguments that are not JSON are kept as a string."""
    try:
        args = json.loads(arguments)
    except ValueError:
        args = arguments
    body = json.dumps({"name": name, "arguments": args}, ensure_ascii=False)
    return f"{CALL_OPEN}\n{body}\n{CALL_CLOSE}"


def render_messages(messages: list[dict], tools: list[Tool] | None, template_supports_tools: bool) -> list[dict]:
    """Messages any plain template renders ({"role", "content": str} only): tools described in
    the system message, past calls and their results written out in the tool-call format.
    A template with tool support gets the messages untouched (and `tools` from the caller)."""
    if template_supports_tools:
        return messages
    out: list[dict] = []
    for m in messages:
        if m.get("role") == "tool":
            block = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1].get("tool_responses"):  # parallel results: one user turn, as Qwen's template does
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "tool_responses": True})
        elif m.get("role") == "assistant" and m.get("tool_calls"):
            out.append({"role": "assistant", "content": _assistant_text(m)})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    out = [{"role": m["role"], "content": m["content"]} for m in out]
    if tools:
        out = _with_system(out, tools_prompt(tools))
    return out


def _assistant_text(message: dict) -> str:
    calls = [c if isinstance(c, ToolCall) else ToolCall.model_validate(c) for c in message["tool_calls"]]
    parts = [message["content"]] if message.get("content") else []
    parts += [call_block(c.function.name, c.function.arguments) for c in calls]
    return "\n".join(parts)


def _with_system(messages: list[dict], text: str) -> list[dict]:
    if messages and messages[0]["role"] in ("system", "developer"):
        first = messages[0]
        merged = f"{first['content']}\n\n{text}" if first["content"] else text
        return [{"role": first["role"], "content": merged}] + messages[1:]
    return [{"role": "system", "content": text}] + messages


# ---------------------------------------------------------------------------------------------
# The grammar of forced calls


def tool_call_spec(tools: list[Tool], choice: ToolChoice, parallel: bool) -> StructuredOutput | None:
    """For "required" and a named function: a Lark grammar (llguidance's dialect) whose every
    output is one call block (one or more when `parallel`) of an allowed tool, the name first
    and then arguments fitting that tool's schema. None when the model chooses freely."""
    if not choice.forced:
        return None
    allowed = choice.allowed(tools)
    if not allowed:
        raise UserError("no tool to call")
    repeat = f' ("\\n" call)*' if parallel else ""
    lines = [f"start: call{repeat}",
             f'call: "{CALL_OPEN}\\n" ({" | ".join(f"call_{i}" for i in range(len(allowed)))}) "\\n{CALL_CLOSE}"',
             f"TAIL: /{WS}\\}}/"]
    for i, tool in enumerate(allowed):
        # Separate alternatives with a literal name each, not one %json with anyOf: the name
        # comes first and picks the schema of the arguments.
        head = f'\\{{{WS}"name"{WS}:{WS}"{tool.name}"{WS},{WS}"arguments"{WS}:{WS}'
        lines += [f"call_{i}: HEAD_{i} args_{i} TAIL", f"HEAD_{i}: /{head}/",
                  f"// the arguments of tool {tool.name!r}",  # shown in a compile error's context
                  f"args_{i}: %json {json.dumps(tool.arguments_schema(), ensure_ascii=False)}"]
    return StructuredOutput(grammar="\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# Parsing what the model wrote


class _JsonScan:
    """Where a JSON value that starts with `{` ends: string, escape and nesting state, fed one
    character at a time. It checks nothing else; json.loads judges the span it finds."""

    def __init__(self):
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.done = False

    def feed(self, c: str) -> None:
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif c == "\\":
                self.escaped = True
            elif c == '"':
                self.in_string = False
        elif c == '"':
            self.in_string = True
        elif c in "{[":
            self.depth += 1
        elif c in "}]":
            self.depth -= 1
            self.done = self.depth <= 0


def _object_end(text: str, start: int) -> int | None:
    """The end of the object starting at text[start] == "{", or None if it does not end."""
    scan = _JsonScan()
    for i in range(start, len(text)):
        scan.feed(text[i])
        if scan.done:
            return i + 1
    return None


def minify(text: str) -> str:
    """JSON text without the whitespace outside strings."""
    out, scan = [], _JsonScan()
    for c in text:
        if scan.in_string or c not in JSON_WS:
            out.append(c)
        scan.feed(c)
    return "".join(out)


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in JSON_WS:
        i += 1
    return i


def _members(compact: str) -> dict[str, str]:
    """The top-level members of a valid compact JSON object, each as its raw text."""
    decoder, members, i = json.JSONDecoder(), {}, 1
    while compact[i] != "}":
        key, i = decoder.raw_decode(compact, i)
        start = i + 1  # past ":"
        _, i = decoder.raw_decode(compact, start)
        members[key] = compact[start:i]
        i += compact[i] == ","
    return members


def call_of(obj_text: str) -> tuple[str, str] | None:
    """(name, compact arguments) of a block's JSON, or None if it is not a call."""
    try:
        obj = json.loads(obj_text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments")
    if args is None:
        return obj["name"], "{}"
    if isinstance(args, dict):
        return obj["name"], _members(minify(obj_text))["arguments"]
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            inner = json.loads(args)
        except ValueError:
            return None
        return (obj["name"], minify(args)) if isinstance(inner, dict) else None
    return None


def _block_at(text: str, tag: int) -> tuple[int, int, tuple[str, str]] | None:
    """The block whose `<tool_call>` is at text[tag]: (object start, block end, call), or None
    if it is not one."""
    start = _skip_ws(text, tag + len(CALL_OPEN))
    if not text.startswith("{", start):
        return None
    end = _object_end(text, start)
    if end is None:
        return None
    close = _skip_ws(text, end)
    if not text.startswith(CALL_CLOSE, close):
        return None
    call = call_of(text[start:end])
    return None if call is None else (start, close + len(CALL_CLOSE), call)


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """The content outside the call blocks (None if only whitespace) and the calls."""
    content, calls, pos, search = [], [], 0, 0
    while (tag := text.find(CALL_OPEN, search)) >= 0:
        block = _block_at(text, tag)
        if block is None:  # not a call: its tag is content, and what follows is searched again
            search = tag + len(CALL_OPEN)
            continue
        _, end, (name, args) = block
        content.append(text[pos:tag])
        calls.append(ToolCall(id=new_call_id(), function=FunctionCall(name=name, arguments=args)))
        pos = search = end
    content.append(text[pos:])
    return "".join(content).strip() or None, calls


_MORE = "more"  # the text so far could still become what is looked for


def _literals(text: str, i: int, pieces: tuple[str, ...]) -> int | str | None:
    """Match `pieces` with JSON whitespace around each from text[i]: the index after them,
    _MORE if the text is a prefix of a match, None if it cannot match."""
    for piece in pieces:
        i = _skip_ws(text, i)
        got = text[i:i + len(piece)]
        if not piece.startswith(got):
            return None
        if len(got) < len(piece):
            return _MORE
        i += len(piece)
    return i


def _header(text: str, start: int) -> tuple[str, int] | str | None:
    """`{"name": "<string>"` from text[start]: (name, index after it), _MORE, or None."""
    i = _literals(text, start, ("{", '"name"', ":"))
    if not isinstance(i, int):
        return i
    i = _skip_ws(text, i)
    if i == len(text):
        return _MORE
    if text[i] != '"':
        return None
    scan = _JsonScan()
    for j in range(i, min(len(text), start + MAX_HEADER_CHARS)):
        scan.feed(text[j])
        if j > i and not scan.in_string:
            try:
                name = json.loads(text[i:j + 1])
            except ValueError:
                return None
            return name, j + 1
    return _MORE if len(text) < start + MAX_HEADER_CHARS else None


@dataclass
class _Block:
    """A block being read: its `<tool_call>` at `tag`."""

    tag: int
    obj: int | None = None  # where its object starts
    scan: _JsonScan = field(default_factory=_JsonScan)
    scanned: int = 0  # next index for `scan`
    end: int | None = None  # where its object ends
    index: int | None = None  # the call's index, once announced
    args: int | None = None  # where streamed arguments start ("{" right after the name)
    args_scan: _JsonScan = field(default_factory=_JsonScan)
    args_scanned: int = 0
    name_end: int | None = None
    streams_args: bool | None = None  # None: not known yet
    sent: str = ""  # argument text sent so far


class ToolCallStream:
    """Text deltas in, OpenAI streaming deltas out: {"content": ...} for text outside the
    blocks, and {"tool_calls": [...]} for a call: first its index, id, type and name (as soon as
    the name is complete), then its argument fragments. Concatenated, they give what
    `parse_tool_calls` gives for the whole text; a block announced early (its name written
    first) that then turns out not to be a call still counts as one, with what was sent."""

    def __init__(self):
        self._buf = ""
        self._pos = 0  # text before this is consumed
        self._block: _Block | None = None
        self._held = ""  # trailing whitespace of the content, sent only if more content follows
        self._content_started = False
        self._out: list[dict] = []
        self.tool_calls: list[ToolCall] = []

    def feed(self, text: str) -> list[dict]:
        self._buf += text
        self._advance(final=False)
        return self._take()

    def finish(self) -> list[dict]:
        self._advance(final=True)
        return self._take()

    # -- the state machine

    def _advance(self, final: bool) -> None:
        while self._block_step(final) if self._block else self._text_step(final):
            pass

    def _text_step(self, final: bool) -> bool:
        tag = self._buf.find(CALL_OPEN, self._pos)
        if tag >= 0:
            self._content(self._buf[self._pos:tag])
            self._pos = tag
            self._block = _Block(tag)
            return True
        end = len(self._buf) if final else len(self._buf) - _partial_tail(self._buf, self._pos)
        self._content(self._buf[self._pos:end])
        self._pos = end
        return False

    def _block_step(self, final: bool) -> bool:
        """Read the block as far as the text goes; True when it is settled."""
        b, buf = self._block, self._buf
        if b.obj is None:
            i = _skip_ws(buf, b.tag + len(CALL_OPEN))
            if i == len(buf):
                return self._not_a_block() if final else False
            if buf[i] != "{":
                return self._not_a_block()
            b.obj = b.scanned = i
        while b.end is None and b.scanned < len(buf):
            b.scan.feed(buf[b.scanned])
            b.scanned += 1
            b.end = b.scanned if b.scan.done else None
        self._announce(b)
        self._stream_arguments(b)
        if b.end is None:
            return self._unfinished() if final else False
        close = _literals(buf, b.end, (CALL_CLOSE,))
        if close is None or (close == _MORE and final):
            return self._unfinished()
        if close == _MORE:
            return False
        return self._complete(b, close)

    def _announce(self, b: _Block) -> None:
        """The call's first delta, once its JSON starts with a complete name."""
        if b.index is not None or b.name_end == -1:
            return
        header = _header(self._buf[:b.end] if b.end else self._buf, b.obj)
        if header == _MORE:
            return
        if header is None:
            b.name_end = -1  # not name first: announced whole, once complete
            return
        name, b.name_end = header
        self._announce_call(b, name)

    def _announce_call(self, b: _Block, name: str) -> None:
        b.index = len(self.tool_calls)
        call = ToolCall(id=new_call_id(), function=FunctionCall(name=name, arguments=""))
        self.tool_calls.append(call)
        self._out.append({"tool_calls": [{"index": b.index, "id": call.id, "type": "function",
                                          "function": {"name": name, "arguments": ""}}]})

    def _stream_arguments(self, b: _Block) -> None:
        """Send the arguments as they come when `"arguments": {` follows the name."""
        if b.index is None or b.streams_args is False:
            return
        limit = b.end or len(self._buf)
        if b.args is None:
            found = _literals(self._buf[:limit], b.name_end, (",", '"arguments"', ":", "{"))
            if found == _MORE:
                return
            b.streams_args = found is not None
            if found is None:
                return
            b.args = b.args_scanned = found - 1
        piece = []
        while not b.args_scan.done and b.args_scanned < limit:
            c = self._buf[b.args_scanned]
            if b.args_scan.in_string or c not in JSON_WS:
                piece.append(c)
            b.args_scan.feed(c)
            b.args_scanned += 1
        self._send_arguments(b, "".join(piece))

    def _send_arguments(self, b: _Block, piece: str) -> None:
        if not piece:
            return
        b.sent += piece
        self.tool_calls[b.index].function.arguments = b.sent
        last = self._out[-1]["tool_calls"][0] if self._out and "tool_calls" in self._out[-1] else None
        if last is not None and last["index"] == b.index and "id" not in last:  # one fragment per feed
            last["function"]["arguments"] += piece
        else:
            self._out.append({"tool_calls": [{"index": b.index, "function": {"arguments": piece}}]})

    def _complete(self, b: _Block, end: int) -> bool:
        call = call_of(self._buf[b.obj:b.end])
        if call is None and b.index is None:
            return self._not_a_block()
        if b.index is None:
            self._announce_call(b, call[0])
        if call is not None and call[1].startswith(b.sent):  # what was not streamed yet
            self._send_arguments(b, call[1][len(b.sent):])
        self._pos, self._block = end, None
        return True

    def _unfinished(self) -> bool:
        """The text ended, or broke the block's form, inside it."""
        b = self._block
        if b.index is None:
            return self._not_a_block()
        self._pos, self._block = b.end or len(self._buf), None  # announced: the call stands
        return True

    def _not_a_block(self) -> bool:
        """The tag is content, and the text after it is read again."""
        tag_end = self._block.tag + len(CALL_OPEN)
        self._content(self._buf[self._pos:tag_end])
        self._pos, self._block = tag_end, None
        return True

    def _content(self, text: str) -> None:
        """Send content, holding back leading and trailing whitespace (content is stripped)."""
        text = self._held + text
        if not self._content_started:
            text = text.lstrip()
        body = text.rstrip()
        self._held = text[len(body):]
        if body:
            self._content_started = True
            if self._out and "content" in self._out[-1]:
                self._out[-1]["content"] += body
            else:
                self._out.append({"content": body})

    def _take(self) -> list[dict]:
        out, self._out = self._out, []
        return out


def _partial_tail(text: str, start: int) -> int:
    """How many characters at the end of text[start:] could begin a `<tool_call>`."""
    for k in range(min(len(CALL_OPEN) - 1, len(text) - start), 0, -1):
        if text.endswith(CALL_OPEN[:k]):
            return k
    return 0


def chat_prompt_ids(tokenizer, messages: list[dict], tools: list[Tool] | None,
                    add_generation_prompt: bool = True) -> list[int]:
    """A conversation's ids: tools go to a template that knows them, and are otherwise
    written into the messages in this module's tool-call format."""
    native = template_supports_tools(tokenizer)
    rendered = render_messages(messages, tools, native)
    schemas = [t.model_dump(exclude_none=True) for t in tools] if tools and native else None
    return chat_ids(tokenizer, rendered, add_generation_prompt, schemas)
