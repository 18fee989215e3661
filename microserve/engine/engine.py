"""The engine: requests in, one scheduled batch per step, outputs (with text deltas) out."""

from __future__ import annotations

import logging
import time

import torch

from microserve.config import EngineConfig
from microserve.engine.block_pool import BlockPool, hash_block, hash_prompt_blocks
from microserve.engine.microserving import Conflict, Microserving
from microserve.engine.request import CompletionOutput, Request, RequestOutput, RequestTimes
from microserve.engine.runner import build_runner
from microserve.engine.scheduler import Scheduler
from microserve.engine.structured import GrammarCompiler
from microserve.errors import UserError
from microserve.models.loader import LoadedModel
from microserve.sampling import SampleResult, SamplingParams

log = logging.getLogger("microserve.engine")


class LLMEngine:
    def __init__(self, cfg: EngineConfig | None = None, loaded: LoadedModel | None = None, progress: bool = True):
        self.cfg = cfg = cfg or EngineConfig()
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.loaded, self.runner = build_runner(cfg, loaded, progress)
        self.model_config = self.loaded.config
        self.tokenizer = self.loaded.tokenizer
        self.pool = BlockPool(self.runner.num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.pool, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        capacity = self.runner.num_blocks * cfg.block_size
        self.max_model_len = min(cfg.max_model_len or self.model_config.max_position_embeddings, capacity)
        self.eos_token_ids = frozenset(self._eos_ids())
        eos = self.tokenizer.eos_token_id if self.tokenizer is not None else None
        self.grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size, eos)
        self.groups: dict[str, list[Request]] = {}  # request id -> its n sequences
        self.microserving = Microserving(self)
        self.held: dict[str, tuple[Request, object]] = {}  # prefill-only requests: id -> (request, on_done)
        self.failed: dict[str, str] = {}  # request id -> why it failed, until its final output is out

    def _eos_ids(self) -> set[int]:
        ids = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    # ------------------------------------------------------------ requests in

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise UserError("this model has no tokenizer: send token ids")
            return self.tokenizer(prompt, add_special_tokens=True).input_ids
        return list(prompt)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise UserError("the prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_ids if not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise UserError(f"token id {bad[0]!r} is outside the vocabulary [0, {vocab})")
        bad = [t for t in params.stop_token_ids if not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise UserError(f"stop token id {bad[0]!r} is outside the vocabulary [0, {vocab})")
        limit = self.max_model_len
        if len(prompt_ids) >= limit:
            raise UserError(f"the prompt has {len(prompt_ids)} tokens; this model's context window is {limit}")
        if params.max_tokens is not None and len(prompt_ids) + params.max_tokens > limit:
            raise UserError(
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) "
                f"exceeds the context window of {limit} tokens"
            )

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    resume: tuple[list[int], int] | None = None) -> list[int]:
        """Queue a request; returns its prompt token ids. Raises UserError on bad input.

        `resume = (generated token ids, characters of their text already delivered)` continues a
        sequence another engine started (fail-over): those tokens count as output (for
        max_tokens, min_tokens, penalties, stop strings) and are not emitted again.
        """
        params = params or SamplingParams()
        if request_id in self.groups:
            raise UserError(f"request id {request_id!r} is already in use")
        prompt_ids = self.tokenize(prompt)
        self.validate(prompt_ids, params)
        if resume is not None:
            self.validate_resume(prompt_ids, params, resume[0])
        # Compiled before anything is reserved (servers compile off this thread first: a cache hit here).
        grammar = self.grammars.compile(params.structured) if params.structured is not None else None
        reserved = self.microserving.take(request_id, prompt_ids)
        seqs = []
        for i in range(params.n):
            seqs.append(Request(
                request_id=request_id if params.n == 1 else f"{request_id}#{i}",
                group_id=request_id,
                index=i,
                token_ids=list(prompt_ids),
                num_prompt_tokens=len(prompt_ids),
                params=params,
                eos_token_ids=self.eos_token_ids,
                seed=None if params.seed is None else params.seed + i,
                wait_for=seqs[0] if i else None,
                matcher=grammar.matcher(resume[0] if resume else []) if grammar is not None else None,
            ))
        if resume is not None and resume[0]:
            self._resume(seqs[0], *resume)
        if reserved is not None:  # start from the KV that prep_recv reserved and a peer filled
            first = seqs[0]
            first.block_ids = reserved.block_ids
            first.num_computed_tokens = first.num_cached_tokens = reserved.valid_len
        self.groups[request_id] = seqs
        for s in seqs:
            self.scheduler.add(s)
        return prompt_ids

    def validate_resume(self, prompt_ids: list[int], params: SamplingParams, generated: list[int]) -> None:
        if params.n != 1:
            raise UserError("a resumed request continues one sequence (n must be 1)")
        vocab = self.model_config.vocab_size
        if not all(isinstance(t, int) and 0 <= t < vocab for t in generated):
            raise UserError(f"generated token ids must lie in [0, {vocab})")
        if params.max_tokens is not None and len(generated) >= params.max_tokens:
            raise UserError(f"{len(generated)} tokens are already generated; max_tokens is {params.max_tokens}")
        if len(prompt_ids) + len(generated) >= self.max_model_len:
            raise UserError("the prompt plus the generated tokens fill the context window")

    def _resume(self, req: Request, generated: list[int], text_len: int) -> None:
        """Take `generated` as this sequence's first outputs; rebuild its text the same way
        the first engine built it, so deltas continue exactly where the client stopped."""
        for t in generated:
            req.token_ids.append(t)
            self._detokenize(req, skip_last=False)
        req.out.sent_tokens = len(generated)
        req.out.sent_text = min(text_len, len(req.out.text))
        if req.params.logprobs is not None:  # placeholders: only later tokens' logprobs are sent
            req.out.logprobs = [None] * len(generated)

    def add_prefill_only(self, request_id: str, prompt_ids: list[int], on_done, progress=None) -> None:
        """Compute KV for `prompt_ids` (reusing the prefix cache) and hold its blocks.

        `on_done(request)` runs in this thread once every position's KV exists; the
        blocks stay held until `release_prefill(request_id)`.
        """
        if request_id in self.groups or request_id in self.held:
            raise Conflict(f"request id {request_id!r} is already in use")
        self.validate(prompt_ids, SamplingParams(max_tokens=1))
        req = Request(request_id=request_id, group_id=request_id, index=0, token_ids=list(prompt_ids),
                      num_prompt_tokens=len(prompt_ids), params=SamplingParams(max_tokens=1), prefill_only=True,
                      kv_progress=progress)
        self.held[request_id] = (req, on_done)
        bs = self.pool.block_size
        hit = self.pool.match_prefix(hash_prompt_blocks(prompt_ids, bs))
        if len(hit) * bs == len(prompt_ids):  # all cached: nothing to compute
            self.pool.touch(hit)
            self.pool.record_lookup(len(prompt_ids), len(prompt_ids))
            req.block_ids, req.num_computed_tokens = list(hit), len(prompt_ids)
            req.num_cached_tokens = len(prompt_ids)
            self._prefilled(req, on_done)
            return
        self.scheduler.add(req)

    def release_prefill(self, request_id: str) -> None:
        """Free the blocks of a prefill-only request (done, failed or aborted)."""
        entry = self.held.pop(request_id, None)
        if entry is not None:
            req = entry[0]
            if req.kv_progress is not None and req.num_computed_tokens < req.num_tokens:
                req.kv_progress.fail("the request was released before its KV was computed")
            self.scheduler.finish(req, "abort")

    @staticmethod
    def _prefilled(req: Request, on_done) -> None:
        if req.kv_progress is not None:
            req.kv_progress.complete(req.block_ids)
        on_done(req)

    def abort_request(self, request_id: str) -> bool:
        """Stop a request at once and free every block it holds. False if unknown."""
        if self.microserving.abort(request_id):
            return True
        if request_id in self.held:
            self.release_prefill(request_id)
            return True
        seqs = self.groups.pop(request_id, None)
        if seqs is None:
            return False
        for s in seqs:
            if not s.finished:
                self.scheduler.finish(s, "abort")
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------ one step

    def step(self) -> list[RequestOutput]:
        """Run one batch; return an output for every request that advanced (and finished ones).

        An exception from the forward pass leaves the KV cache in an unknown state and goes
        up to the caller. One request's own failure (sampling, detokenizing, stop strings)
        ends that request alone, with `error` set on its output and its blocks freed.
        """
        batch = self.scheduler.schedule()
        if not batch.items:
            return []
        results = self.runner.execute(batch.items)
        touched: dict[str, None] = {}
        now = time.monotonic()
        for (req, n), result in zip(batch.items, results):
            req.num_computed_tokens += n
            self._cache_full_blocks(req)
            if req.prefill_only and req.num_computed_tokens == req.num_tokens:
                self.scheduler.hold(req)
                self._prefilled(req, self.held[req.request_id][1])
                continue
            if result is not None and not req.finished:  # (a sibling's failure may have ended it)
                if req.first_token_time is None:
                    req.first_token_time = now
                try:
                    if result.error is not None:
                        raise result.error
                    self._append_token(req, result)
                except Exception as e:
                    self._fail_group(req.group_id, e)
                touched[req.group_id] = None
        return [out for out in map(self._output_or_failure, touched) if out is not None]

    def _fail_group(self, group_id: str, error: Exception) -> None:
        """End every sequence of a request whose own processing failed; the engine goes on."""
        log.error("request %s failed (%s: %s); the engine goes on", group_id, type(error).__name__, error,
                  exc_info=error)
        for s in self.groups.get(group_id, []):
            if not s.finished:
                self.scheduler.finish(s, "error")
        self.failed[group_id] = f"{type(error).__name__}: {error}"

    def _cache_full_blocks(self, req: Request) -> None:
        bs = self.pool.block_size
        while (len(req.block_hashes) + 1) * bs <= req.num_computed_tokens:
            j = len(req.block_hashes)
            parent = req.block_hashes[-1] if req.block_hashes else None
            h = hash_block(parent, req.token_ids[j * bs : (j + 1) * bs])
            req.block_hashes.append(h)
            self.pool.cache_block(req.block_ids[j], h)

    def _append_token(self, req: Request, result: SampleResult) -> None:
        token = result.token_id
        if req.matcher is not None:
            req.matcher.accept(token)
        req.token_ids.append(token)
        if req.params.logprobs is not None:
            req.out.logprobs.append((result.logprob, result.top_logprobs))
        params = req.params
        stop_token = (token in params.stop_token_ids) or (not params.ignore_eos and token in self.eos_token_ids)
        self._detokenize(req, skip_last=stop_token)
        reason = None
        if stop_token and req.num_output_tokens > params.min_tokens - 1:
            reason = "stop"
        elif req.matcher is not None and req.matcher.done:  # the document is complete
            reason = "stop"
        elif params.stop and req.out.cut_at_stop(params.stop, params.include_stop_str_in_output):
            reason = "stop"
        elif (params.max_tokens is not None and req.num_output_tokens >= params.max_tokens) or (
            req.num_tokens >= self.max_model_len
        ):
            reason = "length"
        if reason:
            self.scheduler.finish(req, reason)

    # ------------------------------------------------------------ text

    def _detokenize(self, req: Request, skip_last: bool) -> None:
        if self.tokenizer is not None:
            ids = req.output_ids[:-1] if skip_last else req.output_ids
            req.out.detokenize(self.tokenizer, ids, req.params.skip_special_tokens)

    def _output_or_failure(self, group_id: str) -> RequestOutput | None:
        """The group's output; for a failed group, a final output carrying the error."""
        if group_id not in self.groups:
            return None
        if group_id not in self.failed:
            try:
                return self._output(group_id)
            except Exception as e:
                self._fail_group(group_id, e)
        seqs = self.groups.pop(group_id)
        return RequestOutput(request_id=group_id, prompt_token_ids=seqs[0].prompt_ids, outputs=[], finished=True,
                             error=self.failed.pop(group_id))

    def _output(self, group_id: str) -> RequestOutput:
        seqs = self.groups[group_id]
        outs = []
        for s in seqs:
            text, delta_text = s.out.take_delta(s.finished, s.params.stop)
            out_ids = s.output_ids
            delta_ids = out_ids[s.out.sent_tokens :]
            with_logprobs = s.params.logprobs is not None
            delta_lp = s.out.logprobs[s.out.sent_tokens :] if with_logprobs else None
            s.out.sent_tokens = len(out_ids)
            outs.append(CompletionOutput(
                index=s.index,
                text=text,
                token_ids=out_ids,
                finish_reason=s.finish_reason,
                logprobs=list(s.out.logprobs) if with_logprobs else None,
                delta_text=delta_text,
                delta_token_ids=delta_ids,
                delta_logprobs=delta_lp,
            ))
        finished = all(s.finished for s in seqs)
        if finished:
            del self.groups[group_id]
        return RequestOutput(
            request_id=group_id,
            prompt_token_ids=seqs[0].prompt_ids,
            outputs=outs,
            finished=finished,
            num_cached_tokens=seqs[0].num_cached_tokens,
            prompt_logprobs=_prompt_logprobs(seqs[0]),
            times=_times(seqs[0]) if finished else None,
        )

    # ------------------------------------------------------------ status

    def stats(self) -> dict:
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "num_preemptions": self.scheduler.num_preemptions,
            **self.pool.stats(),
        }


def _times(req: Request) -> RequestTimes:
    return RequestTimes(req.arrival_time, req.scheduled_time, req.first_token_time, time.monotonic())


def _prompt_logprobs(req: Request) -> list | None:
    """The prompt's logprobs once all are scored (None for the first token, which nothing predicts)."""
    if not req.wants_prompt_logprobs or len(req.out.prompt_logprobs) < req.num_prompt_tokens - 1:
        return None
    return [None, *req.out.prompt_logprobs]
