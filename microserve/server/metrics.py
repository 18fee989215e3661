"""Prometheus metrics of one engine: load, KV use, prefix-cache hits, latencies, token counts,
KV pushed to peers."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from microserve.api.metrics import LATENCY_BUCKETS
from microserve.engine.engine import LLMEngine
from microserve.engine.request import RequestOutput
from microserve.engine.sub_requests import Sent


class EngineMetrics:
    def __init__(self, engine: LLMEngine):
        self.registry = r = CollectorRegistry()
        pool, sched = engine.pool, engine.scheduler
        Gauge("microserve:num_requests_running", "Sequences in the running batch", registry=r
              ).set_function(lambda: len(sched.running))
        Gauge("microserve:num_requests_waiting", "Sequences waiting to be scheduled", registry=r
              ).set_function(lambda: len(sched.waiting))
        Gauge("microserve:kv_blocks_total", "KV cache blocks", registry=r).set_function(lambda: pool.num_blocks)
        Gauge("microserve:kv_blocks_free", "KV cache blocks not held by a request", registry=r
              ).set_function(lambda: pool.num_free_blocks)
        Gauge("microserve:kv_blocks_used", "KV cache blocks held by requests", registry=r
              ).set_function(lambda: pool.num_blocks - pool.num_free_blocks)
        Gauge("microserve:prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / prompt tokens",
              registry=r).set_function(lambda: pool.stats()["prefix_hit_rate"])
        Gauge("microserve:num_preemptions", "Sequences preempted so far", registry=r
              ).set_function(lambda: sched.num_preemptions)
        self.ttft = Histogram("microserve:time_to_first_token_seconds", "Time to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("microserve:inter_token_latency_seconds", "Time between output tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("microserve:e2e_request_latency_seconds", "Arrival to last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("microserve:prompt_tokens", "Prompt tokens received", registry=r)
        self.generation_tokens = Counter("microserve:generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter("microserve:request_success", "Requests finished", ["finished_reason"], registry=r)
        self.failed = Counter("microserve:request_failures", "Requests the engine failed alone (it went on)",
                              registry=r)
        self._add_kv_transfer_metrics(r)
        self._last_token_time: dict[str, float] = {}

    def _add_kv_transfer_metrics(self, r: CollectorRegistry) -> None:
        """What remote_send pushes into peers' reservations (the prefill side of a disaggregated pair)."""
        self.kv_sent_bytes = Counter("microserve:kv_transfer_sent_bytes", "KV bytes pushed to peers",
                                     ["transport"], registry=r)
        self.kv_sent_tokens = Counter("microserve:kv_transfer_sent_tokens", "Prompt positions whose KV was pushed",
                                      registry=r)
        self.kv_transfer_seconds = Histogram("microserve:kv_transfer_seconds",
                                             "One remote_send's push, connect to the receiver's acknowledgement",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.kv_transfer_failures = Counter("microserve:kv_transfer_failures",
                                            "remote_sends whose transfer broke off or was refused", registry=r)

    def on_sent(self, sent: Sent) -> None:
        """Called after each remote_send the receiver acknowledged."""
        if sent.tokens:
            self.kv_sent_bytes.labels(transport=sent.transport).inc(sent.bytes)
            self.kv_sent_tokens.inc(sent.tokens)
            self.kv_transfer_seconds.observe(sent.transfer_seconds)

    def on_output(self, out: RequestOutput, arrival: float) -> None:
        """Called in the engine loop thread for every output it delivers."""
        now = time.monotonic()
        new_tokens = sum(len(c.delta_token_ids) for c in out.outputs)
        if new_tokens:
            self.generation_tokens.inc(new_tokens)
            last = self._last_token_time.get(out.request_id)
            if last is None:
                self.prompt_tokens.inc(len(out.prompt_token_ids))
                self.ttft.observe(now - arrival)
            else:
                self.itl.observe(now - last)
            self._last_token_time[out.request_id] = now
        if out.error is not None:
            self._last_token_time.pop(out.request_id, None)
            self.failed.inc()
            return
        if out.finished:
            self._last_token_time.pop(out.request_id, None)
            self.e2e.observe(now - arrival)
            for c in out.outputs:
                self.finished.labels(finished_reason=c.finish_reason or "abort").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
