"""OpenAI-shaped errors: the body every front answers with, and the handlers that map
exceptions to statuses so no internals ever reach a client."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from microserve.api.render import sse
from microserve.errors import Conflict, NotFound, RequestFailed, UserError

log = logging.getLogger("microserve.server")


class ModelNotFound(Exception):
    """The request names a model this server does not serve (HTTP 404)."""


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def check_model(name: str, served: str) -> None:
    if name != served:
        raise ModelNotFound(f"The model `{name}` does not exist. This server serves `{served}`.")


def busy_response(exc: Exception) -> JSONResponse:
    """429 with Retry-After: a full queue, here or on an engine."""
    return JSONResponse(error_body(f"server busy: {exc}", "rate_limit_error"), status_code=429,
                        headers={"Retry-After": "1"})


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    first = errors[0] if errors else {}
    param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", param
    if first.get("type") == "extra_forbidden":
        return f"unrecognized request argument supplied: {param}", param
    return f"{param or 'body'}: {first.get('msg', 'invalid value')}", param


def install_error_handlers(app: FastAPI) -> None:
    """The handlers both fronts need; each front adds those of its own exceptions."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(UserError)
    async def _user_error(request, exc: UserError):  # a kind may name the parameter at fault
        return JSONResponse(error_body(str(exc), param=getattr(exc, "param", None), code=getattr(exc, "code", None)),
                            status_code=400)

    @app.exception_handler(Conflict)
    async def _conflict(request, exc: Conflict):
        return JSONResponse(error_body(str(exc), "conflict_error"), status_code=409)

    @app.exception_handler(NotFound)
    async def _missing(request, exc: NotFound):
        return JSONResponse(error_body(str(exc), "NotFoundError"), status_code=404)

    @app.exception_handler(ModelNotFound)
    async def _not_found(request, exc: ModelNotFound):
        return JSONResponse(error_body(str(exc), "NotFoundError", "model", "model_not_found"), status_code=404)

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


async def sse_errors(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """A stream that fails after its first event ends with an OpenAI-shaped error event and
    [DONE] (its status line is long gone), so a client sees why it stopped, not a cut connection."""
    try:
        async for event in events:
            yield event
    except (RequestFailed, UserError) as e:
        status = 500 if isinstance(e, RequestFailed) else 409 if isinstance(e, Conflict) else 400
        kind = "internal_error" if status == 500 else "invalid_request_error"
        yield sse(error_body(str(e), kind, code=status))
        yield "data: [DONE]\n\n"
    except Exception:
        log.exception("internal error in a stream")
        yield sse(error_body("internal server error", "internal_error", code=500))
        yield "data: [DONE]\n\n"

