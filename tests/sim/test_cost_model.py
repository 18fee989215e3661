"""The simulated engines' cost model: rooflines checked by hand, and the shipped profiles."""

from __future__ import annotations

import dataclasses

import pytest

from microserve.errors import UserError
from microserve.sim.cost_model import CostModel
from microserve.sim.profiles import PROFILES, Hardware, SimModel, SimSpec, get_profile

# A model small enough to do by hand:
#   one layer's GEMM parameters: q 4x4 + k, v 2 x (4x2) + o 4x4 + gate, up, down 3 x (4x8) = 144
#   GEMM activations per token and layer: qkv 4 in + 8 out, o 4 + 4, gate/up 4 + 16, down 8 + 4 = 52
#   KV per token and layer: K and V x 1 head x 2 dims x 2 bytes = 8 bytes; two layers: 16
#   q and attention output per token: 2 layers x 2 (read q, write out) x 4 x 2 bytes = 32
TINY = SimModel(name="tiny", num_layers=2, hidden_size=4, intermediate_size=8, num_heads=2, num_kv_heads=1,
                head_dim=2, vocab_size=10, max_position_embeddings=64, weight_bytes=2.0, kv_bytes=2.0)

FAST = 1e15  # a rate so high that its side of a roofline is ~0


def hardware(**kw) -> Hardware:
    base = dict(name="hand", num_devices=1, peak_flops=FAST, mem_bandwidth=FAST, memory_bytes=1e4,
                flops_efficiency=1.0, bandwidth_efficiency=1.0, step_overhead_s=0.0, per_seq_overhead_s=0.0,
                allreduce_bandwidth=FAST, allreduce_latency_s=0.0, kv_link_bandwidth=FAST, kv_link_latency_s=0.0,
                memory_utilization=1.0, activation_reserve_bytes=0.0)
    return Hardware(**{**base, **kw})


def cost(model: SimModel = TINY, **kw) -> CostModel:
    return CostModel(SimSpec("hand", model, hardware(**kw)))


def test_parameter_counts_match_the_published_models():
    assert TINY.layer_linear_params == 144
    assert TINY.num_params == 40 + 2 * (144 + 8) + 4 + 40  # embed, layers (+2 norms), final norm, lm_head
    assert get_profile("llama-3.1-8b@h100").model.num_params == 8_030_261_248
    assert get_profile("llama-3.1-70b-fp8@h100x4").model.num_params == 70_553_706_496
    assert get_profile("smollm2-135m@cpu").model.num_params == 134_515_008  # tied embeddings


def test_memory_bound_decode():
    c = cost(mem_bandwidth=100.0)  # 100 bytes/s; FLOPs are free
    parts = c.breakdown([], [3], 0)
    # weights 2 layers x 144 x 2 bytes = 576, activations 1 token x 2 layers x 52 x 2 bytes = 208
    assert parts["gemm"] == pytest.approx((576 + 208) / 100)
    # KV read 3 tokens x 16, KV written 16, q and output 32
    assert parts["attention_decode"] == pytest.approx((3 * 16 + 16 + 32) / 100)
    assert parts["lm_head"] == 0 and parts["attention_prefill"] == 0 and parts["allreduce"] == 0
    assert parts["total"] == pytest.approx(7.84 + 0.96)


def test_compute_bound_prefill():
    c = cost(peak_flops=100.0)  # 100 FLOP/s; bytes are free
    parts = c.breakdown([(4, 0)], [], 1)
    assert parts["gemm"] == pytest.approx(2 * 2 * 144 * 4 / 100)  # 2 x layers x params x tokens
    # causal pairs: 1 + 2 + 3 + 4 = 10; 4 x layers x heads x head_dim FLOPs per pair
    assert parts["attention_prefill"] == pytest.approx(4 * 2 * 2 * 2 * 10 / 100)
    assert parts["lm_head"] == pytest.approx(2 * 4 * 10 / 100)  # one sampled row
    assert parts["total"] == pytest.approx(23.04 + 3.2 + 0.8)
    # a chunk of 4 after 6 tokens of context: 4 x 6 + 10 pairs
    assert c.breakdown([(4, 6)], [], 0)["attention_prefill"] == pytest.approx(4 * 2 * 2 * 2 * 34 / 100)


def test_separate_attention_efficiency():
    c = cost(peak_flops=100.0, attention_flops_efficiency=0.5)
    assert c.breakdown([(4, 0)], [], 0)["attention_prefill"] == pytest.approx(3.2 / 0.5)
    assert c.breakdown([(4, 0)], [], 0)["gemm"] == pytest.approx(23.04)


def test_tensor_parallel_splits_work_and_adds_allreduce():
    one = cost(peak_flops=100.0)
    two = cost(peak_flops=100.0, num_devices=2, allreduce_bandwidth=10.0, allreduce_latency_s=0.5)
    assert two.breakdown([(4, 0)], [], 1)["gemm"] == pytest.approx(one.breakdown([(4, 0)], [], 1)["gemm"] / 2)
    # 2 tokens x hidden 4 x 2 bytes = 16 bytes; ring: 0.5 s + 2 (2 - 1) / 2 x 16 / 10 = 2.1 s; 2 per layer
    assert two.breakdown([], [5, 9], 2)["allreduce"] == pytest.approx(2 * 2 * 2.1)
    assert one.breakdown([], [5, 9], 2)["allreduce"] == 0


