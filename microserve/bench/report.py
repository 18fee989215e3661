"""Markdown tables (and merged plots) from bench results: `python -m microserve.bench.report results.json`."""

from __future__ import annotations

import json

COLUMNS = [("JCT mean", ("jct_ms", "mean")), ("JCT P99", ("jct_ms", "p99")), ("TTFT mean", ("ttft_ms", "mean")),
           ("TTFT P99", ("ttft_ms", "p99")), ("TPOT mean", ("tpot_ms", "mean")), ("TPOT P99", ("tpot_ms", "p99"))]


def _get(summary: dict, path: tuple[str, ...]):
    for key in path:
        summary = summary.get(key) if isinstance(summary, dict) else None
    return summary


def table(points: list[dict]) -> str:
    """One row per (strategy, rate): latencies in ms, throughput and goodput in requests/s."""
    head = ["strategy", "rate", *(c for c, _ in COLUMNS), "req/s", "goodput", "ok"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in sorted(points, key=lambda p: (p["rate"] or 0)):
        s = p["summary"]
        cells = [p["label"], f"{p['rate']:g}" if p["rate"] is not None else "inf"]
        cells += ["-" if _get(s, path) is None else f"{_get(s, path):.0f}" for _, path in COLUMNS]
        cells += [f"{s['request_throughput'] or 0:.2f}", f"{s['goodput'] or 0:.2f}", f"{s['completed']}/{s['requests']}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def merge(results: list[dict]) -> list[dict]:
    """The points of several results files; a later point with the same strategy label and rate
    replaces an earlier one (a repeated run of a point that a neighbour's load disturbed)."""
    merged: dict = {}
    for result in results:
        for p in result["points"]:
            merged[(p["label"], p["rate"])] = p
    return list(merged.values())


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m microserve.bench.report", description=__doc__)
    ap.add_argument("files", nargs="+", help="bench results; later files' points replace earlier ones'")
    ap.add_argument("--plot", default=None, metavar="PREFIX", help="also draw PREFIX_<metric>.png from the merge")
    ap.add_argument("--title", default="")
    ap.add_argument("--save", default=None, metavar="JSON", help="write the merged points, without per-request records")
    args = ap.parse_args(argv)
    results = []
    for path in args.files:
        with open(path) as f:
            results.append(json.load(f))
    points = merge(results)
    print(table(points))
    if args.save:
        with open(args.save, "w") as f:
            json.dump([{k: v for k, v in p.items() if k != "requests"} for p in points], f, indent=1)
    if args.plot:
        from microserve.bench.plots import draw

        draw([p for p in points if p["rate"] is not None], args.plot, args.title)


if __name__ == "__main__":
    main()
