"""Prometheus metrics of one router: requests, failures, fail-overs, refusals, TTFT, engines up."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from microserve.api.metrics import LATENCY_BUCKETS
from microserve.router.cluster import Cluster


class RouterMetrics:
    def __init__(self, cluster: Cluster):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("microserve_router:requests", "Requests routed", ["strategy"], registry=r)
        self.failures = Counter("microserve_router:request_errors", "Requests that failed", registry=r)
        self.failovers = Counter("microserve_router:failovers", "Requests continued on another engine", registry=r)
        self.rejected = Counter("microserve_router:rejected", "Requests refused with 429 (queue full)", registry=r)
        self.ttft = Histogram("microserve_router:time_to_first_token_seconds", "Router-side TTFT",
                              buckets=LATENCY_BUCKETS, registry=r)
        Gauge("microserve_router:engine_messages", "Status and prefix-cache messages received from engines",
              registry=r).set_function(lambda: sum(e.messages for e in cluster.engines))
        Gauge("microserve_router:engines_up", "Engines whose status stream is live", registry=r
              ).set_function(lambda: sum(e.healthy for e in cluster.engines))

    def render(self) -> bytes:
        return generate_latest(self.registry)
