"""Structured outputs: grammars compiled once per spec, one matcher per sequence, and the
token masks that keep every sampled token inside the grammar.

Built on llguidance (chosen over xgrammar, measured in docs/structured.md): it refuses the
JSON-schema keywords it cannot enforce instead of ignoring them, bounds its own work with
fuel limits, and needs neither torch's compiler nor triton.

A compile runs in a worker thread, never on the engine loop, and is bounded twice: the
parser's fuel limits make a pathological grammar fail fast, and a wall-clock timeout answers
the client even if one does not. Compiled grammars are cached (LRU) by spec.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from microserve.errors import UserError
from microserve.sampling import StructuredOutput
from microserve.schema import closed

COMPILE_TIMEOUT_S = 0.5
CACHE_SIZE = 256
# JSON whitespace between tokens, bounded: unbounded whitespace lets a model fill max_tokens
# with blanks instead of ending the document.
JSON_OPTIONS = {"whitespace_pattern": r"[ \n]{0,2}"}


def _limits():
    import llguidance

    # A tenth of llguidance's defaults: ample for real schemas, and a bad one fails in milliseconds.
    return llguidance.LLParserLimits(initial_lexer_fuel=100_000, step_lexer_fuel=100_000, step_max_items=20_000,
                                     max_lexer_states=50_000, max_grammar_size=100_000, verbose_errors=False)


def grammar_of(spec: StructuredOutput) -> str:
    """The llguidance grammar (text) for a spec; raises UserError on input that is not one."""
    from llguidance import LLMatcher, regex_to_lark

    if spec.json_schema is not None:
        try:
            schema = json.loads(spec.json_schema)
        except ValueError:
            raise UserError("the JSON schema is not valid JSON") from None
        if not isinstance(schema, (dict, bool)):
            raise UserError("a JSON schema is an object")
        return LLMatcher.grammar_from_json_schema(closed(schema), defaults=JSON_OPTIONS)
    if spec.json_object:
        return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if spec.regex is not None:  # \d means [0-9], as in the other servers (not every Unicode digit)
        return LLMatcher.grammar_from_regex(regex_to_lark(spec.regex, use_ascii="d"))
    if spec.choice is not None:
        return LLMatcher.grammar_from_regex("|".join(re.escape(c) for c in spec.choice))
    return LLMatcher.grammar_from_lark(spec.grammar)


class Grammar:
    """A compiled grammar: matchers for new sequences are copies of one built at compile time."""

    def __init__(self, template):
        self._template = template

    def matcher(self, tokens: list[int] = ()) -> "Matcher":
        """A matcher at the start of the output, advanced over `tokens` already generated
        (a request resumed or continued on this engine)."""
        m = Matcher(self._template.deep_copy())
        for t in tokens:
            try:
                m.accept(t)
            except RuntimeError:
                raise UserError(f"the generated tokens do not fit the structured output (token {t})") from None
        return m


class Matcher:
    """One sequence's place in its grammar, advanced exactly once per appended token."""

    def __init__(self, matcher):
        self._m = matcher

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing but the end."""
        return self._m.is_stopped()

    def accept(self, token: int) -> None:
        if not self._m.consume_token(token):
            raise RuntimeError(f"token {token} does not fit the grammar: {self._m.get_error()}")

    def fill(self, bitmask_row: torch.Tensor) -> None:
        """Write the allowed next tokens into a row of an int32 bitmask (32 tokens a word)."""
        self._m.unsafe_compute_mask_ptr(bitmask_row.data_ptr(), bitmask_row.numel() * 4)
        if self._m.is_error():
            raise RuntimeError(f"the grammar failed: {self._m.get_error()}")


def _byte_table() -> torch.Tensor:
    """[256, 8] float32: for each byte value, 0 for its set bits and -inf for the others."""
    bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
    return torch.where(bits.bool(), 0.0, float("-inf"))


_BYTE_TABLE = _byte_table()


@dataclass
class GrammarMasks:
    """A batch's structured-output masks: `values[j]` is the additive mask of row `rows[j]`
    (0 where its grammar allows the token, -inf where not); `errors` the rows whose matcher failed."""

    rows: list[int]
    values: torch.Tensor
    errors: dict[int, Exception]

    def allowed_ids(self, j: int) -> list[int]:
        return (self.values[j] == 0).nonzero().flatten().tolist()


def fill_bitmasks(matchers: list[Matcher], vocab_size: int) -> tuple[torch.Tensor, dict[int, Exception]]:
    """The matchers' bitmasks (32 tokens per int32 word, little-endian), and the errors by
    position. Only llguidance works here (no torch op): it runs beside the forward pass."""
    bitmask = torch.zeros(len(matchers), (vocab_size + 31) // 32, dtype=torch.int32)
    errors = {}
    for j, m in enumerate(matchers):
        try:
            m.fill(bitmask[j])
        except Exception as e:
            errors[j] = e
    return bitmask, errors


def unpack(rows: list[int], bitmask: torch.Tensor, errors: dict[int, Exception], vocab_size: int) -> GrammarMasks:
    """Bitmasks as additive masks of batch rows `rows`: one gather over their bytes unpacks
    the whole batch (a shift per bit costs 20x more at batch 32)."""
    values = torch.nn.functional.embedding(bitmask.view(torch.uint8).long(), _BYTE_TABLE)
    return GrammarMasks(rows, values.view(len(rows), -1)[:, :vocab_size], {rows[j]: e for j, e in errors.items()})


def grammar_masks(rows: list[int], matchers: list[Matcher], vocab_size: int) -> GrammarMasks:
    return unpack(rows, *fill_bitmasks(matchers, vocab_size), vocab_size)


class GrammarCompiler:
    """Compiles specs for one tokenizer, off the engine loop, with a cache and a timeout."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_id: int | None, timeout_s: float = COMPILE_TIMEOUT_S):
        self._hf_tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos = eos_token_id
        self.timeout_s = timeout_s
        self._lltokenizer = None
        self._cache: OrderedDict[tuple, Grammar] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grammar-compile")

    def cached(self, spec: StructuredOutput) -> Grammar | None:
        with self._lock:
            grammar = self._cache.get(spec.key)
            if grammar is not None:
                self._cache.move_to_end(spec.key)
            return grammar

    async def compile_async(self, spec: StructuredOutput) -> Grammar:
        """Compile in the worker thread; UserError if the spec is bad or takes too long."""
        grammar = self.cached(spec)
        if grammar is not None:
            return grammar
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._pool, self._tokenizer)  # once per engine; not the spec's time
        future = loop.run_in_executor(self._pool, self.compile, spec)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.timeout_s)
        except asyncio.TimeoutError:
            raise UserError(f"the structured output spec took over {self.timeout_s:g} s to compile; "
                            "simplify it") from None

    def compile(self, spec: StructuredOutput) -> Grammar:
        """Compile now, in this thread (the cache first)."""
        from llguidance import LLMatcher

        grammar = self.cached(spec)
        if grammar is not None:
            return grammar
        text = grammar_of(spec)
        matcher = LLMatcher(self._tokenizer(), text, log_level=0, limits=_limits())
        if matcher.is_error():
            raise UserError(f"the structured output spec cannot be used: {_short(matcher.get_error())}")
        grammar = Grammar(matcher)
        with self._lock:
            self._cache[spec.key] = grammar
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return grammar

    def _tokenizer(self):
        if self._hf_tokenizer is None:
            raise UserError("this model has no tokenizer: structured outputs need one")
        if self._lltokenizer is None:  # about 0.3 s for a 49k vocabulary, once
            import llguidance

            backend = getattr(self._hf_tokenizer, "backend_tokenizer", self._hf_tokenizer)
            self._lltokenizer = llguidance.LLTokenizer(backend.to_str(), n_vocab=self._vocab_size,
                                                       eos_token=self._eos)
        return self._lltokenizer


def _short(message: str, limit: int = 300) -> str:
    message = " ".join(message.split())
    return message if len(message) <= limit else message[:limit] + "..."
