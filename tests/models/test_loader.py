"""GGUF and safetensors loading: every quantization type, llama.cpp names and q/k permutation, errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import make_tiny_checkpoint
from microserve.cli import main
from microserve.errors import UserError
from microserve.models.loader import gguf_to_hf_name, load_model

# Rows of 256 so every block quantization, K-quants included, applies.
GGUF_TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=False)
HF_TO_GGUF = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
         "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(hf_name: str) -> str:
    if hf_name in HF_TO_GGUF:
        return HF_TO_GGUF[hf_name]
    _, _, i, *rest = hf_name.split(".")
    return f"blk.{i}.{LAYER['.'.join(rest[:-1])]}.{rest[-1]}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, hf_model, qtype) -> dict[str, np.ndarray]:
    """Write `hf_model` as llama.cpp would; return each weight as stored (dequantized, permuted)."""
    import gguf
    from gguf import quants

    cfg = hf_model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"] if getattr(cfg, "rope_parameters", None) else cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    expected = {}
    for name, t in hf_model.state_dict().items():
        arr = t.float().numpy()
        if name.endswith("q_proj.weight"):
            arr = llama_cpp_permute(arr, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            arr = llama_cpp_permute(arr, cfg.num_key_value_heads)
        if arr.ndim == 2:
            data = quants.quantize(arr, qtype)
            w.add_tensor(gguf_name(name), data, raw_dtype=qtype)
            stored = quants.dequantize(data, qtype)
        else:
            w.add_tensor(gguf_name(name), arr)
            stored = arr
        expected[name] = stored
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


QTYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


@pytest.mark.parametrize("qtype", QTYPES)
def test_gguf_every_quant_type(tmp_path, qtype):
    import gguf
    from gguf import quants

    t = getattr(gguf.GGMLQuantizationType, qtype)
    try:
        quants.quantize(np.zeros((1, 256), dtype=np.float32), t)
    except NotImplementedError:
        pytest.skip(f"gguf cannot write {qtype} (it still dequantizes it)")
    _, hf = make_tiny_checkpoint(tmp_path, "llama", **GGUF_TINY)
    path = tmp_path / f"tiny-{qtype}.gguf"
    expected = write_gguf(path, hf, t)
    # The dequantized reference path; the GGUF-format layers are checked in test_quantization.py.
    loaded = load_model(str(path), dtype="float32", device="cpu", progress=False, quantization="none")
    assert loaded.tokenizer is None
    cfg = loaded.config
    layer = loaded.model.layers[0]
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    got_q = layer.qkv_proj.weight[:q].numpy()
    got_k = layer.qkv_proj.weight[q : q + kv].numpy()
    # What we load must be the stored weights with llama.cpp's permutation undone
    # (in F32, exactly the original weights).
    from microserve.models.loader import _unpermute

    np.testing.assert_array_equal(got_q, _unpermute(expected["model.layers.0.self_attn.q_proj.weight"], 4))
    np.testing.assert_array_equal(got_k, _unpermute(expected["model.layers.0.self_attn.k_proj.weight"], 2))
    if qtype == "F32":
        np.testing.assert_array_equal(got_q, hf.model.layers[0].self_attn.q_proj.weight.detach().numpy())
        np.testing.assert_array_equal(got_k, hf.model.layers[0].self_attn.k_proj.weight.detach().numpy())
    np.testing.assert_array_equal(layer.down_proj.weight.numpy(), expected["model.layers.0.mlp.down_proj.weight"])
    np.testing.assert_array_equal(loaded.model.lm_head.numpy(), expected["lm_head.weight"])
    if qtype == "F32":  # unquantized: the same model as the safetensors folder
        ids = torch.tensor([[1, 5, 9, 200, 7]])
        with torch.no_grad():
            ref = hf(ids).logits[0]
        from test_model import batched_logits

        got = batched_logits(loaded, [ids[0].tolist()])[0]
        assert (got - ref).abs().max() / ref.abs().max() < 1e-4


def test_gguf_name_mapping():
    assert gguf_to_hf_name("blk.3.attn_q.weight") == "layers.3.self_attn.q_proj.weight"
    assert gguf_to_hf_name("blk.0.attn_k.bias") == "layers.0.self_attn.k_proj.bias"
    assert gguf_to_hf_name("output_norm.weight") == "norm.weight"
    assert gguf_to_hf_name("blk.0.mystery.weight") is None


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_user_errors_are_one_line(tmp_path, capsys):
    assert "not found" in one_line_error(capsys, ["generate", "hi", "--model", str(tmp_path / "missing")])

    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    (folder / "model.safetensors").write_bytes(b"")
    assert "unsupported architecture" in one_line_error(capsys, ["generate", "hi", "--model", str(folder)])

    import gguf

    odd = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(odd), "llama")
    for key, value in [("block_count", 1), ("embedding_length", 8), ("feed_forward_length", 16),
                       ("attention.head_count", 2), ("context_length", 64)]:
        w.add_uint32(f"llama.{key}", value)
    w.add_tensor("mystery.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert "cannot map" in one_line_error(capsys, ["generate", "hi", "--model", str(odd)])

    assert "dtype" in one_line_error(capsys, ["generate", "hi", "--dtype", "int4"])
    if not torch.cuda.is_available():
        assert "CUDA" in one_line_error(capsys, ["generate", "hi", "--device", "cuda"])


def test_loader_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError):
        load_model(str(tmp_path / "nope.gguf"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="config.json"):
        load_model(str(empty))
    os.makedirs(tmp_path / "nosafe")
    (tmp_path / "nosafe" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="safetensors"):
        load_model(str(tmp_path / "nosafe"))
