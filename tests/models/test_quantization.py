"""GGUF weights kept in their own formats (models/quant.py, kernels/): the kernels against
gguf's reference dequantization, the built-in Q4_1 model against its dequantized self, and the
C++ decode step against the Python forward pass."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from microserve import kernels
from microserve.config import EngineConfig
from microserve.engine.engine import LLMEngine
from microserve.models.loader import load_model
from microserve.models.quant import KERNEL_TYPES, QuantEmbedding, QuantLinear
from microserve.sampling import SamplingParams

pytestmark = pytest.mark.skipif(kernels.load() is None, reason="no C++ compiler for the CPU kernels")

HELD_OUT = [
    "The quick brown fox jumps over the lazy dog because",
    "In 1969, the first humans to walk on the Moon were",
    "A good recipe for pancakes starts with",
    "def quicksort(items):\n    ",
    "The three primary colors are",
    "Water boils at a temperature of",
    "My favourite book is about a young wizard who",
    "To install a Python package, you can run",
]


def _gguf_blocks(w: np.ndarray, type_name: str) -> torch.Tensor:
    """Encode a float32 [N, K] weight in a GGUF format with gguf's own quantizer."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    data = quantize(w, GGMLQuantizationType[type_name])
    return torch.from_numpy(np.ascontiguousarray(data).view(np.uint8).reshape(w.shape[0], -1).copy())


# gguf cannot quantize the K-quants: test_kquant.py checks them on random blocks.
@pytest.mark.parametrize("type_name", [t for t in KERNEL_TYPES if not t.endswith("_K")])
def test_kernels_match_gguf_dequantization(type_name):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    k = kernels.load()
    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 256)).astype(np.float32) * 0.05
    raw = _gguf_blocks(w, type_name)
    ref = np.array(dequantize(raw.numpy(), GGMLQuantizationType[type_name]), dtype=np.float32).reshape(w.shape)
    ref = torch.from_numpy(ref)
    packed = k.repack(raw, KERNEL_TYPES[type_name], 256)
    assert packed.shape == raw.shape  # the same bytes as the file, rearranged
    assert torch.equal(k.dequantize(packed, KERNEL_TYPES[type_name], 256, None), ref)
    rows = torch.tensor([5, 0, 95, 5])
    assert torch.equal(k.dequantize(packed, KERNEL_TYPES[type_name], 256, rows), ref[rows])
    assert torch.equal(k.dequantize_bf16(packed, KERNEL_TYPES[type_name], 256), ref.bfloat16())  # as torch rounds

    x = torch.randn(40, 256)
    want = x @ ref.T
    for m in (1, 3, 8, 40):  # the kernels' loop for small batches; gemm_from=0 never dequantizes
        y = k.linear(x[:m], packed, KERNEL_TYPES[type_name], None, 0)
        assert ((y - want[:m]).norm() / want[:m].norm()).item() < 1e-5  # weight-only: float32 activations
        # a row's result does not depend on its batch
        assert torch.equal(y[m - 1], k.linear(x[m - 1 : m], packed, KERNEL_TYPES[type_name], None, 0)[0])
    y = k.linear(x, packed, KERNEL_TYPES[type_name], None, 16)  # 40 rows > 16: dequantize + BLAS
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
    bias = torch.randn(96)
    torch.testing.assert_close(k.linear(x[:2], packed, KERNEL_TYPES[type_name], bias, 0),
                               k.linear(x[:2], packed, KERNEL_TYPES[type_name], None, 0) + bias)


def test_bad_weight_shapes_are_refused():
    k = kernels.load()
    with pytest.raises(RuntimeError, match="bytes"):
        k.linear(torch.randn(1, 64), torch.zeros(4, 10, dtype=torch.uint8), KERNEL_TYPES["Q8_0"], None, 0)
    packed = k.repack(torch.zeros(4, 34, dtype=torch.uint8), KERNEL_TYPES["Q8_0"], 32)
    with pytest.raises(RuntimeError, match="out of range"):
        k.dequantize(packed, KERNEL_TYPES["Q8_0"], 32, torch.tensor([4]))


@pytest.fixture(scope="module")
def builtin_pair(builtin_gguf):
    quant = load_model(builtin_gguf, dtype="float32", device="cpu", progress=False)
    ref = load_model(builtin_gguf, dtype="float32", device="cpu", progress=False, quantization="none")
    return quant, ref


@pytest.mark.slow
def test_builtin_model_keeps_the_file_formats(builtin_gguf, builtin_pair):
    quant, ref = builtin_pair
    assert quant.quantization == "gguf" and ref.quantization == "none"
    model = quant.model
    assert isinstance(model.embed_tokens, QuantEmbedding) and model.quant_lm_head is not None
    linears = [m for layer in model.layers for m in layer.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 4 * quant.config.num_layers
    assert not [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    # memory follows the file: the weights held are the file's bytes (the tied lm_head shares the
    # embedding's), plus the float32 norms
    tensors = {t.data_ptr(): t for t in [lin.weight.data for lin in linears + [model.quant_lm_head]]
               + [model.embed_tokens.weight.data]}
    held = sum(t.numel() for t in tensors.values())
    held += sum(p.numel() * p.element_size() for p in model.parameters())
    assert 0.95 < held / os.path.getsize(builtin_gguf) < 1.02


def _greedy(loaded, prompts, max_tokens, fused=True):
    engine = LLMEngine(EngineConfig(num_threads=2, kv_cache_memory="256MiB"), loaded=loaded)
    engine.runner.fuse_decode = fused and loaded.model.can_fuse_decode()
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=0)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0]
    return [done[f"r{i}"] for i in range(len(prompts))]


