"""The router's HTTP front: OpenAI-compatible routes, health and metrics, and the admin API
(strategy, membership, scale). Thin: the work is done by `Router` (router.py)."""

from __future__ import annotations

from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, Literal

from fastapi import FastAPI, Query
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from microserve import tracing
from microserve.api.errors import busy_response, error_body, install_error_handlers
from microserve.api.security import DEFAULT_MAX_BODY_BYTES, install_security
from microserve.router.cluster import EngineDown, EngineError
from microserve.router.failover import Busy, Poisoned
from microserve.router.fleet import FleetError
from microserve.router.hot_routes import HotRoutes
from microserve.router.openai_front import RouterFront
from microserve.router.prometheus import prometheus_targets
from microserve.router.router import Router


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


def build_router_app(router: Router, tokenizer, model_name: str, cluster_token: str | None = None,
                     api_keys: list[str] | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        await router.start()
        yield
        await router.stop()
        tracing.flush()

    app = FastAPI(title="microserve router", lifespan=lifespan, telemetry=tracing.FASTAPI_TELEMETRY)
    install_error_handlers(app)
    _install_router_errors(app, router)
    front = RouterFront(router, tokenizer, model_name)
    # POST /v1/completions, /v1/chat/completions and /v1/responses, inside the security layer
    app.add_middleware(HotRoutes, front=front, handlers=app.exception_handlers)
    # Every /admin/ route is behind the cluster token.
    install_security(app, api_keys=api_keys, cluster_token=cluster_token, max_body_bytes=max_body_bytes,
                     cluster_paths=(), admin_paths=("/admin/",))
    tracing.install(app)  # a client's traceparent becomes the parent of its requests' spans
    _add_openai_routes(app, router, front)
    _add_admin_routes(app, router)
    _add_dashboard_routes(app, router)
    return app


def _install_router_errors(app: FastAPI, router: Router) -> None:
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
        router.metrics.rejected.inc()
        return busy_response(exc)

    @app.exception_handler(FleetError)
    async def _fleet(request, exc: FleetError):
        return JSONResponse(error_body(str(exc), "fleet_error"), status_code=503)


def _add_openai_routes(app: FastAPI, router: Router, front: RouterFront) -> None:
    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": front.model_name, "object": "model", "created": 0,
                                            "owned_by": "microserve", "max_model_len": router.max_model_len}]}

    @app.get("/health")
    async def health():
        h = router.health()
        return JSONResponse(h, status_code=200 if h["engines_up"] else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(router.metrics.render(), media_type="text/plain; version=0.0.4")


def _add_admin_routes(app: FastAPI, router: Router) -> None:
    @app.get("/admin/strategy")
    async def get_strategy():
        return router.describe_strategy()

    @app.post("/admin/strategy")
    async def set_strategy(body: StrategyChange):
        return router.set_strategy(body.name, body.source, body.params, body.roles)

    @app.get("/admin/engines")
    async def list_engines():
        return {"engines": router.describe_engines()}

    @app.get("/admin/prometheus_targets")
    async def list_prometheus_targets():
        """The engines as Prometheus HTTP service discovery reads them (http_sd_configs)."""
        return prometheus_targets(router.cluster.engines + router.cluster.draining)

    @app.post("/admin/engines")
    async def change_engines(body: MembershipChange):
        """add: into rotation; drain: no new requests, returns once what it holds has finished and
        it is removed; remove: out now (its requests continue elsewhere)."""
        if body.action == "add":
            return await router.add_engine(body.url, body.role)
        return await router.retire_engine(body.url, drain=body.action == "drain", timeout_s=body.timeout_s)

    @app.post("/admin/scale")
    async def scale(body: ScaleChange):
        """Start or drain engines (a fleet's, e.g. Ray actors) until `role` has `engines` of them."""
        return await router.scale(body.role, body.engines)


# The page holds no data and may be served to anyone; what it shows comes from /admin/live,
# behind the cluster token, which the page sends from its `?token=`. Nothing is fetched elsewhere.
_DASHBOARD_HEADERS = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer",
                      "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                                                 "style-src 'unsafe-inline'; connect-src 'self'; img-src data:"}


def _add_dashboard_routes(app: FastAPI, router: Router) -> None:
    html = resources.files("microserve.router").joinpath("dashboard.html").read_text(encoding="utf-8")

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard():
        return HTMLResponse(html, headers=_DASHBOARD_HEADERS)

    @app.get("/admin/live")
    async def live(page: int = Query(1, ge=1), per_page: int = Query(50, ge=1, le=500),
                   q: str = Query("", max_length=200)):
        """The dashboard's data: one page of engines (filtered by `q`), aggregates by role,
        request rate and latency percentiles over the last minutes, the newest events."""
        return router.live_snapshot(page, per_page, q)
