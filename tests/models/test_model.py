"""Our Llama-family model against HF transformers on the same weights."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import make_engine, make_tiny_checkpoint, run_to_completion
from microserve.models.llama import AttentionMetadata, KVCache, PrefillSeq
from microserve.models.loader import load_model
from microserve.sampling import SamplingParams

PROMPT_LENGTHS = [3, 17, 40, 9]


def prompts_for(vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def batched_logits(loaded, prompts):
    """Logits of every position of every prompt, all prompts in one flat batch."""
    total = sum(len(p) for p in prompts)
    kv = KVCache(loaded.config, num_blocks=total, block_size=1, dtype=loaded.dtype, device=loaded.device)
    ids, pos, prefills, start = [], [], [], 0
    for p in prompts:
        ids += p
        pos += range(len(p))
        prefills.append(PrefillSeq(start, start + len(p), len(p), None))
        start += len(p)
    attn = AttentionMetadata(slot_mapping=torch.arange(total), prefills=prefills)
    hidden = loaded.model(torch.tensor(ids), torch.tensor(pos), attn, kv)
    logits = loaded.model.compute_logits(hidden)
    return [logits[p.start : p.end] for p in prefills]


def hf_greedy(model, prompt, steps):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("arch", ["llama", "llama3", "qwen2", "qwen3", "mistral"])
def test_logits_and_greedy_match_transformers(tmp_path, arch):
    path, hf = make_tiny_checkpoint(tmp_path, arch)
    loaded = load_model(path, dtype="float32", device="cpu", progress=False)
    prompts = prompts_for(loaded.config.vocab_size)
    ours = batched_logits(loaded, prompts)
    with torch.no_grad():
        for prompt, got in zip(prompts, ours):
            ref = hf(torch.tensor([prompt])).logits[0]
            rel = (got - ref).abs().max() / ref.abs().max()
            assert rel < 1e-4, f"{arch}: relative logit error {rel:.2e}"

    engine = make_engine(loaded)
    outs = run_to_completion(engine, prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 32)


@pytest.mark.slow
def test_gguf_greedy_matches_transformers_gguf(builtin_gguf):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(builtin_gguf), gguf_file=os.path.basename(builtin_gguf), dtype=torch.float32
    ).eval()
    # The dequantized path is the reference; the GGUF-format path is checked against it in test_quantization.py.
    loaded = load_model(builtin_gguf, dtype="float32", device="cpu", progress=False, quantization="none")
    tok = loaded.tokenizer
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
    prompts = [tok(t).input_ids for t in texts]
    engine = make_engine(loaded)
    outs = run_to_completion(engine, prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == ref


@pytest.mark.slow
def test_gguf_config_and_tokenizer(builtin_gguf):
    loaded = load_model(builtin_gguf, dtype="bfloat16", device="cpu", progress=False, quantization="none")
    cfg = loaded.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert "<|im_start|>" in loaded.tokenizer.chat_template


def test_packed_linear_pads_rows_to_few_shapes():
    """Packed GEMMs run on rounded row counts (few oneDNN kernels, bounded memory); the
    padding must not change the rows that are real."""
    from microserve.models.llama import PackedLinear, can_pack_linears, padded_rows

    assert [padded_rows(n) for n in (1, 7, 16, 17, 32, 33, 500, 512, 513, 700, 1024, 1025)] == [
        1, 7, 16, 32, 32, 48, 512, 512, 528, 704, 1024, 1152]
    assert len({padded_rows(n) for n in range(1, 4097)}) < 110
    torch.manual_seed(0)
    w = torch.randn(96, 64).to(torch.bfloat16)
    b = torch.randn(96).to(torch.bfloat16)
    if not can_pack_linears(w):
        pytest.skip("oneDNN packing needs a CPU build of torch with mkldnn")
    lin = PackedLinear(w, b)
    for n in (1, 17, 45, 530):
        x = torch.randn(n, 64).to(torch.bfloat16)
        y = lin(x)
        assert y.shape == (n, 96)
        ref = x.float() @ w.float().T + b.float()
        torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)
        # each row is the same whether it ran alone or padded among others
        torch.testing.assert_close(y[:1], lin(x[:1]), rtol=0, atol=0)
