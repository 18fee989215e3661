"""microserve/tracing.py and the spans built on it (router/traces.py, server/traces.py):
endpoint resolution, W3C propagation round trip, spans from engine timestamps, and that
with tracing off nothing is set up or recorded."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import INVALID_SPAN

from microserve import tracing
from microserve.engine.request import CompletionOutput, RequestOutput, RequestTimes
from microserve.router import traces as router_traces
from microserve.server import traces as server_traces

OTEL_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SDK_DISABLED")


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    for var in OTEL_VARS:
        monkeypatch.delenv(var, raising=False)
    tracing.shutdown_tracing()
    yield
    tracing.shutdown_tracing()


@pytest.fixture
def exported():
    """Tracing on, into memory; call the fixture's value to flush and read the finished spans."""
    exporter = InMemorySpanExporter()
    assert tracing.setup_tracing("test-service", exporter=exporter)

    def spans():
        tracing.flush()
        return {s.name: s for s in exporter.get_finished_spans()}

    return spans


def test_endpoint_from_flag_then_standard_variables(monkeypatch):
    assert tracing.traces_endpoint(None) is None
    assert tracing.traces_endpoint("http://c:4318/v1/traces") == "http://c:4318/v1/traces"
    assert tracing.traces_endpoint("http://c:4318") == "http://c:4318/v1/traces"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://generic:4318/")
    assert tracing.traces_endpoint(None) == "http://generic:4318/v1/traces"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://specific:9/x")
    assert tracing.traces_endpoint(None) == "http://specific:9/x"
    assert tracing.traces_endpoint("http://flag:1/v1/traces") == "http://flag:1/v1/traces"


def test_off_without_an_endpoint_does_nothing():
    assert not tracing.setup_tracing("microserve-router", None)
    assert not tracing.enabled()
    span = tracing.start_span("x")
    assert span is INVALID_SPAN and not span.is_recording()
    assert tracing.inject(span) == {}
    assert tracing.extract({"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}) is None
    assert router_traces.begin("r-1", "disagg", 10, time.monotonic()) is INVALID_SPAN
    assert router_traces.call("r-1", "prep_recv", "http://e", "decode") is router_traces.NO_CALL
    assert router_traces._requests == {}
    outputs = _outputs()
    assert server_traces.traced_generation(outputs, "engine.generate", "r-1", 4) is outputs
    app = FastAPI()
    tracing.install(app)
    assert not app.user_middleware


def test_sdk_disabled_variable_wins(monkeypatch):
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not tracing.setup_tracing("x", "http://127.0.0.1:1/v1/traces")


def test_traceparent_round_trip(exported):
    parent = tracing.start_span("parent")
    headers = tracing.inject(parent)
    assert headers["traceparent"].startswith("00-")
    child = tracing.start_span("child", tracing.extract(headers))
    child.end()
    parent.end()
    spans = exported()
    assert spans["child"].context.trace_id == spans["parent"].context.trace_id
    assert spans["child"].parent.span_id == spans["parent"].context.span_id
    assert spans["child"].resource.attributes["service.name"] == "test-service"


def test_spans_after_the_fact_keep_their_times(exported):
    parent = tracing.start_span("parent")
    t0 = time.monotonic()
    tracing.record_span("queue", parent, t0 - 0.5, t0 - 0.2, {"tokens": 3})
    parent.end()
    span = exported()["queue"]
    assert abs(span.start_time - (time.time_ns() - 500_000_000)) < 100_000_000
    assert span.end_time - span.start_time == pytest.approx(300_000_000, abs=1_000_000)
    assert span.attributes["microserve.tokens"] == 3


def test_router_request_calls_and_failover(exported):
    async def run():
        span = router_traces.begin("r-abc", "disagg", 40, time.monotonic())
        call = router_traces.call("r-abc", "prep_recv", "http://d", "decode")
        assert call.headers["traceparent"].split("-")[1] == format(span.get_span_context().trace_id, "032x")
        call.end()
        router_traces.call("r-abc-r1-0", "start_generate", "http://p", "both").end(RuntimeError("broke"))
        router_traces.failover("r-abc", RuntimeError("down"), "http://p")

        async def chunks():
            yield "a"
            yield "b"

        assert [c async for c in router_traces.follow(chunks(), "r-abc")] == ["a", "b"]

    asyncio.run(run())
    spans = exported()
    root = spans["router.request"]
    assert root.attributes["microserve.strategy"] == "disagg"
    assert list(root.attributes["microserve.engines"]) == ["prep_recv http://d", "start_generate http://p"]
    assert [e.name for e in root.events] == ["failover"]
    assert spans["prep_recv"].parent.span_id == root.context.span_id
    assert spans["start_generate"].parent.span_id == root.context.span_id  # a resumed id finds its request
    assert not spans["start_generate"].status.is_ok
    assert router_traces._requests == {}


def test_engine_generation_phases(exported):
    now = time.monotonic()
    times = RequestTimes(arrival=now - 0.3, scheduled=now - 0.25, first_token=now - 0.2, finished=now - 0.01)

    async def run():
        gen = server_traces.traced_generation(_outputs(times), "engine.start_generate", "r-1", 4, begin=3,
                                              received=(now - 0.4, now - 0.35))
        return [o async for o in gen]

    asyncio.run(run())
    spans = exported()
    parent = spans["engine.start_generate"]
    for name in ("kv.receive", "queue", "prefill", "decode"):
        assert spans[name].parent.span_id == parent.context.span_id
    assert spans["queue"].end_time == spans["prefill"].start_time
    assert spans["prefill"].end_time == spans["decode"].start_time
    assert spans["decode"].attributes["microserve.output_tokens"] == 2
    assert parent.attributes["microserve.begin"] == 3


def test_middleware_hands_the_callers_context_to_handlers(exported):
    app = FastAPI()
    tracing.install(app)

    @app.get("/")
    async def handler():
        span = tracing.start_span("handled", tracing.incoming())
        span.end()
        return {}

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            await client.get("/", headers={"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"})

    asyncio.run(run())
    span = exported()["handled"]
    assert format(span.context.trace_id, "032x") == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert format(span.parent.span_id, "016x") == "00f067aa0ba902b7"


async def _outputs(times: RequestTimes | None = None):
    yield RequestOutput("r-1", [1, 2, 3, 4], [CompletionOutput(0, "a", [5], None, None)], False)
    yield RequestOutput("r-1", [1, 2, 3, 4], [CompletionOutput(0, "ab", [5, 6], "length", None)], True, times=times)
