"""Launch specs: what to start, as typed values. cli.py fills them from flags; the launchers
(and Ray engine actors, which get an EngineSpec through the object store) take nothing else."""

from __future__ import annotations

from dataclasses import dataclass, field

from microserve.api.security import DEFAULT_MAX_BODY_BYTES
from microserve.config import EngineConfig


@dataclass
class EngineSpec:
    """One engine server (or, simulated, several in one process: one per port in `ports`)."""

    config: EngineConfig
    host: str = "127.0.0.1"
    port: int = 8000
    ports: list[int] | None = None
    model_name: str | None = None  # the model id clients send (default: from the path)
    max_waiting: int = 256
    log_level: str = "info"
    kv_transport: str = "shm"  # shm | tcp: how peers write KV into this engine
    api_keys: list[str] = field(default_factory=list)
    cluster_token: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    otlp_traces_endpoint: str | None = None  # None: OTEL_EXPORTER_OTLP_* if set, else no tracing


@dataclass
class RouterSpec:
    """One router in front of `engines`, or a replica that follows another router's."""

    engines: list[str] = field(default_factory=list)
    roles: list[str] | None = None
    follow: str | None = None
    strategy: str = "round_robin"
    model: str | None = None  # where the tokenizer comes from
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_active: int | None = None
    max_queued: int = 4096
    api_keys: list[str] = field(default_factory=list)
    cluster_token: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    log_level: str = "info"
    otlp_traces_endpoint: str | None = None


@dataclass
class ServeSpec:
    """`microserve serve`: engines and routers on this machine, or engines as Ray actors.
    Field names are those of the flags (so `api_key` holds every --api-key given)."""

    engines: int = 2
    model: str | None = None
    dtype: str = "auto"
    strategy: str = "round_robin"
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    cluster_token: str | None = None
    api_key: list[str] | None = None
    max_restarts: int = 5
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    kv_cache_memory: str | None = None
    deterministic: bool = False
    quantization: str = "auto"
    simulate: str | None = None
    routers: int = 1
    ray: str | None = None  # None: local processes; "local" or an address: a Ray cluster
    roles: str | None = None  # comma-separated, one per engine
    engine_cpus: float | None = None
    engine_gpus: float = 0
    engine_host: str | None = None
    placement: list[str] | None = None
    otlp_traces_endpoint: str | None = None  # passed to every engine and router started


@dataclass
class GenerateSpec:
    """`microserve generate`: one prompt through an in-process engine, streamed to stdout."""

    prompt: str
    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    kv_cache_memory: str | None = None
    threads: int | None = None
    deterministic: bool = False
    quantization: str = "auto"
    max_tokens: int = 256
    temperature: float = 0.0
    seed: int | None = None
    raw: bool = False  # the prompt as is, without the chat template
