"""One Llama-family decoder for Llama 2/3, SmolLM/SmolLM2, Qwen2/2.5, Qwen3 and Mistral.

The forward pass works on a flat batch of tokens from many sequences (continuous
batching) and reads and writes a paged KV cache; see `AttentionMetadata`.
The same code runs on CPU and CUDA.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from microserve.config import ModelConfig
from microserve.errors import UserError
from microserve.models.deterministic import fixed_order_attention, gemm_rows, padded_rows_call
from microserve.models.quant import (GEMM_FROM_ROWS, KERNEL_TYPES, GGUFWeight, QuantEmbedding, QuantLinear, concat_rows,
                                     padded_rows)


@dataclass
class PrefillSeq:
    """A sequence with several new tokens in this step (a prompt or a chunk of one)."""

    start: int  # its new tokens are rows [start, end) of the flat batch
    end: int
    context_len: int  # tokens of this sequence in the KV cache after this step
    context_slots: torch.Tensor | None  # slot ids of all context_len tokens; None when no cached prefix


@dataclass
class DecodeGroup:
    """Decodes attended together: their contexts are padded to the longest in the group."""

    rows: torch.Tensor | None  # [B] rows in the flat batch; None when the group is the whole batch, in order
    blocks: torch.Tensor  # [B, max_blocks] block tables, padded
    mask: torch.Tensor  # [B, 1, 1, max_blocks * block_size] True where a key is real
    lengths: torch.Tensor | None = None  # [B] context length of each (with its new token)


@dataclass
class AttentionMetadata:
    """Where this step's tokens go in the paged KV cache and what each one attends to."""

    slot_mapping: torch.Tensor  # [T] cache slot of every new token
    # Sequences with exactly one new token (decodes), attended in padded batches of similar length.
    decode_groups: list[DecodeGroup] = field(default_factory=list)
    block_size: int = 16
    prefills: list[PrefillSeq] = field(default_factory=list)
    # Batch-invariant attention (models/deterministic.py); prefills then always carry context_slots.
    deterministic: bool = False


