"""The router: membership, the current strategy, dispatch with admission and fail-over, and
replicas that follow another router's engines. Its HTTP front is router/app.py."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from microserve.api.ids import new_id
from microserve.api.microserving import GenerateChunk
from microserve.errors import Conflict, NotFound, UserError
from microserve.router import strategies
from microserve.router.cluster import Cluster, Engine, EngineDown
from microserve.router.failover import Admission, with_failover
from microserve.router.fleet import Fleet
from microserve.router.live import LiveSnapshot, LiveView, RequestTimer, RouterState
from microserve.router.metrics import RouterMetrics
from microserve.router import traces


@dataclass(frozen=True)
class Strategy:
    """A strategy in use: replaced as a whole, so each request keeps the one it started with."""

    name: str
    fn: object  # async generator function (request, cluster, **params)
    params: dict = field(default_factory=dict)

    @classmethod
    def resolve(cls, name: str | None, source: str | None = None, params: dict | None = None) -> "Strategy":
        """A built-in name, a .py path, or source text; unknown parameter names are refused now,
        not on every request later."""
        params = params or {}
        if source:
            fn = strategies.load_strategy_source(source)
            name = name or getattr(fn, "__name__", "custom")
        elif not name:
            raise ValueError("give a strategy `name` or its `source`")
        elif name in strategies.BUILTIN:
            fn = strategies.BUILTIN[name]
        elif name.endswith(".py"):
            fn = strategies.load_strategy_file(name)
        else:
            raise ValueError(f"unknown strategy {name!r} (built in: {', '.join(strategies.BUILTIN)})")
        try:
            inspect.signature(fn).bind(None, None, **params)
        except TypeError as e:
            raise ValueError(f"parameters {sorted(params)} do not fit {name}: {e}") from None
        return cls(name, fn, params)


@dataclass
class Routed:
    """A request under way: its first chunk (None if it produced none) and the rest. Closing it
    aborts what is left on the engines."""

    first: GenerateChunk | None
    rest: AsyncIterator[GenerateChunk]

    async def chunks(self) -> AsyncIterator[GenerateChunk]:
        if self.first is not None:
            yield self.first
        async for c in self.rest:
            yield c

    async def aclose(self) -> None:
        await self.rest.aclose()


class Router:
    """`fleet`, when given, starts and stops engines (e.g. Ray actors): it backs `scale` and is
    started and stopped with the router. `follow`, the URL of another router, makes this one a
    replica that mirrors that router's engines."""

    def __init__(self, cluster: Cluster, strategy: str = "round_robin", params: dict | None = None,
                 max_active: int | None = None, max_queued: int = 4096, failover_wait_s: float = 30.0,
                 fleet: Fleet | None = None, follow: str | None = None):
        self.cluster = cluster
        self.fleet = fleet
        self.follow_url = follow
        self.failover_wait_s = failover_wait_s
        self.metrics = RouterMetrics(cluster)
        # Enough in flight to fill every engine's batch and queue; the rest waits here, bounded.
        engines_at_start = max(len(cluster.engines), getattr(fleet, "initial_size", 0), 1)
        self.admission = Admission(max_active or 256 * engines_at_start, max_queued)
        self.strategy = Strategy.resolve(strategy, None, params)
        self._following: asyncio.Task | None = None
        self.live = LiveView(cluster)  # what the dashboard shows
        self._tracking: asyncio.Task | None = None

    async def start(self) -> None:
        await self.cluster.start()
        if self.fleet is not None:
            await self.fleet.start(self.cluster)
        if self.follow_url:
            self._following = asyncio.create_task(self.cluster.follow(self.follow_url))
        self._tracking = asyncio.create_task(self.live.run())

    async def stop(self) -> None:
        for task in (self._following, self._tracking):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self.fleet is not None:
            await self.fleet.stop()
        await self.cluster.stop()

    # ------------------------------------------------------------ dispatch

    async def route(self, prompt_ids: list[int], sampling: dict) -> Routed:
        """Start the request on the current strategy, behind admission and fail-over; errors
        before its first chunk are raised here (so they become HTTP errors)."""
        strategy = self.strategy
        self.metrics.requests.labels(strategy=strategy.name).inc()
        req = strategies.RoutedRequest(new_id("r"), prompt_ids, sampling)
        start = time.monotonic()
        await self.admission.acquire()
        span = traces.begin(req.request_id, strategy.name, len(prompt_ids), start)
        chunks = with_failover(strategy.fn(req, self.cluster, **strategy.params), req, self.cluster,
                               wait_s=self.failover_wait_s, on_failover=self._failed_over)
        rest = self._admitted(chunks, start)
        if span.is_recording():  # the request's span ends with its stream
            rest = traces.follow(rest, req.request_id)
        rest = rest.__aiter__()
        try:
            first = await rest.__anext__()
        except StopAsyncIteration:
            first = None
        except Exception:
            self.metrics.failures.inc()
            await rest.aclose()
            raise
        self.metrics.ttft.observe(time.monotonic() - start)
        return Routed(first, rest)

    async def score_prompt(self, prompt_ids: list[int], top: int) -> list:
        """The prompt tokens' logprobs (echo with logprobs), from one engine that computes the
        whole prompt (a split request's decode engine never sees the first part's logits)."""
        sampling = {"max_tokens": 1, "temperature": 0, "prompt_logprobs": top}
        last: Exception | None = None
        for engine in sorted(self.cluster.healthy, key=lambda e: e.load):
            try:
                async for chunk in engine.start_generate(new_id("score"), prompt_ids, 0, sampling):
                    for choice in chunk.choices:
                        if choice.prompt_logprobs is not None:
                            return choice.prompt_logprobs
            except EngineDown as e:
                last = e
        raise last or EngineDown(None, "no engine is up")

    async def _admitted(self, chunks: AsyncIterator[GenerateChunk], start: float) -> AsyncIterator[GenerateChunk]:
        """Hold an admission slot until the stream ends or is closed; a stream that ends is
        timed for the live view (TTFT, TPOT, JCT from `start`)."""
        timer = RequestTimer(start)
        try:
            async for c in chunks:
                timer.chunk(c)
                yield c
        finally:
            self.admission.release()
        timing = timer.finish()
        if timing is not None:
            self.live.observe(timing)

    def _failed_over(self, request_id: str, error: Exception, target: Engine) -> None:
        self.metrics.failovers.inc()
        traces.failover(request_id, error, target.url)
        failed = getattr(error, "engine", None)
        self.live.failover(request_id, failed.url if failed is not None else None, target.url)

    def live_snapshot(self, page: int = 1, per_page: int = 50, query: str = "") -> LiveSnapshot:
        """What GET /admin/live (the dashboard) shows."""
        state = RouterState(self.strategy.name, self.strategy.params, list(strategies.BUILTIN),
                            self.admission.active, self.admission.queued)
        return self.live.snapshot(state, page, per_page, query)

    # ------------------------------------------------------------ strategy

    def describe_strategy(self) -> dict:
        s = self.strategy
        return {"name": s.name, "params": s.params, "roles": [e.role for e in self.cluster.engines]}

    def set_strategy(self, name: str | None, source: str | None, params: dict, roles: list[str] | None) -> dict:
        """Switch strategy (and engine roles): requests already running keep the one they started with."""
        try:
            new = Strategy.resolve(name, source, params)
            if roles is not None:
                self.cluster.set_roles(roles)
        except (ValueError, SyntaxError, TypeError) as e:
            raise UserError(f"cannot use this strategy: {e}") from None
        if new.name != self.strategy.name or new.params != self.strategy.params:
            self.live.event("strategy", f"strategy {self.strategy.name} -> {new.name}"
                            + (f" {new.params}" if new.params else ""))
        self.strategy = new
        return self.describe_strategy()

    # ------------------------------------------------------------ membership

    def health(self) -> dict:
        up = sum(e.healthy for e in self.cluster.engines)
        return {"status": "ok" if up else "error", "engines_up": up, "engines": len(self.cluster.engines)}

    @property
    def max_model_len(self) -> int | None:
        """The context window every engine up can serve (None until one has answered its status)."""
        lens = [e.status.max_model_len for e in self.cluster.healthy if e.status.max_model_len]
        return min(lens) if lens else None

    def describe_engines(self) -> list[dict]:
        return [e.describe() for e in self.cluster.engines + self.cluster.draining]

    async def add_engine(self, url: str, role: str) -> dict:
        try:
            engine = await self.cluster.add(url, role)
        except ValueError as e:
            raise UserError(str(e)) from None
        if not engine.healthy:
            await self.cluster.remove(engine)
            raise UserError(f"engine {url} did not answer its status")
        return engine.describe()

    async def retire_engine(self, url: str, drain: bool, timeout_s: float | None = None) -> dict:
        """drain: no new requests, returns once what it holds has finished and it is removed;
        otherwise out now (its requests continue elsewhere). A fleet's engine is stopped too."""
        engine = self._find(url)
        if self.fleet is not None and self.fleet.owns(engine):
            idle = await self.fleet.retire(engine, drain=drain, timeout_s=timeout_s)
        elif drain:
            idle = await self.cluster.drain(engine, timeout_s)
        else:
            await self.cluster.remove(engine)
            idle = None
        return {**engine.describe(), "drained": idle}

    async def scale(self, role: str, count: int) -> dict:
        """Start or drain a fleet's engines until `role` has `count` of them (raises FleetError)."""
        if self.fleet is None:
            raise Conflict("this router does not start engines (serve --ray does): add or drain them "
                           "through POST /admin/engines")
        started, drained = await self.fleet.scale(role, count)
        return {"role": role, "engines": [e.describe() for e in self.cluster.engines if e.role == role],
                "started": [e.url for e in started], "drained": [e.url for e in drained]}

    def _find(self, url: str) -> Engine:
        engine = self.cluster.find(url)
        if engine is None:
            raise NotFound(f"no engine {url} in this router")
        return engine
