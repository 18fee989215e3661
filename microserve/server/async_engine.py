"""Runs the engine's step loop in a thread beside an asyncio server.

The HTTP side queues adds and aborts; the loop thread applies them between steps and
hands each step's outputs back to the waiting coroutines. torch releases the GIL
inside its kernels, so the event loop keeps serving while a step runs.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from microserve.engine.engine import LLMEngine
from microserve.engine.microserving import Conflict
from microserve.engine.request import RequestOutput
from microserve.errors import UserError
from microserve.sampling import SamplingParams


class QueueFull(Exception):
    """Too many requests waiting: the caller should answer 429."""


@dataclass
class _Stream:
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    arrival: float = field(default_factory=time.monotonic)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting: int = 256, observer=None):
        self.engine = engine
        self.max_waiting = max_waiting
        self.observer = observer  # gets on_output(request_id, output, arrival) in the loop thread
        self._lock = threading.Lock()
        self._wake = threading.Event()
        # Adds and aborts, applied in the order they came: an abort followed by a new
        # request under the same id (a router reusing it) must not end the new one.
        self._pending: list[tuple] = []  # ("add", id, prompt ids, params, resume) | ("abort", id, stream)
        self._num_adds = 0  # adds in _pending
        self._calls: list[tuple] = []  # (fn, loop, future): run in the loop thread between steps
        self._streams: dict[str, _Stream] = {}
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.error: BaseException | None = None
        self._watchers: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    def watch(self) -> asyncio.Event:
        """An event set (from the loop thread) after every step or applied add/abort: what a
        status stream waits on instead of polling. Drop it with `unwatch`."""
        event = asyncio.Event()
        with self._lock:
            self._watchers.add((asyncio.get_running_loop(), event))
        return event

    def unwatch(self, event: asyncio.Event) -> None:
        with self._lock:
            self._watchers = {w for w in self._watchers if w[1] is not event}

    def _changed(self) -> None:
        with self._lock:
            watchers = list(self._watchers)
        for loop, event in watchers:
            if not event.is_set():
                loop.call_soon_threadsafe(event.set)

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    @property
    def healthy(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 resume: tuple[list[int], int] | None = None) -> AsyncIterator[RequestOutput]:
        """Admit the request now (raising UserError or QueueFull), then iterate its outputs.

        Closing the iterator before the request finishes aborts it and frees its KV.
        """
        if self.error is not None:
            raise RuntimeError(f"the engine loop has stopped: {self.error}")
        self.engine.validate(prompt_ids, params)
        if resume is not None:
            self.engine.validate_resume(prompt_ids, params, resume[0])
        stream = _Stream(asyncio.Queue(), asyncio.get_running_loop())
        with self._lock:
            if len(self.engine.scheduler.waiting) + self._num_adds >= self.max_waiting:
                raise QueueFull(f"{self.max_waiting} requests are already waiting")
            if request_id in self._streams:
                raise UserError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = stream
            self._pending.append(("add", request_id, prompt_ids, params, resume))
            self._num_adds += 1
        self._wake.set()
        return self._outputs(request_id, stream)

    async def _outputs(self, request_id: str, stream: _Stream) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def call(self, fn):
        """Run `fn()` in the engine loop thread between steps; await its result."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            self._calls.append((fn, loop, future))
        self._wake.set()
        return future

    def abort(self, request_id: str) -> None:
        with self._lock:
            # The stream the abort is meant for: a newer one under the same id is not ended.
            self._pending.append(("abort", request_id, self._streams.get(request_id)))
        self._wake.set()

    # ------------------------------------------------------------ the loop thread

    def _run(self) -> None:
        try:
            while not self._stopped:
                if self._apply_pending():
                    self._changed()
                if not self.engine.has_unfinished_requests():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                self._deliver(self.engine.step())
                self._changed()
        except BaseException as e:  # the loop died: fail every waiting request, loudly
            self.error = e
            with self._lock:
                streams, self._streams = self._streams, {}
            for s in streams.values():
                s.loop.call_soon_threadsafe(s.queue.put_nowait, RuntimeError(f"engine loop failed: {e}"))
            raise

    def _apply_pending(self) -> bool:
        """Apply queued calls, adds and aborts; True if there were any."""
        with self._lock:
            pending, self._pending, self._num_adds = self._pending, [], 0
            calls, self._calls = self._calls, []
        for fn, loop, future in calls:
            try:
                result, error = fn(), None
            except Exception as e:
                result, error = None, e
            loop.call_soon_threadsafe(_settle, future, result, error)
        self.engine.microserving.expire()
        for kind, request_id, *args in pending:
            if kind == "add":
                try:
                    self.engine.add_request(request_id, *args)
                except UserError as e:
                    self._fail(request_id, e)
            else:
                self.engine.abort_request(request_id)
                # A consumer still waiting (aborted from elsewhere, e.g. by a router) must hear of it.
                if args[0] is not None:
                    self._fail(request_id, Conflict(f"request {request_id!r} was aborted"), only=args[0])
        return bool(pending or calls)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their streams: one wake-up per event loop, not per request."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue
                if out.finished:
                    del self._streams[out.request_id]
                by_loop.setdefault(stream.loop, []).append((stream, out))
        for loop, items in by_loop.items():
            if self.observer is not None:
                for stream, out in items:
                    self.observer.on_output(out, stream.arrival)
            loop.call_soon_threadsafe(_put_all, items)

    def _fail(self, request_id: str, error: BaseException, only: _Stream | None = None) -> None:
        """End `request_id`'s stream with `error` (if `only` is given: only if it is that stream)."""
        with self._lock:
            stream = self._streams.get(request_id)
            if stream is None or (only is not None and stream is not only):
                return
            del self._streams[request_id]
        stream.loop.call_soon_threadsafe(stream.queue.put_nowait, error)


def _put_all(items) -> None:
    for stream, out in items:
        stream.queue.put_nowait(out)


def _settle(future: asyncio.Future, result, error) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