class KVCache:
    """Paged KV storage: per layer, `num_slots = num_blocks * block_size` rows of [kv_heads, head_dim]."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype, device, shared: bool = False):
        """`shared=True` (CPU only) puts the pool in files under /dev/shm, so engines on this
        host can write KV straight into it (the shm transport)."""
        shape = (cfg.num_layers, num_blocks * block_size, cfg.num_kv_heads, cfg.head_dim)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_slots = num_blocks * block_size
        self.paths: dict[str, str] = {}
        numel = math.prod(shape)
        nbytes = numel * torch.tensor([], dtype=dtype).element_size()  # each of k and v
        on_cpu = torch.device(device).type == "cpu"
        if on_cpu:
            _check_host_memory(2 * nbytes)
        if shared and on_cpu:
            import os
            import uuid

            from microserve.kv_transfer.address import KV_POOL_FOLDER as folder

            _remove_stale_pools(folder)
            stat = os.statvfs(folder)
            if stat.f_bavail * stat.f_frsize < 2 * nbytes:
                raise UserError(f"the KV cache needs {2 * nbytes >> 20} MiB in {folder}, which has "
                                f"{stat.f_bavail * stat.f_frsize >> 20} MiB free; lower --kv-cache-memory")
            tag = f"microserve-kv-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            for name in ("k", "v"):
                path = os.path.join(folder, f"{tag}-{name}")
                self.paths[name] = path
                # Owner-only: other local users must not read or write this engine's KV.
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    # Reserve the pages now: a full /dev/shm then fails here with ENOSPC
                    # instead of killing the engine with SIGBUS on some later write.
                    os.posix_fallocate(fd, 0, nbytes)
                except OSError as e:
                    self.close()
                    raise UserError(f"cannot reserve {nbytes >> 20} MiB for the KV cache in {folder} ({e}); "
                                    "lower --kv-cache-memory") from e
                finally:
                    os.close(fd)
                pool = torch.from_file(path, shared=True, size=numel, dtype=dtype).view(shape)
                # Touch every page up front, as torch.zeros does for a private pool: the
                # engine's memory is then fixed at start, not creeping up as blocks are used.
                pool.zero_()
                setattr(self, name, pool)
        else:
            self.k = torch.zeros(shape, dtype=dtype, device=device)
            self.v = torch.zeros(shape, dtype=dtype, device=device)

    def close(self) -> None:
        """Remove the shared-memory files (the mappings stay valid until dropped)."""
        import os

        for path in self.paths.values():
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype) -> int:
        elem = torch.tensor([], dtype=dtype).element_size()
        return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * elem


def _check_host_memory(nbytes: int) -> None:
    """Refuse a KV cache larger than the memory the host has available (Linux), with a
    clear error, rather than being killed by the OOM killer while filling it."""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        available = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return
    if nbytes > available:
        raise UserError(f"the KV cache needs {nbytes >> 20} MiB but the host has {available >> 20} MiB "
                        "available; lower --kv-cache-memory")


def _remove_stale_pools(folder: str) -> None:
    """Delete shared KV pools left by engines that were killed (their pid is gone)."""
    import glob
    import os

    for path in glob.glob(os.path.join(folder, "microserve-kv-*")):
        try:
            pid = int(os.path.basename(path).split("-")[2])
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                os.unlink(path)
            except OSError:
                pass
        except (ValueError, IndexError, PermissionError):
            pass


def rope_inv_freq(cfg: ModelConfig, freq_factors: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse frequencies for rotary embeddings, with linear or Llama 3 scaling."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    if freq_factors is not None:  # GGUF files carry Llama 3 scaling as per-frequency divisors
        inv_freq = inv_freq / freq_factors.float()
    return inv_freq


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with rotate_half done as one roll and a signed sin."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin_signed)


def can_pack_linears(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and cpu_has_fast_bf16()


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """oneDNN's packed bf16 GEMMs need AVX512-BW or AVX-NE-CONVERT: try once on a tiny weight,
    so a CPU without them runs the plain path instead of failing at load."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(16, 16, dtype=torch.bfloat16), 1)
        torch.ops.mkldnn._linear_pointwise(torch.ones(2, 16, dtype=torch.bfloat16), w, None, "none", [], "")
        return True
    except RuntimeError:
        return False


