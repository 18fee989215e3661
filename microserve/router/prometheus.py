"""The router's engines as Prometheus HTTP service-discovery targets (GET /admin/prometheus_targets):
engines started by `serve` listen on ports chosen at start-up, and a fleet's (Ray) come and go, so
Prometheus asks the router which engines to scrape rather than being told in its config."""

from __future__ import annotations

from urllib.parse import urlsplit

from microserve.router.cluster import Engine


def prometheus_targets(engines: list[Engine]) -> list[dict]:
    """One target group per engine, in Prometheus' http_sd_configs format: the engine's
    host:port, and its `engine` (URL), `role`, and `node` where a launcher said."""
    return [_target(e) for e in engines]


def _target(engine: Engine) -> dict:
    url = urlsplit(engine.url)
    labels = {"engine": engine.url, "role": engine.role, "__scheme__": url.scheme or "http"}
    if url.path.strip("/"):  # an engine behind a path prefix serves its metrics under it
        labels["__metrics_path__"] = url.path.rstrip("/") + "/metrics"
    if engine.node:
        labels["node"] = engine.node
    return {"targets": [url.netloc], "labels": labels}
