"""Paged KV blocks: allocation, reference counts, and the prefix cache with LRU eviction."""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque


def hash_block(parent: bytes | None, token_ids) -> bytes:
    """Chained hash of one full block: the same bytes in every process and on every machine."""
    h = hashlib.sha256(parent or b"\0" * 16)
    h.update(struct.pack(f"<{len(token_ids)}i", *token_ids))  # little-endian int32s
    return h.digest()[:16]


def hash_prompt_blocks(token_ids, block_size: int, parent: bytes | None = None) -> list[bytes]:
    """Hashes of every full block of `token_ids`, in order."""
    hashes = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes


MAX_EVENTS = 65536


class BlockPool:
    """Owns every KV block. A block is in use (ref > 0) or free; a free block may still hold
    a cached prefix (it has a hash) and is reused for it until evicted, oldest first."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> block id
        self.free_queue: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.hit_tokens = 0
        self.queried_tokens = 0
        # Recent prefix-cache changes, numbered, for routers that follow them (bounded:
        # a listener that falls behind re-reads the full list of hashes).
        self.events: deque[tuple[int, str, bytes]] = deque(maxlen=MAX_EVENTS)
        self.num_events = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self.free_queue)

    def allocate(self, n: int) -> list[int]:
        if not self.can_allocate(n):
            raise RuntimeError(f"asked for {n} KV blocks, {len(self.free_queue)} free")
        blocks = []
        for _ in range(n):
            block, _ = self.free_queue.popitem(last=False)  # least recently used first
            self._evict(block)
            self.ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: list[int]) -> None:
        # Release a sequence's tail first so that, under pressure, its deepest blocks
        # (least likely to be shared) are evicted before its head.
        for block in reversed(blocks):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, f"block {block} freed twice"
            if self.ref_counts[block] == 0:
                if self.block_hash[block] is None:
                    self.free_queue[block] = None
                    self.free_queue.move_to_end(block, last=False)  # empty blocks go first
                else:
                    self.free_queue[block] = None

    def match_prefix(self, hashes: list[bytes]) -> list[int]:
        """Blocks holding the longest cached run of `hashes` (not yet referenced)."""
        if not self.enable_prefix_caching:
            return []
        blocks = []
        for h in hashes:
            block = self.cached.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def touch(self, blocks: list[int]) -> None:
        """Take a reference on cached blocks a new sequence reuses."""
        for block in blocks:
            if self.ref_counts[block] == 0:
                del self.free_queue[block]
            self.ref_counts[block] += 1

    def record_lookup(self, queried: int, hit: int) -> None:
        self.queried_tokens += queried
        self.hit_tokens += hit

    def cache_block(self, block: int, h: bytes) -> None:
        """Register a full, computed block under its hash so later prompts can reuse it."""
        if not self.enable_prefix_caching or self.block_hash[block] is not None:
            return
        if h in self.cached:  # the same content already cached in another block
            return
        self.block_hash[block] = h
        self.cached[h] = block
        self._event("stored", h)

    def _evict(self, block: int) -> None:
        h = self.block_hash[block]
        if h is not None:
            self.block_hash[block] = None
            if self.cached.get(h) == block:
                del self.cached[h]
                self._event("removed", h)

    def _event(self, kind: str, h: bytes) -> None:
        self.events.append((self.num_events, kind, h))
        self.num_events += 1

    def events_since(self, seq: int) -> tuple[list[tuple[int, str, bytes]], bool]:
        """Events numbered >= seq, and whether some of those were already dropped."""
        events = list(self.events)
        dropped = bool(events) and seq < events[0][0] or (not events and seq < self.num_events)
        return [e for e in events if e[0] >= seq], dropped

    def stats(self) -> dict:
        return {
            "num_blocks": self.num_blocks,
            "free_blocks": self.num_free_blocks,
            "cached_blocks": len(self.cached),
            "prefix_queried_tokens": self.queried_tokens,
            "prefix_hit_tokens": self.hit_tokens,
            "prefix_hit_rate": self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0,
        }
