"""Turns a scheduled batch into tensors, runs the model over the paged KV cache, samples."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from microserve.config import EngineConfig
from microserve.engine.request import Request, prompt_rows
from microserve.engine.structured import fill_bitmasks, unpack
from microserve.errors import UserError
from microserve.models.deterministic import make_batch_invariant
from microserve.models.llama import AttentionMetadata, DecodeGroup, KVCache, PrefillSeq
from microserve.models.loader import LoadedModel
from microserve.sampling import SampleResult, Sampler, token_logprobs


# Decode grouping: a group closes when the next context is shorter than this fraction of
# its longest, provided it already holds MIN_DECODE_GROUP sequences (each group costs a
# few extra kernel launches per layer).
DECODE_GROUP_RATIO = 0.75
MIN_DECODE_GROUP = 4
# Structured-output masks of up to this many rows are filled after the forward pass, not beside it.
SYNC_MASKS_UP_TO = 2


class ModelRunner:
    def __init__(self, loaded: LoadedModel, cfg: EngineConfig):
        self.model = loaded.model
        self.model_config = loaded.config
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.block_size = cfg.block_size
        per_block = KVCache.bytes_per_block(loaded.config, cfg.block_size, loaded.dtype)
        num_blocks = cfg.kv_cache_memory // per_block
        if num_blocks < 2:
            raise UserError(
                f"kv_cache_memory {cfg.kv_cache_memory} bytes holds fewer than 2 KV blocks "
                f"({per_block} bytes each); give it more"
            )
        self.kv = KVCache(loaded.config, num_blocks, cfg.block_size, loaded.dtype, loaded.device,
                          shared=cfg.kv_shared)
        self.sampler = Sampler(cfg.seed)
        self.deterministic = cfg.deterministic
        if cfg.deterministic:
            make_batch_invariant(self.model)
        else:
            self.model.choose_gemm_rows()
        # Decode-only steps in one C++ call (models/llama.py decode_step), unless a mode needs the Python path.
        self.fuse_decode = self.model.can_fuse_decode() and not cfg.deterministic
        self.fuse_max_batch = self.model.fused_decode_max_batch()
        self.model.warm_up_packed_linears(max(cfg.max_num_batched_tokens, cfg.max_num_seqs), cfg.max_num_seqs)
        self._mask_pool: ThreadPoolExecutor | None = None  # structured-output masks, beside the forward pass

    @property
    def num_blocks(self) -> int:
        return self.kv.num_blocks

    def execute(self, items: list[tuple[Request, int]]) -> list[SampleResult | None]:
        """Compute KV for each (request, n new tokens); sample for those whose tokens are all computed."""
        inputs, positions, slots = [], [], []
        decode_rows, decode_reqs, prefills = [], [], []
        sample_rows, sample_reqs = [], []
        bs = self.block_size
        row = 0
        for req, n in items:
            start = req.num_computed_tokens
            end = start + n
            inputs += req.token_ids[start:end]
            positions += range(start, end)
            table = req.block_ids
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            if n == 1:
                decode_rows.append(row)
                decode_reqs.append((req, end))
            else:
                ctx = None if start == 0 and not self.deterministic else self._context_slots(table, end)
                prefills.append(PrefillSeq(row, row + n, end, ctx))
            row += n
            if end == req.num_tokens and not req.prefill_only:  # the next token is due
                sample_rows.append(row - 1)
                sample_reqs.append(req)

        masks = self._start_masks(sample_reqs)
        scored = prompt_rows(items)
        dev = self.device
        if not prefills and self.fuse_decode and all(req.kv_progress is None for req, _ in items) \
                and (self.fuse_max_batch is None or len(items) <= self.fuse_max_batch):
            hidden = self.model.decode_step(
                torch.tensor(inputs, device=dev), torch.tensor(positions, device=dev), torch.tensor(slots, device=dev),
                self._block_tables([req for req, _ in decode_reqs]), torch.tensor([end for _, end in decode_reqs]),
                self.kv)
            self._score_prompts(scored, hidden)
            return self._sample(items, hidden, sample_rows, sample_reqs, masks)
        attn = AttentionMetadata(slot_mapping=torch.tensor(slots, device=dev), prefills=prefills, block_size=bs,
                                 deterministic=self.deterministic)
        if decode_rows:
            attn.decode_groups = self._decode_groups(decode_rows, decode_reqs, whole_batch=not prefills)
        # Prompts computed only to be sent: their transfer may start layer by layer.
        watchers = []
        for req, n in items:
            if req.kv_progress is not None and req.num_computed_tokens + n == req.num_tokens:
                req.kv_progress.start(req.block_ids)
                watchers.append(req.kv_progress)
        hook = (lambda i: [w.layer_done(i) for w in watchers]) if watchers else None
        hidden = self.model(
            torch.tensor(inputs, device=dev), torch.tensor(positions, device=dev), attn, self.kv, layer_hook=hook
        )
        self._score_prompts(scored, hidden)
        return self._sample(items, hidden, sample_rows, sample_reqs, masks)

    def _start_masks(self, reqs: list[Request]):
        """Compute the grammar masks of the rows due to sample in a thread while the forward
        pass runs (llguidance releases the GIL); a function that returns them once it has, or
        None when no row has a grammar."""
        constrained = [i for i, req in enumerate(reqs) if req.matcher is not None]
        if not constrained:
            return None
        vocab = self.model_config.vocab_size
        matchers = [reqs[i].matcher for i in constrained]
        if len(matchers) <= SYNC_MASKS_UP_TO:  # tens of microseconds: less than a thread's hand-off
            return lambda: unpack(constrained, *fill_bitmasks(matchers, vocab), vocab)
        if self._mask_pool is None:
            self._mask_pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
        filling = self._mask_pool.submit(fill_bitmasks, matchers, vocab)
        # Torch's part (the unpacking) waits for the forward pass: beside it, it would compete
        # for the same cores and threads.
        return lambda: unpack(constrained, *filling.result(), vocab)

    def _score_prompts(self, scored: list[tuple[Request, int, int, int]], hidden) -> None:
        """Append the logprobs of the prompt tokens these rows predict to each request's
        `prompt_logprobs` (echo with logprobs)."""
        for req, row, first, last in scored:
            logits = self.model.compute_logits(hidden[row : row + last - first]).cpu()
            targets = req.token_ids[first + 1 : last + 1]
            req.out.prompt_logprobs += token_logprobs(logits, targets, req.params.prompt_logprobs)

    def _sample(self, items, hidden, sample_rows, sample_reqs, masks) -> list[SampleResult | None]:
        dev = self.device
        results: list[SampleResult | None] = [None] * len(items)
        if sample_reqs:
            if len(sample_rows) != hidden.shape[0]:
                hidden = hidden[torch.tensor(sample_rows, device=dev)]
            logits = self.model.compute_logits(hidden).cpu()
            sampled = iter(self.sampler(logits, sample_reqs, masks() if masks is not None else None))
            for i, (req, n) in enumerate(items):
                if req.num_computed_tokens + n == req.num_tokens and not req.prefill_only:
                    results[i] = next(sampled)
        return results

    def _block_tables(self, reqs: list[Request]) -> torch.Tensor:
        """[B, longest] block tables, padded with block 0 (never read past a sequence's length)."""
        width = max(len(req.block_ids) for req in reqs)
        return torch.tensor([req.block_ids + [0] * (width - len(req.block_ids)) for req in reqs])

    def _context_slots(self, table: list[int], length: int) -> torch.Tensor:
        blocks = torch.tensor(table[: -(-length // self.block_size)], device=self.device)
        offsets = torch.arange(self.block_size, device=self.device)
        return (blocks[:, None] * self.block_size + offsets).view(-1)[:length]

    def _decode_groups(self, rows, decode_reqs, whole_batch: bool) -> list[DecodeGroup]:
        """Split decodes into groups of similar context length, so padding wastes little work.

        Attention cost is batch x longest context; sorted by length, a group closes
        when the next context is under `DECODE_GROUP_RATIO` of the group's longest.
        """
        order = sorted(range(len(rows)), key=lambda i: -decode_reqs[i][1])
        groups, current = [], []
        for i in order:
            if current and decode_reqs[i][1] < DECODE_GROUP_RATIO * decode_reqs[current[0]][1] \
                    and len(current) >= MIN_DECODE_GROUP:
                groups.append(current)
                current = []
            current.append(i)
        groups.append(current)
        if len(groups) == 1 and whole_batch:
            return [self._decode_group(None, decode_reqs)]
        return [self._decode_group([rows[i] for i in g], [decode_reqs[i] for i in g]) for g in groups]

    def _decode_group(self, rows, decode_reqs) -> DecodeGroup:
        """Padded [B, max_blocks] block tables and the [B, 1, 1, L] mask of real keys."""
        bs = self.block_size
        max_blocks = -(-max(length for _, length in decode_reqs) // bs)
        table = [req.block_ids[:max_blocks] + [0] * (max_blocks - min(max_blocks, len(req.block_ids)))
                 for req, _ in decode_reqs]
        lengths = torch.tensor([length for _, length in decode_reqs], device=self.device)
        mask = torch.arange(max_blocks * bs, device=self.device)[None, :] < lengths[:, None]
        return DecodeGroup(
            rows=None if rows is None else torch.tensor(rows, device=self.device),
            blocks=torch.tensor(table, device=self.device),
            mask=mask[:, None, None, :],
            lengths=lengths,
        )
