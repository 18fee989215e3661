"""A request as the engine sees it: one sequence of tokens, its KV blocks and its progress."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from microserve.engine.output_text import OutputText
from microserve.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """One sequence. A request with n > 1 becomes n of these sharing a `group_id`."""

    request_id: str  # unique inside the engine: "<group_id>" or "<group_id>#<index>"
    group_id: str
    index: int
    token_ids: list[int]  # prompt followed by generated tokens
    num_prompt_tokens: int
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)
    seed: int | None = None  # seeded sampling: token k's noise comes from (seed, k)

    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    block_ids: list[int] = field(default_factory=list)  # the block table
    block_hashes: list[bytes] = field(default_factory=list)  # hashes of its full, computed blocks
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache on admission
    wait_for: "Request | None" = None  # sibling whose prompt prefill must finish first (n > 1)
    first_token_time: float | None = None
    scheduled_time: float | None = None  # when it first got into a batch (queue time ends)
    prefill_only: bool = False  # compute the prompt's KV and hold it (for remote_send); never sample
    kv_progress: object | None = None  # a LayerProgress told about each layer of the last chunk
    matcher: object | None = None  # structured output: its place in the grammar (engine/structured.py)

    out: OutputText = field(default_factory=OutputText)  # its text, logprobs, and what was sent

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def stop_ids_blocked(self) -> set[int]:
        """Tokens that would end the sequence: masked while fewer than min_tokens are out."""
        ids = set(self.params.stop_token_ids)
        if not self.params.ignore_eos:
            ids |= self.eos_token_ids
        return ids

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Its prompt's logprobs are computed with it (so it takes nothing from the prefix cache)."""
        return self.params.prompt_logprobs is not None and self.index == 0 and not self.prefill_only

    @property
    def is_prefill_done(self) -> bool:
        return self.num_computed_tokens >= self.num_prompt_tokens


def prompt_rows(items: list[tuple[Request, int]]) -> list[tuple[Request, int, int, int]]:
    """(request, first row, first position, end position) of the rows whose logits score a
    prompt token not yet scored: position p's logits are the model's guess at token p + 1."""
    out, row = [], 0
    for req, n in items:
        start = req.num_computed_tokens
        first = max(start, len(req.out.prompt_logprobs))  # a recomputed prefill is not scored twice
        last = min(start + n, req.num_prompt_tokens - 1)
        if req.wants_prompt_logprobs and first < last:
            out.append((req, row + first - start, first, last))
        row += n
    return out


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list | None  # per token: (logprob, [(token id, logprob), ...])
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list | None = None


@dataclass
class RequestTimes:
    """Where a finished request's time went (time.monotonic values; for n > 1 the first
    sequence's): queued until `scheduled`, prefill until `first_token`, decode until `finished`."""

    arrival: float
    scheduled: float | None
    first_token: float | None
    finished: float


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    prompt: str | None = None
    prompt_logprobs: list | None = None  # per prompt token after the first, when asked for
    error: str | None = None  # the request failed inside the engine (for the log, never for clients)
    times: RequestTimes | None = None  # on the finished output
