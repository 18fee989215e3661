"""What a router asks of a fleet: something that starts and stops engines for it (Ray actors,
see microserve/launch/ray_fleet.py). The router only knows this interface."""

from __future__ import annotations

from typing import Protocol

from microserve.router.cluster import Cluster, Engine


class FleetError(Exception):
    """An engine could not be started (no node with room for it, or its engine failed)."""


class Fleet(Protocol):
    initial_size: int  # engines it starts with: the router sizes its admission from this

    async def start(self, cluster: Cluster) -> None: ...

    async def stop(self) -> None: ...

    def owns(self, engine: Engine) -> bool: ...

    async def retire(self, engine: Engine, drain: bool = True, timeout_s: float | None = None) -> bool | None: ...

    async def scale(self, role: str, count: int) -> tuple[list[Engine], list[Engine]]: ...
