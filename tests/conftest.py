"""Shared fixtures: tiny random checkpoints written to a temp folder, and the built-in model."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))

# Build (or find cached) the C++ kernels before any test starts an engine process that needs them.
from microserve import kernels  # noqa: E402

kernels.load()

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    # A wide init makes the random model's distributions peaked, so greedy choices are not near-ties.
    initializer_range=0.3,
)


@pytest.fixture(scope="session")
def builtin_gguf():
    from microserve.tokenizer import builtin_model_path

    return builtin_model_path()


@pytest.fixture(scope="session")
def smollm_tokenizer(builtin_gguf):
    from pathlib import Path

    from microserve.tokenizer import gguf_tokenizer

    return gguf_tokenizer(Path(builtin_gguf))


def make_tiny_checkpoint(folder, arch: str, tokenizer=None, seed: int = 0, **overrides):
    """Write a random HF checkpoint (config.json + safetensors) of the given family; return its path."""
    import transformers

    kinds = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
        "llama3": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
            "rope_theta": 500000.0, "tie_word_embeddings": True}),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {"tie_word_embeddings": False}),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 32}),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": None}),
    }
    config_cls, model_cls, extra = kinds[arch]
    vocab = len(tokenizer) if tokenizer is not None else 512
    config = config_cls(vocab_size=vocab, **{**TINY, **extra, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    if arch == "qwen2":  # random init leaves biases at zero; make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.3)
    if arch == "qwen3":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.normal_(1, 0.3)
                layer.self_attn.k_norm.weight.normal_(1, 0.3)
    path = os.path.join(str(folder), arch)
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path, model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smollm_tokenizer):
    """A tiny random Llama with the SmolLM2 tokenizer, for engine tests."""
    path, _ = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), "llama", smollm_tokenizer)
    return path


@pytest.fixture(scope="session")
def tiny_engine_loaded(tiny_llama):
    from microserve.models.loader import load_model

    return load_model(tiny_llama, dtype="float32", device="cpu", progress=False)


def make_engine(loaded, **options):
    """A fresh engine (own KV cache and prefix cache) over already-loaded weights."""
    from microserve.config import EngineConfig
    from microserve.engine.engine import LLMEngine

    options.setdefault("kv_cache_memory", "64MiB")
    return LLMEngine(EngineConfig(dtype="float32", device="cpu", **options), loaded=loaded)


def run_to_completion(engine, prompts, params):
    """Add every prompt, step until all finish; return outputs in prompt order."""
    ids = [f"r{i}" for i in range(len(prompts))]
    plist = params if isinstance(params, list) else [params] * len(prompts)
    done = run_requests(engine, {rid: (prompt, p) for rid, prompt, p in zip(ids, prompts, plist)})
    return [done[r] for r in ids]


def run_requests(engine, requests: dict) -> dict:
    """requests: id -> (prompt, params), all in one batch; the finished outputs by id."""
    for rid, (prompt, p) in requests.items():
        engine.add_request(rid, prompt, p)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


@pytest.fixture(scope="session")
def serve():
    """(router URL, one engine's URL) of `serve --engines 2` on the built-in model, shared by
    the end-to-end tests of the OpenAI surface (cluster token: server_utils.SERVE_TOKEN)."""
    import httpx

    from server_utils import SERVE_TOKEN, start_serve, stop_serve

    url, proc = start_serve("--engines", "2", env={"MICROSERVE_CLUSTER_TOKEN": SERVE_TOKEN})
    engines = httpx.get(url + "/admin/engines", headers={"Authorization": f"Bearer {SERVE_TOKEN}"}).json()
    yield url, engines["engines"][0]["url"]
    stop_serve(proc)
