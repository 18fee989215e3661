"""The OpenAI-compatible HTTP API of one engine: completions, chat, models, health, metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from microserve.engine.engine import LLMEngine
from microserve.engine.request import RequestOutput
from microserve.errors import RequestFailed, UserError
from microserve.sampling import SamplingParams
from microserve.server.async_engine import AsyncEngine, QueueFull
from microserve.engine.microserving import Conflict, NotFound
from microserve.server.metrics import EngineMetrics
from microserve.server.microserving_api import TransferFailed, add_microserving_routes
from microserve.server.protocol import MAX_PROMPTS, ChatCompletionRequest, CompletionRequest, error_body, sse_errors
from microserve.server.security import DEFAULT_MAX_BODY_BYTES, install_security

log = logging.getLogger("microserve.server")


class ModelNotFound(Exception):
    pass


# When the engine loop dies (the forward pass failed), the KV cache and the scheduler are in an
# unknown state: the process exits, and its supervisor (`serve`, Ray) starts a fresh engine.
FATAL_EXIT_CODE = 70  # EX_SOFTWARE
FATAL_GRACE_S = 0.5  # for the failed requests' error answers to go out first


def exit_on_fatal(*cleanups):
    """An `on_fatal` for AsyncEngine: log, run `cleanups` (shared-memory files), exit the process."""
    def on_fatal(error: BaseException) -> None:
        log.critical("the engine loop failed (%s: %s); exiting so that a fresh engine takes over",
                     type(error).__name__, error, exc_info=error)
        time.sleep(FATAL_GRACE_S)
        for cleanup in cleanups:
            try:
                cleanup()
            except Exception:
                log.exception("cleanup after the engine loop failed")
        os._exit(FATAL_EXIT_CODE)

    return on_fatal


def build_app(engine: LLMEngine, model_name: str, max_waiting: int = 256, host: str = "127.0.0.1",
              kv_transport: str = "shm", api_keys: list[str] | None = None, cluster_token: str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    metrics = EngineMetrics(engine)
    aengine = AsyncEngine(engine, max_waiting=max_waiting, observer=metrics,
                          on_fatal=exit_on_fatal(lambda: receiver.close(), engine.runner.kv.close))
    tokenizer = engine.tokenizer

    @asynccontextmanager
    async def lifespan(app):
        aengine.start()
        receiver.start()
        yield
        receiver.close()
        aengine.shutdown()
        engine.runner.kv.close()

    app = FastAPI(title="microserve", lifespan=lifespan)
    app.state.engine = aengine
    app.state.metrics = metrics
    receiver = add_microserving_routes(app, engine, aengine, host, kv_transport)

    install_error_handlers(app)
    install_security(app, api_keys=api_keys, cluster_token=cluster_token, max_body_bytes=max_body_bytes)

    # ------------------------------------------------------------ small routes

    @app.get("/health")
    async def health():
        if not aengine.healthy:
            return JSONResponse({"status": "error"}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": 0, "owned_by": "microserve",
            "max_model_len": engine.max_model_len,
        }]}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    # ------------------------------------------------------------ completions

    def check_model(name: str) -> None:
        if name != model_name:
            raise ModelNotFound(f"The model `{name}` does not exist. This server serves `{model_name}`.")

    def prepare(prompt_ids: list[int], params: SamplingParams, max_tokens: int | None) -> SamplingParams:
        if max_tokens is None:  # up to the context window
            params.max_tokens = max(1, engine.max_model_len - len(prompt_ids))
        engine.validate(prompt_ids, params)
        return params

    def token_text(token_id: int) -> str:
        return tokenizer.decode([token_id]) if tokenizer is not None else str(token_id)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        check_model(req.model)
        prompts = _as_prompt_list(req.prompt)
        prompt_ids = [engine.tokenize(p) for p in prompts]
        plist = [prepare(ids, req.sampling_params(req.max_tokens, req.logprobs), req.max_tokens) for ids in prompt_ids]
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        gens = []
        try:
            for i, (ids, p) in enumerate(zip(prompt_ids, plist)):
                gens.append(aengine.generate(f"{rid}-{i}", ids, p))
        except Exception:
            for j in range(len(gens)):  # never iterated: abort them by id
                aengine.abort(f"{rid}-{j}")
            raise
        n = req.n
        echo_texts = [p if isinstance(p, str) else (tokenizer.decode(p) if tokenizer else "") for p in prompts]
        head = {"id": rid, "object": "text_completion", "created": created, "model": model_name}

        def logprobs_block(lps, ids, start_offset):
            return completion_logprobs(token_text, ids, lps, start_offset)

        if not req.stream:
            finals = await _collect(gens)
            choices, completion_tokens = [], 0
            for i, out in enumerate(finals):
                for c in out.outputs:
                    prefix = echo_texts[i] if req.echo else ""
                    choices.append({"index": i * n + c.index, "text": prefix + c.text,
                                    "logprobs": logprobs_block(c.logprobs, c.token_ids, len(prefix)),
                                    "finish_reason": c.finish_reason})
                    completion_tokens += len(c.token_ids)
            return {**head, "choices": choices,
                    "usage": _usage(sum(map(len, prompt_ids)), completion_tokens)}

        async def stream():
            completion_tokens, echoed = 0, set()
            async for i, out in _merge(gens):
                for c in out.outputs:
                    index = i * n + c.index
                    text = c.delta_text
                    if req.echo and index not in echoed:
                        echoed.add(index)
                        text = echo_texts[i] + text
                    completion_tokens += len(c.delta_token_ids)
                    if not text and not c.delta_token_ids and not c.finish_reason:
                        continue
                    choice = {"index": index, "text": text,
                              "logprobs": logprobs_block(c.delta_logprobs, c.delta_token_ids, 0),
                              "finish_reason": c.finish_reason}
                    yield _sse({**head, "choices": [choice], **({"usage": None} if req.include_usage else {})})
            if req.include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(sum(map(len, prompt_ids)), completion_tokens)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse_errors(stream()), media_type="text/event-stream")

    # ------------------------------------------------------------ chat

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest):
        check_model(req.model)
        if tokenizer is None or not tokenizer.chat_template:
            raise UserError("this model has no chat template: use /v1/completions")
        try:
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        except ValueError as e:
            raise UserError(str(e)) from None
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=req.add_generation_prompt)
        prompt_ids = tokenizer(text, add_special_tokens=False).input_ids
        max_tokens = req.max_completion_tokens or req.max_tokens
        top = (req.top_logprobs or 0) if req.logprobs else None
        params = prepare(prompt_ids, req.sampling_params(max_tokens, top), max_tokens)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        gen = aengine.generate(rid, prompt_ids, params)
        head = {"id": rid, "created": created, "model": model_name}

        def logprobs_block(lps, ids):
            return chat_logprobs(token_text, ids, lps)

        if not req.stream:
            (out,) = await _collect([gen])
            choices = [{"index": c.index,
                        "message": {"role": "assistant", "content": c.text, "refusal": None},
                        "logprobs": logprobs_block(c.logprobs, c.token_ids),
                        "finish_reason": c.finish_reason} for c in out.outputs]
            completion_tokens = sum(len(c.token_ids) for c in out.outputs)
            return {**head, "object": "chat.completion", "choices": choices,
                    "usage": _usage(len(prompt_ids), completion_tokens)}

        async def stream():
            head_chunk = {**head, "object": "chat.completion.chunk"}
            extra = {"usage": None} if req.include_usage else {}
            for i in range(req.n):
                yield _sse({**head_chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                       "logprobs": None, "finish_reason": None}], **extra})
            completion_tokens = 0
            async for _, out in _merge([gen]):
                for c in out.outputs:
                    completion_tokens += len(c.delta_token_ids)
                    if c.delta_text or c.delta_token_ids:
                        yield _sse({**head_chunk, "choices": [{
                            "index": c.index, "delta": {"content": c.delta_text},
                            "logprobs": logprobs_block(c.delta_logprobs, c.delta_token_ids),
                            "finish_reason": None}], **extra})
                    if c.finish_reason and c.finish_reason != "abort":
                        yield _sse({**head_chunk, "choices": [{"index": c.index, "delta": {}, "logprobs": None,
                                                               "finish_reason": c.finish_reason}], **extra})
            if req.include_usage:
                yield _sse({**head_chunk, "choices": [], "usage": _usage(len(prompt_ids), completion_tokens)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse_errors(stream()), media_type="text/event-stream")

    return app


# ---------------------------------------------------------------- helpers


def install_error_handlers(app: FastAPI) -> None:
    """OpenAI-shaped errors with the right status; no internals ever reach a client."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        if first.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        else:
            message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(UserError)
    async def _user_error(request, exc: UserError):
        return JSONResponse(error_body(str(exc)), status_code=400)

    @app.exception_handler(Conflict)
    async def _conflict(request, exc: Conflict):
        return JSONResponse(error_body(str(exc), "conflict_error"), status_code=409)

    @app.exception_handler(NotFound)
    async def _missing(request, exc: NotFound):
        return JSONResponse(error_body(str(exc), "NotFoundError"), status_code=404)

    @app.exception_handler(TransferFailed)
    async def _transfer(request, exc: TransferFailed):
        return JSONResponse(error_body(str(exc), "kv_transfer_error"), status_code=502)

    @app.exception_handler(ModelNotFound)
    async def _not_found(request, exc: ModelNotFound):
        return JSONResponse(error_body(str(exc), "NotFoundError", "model", "model_not_found"), status_code=404)

    @app.exception_handler(QueueFull)
    async def _busy(request, exc: QueueFull):
        return JSONResponse(error_body(f"server busy: {exc}", "rate_limit_error"), status_code=429,
                            headers={"Retry-After": "1"})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), status_code=exc.status_code)

    @app.exception_handler(RequestFailed)
    async def _failed(request, exc: RequestFailed):
        return JSONResponse(error_body(str(exc), "internal_error", code=500), status_code=500)

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        log.exception("internal error")  # the details stay in the server's log
        return JSONResponse(error_body("internal server error", "internal_error", code=500), status_code=500)



