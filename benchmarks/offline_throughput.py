"""Offline throughput of one system's in-process API: N random-token prompts of IN tokens, OUT new
tokens each (greedy, ignore_eos), all submitted at once. Runs with microserve or with vLLM (from
vLLM's own venv), so both see the same prompts:

    python benchmarks/offline_throughput.py --system microserve [--model FILE] [--threads 2]
    /path/to/vllm-venv/bin/python benchmarks/offline_throughput.py --system vllm --model HF_DIR

Prints one JSON line: requests/s, output tokens/s, total tokens/s and the wall time of generate().
"""

from __future__ import annotations

import argparse
import json
import random
import time


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # Skip the low ids, where small vocabularies keep their special tokens.
    return [[rng.randrange(1000, vocab) for _ in range(length)] for _ in range(n)]


def run_microserve(args, batch: list[list[int]]) -> list[int]:
    import torch

    from microserve import LLM, SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)
    llm = LLM(model=args.model, num_threads=args.threads)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(batch[:1], SamplingParams(temperature=0.0, max_tokens=4))  # warm-up
    start = time.perf_counter()
    outs = llm.generate(batch, params)
    args.elapsed = time.perf_counter() - start
    return [len(o.outputs[0].token_ids) for o in outs]


def run_vllm(args, batch: list[list[int]]) -> list[int]:
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, dtype="bfloat16", max_model_len=args.input_len + args.output_len + 16)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate([{"prompt_token_ids": batch[0]}], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
    args.elapsed = time.perf_counter() - start
    return [len(o.outputs[0].token_ids) for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--system", choices=["microserve", "vllm"], required=True)
    ap.add_argument("--model", default=None, help="microserve: GGUF/HF path (default built-in); vllm: HF folder")
    ap.add_argument("--threads", type=int, default=None, help="microserve: engine threads")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=49152, help="prompt ids are drawn below this")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    batch = prompts(args.num_prompts, args.input_len, args.vocab, args.seed)
    lengths = (run_vllm if args.system == "vllm" else run_microserve)(args, batch)
    out_tokens = sum(lengths)
    print(json.dumps({
        "system": args.system, "num_prompts": args.num_prompts, "input_len": args.input_len,
        "output_len": args.output_len, "elapsed_s": round(args.elapsed, 3),
        "requests_per_s": round(args.num_prompts / args.elapsed, 3),
        "output_tokens_per_s": round(out_tokens / args.elapsed, 1),
        "total_tokens_per_s": round((out_tokens + args.num_prompts * args.input_len) / args.elapsed, 1),
        "all_full_length": all(n == args.output_len for n in lengths),
    }))


if __name__ == "__main__":
    main()
