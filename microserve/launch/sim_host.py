"""Many simulated engines in one process, each behind its own HTTP port.

A simulated engine sleeps through its steps, so one process holds hundreds of them: one
asyncio loop serves every engine's HTTP surface, and each engine keeps its own step-loop
thread and KV port, exactly as a real engine does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading

import uvicorn

from microserve.config import EngineConfig
from microserve.engine.engine import LLMEngine
from microserve.launch.http import KEEP_ALIVE_S
from microserve.server.openai_api import build_app

log = logging.getLogger("microserve")


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to the host: all engines stop together."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield

    async def main_loop(self) -> None:
        # uvicorn ticks ten times a second (stop check, Date header); hundreds of servers share
        # this loop, so tick once a second: stopping waits up to a second longer.
        counter = 0
        while not await self.on_tick(counter):
            counter += 10  # on_tick refreshes the Date header when counter % 10 == 0
            await asyncio.sleep(1.0)


def run_simulated_engines(cfg: EngineConfig, ports: list[int], host: str = "127.0.0.1",
                          model_name: str | None = None, log_level: str = "info", **app_options) -> None:
    """Serve one simulated engine per port until SIGINT or SIGTERM."""
    servers = []
    for port in ports:
        app = build_app(LLMEngine(cfg), model_name or cfg.simulate, host=host, **app_options)
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                                timeout_graceful_shutdown=5, backlog=4096,
                                timeout_keep_alive=KEEP_ALIVE_S)
        servers.append(_Server(config))
    log.info("serving %d simulated %s engines on %s ports %s", len(ports), cfg.simulate, host,
             ",".join(map(str, ports)) if len(ports) <= 8 else f"{ports[0]}..{ports[-1]}")

    async def main():
        loop = asyncio.get_running_loop()

        def stop():
            for s in servers:
                s.should_exit = True

        if threading.current_thread() is threading.main_thread():  # in a Ray actor's thread: Ray stops us
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop)
        await asyncio.gather(*(s.serve() for s in servers))

    asyncio.run(main())
