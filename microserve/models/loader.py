"""Load a model (weights, config, tokenizer) from a GGUF file or an HF folder."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from microserve.config import SUPPORTED_ARCHITECTURES, ModelConfig
from microserve.errors import UserError
from microserve.models.llama import LlamaForCausalLM, cpu_has_fast_bf16, rope_inv_freq
from microserve.models.quant import BLOCK_ELEMS, KERNEL_TYPES, QUANTIZATION_CHOICES, GGUFWeight, QuantLinear
from microserve.tokenizer import builtin_model_path, gguf_tokenizer, hf_tokenizer

log = logging.getLogger(__name__)

@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    config: ModelConfig
    tokenizer: object | None  # a transformers tokenizer; None when the source has none
    path: str
    dtype: torch.dtype
    device: torch.device
    quantization: str = "none"  # "gguf" when linears run on the file's own formats


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but CUDA is not available on this machine")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
    name = aliases.get(name, name)
    if name == "auto":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        if device.type == "cpu" and not cpu_has_fast_bf16():
            return torch.float32  # bf16 GEMMs without AVX512/AMX run several times slower than fp32
        return torch.bfloat16
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(name)
    if dtype is None:
        raise UserError(f"unknown dtype {name!r} (choose auto, float32, bfloat16 or float16)")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise UserError(f"dtype bfloat16 is not supported on {device} (try float16)")
    try:  # the cheapest honest check: run the ops the model needs once
        a = torch.ones(4, 4, dtype=dtype, device=device)
        torch.nn.functional.scaled_dot_product_attention(a[None, None], a[None, None], a[None, None])
        (a @ a).sum().item()
    except RuntimeError as e:
        raise UserError(f"dtype {name} is not supported on {device}: {e}") from None
    return dtype


def load_model(path: str | None = None, dtype: str = "auto", device: str = "auto", progress: bool = True,
               quantization: str = "auto") -> LoadedModel:
    """Build the model on `device` in `dtype` from a GGUF file or an HF folder (None = built-in).

    quantization "auto": a GGUF file's linears and embedding stay in the file's formats where
    the CPU kernels run them (models/quant.py); "none": everything is dequantized to `dtype`.
    """
    if quantization not in QUANTIZATION_CHOICES:
        raise UserError(f"unknown quantization {quantization!r} (choose {', '.join(QUANTIZATION_CHOICES)})")
    path = path or builtin_model_path()
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"model path not found: {path}")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    keep_gguf = False
    if p.is_file() and p.suffix == ".gguf":
        if quantization == "auto" and dev.type == "cpu":
            from microserve import kernels

            keep_gguf = kernels.load() is not None
        cfg, weights, count, tokenizer = _open_gguf(p, keep_gguf)
    elif p.is_dir():
        cfg, weights, count, tokenizer = _open_hf_folder(p)
    else:
        raise UserError(f"{path}: expected a .gguf file or a folder with config.json and .safetensors files")
    model = _empty_model(cfg, torch_dtype, dev)
    bar = tqdm(weights, total=count, desc=f"Loading {cfg.name}", unit="tensor", disable=not progress, leave=False)
    try:
        model.load_hf_weights(bar)
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None
    finally:
        bar.close()
    model.eval()
    model.pack_linears_for_cpu()
    kept = model.quant_lm_head is not None or any(isinstance(m, QuantLinear) for m in model.modules())
    return LoadedModel(model, cfg, tokenizer, str(p), torch_dtype, dev, "gguf" if kept else "none")


def _empty_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    # Build on the meta device so no memory is spent on a random init we would overwrite.
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device=device)
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            setattr(module, name, torch.nn.Parameter(torch.empty_like(param, dtype=dtype), requires_grad=False))
    model.set_rope_freqs(rope_inv_freq(cfg).to(device))
    return model


# ---------------------------------------------------------------- HF folder


def _open_hf_folder(folder: Path):
    cfg_file = folder / "config.json"
    if not cfg_file.exists():
        raise UserError(f"{folder}: no config.json")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder}: no .safetensors files")
    cfg = ModelConfig.from_hf_config(json.loads(cfg_file.read_text()), name=folder.name)
    from safetensors import safe_open

    handles = [safe_open(str(f), framework="pt") for f in files]
    count = sum(len(h.keys()) for h in handles)

    def weights():
        for h in handles:
            for name in h.keys():
                yield name, h.get_tensor(name)

    return cfg, weights(), count, hf_tokenizer(folder)


# ---------------------------------------------------------------- GGUF

# llama.cpp tensor names → HF names ("{}" is the layer index).
_GGUF_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": "rope_freqs",
}
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def gguf_to_hf_name(name: str) -> str | None:
    if name in _GGUF_NAMES:
        return _GGUF_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_LAYER_NAMES:
        return f"layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo the row interleaving llama.cpp applies to Llama q/k weights for its rope layout."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_field(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


# Weights that may stay in the file's format: the linears and the embedding.
_KEEPABLE = ("_proj.weight", "embed_tokens.weight", "lm_head.weight")


def _keeps_format(name: str, type_name: str, shape: list[int]) -> bool:
    """Whether a weight can stay in the file's format: a linear or the embedding, in a format the
    kernels run, with rows a whole number of its blocks (256 elements for the K-quants)."""
    return type_name in KERNEL_TYPES and name.endswith(_KEEPABLE) and len(shape) == 2 \
        and shape[1] % BLOCK_ELEMS[type_name] == 0


def _why_dequantized(type_name: str, shape: list[int]) -> str:
    if type_name not in KERNEL_TYPES:
        return f"no CPU kernel for {type_name}"  # e.g. Q2_K, Q3_K, the IQ formats
    return f"rows of {shape[-1]} columns are not whole {BLOCK_ELEMS[type_name]}-element blocks"


def _log_dequantized(path: Path, dequantized: dict[str, list[str]]) -> None:
    """Say which linears of a GGUF file are dequantized at load and why: their memory and speed are
    those of the model's dtype, not of the file's format."""
    for why, names in sorted(dequantized.items()):
        log.warning("%s: %d tensors dequantized at load (%s): %s", path.name, len(names), why,
                    ", ".join(names[:6]) + (", ..." if len(names) > 6 else ""))


def _open_gguf(path: Path, keep_gguf: bool = False):
    """Config, (name, weight) pairs, count and tokenizer. With `keep_gguf`, linear and embedding
    weights in a format the kernels run come as `GGUFWeight`s (file bytes), the rest as float32."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # a truncated or foreign file
        raise UserError(f"{path}: not a readable GGUF file ({e})") from None
    arch = _gguf_field(reader, "general.architecture", "?")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"{path}: unsupported architecture {arch!r} (supported: llama, qwen2, qwen3, mistral)")
    unknown = [t.name for t in reader.tensors if gguf_to_hf_name(t.name) is None]
    if unknown:
        raise UserError(f"{path}: cannot map {len(unknown)} GGUF tensors, e.g. {unknown[:3]}")
    cfg = _gguf_config(reader, arch, path)
    # llama.cpp permutes q/k rows only for archs it runs with interleaved (non-NeoX) rope.
    permuted = arch in ("llama", "mistral")

    dequantized: dict[str, list[str]] = {}

    def weights():
        for t in reader.tensors:
            name = gguf_to_hf_name(t.name)
            shape = [int(d) for d in reversed(t.shape)]
            if keep_gguf and name.endswith(_KEEPABLE) and not _keeps_format(name, t.tensor_type.name, shape):
                dequantized.setdefault(_why_dequantized(t.tensor_type.name, shape), []).append(t.name)
            if keep_gguf and _keeps_format(name, t.tensor_type.name, shape):
                data = np.ascontiguousarray(t.data).view(np.uint8).reshape(shape[0], -1)
                if permuted and name.endswith("q_proj.weight"):
                    data = _unpermute(data, cfg.num_heads)
                elif permuted and name.endswith("k_proj.weight"):
                    data = _unpermute(data, cfg.num_kv_heads)
                yield name, GGUFWeight(torch.from_numpy(np.array(data)), t.tensor_type.name, (shape[0], shape[1]))
                continue
            try:
                w = dequantize(t.data, t.tensor_type)
            except NotImplementedError:
                raise UserError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which gguf cannot dequantize") from None
            w = np.array(w, dtype=np.float32).reshape(shape)
            if permuted and name.endswith("q_proj.weight"):
                w = _unpermute(w, cfg.num_heads)
            elif permuted and name.endswith("k_proj.weight"):
                w = _unpermute(w, cfg.num_kv_heads)
            yield name, torch.from_numpy(w)
        _log_dequantized(path, dequantized)

    has_vocab = "tokenizer.ggml.model" in reader.fields
    return cfg, weights(), len(reader.tensors), gguf_tokenizer(path) if has_vocab else None


_REQUIRED_GGUF_KEYS = {"block_count", "embedding_length", "feed_forward_length", "attention.head_count"}


def _gguf_config(reader, arch: str, path: Path) -> ModelConfig:
    def get(key, default=None):
        value = _gguf_field(reader, f"{arch}.{key}", default)
        if value is None and default is None and key in _REQUIRED_GGUF_KEYS:
            raise UserError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return value

    tokens = reader.fields.get("tokenizer.ggml.tokens")
    names = {t.name for t in reader.tensors}
    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    vocab = get("vocab_size") or (len(tokens.data) if tokens is not None else None)
    if vocab is None:
        raise UserError(f"{path}: GGUF metadata gives no vocabulary size")
    scaling = None
    if get("rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    hf = {
        "architectures": [arch],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rope_scaling": scaling,
        "max_position_embeddings": int(get("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "bos_token_id": _gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _gguf_field(reader, "tokenizer.ggml.eos_token_id"),
    }
    return ModelConfig.from_hf_config(hf, name=path.stem)
