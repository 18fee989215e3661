"""Async output streams: run several to their end, or interleave them as they produce."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TypeVar

from microserve.api.render import Delta

T = TypeVar("T")


@dataclass
class ChatRun:
    """A chat request a front has started: its id, its prompt's length, its output as it comes."""

    request_id: str
    prompt_tokens: int
    deltas: AsyncIterator[Delta]


async def last(stream: AsyncIterator[T]) -> T | None:
    """The final item of `stream` (engine outputs are cumulative: the last one has everything)."""
    item = None
    async for item in stream:
        pass
    return item


async def run_all(streams: list[AsyncIterator[T]]) -> list[T | None]:
    """Every stream run to its final item, concurrently."""
    return list(await asyncio.gather(*(last(s) for s in streams)))


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several streams as they produce, as (stream index, item); closing this closes them all."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i, stream):
        try:
            async for item in stream:
                await queue.put((i, item))
            await queue.put((i, done))
        except Exception as e:
            await queue.put((i, e))
        finally:
            await stream.aclose()

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
                continue
            if isinstance(item, Exception):
                raise item
            yield i, item
    finally:
        for t in tasks:
            t.cancel()
