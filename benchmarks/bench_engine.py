"""Engine throughput beside HF transformers on the same weights and dtype, in the same run.

    python benchmarks/bench_engine.py [--model PATH] [--dtype bfloat16] [--threads 2] [--repeats 3]
                                      [--deterministic] [--baseline hf|default] [--quantization auto|none]
                                      [--llama-cpp DIR]

Prints prefill tokens/s (512, 2048 tokens), decode tokens/s at batch 1, 8, 32 and a
continuous-batching run (64 requests, prompts 128-1024 tokens, outputs 64-256), each
as ours / baseline / ratio, and writes the numbers as JSON (--output). The baseline is HF
transformers, or with `--baseline default` our engine with default settings (so
`--deterministic --baseline default` measures what batch-invariant kernels cost). With
llama.cpp's tools (--llama-cpp DIR or LLAMA_CPP_DIR) and a GGUF model, a llama.cpp column
on the same file and threads is added for prefill and decode.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import time

import torch

from microserve.config import EngineConfig
from microserve.engine.engine import LLMEngine
from microserve.tokenizer import builtin_model_path
from microserve.sampling import SamplingParams


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def random_prompt(rng, n, vocab):
    return [rng.randrange(100, vocab - 100) for _ in range(n)]


# ------------------------------------------------------------------ ours


class Ours:
    def __init__(self, args, deterministic: bool):
        self.engine = LLMEngine(EngineConfig(
            model=args.model, dtype=args.dtype, num_threads=args.threads, kv_cache_memory="4GiB",
            max_num_batched_tokens=2048, max_num_seqs=64, enable_prefix_caching=False,
            deterministic=deterministic, quantization=args.quantization,
        ), progress=False)
        self.vocab = self.engine.model_config.vocab_size
        self.n = 0

    def run(self, prompts, max_tokens):
        ids = []
        for p, m in zip(prompts, max_tokens):
            self.n += 1
            ids.append(f"b{self.n}")
            self.engine.add_request(ids[-1], p, SamplingParams(temperature=0, max_tokens=m, ignore_eos=True))
        while self.engine.has_unfinished_requests():
            self.engine.step()


class OursDefault:
    """Our engine with default settings, in the baseline's place."""

    name = "default"

    def __init__(self, args):
        self.ours = Ours(args, deterministic=False)

    def prefill(self, prompt):
        self.ours.run([prompt], [1])

    def generate(self, prompts, new_tokens):
        self.ours.run(prompts, [new_tokens] * len(prompts))


# ------------------------------------------------------------------ HF transformers


class HF:
    name = "HF"

    def __init__(self, args, dtype):
        from transformers import AutoModelForCausalLM

        path = args.model or builtin_model_path()
        if path.endswith(".gguf"):
            self.model = AutoModelForCausalLM.from_pretrained(
                os.path.dirname(path), gguf_file=os.path.basename(path), dtype=dtype)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        self.model.eval()

    @torch.inference_mode()
    def prefill(self, prompt):
        self.model(torch.tensor([prompt]), logits_to_keep=1)

    @torch.inference_mode()
    def generate(self, prompts, new_tokens):
        """One static batch, left-padded, exactly `new_tokens` tokens each."""
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        self.model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                            do_sample=False, pad_token_id=0)


# ------------------------------------------------------------------ llama.cpp


class LlamaCpp:
    """llama.cpp's own tools on the same GGUF file and threads: llama-bench for prefill and
    batch-1 decode, llama-batched-bench for batched decode (each timing itself). Build them
    with ../shared/tools/build-llama-cpp DIR and pass --llama-cpp DIR (or LLAMA_CPP_DIR)."""

    name = "llama.cpp"

    def __init__(self, folder: str, model: str, threads: int, repeats: int):
        self.bin = os.path.join(folder, "bin")
        self.model, self.threads, self.repeats = model, threads, repeats
        self.env = {**os.environ, "LD_LIBRARY_PATH": self.bin}

    @staticmethod
    def find(flag: str | None) -> str | None:
        folder = flag or os.environ.get("LLAMA_CPP_DIR")
        if folder and os.access(os.path.join(folder, "bin", "llama-batched-bench"), os.X_OK):
            return folder
        return None

    def _run(self, tool: str, *args) -> str:
        cmd = [os.path.join(self.bin, tool), "-m", self.model, "-t", str(self.threads), *map(str, args)]
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=True).stdout

    def _bench(self, prompt: int, gen: int) -> float:
        out = json.loads(self._run("llama-bench", "-p", prompt, "-n", gen, "-r", self.repeats, "-o", "json"))
        return float(out[0]["avg_ts"])  # mean over the repeats, as llama-bench reports it

    def prefill_rate(self, n: int) -> float:
        return self._bench(n, 0)

    def decode_rate(self, batch: int, prompt_len: int, new: int) -> float:
        if batch == 1:
            return self._bench(0, new)
        rates = []
        for _ in range(self.repeats):
            out = self._run("llama-batched-bench", "-c", batch * (prompt_len + new), "-b", 2048, "-ub", 512,
                            "-npp", prompt_len, "-ntg", new, "-npl", batch)
            rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("|")]
            data = [r for r in rows if r and r[0].strip().isdigit()]
            rates.append(float(data[-1][7]))  # S_TG t/s
        return statistics.median(rates)


# ------------------------------------------------------------------ the runs


