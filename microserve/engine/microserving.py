"""Sub-request state of one engine: reservations that wait for KV from a peer (prep_recv),
and prompts computed only to be sent (remote_send).

Pool and scheduler changes happen in the engine loop thread; the KV receiver's threads
only touch `Reservation` fields, under `lock`.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass

from microserve.engine.block_pool import hash_prompt_blocks
from microserve.errors import Conflict, NotFound, UserError


@dataclass
class Reservation:
    request_id: str
    prompt_ids: list[int]
    end: int
    matched: int  # prompt tokens already in the local prefix cache
    block_ids: list[int]  # block table for positions [0, end)
    token: str
    deadline: float
    valid_len: int  # KV of positions [0, valid_len) is in place and complete
    token_used: bool = False
    transferring: bool = False
    dropped: bool = False  # aborted or expired while a transfer was writing: free once it ends
    received: tuple[float, float] | None = None  # when the peer's KV came in (start, end; time.monotonic)


class Microserving:
    def __init__(self, engine):
        self.engine = engine
        self.lock = threading.Lock()
        self.reservations: dict[str, Reservation] = {}
        self.num_expired = 0

    # ------------------------------------------------------------ engine loop thread

    def prep_recv(self, request_id: str, prompt_ids: list[int], end: int, lease_s: float) -> dict:
        eng = self.engine
        n = len(prompt_ids)
        if end < 0:
            end += n
        if not 0 < end < n:
            raise UserError(f"end must satisfy 0 < end < prompt length ({n}), got {end}")
        if lease_s <= 0:
            raise UserError("lease_s must be positive")
        if request_id in self.reservations or request_id in eng.groups:
            raise Conflict(f"request id {request_id!r} is already in use")
        eng.validate(prompt_ids, _one_token())
        pool, bs = eng.pool, eng.pool.block_size
        hit = pool.match_prefix(hash_prompt_blocks(prompt_ids[:end], bs))
        pool.touch(hit)
        need = -(-end // bs) - len(hit)
        if not pool.can_allocate(need):
            pool.free(hit)
            raise Conflict(f"not enough free KV blocks: need {need}, {pool.num_free_blocks} free")
        blocks = hit + pool.allocate(need)
        matched = len(hit) * bs
        pool.record_lookup(end, matched)
        r = Reservation(request_id, list(prompt_ids), end, matched, blocks, secrets.token_hex(16),
                        time.monotonic() + lease_s, valid_len=matched)
        with self.lock:
            self.reservations[request_id] = r
        return {"block_ids": blocks[matched // bs :], "begin": matched, "end": end, "offset": 0,
                "token": r.token, "prefix_matched_length": matched, "prompt_length": n}

    def take(self, request_id: str, prompt_ids: list[int]) -> Reservation | None:
        """Hand a reservation to start_generate (None when there is none)."""
        with self.lock:
            r = self.reservations.get(request_id)
            if r is None:
                return None
            if r.transferring:
                raise Conflict(f"request {request_id!r} is still receiving KV")
            if r.prompt_ids[: r.end] != list(prompt_ids[: r.end]):
                raise UserError(f"request {request_id!r}: the prompt differs from the one given to prep_recv")
            del self.reservations[request_id]
        return r

    def abort(self, request_id: str) -> bool:
        with self.lock:
            r = self.reservations.get(request_id)
            if r is None:
                return False
            if r.transferring:
                r.dropped = True  # freed when the transfer ends
                return True
            del self.reservations[request_id]
        self.engine.pool.free(r.block_ids)
        return True

    def expire(self) -> None:
        """Free reservations whose lease ran out (and dropped ones whose transfer ended)."""
        now = time.monotonic()
        freed = []
        with self.lock:
            for rid, r in list(self.reservations.items()):
                if r.transferring:
                    continue
                if r.dropped or now > r.deadline:
                    del self.reservations[rid]
                    freed.append(r)
        for r in freed:
            self.num_expired += not r.dropped
            self.engine.pool.free(r.block_ids)

    # ------------------------------------------------------------ KV receiver threads

    def open_transfer(self, request_id: str, token: str, begin: int, end: int) -> list[int]:
        """Check a sender's header; return the cache slots for positions [begin, end)."""
        with self.lock:
            r = self.reservations.get(request_id)
            if r is None or r.dropped:
                raise NotFound(f"no reservation for request {request_id!r} (unknown, aborted or expired)")
            if r.token_used or not secrets.compare_digest(str(token), r.token):
                raise UserError(f"wrong or reused token for request {request_id!r}")
            if time.monotonic() > r.deadline:
                raise UserError(f"the lease of request {request_id!r} has expired")
            if not (begin <= r.valid_len and end <= r.end and begin <= end):
                raise UserError(f"positions [{begin}, {end}) do not fit the reservation "
                                f"(valid up to {r.valid_len}, reserved to {r.end})")
            r.token_used = True
            r.transferring = True
            r.received = (time.monotonic(), 0.0)
            bs = self.engine.pool.block_size
            return [r.block_ids[p // bs] * bs + p % bs for p in range(begin, end)]

    def close_transfer(self, request_id: str, end: int, ok: bool) -> None:
        with self.lock:
            r = self.reservations.get(request_id)
            if r is None:
                return
            r.transferring = False
            if ok and not r.dropped:
                r.valid_len = max(r.valid_len, end)
            started = r.received[0] if r.received else None
            r.received = (started, time.monotonic()) if ok and started is not None else None

    def stats(self) -> dict:
        with self.lock:
            return {"reservations": len(self.reservations), "expired_leases": self.num_expired}


def _one_token():
    from microserve.sampling import SamplingParams

    return SamplingParams(max_tokens=1)
