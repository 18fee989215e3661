"""Hardware and model profiles for simulated engines.

A profile is a model shape (with the dtypes it is served in) on one engine's devices.
Every constant here has its source in docs/simulation.md ("Profiles and where every
constant comes from"); change one there too.
"""

from __future__ import annotations

from dataclasses import dataclass

from microserve.errors import UserError

GiB = 2**30


@dataclass(frozen=True)
class SimModel:
    """The shape of a Llama-family decoder, with the dtypes it is served in."""

    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    weight_bytes: float  # bytes per parameter of the layers' linear weights as served (1.0 FP8, 2.0 bf16)
    kv_bytes: float  # bytes per KV element (1.0 FP8 KV, 2.0 bf16)
    tie_word_embeddings: bool = False
    # Embeddings and LM head: FP8 checkpoints keep them in bf16 (they are not quantized).
    # None: the same as weight_bytes.
    embedding_bytes: float | None = None

    def __post_init__(self):
        if min(self.num_layers, self.hidden_size, self.intermediate_size, self.num_heads,
               self.num_kv_heads, self.head_dim, self.vocab_size, self.max_position_embeddings) < 1:
            raise UserError(f"model {self.name!r}: every dimension must be positive")
        if self.num_heads % self.num_kv_heads:
            raise UserError(f"model {self.name!r}: num_heads must be a multiple of num_kv_heads")
        if self.weight_bytes <= 0 or self.kv_bytes <= 0:
            raise UserError(f"model {self.name!r}: weight_bytes and kv_bytes must be positive")

    @property
    def layer_linear_params(self) -> int:
        """Parameters of one layer's GEMMs: q, k, v, o, gate, up, down."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return h * q + 2 * h * kv + q * h + 3 * h * self.intermediate_size

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        """All parameters: embeddings, the layers (GEMMs and two norms each), final norm, LM head."""
        layers = self.num_layers * (self.layer_linear_params + 2 * self.hidden_size)
        lm_head = 0 if self.tie_word_embeddings else self.embedding_params
        return self.embedding_params + layers + self.hidden_size + lm_head

    @property
    def weights_bytes(self) -> float:
        """Bytes the weights take in device memory, whole engine."""
        emb_bytes = self.embedding_bytes if self.embedding_bytes is not None else self.weight_bytes
        tables = self.embedding_params * (1 if self.tie_word_embeddings else 2)
        norms = (2 * self.num_layers + 1) * self.hidden_size
        return (self.num_layers * self.layer_linear_params * self.weight_bytes
                + tables * emb_bytes + norms * 2.0)


@dataclass(frozen=True)
class Hardware:
    """One engine's devices (tensor parallel over num_devices), and what the software reaches on them."""

    name: str
    num_devices: int  # tensor-parallel degree
    peak_flops: float  # per device, dense, in the dtype the GEMMs run in
    mem_bandwidth: float  # bytes/s per device
    memory_bytes: float  # per device
    flops_efficiency: float  # fraction of peak_flops the GEMMs reach
    bandwidth_efficiency: float  # fraction of mem_bandwidth that weight and KV reads reach
    step_overhead_s: float  # per step: scheduling, launches, sampling, small kernels
    per_seq_overhead_s: float  # per sequence in the batch, per step
    allreduce_bandwidth: float  # bytes/s per device over the TP link (NCCL bus bandwidth)
    allreduce_latency_s: float  # fixed cost of one all-reduce
    kv_link_bandwidth: float  # bytes/s between two engines of this kind (KV transfer)
    kv_link_latency_s: float  # fixed cost of one KV transfer
    memory_utilization: float  # fraction of memory the engine may use for weights + KV
    # Attention kernels differ from GEMMs: they may run in another dtype (bf16 attention
    # beside FP8 GEMMs) and reach another fraction of peak. None: the GEMMs' fraction.
    attention_flops_efficiency: float | None = None  # fraction of peak_flops
    attention_bandwidth_efficiency: float | None = None  # fraction of mem_bandwidth
    activation_reserve_bytes: float = 2 * GiB  # per device: activations, CUDA graphs, comm buffers
    # GPUs hide memory traffic under compute (an op costs the larger of the two); one CPU
    # thread running small GEMMs does not, so there an op costs their sum.
    overlap_compute_and_memory: bool = True
    # A GEMM over one row runs as a matrix-vector product, which a CPU streams at another rate
    # than small-row GEMMs (fraction of mem_bandwidth). None: bandwidth_efficiency.
    single_row_bandwidth_efficiency: float | None = None

    def __post_init__(self):
        if self.num_devices < 1:
            raise UserError(f"hardware {self.name!r}: num_devices must be at least 1")
        fractions = [self.flops_efficiency, self.bandwidth_efficiency, self.memory_utilization]
        attention = (self.attention_flops_efficiency, self.attention_bandwidth_efficiency)
        fractions += [f for f in attention if f is not None]
        if not all(0 < f <= 1 for f in fractions):
            raise UserError(f"hardware {self.name!r}: efficiencies and memory_utilization must lie in (0, 1]")
        if min(self.peak_flops, self.mem_bandwidth, self.memory_bytes, self.kv_link_bandwidth,
               self.allreduce_bandwidth) <= 0:
            raise UserError(f"hardware {self.name!r}: peaks, bandwidths and memory must be positive")


