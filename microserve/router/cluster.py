"""The router's view of its engines: the five sub-request calls, live status, prefix index."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing

import httpx

from microserve.api.microserving import EngineStatus, GenerateChunk
from microserve.router.engine_client import Answer, Broken, EngineClient, Unreachable
from microserve.engine.block_pool import hash_prompt_blocks
from microserve.router import traces

log = logging.getLogger("microserve.router")


class EngineError(Exception):
    """An engine answered with an error (status and OpenAI-style body kept)."""

    def __init__(self, status: int, body: dict, retry_after: str | None = None, engine: "Engine | None" = None):
        self.status = status
        self.body = body
        self.retry_after = retry_after
        self.engine = engine
        super().__init__(body.get("error", {}).get("message", str(body)))


class EngineDown(Exception):
    """An engine could not be reached, or its stream broke off: it is taken out of rotation
    until a status refresh succeeds again."""

    def __init__(self, engine: "Engine | None", reason: str, reached: bool = True):
        self.engine = engine  # None: no engine was up to try
        self.reached = reached  # False: the request never got to the engine (the connection was refused)
        super().__init__(f"engine {engine.url} is unreachable: {reason}" if engine else reason)


class Engine:
    """One engine, as a strategy sees it."""

    def __init__(self, url: str, role: str = "both", token: str | None = None, index: "PrefixIndex | None" = None):
        self.url = url.rstrip("/")
        self.role = role  # "both" | "prefill" | "decode"
        self.status = EngineStatus(healthy=False)
        self.healthy = False
        self.block_size = 16
        self.cached: set[bytes] = set()  # block hashes in the engine's prefix cache
        self.index = index  # the cluster-wide map of which engine holds which block
        self._next_event = 0
        self._instance = None  # the engine process we indexed; a restart empties its cache
        self.inflight = 0  # requests this router has on the engine right now (exact, unlike status)
        self.prefilling = 0  # of those, sent to prefill and not yet answered with a first chunk
        self.calls = 0  # sub-request calls of this router under way on the engine (a drain waits for 0)
        self.draining = False  # takes no new requests; removed once idle
        self.node: str | None = None  # where it runs, when a launcher (Ray) says so
        self.messages = 0  # status and event messages received (to measure what following costs)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(600, connect=5), headers=headers,
                                         # kept below the engines' KEEP_ALIVE_S, so the engine never closes one being reused
                                         limits=httpx.Limits(max_connections=None, max_keepalive_connections=64,
                                                             keepalive_expiry=60))
        self._calls = EngineClient(self.url, headers)  # the sub-request calls (the hot path)

    def __repr__(self) -> str:
        return f"Engine({self.url}, {self.role})"

    @property
    def load(self) -> int:
        return max(self.inflight, self.status.running + self.status.waiting)

    @property
    def kv_free(self) -> float:
        return self.status.free_blocks / self.status.num_blocks if self.status.num_blocks else 1.0

    def cached_tokens(self, prompt: list[int]) -> int:
        """Leading tokens of `prompt` this engine holds, from the router's prefix index
        (for one engine; `Cluster.cached_tokens` answers for all of them at once)."""
        n = 0
        for h in hash_prompt_blocks(prompt, self.block_size):
            if h not in self.cached:
                break
            n += 1
        return n * self.block_size

    # ------------------------------------------------------------ the five calls

    def _down(self, e: Exception) -> EngineDown:
        self.healthy = False
        reached = not isinstance(e, (httpx.ConnectError, Unreachable))
        return EngineDown(self, f"{type(e).__name__}: {e}", reached=reached)

    async def _post(self, path: str, body: dict) -> dict:
        call = traces.call(body["request_id"], path.rsplit("/", 1)[-1], self.url, self.role)
        self.calls += 1
        try:
            answer = await self._calls.post(path, body, headers=call.headers)
            self._raise_unless_ok(answer)
            call.end()
            return answer.body
        except Broken as e:
            call.end(e)
            raise self._down(e) from None
        except EngineError as e:
            call.end(e)
            raise
        finally:
            self.calls -= 1

    async def prep_recv(self, request_id: str, prompt: list[int], end: int, lease_s: float = 60) -> dict:
        return await self._post("/microserving/prep_recv",
                                {"request_id": request_id, "prompt": prompt, "end": end, "lease_s": lease_s})

    async def remote_send(self, request_id: str, prompt: list[int], begin: int, end: int, kv_addr_info: dict) -> dict:
        return await self._post("/microserving/remote_send", {"request_id": request_id, "prompt": prompt,
                                                              "begin": begin, "end": end, "kv_addr_info": kv_addr_info})

    async def start_generate(self, request_id: str, prompt: list[int], begin: int,
                             sampling: dict) -> AsyncIterator[GenerateChunk]:
        """Stream the engine's chunks (each choice a Delta: text, token ids, logprobs)."""
        body = {**sampling, "request_id": request_id, "prompt": prompt, "begin": begin, "stream": True}
        call = traces.call(request_id, "start_generate", self.url, self.role)
        error: BaseException | None = None
        self.inflight += 1
        self.calls += 1
        try:
            lines = self._calls.stream_lines("/microserving/start_generate", body, call.headers, self._raise_unless_ok)
            async with aclosing(lines):
                async for line in lines:
                    if line == "data: [DONE]":
                        return
                    if line.startswith("data: "):
                        chunk = GenerateChunk.parse(line[6:])
                        if isinstance(chunk, dict):  # the engine failed this request after its stream began
                            raise EngineError(int(chunk["error"].get("code") or 500), chunk, engine=self)
                        yield chunk
            raise EngineDown(self, "the stream ended before [DONE]")
        except Broken as e:
            error = e
            raise self._down(e) from None
        except (EngineError, EngineDown) as e:
            error = e
            raise
        finally:
            call.end(error)
            self.inflight -= 1
            self.calls -= 1

    async def abort(self, request_id: str) -> None:
        try:
            await self._post("/microserving/abort", {"request_id": request_id})
        except (EngineError, EngineDown):
            pass

    def _raise_unless_ok(self, answer: Answer) -> None:
        if answer.status != 200:
            body = answer.body if isinstance(answer.body, dict) else \
                {"error": {"message": str(answer.body)[:500], "type": "engine_error"}}
            raise EngineError(answer.status, body, answer.retry_after, self)

    # ------------------------------------------------------------ live state

    def _apply(self, body: dict, events: list, next_event: int, hashes: list[str] | None = None) -> None:
        """Take in the engine's status and the prefix-cache changes since the last message."""
        self.messages += 1
        self.status = status = EngineStatus.from_wire(body)
        self.block_size = status.block_size or self.block_size
        if status.instance != self._instance:  # a new process: its cache starts empty
            self._instance = status.instance
            self._set_cached(set())
            self._next_event = 0
        if hashes is not None:
            self._set_cached({bytes.fromhex(h) for h in hashes})
        for _, kind, h in events:
            h = bytes.fromhex(h)
            if kind == "stored":
                self.cached.add(h)
                if self.index is not None:
                    self.index.add(h, self)
            else:
                self.cached.discard(h)
                if self.index is not None:
                    self.index.discard(h, self)
        self._next_event = next_event
        self.healthy = status.healthy

    def _set_cached(self, hashes: set[bytes]) -> None:
        if self.index is not None:
            for h in self.cached - hashes:
                self.index.discard(h, self)
            for h in hashes - self.cached:
                self.index.add(h, self)
        self.cached = hashes

    def describe(self) -> dict:
        """What GET /admin/engines shows for this engine."""
        s = self.status
        return {"url": self.url, "role": self.role, "node": self.node, "healthy": self.healthy,
                "draining": self.draining, "load": self.load, "running": s.running, "waiting": s.waiting,
                "reservations": s.reservations,
                "kv_used": round(1 - s.free_blocks / s.num_blocks, 4) if s.num_blocks else None}

    def idle(self, status: EngineStatus) -> bool:
        """Nothing of anyone's left on the engine: no call of this router under way, nothing
        running or queued, no reservation (a prep_recv waiting for its KV and start_generate)."""
        return self.calls == 0 and not (status.running or status.waiting or status.reservations)

    async def fetch_status(self) -> EngineStatus | None:
        """The engine's status now (not the streamed one, which may be up to a tick old); None if unreachable."""
        try:
            body = (await self._client.get("/microserving/status", timeout=5)).raise_for_status().json()
            return EngineStatus.from_wire(body)
        except (httpx.HTTPError, ValueError):
            return None

    async def refresh(self) -> None:
        """One poll of status and prefix-cache events (`watch` keeps them current without polling)."""
        try:
            status = (await self._client.get("/microserving/status", timeout=5)).raise_for_status().json()
            since = self._next_event if status.get("instance") == self._instance else 0
            r = (await self._client.get("/microserving/kv_events", params={"since": since}, timeout=5)).json()
            hashes = None
            if r["dropped"]:  # fell behind: take the full list
                hashes = (await self._client.get("/microserving/prefix_hashes", timeout=5)).json()["hashes"]
            self._apply(status, [] if hashes is not None else r["events"], r["next"], hashes)
        except (httpx.HTTPError, ValueError, KeyError):
            self.healthy = False

    async def watch(self, heartbeat_s: float = 5.0) -> None:
        """Follow the engine's status stream until cancelled: one long-lived request per engine,
        messages only when something changed (or a heartbeat). A stream that breaks, or stays
        silent past three heartbeats, marks the engine down until it can be reached again."""
        backoff = 0.1
        while True:
            try:
                timeout = httpx.Timeout(5, read=3 * heartbeat_s)
                async with self._client.stream("GET", "/microserving/watch", timeout=timeout,
                                               params={"since": self._next_event, "heartbeat_s": heartbeat_s}) as r:
                    r.raise_for_status()
                    async for line in r.aiter_lines():
                        if line:
                            m = json.loads(line)
                            self._apply(m["status"], m["events"], m["next"], m.get("hashes"))
                            backoff = 0.1
            except (httpx.HTTPError, ValueError, KeyError) as e:
                log.debug("status stream of %s broke: %s", self.url, e)
            self.healthy = False
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, 2.0)

    async def close(self) -> None:
        await self._client.aclose()
        await self._calls.close()


