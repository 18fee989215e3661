"""Request and response schemas of the OpenAI-compatible API (pydantic)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from microserve.api.tools import Tool, ToolCall, ToolChoice, ToolChoiceParam, resolve_tool_choice, tool_call_spec
from microserve.errors import UserError
from microserve.sampling import SamplingParams, StructuredOutput

MAX_N = 16
MAX_PROMPTS = 64  # prompts in one completions call
MAX_STOP = 16  # stop strings or stop token ids


FORWARDED_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
                    "repetition_penalty", "stop", "stop_token_ids", "ignore_eos", "min_tokens", "max_tokens",
                    "logit_bias", "skip_special_tokens", "include_stop_str_in_output")
# OpenAI fields that would change the output and that this server does not do: refused by name,
# never dropped without a word. Fields that change nothing here (store, metadata, user,
# service_tier) are accepted; any other unknown field is refused, as OpenAI refuses it.
REFUSED_FIELDS = ("suffix", "best_of", "audio", "modalities", "prediction", "functions", "function_call",
                  "web_search_options", "reasoning_effort", "guided_decoding_backend", "guided_whitespace_pattern")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def spec(self) -> StructuredOutput | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutput(json_object=True)
        if self.json_schema is None:
            raise UserError("response_format of type json_schema needs a `json_schema` object")
        schema = self.json_schema.schema_
        return StructuredOutput(json_schema=json.dumps(True if schema is None else schema))


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: exactly one of the fields."""

    model_config = ConfigDict(extra="forbid")
    json_: dict[str, Any] | bool | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def spec(self) -> StructuredOutput:
        schema = self.json_ if self.json_ is None or isinstance(self.json_, str) else json.dumps(self.json_)
        return StructuredOutput(json_schema=schema, regex=self.regex, grammar=self.grammar,
                                choice=None if self.choice is None else tuple(self.choice),
                                json_object=bool(self.json_object))

    @classmethod
    def of(cls, spec: StructuredOutput) -> dict:
        """The wire form a router forwards to an engine."""
        body = {"json": spec.json_schema, "regex": spec.regex, "grammar": spec.grammar,
                "choice": None if spec.choice is None else list(spec.choice), "json_object": spec.json_object or None}
        return {k: v for k, v in body.items() if v is not None}


class SamplingFields(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="forbid")

    model: str
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = None
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1 - MAX_N)  # what torch generators take
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    stop_token_ids: Annotated[list[int], Field(max_length=MAX_STOP)] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    # structured outputs: OpenAI's field, vLLM's, and vLLM's older guided_* ones
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | bool | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # accepted, and change nothing here
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    # refused by name (REFUSED_FIELDS)
    suffix: Any = None
    best_of: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    functions: Any = None
    function_call: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    guided_decoding_backend: Any = None
    guided_whitespace_pattern: Any = None

    def structured(self) -> StructuredOutput | None:
        """The one structured-output constraint this request asks for, if any."""
        for name in REFUSED_FIELDS:
            value = getattr(self, name, None)
            if value is not None and not (name == "best_of" and value == 1) \
                    and not (name == "modalities" and value == ["text"]):
                raise UserError(f"`{name}` is not supported by this server")
        given = {"response_format": self.response_format.spec() if self.response_format else None,
                 "structured_outputs": self.structured_outputs.spec() if self.structured_outputs else None}
        guided = StructuredOutputs(json=self.guided_json, regex=self.guided_regex, choice=self.guided_choice,
                                   grammar=self.guided_grammar)
        if any(v is not None for v in (self.guided_json, self.guided_regex, self.guided_choice, self.guided_grammar)):
            given["guided_*"] = guided.spec()
        given = {k: v for k, v in given.items() if v is not None}
        if len(given) > 1:
            raise UserError(f"give one structured-output constraint, not {' and '.join(given)}")
        return next(iter(given.values()), None)

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        return SamplingParams(
            n=self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            min_p=self.min_p or 0.0,
            seed=self.seed,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=self.stop or [],
            stop_token_ids=self.stop_token_ids or [],
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            structured=self.structured(),
            logit_bias=self.logit_bias,
            skip_special_tokens=self.skip_special_tokens is not False,
            include_stop_str_in_output=bool(self.include_stop_str_in_output),
        )

    def forwarded(self, max_tokens: int | None, logprobs: int | None) -> dict:
        """The sampling fields set in this request, as a router passes them on to start_generate
        (checked here first, as an engine would check them)."""
        params = self.sampling_params(max_tokens, logprobs)
        fields = {k: getattr(self, k) for k in FORWARDED_FIELDS if getattr(self, k, None) is not None}
        if params.structured is not None:  # one canonical form, whichever field the client used
            fields["structured_outputs"] = StructuredOutputs.of(params.structured)
        fields.pop("max_tokens", None)
        if max_tokens is not None:
            fields["max_tokens"] = max_tokens
        if logprobs is not None:
            fields["logprobs"] = logprobs
        return fields

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)

    @property
    def prompt_logprobs(self) -> int | None:
        """Echo with logprobs scores the prompt's tokens too, as OpenAI does."""
        return self.logprobs if self.echo else None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: the call it answers

    def as_dict(self) -> dict:
        """The message as chat templates and the tool-call format take it."""
        out = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ValueError(f"content part of type {part.get('type')!r} is not supported (text only)")
            parts.append(part.get("text", ""))
        return "".join(parts)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    add_generation_prompt: bool = True
    tools: list[Tool] | None = None
    tool_choice: ToolChoiceParam | None = None
    parallel_tool_calls: bool | None = None

    def message_dicts(self) -> list[dict]:
        """The messages as the chat template takes them (text content only)."""
        try:
            return [m.as_dict() for m in self.messages]
        except ValueError as e:
            raise UserError(str(e)) from None

    @property
    def choice(self) -> ToolChoice:
        return resolve_tool_choice(self.tools, self.tool_choice)

    @property
    def tools_offered(self) -> list[Tool] | None:
        """The tools the model is told of (none under tool_choice "none")."""
        return self.tools if self.choice.mode != "none" else None

    def structured(self) -> StructuredOutput | None:
        """A forced tool call (tool_choice "required" or named) is a grammar like any other."""
        other = super().structured()
        choice = self.choice
        if not choice.forced:
            return other
        if other is not None:
            raise UserError("a forced tool call (tool_choice) cannot be combined with another structured output")
        return tool_call_spec(choice.allowed(self.tools), choice, self.parallel_tool_calls is not False)

    @property
    def completion_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def top_logprobs_wanted(self) -> int | None:
        """Alternatives per token to return, or None for no logprobs at all."""
        return (self.top_logprobs or 0) if self.logprobs else None


def prompt_list(prompt) -> list:
    """A completions `prompt` as a list of prompts (text or token ids), one request each."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise UserError("prompt is empty")
    if all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    if len(prompt) > MAX_PROMPTS:
        raise UserError(f"at most {MAX_PROMPTS} prompts per request, got {len(prompt)}")
    return list(prompt)
