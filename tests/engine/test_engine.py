"""Engine behaviour: batching, prefix cache, chunked prefill, preemption, abort, sampling."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_engine, run_to_completion
from microserve.engine.block_pool import BlockPool, hash_block, hash_prompt_blocks
from microserve.errors import UserError
from microserve.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def random_prompts(n, lo=5, hi=120, seed=0, vocab=49152):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (k,), generator=g).tolist() for k in lengths]


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_alone_vs_batch_of_16(tiny_engine_loaded):
    prompts = random_prompts(16)
    batched = tokens(run_to_completion(make_engine(tiny_engine_loaded), prompts, GREEDY))
    for i in (0, 7, 15):
        alone = tokens(run_to_completion(make_engine(tiny_engine_loaded), [prompts[i]], GREEDY))[0]
        assert alone == batched[i]


def test_prefix_cache_hit_gives_same_output(tiny_engine_loaded):
    engine = make_engine(tiny_engine_loaded, block_size=8)
    shared = random_prompts(1, 64, 65, seed=3)[0]
    first = run_to_completion(engine, [shared + [11, 12, 13]], GREEDY)[0]
    assert first.num_cached_tokens == 0
    hits_before = engine.pool.hit_tokens
    second = run_to_completion(engine, [shared + [11, 12, 13]], GREEDY)[0]
    assert second.num_cached_tokens == 64  # every full block of the prompt but the last token's
    assert engine.pool.hit_tokens - hits_before == 64
    assert tokens([first]) == tokens([second])
    cold = run_to_completion(make_engine(tiny_engine_loaded, enable_prefix_caching=False), [shared + [11, 12, 13]], GREEDY)
    assert tokens(cold) == tokens([first])


def test_chunked_prefill_matches_unchunked(tiny_engine_loaded):
    prompts = random_prompts(6, 60, 200, seed=4)
    whole = tokens(run_to_completion(make_engine(tiny_engine_loaded, max_num_batched_tokens=4096), prompts, GREEDY))
    engine = make_engine(tiny_engine_loaded, max_num_batched_tokens=24, block_size=8)
    chunked = tokens(run_to_completion(engine, prompts, GREEDY))
    assert chunked == whole


def test_preemption_matches_unconstrained(tiny_engine_loaded):
    from microserve.models.llama import KVCache

    prompts = random_prompts(8, 20, 60, seed=5)
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    free = tokens(run_to_completion(make_engine(tiny_engine_loaded), prompts, params))
    per_block = KVCache.bytes_per_block(tiny_engine_loaded.config, 8, torch.float32)
    tight = make_engine(tiny_engine_loaded, block_size=8, kv_cache_memory=per_block * 24)
    assert tight.runner.num_blocks == 24
    squeezed = tokens(run_to_completion(tight, prompts, params))
    assert tight.scheduler.num_preemptions > 0
    assert squeezed == free
    assert tight.pool.num_free_blocks == 24


def test_abort_frees_every_block(tiny_engine_loaded):
    engine = make_engine(tiny_engine_loaded, block_size=8, max_num_batched_tokens=32)
    start = engine.pool.num_free_blocks
    prompts = random_prompts(6, 30, 90, seed=6)
    for i, p in enumerate(prompts):
        engine.add_request(f"a{i}", p, SamplingParams(temperature=0.8, max_tokens=50, n=1 + i % 3))
    for _ in range(4):  # some still prefilling (chunked), some decoding, some waiting
        engine.step()
    assert engine.pool.num_free_blocks < start
    for i in range(len(prompts)):
        assert engine.abort_request(f"a{i}")
    assert not engine.has_unfinished_requests()
    assert engine.pool.num_free_blocks == start
    assert not engine.abort_request("a0")  # unknown now


def test_engine_greedy_matches_transformers_64_steps(tiny_llama, tiny_engine_loaded):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    prompt = random_prompts(1, 30, 31, seed=7)[0]
    ours = tokens(run_to_completion(make_engine(tiny_engine_loaded), [prompt],
                                    SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)))[0]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == ref


def test_seeded_sampling_is_reproducible_whatever_the_batch(tiny_engine_loaded):
    prompt = random_prompts(1, 20, 21, seed=8)[0]
    p = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=20, seed=1234, ignore_eos=True)
    alone = tokens(run_to_completion(make_engine(tiny_engine_loaded), [prompt], p))[0]
    others = random_prompts(5, seed=9)
    mixed = run_to_completion(make_engine(tiny_engine_loaded), others + [prompt],
                              [SamplingParams(temperature=0.7, max_tokens=20)] * 5 + [p])
    assert tokens(mixed)[-1] == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=20, seed=99, ignore_eos=True)
    assert tokens(run_to_completion(make_engine(tiny_engine_loaded), [prompt], other_seed))[0] != alone


def test_top_k_one_and_tiny_top_p_are_greedy(tiny_engine_loaded):
    prompt = random_prompts(1, 20, 21, seed=10)[0]
    greedy = tokens(run_to_completion(make_engine(tiny_engine_loaded), [prompt], GREEDY))[0]
    for p in (SamplingParams(temperature=1.0, top_k=1, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=24, ignore_eos=True, seed=1)):
        assert tokens(run_to_completion(make_engine(tiny_engine_loaded), [prompt], p))[0] == greedy


def test_stop_string_is_cut_and_never_streamed_partially(tiny_engine_loaded):
    engine = make_engine(tiny_engine_loaded)
    prompt = random_prompts(1, 20, 21, seed=11)[0]
    full = run_to_completion(engine, [prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0]
    text = full.outputs[0].text
    assert len(text) > 20
    stop = text[10:16]
    expected = text[: text.find(stop)]
    engine.add_request("s", prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop]))
    streamed = ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            streamed += out.outputs[0].delta_text
            last = out
    assert last.outputs[0].finish_reason == "stop"
    assert last.outputs[0].text == expected
    assert streamed == expected  # the stop string's first characters were held back, never sent


def test_stop_token_ids_and_max_tokens(tiny_engine_loaded):
    engine = make_engine(tiny_engine_loaded)
    prompt = random_prompts(1, 20, 21, seed=12)[0]
    free = run_to_completion(engine, [prompt], GREEDY)[0].outputs[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 24
    stop_id = free.token_ids[5]
    first = free.token_ids.index(stop_id)
    out = run_to_completion(engine, [prompt], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop_id]))[0]
    assert out.outputs[0].finish_reason == "stop"
    assert out.outputs[0].token_ids == free.token_ids[: first + 1]


def test_logprobs_match_hand_computed(tiny_llama, tiny_engine_loaded):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    prompt = random_prompts(1, 12, 13, seed=13)[0]
    out = run_to_completion(make_engine(tiny_engine_loaded), [prompt],
                            SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3))[0].outputs[0]
    ids = prompt + out.token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)
    for step, (lp, top) in enumerate(out.logprobs):
        row = ref[len(prompt) - 1 + step]
        token = out.token_ids[step]
        assert math.isclose(lp, float(row[token]), abs_tol=1e-4)
        want_vals, _ = row.topk(3)
        # the same alternatives (near-ties may swap places between thread counts)
        assert all(math.isclose(float(row[t]), v, abs_tol=1e-4) for t, v in top)
        assert all(math.isclose(v, w, abs_tol=1e-4) for (_, v), w in zip(top, want_vals.tolist()))
        assert top[0][0] == token  # greedy picks the top alternative


@pytest.mark.parametrize("chunk", [None, 7])
def test_prompt_logprobs_match_transformers(tiny_llama, tiny_engine_loaded, chunk):
    """Echo's prompt logprobs: scored even when the prompt is cached, prefilled in chunks, or
    one of n sequences."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    prompt = random_prompts(1, 40, 41, seed=15)[0]
    options = {"max_num_batched_tokens": chunk} if chunk else {}
    engine = make_engine(tiny_engine_loaded, block_size=8, **options)
    run_to_completion(engine, [prompt], GREEDY)  # now its blocks are in the prefix cache
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, prompt_logprobs=2, n=2)
    out = run_to_completion(engine, [prompt, random_prompts(1, seed=16)[0]], [params, GREEDY])[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for t, (lp, top) in enumerate(out.prompt_logprobs[1:], start=1):
        assert math.isclose(lp, float(ref[t - 1, prompt[t]]), abs_tol=1e-4)
        assert [i for i, _ in top] == ref[t - 1].topk(2).indices.tolist()
    assert run_to_completion(engine, [prompt], GREEDY)[0].prompt_logprobs is None


def test_n_samples_share_prompt_blocks(tiny_engine_loaded):
    engine = make_engine(tiny_engine_loaded, block_size=8)
    prompt = random_prompts(1, 50, 51, seed=14)[0]
    out = run_to_completion(engine, [prompt], SamplingParams(n=3, temperature=1.0, max_tokens=16, seed=5, ignore_eos=True))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) == 3
    assert engine.pool.hit_tokens == 2 * 48  # siblings reused the 6 full prompt blocks
    greedy = run_to_completion(make_engine(tiny_engine_loaded), [prompt], SamplingParams(n=2, temperature=0, max_tokens=8))[0]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids


