"""The router's view of its engines: the five sub-request calls, live status, prefix index."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import httpx

from microserve.engine.block_pool import hash_prompt_blocks

log = logging.getLogger("microserve.router")


class EngineError(Exception):
    """An engine answered with an error (status and OpenAI-style body kept)."""

    def __init__(self, status: int, body: dict, retry_after: str | None = None):
        self.status = status
        self.body = body
        self.retry_after = retry_after
        super().__init__(body.get("error", {}).get("message", str(body)))


class EngineDown(Exception):
    """An engine could not be reached, or its stream broke off: it is taken out of rotation
    until a status refresh succeeds again."""

    def __init__(self, engine: "Engine", reason: str):
        self.engine = engine
        super().__init__(f"engine {engine.url} is unreachable: {reason}")


class Engine:
    """One engine, as a strategy sees it."""

    def __init__(self, url: str, role: str = "both", token: str | None = None):
        self.url = url.rstrip("/")
        self.role = role  # "both" | "prefill" | "decode"
        self.status: dict = {}
        self.healthy = False
        self.block_size = 16
        self.cached: set[bytes] = set()  # block hashes in the engine's prefix cache
        self._next_event = 0
        self._instance = None  # the engine process we indexed; a restart empties its cache
        self.inflight = 0  # requests this router has on the engine right now (exact, unlike status)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(600, connect=5), headers=headers,
                                         limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))

    def __repr__(self) -> str:
        return f"Engine({self.url}, {self.role})"

    @property
    def load(self) -> int:
        return max(self.inflight, self.status.get("running", 0) + self.status.get("waiting", 0))

    @property
    def kv_free(self) -> float:
        total = self.status.get("num_blocks") or 1
        return self.status.get("free_blocks", total) / total

    def cached_tokens(self, prompt: list[int]) -> int:
        """Leading tokens of `prompt` this engine holds, from the router's prefix index."""
        n = 0
        for h in hash_prompt_blocks(prompt, self.block_size):
            if h not in self.cached:
                break
            n += 1
        return n * self.block_size

    # ------------------------------------------------------------ the five calls

    def _down(self, e: Exception) -> EngineDown:
        self.healthy = False
        return EngineDown(self, f"{type(e).__name__}: {e}")

    async def _post(self, path: str, body: dict) -> dict:
        try:
            r = await self._client.post(path, json=body)
        except httpx.TransportError as e:
            raise self._down(e) from None
        if r.status_code != 200:
            raise EngineError(r.status_code, _json_or_text(r), r.headers.get("retry-after"))
        return r.json()

    async def prep_recv(self, request_id: str, prompt: list[int], end: int, lease_s: float = 60) -> dict:
        return await self._post("/microserving/prep_recv",
                                {"request_id": request_id, "prompt": prompt, "end": end, "lease_s": lease_s})

    async def remote_send(self, request_id: str, prompt: list[int], begin: int, end: int, kv_addr_info: dict) -> dict:
        return await self._post("/microserving/remote_send", {"request_id": request_id, "prompt": prompt,
                                                              "begin": begin, "end": end, "kv_addr_info": kv_addr_info})

    async def start_generate(self, request_id: str, prompt: list[int], begin: int, sampling: dict) -> AsyncIterator[dict]:
        """Stream the engine's chunks (each with choices carrying text and token_ids)."""
        body = {**sampling, "request_id": request_id, "prompt": prompt, "begin": begin, "stream": True}
        self.inflight += 1
        try:
            async with self._client.stream("POST", "/microserving/start_generate", json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    raise EngineError(r.status_code, _json_or_text(r), r.headers.get("retry-after"))
                async for line in r.aiter_lines():
                    if line == "data: [DONE]":
                        return
                    if line.startswith("data: "):
                        yield json.loads(line[6:])
            raise EngineDown(self, "the stream ended before [DONE]")
        except httpx.TransportError as e:
            raise self._down(e) from None
        finally:
            self.inflight -= 1

    async def abort(self, request_id: str) -> None:
        try:
            await self._post("/microserving/abort", {"request_id": request_id})
        except (EngineError, httpx.HTTPError):
            pass

    # ------------------------------------------------------------ live state

    async def refresh(self) -> None:
        try:
            self.status = (await self._client.get("/microserving/status", timeout=5)).raise_for_status().json()
            self.block_size = self.status.get("fingerprint", {}).get("block_size", self.block_size)
            if self.status.get("instance") != self._instance:  # a new process: its cache starts empty
                self._instance = self.status.get("instance")
                self.cached, self._next_event = set(), 0
            r = (await self._client.get("/microserving/kv_events", params={"since": self._next_event}, timeout=5)).json()
            if r["dropped"]:  # fell behind: take the full list
                full = (await self._client.get("/microserving/prefix_hashes", timeout=5)).json()
                self.cached = {bytes.fromhex(h) for h in full["hashes"]}
            else:
                for _, kind, h in r["events"]:
                    (self.cached.add if kind == "stored" else self.cached.discard)(bytes.fromhex(h))
            self._next_event = r["next"]
            self.healthy = self.status.get("healthy", True)
        except (httpx.HTTPError, ValueError, KeyError):
            self.healthy = False

    async def close(self) -> None:
        await self._client.aclose()


class Cluster:
    """The engines a strategy may use; status and prefix index refreshed in the background."""

    def __init__(self, urls: list[str], roles: list[str] | None = None, refresh_s: float = 0.25,
                 token: str | None = None):
        roles = roles or ["both"] * len(urls)
        self.engines = [Engine(u, r, token) for u, r in zip(urls, roles)]
        self.refresh_s = refresh_s
        self._rr = 0
        self._task: asyncio.Task | None = None

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
        """Engines whose last status refresh succeeded (may be empty, unlike `healthy`)."""
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

    async def refresh(self) -> None:
        await asyncio.gather(*(e.refresh() for e in self.engines))

    async def start(self) -> None:
        await self.refresh()

        async def loop():
            while True:
                await asyncio.sleep(self.refresh_s)
                await self.refresh()

        self._task = asyncio.create_task(loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        await asyncio.gather(*(e.close() for e in self.engines))


def _json_or_text(r: httpx.Response) -> dict:
    try:
        return r.json()
    except ValueError:
        return {"error": {"message": r.text[:500], "type": "engine_error"}}
