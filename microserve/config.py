"""Configuration dataclasses, validated at construction."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from microserve.errors import UserError

# Architecture names (HF `architectures` / `model_type`, GGUF `general.architecture`)
# that map onto our one Llama-family decoder.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "smollm": "llama",
    "smollm2": "llama",
}


@dataclass
class ModelConfig:
    """The shape of a Llama-family decoder (Llama 2/3, SmolLM, Qwen2/2.5, Qwen3, Mistral)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    name: str = "model"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise UserError(
                f"num_attention_heads ({self.num_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ("default", "linear", "llama3"):
            raise UserError(f"unsupported rope scaling type {rope_type!r} (supported: default, linear, llama3)")

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], name: str = "model") -> "ModelConfig":
        archs = cfg.get("architectures") or [cfg.get("model_type", "?")]
        arch = SUPPORTED_ARCHITECTURES.get(archs[0]) or SUPPORTED_ARCHITECTURES.get(cfg.get("model_type", ""))
        if arch is None:
            raise UserError(
                f"unsupported architecture {archs[0]!r} (supported: Llama, SmolLM, Qwen2, Qwen3, Mistral)"
            )
        # transformers 5 moves rope settings into `rope_parameters`; older configs
        # have `rope_theta` and `rope_scaling` at the top level.
        rope_params = cfg.get("rope_parameters") or {}
        rope_theta = cfg.get("rope_theta") or rope_params.get("rope_theta") or 10000.0
        scaling = cfg.get("rope_scaling") or rope_params or None
        if scaling:
            scaling = dict(scaling)
            scaling.setdefault("rope_type", scaling.get("type", "default"))
        num_heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        max_pos = cfg.get("max_position_embeddings", 4096)
        # We do not implement sliding-window attention, so a model that uses one
        # is served only up to its window, where full attention is exact.
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", arch == "mistral") else None
        if window:
            max_pos = min(max_pos, int(window))
        eos = cfg.get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or hidden // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
            qk_norm=arch == "qwen3",
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            name=name,
        )


_SIZE_RE = re.compile(r"^\s*([0-9.]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
          "g": 1e9, "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}


def parse_size(text: str | int) -> int:
    """'512MiB', '2GiB', '1e9' or an int → bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    if not m or (m.group(2) or "").lower() not in _UNITS:
        raise UserError(f"cannot read {text!r} as a memory size (try 512MiB or 2GiB)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


# How a GGUF file's weights are kept (models/quant.py): auto keeps the file's own formats on CPU.
QUANTIZATION_CHOICES = ("auto", "none")


@dataclass
class EngineConfig:
    """How one engine runs a model."""

    model: str | None = None  # path to a GGUF file or an HF folder; None = the built-in model
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    block_size: int = 16
    # Bytes for the paged KV cache. None: 1 GiB for a model, and for a simulated engine what
    # its hardware profile leaves free after the weights.
    kv_cache_memory: int | str | None = None
    max_num_seqs: int = 64  # most sequences in one step's batch
    # Per-step token budget for chunked prefill: a prompt up to 1024 tokens is one step (one pass over
    # the weights), while a longer one still leaves room for the running decodes every step.
    max_num_batched_tokens: int = 1024
    max_model_len: int | None = None  # defaults to the model's context window
    enable_prefix_caching: bool = True
    num_threads: int | None = None  # CPU threads for torch; None = torch's default
    seed: int = 0
    kv_shared: bool = False  # KV pool in shared memory, so peers on this host can write into it
    # Batch-invariant kernels: a request's tokens and logprobs do not depend on the batch, the
    # prefill chunking, the prefix cache or which engine computed its KV (models/deterministic.py).
    deterministic: bool = False
    quantization: str = "auto"  # auto | none: a GGUF file's linears in its own formats, or dequantized
    simulate: str | None = None  # a profile name (microserve/sim/profiles.py): the cost model replaces the model

    def __post_init__(self):
        self.kv_cache_memory_given = self.kv_cache_memory is not None
        self.kv_cache_memory = parse_size(self.kv_cache_memory if self.kv_cache_memory is not None else "1GiB")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise UserError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise UserError("max_num_batched_tokens and max_num_seqs must be positive")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"):
            raise UserError(f"unknown dtype {self.dtype!r} (choose auto, float32, bfloat16 or float16)")
        if self.quantization not in QUANTIZATION_CHOICES:
            raise UserError(f"unknown quantization {self.quantization!r} (choose {', '.join(QUANTIZATION_CHOICES)})")
        if self.num_threads is None and os.environ.get("MICROSERVE_THREADS"):
            self.num_threads = int(os.environ["MICROSERVE_THREADS"])
