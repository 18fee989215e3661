"""Request bodies of the microserving API (the sub-request calls every engine serves).

Prompts are token ids; `request_id` names the same request on every engine.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from microserve.api.protocol import SamplingFields
from microserve.api.render import Delta


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


@dataclass
class GenerateChunk:
    """One chunk of a start_generate stream as strategies, fail-over and the router's front see
    it: what each choice added (text, token ids, raw logprobs)."""

    choices: list[Delta]

    @classmethod
    def parse(cls, data: str) -> "GenerateChunk | dict":
        """A chunk from an SSE `data:` line; an engine's error event comes back as its dict."""
        body = json.loads(data)
        if "error" in body:
            return body
        return cls([Delta.from_wire(c) for c in body["choices"]])


@dataclass
class EngineStatus:
    """What an engine reports of itself (/microserving/status, and each line of /watch)."""

    running: int = 0
    waiting: int = 0
    num_preemptions: int = 0
    num_blocks: int = 0
    free_blocks: int = 0
    cached_blocks: int = 0
    prefix_queried_tokens: int = 0
    prefix_hit_tokens: int = 0
    prefix_hit_rate: float = 0.0
    reservations: int = 0  # prep_recv reservations waiting for their KV and start_generate
    expired_leases: int = 0
    fingerprint: dict = field(default_factory=dict)  # what KV peers must share (model, dtype, block size)
    instance: str | None = None  # changes when the engine process restarts
    pid: int | None = None
    healthy: bool = True
    max_model_len: int | None = None
    kv_transfer: dict = field(default_factory=dict)  # how peers reach its KV receiver

    @classmethod
    def from_wire(cls, body: dict) -> "EngineStatus":
        """Fields this router knows; any others (a newer engine's) are left out."""
        return cls(**{k: v for k, v in body.items() if k in _STATUS_FIELDS})

    def to_wire(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def block_size(self) -> int | None:
        return self.fingerprint.get("block_size")


_STATUS_FIELDS = {f.name for f in dataclasses.fields(EngineStatus)}
