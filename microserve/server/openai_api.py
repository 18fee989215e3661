"""The OpenAI-compatible HTTP API of one engine: completions, chat, models, health, metrics."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response, StreamingResponse

from microserve import tracing
from microserve.api.errors import busy_response, check_model, error_body, install_error_handlers, sse_errors
from microserve.api.protocol import ChatCompletionRequest, CompletionRequest, prompt_list
from microserve.api.render import ChatRender, CompletionRender, Delta, accumulate
from microserve.api.responses import ResponsesAPI, ResponsesRequest
from microserve.api.security import DEFAULT_MAX_BODY_BYTES, install_security
from microserve.api.streams import ChatRun, merge, run_all
from microserve.engine.engine import LLMEngine
from microserve.engine.request import RequestOutput
from microserve.engine.sub_requests import TransferFailed
from microserve.sampling import SamplingParams
from microserve.server.async_engine import AsyncEngine, QueueFull
from microserve.server.fail_fast import exit_on_fatal
from microserve.server.metrics import EngineMetrics
from microserve.server.microserving_api import add_microserving_routes
from microserve.server import traces
from microserve.api.tools import chat_prompt_ids
from microserve.tokenizer import token_text


def build_app(engine: LLMEngine, model_name: str, max_waiting: int = 256, host: str = "127.0.0.1",
              kv_transport: str = "shm", api_keys: list[str] | None = None, cluster_token: str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    metrics = EngineMetrics(engine)
    receiver = None
    aengine = AsyncEngine(engine, max_waiting=max_waiting, observer=metrics,
                          on_fatal=exit_on_fatal(lambda: receiver.close(), engine.runner.kv.close))

    @asynccontextmanager
    async def lifespan(app):
        aengine.start()
        receiver.start()
        yield
        receiver.close()
        aengine.shutdown()
        engine.runner.kv.close()
        tracing.flush()

    app = FastAPI(title="microserve", lifespan=lifespan, telemetry=tracing.FASTAPI_TELEMETRY)
    app.state.engine = aengine
    app.state.metrics = metrics
    receiver = add_microserving_routes(app, engine, aengine, host, kv_transport, metrics)
    install_error_handlers(app)
    _install_engine_errors(app)
    install_security(app, api_keys=api_keys, cluster_token=cluster_token, max_body_bytes=max_body_bytes)
    tracing.install(app)
    _add_routes(app, OpenAIFront(engine, aengine, model_name), metrics)
    return app


def _install_engine_errors(app: FastAPI) -> None:
    @app.exception_handler(TransferFailed)
    async def _transfer(request, exc: TransferFailed):
        return JSONResponse(error_body(str(exc), "kv_transfer_error"), status_code=502)

    @app.exception_handler(QueueFull)
    async def _busy(request, exc: QueueFull):
        return busy_response(exc)


def _add_routes(app: FastAPI, front: "OpenAIFront", metrics: EngineMetrics) -> None:
    @app.get("/health")
    async def health():
        if not front.aengine.healthy:
            return JSONResponse({"status": "error"}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": front.model_name, "object": "model", "created": 0, "owned_by": "microserve",
            "max_model_len": front.engine.max_model_len,
        }]}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        return await front.completions(req)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest):
        return await front.chat(req)

    @app.post("/v1/responses")
    async def responses(req: ResponsesRequest):
        return await front.responses(req)


class OpenAIFront:
    """Completions, chat and responses on this engine: tokenize, admit, and render the outputs."""

    def __init__(self, engine: LLMEngine, aengine: AsyncEngine, model_name: str):
        self.engine = engine
        self.aengine = aengine
        self.model_name = model_name
        self.tokenizer = engine.tokenizer
        self.token_text = token_text(engine.tokenizer)
        self.responses_api = ResponsesAPI(model_name, self.token_text)  # this process's response store

    def prepare(self, prompt_ids: list[int], params: SamplingParams, max_tokens: int | None) -> SamplingParams:
        if max_tokens is None:  # up to the context window
            params.max_tokens = max(1, self.engine.max_model_len - len(prompt_ids))
        self.engine.validate(prompt_ids, params)
        return params

    async def start(self, rid: str, prompt_ids: list[list[int]], params: list[SamplingParams]) -> list:
        """One output stream per prompt (ids `rid-i`); all or none of them admitted."""
        for p in params:  # a grammar compiled off the engine loop, before anything is admitted
            await self.aengine.prepare(p)
        gens = []
        try:
            for i, (ids, p) in enumerate(zip(prompt_ids, params)):
                gens.append(self.generate(f"{rid}-{i}", ids, p))
        except Exception:
            for j in range(len(gens)):  # never iterated: abort them by id
                self.aengine.abort(f"{rid}-{j}")
            raise
        return gens

    def generate(self, rid: str, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Admit one prompt (traced as `engine.generate` when tracing is on)."""
        outputs = self.aengine.generate(rid, prompt_ids, params)
        return traces.traced_generation(outputs, "engine.generate", rid, len(prompt_ids))

    def echo_text(self, prompt) -> str:
        if isinstance(prompt, str):
            return prompt
        return self.tokenizer.decode(prompt) if self.tokenizer else ""

    async def completions(self, req: CompletionRequest):
        check_model(req.model, self.model_name)
        prompts = prompt_list(req.prompt)
        prompt_ids = [self.engine.tokenize(p) for p in prompts]
        params = [self.prepare(ids, req.sampling_params(req.max_tokens, req.logprobs), req.max_tokens)
                  for ids in prompt_ids]
        for p in params:
            p.prompt_logprobs = req.prompt_logprobs
        rid = f"cmpl-{uuid.uuid4().hex}"
        gens = await self.start(rid, prompt_ids, params)
        echoes = [self.echo_text(p) if req.echo else "" for p in prompts]
        render = CompletionRender(rid, self.model_name, req.n, prompt_ids, self.token_text, echoes, req.include_usage)
        if not req.stream:
            return render.body([_final_deltas(out) for out in await run_all(gens)])
        return StreamingResponse(sse_errors(render.stream(_deltas(gens))), media_type="text/event-stream")

    async def start_chat(self, req: ChatCompletionRequest) -> ChatRun:
        """Admit a chat request; chat and responses render what it yields."""
        check_model(req.model, self.model_name)
        prompt_ids = chat_prompt_ids(self.tokenizer, req.message_dicts(), req.tools_offered, req.add_generation_prompt)
        max_tokens = req.completion_max_tokens
        params = self.prepare(prompt_ids, req.sampling_params(max_tokens, req.top_logprobs_wanted), max_tokens)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        await self.aengine.prepare(params)
        gen = self.generate(rid, prompt_ids, params)
        return ChatRun(rid, len(prompt_ids), _chat_deltas(gen))

    async def chat(self, req: ChatCompletionRequest):
        run = await self.start_chat(req)
        render = ChatRender(run.request_id, self.model_name, req.n, run.prompt_tokens, self.token_text,
                            req.include_usage, tools=bool(req.tools_offered))
        if not req.stream:
            return render.body(await accumulate(run.deltas))
        return StreamingResponse(sse_errors(render.stream(run.deltas)), media_type="text/event-stream")

    async def responses(self, req: ResponsesRequest):
        return await self.responses_api.create(req, self.start_chat)


def _final_deltas(out: RequestOutput) -> list[Delta]:
    return [Delta(c.index, c.text, c.token_ids, c.logprobs, c.finish_reason, out.prompt_logprobs)
            for c in out.outputs]


async def _deltas(gens) -> AsyncIterator[tuple[int, Delta]]:
    """(prompt index, what each choice added) as the engine produces it."""
    finished, started = set(), set()  # a finished choice is in every later output of its request: report it once
    async with aclosing(merge(gens)) as outputs:
        async for i, out in outputs:
            for c in out.outputs:
                if (i, c.index) not in finished:
                    if c.finish_reason:
                        finished.add((i, c.index))
                    first = (i, c.index) not in started
                    started.add((i, c.index))
                    yield i, Delta(c.index, c.delta_text, c.delta_token_ids, c.delta_logprobs, c.finish_reason,
                                   out.prompt_logprobs if first else None)


async def _chat_deltas(gen) -> AsyncIterator[Delta]:
    async with aclosing(_deltas([gen])) as deltas:
        async for _, d in deltas:
            yield d
