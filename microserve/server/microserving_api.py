"""The microserving API of one engine: prep_recv, remote_send, start_generate, abort, status,
and the prefix-cache index routers follow (prefix_hashes, kv_events, watch).

Prompts are token ids; `request_id` names the same request on every engine. The KV-moving
calls are done by engine/sub_requests.py; the handlers here only translate.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from opentelemetry.trace import SpanKind

from microserve import tracing
from microserve.api.errors import sse_errors
from microserve.api.microserving import Abort, EngineStatus, PrepRecv, RemoteSend, StartGenerate
from microserve.api.render import DONE, Delta, engine_chunk, usage
from microserve.api.streams import last
from microserve.engine.engine import LLMEngine
from microserve.engine.sub_requests import SubRequests, TransferFailed
from microserve.errors import UserError
from microserve.kv_transfer.receiver import KVReceiver
from microserve.server.async_engine import AsyncEngine
from microserve.server import traces
from microserve.server.metrics import EngineMetrics

WATCH_INTERVAL_S = 0.1  # a watch stream sends at most this often
WATCH_HEARTBEAT_S = 5.0  # and at least this often, so a router notices a silent engine


def add_microserving_routes(app: FastAPI, engine: LLMEngine, aengine: AsyncEngine, host: str, transport: str,
                            metrics: EngineMetrics) -> KVReceiver:
    sub = SubRequests(engine, aengine.call, host, transport)
    instance = uuid.uuid4().hex  # changes when the engine restarts: routers then drop what they knew

    def status_now() -> dict:
        return EngineStatus(**engine.stats(), **engine.microserving.stats(), fingerprint=sub.fingerprint,
                            instance=instance, pid=os.getpid(), healthy=aengine.healthy,
                            max_model_len=engine.max_model_len, kv_transfer=sub.address_info()).to_wire()

    _add_kv_routes(app, sub, metrics)
    _add_generate_routes(app, engine, aengine)
    _add_index_routes(app, engine, aengine, status_now)
    return sub.receiver


def _add_kv_routes(app: FastAPI, sub: SubRequests, metrics: EngineMetrics) -> None:
    @app.post("/microserving/prep_recv")
    async def prep_recv(req: PrepRecv):
        with tracing.in_span("engine.prep_recv", tracing.incoming(), {"request_id": req.request_id},
                             kind=SpanKind.SERVER) as span:
            reserved = await sub.prep_recv(req.request_id, req.prompt, req.end, req.lease_s)
            traces.reserved(span, reserved, req.end)
        return dataclasses.asdict(reserved)

    @app.post("/microserving/remote_send")
    async def remote_send(req: RemoteSend):
        with tracing.in_span("engine.remote_send", tracing.incoming(), {"request_id": req.request_id},
                             kind=SpanKind.SERVER) as span:
            try:
                sent = await sub.remote_send(req.request_id, req.prompt, req.begin, req.end, req.kv_addr_info)
            except TransferFailed:
                metrics.kv_transfer_failures.inc()
                raise
            traces.sent(span, sent)
        metrics.on_sent(sent)
        return dataclasses.asdict(sent)


def _add_generate_routes(app: FastAPI, engine: LLMEngine, aengine: AsyncEngine) -> None:
    @app.post("/microserving/start_generate")
    async def start_generate(req: StartGenerate):
        return await _start_generate(engine, aengine, req)

    @app.post("/microserving/abort")
    async def abort(req: Abort):
        found = await aengine.call(lambda: engine.abort_request(req.request_id))
        aengine.abort(req.request_id)  # also ends a stream being served here
        return {"ok": True, "found": found}


async def _start_generate(engine: LLMEngine, aengine: AsyncEngine, req: StartGenerate):
    """Prefill [begin, len) on top of what was received or cached, then decode; chunks carry
    token ids and raw logprobs for the router to render."""
    params = req.sampling_params(req.max_tokens, req.logprobs)
    params.prompt_logprobs = req.prompt_logprobs
    if req.max_tokens is None:
        params.max_tokens = max(1, engine.max_model_len - len(req.prompt))
    if req.generated and req.begin:
        raise UserError("`generated` (resume) cannot be combined with begin > 0")
    if req.prompt_logprobs is not None and (req.begin or req.generated):
        raise UserError("prompt_logprobs need the whole prompt computed here (begin 0, no resume)")
    resume = (req.generated, req.generated_text_len) if req.generated else None
    await aengine.prepare(params)
    received = _received(engine, req.request_id)
    gen = traces.traced_generation(aengine.generate(req.request_id, req.prompt, params, resume),
                                   "engine.start_generate", req.request_id, len(req.prompt), req.begin, received)
    head = {"id": f"cmpl-{req.request_id}", "object": "text_completion", "created": int(time.time()),
            "model": req.model or engine.model_config.name}
    if not req.stream:
        out = await last(gen)
        completion = sum(len(c.token_ids) for c in out.outputs)
        choices = [Delta(c.index, c.text, c.token_ids, c.logprobs, c.finish_reason, out.prompt_logprobs).to_wire()
                   for c in out.outputs]
        return {**head, "choices": choices,
                "usage": usage(len(req.prompt), completion, cached_tokens=out.num_cached_tokens)}

    async def stream():
        finished, started = set(), set()  # a finished choice is in every later output: report it once
        async for out in gen:
            for c in out.outputs:
                if c.index in finished:
                    continue
                if c.finish_reason:
                    finished.add(c.index)
                if c.delta_token_ids or c.finish_reason:
                    scores = out.prompt_logprobs if c.index not in started else None
                    started.add(c.index)
                    yield engine_chunk(head, [Delta(c.index, c.delta_text, c.delta_token_ids, c.delta_logprobs,
                                                    c.finish_reason, scores)])
        yield DONE

    return StreamingResponse(sse_errors(stream()), media_type="text/event-stream")


def _received(engine: LLMEngine, request_id: str) -> tuple[float, float] | None:
    """When the KV for `request_id`'s reservation came in (None: none, or tracing is off)."""
    if not tracing.enabled():
        return None
    reservation = engine.microserving.reservations.get(request_id)  # a plain read, as /status does
    return reservation.received if reservation is not None else None


