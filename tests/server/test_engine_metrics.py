"""EngineMetrics' KV transfer series, in process: what one acknowledged remote_send adds."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from microserve.engine.block_pool import BlockPool
from microserve.engine.sub_requests import Sent
from microserve.server.metrics import EngineMetrics


@dataclass
class _Scheduler:
    running: list = field(default_factory=list)
    waiting: list = field(default_factory=list)
    num_preemptions: int = 0


@dataclass
class _Engine:
    """What EngineMetrics reads of an engine."""

    pool: BlockPool = field(default_factory=lambda: BlockPool(num_blocks=4, block_size=2))
    scheduler: _Scheduler = field(default_factory=_Scheduler)


def _samples(metrics: EngineMetrics) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples}


def test_an_acknowledged_send_counts_bytes_tokens_and_time():
    metrics = EngineMetrics(_Engine())
    metrics.on_sent(Sent(tokens=32, bytes=4096, seconds=0.5, transfer_seconds=0.03, transport="tcp"))
    metrics.on_sent(Sent())  # an empty range: nothing was sent
    s = _samples(metrics)
    assert s[("microserve:kv_transfer_sent_bytes_total", (("transport", "tcp"),))] == 4096
    assert s[("microserve:kv_transfer_sent_tokens_total", ())] == 32
    assert s[("microserve:kv_transfer_seconds_count", ())] == 1
    assert s[("microserve:kv_transfer_seconds_sum", ())] == 0.03
    assert s[("microserve:kv_transfer_failures_total", ())] == 0
    assert s[("microserve:kv_blocks_total", ())] == 4
