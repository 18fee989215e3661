"""Request and response schemas of the OpenAI-compatible API (pydantic)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from microserve.errors import UserError
from microserve.sampling import SamplingParams

MAX_N = 16
MAX_PROMPTS = 64  # prompts in one completions call
MAX_STOP = 16  # stop strings or stop token ids


FORWARDED_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
                    "repetition_penalty", "stop", "stop_token_ids", "ignore_eos", "min_tokens", "max_tokens")


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

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
    user: str | None = None

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
        )

    def forwarded(self, max_tokens: int | None, logprobs: int | None) -> dict:
        """The sampling fields set in this request, as a router passes them on to start_generate
        (checked here first, as an engine would check them)."""
        self.sampling_params(max_tokens, logprobs)
        fields = {k: getattr(self, k) for k in FORWARDED_FIELDS if getattr(self, k, None) is not None}
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


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

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

    def message_dicts(self) -> list[dict]:
        """The messages as the chat template takes them (text content only)."""
        try:
            return [{"role": m.role, "content": m.text()} for m in self.messages]
        except ValueError as e:
            raise UserError(str(e)) from None

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
