"""What the HTTP layer costs: concurrent streaming clients against `microserve engine`,
beside the offline engine running the same requests in one process.

    python benchmarks/bench_server.py [--clients 32] [--prompt-len 256] [--output-len 128]

Starts the server (built-in model unless --model), drives it with `--clients` concurrent
streaming completions (token-id prompts, ignore_eos, so both sides do identical work),
reports time to first token, inter-token latency and token throughput, then stops the
server and runs the same requests through the offline engine for its throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

import httpx

from procs import start, stop


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


async def one_request(client, url, model, prompt, max_tokens):
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    start = time.perf_counter()
    times = []
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    times.append(time.perf_counter())
    return start, times


async def drive(url, model, prompts, max_tokens):
    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_request(client, url, model, p, max_tokens) for p in prompts))
        wall = time.perf_counter() - t0
    ttft = [times[0] - start for start, times in results]
    itl = [b - a for _, times in results for a, b in zip(times, times[1:])]
    return wall, ttft, itl


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    args = ap.parse_args()

    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(args.prompt_len)] for _ in range(args.clients)]
    server, url = start(["engine", "--dtype", args.dtype, "--threads", str(args.threads), "--served-model-name",
                         "bench", "--max-num-seqs", "64"] + (["--model", args.model] if args.model else []))
    try:
        asyncio.run(drive(url, "bench", prompts[:2], 4))  # warm up
        cpu0 = time.process_time()
        wall, ttft, itl = asyncio.run(drive(url, "bench", prompts, args.output_len))
        client_cpu = time.process_time() - cpu0
    finally:
        stop(server)

    import torch

    from microserve import LLM, SamplingParams

    torch.set_num_threads(args.threads)
    llm = LLM(model=args.model, dtype=args.dtype, max_num_seqs=64, enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4))  # warm up
    t = time.perf_counter()
    llm.generate(prompts, params)
    offline = time.perf_counter() - t

    tokens = args.clients * args.output_len
    print(f"\n{args.clients} streaming clients, prompt {args.prompt_len} tokens, output {args.output_len} tokens, "
          f"{args.dtype}, {args.threads} threads")
    print(f"served : {tokens / wall:7.1f} output tok/s  (wall {wall:.2f} s)")
    print(f"offline: {tokens / offline:7.1f} output tok/s  (wall {offline:.2f} s)")
    print(f"HTTP layer cost: {100 * (wall / offline - 1):+.1f}% wall time; the load client itself used "
          f"{client_cpu:.1f} s of CPU on the same cores")
    print(f"TTFT  mean {statistics.mean(ttft) * 1e3:7.1f} ms  p50 {pct(ttft, 50) * 1e3:7.1f}  p99 {pct(ttft, 99) * 1e3:7.1f}")
    print(f"ITL   mean {statistics.mean(itl) * 1e3:7.1f} ms  p50 {pct(itl, 50) * 1e3:7.1f}  p99 {pct(itl, 99) * 1e3:7.1f}")


if __name__ == "__main__":
    main()
