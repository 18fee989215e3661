"""Turns a scheduled batch into tensors, runs the model over the paged KV cache, samples."""

from __future__ import annotations

import torch

from microserve.config import EngineConfig
from microserve.engine.request import Request
from microserve.errors import UserError
from microserve.models.llama import AttentionMetadata, KVCache, PrefillSeq
from microserve.models.loader import LoadedModel
from microserve.sampling import SampleResult, Sampler


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
        self.kv = KVCache(loaded.config, num_blocks, cfg.block_size, loaded.dtype, loaded.device)
        self.sampler = Sampler(cfg.seed)

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
                ctx = None if start == 0 else self._context_slots(table, end)
                prefills.append(PrefillSeq(row, row + n, end, ctx))
            row += n
            if end == req.num_tokens:  # this step reaches the end: the next token is due
                sample_rows.append(row - 1)
                sample_reqs.append(req)

        dev = self.device
        attn = AttentionMetadata(slot_mapping=torch.tensor(slots, device=dev), prefills=prefills)
        if decode_rows:
            attn.all_decode = not prefills
            if not attn.all_decode:
                attn.decode_rows = torch.tensor(decode_rows, device=dev)
            attn.decode_slots, attn.decode_mask = self._decode_tables(decode_reqs)
        hidden = self.model(
            torch.tensor(inputs, device=dev), torch.tensor(positions, device=dev), attn, self.kv
        )
        results: list[SampleResult | None] = [None] * len(items)
        if sample_reqs:
            if len(sample_rows) != hidden.shape[0]:
                hidden = hidden[torch.tensor(sample_rows, device=dev)]
            logits = self.model.compute_logits(hidden).cpu()
            sampled = iter(self.sampler(logits, sample_reqs))
            for i, (req, n) in enumerate(items):
                if req.num_computed_tokens + n == req.num_tokens:
                    results[i] = next(sampled)
        return results

    def _context_slots(self, table: list[int], length: int) -> torch.Tensor:
        blocks = torch.tensor(table[: -(-length // self.block_size)], device=self.device)
        offsets = torch.arange(self.block_size, device=self.device)
        return (blocks[:, None] * self.block_size + offsets).view(-1)[:length]

    def _decode_tables(self, decode_reqs):
        """Padded [B, L] context slots and the [B, 1, 1, L] mask of real keys."""
        bs = self.block_size
        max_len = max(length for _, length in decode_reqs)
        max_blocks = -(-max_len // bs)
        table = [req.block_ids[:max_blocks] + [0] * (max_blocks - len(req.block_ids[:max_blocks])) for req, _ in decode_reqs]
        table = torch.tensor(table, device=self.device)
        offsets = torch.arange(bs, device=self.device)
        slots = (table[:, :, None] * bs + offsets).view(len(decode_reqs), -1)[:, :max_len]
        lengths = torch.tensor([length for _, length in decode_reqs], device=self.device)
        mask = torch.arange(max_len, device=self.device)[None, :] < lengths[:, None]
        return slots.contiguous(), mask[:, None, None, :]
