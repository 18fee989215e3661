"""Batch-invariant kernels: a token's logits do not depend on what else is in its step.

With these, a request gets bitwise the same logits whether it runs alone or in a batch of
32, whatever its prefill's chunk boundaries, and whether its context KV was computed in
this step, earlier, or received from another engine. That is what makes a strategy change
(data parallel, disaggregated, migrated, failed over) leave the answer unchanged.

Where a result could depend on the batch, and what fixes it:

- GEMMs (linears, lm_head, attention tiles). BLAS picks its kernel by the row count: on
  MKL (AVX2, float32) a 1-row GEMM is a GEMV, and below 12 rows the rows past the last
  multiple of 4 go through an edge kernel; each reduces in another order. From 12 rows up,
  and for full groups of 4 below that, every row gets the same bits whatever the count or
  its place. So rows are padded (`gemm_rows`); `check_batch_invariance` verifies the
  property on the GEMMs this engine runs, at start, and refuses to start if it fails.
- Attention. A library kernel splits keys and queries into blocks sized by the lengths in
  the step. Here every query row is reduced over its keys in fixed chunks of `KEY_CHUNK`
  positions counted from the sequence start: scores and P@V are batched matmuls of one
  fixed shape per chunk, the softmax max is exact in any order, and the chunks are summed
  in a fixed binary tree. Chunks past a row's last key are masked to exact zeros, so the
  padding that batching needs changes no bit.
- Norms, activations and the sampler's softmax reduce each row on its own (verified by the
  tests, not assumed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from microserve.errors import UserError

ROW_GROUP = 4  # below FULL_ROWS, GEMMs run on whole groups of this many rows
FULL_ROWS = 12  # from this many rows, every row of a GEMM is computed alike
KEY_CHUNK = 64  # keys per attention tile (a multiple of the block size; see `key_chunk`)
MAX_TILE_ELEMENTS = 1 << 22  # score elements per attention call; longer prefills go in query slices


def key_chunk(block_size: int) -> int:
    return max(KEY_CHUNK, block_size)  # block sizes are powers of two, so this is a multiple of it


def gemm_rows(n: int) -> int:
    """The row count a batch-invariant GEMM runs with for n rows."""
    return n if n >= FULL_ROWS else -(-n // ROW_GROUP) * ROW_GROUP


def padded_rows_call(fn, x: torch.Tensor) -> torch.Tensor:
    """fn(x) with x's rows padded to `gemm_rows` (the padding's results are dropped)."""
    n = x.shape[0]
    rows = gemm_rows(n)
    if rows == n:
        return fn(x)
    return fn(torch.cat([x, x.new_zeros(rows - n, *x.shape[1:])]))[:n]


class PaddedRowsLinear(torch.nn.Module):
    """A linear (plain or prepacked) whose GEMM always runs with `gemm_rows` rows."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.in_features = inner.in_features
        self.out_features = inner.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return padded_rows_call(self.inner, x)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qpos: torch.Tensor, chunk: int) -> torch.Tensor:
    """Causal attention in a fixed reduction order.

    q [B, n, Hq, D]: n queries per sequence; k, v [B, L, Hkv, D]: each sequence's keys from
    position 0, L a multiple of `chunk` (positions past a query's own are masked);
    qpos [B, n]: each query's position. Returns [B, n, Hq, D] in q's dtype, computed in float32.
    """
    b, n, hq, d = q.shape
    _, length, hkv, _ = k.shape
    g = hq // hkv
    rows = n * g
    r = gemm_rows(rows)
    # One row per (query token, query head of this KV head): GQA without copying k and v.
    qf = (q.float() * d ** -0.5).view(b, n, hkv, g, d).permute(0, 2, 1, 3, 4).reshape(b, hkv, rows, d)
    pos = qpos[:, :, None].expand(b, n, g).reshape(b, 1, rows)
    if r > rows:  # padding rows attend to key 0 only and are dropped
        qf = F.pad(qf, (0, 0, 0, r - rows))
        pos = F.pad(pos, (0, r - rows))
    nch = length // chunk
    kc = k.float().view(b, nch, chunk, hkv, d).permute(0, 3, 1, 4, 2).contiguous()  # [b, hkv, nch, d, chunk]
    # A column of ones makes P@V return each row's softmax denominator in the same fixed-shape GEMM.
    vf = torch.cat([v.float(), v.new_ones(b, length, hkv, 1, dtype=torch.float32)], -1)
    vc = vf.view(b, nch, chunk, hkv, d + 1).permute(0, 3, 1, 2, 4).contiguous()  # [b, hkv, nch, chunk, d+1]
    s = torch.matmul(qf[:, :, None].expand(b, hkv, nch, r, d).contiguous(), kc)  # [b, hkv, nch, r, chunk]
    keys = torch.arange(length, device=q.device).view(nch, 1, chunk)
    s.masked_fill_(keys > pos[:, :, None, :, None], float("-inf"))
    s.sub_(s.amax(dim=(2, 4), keepdim=True)).exp_()  # max is exact in any order
    pv = torch.matmul(s, vc)  # [b, hkv, nch, r, d+1]
    # Sum the chunks in a binary tree over a power-of-two count: extra all-zero chunks at the
    # end (another batch's padding) leave every partial sum unchanged.
    total = 1 << (nch - 1).bit_length()
    if total > nch:
        pv = F.pad(pv, (0, 0, 0, 0, 0, total - nch))
    while pv.shape[2] > 1:
        half = pv.shape[2] // 2
        pv = pv[:, :, :half] + pv[:, :, half:]
    acc = pv[:, :, 0, :rows]
    out = acc[..., :d] / acc[..., d:]
    return out.view(b, hkv, n, g, d).permute(0, 2, 1, 3, 4).reshape(b, n, hq, d).to(q.dtype)


