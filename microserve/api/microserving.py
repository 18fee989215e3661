"""Request bodies of the microserving API (the sub-request calls every engine serves).

Prompts are token ids; `request_id` names the same request on every engine.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from microserve.api.protocol import SamplingFields


class PrepRecv(BaseModel):
    model_config = ConfigDict(extra="ignore")
    request_id: str = Field(min_length=1)
    prompt: list[int] = Field(min_length=1)
    end: int
    lease_s: float = Field(60.0, gt=0, le=3600)  # bounded: a lost router must not pin KV for long


class RemoteSend(BaseModel):
    model_config = ConfigDict(extra="ignore")
    request_id: str = Field(min_length=1)
    prompt: list[int] = Field(min_length=1)
    begin: int = Field(ge=0)
    end: int
    kv_addr_info: dict


class StartGenerate(SamplingFields):
    model: str | None = None
    request_id: str = Field(min_length=1)
    prompt: list[int] = Field(min_length=1)
    begin: int = Field(0, ge=0)
    max_tokens: int | None = Field(None, ge=1)  # None: up to the context window, as on the OpenAI routes
    logprobs: int | None = Field(None, ge=0, le=20)
    prompt_logprobs: int | None = Field(None, ge=0, le=20)  # scores the prompt (begin 0 only)
    # Fail-over: the output tokens another engine already produced, and how many characters of
    # their text the client has; generation continues after them without repeating any.
    generated: list[int] = Field(default_factory=list)
    generated_text_len: int = Field(0, ge=0)


class Abort(BaseModel):
    request_id: str
