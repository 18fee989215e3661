"""The router's OpenAI routes (completions, chat, responses) as a bare ASGI layer in front of
FastAPI. These carry every request the router serves, and FastAPI's stack (routing,
dependency solving, its exception middleware, Starlette's anyio-based streaming response)
cost more CPU per request than the rest of the router together. Here a request body is
validated by its pydantic model straight from the bytes, and a stream's events go to the
server as they come. Errors are answered by the app's own exception handlers, so every route
answers errors alike. The other routes (admin, health, metrics, dashboard) stay on FastAPI."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.responses import JSONResponse, Response

from microserve.api.protocol import ChatCompletionRequest, CompletionRequest
from microserve.api.responses import ResponsesRequest

SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


class HotRoutes:
    """ASGI middleware: POSTs to the OpenAI routes are served by `front` (a RouterFront), whose
    methods answer a dict (JSON), a Starlette response, or an async iterator of SSE events."""

    def __init__(self, app, front, handlers: dict):
        self.app = app
        self.routes = {"/v1/completions": (CompletionRequest, front.completions),
                       "/v1/chat/completions": (ChatCompletionRequest, front.chat),
                       "/v1/responses": (ResponsesRequest, front.responses)}
        self.handlers = handlers  # the FastAPI app's exception handlers (filled in as they are added)

    async def __call__(self, scope, receive, send):
        route = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        if route is None:
            return await self.app(scope, receive, send)
        if scope["method"] != "POST":
            return await JSONResponse({"detail": "Method Not Allowed"}, 405, {"Allow": "POST"})(scope, receive, send)
        model, handle = route
        try:
            result = await handle(parse(model, await read_body(receive)))
        except Exception as exc:
            return await (await self.error_response(exc))(scope, receive, send)
        if isinstance(result, Response):
            return await result(scope, receive, send)
        if isinstance(result, (dict, BaseModel)):
            body = result if isinstance(result, dict) else result.model_dump(mode="json")
            return await JSONResponse(body)(scope, receive, send)
        await stream_events(result, receive, send)

    async def error_response(self, exc: Exception) -> Response:
        """What the app's handler for `exc` (the closest class in its MRO) answers."""
        for cls in type(exc).__mro__:
            handler = self.handlers.get(cls)
            if handler is not None:
                return await handler(None, exc)
        raise exc


async def read_body(receive) -> bytes:
    """The whole request body (its size was already bounded by the security layer)."""
    chunks, more = [], True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


def parse(model: type[BaseModel], body: bytes) -> BaseModel:
    """The request as `model`, or the RequestValidationError FastAPI would raise for it."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None


async def stream_events(events: AsyncIterator[str], receive, send) -> None:
    """Send SSE events as they come. A client that goes away cancels the stream at once (closing
    `events`, which aborts its work on the engines), not at its next event."""
    task = asyncio.current_task()
    state = {"done": False, "gone": False}

    async def watch():
        while (await receive())["type"] != "http.disconnect":
            pass
        if not state["done"]:
            state["gone"] = True
            task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        async with aclosing(events):
            async for event in events:
                await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
        state["done"] = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    except asyncio.CancelledError:
        if not state["gone"]:
            raise
        task.uncancel()
    finally:
        state["done"] = True
        watcher.cancel()
