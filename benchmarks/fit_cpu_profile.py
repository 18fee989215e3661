"""Fit the smollm2-135m@cpu simulation profile to microserve's real engine on this machine.

    MICROSERVE_THREADS=1 .venv/bin/python benchmarks/fit_cpu_profile.py

Runs the built-in model (SmolLM2-135M, in the dtype `--dtype auto` gives on this CPU: bf16
where oneDNN has fast bf16 GEMMs, float32 otherwise) in the real engine with one torch thread and
times every forward pass (`runner.execute`: the part a simulated engine replaces with a
sleep; scheduling and detokenizing run for real in both). Cases: single prompts, prefill
chunks after a cached prefix, decode at batch 1..32 with short and long contexts, and a
mixed step. Then it fits the profile's free constants by minimising the squared log error
of predicted vs measured step time (Nelder-Mead), and prints the constants and a table
of measured vs predicted times. The numbers go into microserve/sim/profiles.py and
docs/simulation.md by hand.

Sizes are small because one thread of an AVX2 CPU is slow (about 35 GFLOP/s in float32 and
5 in bf16 on the EPYC this was first run on).
Long-context decodes share one cached prefix (every sequence reads the same blocks), so
a batch of 32 long contexts costs one prefill, not 32.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import statistics
import sys
import time

os.environ.setdefault("MICROSERVE_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from microserve.config import EngineConfig  # noqa: E402
from microserve.engine.engine import LLMEngine  # noqa: E402
from microserve.models.loader import load_model, resolve_dtype  # noqa: E402
from microserve.sampling import SamplingParams  # noqa: E402
from microserve.sim.cost_model import CostModel  # noqa: E402
from microserve.sim.profiles import get_profile  # noqa: E402

PROFILE = "smollm2-135m@cpu"
PREFILL_LENGTHS = [(8, 3), (32, 3), (128, 2), (384, 1)]  # (prompt tokens, repeats)
CONTEXT_PREFILLS = [(32, 128, 2), (64, 384, 2)]  # (new tokens, cached context, repeats)
DECODE_BATCHES = [1, 2, 4, 8, 16, 32]
DECODE_CONTEXTS = [32, 384]  # shared cached prefix; each sequence adds one token of its own
DECODE_STEPS = 3
MIXED = [(8, 32, 2)]  # (decoding sequences, new prompt tokens, repeats)


class Recorder:
    """Wraps the runner: every forward pass with its batch, described as the simulator sees it."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.records: list[tuple[str, list, list, int, float]] = []
        self.label = "setup"
        self._execute = engine.runner.execute
        engine.runner.execute = self.execute

    def execute(self, items):
        # The same classification as microserve/sim/runner.py's SimRunner.execute.
        prefill, decode, sampled = [], [], 0
        for req, n in items:
            begin = req.num_computed_tokens
            if n == 1 and begin > 0:
                decode.append(begin + 1)
            else:
                prefill.append((n, begin))
            sampled += begin + n == req.num_tokens and not req.prefill_only
        start = time.perf_counter()
        out = self._execute(items)
        self.records.append((self.label, prefill, decode, sampled, time.perf_counter() - start))
        return out