@pytest.mark.slow
def test_quantized_matches_dequantized_reference(builtin_pair):
    """Held-out prompts, greedy: the Q4_1 kernels (weight-only) against the float32 reference."""
    quant, ref = builtin_pair
    prompts = [quant.tokenizer(t).input_ids for t in HELD_OUT]
    got, want = _greedy(quant, prompts, 12), _greedy(ref, prompts, 12)
    # Only float32 summation order differs, but a 135M model's greedy path can meet an exact
    # near-tie: most prompts must agree on all 12 tokens, and logprobs up to a divergence stay close.
    same = sum(g.token_ids == w.token_ids for g, w in zip(got, want))
    assert same >= 7, f"greedy tokens agree on only {same} of {len(prompts)} prompts"
    diffs = []
    for g, w in zip(got, want):
        for gt, wt, glp, wlp in zip(g.token_ids, w.token_ids, g.logprobs, w.logprobs):
            if gt != wt:
                break  # past a divergence the contexts differ
            diffs.append(abs(glp[0] - wlp[0]))
    assert np.median(diffs) < 1e-4 and max(diffs) < 1e-3, (np.median(diffs), max(diffs))


@pytest.mark.slow
def test_fused_decode_step_matches_python_forward(builtin_pair):
    quant, _ = builtin_pair
    prompts = [quant.tokenizer(t).input_ids for t in HELD_OUT[:4]]
    fused, plain = _greedy(quant, prompts, 10, fused=True), _greedy(quant, prompts, 10, fused=False)
    for f, p in zip(fused, plain):
        assert f.token_ids == p.token_ids
        for flp, plp in zip(f.logprobs, p.logprobs):
            assert abs(flp[0] - plp[0]) < 1e-3


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_fused_decode_step_on_float32_checkpoints(tmp_path, arch):
    """Dense float32 weights, attention bias (qwen2) and q/k norms (qwen3) in the C++ decode step."""
    from conftest import make_tiny_checkpoint

    path, _ = make_tiny_checkpoint(tmp_path, arch)
    loaded = load_model(path, dtype="float32", device="cpu", progress=False)
    assert loaded.model.can_fuse_decode()
    prompts = [[1, 5, 9, 200, 17], [3] * 40, list(range(30, 60))]
    fused, plain = _greedy(loaded, prompts, 24, fused=True), _greedy(loaded, prompts, 24, fused=False)
    for f, p in zip(fused, plain):
        assert f.token_ids == p.token_ids
        for tok, flp, plp in zip(f.token_ids, f.logprobs, p.logprobs):
            assert abs(flp[0] - plp[0]) < 1e-4


@pytest.mark.parametrize("heads,kv_heads", [(4, 1), (10, 2), (16, 1)])
def test_fused_decode_step_grouped_query_heads(tmp_path, heads, kv_heads):
    """64-wide heads, groups of 4, 5 and 16 query heads per kv head (the last split in two tasks), and
    few enough tasks at (4, 1) that each query head runs alone: against the Python path."""
    from conftest import make_tiny_checkpoint

    path, _ = make_tiny_checkpoint(tmp_path, "llama", hidden_size=64 * heads, num_attention_heads=heads,
                                   num_key_value_heads=kv_heads, initializer_range=0.05)
    loaded = load_model(path, dtype="float32", device="cpu", progress=False)
    prompts = [[1, 5, 9, 200, 17], [3] * 40, list(range(30, 70))]
    fused, plain = _greedy(loaded, prompts, 24, fused=True), _greedy(loaded, prompts, 24, fused=False)
    for f, p in zip(fused, plain):
        assert f.token_ids == p.token_ids
        for flp, plp in zip(f.logprobs, p.logprobs):
            assert abs(flp[0] - plp[0]) < 1e-4


@pytest.mark.slow
def test_fused_decode_step_in_bfloat16(builtin_gguf, builtin_pair):
    """A bfloat16 model (the CPU default where bf16 GEMMs are fast): prefill GEMMs in bfloat16, the
    decode step in float32 over a bfloat16 KV cache. Against the float32 reference and against its
    own Python decode path."""
    _, ref = builtin_pair
    bf16 = load_model(builtin_gguf, dtype="bfloat16", device="cpu", progress=False)
    assert bf16.quantization == "gguf" and bf16.model.can_fuse_decode()
    prompts = [bf16.tokenizer(t).input_ids for t in HELD_OUT]
    fused, want = _greedy(bf16, prompts, 8), _greedy(ref, prompts, 8)
    # bfloat16 prefill rounds enough to move near-ties: the dequantized bfloat16 model agrees with
    # float32 on 5 of these 8 prompts (measured), the fused path on 6.
    same = sum(g.token_ids == w.token_ids for g, w in zip(fused, want))
    assert same >= 5, f"greedy tokens agree with float32 on only {same} of {len(prompts)} prompts"
    diffs = [abs(f.logprobs[i][0] - w.logprobs[i][0]) for f, w in zip(fused, want)
             for i in range(min(len(f.token_ids), len(w.token_ids))) if f.token_ids[: i + 1] == w.token_ids[: i + 1]]
    assert np.median(diffs) < 0.05, np.median(diffs)