@dataclass(frozen=True)
class SimSpec:
    name: str
    model: SimModel
    hardware: Hardware


# ------------------------------------------------------------------------------ models

LLAMA_3_1_70B_FP8 = SimModel(
    name="Llama-3.1-70B-Instruct-FP8", num_layers=80, hidden_size=8192, intermediate_size=28672,
    num_heads=64, num_kv_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
    weight_bytes=1.0,  # FP8 (e4m3) linear weights
    embedding_bytes=2.0,  # embeddings and lm_head stay bf16 in FP8 checkpoints
    kv_bytes=2.0,  # bf16 KV: vLLM's default kv_cache_dtype="auto" is the activation dtype
)

LLAMA_3_1_8B = SimModel(
    name="Llama-3.1-8B-Instruct", num_layers=32, hidden_size=4096, intermediate_size=14336,
    num_heads=32, num_kv_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
    weight_bytes=2.0, kv_bytes=2.0,
)

SMOLLM2_135M = SimModel(
    name="SmolLM2-135M-Instruct", num_layers=30, hidden_size=576, intermediate_size=1536,
    num_heads=9, num_kv_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
    # float32: what `--dtype auto` runs on the CPU the profile was fitted on (AVX2, no
    # AVX512-BF16, where bf16 GEMMs run ~6x slower than float32).
    weight_bytes=4.0, kv_bytes=4.0, tie_word_embeddings=True,
)

# ------------------------------------------------------------------------------ hardware

_H100 = dict(  # H100 SXM5 80GB (datasheet), NVLink 4 (900 GB/s bidirectional = 450 GB/s each way)
    mem_bandwidth=3.35e12,
    memory_bytes=80 * GiB,
    memory_utilization=0.9,  # vLLM's default gpu_memory_utilization
    allreduce_bandwidth=370e9,  # NCCL's effective NVLink bandwidth on H100 (nccl-tests #212)
    allreduce_latency_s=8e-6,  # one small all-reduce at TP4 on H100 (sglang PR 2904)
    per_seq_overhead_s=10e-6,
)

H100_X4_FP8 = Hardware(
    name="4x H100 SXM (TP4), FP8 GEMMs", num_devices=4, **_H100,
    peak_flops=1979e12,  # dense FP8
    flops_efficiency=0.6,
    attention_flops_efficiency=0.25,  # attention runs in bf16 (989 TFLOP/s) at ~50% of that
    bandwidth_efficiency=0.7,
    step_overhead_s=1.5e-3,
    kv_link_bandwidth=4 * 370e9,  # 4 GPU pairs over NVLink in parallel, each at NCCL's effective rate
    kv_link_latency_s=20e-6,
)

