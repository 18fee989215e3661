"""Settings every HTTP process launched here shares (engines, simulated hosts, routers)."""

from __future__ import annotations

# Idle connections stay open this long: a router in front of hundreds of engines reaches each
# only every few seconds, and would otherwise reconnect for almost every request.
KEEP_ALIVE_S = 75


def raise_open_file_limit() -> None:
    """Each client connection is a file descriptor: allow as many as the system lets us."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


# How uvicorn serves a router: no access log and no X-Forwarded-* rewriting (the router uses
# neither, and both cost CPU on every request), a deep accept queue for bursts of connections.
ROUTER_UVICORN = {"access_log": False, "proxy_headers": False, "timeout_graceful_shutdown": 5, "backlog": 4096}
