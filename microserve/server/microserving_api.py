"""The microserving API of one engine: prep_recv, remote_send, start_generate, abort, status.

Prompts are token ids; `request_id` names the same request on every engine.
"""

from __future__ import annotations

import asyncio
import os
import json
import time
import uuid

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from microserve.api.microserving import Abort, PrepRecv, RemoteSend, StartGenerate
from microserve.api.render import DONE, Delta, engine_chunk, usage
from microserve.api.streams import last
from microserve.engine.engine import LLMEngine
from microserve.errors import UserError
from microserve.kv_transfer.address import KVAddress, layout_fingerprint, local_node
from microserve.kv_transfer.progress import LayerProgress
from microserve.kv_transfer.receiver import KVReceiver
from microserve.kv_transfer.sender import send_kv
from microserve.kv_transfer.wire import TransferError
from microserve.server.async_engine import AsyncEngine


WATCH_INTERVAL_S = 0.1  # a watch stream sends at most this often
WATCH_HEARTBEAT_S = 5.0  # and at least this often, so a router notices a silent engine


class TransferFailed(Exception):
    """The peer refused or the transfer broke off (HTTP 502)."""


def add_microserving_routes(app: FastAPI, engine: LLMEngine, aengine: AsyncEngine, host: str, transport: str) -> KVReceiver:
    cfg = engine.model_config
    kv = engine.runner.kv
    dtype = str(engine.loaded.dtype).removeprefix("torch.")
    if getattr(engine.loaded, "quantization", "none") != "none":  # another model numerically: no KV mixing
        dtype += f"+{engine.loaded.quantization}-weights"
    fingerprint = layout_fingerprint(cfg.name, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype, kv.block_size)
    receiver = KVReceiver(kv, fingerprint, engine.microserving, host=host)
    instance = uuid.uuid4().hex  # changes when the engine restarts: routers then drop what they knew
    node = local_node()
    shm = {"k": kv.paths["k"], "v": kv.paths["v"], "num_slots": kv.num_slots} if kv.paths else None

    @app.post("/microserving/prep_recv")
    async def prep_recv(req: PrepRecv):
        r = await aengine.call(lambda: engine.microserving.prep_recv(req.request_id, req.prompt, req.end, req.lease_s))
        addr = KVAddress(request_id=req.request_id, host=receiver.host, port=receiver.port, block_ids=r["block_ids"],
                         begin=r["begin"], end=r["end"], offset=r["offset"], fingerprint=fingerprint,
                         token=r["token"], shm=shm, transport=transport if shm else "tcp", node=node)
        return {"kv_addr_info": addr.to_dict(), "prefix_matched_length": r["prefix_matched_length"],
                "prompt_length": r["prompt_length"]}

    @app.post("/microserving/remote_send")
    async def remote_send(req: RemoteSend):
        addr = KVAddress.from_dict(req.kv_addr_info)
        if addr.fingerprint != fingerprint:
            raise UserError(f"KV layout mismatch: receiver {addr.fingerprint}, this engine {fingerprint}")
        end = req.end + len(req.prompt) if req.end < 0 else req.end
        if not (0 <= req.begin <= end < len(req.prompt)) or end > addr.end or req.begin < addr.begin:
            raise UserError(f"[begin, end) = [{req.begin}, {end}) must lie in the reservation "
                            f"[{addr.begin}, {addr.end}) and below the prompt length")
        start = time.perf_counter()
        if req.begin == end:
            return {"tokens": 0, "bytes": 0, "seconds": 0.0, "transport": "none",
                    "reused_tokens": 0, "computed_tokens": 0}
        local_id = f"{req.request_id}@send-{uuid.uuid4().hex[:8]}"
        loop = asyncio.get_running_loop()
        computed = loop.create_future()

        def on_done(r):  # engine loop thread: the KV of [0, end) is complete
            loop.call_soon_threadsafe(lambda: computed.done() or computed.set_result(r))

        progress = LayerProgress(cfg.num_layers)
        await aengine.call(lambda: engine.add_prefill_only(local_id, req.prompt[:end], on_done, progress))
        try:
            addr.begin, addr.end = req.begin, end
            # Starts now: it sends layer i as soon as the engine has computed it.
            try:
                result = await asyncio.to_thread(send_kv, kv, progress, addr, fingerprint)
            except (TransferError, OSError) as e:
                raise TransferFailed(f"KV transfer to {addr.host}:{addr.port} failed: {e}") from None
            held = await computed
        finally:
            await aengine.call(lambda: engine.release_prefill(local_id))
        reused = min(held.num_cached_tokens, end)
        return {"tokens": result.tokens, "bytes": result.bytes, "seconds": time.perf_counter() - start,
                "transfer_seconds": result.seconds, "transport": result.transport,
                "reused_tokens": reused, "computed_tokens": end - reused}

    @app.post("/microserving/start_generate")
    async def start_generate(req: StartGenerate):
        params = req.sampling_params(req.max_tokens, req.logprobs)
        if req.max_tokens is None:
            params.max_tokens = max(1, engine.max_model_len - len(req.prompt))
        if req.generated and req.begin:
            raise UserError("`generated` (resume) cannot be combined with begin > 0")
        resume = (req.generated, req.generated_text_len) if req.generated else None
        gen = aengine.generate(req.request_id, req.prompt, params, resume)
        head = {"id": f"cmpl-{req.request_id}", "object": "text_completion", "created": int(time.time()),
                "model": req.model or cfg.name}

        if not req.stream:
            out = await last(gen)
            completion = sum(len(c.token_ids) for c in out.outputs)
            choices = [Delta(c.index, c.text, c.token_ids, c.logprobs, c.finish_reason).to_wire() for c in out.outputs]
            return {**head, "choices": choices,
                    "usage": usage(len(req.prompt), completion, cached_tokens=out.num_cached_tokens)}

        async def stream():
            async for out in gen:
                for c in out.outputs:
                    if c.delta_token_ids or c.finish_reason:
                        yield engine_chunk(head, [Delta(c.index, c.delta_text, c.delta_token_ids,
                                                        c.delta_logprobs, c.finish_reason)])
            yield DONE

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/microserving/abort")
    async def abort(req: Abort):
        found = await aengine.call(lambda: engine.abort_request(req.request_id))
        aengine.abort(req.request_id)  # also ends a stream being served here
        return {"ok": True, "found": found}

    def status_now() -> dict:
        return {**engine.stats(), **engine.microserving.stats(), "fingerprint": fingerprint, "instance": instance, "pid": os.getpid(),
                "healthy": aengine.healthy,
                "max_model_len": engine.max_model_len,
                "kv_transfer": {"host": receiver.host, "port": receiver.port, "shm": shm is not None, "node": node}}

    @app.get("/microserving/status")
    async def status():
        return status_now()

    @app.post("/microserving/prefix_match")
    async def prefix_match(body: dict):
        """How many leading tokens of `prompt` this engine holds in its prefix cache."""
        from microserve.engine.block_pool import hash_prompt_blocks

        prompt = body.get("prompt")
        if not isinstance(prompt, list) or not all(isinstance(t, int) for t in prompt):
            raise UserError("prompt must be a list of token ids")
        hashes = hash_prompt_blocks(prompt, engine.pool.block_size)
        blocks = await aengine.call(lambda: engine.pool.match_prefix(hashes))
        return {"matched_tokens": len(blocks) * engine.pool.block_size}

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

        async def lines():
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
                        body = {"status": status, "events": [[seq, kind, h.hex()] for seq, kind, h in events]}
                        if dropped:  # fell behind the kept events: the whole cache instead
                            body["events"], body["hashes"] = [], [h.hex() for h in list(engine.pool.cached)]
                        next_event = engine.pool.num_events if dropped else \
                            (events[-1][0] + 1 if events else next_event)
                        body["next"] = next_event
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

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    return receiver