def _add_index_routes(app: FastAPI, engine: LLMEngine, aengine: AsyncEngine, status_now: Callable[[], dict]) -> None:
    @app.get("/microserving/status")
    async def status():
        return status_now()

    @app.get("/microserving/prefix_hashes")
    async def prefix_hashes():
        """Every block hash this engine's prefix cache holds (hex), for routers to index."""
        hashes = await aengine.call(lambda: [h.hex() for h in engine.pool.cached])
        return {"block_size": engine.pool.block_size, "hashes": hashes}

    @app.get("/microserving/kv_events")
    async def kv_events(since: int = 0):
        """Prefix-cache changes numbered from `since`: [seq, "stored" | "removed", hash]."""
        events, dropped = await aengine.call(lambda: engine.pool.events_since(since))
        return {"events": [[seq, kind, h.hex()] for seq, kind, h in events], "next": engine.pool.num_events,
                "dropped": dropped}

    @app.get("/microserving/watch")
    async def watch(since: int = 0, heartbeat_s: float = WATCH_HEARTBEAT_S):
        """One JSON line of status and prefix-cache events now, then one each time they change
        (at most every WATCH_INTERVAL_S) and at least every `heartbeat_s`: routers follow
        hundreds of engines this way instead of polling each. Events are [seq, kind, hash];
        when `since` is older than the events kept, `hashes` lists the whole prefix cache."""
        heartbeat_s = min(max(heartbeat_s, WATCH_INTERVAL_S), 60.0)
        return StreamingResponse(_watch_lines(engine, aengine, status_now, since, heartbeat_s),
                                 media_type="application/x-ndjson")


async def _watch_lines(engine: LLMEngine, aengine: AsyncEngine, status_now: Callable[[], dict], since: int,
                       heartbeat_s: float) -> AsyncIterator[str]:
    changed = aengine.watch()
    next_event, last_status, due = since, None, True  # the first line goes out at once
    try:
        while True:
            changed.clear()
            # Plain reads of the pool and scheduler from this thread, as /status does.
            status = status_now()
            events, dropped = engine.pool.events_since(next_event)
            dropped = dropped or next_event > engine.pool.num_events  # numbered by an earlier process
            if due or events or dropped or status != last_status:
                body, next_event = _watch_message(engine, status, events, dropped, next_event)
                last_status = status
                yield json.dumps(body) + "\n"
            await asyncio.sleep(WATCH_INTERVAL_S)  # coalesce: a busy engine changes every step
            try:
                await asyncio.wait_for(changed.wait(), heartbeat_s)
                due = False
            except asyncio.TimeoutError:
                due = True  # nothing changed: a heartbeat
    finally:
        aengine.unwatch(changed)


def _watch_message(engine: LLMEngine, status: dict, events: list, dropped: bool, next_event: int) -> tuple[dict, int]:
    """One watch line, and the event number the next one starts from."""
    body = {"status": status, "events": [[seq, kind, h.hex()] for seq, kind, h in events]}
    if dropped:  # fell behind the kept events: the whole cache instead
        body["events"], body["hashes"] = [], [h.hex() for h in list(engine.pool.cached)]
    next_event = engine.pool.num_events if dropped else (events[-1][0] + 1 if events else next_event)
    body["next"] = next_event
    return body, next_event
