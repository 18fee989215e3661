"""OpenAI's Responses API (`POST /v1/responses`): the request, its conversion to a chat
request (so sampling, structured outputs and tools are the chat API's), the store that
`previous_response_id` continues from, and the one orchestration both fronts run."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Annotated, Any, Literal, Union

from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from microserve.api.protocol import MAX_N, ChatCompletionRequest, ChatMessage, JsonSchemaFormat, ResponseFormat
from microserve.api.render import Delta, TokenText, accumulate
from microserve.api.responses_render import ResponseRender, ResponseResult
from microserve.api.responses_store import ResponseStore
from microserve.api.streams import ChatRun
from microserve.api.tools import FunctionCall, FunctionDefinition, FunctionName, NamedToolChoice, Tool, ToolCall
from microserve.errors import UserError

# Fields that would change the output and that this server does not do: refused by name.
REFUSED_RESPONSE_FIELDS = ("reasoning", "background", "max_tool_calls", "prompt", "conversation",
                           "context_management")
LOGPROBS_INCLUDE = "message.output_text.logprobs"
INPUT_ITEM_TYPES = ("message", "function_call", "function_call_output")
TEXT_PARTS = ("input_text", "output_text")


# ---------------------------------------------------------------------------------------------
# The request


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")  # output parts sent back carry annotations, logprobs
    type: str
    text: str | None = None


def parts_text(content: str | list[ContentPart]) -> str:
    if isinstance(content, str):
        return content
    refused = sorted({p.type for p in content if p.type not in TEXT_PARTS})
    if refused:
        raise UserError(f"content parts of type {', '.join(refused)} are not supported (text only)")
    return "".join(p.text or "" for p in content)


class MessageItem(BaseModel):
    model_config = ConfigDict(extra="ignore")  # an earlier output item sent back carries id, status
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]

    def append_to(self, messages: list[ChatMessage]) -> None:
        messages.append(ChatMessage(role=self.role, content=parts_text(self.content)))


class FunctionCallItem(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str

    def append_to(self, messages: list[ChatMessage]) -> None:
        """Calls join the assistant turn they follow, as one chat message holds them all."""
        call = ToolCall(id=self.call_id, function=FunctionCall(name=self.name, arguments=self.arguments))
        if messages and messages[-1].role == "assistant":
            messages[-1].tool_calls = (messages[-1].tool_calls or []) + [call]
        else:
            messages.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))


class FunctionCallOutputItem(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[ContentPart]

    def append_to(self, messages: list[ChatMessage]) -> None:
        messages.append(ChatMessage(role="tool", tool_call_id=self.call_id, content=parts_text(self.output)))


InputItem = Annotated[Union[MessageItem, FunctionCallItem, FunctionCallOutputItem], Field(discriminator="type")]


class FunctionTool(BaseModel):
    """Responses' flat function tool."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def as_tool(self) -> Tool:
        return Tool(type="function", function=FunctionDefinition(
            name=self.name, description=self.description, parameters=self.parameters, strict=self.strict))


class FunctionChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    def response_format(self) -> ResponseFormat | None:
        if self.type != "json_schema":
            return None if self.type == "text" else ResponseFormat(type="json_object")
        if self.name is None or self.schema_ is None:
            raise UserError("text.format of type json_schema needs a `name` and a `schema`")
        return ResponseFormat(type="json_schema", json_schema=JsonSchemaFormat(
            name=self.name, description=self.description, schema=self.schema_, strict=self.strict))


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: TextFormat = Field(default_factory=lambda: TextFormat(type="text"))
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1 - MAX_N)
    stream: bool = False
    previous_response_id: str | None = None
    store: bool | None = True
    text: TextConfig | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    include: list[str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    # accepted, and change nothing here
    metadata: dict[str, str] | None = None
    user: str | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    stream_options: dict[str, Any] | None = None
    # refused by name (REFUSED_RESPONSE_FIELDS)
    reasoning: Any = None
    background: Any = None
    max_tool_calls: Any = None
    prompt: Any = None
    conversation: Any = None
    context_management: Any = None

    @field_validator("input", mode="before")
    @classmethod
    def _input_types(cls, value: Any) -> Any:
        """A message may leave out its type; any type other than ours is refused by name."""
        if not isinstance(value, list):
            return value
        items = []
        for item in value:
            if isinstance(item, dict) and "type" not in item and "role" in item:
                item = {**item, "type": "message"}
            kind = item.get("type") if isinstance(item, dict) else None
            if isinstance(kind, str) and kind not in INPUT_ITEM_TYPES:
                raise UserError(f"input items of type {kind!r} are not supported "
                                f"(only {', '.join(INPUT_ITEM_TYPES)})")
            items.append(item)
        return items

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools(cls, value: Any) -> Any:
        if isinstance(value, list):
            kinds = sorted({t.get("type") for t in value if isinstance(t, dict) and t.get("type") != "function"},
                           key=str)
            if kinds:
                raise UserError(f"tools of type {', '.join(map(str, kinds))} are not supported (function tools only)")
        return value

    def check_supported(self) -> None:
        for name in REFUSED_RESPONSE_FIELDS:
            value = getattr(self, name)
            if value is not None and not (name == "background" and value is False):
                raise UserError(f"`{name}` is not supported by this server")
        if self.truncation == "auto":
            raise UserError('`truncation` "auto" is not supported by this server (only "disabled")')
        unknown = [i for i in self.include or [] if i != LOGPROBS_INCLUDE]
        if unknown:
            raise UserError(f"`include` of {', '.join(unknown)} is not supported (only {LOGPROBS_INCLUDE})")
        if self.text is not None and self.text.verbosity not in (None, "medium"):
            raise UserError("`text.verbosity` is not supported by this server")

    @property
    def logprobs(self) -> bool:
        return LOGPROBS_INCLUDE in (self.include or [])

    def input_messages(self) -> list[ChatMessage]:
        if isinstance(self.input, str):
            return [ChatMessage(role="user", content=self.input)]
        messages: list[ChatMessage] = []
        for item in self.input:
            item.append_to(messages)
        return messages

    def chat_request(self, conversation: list[ChatMessage]) -> ChatCompletionRequest:
        """The chat request that answers this one: instructions first, then the conversation."""
        self.check_supported()
        system = [ChatMessage(role="system", content=self.instructions)] if self.instructions else []
        if not system and not conversation:
            raise UserError("`input` is empty")
        choice = self.tool_choice
        if isinstance(choice, FunctionChoice):
            choice = NamedToolChoice(type="function", function=FunctionName(name=choice.name))
        try:
            return ChatCompletionRequest(
                model=self.model, messages=system + conversation, max_completion_tokens=self.max_output_tokens,
                temperature=self.temperature, top_p=self.top_p, seed=self.seed, stream=self.stream,
                response_format=self.text.format.response_format() if self.text else None,
                tools=[t.as_tool() for t in self.tools] if self.tools else None, tool_choice=choice,
                parallel_tool_calls=self.parallel_tool_calls, logprobs=self.logprobs,
                top_logprobs=self.top_logprobs if self.logprobs else None, user=self.user)
        except ValidationError as e:
            first = e.errors()[0]
            raise UserError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None


    def echo(self) -> dict:
        """The settings a Response object repeats."""
        choice = self.tool_choice
        text_format = self.text.format if self.text else TextFormat(type="text")
        return {"instructions": self.instructions, "max_output_tokens": self.max_output_tokens,
                "temperature": 1.0 if self.temperature is None else self.temperature,
                "top_p": 1.0 if self.top_p is None else self.top_p,
                "tools": [t.model_dump(exclude_none=True) for t in self.tools or []],
                "tool_choice": choice.model_dump() if isinstance(choice, FunctionChoice) else choice or "auto",
                "parallel_tool_calls": self.parallel_tool_calls is not False,
                "text": {"format": text_format.model_dump(by_alias=True, exclude_none=True)},
                "previous_response_id": self.previous_response_id, "store": self.store is not False,
                "metadata": self.metadata or {}, "user": self.user, "top_logprobs": self.top_logprobs,
                "truncation": "disabled", "background": False}


def new_response_id() -> str:
    return "resp_" + secrets.token_hex(16)


# ---------------------------------------------------------------------------------------------
# The orchestration both fronts share

RunChat = Callable[[ChatCompletionRequest], Awaitable[ChatRun]]


class ResponsesAPI:
    """/v1/responses: the conversation from the store and the input, a chat request the
    front starts its own way (`run_chat`), the output rendered and stored."""

    def __init__(self, model_name: str, token_text: TokenText, store: ResponseStore | None = None):
        self.model_name = model_name
        self.token_text = token_text
        self.store = store or ResponseStore()

    async def create(self, req: ResponsesRequest, run_chat: RunChat) -> dict | StreamingResponse:
        previous = self.store.conversation(req.previous_response_id) if req.previous_response_id else []
        conversation = previous + req.input_messages()
        chat = req.chat_request(conversation)
        run = await run_chat(chat)
        render = ResponseRender(new_response_id(), req.echo(), self.model_name, run.prompt_tokens, self.token_text,
                                tools=bool(chat.tools_offered))

        def keep(result: ResponseResult) -> None:
            if req.store is not False:
                self.store.put(render.response_id, conversation + [result.message])

        if req.stream:
            return StreamingResponse(render.stream(run.deltas, keep), media_type="text/event-stream")
        async with aclosing(run.deltas) as deltas:
            finals = await accumulate(deltas)
        result = render.result(finals[0] if finals else Delta(0))
        keep(result)
        return result.body
