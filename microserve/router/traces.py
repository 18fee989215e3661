"""The router's spans: one `router.request` per routed request, and under it one span per
sub-request call (prep_recv, remote_send, start_generate, abort), whose context goes to the
engine as a W3C `traceparent` header.

Strategies call engines by request id alone, so the request's span is found by that id
(fail-over's resumed ids, `<id>-r<attempt>[-<seq>]`, lead back to it). With tracing off
nothing is registered and every call returns at once.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from opentelemetry.trace import INVALID_SPAN, Span, SpanKind

from microserve import tracing

_RESUMED = re.compile(r"^(.+)-r\d+(?:-\d+)?$")


@dataclass
class Call:
    """One sub-request call's span and the headers that carry it to the engine."""

    span: Span
    headers: dict[str, str] | None = None

    def end(self, error: BaseException | None = None) -> None:
        tracing.end_span(self.span, error)


NO_CALL = Call(INVALID_SPAN)


@dataclass
class _Traced:
    span: Span
    engines: list[str] = field(default_factory=list)  # "call url", in the order they were made


_requests: dict[str, _Traced] = {}


def begin(request_id: str, strategy: str, prompt_tokens: int, arrived: float) -> Span:
    """The request's span, from its arrival (a time.monotonic value) on."""
    if not tracing.enabled():
        return INVALID_SPAN
    span = tracing.start_span("router.request", tracing.incoming(), {"request_id": request_id, "strategy": strategy,
                                                        "prompt_tokens": prompt_tokens},
                              start_mono=arrived, kind=SpanKind.SERVER)
    _requests[request_id] = _Traced(span)
    return span


def _find(request_id: str) -> _Traced | None:
    traced = _requests.get(request_id)
    if traced is None and (m := _RESUMED.match(request_id)):
        traced = _requests.get(m.group(1))
    return traced


def call(request_id: str, name: str, url: str, role: str) -> Call:
    """A child span of the request's for one call to the engine at `url`."""
    if not _requests:
        return NO_CALL
    traced = _find(request_id)
    if traced is None:
        return NO_CALL
    traced.engines.append(f"{name} {url}")
    span = tracing.start_span(name, traced.span, {"microserve.engine.url": url, "microserve.engine.role": role,
                                                  "request_id": request_id}, kind=SpanKind.CLIENT)
    return Call(span, tracing.inject(span))


def failover(request_id: str, error: Exception, target: str) -> None:
    """An event on the request's span: what failed, and where it goes on."""
    traced = _requests.get(request_id) if _requests else None
    if traced is not None:
        failed = getattr(error, "engine", None)
        traced.span.add_event("failover", {"microserve.error": f"{type(error).__name__}: {error}",
                                           "microserve.failed_engine": failed.url if failed is not None else "",
                                           "microserve.target_engine": target})


async def follow(chunks: AsyncIterator, request_id: str) -> AsyncIterator:
    """`chunks`, ending the request's span when they end, fail or are closed."""
    error: BaseException | None = None
    try:
        async for chunk in chunks:
            yield chunk
    except Exception as e:
        error = e
        raise
    finally:
        await chunks.aclose()
        _finish(request_id, error)


def _finish(request_id: str, error: BaseException | None) -> None:
    traced = _requests.pop(request_id, None)
    if traced is not None:
        traced.span.set_attribute("microserve.engines", traced.engines)
        tracing.end_span(traced.span, error, time.monotonic())
