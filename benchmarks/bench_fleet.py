"""The router in front of many simulated engines: its own overhead, CPU and memory.

    .venv/bin/python benchmarks/bench_fleet.py --engines 64 256 1000 --rate 20

For each fleet size it runs `microserve serve --simulate PROFILE --engines N` (engines in
processes of 256, one router), then:
- a lone request's TTFT: the median of 20 of the same requests at 1 req/s, so they rarely
  overlap: the floor a request pays anyway;
- `microserve bench` at --rate requests/s (Poisson), sonnet prompts of --input-len tokens
  and --output-len tokens out; router overhead = each request's TTFT minus the lone TTFT
  (p50 and p99), since at this load an engine rarely has more than one request;
- the router process's CPU seconds per request and its RSS (from /proc), and how many
  status/prefix messages it received from engines per second (`/metrics`).
Prints a markdown table; the raw bench results go to results/fleet/.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    m = re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
    return int(m.group(1)) / 1024


def router_pid(serve_pid: int) -> int:
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(serve_pid)], capture_output=True, text=True).stdout
    return next(int(line.split()[0]) for line in out.splitlines() if " router " in line)


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def run_fleet(n: int, args) -> dict:
    port, token = free_port(), "fleet-bench"
    log = open(ROOT / f"results/fleet/serve_{n}.log", "w")
    serve = subprocess.Popen([str(BIN / "microserve"), "serve", "--simulate", args.profile, "--engines", str(n),
                              "--strategy", args.strategy, "--port", str(port), "--admin-token", token],
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        began = time.monotonic()
        while "microserve is up" not in (ROOT / f"results/fleet/serve_{n}.log").read_text():
            if serve.poll() is not None:
                raise RuntimeError(f"serve exited with {serve.returncode}; see results/fleet/serve_{n}.log")
            time.sleep(0.5)
        startup = time.monotonic() - began
        while metric(url, "microserve_router:engines_up") < n:
            time.sleep(0.5)
        pid = router_pid(serve.pid)
        def bench(name: str, rate: float, num: int) -> dict:
            out = ROOT / f"results/fleet/{name}_{n}.json"
            subprocess.run([str(BIN / "microserve"), "bench", "--url", url, "--workload", "sonnet", "--input-len",
                            str(args.input_len), "--output-len", str(args.output_len), "--rate", str(rate),
                            "--num-requests", str(num), "--seed", "1", "--no-progress", "--output", str(out)],
                           check=True, stdout=subprocess.DEVNULL)
            return json.loads(out.read_text())["points"][0]

        # The floor: the same requests one at a time (1 req/s; each is done in well under a second).
        lone = bench("lone", 1.0, 20)
        lone = statistics.median(r["ttft_ms"] / 1e3 for r in lone["requests"] if r.get("ttft_ms") is not None)
        time.sleep(2)
        cpu0, msgs0, t0 = cpu_seconds(pid), metric(url, "microserve_router:engine_messages"), time.monotonic()
        point = bench("bench", args.rate, args.num_requests)
        cpu1, msgs1, t1 = cpu_seconds(pid), metric(url, "microserve_router:engine_messages"), time.monotonic()
        ttfts = [r["ttft_ms"] / 1e3 for r in point["requests"] if r.get("ttft_ms") is not None]
        s = point["summary"]
        overhead = [t - lone for t in ttfts]
        return {"engines": n, "startup_s": startup, "completed": s["completed"], "requests": s["requests"],
                "rate": s["request_throughput"], "lone_ttft_ms": 1e3 * lone,
                "ttft_p50_ms": 1e3 * percentile(ttfts, 50), "ttft_p99_ms": 1e3 * percentile(ttfts, 99),
                "overhead_p50_ms": 1e3 * percentile(overhead, 50), "overhead_p99_ms": 1e3 * percentile(overhead, 99),
                "cpu_ms_per_request": 1e3 * (cpu1 - cpu0) / max(1, s["completed"]),
                "messages_per_s": (msgs1 - msgs0) / (t1 - t0), "router_rss_mb": rss_mb(pid)}
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGTERM)
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()
        log.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines", type=int, nargs="+", default=[64, 256, 1000])
    ap.add_argument("--profile", default="llama-3.1-8b@h100")
    ap.add_argument("--strategy", default="least_loaded")
    ap.add_argument("--rate", type=float, default=20.0)
    ap.add_argument("--num-requests", type=int, default=400)
    ap.add_argument("--input-len", type=int, default=1000)
    ap.add_argument("--output-len", type=int, default=32)
    args = ap.parse_args()
    (ROOT / "results/fleet").mkdir(parents=True, exist_ok=True)
    rows = []
    for n in args.engines:
        rows.append(run_fleet(n, args))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.profile}, {args.strategy}, sonnet {args.input_len} in / {args.output_len} out, "
          f"Poisson {args.rate:g} req/s, {args.num_requests} requests\n")
    print("| engines | ready in | completed | req/s | lone TTFT | TTFT p50 / p99 | router overhead p50 / p99 "
          "| router CPU per request | engine messages/s | router RSS |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['engines']} | {r['startup_s']:.0f} s | {r['completed']}/{r['requests']} | {r['rate']:.1f} "
              f"| {r['lone_ttft_ms']:.0f} ms | {r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} ms "
              f"| {r['overhead_p50_ms']:.1f} / {r['overhead_p99_ms']:.1f} ms | {r['cpu_ms_per_request']:.1f} ms "
              f"| {r['messages_per_s']:.0f} | {r['router_rss_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
