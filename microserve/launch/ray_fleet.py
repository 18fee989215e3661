"""Engines as Ray actors across the nodes of a Ray cluster, the router in the driver.

Each actor is one engine (an EngineSpec, as `microserve engine` runs it), serving HTTP on its node;
the router reaches it by URL like any other engine. Ray restarts an actor whose process
dies (on the same node or another); the fleet notices the new URL and swaps it into the
router's cluster, while the requests that were on it continue elsewhere (fail-over).
`scale` starts actors or drains them (no new requests, running ones finish, then the actor
stops), so the prefill/decode ratio changes while the system serves.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import threading
import time

import httpx

from microserve.launch.spec import EngineSpec
from microserve.router.cluster import Cluster, Engine
from microserve.router.fleet import FleetError

log = logging.getLogger("microserve.router")

SUPERVISE_S = 1.0  # how often the fleet checks its actors
ENGINE_START_TIMEOUT_S = 600  # loading a model inside the actor
PLACEMENT_TIMEOUT_S = 900  # placing the actor and loading its model


class EngineActor:
    """One engine inside a Ray actor process (made remote by `RayFleet`)."""

    def __init__(self, spec: EngineSpec, host: str | None):
        import ray

        self.node = ray.get_runtime_context().get_node_id()
        os.environ["MICROSERVE_NODE_ID"] = self.node  # peers on other nodes get KV over TCP
        host = host or ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        self.url = f"http://{host}:{port}"
        spec = dataclasses.replace(spec, host=host, port=port)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(spec,), name="engine", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + ENGINE_START_TIMEOUT_S
        while not self._ready():
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the engine did not start: {self._error!r}")
            time.sleep(0.2)

    def _run(self, spec: EngineSpec) -> None:
        from microserve.launch.engine import run_engine  # torch and the model: in the actor only

        try:
            run_engine(spec)
        except BaseException as e:  # kept for the error message; the thread ends either way
            self._error = e

    def _ready(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def info(self) -> dict:
        return {"url": self.url, "node": self.node, "alive": self._thread.is_alive(), "pid": os.getpid()}


class RayFleet:
    """Starts, watches and stops engine actors for one router (see Router's `fleet`)."""

    def __init__(self, engine: EngineSpec, roles: list[str], host: str | None = None, num_cpus: float = 1,
                 num_gpus: float = 0, resources: dict[str, dict[str, float]] | None = None):
        import ray

        self.engine = engine  # what every actor runs (its secrets travel in Ray's object store, not argv)
        self.initial_roles = roles
        self.host = host  # None: each engine on its node's address
        self.resources = resources or {}  # per role: custom Ray resources an engine of that role needs
        self.remote = ray.remote(max_restarts=-1, max_task_retries=0, num_cpus=num_cpus,
                                 num_gpus=num_gpus)(EngineActor)
        self.members: dict[Engine, object] = {}  # engine -> its actor handle
        self.cluster: Cluster | None = None
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()  # one membership change at a time

    @property
    def initial_size(self) -> int:
        return len(self.initial_roles)

    def owns(self, engine: Engine) -> bool:
        return engine in self.members

    async def start(self, cluster: Cluster) -> None:
        self.cluster = cluster
        await asyncio.gather(*(self.launch(role) for role in self.initial_roles))
        self._task = asyncio.create_task(self._supervise())

    async def stop(self) -> None:
        import ray

        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for actor in self.members.values():
            ray.kill(actor, no_restart=True)
        self.members.clear()

    async def launch(self, role: str) -> Engine:
        """Start one engine actor of `role` (placed by SPREAD, or on nodes with the role's
        resources) and take it into rotation."""
        actor = self.remote.options(resources=self.resources.get(role) or None,
                                    scheduling_strategy="SPREAD").remote(self.engine, self.host)
        import ray

        try:
            info = await asyncio.wait_for(actor.info.remote(), PLACEMENT_TIMEOUT_S)
        except (ray.exceptions.RayError, asyncio.TimeoutError) as e:
            ray.kill(actor, no_restart=True)
            raise FleetError(f"a {role} engine did not start ({type(e).__name__}: no node with "
                             f"{self.resources.get(role) or 'the CPUs/GPUs'} free, or the engine failed: {e})"[:2000]) from None
        engine = await self.cluster.add(info["url"], role, node=info["node"])
        self.members[engine] = actor
        log.info("engine %s (%s) up on node %s", engine.url, role, info["node"][:12])
        return engine

    async def retire(self, engine: Engine, drain: bool = True, timeout_s: float | None = None) -> bool | None:
        """Drain (or just remove) an engine, then stop its actor for good."""
        import ray

        idle = await self.cluster.drain(engine, timeout_s) if drain else await self.cluster.remove(engine)
        actor = self.members.pop(engine, None)
        if actor is not None:
            ray.kill(actor, no_restart=True)
        return idle

    async def scale(self, role: str, count: int) -> tuple[list[Engine], list[Engine]]:
        """Start or drain engines of `role` until `count` are in rotation; (started, drained)."""
        async with self._lock:
            current = [e for e in self.cluster.engines if e.role == role and e in self.members]
            if count > len(current):
                started = await asyncio.gather(*(self.launch(role) for _ in range(count - len(current))))
                return list(started), []
            extra = current[count:][::-1]  # the newest go first
            # Out of rotation at once, so the next request already sees the new ratio.
            for e in extra:
                self.cluster.engines.remove(e)
                self.cluster.draining.append(e)
                e.draining = True
            await asyncio.gather(*(self.retire(e) for e in extra))
            return [], extra

    async def _supervise(self) -> None:
        """Swap in an actor Ray restarted (it serves on a new URL), and restart one whose engine died."""
        import ray

        while True:
            await asyncio.sleep(SUPERVISE_S)
            for engine, actor in list(self.members.items()):
                try:
                    info = await asyncio.wait_for(actor.info.remote(), 5)
                except (ray.exceptions.RayError, asyncio.TimeoutError):
                    continue  # restarting (or its node is gone): asked again next round
                if not info["alive"]:
                    ray.kill(actor, no_restart=False)  # the engine thread ended: let Ray start it again
                elif info["url"] != engine.url and self.members.get(engine) is actor:
                    async with self._lock:
                        log.info("engine %s came back as %s", engine.url, info["url"])
                        del self.members[engine]
                        await self.cluster.remove(engine)
                        try:
                            new = await self.cluster.add(info["url"], engine.role, node=info["node"])
                        except ValueError:
                            continue
                        self.members[new] = actor
