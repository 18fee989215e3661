"""SamplingParams and the batched sampler."""

from __future__ import annotations

from dataclasses import dataclass, field

from microserve.errors import UserError

MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 300  # entries, as OpenAI allows
MAX_SPEC_CHARS = 256 * 1024  # a schema, regex, grammar or choice list, as text


@dataclass(frozen=True)
class StructuredOutput:
    """What the output must match, enforced by masking the logits (engine/structured.py).
    Exactly one field is set; `json_object` means any JSON object."""

    json_schema: str | None = None  # the schema as JSON text
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None  # a Lark grammar (llguidance's dialect)

    def __post_init__(self):
        given = [f for f in ("json_schema", "regex", "choice", "grammar") if getattr(self, f) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise UserError(f"give exactly one kind of structured output, got {given or 'none'}")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise UserError("a choice list needs at least one non-empty string")
        if len(repr(self)) > MAX_SPEC_CHARS:
            raise UserError(f"the structured output spec is over {MAX_SPEC_CHARS} characters")

    @property
    def key(self) -> tuple:
        """What compiled grammars are cached by."""
        return (self.json_schema, self.json_object, self.regex, self.choice, self.grammar)


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: no top-k
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16  # None: up to the context window
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives to return beside the chosen token
    prompt_logprobs: int | None = None  # the same for each prompt token after the first (echo)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured: StructuredOutput | None = None
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k in (None, 0):
            self.top_k = -1
        if self.logit_bias:  # clamped to [-100, 100] as OpenAI does
            if len(self.logit_bias) > MAX_LOGIT_BIAS:
                raise UserError(f"logit_bias may hold at most {MAX_LOGIT_BIAS} tokens")
            try:
                bias = {int(t): float(b) for t, b in self.logit_bias.items()}
            except (TypeError, ValueError):
                raise UserError("logit_bias maps token ids to numbers") from None
            if any(b != b for b in bias.values()):
                raise UserError("a logit_bias value is not a number")
            self.logit_bias = {t: max(-100.0, min(100.0, b)) for t, b in bias.items()}
        else:
            self.logit_bias = None
        checks = [
            (self.n >= 1, f"n must be at least 1, got {self.n}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k == -1 or self.top_k >= 1, f"top_k must be -1 (off) or >= 1, got {self.top_k}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (self.max_tokens is None or self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens}"),
            (self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
             f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
             f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    error: Exception | None = None  # sampling failed for this row alone; its request must fail


def failed(error: Exception) -> SampleResult:
    return SampleResult(token_id=-1, error=error)


class Sampler:
    """Samples one token per row of logits, each row under its own request's parameters."""

    def __init__(self, seed: int = 0):
        import torch

        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits, rows, masks=None) -> list[SampleResult]:
        """`logits` [B, V] float32; `rows[i]` has `.params`, `.seed` (or None), `.prompt_ids`, `.output_ids`.
        `masks`, where given, holds the structured-output masks of some rows (`.rows`, additive
        `.values` [k, V]: 0 where a row's grammar allows the token, -inf where not) and the
        rows whose grammar failed (`.errors`).

        A row whose parameters make sampling fail gets a result with `error` set; the other
        rows of the batch are sampled as if it were not there.
        """
        import torch

        # The logits come out of the model's inference mode; editing them in place (penalties,
        # min_tokens) is only allowed inside it, and nothing here needs autograd anyway.
        with torch.inference_mode():
            # Logprobs are the model's own (before penalties and masks), as OpenAI's are.
            want = [r.params.logprobs is not None for r in rows]
            raw_logprobs = torch.log_softmax(logits[want], dim=-1) if any(want) else None
            errors = self._constrain(logits, rows, masks)
            try:
                results = self._choose(logits, rows, raw_logprobs)
            except Exception:  # find the row at fault: each alone, so the rest still get tokens
                results = [self._choose_alone(logits, rows, raw_logprobs, i) for i in range(len(rows))]
        for i, error in errors.items():
            results[i] = failed(error)
        return results

    def _constrain(self, logits, rows, masks) -> dict[int, Exception]:
        """Logit bias, penalties, the grammars' masks and min_tokens, in place; the errors by row."""
        import torch

        errors = dict(masks.errors) if masks is not None else {}
        for i, r in enumerate(rows):
            if i not in errors:
                self._guarded(logits, i, errors, _bias_and_penalties, r)
        if masks is not None and masks.rows:  # one add for the whole batch
            logits.index_add_(0, torch.tensor(masks.rows), masks.values)
        for i, r in enumerate(rows):
            if i not in errors and len(r.output_ids) < r.params.min_tokens:
                self._guarded(logits, i, errors, _block_stops, list(r.stop_ids_blocked))
        for i in errors:
            logits[i] = 0.0  # keep the batch's other rows valid
        return errors

    @staticmethod
    def _guarded(logits, i: int, errors: dict, fn, arg) -> None:
        try:
            fn(logits[i], arg)
        except Exception as e:
            errors[i] = e

    def _choose_alone(self, logits, rows, raw_logprobs, i: int) -> SampleResult:
        try:
            row_logprobs = None
            if rows[i].params.logprobs is not None:
                j = sum(r.params.logprobs is not None for r in rows[:i])
                row_logprobs = raw_logprobs[j : j + 1]
            return self._choose(logits[i : i + 1], rows[i : i + 1], row_logprobs)[0]
        except Exception as e:
            return failed(e)

    def _choose(self, logits, rows, raw_logprobs) -> list[SampleResult]:
        """The token of every row (argmax or a draw), with its logprobs where asked."""
        want_logprobs = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        tokens = logits.argmax(dim=-1)
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if sampled:
            tokens[sampled] = self._sample(logits[sampled], [rows[i] for i in sampled])

        token_list = tokens.tolist()
        results = [SampleResult(t) for t in token_list]
        for j, i in enumerate(want_logprobs):
            lp = raw_logprobs[j]
            results[i].logprob = float(lp[token_list[i]])
            k = rows[i].params.logprobs
            if k:
                vals, ids = lp.topk(k)
                results[i].top_logprobs = list(zip(ids.tolist(), vals.tolist()))
            else:
                results[i].top_logprobs = []
        return results

    def _sample(self, logits, rows):
        import torch

        temps = torch.tensor([r.params.temperature for r in rows], dtype=logits.dtype)
        logits = logits / temps[:, None]
        if any(r.params.top_k != -1 or r.params.top_p < 1 or r.params.min_p > 0 for r in rows):
            logits = _top_k_top_p_min_p(logits, rows)
        probs = torch.softmax(logits, dim=-1)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p. A seeded request's
        # noise for its k-th token comes from (seed, k) alone, so its samples depend neither on
        # the batch nor on the engine: a request resumed or continued elsewhere draws the same.
        noise = torch.empty_like(probs)
        unseeded = [i for i, r in enumerate(rows) if r.seed is None]
        if unseeded:
            noise[unseeded] = torch.empty(len(unseeded), probs.shape[1]).exponential_(generator=self.generator)
        for i, r in enumerate(rows):
            if r.seed is not None:
                noise[i].exponential_(generator=torch.Generator().manual_seed(token_seed(r.seed, len(r.output_ids))))
        return (probs / noise).argmax(dim=-1)


def token_seed(seed: int, index: int) -> int:
    """A 64-bit generator seed for output token `index` of a request seeded with `seed`."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest(), "little")


def _bias_and_penalties(row_logits, r) -> None:
    if r.params.logit_bias:
        ids = list(r.params.logit_bias)
        row_logits[ids] += row_logits.new_tensor([r.params.logit_bias[t] for t in ids])
    if r.params.has_penalties:
        _apply_penalties(row_logits, r)


def _block_stops(row_logits, stop_ids: list[int]) -> None:
    """Keep the sequence from ending (min_tokens), unless ending is all it may do: a grammar
    that is complete allows only the end, and then the grammar wins."""
    if not stop_ids:
        return
    kept = row_logits[stop_ids].clone()
    row_logits[stop_ids] = float("-inf")
    if bool(row_logits.isneginf().all()):
        row_logits[stop_ids] = kept


def _apply_penalties(row_logits, r):
    import torch

    p = r.params
    if p.repetition_penalty != 1:
        seen = torch.tensor(sorted(set(r.prompt_ids) | set(r.output_ids)), dtype=torch.long)
        if len(seen):
            vals = row_logits[seen]
            row_logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if r.output_ids and (p.frequency_penalty or p.presence_penalty):
        out = torch.tensor(r.output_ids, dtype=torch.long)
        counts = torch.bincount(out, minlength=row_logits.shape[0]).to(row_logits.dtype)
        row_logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row_logits.dtype)


def _top_k_top_p_min_p(logits, rows):
    import torch

    sorted_logits, order = logits.sort(dim=-1, descending=True)
    v = logits.shape[1]
    ranks = torch.arange(v)[None, :]
    top_k = torch.tensor([r.params.top_k if r.params.top_k != -1 else v for r in rows])[:, None]
    drop = ranks >= top_k
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    top_p = torch.tensor([r.params.top_p for r in rows], dtype=probs.dtype)[:, None]
    # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
    drop |= (probs.cumsum(dim=-1) - probs) >= top_p
    min_p = torch.tensor([r.params.min_p for r in rows], dtype=probs.dtype)[:, None]
    drop |= probs < min_p * probs[:, :1]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def token_logprobs(logits, targets: list[int], k: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """Per row of `logits` [T, V]: the raw logprob of `targets[row]` and the top `k` alternatives
    (a prompt's logprobs: row t is the model's guess at prompt token t + 1)."""
    import torch

    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, torch.tensor(targets, dtype=torch.long)[:, None])[:, 0].tolist()
    if not k:
        return [(c, []) for c in chosen]
    vals, ids = lp.topk(k, dim=-1)
    return [(c, list(zip(i, v))) for c, i, v in zip(chosen, ids.tolist(), vals.tolist())]
