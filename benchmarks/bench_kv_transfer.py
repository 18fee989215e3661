"""KV transfer bandwidth per transport, beside a plain memcpy and a plain loopback socket,
and time to first token of a disaggregated request vs the same request on one engine.

    python benchmarks/bench_kv_transfer.py [--lengths 2048,8000] [--repeats 3]

Starts three engines with the built-in model: P (sender), D (shm receiver), T (TCP receiver).
Bandwidth is measured with the prompt already in P's prefix cache, so the transfer
moves KV without computing it; TTFT is measured on fresh prompts.
"""

from __future__ import annotations

import argparse
import random
import socket
import statistics
import threading
import time

import httpx
import torch

from procs import start, stop


def post(url, path, body):
    r = httpx.post(url + path, json=body, timeout=600)
    r.raise_for_status()
    return r.json()


def memcpy_gbps(nbytes, repeats):
    """The same gather-and-scatter a shm transfer does, within one process."""
    rows = nbytes // (3 * 64 * 2) // 60  # per layer and per K/V, like the pool's rows
    src = torch.randn(rows * 2, 3, 64).bfloat16()
    dst = torch.empty_like(src)
    idx = torch.randperm(rows * 2)[:rows]
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(60):
            dst.index_copy_(0, idx, src.index_select(0, idx))
        times.append(time.perf_counter() - t)
    plain = torch.ones(nbytes, dtype=torch.uint8)
    target = torch.zeros_like(plain)  # touched once, so page faults are not timed
    copy_times = []
    for _ in range(repeats):
        t = time.perf_counter()
        target.copy_(plain)
        copy_times.append(time.perf_counter() - t)
    return nbytes / statistics.median(times) / 1e9, nbytes / statistics.median(copy_times) / 1e9


def socket_gbps(nbytes, repeats):
    payload = bytearray(nbytes)
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def sink():
        conn, _ = server.accept()
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        with conn:
            while conn.recv_into(view):
                pass

    times = []
    for _ in range(repeats):
        th = threading.Thread(target=sink)
        th.start()
        with socket.create_connection(("127.0.0.1", port)) as c:
            t = time.perf_counter()
            c.sendall(payload)
            c.shutdown(socket.SHUT_WR)
            th.join()
            times.append(time.perf_counter() - t)
    server.close()
    return nbytes / statistics.median(times) / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="2048,8000")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    rng = random.Random(0)
    common = ["--dtype", args.dtype, "--max-num-batched-tokens", "2048"]
    procs = {}
    try:
        for name, extra in [("p", []), ("d", []), ("t", ["--kv-transport", "tcp"])]:
            procs[name] = start(["engine", "--served-model-name", "m", "--kv-cache-memory", "1GiB", *common, *extra])
        P, D, T = (procs[k][1] for k in ("p", "d", "t"))
        rows = []
        for n in lengths:
            prompt = [rng.randrange(100, 40000) for _ in range(n)]
            post(P, "/microserving/start_generate", {"request_id": f"warm{n}", "prompt": prompt, "max_tokens": 1})
            end = (n - 1) // 16 * 16  # whole blocks: P holds them all, so nothing is computed
            for name, recv_url in (("shm", D), ("tcp", T)):
                secs, nbytes = [], 0
                for i in range(args.repeats):
                    rid = f"bw-{name}-{n}-{i}"
                    r = post(recv_url, "/microserving/prep_recv", {"request_id": rid, "prompt": prompt, "end": end})
                    s = post(P, "/microserving/remote_send", {"request_id": rid, "prompt": prompt, "begin": 0,
                                                             "end": end, "kv_addr_info": r["kv_addr_info"]})
                    assert s["computed_tokens"] == 0 and s["transport"] == name
                    secs.append(s["transfer_seconds"])
                    nbytes = s["bytes"]
                    post(recv_url, "/microserving/abort", {"request_id": rid})
                rows.append((f"{name} transfer, {n} tokens", nbytes, nbytes / statistics.median(secs) / 1e9))
            mem, plain = memcpy_gbps(nbytes, args.repeats)
            rows.append((f"gather+scatter in one process, {n} tokens", nbytes, mem))
            rows.append((f"plain memcpy, {n} tokens", nbytes, plain))
            rows.append((f"loopback socket, {n} tokens", nbytes, socket_gbps(nbytes, args.repeats)))

        ttft = []
        for n in lengths:
            single, split = [], []
            for i in range(args.repeats):
                prompt = [rng.randrange(100, 40000) for _ in range(n)]
                t = time.perf_counter()
                post(D, "/microserving/start_generate", {"request_id": f"one-{n}-{i}", "prompt": prompt, "max_tokens": 1})
                single.append(time.perf_counter() - t)
                prompt = [rng.randrange(100, 40000) for _ in range(n)]
                rid = f"split-{n}-{i}"
                t = time.perf_counter()
                r = post(D, "/microserving/prep_recv", {"request_id": rid, "prompt": prompt, "end": -1})
                post(P, "/microserving/remote_send", {"request_id": rid, "prompt": prompt, "begin": 0, "end": n - 1,
                                                     "kv_addr_info": r["kv_addr_info"]})
                post(D, "/microserving/start_generate", {"request_id": rid, "prompt": prompt, "begin": n - 1,
                                                         "max_tokens": 1})
                split.append(time.perf_counter() - t)
            ttft.append((n, statistics.median(single), statistics.median(split)))
    finally:
        for proc, _ in procs.values():
            stop(proc)

    print(f"\n{'measure':45} {'MB':>8} {'GB/s':>7}")
    for name, nbytes, gbps in rows:
        print(f"{name:45} {nbytes / 1e6:8.1f} {gbps:7.2f}")
    print(f"\n{'prompt':>8} {'TTFT one engine':>16} {'TTFT 1P1D (shm)':>16}")
    for n, single, split in ttft:
        print(f"{n:8d} {single * 1e3:14.0f}ms {split * 1e3:14.0f}ms")


if __name__ == "__main__":
    main()