def completion_logprobs(token_text, ids: list[int], lps, start_offset: int = 0) -> dict | None:
    """The completions API's logprobs: `lps[i]` = (logprob, [(token id, logprob), ...])."""
    if lps is None:
        return None
    tokens = [token_text(t) for t in ids]
    offsets, pos = [], start_offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": [lp for lp, _ in lps],
            "top_logprobs": [{token_text(t): v for t, v in top} for _, top in lps], "text_offset": offsets}


def chat_logprobs(token_text, ids: list[int], lps) -> dict | None:
    """The chat API's logprobs (`content` entries with bytes and top alternatives)."""
    if lps is None:
        return None
    content = []
    for (lp, alts), t in zip(lps, ids):
        s = token_text(t)
        content.append({"token": s, "logprob": lp, "bytes": list(s.encode()),
                        "top_logprobs": [{"token": token_text(a), "logprob": v,
                                          "bytes": list(token_text(a).encode())} for a, v in alts]})
    return {"content": content}


def _as_prompt_list(prompt) -> list:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise UserError("prompt is empty")
    if all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    if len(prompt) > MAX_PROMPTS:
        raise UserError(f"at most {MAX_PROMPTS} prompts per request, got {len(prompt)}")
    return list(prompt)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _collect(gens) -> list[RequestOutput]:
    """Run every generator to its final output, concurrently."""
    async def last(gen):
        out = None
        async for out in gen:
            pass
        return out

    return list(await asyncio.gather(*(last(g) for g in gens)))


async def _merge(gens) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several output streams as they produce; closing this closes them all."""
    if len(gens) == 1:
        async for out in gens[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i, gen):
        try:
            async for out in gen:
                await queue.put((i, out))
            await queue.put((i, done))
        except Exception as e:
            await queue.put((i, e))
        finally:
            await gen.aclose()

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
                continue
            if isinstance(item, Exception):
                raise item
            yield i, item
    finally:
        for t in tasks:
            t.cancel()

