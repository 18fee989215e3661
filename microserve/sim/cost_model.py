"""How long one engine step takes on a profile's hardware: a sum of per-operation rooflines.

Each operation costs max(FLOPs / achievable FLOP/s, bytes / achievable bytes/s) over all
devices of the engine (tensor parallelism splits both evenly). The operations of a step:

- the layers' GEMMs (q/k/v, o, gate/up, down) over every token of the step: the weights are
  read once per step whatever the batch, which is why decode is memory-bound and batching
  is nearly free until the FLOPs catch up;
- attention: prefill chunks are compute-bound (n new tokens against c + n keys), decodes are
  memory-bound (each reads its whole context's KV);
- the LM head, only for the rows that are sampled this step;
- with tensor parallelism, two all-reduces of the hidden states per layer;
- a fixed cost per step and per sequence (scheduling, launches, sampling, small kernels).

The operations run one after another (no overlap), as they do in an engine's forward pass.
"""

from __future__ import annotations

from microserve.errors import UserError
from microserve.sim.profiles import SimSpec

ACTIVATION_BYTES = 2  # hidden states, q and attention outputs are bf16 in every profile
LOGIT_BYTES = 4  # logits are written in fp32 for the sampler
MIN_KV_TOKENS = 16  # one block at the default block size


class CostModel:
    def __init__(self, spec: SimSpec):
        self.spec = spec
        m, hw = spec.model, spec.hardware
        n = hw.num_devices
        # Achievable rates of the whole engine.
        self.gemm_flops = hw.peak_flops * hw.flops_efficiency * n
        self.gemm_bandwidth = hw.mem_bandwidth * hw.bandwidth_efficiency * n
        attn_f = hw.flops_efficiency if hw.attention_flops_efficiency is None else hw.attention_flops_efficiency
        attn_b = hw.attention_bandwidth_efficiency
        attn_b = hw.bandwidth_efficiency if attn_b is None else attn_b
        self.attn_flops = hw.peak_flops * attn_f * n
        self.attn_bandwidth = hw.mem_bandwidth * attn_b * n
        gemv_b = hw.bandwidth_efficiency if hw.single_row_bandwidth_efficiency is None \
            else hw.single_row_bandwidth_efficiency
        self.gemv_bandwidth = hw.mem_bandwidth * gemv_b * n  # GEMMs over a single row

        q, kv = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
        self.layer_params = m.layer_linear_params
        # Elements each token moves in and out of one layer's GEMMs.
        self.gemm_act_elems = (m.hidden_size + q + 2 * kv) + (q + m.hidden_size) \
            + (m.hidden_size + 2 * m.intermediate_size) + (m.intermediate_size + m.hidden_size)
        # One query row against one key (scores) and one value (weighted sum): 2 multiply-adds
        # per head dimension per head, in every layer.
        self.attn_flops_per_pair = 4 * m.num_layers * m.num_heads * m.head_dim
        self.q_bytes_per_token = 2 * m.num_layers * q * ACTIVATION_BYTES  # read q, write the output
        emb_bytes = m.embedding_bytes if m.embedding_bytes is not None else m.weight_bytes
        self.lm_head_weight_bytes = m.embedding_params * emb_bytes

    # ------------------------------------------------------------------ step time

    def _roofline(self, flops: float, nbytes: float, flops_rate: float, byte_rate: float) -> float:
        if self.spec.hardware.overlap_compute_and_memory:
            return max(flops / flops_rate, nbytes / byte_rate)
        return flops / flops_rate + nbytes / byte_rate

    def breakdown(self, prefill: list[tuple[int, int]], decode: list[int], sampled: int) -> dict[str, float]:
        """Seconds per component of one step, and their "total".

        prefill: (new tokens, tokens of context before them) per prefill chunk;
        decode: context length, including the token being decoded, per decoding sequence;
        sampled: rows that go through the LM head.
        """
        m, hw = self.spec.model, self.spec.hardware
        tokens = sum(n for n, _ in prefill) + len(decode)
        seqs = len(prefill) + len(decode)
        parts = dict.fromkeys(("gemm", "attention_prefill", "attention_decode", "lm_head",
                               "allreduce", "overhead"), 0.0)
        if tokens == 0 and sampled == 0:
            parts["total"] = 0.0
            return parts

        if tokens:
            weights = m.num_layers * self.layer_params * m.weight_bytes
            acts = tokens * m.num_layers * self.gemm_act_elems * ACTIVATION_BYTES
            parts["gemm"] = self._roofline(2 * m.num_layers * self.layer_params * tokens, weights + acts,
                                           self.gemm_flops, self.gemv_bandwidth if tokens == 1 else self.gemm_bandwidth)

        kv_token = self.kv_bytes_per_token()
        if prefill:
            # Causal: the i-th new token sees the c tokens before the chunk and i of the chunk.
            pairs = sum(n * c + n * (n + 1) // 2 for n, c in prefill)
            nbytes = sum((c + n) * kv_token + n * kv_token + n * self.q_bytes_per_token for n, c in prefill)
            parts["attention_prefill"] = self._roofline(self.attn_flops_per_pair * pairs, nbytes,
                                                        self.attn_flops, self.attn_bandwidth)
        if decode:
            ctx = sum(decode)
            nbytes = ctx * kv_token + len(decode) * (kv_token + self.q_bytes_per_token)
            parts["attention_decode"] = self._roofline(self.attn_flops_per_pair * ctx, nbytes,
                                                       self.attn_flops, self.attn_bandwidth)

        if sampled:
            rows = sampled * (m.hidden_size * ACTIVATION_BYTES + m.vocab_size * LOGIT_BYTES)
            nbytes = self.lm_head_weight_bytes + rows
            parts["lm_head"] = self._roofline(2 * m.hidden_size * m.vocab_size * sampled, nbytes, self.gemm_flops,
                                              self.gemv_bandwidth if sampled == 1 else self.gemm_bandwidth)

        tp = hw.num_devices
        if tp > 1 and tokens:
            # After attention and after the MLP each layer sums partial hidden states across
            # devices; a ring all-reduce moves 2 (tp - 1) / tp of the buffer through each link.
            size = tokens * m.hidden_size * ACTIVATION_BYTES
            one = hw.allreduce_latency_s + 2 * (tp - 1) / tp * size / hw.allreduce_bandwidth
            parts["allreduce"] = 2 * m.num_layers * one

        parts["overhead"] = hw.step_overhead_s + hw.per_seq_overhead_s * seqs
        parts["total"] = sum(parts.values())
        return parts

    def step_seconds(self, prefill: list[tuple[int, int]], decode: list[int], sampled: int) -> float:
        return self.breakdown(prefill, decode, sampled)["total"]

    # ------------------------------------------------------------------ KV cache

    def kv_layer_bytes_per_token(self) -> int:
        """One layer's K and V for one token, whole engine."""
        m = self.spec.model
        return int(2 * m.num_kv_heads * m.head_dim * m.kv_bytes)

    def kv_bytes_per_token(self) -> int:
        """Every layer's K and V for one token, whole engine."""
        return self.spec.model.num_layers * self.kv_layer_bytes_per_token()

    def kv_transfer_seconds(self, tokens: int) -> float:
        """Moving `tokens` tokens of KV to a peer engine of the same kind, not overlapped with anything."""
        if tokens <= 0:
            return 0.0
        hw = self.spec.hardware
        return hw.kv_link_latency_s + tokens * self.kv_bytes_per_token() / hw.kv_link_bandwidth

    def kv_capacity_tokens(self) -> int:
        """Tokens of KV the engine holds: what memory leaves after weights and activations."""
        m, hw = self.spec.model, self.spec.hardware
        usable = hw.memory_bytes * hw.num_devices * hw.memory_utilization
        free = usable - m.weights_bytes - hw.activation_reserve_bytes * hw.num_devices
        tokens = int(free // self.kv_bytes_per_token()) if free > 0 else 0
        if tokens < MIN_KV_TOKENS:
            raise UserError(
                f"profile {self.spec.name!r}: the weights ({m.weights_bytes / 2**30:.1f} GiB) leave no room "
                f"for a KV block in {hw.num_devices} x {hw.memory_bytes / 2**30:.1f} GiB"
            )
        return tokens
