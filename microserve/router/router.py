"""The router: an OpenAI-compatible front that turns each request into sub-request calls
through the current strategy, which can be switched at run time through the admin API."""

from __future__ import annotations

import asyncio
import inspect
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from microserve.engine.microserving import Conflict, NotFound
from microserve.errors import UserError
from microserve.router import strategies
from microserve.router.cluster import Cluster, EngineDown, EngineError
from microserve.router.failover import Admission, Busy, Poisoned, with_failover
from microserve.server.metrics import LATENCY_BUCKETS
from microserve.server.openai_api import (
    ModelNotFound,
    _as_prompt_list,
    _merge,
    _sse,
    _usage,
    chat_logprobs,
    completion_logprobs,
    install_error_handlers,
)
from microserve.server.protocol import ChatCompletionRequest, CompletionRequest, error_body, sse_errors
from microserve.server.security import DEFAULT_MAX_BODY_BYTES, install_security

SAMPLING_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
                   "repetition_penalty", "stop", "stop_token_ids", "ignore_eos", "min_tokens", "max_tokens")


def build_router_app(cluster: Cluster, tokenizer, model_name: str, strategy: str = "round_robin",
                     params: dict | None = None, cluster_token: str | None = None,
                     api_keys: list[str] | None = None, max_active: int | None = None, max_queued: int = 4096,
                     max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, failover_wait_s: float = 30.0,
                     fleet=None, follow: str | None = None) -> FastAPI:
    """`fleet`, when given, starts and stops engines (e.g. Ray actors): it backs POST /admin/scale
    and is started and stopped with the app (see microserve/router/ray_fleet.py). `follow`, the
    URL of another router, makes this one a replica that mirrors that router's engines."""
    registry = CollectorRegistry()
    requests = Counter("microserve_router:requests", "Requests routed", ["strategy"], registry=registry)
    failures = Counter("microserve_router:request_errors", "Requests that failed", registry=registry)
    failovers = Counter("microserve_router:failovers", "Requests continued on another engine", registry=registry)
    rejected = Counter("microserve_router:rejected", "Requests refused with 429 (queue full)", registry=registry)
    # Enough in flight to fill every engine's batch and queue; the rest waits here, bounded.
    engines_at_start = max(len(cluster.engines), getattr(fleet, "initial_size", 0), 1)
    admission = Admission(max_active or 256 * engines_at_start, max_queued)
    ttft = Histogram("microserve_router:time_to_first_token_seconds", "Router-side TTFT",
                     buckets=LATENCY_BUCKETS, registry=registry)
    Gauge("microserve_router:engine_messages", "Status and prefix-cache messages received from engines",
          registry=registry).set_function(lambda: sum(e.messages for e in cluster.engines))
    Gauge("microserve_router:engines_up", "Engines whose status stream is live", registry=registry
          ).set_function(lambda: sum(e.healthy for e in cluster.engines))
    # (name, function, params): replaced as a whole, so each request keeps the one it started with.
    state = {"current": _resolve(strategy, None, params or {})}

    @asynccontextmanager
    async def lifespan(app):
        await cluster.start()
        if fleet is not None:
            await fleet.start(cluster)
        following = asyncio.create_task(cluster.follow(follow)) if follow else None
        yield
        if following is not None:
            following.cancel()
            await asyncio.gather(following, return_exceptions=True)
        if fleet is not None:
            await fleet.stop()
        await cluster.stop()

    app = FastAPI(title="microserve router", lifespan=lifespan)
    install_error_handlers(app)
    install_security(app, api_keys=api_keys, cluster_token=cluster_token, max_body_bytes=max_body_bytes,
                     cluster_paths=(), admin_paths=("/admin/",))

    @app.exception_handler(EngineError)
    async def _engine_error(request, exc: EngineError):
        if 400 <= exc.status < 500:  # the client's mistake, as the engine explained it
            headers = {"Retry-After": exc.retry_after} if exc.retry_after else None
            body = exc.body if "error" in exc.body else error_body(str(exc))
            return JSONResponse(body, status_code=exc.status, headers=headers)
        # An engine failed: say so without passing on what it said (it may name internals).
        return JSONResponse(error_body("an engine failed to serve this request", "engine_error"), status_code=502)

    @app.exception_handler(EngineDown)
    async def _engine_down(request, exc: EngineDown):
        return JSONResponse(error_body("no engine is available to serve this request", "engine_error"),
                            status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(Poisoned)
    async def _poisoned(request, exc: Poisoned):
        return JSONResponse(error_body(str(exc), "engine_error", code=502), status_code=502)

    @app.exception_handler(Busy)
    async def _busy(request, exc: Busy):
        rejected.inc()
        return JSONResponse(error_body(f"server busy: {exc}", "rate_limit_error"), status_code=429,
                            headers={"Retry-After": "1"})

    # ------------------------------------------------------------ serving

    async def route(prompt_ids: list[int], sampling: dict):
        """Start the request on the current strategy; return (first chunk, the rest)."""
        name, fn, kwargs = state["current"]
        requests.labels(strategy=name).inc()
        req = strategies.Request(f"r-{uuid.uuid4().hex}", prompt_ids, sampling)
        start = time.monotonic()
        await admission.acquire()
        chunks = admitted(with_failover(fn(req, cluster, **kwargs), req, cluster, wait_s=failover_wait_s,
                                        on_failover=failovers.inc)).__aiter__()
        try:
            first = await chunks.__anext__()  # errors before any output become HTTP errors
        except StopAsyncIteration:
            first = None
        except Exception:
            failures.inc()
            await chunks.aclose()
            raise
        ttft.observe(time.monotonic() - start)
        return first, chunks

    async def admitted(chunks):
        """Hold an admission slot until the stream ends or is closed."""
        try:
            async for c in chunks:
                yield c
        finally:
            admission.release()

    async def all_chunks(first, chunks):
        if first is not None:
            yield first
        async for c in chunks:
            yield c

    def check_model(name):
        if name != model_name:
            raise ModelNotFound(f"The model `{name}` does not exist. This server serves `{model_name}`.")

    def sampling_of(req, max_tokens, logprobs) -> dict:
        fields = {k: getattr(req, k) for k in SAMPLING_FIELDS if hasattr(req, k) and getattr(req, k) is not None}
        fields["max_tokens"] = max_tokens
        if max_tokens is None:
            fields.pop("max_tokens")
        if logprobs is not None:
            fields["logprobs"] = logprobs
        req.sampling_params(max_tokens, logprobs)  # the same checks an engine makes, answered here
        return fields

    def token_text(t: int) -> str:
        return tokenizer.decode([t])

    async def collect(first, chunks):
        """Per choice index: text, token ids, logprobs (or None) and finish reason."""
        out: dict[int, dict] = {}
        async for c in all_chunks(first, chunks):
            for ch in c["choices"]:
                o = out.setdefault(ch["index"], {"text": "", "ids": [], "lps": None, "finish": None})
                o["text"] += ch["text"]
                o["ids"] += ch["token_ids"]
                if ch.get("logprobs") is not None:
                    o["lps"] = (o["lps"] or []) + ch["logprobs"]
                o["finish"] = ch["finish_reason"] or o["finish"]
        return out

    async def tokenize(prompt) -> list[int]:
        if isinstance(prompt, str):  # in a thread: a long prompt would stall every stream this loop serves
            return await asyncio.to_thread(lambda: tokenizer(prompt, add_special_tokens=True).input_ids)
        return list(prompt)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        check_model(req.model)
        prompts = _as_prompt_list(req.prompt)  # each prompt is routed as its own request
        ids_list = [await tokenize(p) for p in prompts]
        if not all(ids_list):
            raise UserError("the prompt is empty")
        sampling = sampling_of(req, req.max_tokens, req.logprobs)
        routed = []
        try:
            for ids in ids_list:
                routed.append(await route(ids, sampling))
        except Exception:
            for _, chunks in routed:  # closing them aborts what already started
                await chunks.aclose()
            raise
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name}
        echoes = [(p if isinstance(p, str) else tokenizer.decode(ids)) if req.echo else ""
                  for p, ids in zip(prompts, ids_list)]
        prompt_tokens = sum(map(len, ids_list))
        if not req.stream:
            outs = await asyncio.gather(*(collect(first, chunks) for first, chunks in routed))
            choices = [{"index": i * req.n + j, "text": echoes[i] + o["text"], "finish_reason": o["finish"],
                        "logprobs": completion_logprobs(token_text, o["ids"], o["lps"], len(echoes[i]))}
                       for i, out in enumerate(outs) for j, o in sorted(out.items())]
            completion = sum(len(o["ids"]) for out in outs for o in out.values())
            return {**head, "choices": choices, "usage": _usage(prompt_tokens, completion)}

        async def stream():
            completion, echoed = 0, set()
            async for i, c in _merge([all_chunks(first, chunks) for first, chunks in routed]):
                for ch in c["choices"]:
                    index = i * req.n + ch["index"]
                    completion += len(ch["token_ids"])
                    text = ch["text"]
                    if echoes[i] and index not in echoed:
                        echoed.add(index)
                        text = echoes[i] + text
                    choice = {"index": index, "text": text, "finish_reason": ch["finish_reason"],
                              "logprobs": completion_logprobs(token_text, ch["token_ids"], ch.get("logprobs"))}
                    yield _sse({**head, "choices": [choice], **({"usage": None} if req.include_usage else {})})
            if req.include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, completion)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse_errors(stream()), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest):
        check_model(req.model)
        try:
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        except ValueError as e:
            raise UserError(str(e)) from None

        def chat_ids() -> list[int]:
            text = tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=req.add_generation_prompt)
            return tokenizer(text, add_special_tokens=False).input_ids

        ids = await asyncio.to_thread(chat_ids)  # off the event loop, as in tokenize
        max_tokens = req.max_completion_tokens or req.max_tokens
        first, chunks = await route(ids, sampling_of(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None))
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if not req.stream:
            out = await collect(first, chunks)
            choices = [{"index": i, "message": {"role": "assistant", "content": o["text"], "refusal": None},
                        "logprobs": chat_logprobs(token_text, o["ids"], o["lps"]), "finish_reason": o["finish"]}
                       for i, o in sorted(out.items())]
            completion = sum(len(o["ids"]) for o in out.values())
            return {**head, "object": "chat.completion", "choices": choices, "usage": _usage(len(ids), completion)}

        async def stream():
            base = {**head, "object": "chat.completion.chunk"}
            extra = {"usage": None} if req.include_usage else {}
            for i in range(req.n):
                yield _sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}], **extra})
            completion = 0
            async for c in all_chunks(first, chunks):
                for ch in c["choices"]:
                    completion += len(ch["token_ids"])
                    if ch["text"] or ch["token_ids"]:
                        lps = chat_logprobs(token_text, ch["token_ids"], ch.get("logprobs"))
                        yield _sse({**base, "choices": [{"index": ch["index"], "delta": {"content": ch["text"]},
                                                         "logprobs": lps, "finish_reason": None}], **extra})
                    if ch["finish_reason"]:
                        yield _sse({**base, "choices": [{"index": ch["index"], "delta": {}, "logprobs": None,
                                                         "finish_reason": ch["finish_reason"]}], **extra})
            if req.include_usage:
                yield _sse({**base, "choices": [], "usage": _usage(len(ids), completion)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse_errors(stream()), media_type="text/event-stream")

    # ------------------------------------------------------------ small routes

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "microserve"}]}

    @app.get("/health")
    async def health():
        up = sum(e.healthy for e in cluster.engines)
        return JSONResponse({"status": "ok" if up else "error", "engines_up": up, "engines": len(cluster.engines)},
                            status_code=200 if up else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")

    # ------------------------------------------------------------ admin

    @app.get("/admin/strategy")
    async def get_strategy():
        # Every /admin/ route is behind the cluster token (see server/security.py).
        name, _, kwargs = state["current"]
        return {"name": name, "params": kwargs, "roles": [e.role for e in cluster.engines]}

    @app.post("/admin/strategy")
    async def set_strategy(body: StrategyChange):
        try:
            new = _resolve(body.name, body.source, body.params)
            if body.roles is not None:
                cluster.set_roles(body.roles)
        except (ValueError, SyntaxError, TypeError) as e:
            raise UserError(f"cannot use this strategy: {e}") from None
        state["current"] = new  # requests already running keep the strategy they started with
        return {"name": new[0], "params": new[2], "roles": [e.role for e in cluster.engines]}

    @app.get("/admin/engines")
    async def list_engines():
        return {"engines": [e.describe() for e in cluster.engines + cluster.draining]}

    @app.post("/admin/engines")
    async def change_engines(body: MembershipChange):
        """add: into rotation; drain: no new requests, returns once what it holds has finished and
        it is removed; remove: out now (its requests continue elsewhere)."""
        if body.action == "add":
            try:
                engine = await cluster.add(body.url, body.role)
            except ValueError as e:
                raise UserError(str(e)) from None
            if not engine.healthy:
                await cluster.remove(engine)
                raise UserError(f"engine {body.url} did not answer its status")
            return engine.describe()
        engine = cluster.find(body.url)
        if engine is None:
            raise NotFound(f"no engine {body.url} in this router")
        if fleet is not None and fleet.owns(engine):  # an actor: stop it too
            idle = await fleet.retire(engine, drain=body.action == "drain", timeout_s=body.timeout_s)
        elif body.action == "drain":
            idle = await cluster.drain(engine, body.timeout_s)
        else:
            await cluster.remove(engine)
            idle = None
        return {**engine.describe(), "drained": idle}

    @app.post("/admin/scale")
    async def scale(body: ScaleChange):
        """Start or drain engines (a fleet's, e.g. Ray actors) until `role` has `engines` of them."""
        if fleet is None:
            raise Conflict("this router does not start engines (serve --ray does): add or drain them "
                           "through POST /admin/engines")
        from microserve.router.ray_fleet import FleetError

        try:
            started, drained = await fleet.scale(body.role, body.engines)
        except FleetError as e:
            return JSONResponse(error_body(str(e), "fleet_error"), status_code=503)
        return {"role": body.role, "engines": [e.describe() for e in cluster.engines if e.role == body.role],
                "started": [e.url for e in started], "drained": [e.url for e in drained]}

    return app


class MembershipChange(BaseModel):
    """Body of POST /admin/engines."""

    model_config = ConfigDict(extra="forbid")
    action: Literal["add", "drain", "remove"]
    url: str = Field(min_length=1, max_length=2048)
    role: Literal["both", "prefill", "decode"] = "both"
    timeout_s: float | None = Field(default=None, gt=0)  # drain: remove anyway after this long


class ScaleChange(BaseModel):
    """Body of POST /admin/scale."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["both", "prefill", "decode"]
    engines: int = Field(ge=0, le=4096)


class StrategyChange(BaseModel):
    """Body of POST /admin/strategy."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    source: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    roles: list[str] | None = None


def _resolve(name: str | None, source: str | None, params: dict):
    """(name, async generator function, params) for a built-in name, a .py path, or source text."""
    if source:
        fn = strategies.load_strategy_source(source)
        name = name or getattr(fn, "__name__", "custom")
    elif not name:
        raise ValueError("give a strategy `name` or its `source`")
    elif name in strategies.BUILTIN:
        fn = strategies.BUILTIN[name]
    elif name.endswith(".py"):
        fn = strategies.load_strategy_file(name)
    else:
        raise ValueError(f"unknown strategy {name!r} (built in: {', '.join(strategies.BUILTIN)})")
    try:  # unknown parameter names are refused now, not on every request later
        inspect.signature(fn).bind(None, None, **params)
    except TypeError as e:
        raise ValueError(f"parameters {sorted(params)} do not fit {name}: {e}") from None
    return name, fn, params

