"""Continuous batching with chunked prefill and preemption by recompute."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from microserve.engine.block_pool import BlockPool, hash_prompt_blocks
from microserve.engine.request import Request, Status


@dataclass
class ScheduledBatch:
    """What one step computes: (request, number of new tokens) pairs, decodes first."""

    items: list[tuple[Request, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)


class Scheduler:
    def __init__(self, pool: BlockPool, max_num_seqs: int, max_num_batched_tokens: int):
        self.pool = pool
        self.block_size = pool.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens

        # 1. Requests already running: one token each for decodes, the next chunk for prefills.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self._grow(req, n, batch):
                continue  # req itself was preempted; running[i] is now the next one
            batch.items.append((req, n))
            budget -= n
            i += 1
        if batch.preempted:
            return batch  # KV is short: admit nothing new this step

        # 2. Admit waiting requests while there is budget, room in the batch and KV.
        skipped = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting.popleft()
            if req.wait_for is not None and not (req.wait_for.is_prefill_done or req.wait_for.finished):
                skipped.append(req)  # a sibling of n > 1: reuse its prompt blocks once computed
                continue
            if not self._admit(req, budget, batch):
                self.waiting.appendleft(req)
                break
            budget -= batch.items[-1][1]
        self.waiting.extendleft(reversed(skipped))
        return batch

    def _blocks_needed(self, req: Request, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size) - len(req.block_ids)

    def _grow(self, req: Request, n: int, batch: ScheduledBatch) -> bool:
        """Find blocks for n more tokens of a running request, preempting the newest if needed."""
        need = self._blocks_needed(req, req.num_computed_tokens + n)
        while not self.pool.can_allocate(need):
            victim = self.running.pop()  # the latest arrival loses its KV first
            self._preempt(victim)
            batch.preempted.append(victim)
            if victim is req:
                return False
        req.block_ids += self.pool.allocate(need)
        return True

    def _admit(self, req: Request, budget: int, batch: ScheduledBatch) -> bool:
        if self.pool.enable_prefix_caching and not req.block_ids and not req.wants_prompt_logprobs:
            # Reuse cached full blocks, but always compute at least the last token (for its
            # logits) unless the request only wants KV.
            hashes = hash_prompt_blocks(req.token_ids[: req.num_tokens - (not req.prefill_only)], self.block_size)
            hit = self.pool.match_prefix(hashes)
            self.pool.touch(hit)
            req.block_ids = list(hit)
            req.block_hashes = hashes[: len(hit)]
            req.num_computed_tokens = len(hit) * self.block_size
        n = min(req.num_tokens - req.num_computed_tokens, budget)
        need = self._blocks_needed(req, req.num_computed_tokens + n)
        if not self.pool.can_allocate(need):
            self._release(req)
            return False
        req.block_ids += self.pool.allocate(need)
        self.pool.record_lookup(req.num_tokens, req.num_computed_tokens)
        if req.num_cached_tokens == 0:
            req.num_cached_tokens = min(req.num_computed_tokens, req.num_prompt_tokens)
        req.status = Status.RUNNING
        if req.scheduled_time is None:
            req.scheduled_time = time.monotonic()
        self.running.append(req)
        batch.items.append((req, n))
        return True

    def _preempt(self, req: Request) -> None:
        self._release(req)
        req.status = Status.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def _release(self, req: Request) -> None:
        self.pool.free(req.block_ids)
        req.block_ids = []
        req.block_hashes = []
        req.num_computed_tokens = 0

    def hold(self, req: Request) -> None:
        """Take a request out of the batch but keep its blocks (a prefill-only request, done)."""
        if req in self.running:
            self.running.remove(req)

    def finish(self, req: Request, reason: str) -> None:
        """Take a request out (finished or aborted) and free every block it holds."""
        req.status = Status.FINISHED
        req.finish_reason = reason
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self._release(req)