class Bench:
    def __init__(self, dtype: str):
        cfg = EngineConfig(num_threads=1, dtype=dtype, max_num_batched_tokens=512, max_num_seqs=64,
                           kv_cache_memory="1GiB", enable_prefix_caching=True)
        self.engine = LLMEngine(cfg, load_model(None, dtype, "cpu", progress=False))
        self.rec = Recorder(self.engine)
        self.rng = random.Random(0)
        self.next_id = 0

    def ids(self, n: int) -> list[int]:
        return [self.rng.randrange(100, 49000) for _ in range(n)]

    def add(self, prompt: list[int], max_tokens: int) -> str:
        rid = f"r{self.next_id}"
        self.next_id += 1
        self.engine.add_request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
        return rid

    def drain(self) -> None:
        self.rec.label = "setup"
        while self.engine.has_unfinished_requests():
            self.engine.step()

    def step(self, label: str) -> None:
        self.rec.label = label
        self.engine.step()
        self.rec.label = "setup"

    def run(self) -> None:
        prefixes = {}
        for length, repeats in PREFILL_LENGTHS:
            for _ in range(repeats):
                prompt = self.ids(length)
                prefixes[length] = prompt  # stays in the prefix cache after the request ends
                self.add(prompt, 1)
                self.step(f"prefill {length}")
                self.drain()
        for n, ctx, repeats in CONTEXT_PREFILLS:
            for _ in range(repeats):
                self.add(prefixes[ctx] + self.ids(n), 1)
                self.step(f"prefill {n} after {ctx} cached")
                self.drain()
        for ctx in DECODE_CONTEXTS:
            prefix = prefixes.get(ctx) or self.ids(ctx)
            for batch in DECODE_BATCHES:
                rids = [self.add(prefix + self.ids(1), DECODE_STEPS + 50) for _ in range(batch)]
                while not self._all_decoding(batch):
                    self.step("setup")
                for _ in range(DECODE_STEPS):
                    self.step(f"decode x{batch}, context {ctx}")
                for rid in rids:
                    self.engine.abort_request(rid)
                self.drain()
        for batch, n, repeats in MIXED:
            rids = [self.add(prefixes[32] + self.ids(1), 100) for _ in range(batch)]
            while not self._all_decoding(batch):
                self.step("setup")
            for _ in range(repeats):
                self.add(self.ids(n), 1)
                self.step(f"mixed: {batch} decodes + prefill {n}")
                self.step("setup")  # the new request's last sampled step, if any
            for rid in rids:
                self.engine.abort_request(rid)
            self.drain()

    def _all_decoding(self, batch: int) -> bool:
        running = self.engine.scheduler.running
        return (not self.engine.scheduler.waiting and len(running) == batch
                and all(r.num_computed_tokens >= r.num_prompt_tokens for r in running))


# ---------------------------------------------------------------------------- microbenchmarks