class PackedLinear(nn.Module):
    """y = x W^T + b with W reordered once into oneDNN's blocked layout (CPU, bf16)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
        self.bias = None if bias is None else bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        rows = padded_rows(n) if x.dim() == 2 else n
        if rows == n:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        x = torch.cat([x, x.new_zeros(rows - n, x.shape[1])])
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")[:n]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        # q, k and v share one matmul, and so do gate and up: fewer kernel launches per token.
        self.qkv_proj = nn.Linear(cfg.hidden_size, q + 2 * kv, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q, cfg.hidden_size, bias=False)
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.input_layernorm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.post_attention_layernorm = nn.Parameter(torch.ones(cfg.hidden_size))
        if cfg.qk_norm:
            self.q_norm = nn.Parameter(torch.ones(cfg.head_dim))
            self.k_norm = nn.Parameter(torch.ones(cfg.head_dim))

    def forward(self, x, cos, sin, attn: AttentionMetadata, k_cache, v_cache):
        cfg = self.cfg
        hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        residual = x
        h = rms_norm(x, self.input_layernorm, cfg.rms_norm_eps)
        qkv = self.qkv_proj(h).view(-1, hq + 2 * hkv, d)
        if cfg.qk_norm:
            q = apply_rope(rms_norm(qkv[:, :hq], self.q_norm, cfg.rms_norm_eps), cos, sin)
            k = apply_rope(rms_norm(qkv[:, hq : hq + hkv], self.k_norm, cfg.rms_norm_eps), cos, sin)
        else:
            qk = apply_rope(qkv[:, : hq + hkv], cos, sin)
            q, k = qk[:, :hq], qk[:, hq:]
        v = qkv[:, hq + hkv :]
        k_cache.index_copy_(0, attn.slot_mapping, k)
        v_cache.index_copy_(0, attn.slot_mapping, v)
        out = paged_attention(q, k, v, attn, k_cache, v_cache)
        x = residual + self.o_proj(out.reshape(-1, hq * d))
        residual = x
        h = rms_norm(x, self.post_attention_layernorm, cfg.rms_norm_eps)
        gate, up = self.gate_up_proj(h).chunk(2, dim=-1)
        return residual + self.down_proj(F.silu(gate) * up)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in float32 and scale in the model dtype, exactly as the reference
    # implementation rounds (torch's fused rms_norm rounds differently in bf16).
    xf = x.float()
    xf = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True).add_(eps))
    return xf.to(x.dtype).mul_(weight)


def paged_attention(q, k, v, attn: AttentionMetadata, k_cache, v_cache) -> torch.Tensor:
    """Causal attention of each new token over its sequence's cached context."""
    if attn.deterministic:
        return fixed_order_attention(q, attn, k_cache, v_cache)
    groups = attn.decode_groups
    if len(groups) == 1 and groups[0].rows is None:  # a pure decode step in one group
        return _decode_attention(q, groups[0], attn.block_size, k_cache, v_cache)
    out = torch.empty_like(q)
    for g in groups:
        out.index_copy_(0, g.rows, _decode_attention(q.index_select(0, g.rows), g, attn.block_size, k_cache, v_cache))
    for p in attn.prefills:
        qs = q[p.start : p.end].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        if p.context_slots is None:  # the whole context is new: attend to this step's k, v
            ks = k[p.start : p.end].transpose(0, 1).unsqueeze(0)
            vs = v[p.start : p.end].transpose(0, 1).unsqueeze(0)
            o = _causal_attention(qs, ks, vs)
        else:
            ks = k_cache.index_select(0, p.context_slots).transpose(0, 1).unsqueeze(0)
            vs = v_cache.index_select(0, p.context_slots).transpose(0, 1).unsqueeze(0)
            n = p.end - p.start
            first = p.context_len - n  # absolute position of this chunk's first token
            rows = torch.arange(first, p.context_len, device=q.device)[:, None]
            mask = torch.arange(p.context_len, device=q.device)[None, :] <= rows
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=True)
        out[p.start : p.end] = o.squeeze(0).transpose(0, 1)
    return out


def _causal_attention(qs, ks, vs) -> torch.Tensor:
    """Causal SDPA over a prompt, its length padded with zeros to a multiple of 16: torch's CPU
    flash attention takes twice as long on some lengths (501 tokens: 2.0 ms a layer, 512: 1.0).
    Causality keeps the padded keys, which come last, out of every real query's view."""
    n = qs.shape[2]
    pad = -n % 16
    if pad:
        qs, ks, vs = (F.pad(t, (0, 0, 0, pad)) for t in (qs, ks, vs))
    return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)[:, :, :n]


