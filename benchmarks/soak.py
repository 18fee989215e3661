"""Soak run: `microserve serve` at about 80% of its measured capacity for a long time.

    .venv/bin/python benchmarks/soak.py [--minutes 10] [--load 0.8] [--engines 2]

1. starts `microserve serve` (built-in model) and warms it up;
2. measures capacity: request throughput of `microserve bench` at a fixed concurrency;
3. sends Poisson arrivals at `--load` x capacity for `--minutes` with `microserve bench`,
   sampling every process's memory (RSS) and every engine's KV blocks meanwhile;
4. after the load and a short idle: no request may have failed, every KV block must be
   free again, and each process's memory must be back near where it started.
Writes soak.json (timeline included) and prints a summary. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procs import free_port  # noqa: E402

BIN = Path(sys.executable).parent


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def children(pid: int) -> dict[str, int]:
    """serve's children by role: engine ports from their command lines."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    kids = {}
    for child in map(int, out.split()):
        args = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        args = [a.decode() for a in args if a]
        role = args[args.index("microserve.cli") + 1] if "microserve.cli" in args else "?"
        port = args[args.index("--port") + 1] if "--port" in args else "?"
        kids[f"{role}:{port}"] = child
    return kids


def snapshot(serve_pid: int, token: str) -> dict:
    kids = children(serve_pid)
    snap = {"t": time.time(), "rss_mb": {"serve": rss_mb(serve_pid), **{k: rss_mb(p) for k, p in kids.items()}},
            "kv": {}}
    for name in kids:
        role, port = name.split(":")
        if role == "engine":
            s = httpx.get(f"http://127.0.0.1:{port}/microserving/status",
                          headers={"Authorization": f"Bearer {token}"}, timeout=10).json()
            snap["kv"][name] = {k: s[k] for k in ("num_blocks", "free_blocks", "running", "waiting", "reservations")}
    return snap


def bench(url: str, out: Path, *extra: str) -> dict:
    cmd = [str(BIN / "microserve"), "bench", "--url", url, "--workload", "sonnet", "--input-len", "256",
           "--output-len", "64", "--output", str(out), "--no-progress", *extra]
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())["points"][0]["summary"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--load", type=float, default=0.8, help="fraction of the measured capacity")
    ap.add_argument("--engines", type=int, default=2)
    ap.add_argument("--output", default="soak.json")
    args = ap.parse_args()

    port, token = free_port(), secrets.token_urlsafe(16)
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MICROSERVE_CLUSTER_TOKEN": token}
    serve = subprocess.Popen([str(BIN / "microserve"), "serve", "--engines", str(args.engines), "--port", str(port)],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    timeline: list[dict] = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).json().get("engines_up") == args.engines:
                    break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1)
        bench(url, tmp / "warmup.json", "--concurrency", "4", "--num-requests", "8")
        time.sleep(3)
        before = snapshot(serve.pid, token)

        cap = bench(url, tmp / "capacity.json", "--concurrency", "16", "--num-requests", "48", "--seed", "1")
        capacity = cap["request_throughput"]
        rate = args.load * capacity
        n = max(1, round(rate * args.minutes * 60))
        print(f"capacity {capacity:.2f} req/s; soaking at {rate:.2f} req/s for {args.minutes:g} min ({n} requests)",
              flush=True)

        stop = threading.Event()

        def sample():
            while not stop.wait(10):
                try:
                    timeline.append(snapshot(serve.pid, token))
                except (httpx.HTTPError, OSError, ValueError):
                    pass

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        soak = bench(url, tmp / "soak.json", "--rate", f"{rate:.4f}", "--num-requests", str(n), "--seed", "2",
                     "--timeout", "300")
        stop.set()
        sampler.join()
        time.sleep(30)  # idle: leases, queues and caches settle
        after = snapshot(serve.pid, token)
    finally:
        serve.terminate()
        serve.wait(timeout=60)

    kv_back = all(a["free_blocks"] == a["num_blocks"] and not (a["running"] or a["waiting"] or a["reservations"])
                  for a in after["kv"].values())
    growth = {k: after["rss_mb"].get(k, 0) - v for k, v in before["rss_mb"].items()}
    result = {"capacity_req_s": capacity, "rate_req_s": rate, "minutes": args.minutes, "soak": soak,
              "before": before, "after": after, "rss_growth_mb": growth, "kv_all_free_after": kv_back,
              "peak_rss_mb": {k: max(s["rss_mb"].get(k, 0) for s in timeline) for k in before["rss_mb"]}
              if timeline else {}, "timeline": timeline}
    Path(args.output).write_text(json.dumps(result, indent=1))
    print(f"requests: {soak['requests']}, completed {soak['completed']}, failed {soak['failed']} {soak['errors']}")
    print(f"JCT mean {soak['jct_ms']['mean']:.0f} ms, p99 {soak['jct_ms']['p99']:.0f} ms; "
          f"TTFT mean {soak['ttft_ms']['mean']:.0f} ms; TPOT mean {soak['tpot_ms']['mean']:.1f} ms")
    for k, v in before["rss_mb"].items():
        print(f"  {k:>14}: RSS {v:7.1f} MB before, peak {result['peak_rss_mb'].get(k, 0):7.1f}, "
              f"{after['rss_mb'].get(k, 0):7.1f} after")
    print(f"KV blocks all free after the load: {kv_back}; results in {args.output}")
    if soak["failed"] or not kv_back:
        sys.exit(1)


if __name__ == "__main__":
    main()
