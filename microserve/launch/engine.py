"""`microserve engine`: one engine behind the OpenAI-compatible HTTP API."""

from __future__ import annotations

import gc
import logging
import threading

import uvicorn

from microserve import tracing
from microserve.config import EngineConfig
from microserve.engine.engine import LLMEngine
from microserve.errors import UserError
from microserve.api.security import DEFAULT_MAX_BODY_BYTES, is_loopback
from microserve.launch.http import KEEP_ALIVE_S, raise_open_file_limit
from microserve.launch.spec import EngineSpec
from microserve.server.openai_api import build_app
from microserve.tokenizer import served_model_name


def run_engine_server(cfg: EngineConfig, host: str = "127.0.0.1", port: int = 8000,
                      model_name: str | None = None, max_waiting: int = 256, log_level: str = "info",
                      kv_transport: str = "shm", api_keys: list[str] | None = None,
                      cluster_token: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                      ports: list[int] | None = None, otlp_traces_endpoint: str | None = None) -> None:
    """Serve one engine on `port`; simulated engines (cfg.simulate) may take several `ports`."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not is_loopback(host) and not cluster_token:
        raise UserError(f"binding to {host} without --cluster-token would let anyone on the network read and "
                        "write this engine's KV cache: give a cluster token")
    raise_open_file_limit()
    tracing.setup_tracing("microserve-engine", otlp_traces_endpoint, _resource(cfg, host, ports or [port]))
    try:
        _serve(cfg, host, port, ports, model_name, log_level, dict(
            max_waiting=max_waiting, kv_transport=kv_transport, api_keys=api_keys, cluster_token=cluster_token,
            max_body_bytes=max_body_bytes))
    finally:
        tracing.shutdown_tracing()  # what is still buffered goes out before the process ends


def _resource(cfg: EngineConfig, host: str, ports: list[int]) -> dict[str, object]:
    """What tells this engine's spans from other engines' (one service name for all)."""
    return {"service.instance.id": f"{host}:{ports[0]}", "microserve.engine.ports": ports,
            "microserve.engine.model": cfg.simulate or cfg.model or "built-in",
            "microserve.engine.simulated": bool(cfg.simulate)}


def _serve(cfg: EngineConfig, host: str, port: int, ports: list[int] | None, model_name: str | None,
           log_level: str, options: dict) -> None:
    if cfg.simulate:  # any number of them in this process, one port each
        from microserve.launch.sim_host import run_simulated_engines

        run_simulated_engines(cfg, ports or [port], host, model_name or cfg.simulate, log_level, **options)
        return
    engine = _build_engine(cfg)
    # What is loaded lives as long as the process: keep the collector from walking it over and
    # over (its passes showed in profiles of a loaded engine).
    gc.collect()
    gc.freeze()
    name = model_name or served_model_name(cfg.model)
    app = build_app(engine, name, host=host, **options)
    logging.getLogger("microserve").info("serving %s on http://%s:%d (KV blocks: %d of %d tokens)",
                                         name, host, port, engine.pool.num_blocks, cfg.block_size)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False,
                timeout_graceful_shutdown=5, timeout_keep_alive=KEEP_ALIVE_S)


def _build_engine(cfg: EngineConfig) -> LLMEngine:
    """Build the engine in a thread that exits once it is built, so that every parallel region of a
    running engine starts from the engine loop's thread.

    Why: OpenMP (libgomp, under torch's and the kernels' parallel loops) keeps a pool of workers for
    each thread that starts a parallel region, until that thread exits. Loading on the main thread
    (which lives on, serving HTTP) and stepping on the loop thread left two pools, more workers than
    cores, and libgomp then lets idle workers spin only briefly before sleeping: each of a step's
    hundreds of short parallel regions paid a futex wake-up, and a 512-token prefill on 2 threads
    took 370 ms instead of 230.
    """
    built: list = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            built.append(LLMEngine(cfg))
        except BaseException as e:  # raised again on the caller's thread
            errors.append(e)

    loader = threading.Thread(target=build, name="engine-load")
    loader.start()
    loader.join()
    if errors:
        raise errors[0]
    return built[0]


def run_engine(spec: EngineSpec) -> None:
    """`microserve engine` and each Ray engine actor: serve what `spec` describes until stopped."""
    run_engine_server(spec.config, host=spec.host, port=spec.port, ports=spec.ports, model_name=spec.model_name,
                      max_waiting=spec.max_waiting, log_level=spec.log_level, kv_transport=spec.kv_transport,
                      api_keys=spec.api_keys, cluster_token=spec.cluster_token, max_body_bytes=spec.max_body_bytes,
                      otlp_traces_endpoint=spec.otlp_traces_endpoint)