def _decode_attention(q, g: DecodeGroup, block_size: int, k_cache, v_cache) -> torch.Tensor:
    """One query per sequence over its blocks, gathered whole (one index per block, not per token)."""
    b = g.blocks.shape[0]
    _, hkv, d = k_cache.shape
    blocks = g.blocks.view(-1)
    ks = k_cache.view(-1, block_size, hkv, d).index_select(0, blocks).view(b, -1, hkv, d).transpose(1, 2)
    vs = v_cache.view(-1, block_size, hkv, d).index_select(0, blocks).view(b, -1, hkv, d).transpose(1, 2)
    # Fold each group of query heads into the query axis ([B, Hkv, G, D]): the same result as
    # GQA attention, without the CPU path's slow expansion of k and v. (Two explicit matmuls
    # were slower here: the strided K forces a copy that SDPA avoids.)
    o = F.scaled_dot_product_attention(q.reshape(b, hkv, -1, d), ks, vs, attn_mask=g.mask)
    return o.view(b, -1, d)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size))
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.packed_lm_head = None
        self.quant_lm_head: QuantLinear | None = None  # lm_head on GGUF-format weights
        self.batch_invariant = False  # set by models/deterministic.make_batch_invariant
        self.fused_decode = True  # decode-only steps in one C++ call where possible (`can_fuse_decode`)
        self._decode_step = None
        self.rope_cache: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}  # (cos, signed sin) per position

    def set_rope_freqs(self, inv_freq: torch.Tensor) -> None:
        self.inv_freq = inv_freq.to(self.inv_freq.device)
        self.rope_cache = {}

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.dtype

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.cfg.tie_word_embeddings else self.lm_head

    def rope_tables(self, positions: torch.Tensor, dtype):
        """cos and signed sin for each position, looked up in a table built once per model and dtype."""
        if dtype not in self.rope_cache:
            n = self.cfg.max_position_embeddings
            pos = torch.arange(n, device=self.inv_freq.device, dtype=torch.float32)
            freqs = pos[:, None] * self.inv_freq[None, :]  # [n, D/2], in float32
            cos, sin = freqs.cos(), freqs.sin()
            self.rope_cache[dtype] = (torch.cat([cos, cos], -1).to(dtype), torch.cat([-sin, sin], -1).to(dtype))
        cos, sin = self.rope_cache[dtype]
        return cos.index_select(0, positions)[:, None, :], sin.index_select(0, positions)[:, None, :]

    @torch.inference_mode()
    def forward(self, input_ids, positions, attn: AttentionMetadata, kv: KVCache, layer_hook=None) -> torch.Tensor:
        """Hidden states [T, hidden] of every new token; KV of the new tokens is written to `kv`.
        `layer_hook(i)`, if given, runs once layer i's KV is written (KV transfer overlaps the rest)."""
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope_tables(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, attn, kv.k[i], kv.v[i])
            if layer_hook is not None:
                layer_hook(i)
        return rms_norm(x, self.norm, self.cfg.rms_norm_eps)

    def can_fuse_decode(self) -> bool:
        """Whether `decode_step` can run: CPU kernels built, float32 or bfloat16, every linear
        GGUF-format or plain (not oneDNN-packed)."""
        if not self.fused_decode or self.batch_invariant or self.norm.device.type != "cpu":
            return False
        if self.dtype not in (torch.float32, torch.bfloat16):
            return False
        linears = [getattr(layer, n) for layer in self.layers for n in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")]
        if not all(isinstance(lin, (QuantLinear, nn.Linear)) for lin in linears):
            return False
        from microserve import kernels

        return kernels.load() is not None

    def choose_gemm_rows(self) -> None:
        """In a bfloat16 model on CPU: time where each GGUF-format layer linear's bfloat16 GEMM
        overtakes the kernels' loop (models/gemm_choice.py). The lm_head keeps its rows: its
        logits stay float32, which the bfloat16 GEMM would round."""
        if self.dtype != torch.bfloat16 or self.norm.device.type != "cpu":
            return
        from microserve.models.gemm_choice import choose_gemm_from

        choose_gemm_from([lin for layer in self.layers for lin in
                          (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj)
                          if isinstance(lin, QuantLinear)])

    def fused_decode_max_batch(self) -> int | None:
        """The largest decode batch `decode_step` should take (None: any). In float32 it always
        wins; in bfloat16, batches past 32 are faster on the Python path, whose GEMMs and
        attention run in bfloat16 (smaller ones reach the bfloat16 GEMM inside the step)."""
        return None if self.dtype == torch.float32 else GEMM_FROM_ROWS

    @torch.inference_mode()
    def decode_step(self, input_ids, positions, slots, blocks, lengths, kv: KVCache) -> torch.Tensor:
        """`forward` for a batch of single-token decodes, all layers in one C++ call
        (kernels/decode_step.cpp): at small batches Python's per-op overhead outweighs the math.
        blocks: [B, max blocks] block tables; lengths: [B] context lengths with the new token."""
        if self._decode_step is None:
            self._decode_step = self._build_decode_step()
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope_tables(positions, torch.float32)
        x = self._decode_step.forward(x, cos[:, 0], sin[:, 0], kv.k, kv.v, slots, blocks, lengths, kv.block_size)
        return rms_norm(x, self.norm, self.cfg.rms_norm_eps)  # float32: the logits are computed from it

    def _build_decode_step(self):
        from microserve import kernels

        cfg = self.cfg
        step = kernels.load().DecodeStep(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
                                         cfg.rms_norm_eps)
        def kernel_weight(lin):
            """(weight, type, gemm_from): GGUF-format bytes, bfloat16 rows read as the BF16 format
            (no copy), or float32 for BLAS (type 0)."""
            if isinstance(lin, QuantLinear):
                return lin.weight.data, lin.weight.type_id, lin.gemm_from
            if lin.weight.dtype == torch.bfloat16:
                return lin.weight.detach().view(torch.uint8), KERNEL_TYPES["BF16"], GEMM_FROM_ROWS
            return lin.weight.detach().float(), 0, 0

        for layer in self.layers:
            weights, types, gemm_from = zip(*(kernel_weight(lin) for lin in
                                              (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj)))
            step.add_layer(list(weights), list(types), list(gemm_from), layer.qkv_proj.bias, layer.input_layernorm,
                           layer.post_attention_layernorm, getattr(layer, "q_norm", None),
                           getattr(layer, "k_norm", None))
        return step

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.batch_invariant and gemm_rows(hidden.shape[0]) != hidden.shape[0]:
            return padded_rows_call(self.compute_logits, hidden)
        if self.quant_lm_head is not None:
            return self.quant_lm_head(hidden).float()
        if self.packed_lm_head is not None:
            return self.packed_lm_head(hidden).float()
        return F.linear(hidden, self.lm_head_weight).float()

    def pack_linears_for_cpu(self) -> bool:
        """On CPU in bf16, swap every linear for oneDNN's with prepacked weights.

        oneDNN's packed bf16 GEMM is 2-5x faster than the default path for the skinny
        matrices of decode (measured: lm_head at batch 1, 0.9 ms vs 4.4 ms).
        """
        if not can_pack_linears(self.norm):
            return False
        for layer in self.layers:
            for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
                lin = getattr(layer, name)
                if isinstance(lin, nn.Linear):
                    setattr(layer, name, PackedLinear(lin.weight, lin.bias))
        if self.quant_lm_head is None:
            self.packed_lm_head = PackedLinear(self.lm_head_weight, None)
        return True

    @torch.inference_mode()
    def warm_up_packed_linears(self, max_tokens: int, max_seqs: int) -> None:
        """Run every oneDNN GEMM once at each row count a step can give it: the packed
        bfloat16 linears, and the bfloat16 GEMM GGUF-format linears use past their loop's rows.

        oneDNN builds a kernel per shape on first use (a few ms, plus memory it keeps);
        doing it here makes the engine's memory flat from the start and spares the first
        requests of each new batch size that stall. Kernels are shared by all layers, so
        layer 0's weights stand in for every layer.
        """
        if self.dtype != torch.bfloat16 or self.norm.device.type != "cpu" or not self.layers:
            return
        layer = self.layers[0]
        head = self.packed_lm_head if self.packed_lm_head is not None else self.quant_lm_head
        for lin, limit in [(layer.qkv_proj, max_tokens), (layer.o_proj, max_tokens), (layer.gate_up_proj, max_tokens),
                           (layer.down_proj, max_tokens), (head, max_seqs)]:
            if isinstance(lin, PackedLinear):
                first = 1
            elif isinstance(lin, QuantLinear) and lin.gemm_from > 0:
                first = lin.gemm_from + 1
            else:
                continue
            x = torch.zeros(padded_rows(limit), lin.in_features, dtype=torch.bfloat16)
            for rows in sorted({padded_rows(n) for n in range(first, limit + 1)}):
                lin(x[:rows])
            if isinstance(lin, QuantLinear) and lin is not head:  # decode_step's batches, not padded
                for rows in range(first, min(limit, GEMM_FROM_ROWS) + 1):
                    lin.kernels.linear(x[:rows], lin.weight.data, lin.weight.type_id, None, lin.gemm_from)

    def load_hf_weights(self, weights):
        """Take (name, tensor) pairs named as in HF checkpoints; fuse q/k/v and gate/up on the way."""
        cfg = self.cfg
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        qkv_offsets = {"q_proj": (0, q), "k_proj": (q, q + kv), "v_proj": (q + kv, q + 2 * kv)}
        inter = cfg.intermediate_size
        seen = set()
        kept: dict[int, list[tuple[int, GGUFWeight]]] = {}  # GGUF-format weights by destination, with row offsets
        with torch.no_grad():
            for name, tensor in weights:
                name = name.removeprefix("model.")
                if name == "rope_freqs":
                    self.set_rope_freqs(rope_inv_freq(cfg, tensor))
                    seen.add(name)
                    continue
                dest, rows = self._destination(name, qkv_offsets, inter)
                if dest is None:
                    continue
                target = dest if rows is None else dest[rows[0] : rows[1]]
                if tuple(target.shape) != tuple(tensor.shape):
                    raise ValueError(f"weight {name}: shape {tuple(tensor.shape)} != expected {tuple(target.shape)}")
                if isinstance(tensor, GGUFWeight):
                    kept.setdefault(id(dest), []).append((0 if rows is None else rows[0], tensor))
                else:
                    target.copy_(tensor)
                seen.add(name)
            self._install_gguf_weights(kept)
        missing = [n for n in self.expected_weight_names() if n not in seen]
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")

    def _install_gguf_weights(self, kept: dict[int, list[tuple[int, GGUFWeight]]]) -> None:
        """Swap in GGUF-format layers where a weight came whole in one format; dequantize the rest."""
        def take(param: torch.Tensor) -> GGUFWeight | None:
            parts = sorted(kept.pop(id(param), []), key=lambda p: p[0])
            whole = concat_rows([w for _, w in parts]) if parts else None
            if whole is not None and whole.shape[0] == param.shape[0]:
                return whole
            for offset, w in parts:  # mixed formats, or only some rows: dense it is
                param[offset : offset + w.shape[0]].copy_(w.dequantize())
            return None

        for layer in self.layers:
            for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
                lin = getattr(layer, name)
                weight = take(lin.weight)
                if weight is not None:
                    setattr(layer, name, QuantLinear(weight, lin.bias))
        if not self.cfg.tie_word_embeddings:
            weight = take(self.lm_head)
            if weight is not None:
                self.quant_lm_head = QuantLinear(weight, None)
                self.lm_head = None
        weight = take(self.embed_tokens.weight)
        if weight is not None:
            weight = weight.repacked()  # once, shared by the embedding and a tied lm_head
            self.embed_tokens = QuantEmbedding(weight, self.dtype)
            if self.cfg.tie_word_embeddings:
                self.quant_lm_head = QuantLinear(weight, None)
        if self.dtype == torch.bfloat16:
            for module in self.modules():
                if isinstance(module, QuantLinear):
                    module.use_bf16_gemm()

    def _destination(self, name, qkv_offsets, inter):
        if name == "embed_tokens.weight":
            return self.embed_tokens.weight, None
        if name == "norm.weight":
            return self.norm, None
        if name == "lm_head.weight":
            return (None, None) if self.cfg.tie_word_embeddings else (self.lm_head, None)
        parts = name.split(".")
        if parts[0] != "layers" or len(parts) < 4:
            return None, None
        layer = self.layers[int(parts[1])]
        sub, leaf = parts[-2], parts[-1]
        if sub in qkv_offsets:
            p = layer.qkv_proj.weight if leaf == "weight" else layer.qkv_proj.bias
            if p is None:
                return None, None
            return p, qkv_offsets[sub]
        if sub == "gate_proj":
            return layer.gate_up_proj.weight, (0, inter)
        if sub == "up_proj":
            return layer.gate_up_proj.weight, (inter, 2 * inter)
        table = {
            "o_proj": layer.o_proj.weight,
            "down_proj": layer.down_proj.weight,
            "input_layernorm": layer.input_layernorm,
            "post_attention_layernorm": layer.post_attention_layernorm,
            "q_norm": getattr(layer, "q_norm", None),
            "k_norm": getattr(layer, "k_norm", None),
        }
        return table.get(sub), None

    def expected_weight_names(self):
        names = ["embed_tokens.weight", "norm.weight"] + ([] if self.cfg.tie_word_embeddings else ["lm_head.weight"])
        per_layer = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                     "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                     "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"]
        if self.cfg.attention_bias:
            per_layer += ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]
        if self.cfg.qk_norm:
            per_layer += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
        for i in range(self.cfg.num_layers):
            names += [f"layers.{i}.{p}" for p in per_layer]
        return names
