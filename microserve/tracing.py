"""OpenTelemetry traces for every process (router, engines): setup, W3C context propagation,
and spans, including spans made after the fact from the engine's monotonic timestamps.

Tracing is on only once `setup_tracing` found an endpoint (the --otlp-traces-endpoint flag,
or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT). Until then every call
here returns at once: `start_span` hands back the API's shared non-recording span, `inject`
an empty dict, and the SDK is never imported.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode

TRACES_PATH = "/v1/traces"
# FastAPI's own OpenTelemetry spans, metrics and logs, off: the spans of a request come from
# here, and FastAPI's would be a second set per HTTP request, costing CPU on every one.
FASTAPI_TELEMETRY = {"tracing": False, "metrics": False, "logs": False}
ATTR_PREFIX = "microserve."

_tracer: trace.Tracer | None = None
_incoming: ContextVar[Context | None] = ContextVar("microserve_trace_incoming", default=None)
_provider = None  # the SDK TracerProvider, kept to flush it on shutdown
# Wall clock minus monotonic clock, in ns: the engine times its requests with time.monotonic.
_MONO_TO_WALL_NS = time.time_ns() - time.monotonic_ns()


def traces_endpoint(flag: str | None = None) -> str | None:
    """Where spans go: the flag, else the standard OTLP variables (the generic one gets
    /v1/traces appended, as the OTLP exporters do); None: tracing stays off."""
    if flag:
        return flag if urlsplit(flag).path not in ("", "/") else flag.rstrip("/") + TRACES_PATH
    specific = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if specific:
        return specific
    generic = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    return generic.rstrip("/") + TRACES_PATH if generic else None


def setup_tracing(service_name: str, endpoint: str | None = None, attributes: Mapping[str, object] | None = None,
                  exporter=None) -> bool:
    """Export this process's spans over OTLP/HTTP (protobuf) in batches; False (and nothing
    set up) when no endpoint is configured or OTEL_SDK_DISABLED is true. `exporter`, an SDK
    SpanExporter, replaces OTLP (tests use an in-memory one)."""
    global _tracer, _provider
    url = traces_endpoint(endpoint)
    if (url is None and exporter is None) or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=url)
    resource = Resource.create({"service.name": service_name, **(attributes or {})})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    shutdown_tracing()  # a second setup in one process replaces the first
    _provider, _tracer = provider, provider.get_tracer("microserve")
    return True


def shutdown_tracing() -> None:
    """Send what is still buffered and stop exporting (call when the server stops)."""
    global _tracer, _provider
    provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()


def flush(timeout_s: float = 5.0) -> None:
    """Send what is buffered now, and go on tracing (a server's lifespan ends with this: uvicorn
    may re-raise SIGTERM once it has stopped, ending the process before any `finally`)."""
    if _provider is not None:
        _provider.force_flush(int(timeout_s * 1000))


def enabled() -> bool:
    return _tracer is not None


def extract(headers: Mapping[str, str]) -> Context | None:
    """The caller's trace context from W3C `traceparent` (and `tracestate`) headers; None when
    tracing is off or the headers carry none."""
    if _tracer is None or "traceparent" not in headers:
        return None
    from opentelemetry.propagate import extract as _extract

    return _extract(headers)


def incoming() -> Context | None:
    """The trace context the HTTP request being handled came with (see TraceContextMiddleware)."""
    return _incoming.get()


class TraceContextMiddleware:
    """ASGI middleware: each HTTP request's W3C trace context, for `incoming()` in its handler
    (and the response stream the handler returns). Installed only when tracing is on."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]
                   if k in (b"traceparent", b"tracestate")}
        token = _incoming.set(extract(headers))
        try:
            await self.app(scope, receive, send)
        finally:
            _incoming.reset(token)


def install(app) -> None:
    """Honour callers' `traceparent` on every route of `app` (a Starlette/FastAPI app), if tracing is on."""
    if _tracer is not None:
        app.add_middleware(TraceContextMiddleware)


def inject(span: Span) -> dict[str, str]:
    """Headers that make `span` the parent of whatever the receiver does ({} when off)."""
    if _tracer is None or not span.is_recording():
        return {}
    from opentelemetry.propagate import inject as _inject

    headers: dict[str, str] = {}
    _inject(headers, context=trace.set_span_in_context(span))
    return headers


def start_span(name: str, parent: Span | Context | None = None, attributes: Mapping[str, object] | None = None,
               start_mono: float | None = None, kind: SpanKind = SpanKind.INTERNAL) -> Span:
    """A span under `parent` (a span, or an extracted context; None: a new trace); started at
    `start_mono` (a time.monotonic value) if given. End it with `end_span` or `.end()`."""
    if _tracer is None:
        return INVALID_SPAN
    context = trace.set_span_in_context(parent) if isinstance(parent, Span) else parent
    start = None if start_mono is None else wall_ns(start_mono)
    return _tracer.start_span(name, context=context, kind=kind, attributes=_attrs(attributes), start_time=start)


def record_span(name: str, parent: Span, start_mono: float, end_mono: float,
                attributes: Mapping[str, object] | None = None) -> None:
    """A finished span under `parent`, from two time.monotonic values measured earlier."""
    if _tracer is None or not parent.is_recording():
        return
    span = start_span(name, parent, attributes, start_mono)
    span.end(end_time=wall_ns(max(start_mono, end_mono)))


def end_span(span: Span, error: BaseException | None = None, end_mono: float | None = None) -> None:
    """End `span`, marking it failed with `error` if one is given."""
    if not span.is_recording():
        return
    if error is not None:
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
    span.end(end_time=None if end_mono is None else wall_ns(end_mono))


@contextlib.contextmanager
def in_span(name: str, parent: Span | Context | None = None, attributes: Mapping[str, object] | None = None,
         kind: SpanKind = SpanKind.INTERNAL) -> Iterator[Span]:
    """`with in_span(...) as s:` a span around a block, failed if the block raises."""
    s = start_span(name, parent, attributes, kind=kind)
    try:
        yield s
    except BaseException as e:
        end_span(s, e)
        raise
    end_span(s)


def wall_ns(mono: float) -> int:
    """A time.monotonic() value as nanoseconds since the epoch."""
    return int(mono * 1e9) + _MONO_TO_WALL_NS


def _attrs(attributes: Mapping[str, object] | None) -> dict | None:
    """Attribute names get the microserve. prefix unless they already have a namespace."""
    if not attributes:
        return None
    return {(k if "." in k else ATTR_PREFIX + k): v for k, v in attributes.items() if v is not None}