H100_BF16 = Hardware(
    name="1x H100 SXM, bf16", num_devices=1, **_H100,
    peak_flops=989e12,  # dense bf16
    flops_efficiency=0.65,
    attention_flops_efficiency=0.5,
    bandwidth_efficiency=0.8,
    step_overhead_s=1.1e-3,
    kv_link_bandwidth=370e9,
    kv_link_latency_s=20e-6,
)

A100_BF16 = Hardware(
    name="1x A100 SXM 80GB, bf16", num_devices=1,
    peak_flops=312e12,  # dense bf16
    mem_bandwidth=2.039e12,
    memory_bytes=80 * GiB,
    memory_utilization=0.9,
    flops_efficiency=0.7,
    attention_flops_efficiency=0.6,
    bandwidth_efficiency=0.8,
    step_overhead_s=1.1e-3,
    per_seq_overhead_s=10e-6,
    allreduce_bandwidth=230e9,  # NVLink 3: 600 GB/s bidirectional; nccl-tests measure ~200-230 GB/s
    allreduce_latency_s=10e-6,
    kv_link_bandwidth=230e9,
    kv_link_latency_s=20e-6,
)

# This machine's CPU (an AMD EPYC with AVX2 and no AVX512-BF16) with one torch thread,
# running microserve's own engine in float32 (what `--dtype auto` picks on such a CPU).
# FITTED by benchmarks/fit_cpu_profile.py on 2026-11-25 (median error 7%, max 23% over
# 19 cases: small-batch steps on one CPU thread are irregular; docs/simulation.md has the
# table). peak_flops is the fastest fitted rate (the GEMMs'), so attention's share shows
# as attention_flops_efficiency; mem_bandwidth is the script's 256 MB read microbenchmark.
CPU_1T_FITTED = dict(
    peak_flops=3.49e10,
    mem_bandwidth=1.1e10,
    flops_efficiency=1.0,
    attention_flops_efficiency=0.725,
    bandwidth_efficiency=0.412,
    attention_bandwidth_efficiency=0.160,
    single_row_bandwidth_efficiency=0.917,
    step_overhead_s=0.00524,
    per_seq_overhead_s=1.08e-4,
)

CPU_1T = Hardware(
    name="this machine's CPU, 1 thread", num_devices=1, **CPU_1T_FITTED, overlap_compute_and_memory=False,
    # The real engine's default KV budget is 1 GiB next to the weights (EngineConfig), so
    # "memory" is exactly that: a simulated engine gets as many blocks as a real one.
    memory_bytes=SMOLLM2_135M.weights_bytes + 1 * GiB,
    memory_utilization=1.0,
    activation_reserve_bytes=0.0,
    allreduce_bandwidth=1e10, allreduce_latency_s=0.0,  # one device: never used
    # KV over the shm transport: the same script times its per-layer gather + scatter on this
    # machine (one thread). The fixed part of a real transfer (HTTP call, header round trip,
    # commit) runs for real in a simulated one (microserve/sim/transfer.py), so none here.
    kv_link_bandwidth=1.84e9,
    kv_link_latency_s=0.0,
)

PROFILES: dict[str, SimSpec] = {
    spec.name: spec
    for spec in (
        SimSpec("llama-3.1-70b-fp8@h100x4", LLAMA_3_1_70B_FP8, H100_X4_FP8),
        SimSpec("llama-3.1-8b@h100", LLAMA_3_1_8B, H100_BF16),
        SimSpec("llama-3.1-8b@a100", LLAMA_3_1_8B, A100_BF16),
        SimSpec("smollm2-135m@cpu", SMOLLM2_135M, CPU_1T),
    )
}


def get_profile(name: str) -> SimSpec:
    try:
        return PROFILES[name]
    except KeyError:
        raise UserError(f"unknown simulation profile {name!r} (choose from: {', '.join(PROFILES)})") from None
