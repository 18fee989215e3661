"""K-quant (Q4_K, Q5_K, Q6_K) and 5-bit (Q5_0, Q5_1) GGUF weights kept in their formats: the kernels
against gguf's reference dequantization on random blocks, weights whose row blocks mix formats,
a tiny model in a llama.cpp-style _M mix against its dequantized self, and (where
../shared/tools/build-llama-cpp has written them) the K-quant copies of the built-in model."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch

from microserve import kernels
from microserve.models.loader import load_model
from microserve.models.quant import KERNEL_TYPES, STACKED, GGUFWeight, QuantEmbedding, QuantLinear, concat_rows

pytestmark = pytest.mark.skipif(kernels.load() is None, reason="no C++ compiler for the CPU kernels")

NEW_TYPES = ["Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1"]
# bytes per block, elements per block, offsets of the fp16 fields (d, dmin / m)
LAYOUT = {"Q4_K": (144, 256, [0, 2]), "Q5_K": (176, 256, [0, 2]), "Q6_K": (210, 256, [208]),
          "Q5_0": (22, 32, [0]), "Q5_1": (24, 32, [0, 2]), "Q2_K": (84, 256, [80, 82])}
LLAMA_CPP = os.environ.get("LLAMA_CPP_DIR", "/tmp/llama-cpp")


def random_blocks(type_name: str, rows: int, cols: int, rng, scale: float = 0.01) -> np.ndarray:
    """Random bytes as GGUF blocks [rows, bytes per row], with sane fp16 scales (random bytes there
    could be inf or NaN)."""
    bb, qk, fp16_at = LAYOUT[type_name]
    raw = rng.integers(0, 256, size=(rows, cols // qk, bb), dtype=np.uint8)
    for off in fp16_at:
        d = (rng.standard_normal((rows, cols // qk)) * scale).astype(np.float16)
        raw[:, :, off : off + 2] = d.view(np.uint8).reshape(rows, cols // qk, 2)
    return raw.reshape(rows, -1)


def reference(raw: np.ndarray, type_name: str) -> torch.Tensor:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return torch.from_numpy(np.array(dequantize(raw, GGMLQuantizationType[type_name]), dtype=np.float32))


@pytest.mark.parametrize("type_name", NEW_TYPES)
@pytest.mark.parametrize("shape", [(96, 256), (37, 1536), (8, 512)])
def test_kernels_match_gguf_dequantization(type_name, shape):
    k, tid = kernels.load(), KERNEL_TYPES[type_name]
    raw = random_blocks(type_name, *shape, np.random.default_rng(NEW_TYPES.index(type_name) * 10000 + shape[1]))
    ref = reference(raw, type_name).reshape(shape)
    packed = k.repack(torch.from_numpy(raw), tid, shape[1])
    assert packed.shape == raw.shape  # the same bytes as the file
    assert torch.equal(k.dequantize(packed, tid, shape[1], None), ref)  # every product is exact in float32
    rows = torch.tensor([3, 0, shape[0] - 1, 3])
    assert torch.equal(k.dequantize(packed, tid, shape[1], rows), ref[rows])
    assert torch.equal(k.dequantize_bf16(packed, tid, shape[1]), ref.bfloat16())  # rounded as torch rounds

    x = torch.randn(32, shape[1])
    want = x @ ref.T
    for m in (1, 2, 3, 4, 5, 8, 13, 16, 31, 32):  # the kernels' loop; gemm_from=0 never dequantizes
        y = k.linear(x[:m], packed, tid, None, 0)
        assert ((y - want[:m]).norm() / want[:m].norm()).item() < 1e-5
        assert torch.equal(y[m - 1], k.linear(x[m - 1 : m], packed, tid, None, 0)[0])  # batch invariant
    torch.testing.assert_close(k.linear(x, packed, tid, None, 16), want, rtol=1e-4, atol=1e-4)  # dense GEMM
    y = k.linear(x.bfloat16(), packed, tid, None, 16)  # bfloat16 GEMM on the weight rounded to bfloat16
    assert ((y - want).norm() / want.norm()).item() < 1e-2
    bias = torch.randn(shape[0])
    torch.testing.assert_close(k.linear(x[:2], packed, tid, bias, 0), k.linear(x[:2], packed, tid, None, 0) + bias)


def test_kquant_rows_must_be_whole_superblocks():
    k = kernels.load()
    with pytest.raises(RuntimeError, match="multiple of 256|bytes"):
        k.repack(torch.zeros(2, 72, dtype=torch.uint8), KERNEL_TYPES["Q4_K"], 128)


def test_rows_in_different_formats_stack():
    """A fused q/k/v whose v is Q6_K and q/k Q4_K (llama.cpp's _M mixes) stays in the file's formats."""
    rng = np.random.default_rng(7)
    parts = [("Q4_K", 40), ("Q4_K", 16), ("Q6_K", 24)]
    raws = [random_blocks(t, n, 512, rng) for t, n in parts]
    weight = concat_rows([GGUFWeight(torch.from_numpy(r), t, (n, 512)) for r, (t, n) in zip(raws, parts)])
    assert weight.type_name == STACKED and weight.shape == (80, 512)
    assert weight.data.numel() < sum(r.size for r in raws) + 256  # the parts' bytes and a small header
    ref = torch.cat([reference(r, t).reshape(n, 512) for r, (t, n) in zip(raws, parts)])
    assert torch.equal(weight.dequantize(), ref)
    lin = QuantLinear(weight, bias=torch.randn(80))
    x = torch.randn(40, 512)
    for m in (1, 7, 40):  # 40 rows: the dense GEMM path
        torch.testing.assert_close(lin(x[:m]), x[:m] @ ref.T + lin.bias, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ a tiny model in a _M mix

TINY = dict(layers=2, hidden=256, inter=512, heads=4, kv_heads=2, vocab=320)
# Per tensor, as llama.cpp's Q4_K_M picks them (v and down in more bits in some layers), and one
# Q2_K tensor, which has no kernel and is dequantized with a log line.
MIX = {"token_embd": "Q6_K", "output": "Q6_K", "attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K",
       "attn_output": "Q5_K", "ffn_gate": "Q4_K", "ffn_up": "Q5_0", "ffn_down": "Q6_K"}


def write_tiny_kquant_gguf(path) -> None:
    import gguf

    t = TINY
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(t["layers"])
    w.add_context_length(256)
    w.add_embedding_length(t["hidden"])
    w.add_feed_forward_length(t["inter"])
    w.add_head_count(t["heads"])
    w.add_head_count_kv(t["kv_heads"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(t["vocab"])
    rng = np.random.default_rng(0)
    hd = t["hidden"] // t["heads"]
    shapes = {"token_embd": (t["vocab"], t["hidden"]), "output": (t["vocab"], t["hidden"]),
              "attn_q": (t["hidden"], t["hidden"]), "attn_k": (t["kv_heads"] * hd, t["hidden"]),
              "attn_v": (t["kv_heads"] * hd, t["hidden"]), "attn_output": (t["hidden"], t["hidden"]),
              "ffn_gate": (t["inter"], t["hidden"]), "ffn_up": (t["inter"], t["hidden"]),
              "ffn_down": (t["hidden"], t["inter"])}

    def add(name, kind, type_name):
        raw = random_blocks(type_name, *shapes[kind], rng, scale=2e-4 if kind != "token_embd" else 2e-3)
        w.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType[type_name])

    add("token_embd.weight", "token_embd", MIX["token_embd"])
    add("output.weight", "output", MIX["output"])
    w.add_tensor("output_norm.weight", np.ones(t["hidden"], dtype=np.float32))
    for i in range(t["layers"]):
        for kind in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            type_name = "Q2_K" if (i, kind) == (1, "attn_output") else MIX[kind]
            add(f"blk.{i}.{kind}.weight", kind, type_name)
        for norm in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{norm}.weight", np.ones(t["hidden"], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("kquant") / "tiny-Q4_K_M.gguf"
    write_tiny_kquant_gguf(path)
    return str(path)


def test_tiny_kquant_model_matches_dequantized(tiny_pair, caplog):
    from test_model import batched_logits
    from test_quantization import _greedy

    with caplog.at_level(logging.WARNING, logger="microserve.models.loader"):
        quant = load_model(tiny_pair, dtype="float32", device="cpu", progress=False)
    assert "1 tensors dequantized at load (no CPU kernel for Q2_K): blk.1.attn_output.weight" in caplog.text
    ref = load_model(tiny_pair, dtype="float32", device="cpu", progress=False, quantization="none")
    model = quant.model
    assert isinstance(model.embed_tokens, QuantEmbedding) and model.embed_tokens.weight.type_name == "Q6_K"
    layer0, layer1 = model.layers
    assert layer0.qkv_proj.weight.type_name == STACKED  # Q4_K q, k beside a Q6_K v
    assert layer0.o_proj.weight.type_name == "Q5_K" and layer0.down_proj.weight.type_name == "Q6_K"
    assert layer0.gate_up_proj.weight.type_name == STACKED  # Q4_K gate beside a Q5_0 up
    assert not isinstance(layer1.o_proj, QuantLinear)  # the Q2_K one
    prompts = [[1, 5, 9, 200, 17, 33], [3] * 20, list(range(30, 70))]
    got, want = batched_logits(quant, prompts), batched_logits(ref, prompts)
    for g, w in zip(got, want):
        assert ((g - w).norm() / w.norm()).item() < 1e-4  # the same weights: float32 rounding only
    assert quant.model.can_fuse_decode()
    fused, plain = _greedy(quant, prompts, 16), _greedy(ref, prompts, 16)
    for f, p in zip(fused, plain):
        assert f.token_ids == p.token_ids
        # float32 rounding (BLAS blocking varies with alignment between runs), amplified by a random model
        assert max(abs(a[0] - b[0]) for a, b in zip(f.logprobs, p.logprobs)) < 5e-3


# ------------------------------------------------------------------ the built-in model's K-quant copies

K_FILES = ["smol-Q4_K_M.gguf", "smol-Q5_K_M.gguf", "smol-Q6_K.gguf"]


@pytest.mark.slow
@pytest.mark.parametrize("name", K_FILES)
def test_kquant_files_match_dequantized_reference(name):
    """Greedy on the held-out prompts: the file's formats against `--quantization none` (float32)."""
    from test_quantization import HELD_OUT, _greedy

    path = os.path.join(LLAMA_CPP, name)
    if not os.path.exists(path):
        pytest.skip(f"{path} absent (../shared/tools/build-llama-cpp {LLAMA_CPP} writes it)")
    quant = load_model(path, dtype="float32", device="cpu", progress=False)
    ref = load_model(path, dtype="float32", device="cpu", progress=False, quantization="none")
    names = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    assert all(isinstance(getattr(layer, n), QuantLinear) for layer in quant.model.layers for n in names)
    weights = [m.weight.data for m in quant.model.modules() if isinstance(m, (QuantLinear, QuantEmbedding))]
    held = sum({t.data_ptr(): t.numel() for t in weights}.values())  # a tied lm_head shares the embedding's
    assert 0.95 < held / os.path.getsize(path) < 1.01  # the weights take the file's size
    prompts = [quant.tokenizer(t).input_ids for t in HELD_OUT]
    got, want = _greedy(quant, prompts, 12), _greedy(ref, prompts, 12)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