class PrefixIndex:
    """Block hash -> the engines holding that block: one walk over a prompt's hashes tells how
    much of it every engine has cached, however many engines there are."""

    def __init__(self):
        self.holders: dict[bytes, set[Engine]] = {}

    def add(self, h: bytes, engine: Engine) -> None:
        self.holders.setdefault(h, set()).add(engine)

    def discard(self, h: bytes, engine: Engine) -> None:
        engines = self.holders.get(h)
        if engines is not None:
            engines.discard(engine)
            if not engines:
                del self.holders[h]

    def matched_blocks(self, hashes: list[bytes]) -> dict[Engine, int]:
        """Leading blocks of `hashes` each engine holds (engines holding none are left out)."""
        matched: dict[Engine, int] = {}
        for i, h in enumerate(hashes):
            grew = False
            for e in self.holders.get(h, ()):
                if matched.get(e, 0) == i:
                    matched[e] = i + 1
                    grew = True
            if not grew:  # no engine holds blocks 0..i: none can match further
                break
        return matched


class Cluster:
    """The engines a strategy may use; each one's status and prefix-cache changes stream in."""

    def __init__(self, urls: list[str], roles: list[str] | None = None, refresh_s: float = 0.25,
                 token: str | None = None):
        roles = roles or ["both"] * len(urls)
        self.index = PrefixIndex()
        self.token = token
        self.engines = [Engine(u, r, token, self.index) for u, r in zip(urls, roles)]
        self.draining: list[Engine] = []  # out of rotation, finishing what they hold
        self.refresh_s = refresh_s  # how often a waiting caller looks again (fail-over)
        self._rr = 0
        self._tasks: dict[Engine, asyncio.Task] = {}  # each engine's status stream
        self._started = False

    def set_roles(self, roles: list[str]) -> None:
        if len(roles) != len(self.engines) or not set(roles) <= {"both", "prefill", "decode"}:
            raise ValueError(f"roles must name one of both/prefill/decode per engine ({len(self.engines)})")
        for e, r in zip(self.engines, roles):
            e.role = r

    @property
    def healthy(self) -> list[Engine]:
        return [e for e in self.engines if e.healthy] or list(self.engines)

    @property
    def up(self) -> list[Engine]:
        """Engines whose status stream is live (may be empty, unlike `healthy`)."""
        return [e for e in self.engines if e.healthy]

    def with_role(self, role: str) -> list[Engine]:
        """Healthy engines that take `role` ("both" counts for either); all healthy ones if none do."""
        return [e for e in self.healthy if e.role in (role, "both")] or self.healthy

    def next_round_robin(self, engines: list[Engine] | None = None) -> Engine:
        engines = engines or self.healthy
        self._rr += 1
        return engines[self._rr % len(engines)]

    @staticmethod
    def least_loaded(engines: list[Engine]) -> Engine:
        return min(engines, key=lambda e: (e.load, -e.kv_free))

    def cached_tokens(self, prompt: list[int]) -> dict[Engine, int]:
        """Leading tokens of `prompt` each engine holds in its prefix cache (0 for most): the
        prompt is hashed once per block size, not once per engine."""
        found: dict[Engine, int] = dict.fromkeys(self.engines, 0)
        for bs in {e.block_size for e in self.engines}:
            for e, blocks in self.index.matched_blocks(hash_prompt_blocks(prompt, bs)).items():
                if e.block_size == bs:
                    found[e] = blocks * bs
        return found

    async def refresh(self) -> None:
        await asyncio.gather(*(e.refresh() for e in self.engines))

    async def start(self) -> None:
        await self.refresh()
        self._tasks = {e: asyncio.create_task(e.watch()) for e in self.engines}
        self._started = True

    async def stop(self) -> None:
        for t in self._tasks.values():
            t.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        await asyncio.gather(*(e.close() for e in self.engines + self.draining))
        self._tasks = {}

    # ------------------------------------------------------------ membership at run time
    # Strategies read `self.engines` on every request, so they see a change on their next one.

    def find(self, url: str) -> Engine | None:
        url = url.rstrip("/")
        return next((e for e in self.engines + self.draining if e.url == url), None)

    async def add(self, url: str, role: str = "both", node: str | None = None) -> Engine:
        """Take an engine into rotation once its status has been read."""
        if role not in ("both", "prefill", "decode"):
            raise ValueError("role must be one of both, prefill, decode")
        if self.find(url) is not None:
            raise ValueError(f"{url} is already a member")
        engine = Engine(url, role, self.token, self.index)
        engine.node = node
        await engine.refresh()
        if self._started:
            self._tasks[engine] = asyncio.create_task(engine.watch())
        self.engines.append(engine)
        return engine

    async def drain(self, engine: Engine, timeout_s: float | None = None) -> bool:
        """Stop giving `engine` new requests, wait until nothing is left on it (the requests it
        runs have finished, no reservation waits for KV), then remove it. True if it went idle,
        False if `timeout_s` ran out first (it is removed anyway). An engine that cannot be
        reached holds nothing worth waiting for: requests on it continue elsewhere (fail-over)."""
        if engine in self.engines:
            self.engines.remove(engine)
            self.draining.append(engine)
        engine.draining = True
        deadline = None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s
        idle = False
        while not idle:
            # Read the engine's own counts after this router's calls are done: a reservation made
            # by a prep_recv that already returned shows there, one still under way shows in calls.
            status = await engine.fetch_status() if engine.calls == 0 else None
            idle = engine.calls == 0 and (status is None or engine.idle(status))
            if not idle:
                if deadline is not None and asyncio.get_running_loop().time() > deadline:
                    break
                await asyncio.sleep(self.refresh_s)
        await self.remove(engine)
        return idle

    async def follow(self, primary_url: str, every_s: float = 1.0) -> None:
        """Mirror another router's membership (GET /admin/engines) until cancelled: a replica
        then sees the engines a fleet starts, drains and replaces through the primary."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        async with httpx.AsyncClient(base_url=primary_url.rstrip("/"), headers=headers, timeout=5) as client:
            while True:
                try:
                    listed = (await client.get("/admin/engines")).raise_for_status().json()["engines"]
                except (httpx.HTTPError, ValueError, KeyError) as e:
                    log.debug("cannot read the members of %s: %s", primary_url, e)
                    listed = None  # keep what we have: the primary may be restarting
                if listed is not None:
                    await self._mirror(listed)
                await asyncio.sleep(every_s)

    async def _mirror(self, listed: list[dict]) -> None:
        wanted = {m["url"].rstrip("/"): m for m in listed}
        for engine in list(self.engines + self.draining):
            m = wanted.get(engine.url)
            if m is None or m["draining"]:  # leaving the primary: no new requests here either
                if engine in self.engines:
                    self.engines.remove(engine)
                    self.draining.append(engine)
                    engine.draining = True
                if m is None and engine.calls == 0:  # gone, and nothing of ours on it: out
                    await self.remove(engine)
            elif engine.role != m["role"]:
                engine.role = m["role"]
        for url, m in wanted.items():
            if self.find(url) is None and not m["draining"]:
                try:
                    await self.add(url, m["role"], m.get("node"))
                except ValueError as e:
                    log.warning("cannot follow engine %s: %s", url, e)

    async def remove(self, engine: Engine) -> None:
        """Out of the cluster now; calls under way on it fail over to other engines."""
        for group in (self.engines, self.draining):
            if engine in group:
                group.remove(engine)
        task = self._tasks.pop(engine, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        engine._set_cached(set())  # out of the prefix index
        engine.healthy = False
        await engine.close()