def test_overheads():
    c = cost(step_overhead_s=0.01, per_seq_overhead_s=0.001)
    assert c.breakdown([(4, 0), (2, 5)], [7, 8, 9], 2)["overhead"] == pytest.approx(0.01 + 5 * 0.001)
    assert c.step_seconds([], [], 0) == 0  # nothing to do costs nothing


def test_kv_bytes_transfer_and_capacity():
    c = cost(kv_link_bandwidth=8.0, kv_link_latency_s=0.25, memory_bytes=10_000.0, memory_utilization=0.5,
             activation_reserve_bytes=100.0)
    assert c.kv_layer_bytes_per_token() == 8
    assert c.kv_bytes_per_token() == 16
    assert c.kv_transfer_seconds(10) == pytest.approx(0.25 + 10 * 16 / 8)
    assert c.kv_transfer_seconds(0) == 0
    # weights: GEMMs 576 + embeddings and lm_head 2 x 40 x 2 + norms 5 x 4 x 2 = 776 bytes
    assert TINY.weights_bytes == 776
    assert c.kv_capacity_tokens() == (5000 - 776 - 100) // 16
    with pytest.raises(UserError, match="no room"):
        cost(memory_bytes=900.0).kv_capacity_tokens()


def test_fp8_weights_keep_bf16_embeddings():
    fp8 = dataclasses.replace(TINY, weight_bytes=1.0, embedding_bytes=2.0)
    assert fp8.weights_bytes == 288 + 160 + 40
    c = cost(fp8, mem_bandwidth=100.0)
    assert c.breakdown([], [1], 1)["lm_head"] == pytest.approx((80 + 4 * 2 + 10 * 4) / 100)


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_more_work_is_never_cheaper(name):
    c = CostModel(get_profile(name))
    for n in (1, 16, 100, 512, 2048):
        assert c.step_seconds([(n + 1, 0)], [], 1) >= c.step_seconds([(n, 0)], [], 1)
        assert c.step_seconds([(n, 1000)], [], 1) >= c.step_seconds([(n, 0)], [], 1)
    for b in (1, 4, 32, 128):
        assert c.step_seconds([], [1024] * (b + 1), b + 1) >= c.step_seconds([], [1024] * b, b)
        assert c.step_seconds([], [4096] * b, b) >= c.step_seconds([], [1024] * b, b)
        assert c.step_seconds([(256, 0)], [1024] * b, b + 1) >= c.step_seconds([], [1024] * b, b)
    assert c.kv_transfer_seconds(3000) > c.kv_transfer_seconds(1000) > 0


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_profiles_load_and_hold_a_long_prompt(name):
    spec = get_profile(name)
    assert spec.name == name
    c = CostModel(spec)
    parts = c.breakdown([(512, 0)], [1024] * 8, 9)
    assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"))
    assert c.kv_capacity_tokens() >= 16384


def ms(seconds: float) -> float:
    return seconds * 1e3


def test_gpu_profiles_match_published_step_times():
    """The sanity ranges and cross-checks of docs/simulation.md (sources there)."""
    h70 = CostModel(get_profile("llama-3.1-70b-fp8@h100x4"))
    assert 8 <= ms(h70.step_seconds([], [1024], 1)) <= 20  # batch-1 decode, TP4 FP8
    # The same model and GPUs at TP2: NIM's Llama-3.3-70B FP8 on 2x H100, 18.6 ms ITL at 5000 input tokens.
    spec = get_profile("llama-3.1-70b-fp8@h100x4")
    tp2 = CostModel(dataclasses.replace(spec, hardware=dataclasses.replace(spec.hardware, num_devices=2)))
    assert ms(tp2.step_seconds([], [5250], 1)) == pytest.approx(18.6, rel=0.15)
    assert 400_000 <= h70.kv_capacity_tokens() <= 1_000_000

    h8 = CostModel(get_profile("llama-3.1-8b@h100"))
    assert 20 <= ms(h8.step_seconds([(2048, 0)], [], 1)) <= 100  # tens of ms
    assert 5 <= ms(h8.step_seconds([], [1024], 1)) <= 9

    a8 = get_profile("llama-3.1-8b@a100")
    assert 8 <= ms(CostModel(a8).step_seconds([], [1024], 1)) <= 15
    # vLLM on an A100 40GB (1.555 TB/s): 75 tok/s at batch 1, 1024 tokens in.
    a100_40 = dataclasses.replace(a8, hardware=dataclasses.replace(a8.hardware, mem_bandwidth=1.555e12))
    assert ms(CostModel(a100_40).step_seconds([], [1088], 1)) == pytest.approx(1000 / 75, rel=0.1)


def test_cpu_profile_is_this_machine_at_one_thread():
    cpu = CostModel(get_profile("smollm2-135m@cpu"))
    assert 20 <= ms(cpu.step_seconds([], [64], 1)) <= 500  # fitted: ~65 ms here
    assert cpu.step_seconds([(128, 0)], [], 1) > 10 * cpu.step_seconds([], [64], 1)
    assert cpu.kv_capacity_tokens() == (1 << 30) // cpu.kv_bytes_per_token()  # the real engine's default 1 GiB


def test_unknown_profile_names_the_choices():
    with pytest.raises(UserError, match="llama-3.1-8b@h100") as e:
        get_profile("gpt-9@tpu")
    assert all(name in str(e.value) for name in PROFILES)