def median_time(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def microbenchmarks(dtype: torch.dtype) -> tuple[float, float]:
    """Nominal peaks of this CPU on one thread, as torch reaches them outside the engine:
    a GEMM of a layer's gate/up shape over 128 rows, and a read of 256 MB."""
    w = torch.randn(2 * 1536, 576, dtype=dtype)
    x = torch.randn(128, 576, dtype=dtype)
    t = median_time(lambda: torch.nn.functional.linear(x, w))
    flops = 2 * 128 * 576 * 3072 / t
    big = torch.randn(64 * 2**20)  # 256 MB of float32
    t = median_time(lambda: big.sum())
    return flops, big.numel() * 4 / t


def kv_copy_seconds(tokens: int, dtype: torch.dtype, pool_slots: int = 8192, block_size: int = 16) -> float:
    """What the shm transport does per transfer (microserve/kv_transfer/sender.py): for each
    layer, gather the rows of K and V from the sender's paged pool and scatter them into the
    receiver's blocks, here two local pools with shuffled block tables."""
    m = get_profile(PROFILE).model
    shape = (m.num_layers, pool_slots, m.num_kv_heads, m.head_dim)
    pools = [[torch.randn(shape, dtype=dtype) for _ in "kv"] for _ in "sd"]
    rng = random.Random(1)
    blocks = list(range(pool_slots // block_size))

    def slots() -> torch.Tensor:
        rng.shuffle(blocks)
        return torch.tensor([b * block_size + i for b in blocks for i in range(block_size)][:tokens])

    src, dst = slots(), slots()

    def copy():
        for layer in range(m.num_layers):
            for i in range(2):
                pools[1][i][layer].index_copy_(0, dst, pools[0][i][layer].index_select(0, src))

    return median_time(copy)


def kv_link(dtype: torch.dtype) -> tuple[float, float]:
    """Bandwidth and fixed in-process cost of the shm transport's copies, from two sizes."""
    per_token = CostModel(get_profile(PROFILE)).kv_bytes_per_token()
    (n1, t1), (n2, t2) = [(n, kv_copy_seconds(n, dtype)) for n in (2048, 8000)]
    bandwidth = (n2 - n1) * per_token / (t2 - t1)
    return bandwidth, max(0.0, t1 - n1 * per_token / bandwidth)


# ---------------------------------------------------------------------------- fit

NAMES = ["gemm FLOP/s", "GEMM bytes/s", "attention FLOP/s", "attention bytes/s", "step overhead s",
         "per-sequence overhead s", "single-row GEMM bytes/s"]


def cost_model(theta: np.ndarray) -> CostModel:
    f, b, fa, ba, step, seq, b1 = np.exp(theta)
    base = get_profile(PROFILE)
    peak_f, peak_b = max(f, fa), max(b, ba, b1)
    hw = dataclasses.replace(
        base.hardware, peak_flops=peak_f, flops_efficiency=f / peak_f, attention_flops_efficiency=fa / peak_f,
        mem_bandwidth=peak_b, bandwidth_efficiency=b / peak_b, attention_bandwidth_efficiency=ba / peak_b,
        single_row_bandwidth_efficiency=b1 / peak_b, step_overhead_s=step, per_seq_overhead_s=seq)
    return CostModel(dataclasses.replace(base, hardware=hw))


PRIOR_WEIGHT = 1e-3  # per squared log-unit away from the prior: only decides what the data cannot


def loss(theta: np.ndarray, cases, prior: np.ndarray) -> float:
    """Mean squared log error, plus a weak pull towards the microbenchmarks: a constant the
    cases cannot pin down (a bandwidth on a CPU where every step is compute-bound) stays at
    its measured nominal value instead of drifting to wherever the simplex leaves it."""
    model = cost_model(theta)
    errs = [math.log(model.step_seconds(p, d, s) / t) for p, d, s, t in cases]
    return float(np.mean(np.square(errs)) + PRIOR_WEIGHT * np.sum(np.square(theta - prior)))


def nelder_mead(f, x0: np.ndarray, step: float = 0.5, iters: int = 3000, tol: float = 1e-10) -> np.ndarray:
    """The textbook simplex method (reflect, expand, contract, shrink)."""
    simplex = [x0] + [x0 + step * np.eye(len(x0))[i] for i in range(len(x0))]
    values = [f(x) for x in simplex]
    for _ in range(iters):
        order = np.argsort(values)
        simplex, values = [simplex[i] for i in order], [values[i] for i in order]
        if values[-1] - values[0] < tol:
            break
        centroid = np.mean(simplex[:-1], axis=0)
        reflected = centroid + (centroid - simplex[-1])
        fr = f(reflected)
        if fr < values[0]:
            expanded = centroid + 2 * (centroid - simplex[-1])
            fe = f(expanded)
            simplex[-1], values[-1] = (expanded, fe) if fe < fr else (reflected, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = reflected, fr
        else:
            contracted = centroid + 0.5 * (simplex[-1] - centroid)
            fc = f(contracted)
            if fc < values[-1]:
                simplex[-1], values[-1] = contracted, fc
            else:
                simplex = [simplex[0] + 0.5 * (x - simplex[0]) for x in simplex]
                values = [f(x) for x in simplex]
    return simplex[int(np.argmin(values))]


def summarize(records):
    """Per case: the record with the median time stands for the case (its batch and time)."""
    by_label: dict[str, list] = {}
    for label, p, d, s, t in records:
        if label != "setup":
            by_label.setdefault(label, []).append((p, d, s, t))
    cases = []
    for label, recs in by_label.items():
        recs.sort(key=lambda r: r[3])
        cases.append((label, *recs[len(recs) // 2], len(recs)))
    return cases


def describe(p, d) -> str:
    parts = [f"prefill {n}@{c}" for n, c in p]
    if d:
        parts.append(f"{len(d)} decodes @{statistics.median(d):.0f}")
    return ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--save", metavar="FILE", help="write the measured forward passes (JSON)")
    parser.add_argument("--load", metavar="FILE", help="fit to forward passes saved earlier instead of measuring")
    parser.add_argument("--dtype", default=None, help="the engine's dtype (default: what `auto` gives on this CPU)")
    args = parser.parse_args()
    args.dtype = args.dtype or str(resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
    dtype = getattr(torch, args.dtype)
    if torch.get_num_threads() != 1:
        sys.exit("torch must run on one thread")
    began = time.time()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"# {cpu}, torch {torch.__version__}, {torch.get_num_threads()} thread, {time.strftime('%Y-%m-%d')}")
    if args.load:
        with open(args.load) as f:
            saved = json.load(f)
        peak_flops, bandwidth, records = saved["peak_flops"], saved["bandwidth"], saved["records"]
        link, link_fixed = saved["kv_link"]
        print(f"forward passes from {args.load} ({saved['machine']})")
    else:
        peak_flops, bandwidth = microbenchmarks(dtype)
        link, link_fixed = kv_link(dtype)
        bench = Bench(args.dtype)
        bench.run()
        records = bench.rec.records
        print(f"measured {len(records)} forward passes in {time.time() - began:.0f} s")
        if args.save:
            with open(args.save, "w") as f:
                json.dump({"machine": f"{cpu}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}",
                           "peak_flops": peak_flops, "bandwidth": bandwidth, "kv_link": [link, link_fixed],
                           "records": records}, f)
    print(f"microbenchmarks: {args.dtype} linear {peak_flops / 1e9:.2f} GFLOP/s, read {bandwidth / 1e9:.2f} GB/s")
    print(f"KV copy as the shm transport does it: kv_link_bandwidth={link:.3g}, kv_link_latency_s={link_fixed:.2g} "
          "(the rest of a real transfer's fixed cost, its HTTP call and handshake, runs for real in a simulated one)")
    named = summarize(records)
    cases = [(p, d, s, t) for _, p, d, s, t, _ in named]

    # Prior: GEMMs and attention at the microbenchmarks' rates, 5 ms and 0.1 ms of overheads.
    prior = np.log([peak_flops, bandwidth, peak_flops, bandwidth, 5e-3, 1e-4, bandwidth])
    objective = lambda th: loss(th, cases, prior)  # noqa: E731
    best = min((nelder_mead(objective, prior + shift) for shift in (0.0, -0.5, 0.5)), key=objective)
    best = nelder_mead(objective, best, step=0.1)
    f, b, fa, ba, step, seq, b1 = np.exp(best)
    model = cost_model(best)

    # Express the rates against the microbenchmarks; a rate above them raises the peak.
    peak_f, peak_b = max(peak_flops, f, fa), max(bandwidth, b, ba, b1)
    print("\nfitted constants (paste into CPU_1T_FITTED in microserve/sim/profiles.py):")
    print(f"    peak_flops={peak_f:.3g},")
    print(f"    mem_bandwidth={peak_b:.3g},")
    print(f"    flops_efficiency={f / peak_f:.3f},")
    print(f"    attention_flops_efficiency={fa / peak_f:.3f},")
    print(f"    bandwidth_efficiency={b / peak_b:.3f},")
    print(f"    attention_bandwidth_efficiency={ba / peak_b:.3f},")
    print(f"    single_row_bandwidth_efficiency={b1 / peak_b:.3f},")
    print(f"    step_overhead_s={step:.3g},")
    print(f"    per_seq_overhead_s={seq:.3g},")
    for name, value in zip(NAMES, (f, b, fa, ba, step, seq, b1)):
        print(f"  {name}: {value:.4g}")

    print("\n| case | batch as the simulator sees it | runs | measured ms | predicted ms | error |")
    print("|---|---|---:|---:|---:|---:|")
    errors = []
    for label, p, d, s, t, runs in named:
        pred = model.step_seconds(p, d, s)
        err = pred / t - 1
        errors.append(abs(err))
        print(f"| {label} | {describe(p, d)} | {runs} | {t * 1e3:.1f} | {pred * 1e3:.1f} | {err:+.1%} |")
    print(f"\nrelative error: median {statistics.median(errors):.1%}, max {max(errors):.1%} "
          f"over {len(errors)} cases; total {time.time() - began:.0f} s")


if __name__ == "__main__":
    main()