def fixed_order_attention(q, attn, k_cache, v_cache) -> torch.Tensor:
    """`paged_attention` with `attend`'s fixed reduction order, for decodes and prefills alike."""
    bs = attn.block_size
    chunk = key_chunk(bs)
    _, hkv, d = k_cache.shape
    out = torch.empty_like(q)
    for grp in attn.decode_groups:
        qs = q if grp.rows is None else q.index_select(0, grp.rows)
        b = qs.shape[0]
        blocks = grp.blocks
        pad = -blocks.shape[1] % (chunk // bs)
        if pad:
            blocks = F.pad(blocks, (0, pad))
        ks = k_cache.view(-1, bs, hkv, d).index_select(0, blocks.reshape(-1)).view(b, -1, hkv, d)
        vs = v_cache.view(-1, bs, hkv, d).index_select(0, blocks.reshape(-1)).view(b, -1, hkv, d)
        o = attend(qs[:, None], ks, vs, grp.lengths[:, None] - 1, chunk)[:, 0]
        if grp.rows is None:
            out.copy_(o)
        else:
            out.index_copy_(0, grp.rows, o)
    for p in attn.prefills:
        slots = p.context_slots
        pad = -slots.shape[0] % chunk
        if pad:
            slots = F.pad(slots, (0, pad))
        ks = k_cache.index_select(0, slots)[None]
        vs = v_cache.index_select(0, slots)[None]
        n = p.end - p.start
        positions = torch.arange(p.context_len - n, p.context_len, device=q.device)[None]
        per_call = max(1, MAX_TILE_ELEMENTS // (q.shape[1] * slots.shape[0]))
        for s in range(0, n, per_call):  # each query's result is the same in any slice
            e = min(n, s + per_call)
            keys = -(-(p.context_len - n + e) // chunk) * chunk  # causal: later chunks are all masked here
            out[p.start + s : p.start + e] = attend(q[None, p.start + s : p.start + e], ks[:, :keys], vs[:, :keys],
                                                    positions[:, s:e], chunk)[0]
    return out


def make_batch_invariant(model) -> None:
    """Switch a loaded model to the batch-invariant kernels, after checking they hold here."""
    if model.batch_invariant:
        return
    quantized = [model.quant_lm_head] if model.quant_lm_head is not None else []
    for layer in model.layers:
        for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            lin = getattr(layer, name)
            if hasattr(lin, "make_batch_invariant"):
                quantized.append(lin)
            else:
                setattr(layer, name, PaddedRowsLinear(lin))
    for lin in quantized:  # GGUF-format layers: their own kernels, kept on the batch-invariant path
        lin.make_batch_invariant()
    model.batch_invariant = True
    check_batch_invariance(model, model.dtype)


def check_batch_invariance(model, dtype) -> None:
    """Refuse to start when this machine's kernels give a row a result that depends on the batch.

    Runs each distinct GEMM of the model (layer 0 stands in for all) and `attend` on a probe
    row placed at several positions in batches of several sizes; every result must be bitwise equal.
    """
    g = torch.Generator().manual_seed(0)
    layer = model.layers[0]
    gemms = {"qkv_proj": layer.qkv_proj, "o_proj": layer.o_proj, "gate_up_proj": layer.gate_up_proj,
             "down_proj": layer.down_proj, "lm_head": model.compute_logits}
    for name, fn in gemms.items():
        width = layer.down_proj.in_features if name == "down_proj" else (
            layer.o_proj.in_features if name == "o_proj" else model.cfg.hidden_size)
        probe = torch.randn(width, generator=g).to(dtype)
        results = []
        for rows, at in [(rows, at) for rows in range(1, FULL_ROWS + 2) for at in {0, rows // 2, rows - 1}] + [(64, 63)]:
            x = torch.randn(rows, width, generator=g).to(dtype)
            x[at] = probe
            with torch.inference_mode():
                results.append(fn(x)[at])
        if not all(torch.equal(results[0], other) for other in results[1:]):
            raise UserError(f"--deterministic: this machine's {name} GEMM gives a row a result that depends on the "
                            "batch size, so outputs cannot be made batch-invariant here; run without --deterministic")
    cfg = model.cfg
    d, hq, hkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    keys = torch.randn(3 * KEY_CHUNK, hkv, d, generator=g).to(dtype)
    values = torch.randn(3 * KEY_CHUNK, hkv, d, generator=g).to(dtype)
    probe = torch.randn(hq, d, generator=g).to(dtype)
    at = KEY_CHUNK + 5  # the probe query's position
    results = []
    for b, n, length in [(1, 1, 2 * KEY_CHUNK), (3, 1, 3 * KEY_CHUNK), (1, 3, 2 * KEY_CHUNK), (1, 5, 2 * KEY_CHUNK),
                         (1, 40, 2 * KEY_CHUNK)]:
        q = torch.randn(b, n, hq, d, generator=g).to(dtype)
        q[b - 1, n - 1] = probe
        k = torch.randn(b, length, hkv, d, generator=g).to(dtype)
        v = torch.randn(b, length, hkv, d, generator=g).to(dtype)
        k[b - 1, : at + 1], v[b - 1, : at + 1] = keys[: at + 1], values[: at + 1]
        qpos = torch.arange(at - n + 1, at + 1).repeat(b, 1)
        results.append(attend(q, k, v, qpos, KEY_CHUNK)[b - 1, n - 1])
    if not all(torch.equal(results[0], other) for other in results[1:]):
        raise UserError("--deterministic: this machine's batched matmul gives a row a result that depends on the "
                        "batch, so attention cannot be made batch-invariant here; run without --deterministic")
