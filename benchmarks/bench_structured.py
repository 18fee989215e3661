"""Decoding under a JSON schema against free decoding, on the same engine, in the same run.

    python benchmarks/bench_structured.py [--model PATH] [--threads 2] [--repeats 3] [--tokens 64]

For batch 1 and 32: decode tokens/s with every sequence under a JSON schema, and with none
(the same prompts, the same number of tokens: the schema needs more than --tokens to
complete, so no sequence stops early). Also the compile time of a realistic schema, cold
(first compile in the process) and cached. Prints the CPU's model and ISA flags beside.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time

from microserve.config import EngineConfig
from microserve.engine.engine import LLMEngine
from microserve.sampling import SamplingParams, StructuredOutput

# At least 100 strings: a document that cannot finish inside the token budget.
LONG = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                                   "minItems": 100}}, "required": ["items"]}
REALISTIC = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"}, "name": {"type": "string", "maxLength": 40},
        "email": {"type": "string", "format": "email"}, "status": {"enum": ["active", "inactive", "banned"]},
        "roles": {"type": "array", "items": {"enum": ["admin", "editor", "viewer"]}, "maxItems": 3},
        "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["street", "city", "zip"], "additionalProperties": False},
        "score": {"type": "number", "minimum": 0, "maximum": 100},
    },
    "required": ["id", "name", "email", "status", "roles", "address"],
    "additionalProperties": False,
}
PROMPT = "<|im_start|>user\nList many short words as JSON.<|im_end|>\n<|im_start|>assistant\n"


def cpu_line() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name")), "?")
    flags = set(next((l.split(":", 1)[1].split() for l in out.splitlines() if l.startswith("Flags")), []))
    isa = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags)
    return f"{model} ({isa})"


def decode_seconds(engine: LLMEngine, batch: int, tokens: int, structured: bool, tag: str) -> float:
    spec = StructuredOutput(json_schema=json.dumps(LONG)) if structured else None
    for i in range(batch):
        engine.add_request(f"{tag}-{i}", PROMPT, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True,
                                                                structured=spec))
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in [*engine.scheduler.waiting, *engine.scheduler.running]):
        engine.step()  # prefill (and the first token) outside the timed part
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    engine = LLMEngine(EngineConfig(model=args.model, num_threads=args.threads, kv_cache_memory="2GiB",
                                    max_num_seqs=64), progress=False)
    print(cpu_line(), f"{args.threads} threads")
    t = time.perf_counter()
    engine.grammars.compile(StructuredOutput(json_schema=json.dumps(REALISTIC)))
    cold = time.perf_counter() - t
    t = time.perf_counter()
    engine.grammars.compile(StructuredOutput(json_schema=json.dumps(REALISTIC)))
    cached = time.perf_counter() - t
    print(f"compile, realistic schema: cold {cold * 1000:.1f} ms (with the tokenizer set-up once), "
          f"cached {cached * 1e6:.1f} us")
    print("| batch | free tok/s | JSON schema tok/s | ratio |\n|---|---:|---:|---:|")
    n = 0
    for batch in (1, 32):
        free, constrained = [], []
        for _ in range(args.repeats):
            for structured, out in ((False, free), (True, constrained)):
                n += 1
                out.append(batch * (args.tokens - 1) / decode_seconds(engine, batch, args.tokens, structured, f"b{n}"))
        f, c = statistics.median(free), statistics.median(constrained)
        print(f"| {batch} | {f:.1f} | {c:.1f} | {c / f:.3f} |")


if __name__ == "__main__":
    main()
