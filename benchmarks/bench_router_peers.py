"""microserve's router side by side with vllm-router and sglang-router (the Rust routers vLLM
and SGLang users deploy), on the same fake backends (benchmarks/fake_backend.py: OpenAI routes
for theirs, microserving calls for ours, the same tokens at the same pace), one router at a time.

For each number of backends: streamed completions (16-token text prompt, 8 tokens out) at C in
flight (req/s, TTFT p50/p99, errors, the router's CPU per request from /proc less its idle rate,
its RSS), and a light load (R req/s) for the TTFT a router adds at p50/p99 against the backends
called directly.

The peers are installed in their own venv, outside the project:
    python3 -m venv /tmp/peers && /tmp/peers/bin/pip install vllm-router sglang-router
    python benchmarks/bench_router_peers.py [--backends 2,16,64] [--in-flight 64] [--requests 3000]
           [--peers /tmp/peers/bin] [--routers microserve,vllm-router,sglang-router]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time

import aiohttp

HERE = os.path.dirname(os.path.abspath(__file__))
BACKEND_PORT = 18801
ROUTER_PORT = 18790
PROMPT = ("the quick brown fox jumps over the lazy dog while seven small birds sing in the tall green trees")


def router_command(name: str, urls: list[str], peers: str, policy: str) -> list[str]:
    if name == "vllm-router":
        return [os.path.join(peers, "vllm-router"), "--host", "127.0.0.1", "--port", str(ROUTER_PORT),
                "--worker-urls", *urls, "--policy", policy, "--log-level", "warning"]
    if name == "sglang-router":
        return [os.path.join(peers, "sglang-router"), "launch", "--host", "127.0.0.1", "--port", str(ROUTER_PORT),
                "--worker-urls", *urls, "--policy", policy, "--log-level", "warn"]
    strategy = {"cache_aware": "prefix_aware"}.get(policy, policy)
    engines = [a for u in urls for a in ("--engine", u)]
    return [sys.executable, "-m", "microserve.cli", "router", *engines, "--strategy", strategy,
            "--served-model-name", "fake", "--port", str(ROUTER_PORT), "--log-level", "warning"]


def cpu_s(pid: int) -> float:
    """CPU time of a process and its threads (user + system)."""
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def one(session: aiohttp.ClientSession, url: str) -> tuple[float, float] | None:
    """(TTFT, total) of one streamed completion; None if it failed."""
    body = {"model": "fake", "prompt": PROMPT, "max_tokens": 8, "stream": True}
    t = time.perf_counter()
    ttft = None
    try:
        async with session.post(url + "/v1/completions", json=body) as r:
            if r.status != 200:
                await r.read()
                return None
            async for line in r.content:
                if ttft is None and line.startswith(b"data: {"):
                    ttft = time.perf_counter() - t
            return (ttft or 0.0), time.perf_counter() - t
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None


async def closed_loop(urls: list[str], n: int, c: int) -> dict:
    """n requests, c at a time, spread over `urls` in turn."""
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as s:
        sem = asyncio.Semaphore(c)

        async def go(i):
            async with sem:
                return await one(s, urls[i % len(urls)])
        t = time.perf_counter()
        out = await asyncio.gather(*(go(i) for i in range(n)))
        wall = time.perf_counter() - t
    ok = [o for o in out if o is not None]
    return {"wall_s": wall, "req_per_s": len(ok) / wall, "errors": n - len(ok), **_percentiles([o[0] for o in ok])}


async def open_loop(urls: list[str], rate: float, n: int) -> dict:
    """n requests arriving at `rate` per second (Poisson), for the TTFT a router adds when idle."""
    rng = random.Random(0)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        tasks = []
        for i in range(n):
            tasks.append(asyncio.create_task(one(s, urls[i % len(urls)])))
            await asyncio.sleep(rng.expovariate(rate))
        out = await asyncio.gather(*tasks)
    ok = [o for o in out if o is not None]
    return {"errors": n - len(ok), **_percentiles([o[0] for o in ok])}


def _percentiles(ttfts: list[float]) -> dict:
    ttfts = sorted(ttfts) or [float("nan")]
    return {"ttft_p50_ms": 1000 * ttfts[len(ttfts) // 2], "ttft_p99_ms": 1000 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))]}


def wait_ready(url: str, timeout_s: float = 60) -> None:
    async def ready():
        async with aiohttp.ClientSession() as s:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                try:
                    async with s.post(url + "/v1/completions", json={"model": "fake", "prompt": PROMPT,
                                                                    "max_tokens": 1}) as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
            raise TimeoutError(f"{url} did not answer in {timeout_s} s")
    asyncio.run(ready())


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def stop(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(p.pid, signal.SIGKILL)


def measure_router(name: str, urls: list[str], args) -> dict:
    p = start(router_command(name, urls, args.peers, args.policy))
    try:
        router = f"http://127.0.0.1:{ROUTER_PORT}"
        wait_ready(router)
        asyncio.run(closed_loop([router], 200, 16))  # warm up
        time.sleep(1)
        c0 = cpu_s(p.pid)
        time.sleep(3)
        idle = (cpu_s(p.pid) - c0) / 3
        c0 = cpu_s(p.pid)
        load = asyncio.run(closed_loop([router], args.requests, args.in_flight))
        used = cpu_s(p.pid) - c0 - idle * load["wall_s"]
        rss = rss_mb(p.pid)
        light = asyncio.run(open_loop([router], args.rate, args.light_requests))
        return {"router": name, "cpu_ms_per_req": 1000 * used / args.requests, "idle_cpu": idle, "rss_mb": rss,
                **{k: v for k, v in load.items() if k != "wall_s"},
                "light_ttft_p50_ms": light["ttft_p50_ms"], "light_ttft_p99_ms": light["ttft_p99_ms"],
                "light_errors": light["errors"]}
    finally:
        stop(p)


def run_backends(n: int, args) -> dict:
    urls = [f"http://127.0.0.1:{BACKEND_PORT + i}" for i in range(n)]
    procs = [start([sys.executable, os.path.join(HERE, "fake_backend.py"), "--port", str(BACKEND_PORT + i),
                    "--token-ms", str(args.token_ms)]) for i in range(n)]
    try:
        for u in urls:
            wait_ready(u)
        direct = asyncio.run(closed_loop(urls, args.requests, args.in_flight))
        light = asyncio.run(open_loop(urls, args.rate, args.light_requests))
        rows = [measure_router(name, urls, args) for name in args.routers.split(",")]
        for r in rows:
            r["ttft_p50_added_ms"] = r["ttft_p50_ms"] - direct["ttft_p50_ms"]
            r["light_ttft_p50_added_ms"] = r["light_ttft_p50_ms"] - light["ttft_p50_ms"]
            r["light_ttft_p99_added_ms"] = r["light_ttft_p99_ms"] - light["ttft_p99_ms"]
        return {"backends": n, "direct": {**direct, "light_ttft_p50_ms": light["ttft_p50_ms"],
                                          "light_ttft_p99_ms": light["ttft_p99_ms"]}, "routers": rows}
    finally:
        for p in procs:
            stop(p)


def cpu_flags() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor()
    model = next((l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name")), "?")
    flags = next((l.split(":", 1)[1].split() for l in out.splitlines() if l.startswith("Flags")), [])
    keep = [f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c")]
    return f"{model}, {os.cpu_count()} CPUs, {' '.join(keep)}"


def table(result: dict) -> str:
    lines = [f"\n{result['backends']} backends, {ARGS.in_flight} in flight (direct: {result['direct']['req_per_s']:.0f} req/s, "
             f"TTFT p50 {result['direct']['ttft_p50_ms']:.1f} ms; at {ARGS.rate} req/s p50 "
             f"{result['direct']['light_ttft_p50_ms']:.2f} ms)",
             "| router | req/s | errors | TTFT p50 added | router CPU/req | RSS | added at low rate p50 / p99 |",
             "|---|---|---|---|---|---|---|"]
    for r in result["routers"]:
        lines.append(f"| {r['router']} | {r['req_per_s']:.0f} | {r['errors']} | {r['ttft_p50_added_ms']:+.1f} ms | "
                     f"{r['cpu_ms_per_req']:.2f} ms | {r['rss_mb']:.0f} MB | "
                     f"{r['light_ttft_p50_added_ms']:+.2f} / {r['light_ttft_p99_added_ms']:+.2f} ms |")
    return "\n".join(lines)


def main() -> None:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", default="2,16,64")
    ap.add_argument("--in-flight", type=int, default=64)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--rate", type=float, default=2.0, help="the light load, req/s")
    ap.add_argument("--light-requests", type=int, default=40)
    ap.add_argument("--token-ms", type=float, default=2.0)
    ap.add_argument("--policy", default="round_robin", help="round_robin, or cache_aware (ours: prefix_aware)")
    ap.add_argument("--routers", default="microserve,vllm-router,sglang-router")
    ap.add_argument("--peers", default="/tmp/peers/bin", help="where vllm-router and sglang-router are installed")
    ap.add_argument("--json", help="also write the results here")
    ARGS = args = ap.parse_args()
    print(f"CPU: {cpu_flags()}")
    results = []
    for n in (int(x) for x in args.backends.split(",")):
        results.append(run_backends(n, args))
        print(table(results[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_flags(), "args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
