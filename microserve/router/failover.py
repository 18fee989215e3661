"""Fail-over and admission control around a strategy's output stream.

If an engine dies while a request is on it (prefill, KV transfer or decode), the request
goes on elsewhere: each unfinished sequence is resumed on a live engine with its prompt
plus the tokens already streamed (`generated`), so the client sees every token once.

A request may itself be what kills or fails an engine (a poison request): it is replayed
after such a failure only `max_replays` times (once), then its client gets an error, so it
cannot take the engines down one after another.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from microserve.api.microserving import GenerateChunk
from microserve.api.streams import merge as _merge
from microserve.router.cluster import Cluster, Engine, EngineDown, EngineError

log = logging.getLogger("microserve.router")


class Busy(Exception):
    """The router's queue is full: answer 429 with Retry-After."""


class Poisoned(Exception):
    """Engines died or failed under this request more than the replay limit allows: answer 502."""

    def __init__(self, request_id: str, failures: int):
        super().__init__(f"this request failed on {failures} engines (each died or failed while serving it); "
                         "it is not tried again")
        self.request_id = request_id


class Admission:
    """At most `max_active` requests run on the engines; up to `max_queued` more wait here;
    anything beyond is refused at once, so memory stays bounded under any load."""

    def __init__(self, max_active: int, max_queued: int):
        self.max_active = max_active
        self.max_queued = max_queued
        self.active = 0
        self.queued = 0
        self._slots = asyncio.Semaphore(max_active)

    async def acquire(self) -> None:
        if self._slots.locked() and self.queued >= self.max_queued:
            raise Busy(f"{self.active} requests running and {self.queued} queued")
        self.queued += 1
        try:
            await self._slots.acquire()
        finally:
            self.queued -= 1
        self.active += 1

    def release(self) -> None:
        self.active -= 1
        self._slots.release()


@dataclass
class _Sequence:
    ids: list[int] = field(default_factory=list)
    text_len: int = 0
    finished: bool = False


def _retryable(e: Exception) -> bool:
    # Dead engine, engine-side failure, or a full queue there (another engine may have room).
    return isinstance(e, EngineDown) or (isinstance(e, EngineError) and (e.status >= 500 or e.status == 429))


def _failed_under_request(e: Exception) -> bool:
    """The engine had the request and died or failed with it (not: unreachable from the start, or busy)."""
    return (isinstance(e, EngineDown) and e.reached) or (isinstance(e, EngineError) and e.status >= 500)


async def with_failover(chunks: AsyncIterator[GenerateChunk], req, cluster: Cluster, max_attempts: int = 3,
                        wait_s: float = 30.0, on_failover=None, max_replays: int = 1) -> AsyncIterator[GenerateChunk]:
    """Yield `chunks`; when they fail, go on with resumed requests on healthy engines."""
    n = int(req.sampling.get("n", 1))
    seqs = [_Sequence() for _ in range(n)]
    avoid: set[Engine] = set()
    attempt = failures = 0
    source = chunks
    while True:
        try:
            async for chunk in source:
                for ch in chunk.choices:
                    s = seqs[ch.index]
                    s.ids += ch.token_ids
                    s.text_len += len(ch.text)
                    s.finished = s.finished or ch.finish_reason is not None
                yield chunk
            return
        except Exception as e:
            if not _retryable(e) or attempt >= max_attempts:
                raise
            await source.aclose()
            failures += _failed_under_request(e)
            if failures > max_replays:
                log.error("request %s: %s; %d engines failed under it, not replayed again",
                          req.request_id, e, failures)
                raise Poisoned(req.request_id, failures) from e
            attempt += 1
            if e.engine is not None:  # (down, failing or busy: another engine first)
                avoid.add(e.engine)
            target = await _pick(cluster, avoid, wait_s)
            if target is None:
                raise
            log.warning("request %s: %s; continuing on %s (attempt %d)", req.request_id, e, target.url, attempt)
            if on_failover is not None:  # (request id, what failed, where it goes on)
                on_failover(req.request_id, e, target)
            source = _resume(req, seqs, target, attempt)


async def _pick(cluster: Cluster, avoid: set[Engine], wait_s: float) -> Engine | None:
    """The least loaded engine that is up, preferring ones this request has not failed on;
    waits (for a restart, say) up to `wait_s` when none is up."""
    deadline = time.monotonic() + wait_s
    while True:
        up = cluster.up
        fresh = [e for e in up if e not in avoid]
        if fresh or up:
            return cluster.least_loaded(fresh or up)
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(cluster.refresh_s)


async def _resume(req, seqs: list[_Sequence], engine: Engine, attempt: int) -> AsyncIterator[GenerateChunk]:
    if not any(s.ids or s.finished for s in seqs):  # nothing out yet: simply start over there
        async for chunk in engine.start_generate(f"{req.request_id}-r{attempt}", req.prompt, 0, req.sampling):
            yield chunk
        return
    streams, indexes = [], []
    for i, s in enumerate(seqs):
        if s.finished:
            continue
        sampling = {**req.sampling, "n": 1, "generated": s.ids, "generated_text_len": s.text_len}
        if req.sampling.get("seed") is not None:
            sampling["seed"] = req.sampling["seed"] + i
        streams.append(engine.start_generate(f"{req.request_id}-r{attempt}-{i}", req.prompt, 0, sampling))
        indexes.append(i)
    async for k, chunk in _merge(streams):
        for ch in chunk.choices:
            ch.index = indexes[k]
        yield chunk
