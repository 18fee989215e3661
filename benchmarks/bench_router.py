"""The router's own cost: short requests straight to one engine vs through a router in front
of that same engine (round_robin over one engine, so the only difference is the router).

    python benchmarks/bench_router.py [--requests 40] [--concurrency 16]
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


async def one(client, url, prompt, max_tokens):
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    t = time.perf_counter()
    first = None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if first is None and line.startswith("data: {"):
                if json.loads(line[6:])["choices"]:
                    first = time.perf_counter() - t
    return first, time.perf_counter() - t


async def measure(url, prompts, max_tokens, concurrency):
    async with httpx.AsyncClient(timeout=300) as client:
        ttft = [(await one(client, url, p, max_tokens))[0] for p in prompts[:10]]  # one at a time
        sem = asyncio.Semaphore(concurrency)

        async def limited(p):
            async with sem:
                return await one(client, url, p, max_tokens)

        t = time.perf_counter()
        await asyncio.gather(*(limited(p) for p in prompts))
        wall = time.perf_counter() - t
    return statistics.median(ttft), len(prompts) * max_tokens / wall


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(args.prompt_len)] for _ in range(args.requests)]
    engine, engine_url = start(["engine", "--served-model-name", "m"])
    router, router_url = start(["router", "--engine", engine_url, "--served-model-name", "m"])
    try:
        asyncio.run(measure(engine_url, prompts[:4], 4, 4))  # warm up both paths
        asyncio.run(measure(router_url, prompts[:4], 4, 4))
        runs = {"direct": [], "router": []}
        for _ in range(args.rounds):  # alternate, so drift on this noisy machine hits both alike
            runs["direct"].append(asyncio.run(measure(engine_url, prompts, args.output_len, args.concurrency)))
            runs["router"].append(asyncio.run(measure(router_url, prompts, args.output_len, args.concurrency)))
        direct, routed = ((statistics.median(r[0] for r in runs[k]), statistics.median(r[1] for r in runs[k]))
                          for k in ("direct", "router"))
    finally:
        for p in (router, engine):
            stop(p)
    print(f"\n{args.requests} requests, prompt {args.prompt_len} tokens, output {args.output_len}, "
          f"concurrency {args.concurrency}")
    print(f"medians of {args.rounds} alternating rounds")
    print(f"{'':10} {'TTFT p50 (alone)':>18} {'output tok/s':>14}")
    print(f"{'direct':10} {direct[0] * 1e3:16.1f}ms {direct[1]:14.1f}")
    print(f"{'router':10} {routed[0] * 1e3:16.1f}ms {routed[1]:14.1f}")
    print(f"router adds {1e3 * (routed[0] - direct[0]):.1f} ms to TTFT and costs "
          f"{100 * (1 - routed[1] / direct[1]):.1f}% of throughput")


if __name__ == "__main__":
    main()
