"""Tables for docs/simulation.md from `microserve bench` results.

  python benchmarks/sim_report.py fidelity REAL.json SIM.json [REAL2.json SIM2.json ...]
      real vs simulated engines, point by point: mean TTFT and JCT and their ratio
"""

from __future__ import annotations

import json
import sys


def _points(path: str) -> dict:
    with open(path) as f:
        return {(p["label"], p["rate"]): p["summary"] for p in json.load(f)["points"]}


def fidelity(pairs: list[tuple[str, str]]) -> str:
    rows = ["| workload | strategy | rate (req/s) | TTFT real | TTFT sim | sim/real | JCT real | JCT sim | sim/real "
            "| TPOT real | TPOT sim |", "|" + "---|" * 11]
    worst = 0.0
    for real_path, sim_path in pairs:
        with open(real_path) as f:
            workload = json.load(f)["config"]["workload"]
        real, sim = _points(real_path), _points(sim_path)
        for key in sorted(real, key=lambda k: (k[0], k[1])):
            if key not in sim:
                continue
            r, s = real[key], sim[key]
            ttft = s["ttft_ms"]["mean"] / r["ttft_ms"]["mean"]
            jct = s["jct_ms"]["mean"] / r["jct_ms"]["mean"]
            worst = max(worst, abs(ttft - 1), abs(jct - 1))
            rows.append(f"| {workload} | {key[0]} | {key[1]:g} | {r['ttft_ms']['mean']:.0f} | {s['ttft_ms']['mean']:.0f} "
                        f"| {ttft:.2f} | {r['jct_ms']['mean']:.0f} | {s['jct_ms']['mean']:.0f} | {jct:.2f} "
                        f"| {r['tpot_ms']['mean']:.1f} | {s['tpot_ms']['mean']:.1f} |")
    rows.append(f"\nlargest difference in mean TTFT or JCT: {100 * worst:.0f}%")
    return "\n".join(rows)


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[0] != "fidelity" or len(argv[1:]) % 2:
        sys.exit(__doc__)
    files = argv[1:]
    print(fidelity(list(zip(files[0::2], files[1::2]))))


if __name__ == "__main__":
    main(sys.argv[1:])