def bench_prefill(ours, hf, lengths, repeats, rng, rows, lcpp=None):
    for n in lengths:
        prompt = random_prompt(rng, n, ours.vocab)
        ours.run([prompt], [1])  # warm up
        t_ours = median_time(lambda: ours.run([prompt], [1]), repeats)
        t_hf = median_time(lambda: hf.prefill(prompt), repeats) if hf else None
        rows.append((f"prefill {n} tokens (tok/s)", n / t_ours, n / t_hf if hf else None,
                     lcpp.prefill_rate(n) if lcpp else None))


def bench_decode(ours, hf, batches, repeats, rng, rows, prompt_len=128, new=64, lcpp=None):
    for b in batches:
        prompts = [random_prompt(rng, prompt_len, ours.vocab) for _ in range(b)]
        ours.run(prompts, [new] * b)  # warm up
        # Decode rate = extra tokens / extra time between a 1-token and a `new`-token run.
        t1 = median_time(lambda: ours.run(prompts, [1] * b), repeats)
        tn = median_time(lambda: ours.run(prompts, [new] * b), repeats)
        ours_rate = b * (new - 1) / (tn - t1)
        hf_rate = None
        if hf:
            h1 = median_time(lambda: hf.generate(prompts, 1), repeats)
            hn = median_time(lambda: hf.generate(prompts, new), repeats)
            hf_rate = b * (new - 1) / (hn - h1)
        rows.append((f"decode batch {b} (tok/s)", ours_rate, hf_rate,
                     lcpp.decode_rate(b, prompt_len, new) if lcpp else None))


def bench_continuous(ours, hf, rng, rows, num=64, hf_batch=8):
    prompts = [random_prompt(rng, rng.randint(128, 1024), ours.vocab) for _ in range(num)]
    outs = [rng.randint(64, 256) for _ in range(num)]
    total_out = sum(outs)
    t = time.perf_counter()
    ours.run(prompts, outs)
    t_ours = time.perf_counter() - t
    t_hf = None
    if isinstance(hf, OursDefault):
        t = time.perf_counter()
        hf.ours.run(prompts, outs)
        t_hf = time.perf_counter() - t
    elif hf:
        # HF has no continuous batching: static batches in arrival order, each running
        # until its longest output is done; only the tokens each request asked for count.
        t = time.perf_counter()
        for i in range(0, num, hf_batch):
            hf.generate(prompts[i:i + hf_batch], max(outs[i:i + hf_batch]))
        t_hf = time.perf_counter() - t
    rows.append((f"continuous batching, {num} requests (output tok/s)", total_out / t_ours,
                 total_out / t_hf if hf else None, None))
    return {"requests": num, "prompt_tokens": sum(map(len, prompts)), "output_tokens": total_out,
            "seconds_ours": t_ours, "seconds_hf": t_hf, "hf_static_batch": hf_batch}


def hardware_line(threads):
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {threads} threads, torch {torch.__version__}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-hf", action="store_true", help="no baseline column")
    ap.add_argument("--deterministic", action="store_true", help="our engine with batch-invariant kernels")
    ap.add_argument("--baseline", choices=["hf", "default"], default="hf",
                    help="the second column: HF transformers, or our engine with default settings")
    ap.add_argument("--only", default="prefill,decode,continuous")
    ap.add_argument("--llama-cpp", default=None, metavar="DIR",
                    help="llama.cpp tools (DIR/bin, from ../shared/tools/build-llama-cpp DIR; or LLAMA_CPP_DIR): "
                         "adds a llama.cpp column on the same GGUF file")
    ap.add_argument("--quantization", default="auto", help="ours: auto (GGUF formats kept) or none")
    ap.add_argument("--output", default="results/bench_engine.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[args.dtype]

    ours = Ours(args, args.deterministic)
    hf = None if args.skip_hf else (OursDefault(args) if args.baseline == "default" else HF(args, dtype))
    folder = LlamaCpp.find(args.llama_cpp)
    model_file = args.model or builtin_model_path()
    lcpp = LlamaCpp(folder, model_file, args.threads, args.repeats) if folder and model_file.endswith(".gguf") else None
    rows, extra = [], {}
    only = args.only.split(",")
    if "prefill" in only:
        bench_prefill(ours, hf, [512, 2048], args.repeats, rng, rows, lcpp)
    if "decode" in only:
        bench_decode(ours, hf, [1, 8, 32], args.repeats, rng, rows, lcpp=lcpp)
    if "continuous" in only:
        extra["continuous"] = bench_continuous(ours, hf, rng, rows)

    hw = hardware_line(args.threads)
    mode = " --deterministic" if args.deterministic else ""
    print(f"\n{hw}; model {ours.engine.model_config.name}, {args.dtype}{mode}")
    header = f"{'measure':52} {'microserve':>11} {hf.name if hf else '-':>9} {'ratio':>7}"
    print(header + (f" {'llama.cpp':>10} {'ratio':>7}" if lcpp else ""))
    for name, a, b, c in rows:
        line = f"{name:52} {a:11.1f} {b if b else float('nan'):9.1f} {f'{a / b:6.2f}x' if b else '   -':>7}"
        if lcpp:
            line += f" {c if c else float('nan'):10.1f} {f'{a / c:6.2f}x' if c else '   -':>7}"
        print(line)
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"hardware": hw, "dtype": args.dtype, "deterministic": args.deterministic,
                   "quantization": args.quantization, "baseline": hf.name if hf else None,
                   "llama_cpp": folder if lcpp else None, "rows": rows, **extra}, f, indent=2)


if __name__ == "__main__":
    main()
