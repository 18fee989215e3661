"""The long fuzz of valid requests against `microserve serve` (the short one runs in the tests).

    python benchmarks/fuzz_serve.py [--examples 500] [--fleet builtin|simulated|both] [--seed 0]
                                    [--output fuzz.json]

Starts `serve` (two engines on the built-in model, or four simulated engines), sends
`--examples` cases drawn by tests/fuzz_requests.py (every completions and chat field, alone
and combined, streamed and not, under a drawn strategy), checks every answer, then checks
that every engine is up and holds nothing. Prints what it sent and any failing case (as
hypothesis shrank it); exits non-zero on a finding.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402

from fuzz_requests import FLEETS, TOKEN, Fuzzer, cases, check_cluster  # noqa: E402
from server_utils import start_serve, stop_serve  # noqa: E402


def fuzz_fleet(name: str, examples: int, rng_seed: int) -> dict:
    url, proc = start_serve(*FLEETS[name], env={"MICROSERVE_CLUSTER_TOKEN": TOKEN})
    fuzzer = Fuzzer(url, TOKEN)
    start, finding = time.monotonic(), None

    @seed(rng_seed)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=cases(fuzzer.model))
    def fuzz(case):
        fuzzer.run(case)

    try:
        fuzz()
        check_cluster(url, TOKEN)
    except Exception as e:  # hypothesis re-raises the shrunk failing case
        finding = f"{type(e).__name__}: {e}"
    finally:
        fuzzer.close()
        stop_serve(proc)
    t = fuzzer.tally
    return {"fleet": name, "cases": t.cases, "streamed": t.streamed, "tokens_counted": t.tokens,
            "seconds": round(time.monotonic() - start, 1), "by_strategy": dict(t.by_strategy),
            "by_field": dict(sorted(t.by_field.items())), "finding": finding}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=500)
    ap.add_argument("--fleet", choices=[*FLEETS, "both"], default="both")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    results = [fuzz_fleet(name, args.examples, args.seed) for name in (FLEETS if args.fleet == "both" else [args.fleet])]
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    for r in results:
        print(f"{r['fleet']}: {r['cases']} cases ({r['streamed']} streamed) in {r['seconds']} s; "
              f"strategies {r['by_strategy']}; finding: {r['finding'] or 'none'}")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1))
    return 1 if any(r["finding"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
