"""The engine's spans, under the caller's `traceparent` (a router's sub-request call, or a
client of the engine's own OpenAI routes):

  engine.start_generate / engine.generate   the request here, admitted to finished
    kv.receive                              the peer's KV coming into prep_recv's blocks
    queue, prefill, decode                  from the engine's own timestamps (RequestTimes)
  engine.prep_recv                          the reservation
  engine.remote_send                        compute and push KV to a peer
    prefill, kv.send                        (they overlap: layer i goes while i + 1 computes)

With tracing off, `traced_generation` hands the outputs back untouched.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from opentelemetry.trace import Span, SpanKind

from microserve import tracing
from microserve.engine.request import RequestOutput, RequestTimes
from microserve.engine.sub_requests import Reserved, Sent


def traced_generation(outputs: AsyncIterator[RequestOutput], name: str, request_id: str, prompt_tokens: int,
                      begin: int = 0, received: tuple[float, float] | None = None
                      ) -> AsyncIterator[RequestOutput]:
    """`outputs` inside a span `name` that ends with them; `received`: when the KV of a
    prep_recv reservation came in (time.monotonic values)."""
    if not tracing.enabled():
        return outputs
    span = tracing.start_span(name, tracing.incoming(), {"request_id": request_id, "prompt_tokens": prompt_tokens,
                                                         "begin": begin}, kind=SpanKind.SERVER)
    if received is not None:
        tracing.record_span("kv.receive", span, *received, {"tokens": begin})
    return _follow(outputs, span, time.monotonic())


async def _follow(outputs: AsyncIterator[RequestOutput], span: Span, started: float) -> AsyncIterator[RequestOutput]:
    error: BaseException | None = None
    final: RequestOutput | None = None
    try:
        async for out in outputs:
            final = out
            yield out
    except Exception as e:
        error = e
        raise
    finally:
        await outputs.aclose()
        if final is not None and final.times is not None:
            _phases(span, final.times, started, sum(len(c.token_ids) for c in final.outputs))
            span.set_attribute("microserve.cached_tokens", final.num_cached_tokens)
        tracing.end_span(span, error)


def _phases(span: Span, t: RequestTimes, started: float, output_tokens: int) -> None:
    """queue, prefill and decode as child spans of `span`, from the engine's timestamps."""
    span.set_attribute("microserve.output_tokens", output_tokens)
    if t.scheduled is None:  # finished (aborted) before it ever ran
        return
    first = t.first_token if t.first_token is not None else t.finished
    tracing.record_span("queue", span, min(started, t.arrival), t.scheduled)
    tracing.record_span("prefill", span, t.scheduled, first)
    tracing.record_span("decode", span, first, t.finished, {"output_tokens": output_tokens})


def reserved(span: Span, r: Reserved, end: int) -> None:
    """What prep_recv reserved, on its span."""
    if span.is_recording():
        span.set_attributes({"microserve.prefix_matched_length": r.prefix_matched_length,
                             "microserve.prompt_length": r.prompt_length, "microserve.end": end})


def sent(span: Span, s: Sent) -> None:
    """remote_send's prefill and kv.send under its span, placed back from the durations it
    measured (both end no later than now, when the receiver has acknowledged every byte)."""
    if not span.is_recording():
        return
    now = time.monotonic()
    start = now - s.seconds
    span.set_attributes({"microserve.kv.tokens": s.tokens, "microserve.kv.bytes": s.bytes,
                         "microserve.kv.transport": s.transport, "microserve.reused_tokens": s.reused_tokens,
                         "microserve.computed_tokens": s.computed_tokens})
    if s.tokens:
        tracing.record_span("prefill", span, start, start + s.compute_seconds,
                            {"computed_tokens": s.computed_tokens, "reused_tokens": s.reused_tokens})
        tracing.record_span("kv.send", span, now - s.transfer_seconds, now,
                            {"tokens": s.tokens, "bytes": s.bytes, "transport": s.transport})
