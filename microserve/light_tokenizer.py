"""A model's tokenizer and chat template without transformers: the `tokenizers` library and
jinja2, about 20 MB where transformers' tokenizer classes take about 90. What a router, a
simulated engine and the bench client need: encode, decode, the chat template, special ids.

It renders chat templates in the environment HF templates are written for (sandboxed, trim
and lstrip blocks, loop controls, `tojson`, `raise_exception`, `strftime_now`), so a router's
prompt ids are the engine's (the parity test checks them through every strategy)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


@dataclass
class Encoding:
    input_ids: list[int]


def _raise(message: str):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(value, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_template(source: str):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


class LightTokenizer:
    def __init__(self, folder: Path):
        from tokenizers import Tokenizer

        self.backend_tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config = _read_json(folder / "tokenizer_config.json")
        template = folder / "chat_template.jinja"
        self.chat_template = template.read_text() if template.exists() else config.get("chat_template")
        self.special = {name: _token_text(config.get(name)) for name in SPECIAL_NAMES if config.get(name)}
        self._template = compile_template(self.chat_template) if isinstance(self.chat_template, str) else None
        named = [*self.special.values(), *map(_token_text, config.get("additional_special_tokens") or [])]
        self.all_special_ids = sorted({i for i in map(self.backend_tokenizer.token_to_id, named) if i is not None})

    @classmethod
    def usable(cls, folder: Path) -> bool:
        """Whether the folder holds what this class reads (a fast tokenizer file)."""
        return (folder / "tokenizer.json").exists()

    def __call__(self, text: str, add_special_tokens: bool = True) -> Encoding:
        return Encoding(self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def decode(self, ids: list[int], skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool = False) -> str:
        text = self.backend_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        # WordPiece leaves spaces before punctuation; BPE keeps them as written (as transformers does)
        if clean_up_tokenization_spaces and type(self.backend_tokenizer.model).__name__ != "BPE":
            for before, after in CLEAN_UP:
                text = text.replace(before, after)
        return text

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        return [self.backend_tokenizer.id_to_token(i) for i in ids]

    @property
    def eos_token_id(self) -> int | None:
        eos = self.special.get("eos_token")
        return None if eos is None else self.backend_tokenizer.token_to_id(eos)

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = False,
                            tools: list[dict] | None = None, **extra):
        if self._template is None:
            raise ValueError("this tokenizer has no chat template")
        text = self._template.render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                     **self.special, **extra)
        return self(text, add_special_tokens=False).input_ids if tokenize else text


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