def test_penalties_hand_computed():
    from microserve.sampling import _apply_penalties

    class Row:
        params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25, repetition_penalty=2.0)
        prompt_ids = [0]
        output_ids = [1, 1, 2]

    logits = torch.tensor([4.0, 2.0, -2.0, 3.0])
    _apply_penalties(logits, Row())
    # token 0: prompt only -> /2; token 1: /2, then -0.5*2 - 0.25; token 2: *2, then -0.5 - 0.25; token 3 untouched
    assert torch.allclose(logits, torch.tensor([2.0, 1.0 - 1.0 - 0.25, -4.0 - 0.75, 3.0]))


def test_bad_input_is_refused(tiny_engine_loaded):
    engine = make_engine(tiny_engine_loaded)
    start = engine.pool.num_free_blocks
    with pytest.raises(UserError):
        engine.add_request("x", [], GREEDY)
    with pytest.raises(UserError):
        engine.add_request("x", [10**9], GREEDY)
    with pytest.raises(UserError):
        engine.add_request("x", [1] * 10, SamplingParams(max_tokens=10**6))
    with pytest.raises(UserError):
        SamplingParams(temperature=-1)
    with pytest.raises(UserError):
        SamplingParams(top_p=1.5)
    assert not engine.has_unfinished_requests() and engine.pool.num_free_blocks == start


def test_block_hash_is_deterministic():
    # Fixed bytes: the same on every machine and in every process (no salted hash()).
    assert hash_block(None, [1, 2, 3]).hex() == hash_block(None, [1, 2, 3]).hex()
    assert hash_block(None, [1, 2, 3]) != hash_block(hash_block(None, [0]), [1, 2, 3])
    hashes = hash_prompt_blocks(list(range(20)), 8)
    assert len(hashes) == 2 and hashes[1] == hash_block(hashes[0], list(range(8, 16)))


def test_block_pool_lru_eviction():
    pool = BlockPool(num_blocks=4, block_size=2)
    a = pool.allocate(2)
    pool.cache_block(a[0], b"h0")
    pool.cache_block(a[1], b"h1")
    pool.free(a)
    assert pool.num_free_blocks == 4 and pool.match_prefix([b"h0", b"h1"]) == a
    got = pool.allocate(3)  # two empty blocks first, then the least recently used cached one
    assert len(set(got)) == 3 and len(pool.cached) == 1
