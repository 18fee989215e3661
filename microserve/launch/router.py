"""`microserve router`: one router process in front of engines given by URL."""

from __future__ import annotations

import logging

import uvicorn

from microserve import tracing
from microserve.api.security import is_loopback
from microserve.errors import UserError
from microserve.launch.http import ROUTER_UVICORN, raise_open_file_limit
from microserve.launch.spec import RouterSpec
from microserve.router.app import build_router_app
from microserve.router.cluster import Cluster
from microserve.router.router import Router
from microserve.tokenizer import load_tokenizer, served_model_name


def run_router(spec: RouterSpec) -> None:
    logging.basicConfig(level=spec.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not is_loopback(spec.host) and not spec.api_keys:
        logging.getLogger("microserve").warning("serving on %s without --api-key: anyone who can reach it may use it",
                                                spec.host)
    raise_open_file_limit()
    if not spec.engines and not spec.follow:
        raise UserError("give the engines (--engine URL, repeated) or a router to follow (--follow URL)")
    tracing.setup_tracing("microserve-router", spec.otlp_traces_endpoint,
                          {"service.instance.id": f"{spec.host}:{spec.port}"})
    cluster = Cluster(spec.engines, spec.roles, token=spec.cluster_token)
    try:
        router = Router(cluster, strategy=spec.strategy, max_active=spec.max_active, max_queued=spec.max_queued,
                        follow=spec.follow)
    except (ValueError, OSError, SyntaxError) as e:
        raise UserError(f"cannot load strategy {spec.strategy!r}: {e}") from None
    app = build_router_app(router, load_tokenizer(spec.model), spec.served_model_name or served_model_name(spec.model),
                           cluster_token=spec.cluster_token, api_keys=spec.api_keys,
                           max_body_bytes=spec.max_body_bytes)
    try:
        uvicorn.run(app, host=spec.host, port=spec.port, log_level=spec.log_level, **ROUTER_UVICORN)
    finally:
        tracing.shutdown_tracing()  # what is still buffered goes out before the process ends
