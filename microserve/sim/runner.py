"""The simulated forward pass: the engine's ModelRunner with the model replaced by a cost model.

Everything else of a simulated engine is the real engine: scheduler, block pool, prefix
cache, leases, microserving state, HTTP surface. A step takes the time the cost model
gives for its batch (the thread sleeps, so hundreds of engines share two cores) and
samples cheap deterministic tokens.
"""

from __future__ import annotations

import math
import threading
import time

import torch

from microserve.config import EngineConfig, ModelConfig
from microserve.engine.request import Request, prompt_rows
from microserve.engine.structured import grammar_masks
from microserve.errors import UserError
from microserve.models.loader import LoadedModel
from microserve.tokenizer import load_tokenizer
from microserve.sampling import SampleResult, failed
from microserve.sim.cost_model import CostModel
from microserve.sim.profiles import SimSpec, get_profile
from microserve.sim.transfer import send_simulated

_MASK64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finalizer: a cheap, well-spread hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


_tokenizers: dict[str | None, object] = {}
_word_ids: dict[int, list[int]] = {}
_cache_lock = threading.Lock()


def _tokenizer(path: str | None):
    """One tokenizer per process: hundreds of simulated engines share it."""
    with _cache_lock:
        if path not in _tokenizers:
            _tokenizers[path] = load_tokenizer(path)
        return _tokenizers[path]


def word_token_ids(tokenizer) -> list[int]:
    """Ids that decode to a plain word with a leading space (" the", " river"): simulated
    output reads as words, and never holds an end-of-sequence or other special token."""
    key = id(tokenizer)
    with _cache_lock:
        if key not in _word_ids:
            special = set(tokenizer.all_special_ids)
            vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
            ids = [i for i, piece in enumerate(vocab)
                   if i not in special and piece and piece[0] in "Ġ▁" and piece[1:].isascii() and piece[1:].isalpha()]
            _word_ids[key] = ids or [i for i in range(len(tokenizer)) if i not in special]
        return _word_ids[key]


def load_simulated(cfg: EngineConfig) -> LoadedModel:
    """A model with the profile's shape and the served tokenizer, and no weights."""
    spec = get_profile(cfg.simulate)
    m = spec.model
    tokenizer = _tokenizer(cfg.model)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    config = ModelConfig(
        architecture="llama", vocab_size=len(tokenizer), hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size, num_layers=m.num_layers, num_heads=m.num_heads,
        num_kv_heads=m.num_kv_heads, head_dim=m.head_dim, max_position_embeddings=m.max_position_embeddings,
        eos_token_ids=eos, name=f"simulated:{spec.name}",
    )
    return LoadedModel(model=None, config=config, tokenizer=tokenizer, path=f"simulated:{spec.name}",
                       dtype=torch.bfloat16, device=torch.device("cpu"))


class SimKV:
    """Stands where the KV pool would be: the same block geometry, no bytes. Transfers between
    simulated engines take the time the profile's link needs for the bytes a real pool would send."""

    simulated = True
    paths = None  # no shared-memory pool: peers "send" over the control connection
    sender = staticmethod(send_simulated)  # the kv_transfer sender of this pool

    def __init__(self, num_blocks: int, block_size: int, cost: CostModel):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_slots = num_blocks * block_size
        self.cost = cost

    def close(self) -> None:
        pass


class SimRunner:
    """The ModelRunner interface (`num_blocks`, `kv`, `execute`) over a cost model."""

    def __init__(self, loaded: LoadedModel, cfg: EngineConfig):
        self.spec: SimSpec = get_profile(cfg.simulate)
        self.cost = CostModel(self.spec)
        self.model_config = loaded.config
        self.block_size = cfg.block_size
        if cfg.kv_cache_memory_given:
            tokens = cfg.kv_cache_memory // self.cost.kv_bytes_per_token()
        else:
            tokens = self.cost.kv_capacity_tokens()
        num_blocks = tokens // cfg.block_size
        if num_blocks < 2:
            raise UserError(f"the simulated KV cache holds fewer than 2 blocks of {cfg.block_size} tokens")
        self.kv = SimKV(num_blocks, cfg.block_size, self.cost)
        self.words = word_token_ids(loaded.tokenizer)
        self.seed = cfg.seed
        self.busy_seconds = 0.0  # simulated device time, for tests and metrics
        self.num_steps = 0

    @property
    def num_blocks(self) -> int:
        return self.kv.num_blocks

    def execute(self, items: list[tuple[Request, int]]) -> list[SampleResult | None]:
        start = time.perf_counter()
        prefill, decode, sampled = [], [], 0
        for req, n in items:
            begin = req.num_computed_tokens
            if n == 1 and begin > 0:
                decode.append(begin + 1)
            else:
                prefill.append((n, begin))
            sampled += begin + n == req.num_tokens and not req.prefill_only
        seconds = self.cost.step_seconds(prefill, decode, sampled)
        self.busy_seconds += seconds
        self.num_steps += 1

        # Prompts computed only to be sent: their transfer follows the layers as they finish.
        watchers = []
        for req, n in items:
            if req.kv_progress is not None and req.num_computed_tokens + n == req.num_tokens:
                req.kv_progress.start(req.block_ids)
                watchers.append(req.kv_progress)
        layers = self.model_config.num_layers
        if watchers:
            for i in range(layers):
                _sleep_until(start + seconds * (i + 1) / layers)
                for w in watchers:
                    w.layer_done(i)
        else:
            _sleep_until(start + seconds)

        for req, _, first, last in prompt_rows(items):  # every word equally likely, as in _sample
            k = req.params.prompt_logprobs
            req.out.prompt_logprobs += [(self.uniform_logprob, [(w, self.uniform_logprob) for w in self.words[:k]])
                                    for _ in range(first, last)]
        results: list[SampleResult | None] = []
        for req, n in items:
            due = req.num_computed_tokens + n == req.num_tokens and not req.prefill_only
            results.append(self._sample_or_fail(req) if due else None)
        return results

    def _sample_or_fail(self, req: Request) -> SampleResult:
        try:
            return self._sample(req)
        except Exception as e:  # this request's own failure (its grammar): it alone ends
            return failed(e)

    def _sample(self, req: Request) -> SampleResult:
        """The next token as a hash of (seed, previous token, position): the same on every engine,
        so a request split across engines or resumed elsewhere continues the same text."""
        params = req.params
        salt = params.seed if params.seed is not None else (self.seed if params.greedy else id(req))
        pos = req.num_tokens
        h = _mix((salt & _MASK64) ^ _mix(req.token_ids[-1] * 1_000_003 + pos))
        token = self.words[h % len(self.words)]
        if req.matcher is not None:  # structured output: a token its grammar allows, chosen the same way
            masks = grammar_masks([0], [req.matcher], self.model_config.vocab_size)
            if masks.errors:
                raise masks.errors[0]
            token = token if masks.values[0, token] == 0 else masks.allowed_ids(0)[h % len(masks.allowed_ids(0))]
        if params.logprobs is None:
            return SampleResult(token)
        logprob = self.uniform_logprob
        top = [(self.words[(h + k) % len(self.words)], logprob) for k in range(params.logprobs)]
        return SampleResult(token, logprob, top)

    @property
    def uniform_logprob(self) -> float:
        return -math.log(len(self.words))  # every word equally likely: an honest "no model" value


def _sleep_until(deadline: float) -> None:
    delay = deadline - time.perf_counter()
    if delay > 0:
        time.sleep(delay)
