"""Latency metrics from timestamps, and the summary of a run. Pure arithmetic: no I/O.

Per request (times in seconds, converted to milliseconds):
  TTFT  first output chunk - send
  TPOT  (last chunk - first chunk) / (output tokens - 1): the decode pace after the first token
  ITL   the gaps between consecutive output chunks
  JCT   end of the response - send
"""

from __future__ import annotations

import itertools
from collections import Counter

QUANTILES = (50, 90, 99)


def request_metrics(send: float, token_times: list[float], end: float, output_tokens: int) -> dict:
    ttft = (token_times[0] - send) * 1e3 if token_times else None
    tpot = None
    if len(token_times) >= 1 and output_tokens > 1:
        tpot = (token_times[-1] - token_times[0]) * 1e3 / (output_tokens - 1)
    itl = [(b - a) * 1e3 for a, b in itertools.pairwise(token_times)]
    return {"ttft_ms": ttft, "tpot_ms": tpot, "itl_ms": itl, "jct_ms": (end - send) * 1e3}


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    if not values:
        raise ValueError("no values")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def distribution(values: list[float]) -> dict:
    if not values:
        return {"mean": None, **{f"p{q}": None for q in QUANTILES}}
    return {"mean": sum(values) / len(values), **{f"p{q}": percentile(values, q) for q in QUANTILES}}


def meets_slo(record: dict, slo: dict) -> bool:
    """A finished request that met every SLO given (a TPOT SLO does not apply to a one-token answer)."""
    if not record.get("ok"):
        return False
    for key, limit in slo.items():
        if limit is None:
            continue
        value = record.get(key)
        if value is not None and value > limit:
            return False
    return True


def summarize(records: list[dict], slo: dict | None = None) -> dict:
    """Counts, throughput, goodput and latency distributions of a run. Records need ok, start_s,
    jct_ms and, when ok, ttft_ms / tpot_ms / itl_ms / input_tokens / output_tokens. The run's
    duration runs from the first send to the last response's end, failed requests included."""
    slo = {k: v for k, v in (slo or {}).items() if v is not None}
    sent = [r for r in records if r.get("start_s") is not None]
    ok = [r for r in records if r.get("ok")]
    duration = (max(r["start_s"] + r["jct_ms"] / 1e3 for r in sent) - min(r["start_s"] for r in sent)) if sent else 0.0
    good = sum(meets_slo(r, slo) for r in ok)
    out_tokens = sum(r["output_tokens"] for r in ok)
    in_tokens = sum(r["input_tokens"] or 0 for r in ok)  # unknown without usage for later chat turns

    def per_s(x):
        return x / duration if duration > 0 else None

    return {
        "requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "errors": dict(Counter(r["error"] for r in records if not r.get("ok"))),
        "duration_s": duration,
        "request_throughput": per_s(len(ok)),
        "output_throughput": per_s(out_tokens),
        "total_token_throughput": per_s(in_tokens + out_tokens),
        "goodput": per_s(good),
        "slo": slo,
        "slo_attainment": good / len(records) if records else None,
        "input_tokens_mean": in_tokens / len(ok) if ok else None,
        "output_tokens_mean": out_tokens / len(ok) if ok else None,
        "ttft_ms": distribution([r["ttft_ms"] for r in ok if r["ttft_ms"] is not None]),
        "tpot_ms": distribution([r["tpot_ms"] for r in ok if r["tpot_ms"] is not None]),
        "itl_ms": distribution([x for r in ok for x in r["itl_ms"]]),
        "jct_ms": distribution([r["jct_ms"] for r in ok]),
    }
