"""`microserve engine`: one engine behind the OpenAI-compatible HTTP API."""

from __future__ import annotations

import logging
from pathlib import Path

import uvicorn

from microserve.config import EngineConfig
from microserve.engine.engine import LLMEngine
from microserve.models.loader import BUILTIN_MODEL_NAME
from microserve.server.openai_api import build_app


def served_model_name(model_path: str | None) -> str:
    if model_path is None:
        return BUILTIN_MODEL_NAME
    p = Path(model_path)
    return p.stem if p.suffix == ".gguf" else p.name


def run_engine_server(cfg: EngineConfig, host: str = "127.0.0.1", port: int = 8000,
                      model_name: str | None = None, max_waiting: int = 256, log_level: str = "info",
                      kv_transport: str = "shm") -> None:
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = LLMEngine(cfg)
    name = model_name or served_model_name(cfg.model)
    app = build_app(engine, name, max_waiting=max_waiting, host=host, kv_transport=kv_transport)
    logging.getLogger("microserve").info("serving %s on http://%s:%d (KV blocks: %d of %d tokens)",
                                         name, host, port, engine.pool.num_blocks, cfg.block_size)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False,
                timeout_graceful_shutdown=5)
