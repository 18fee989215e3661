"""`microserve bench`: load-test an OpenAI-compatible endpoint, or sweep router strategies x rates.

Imported when the `microserve` parser is built, so only the standard library at the top."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

EPILOG = """examples:
  microserve bench --url http://127.0.0.1:8000 --workload sonnet --input-len 512 --output-len 64 \\
      --rate 2 --num-requests 40 --output results.json
  microserve bench --workload shared-prefix --rates 0.5 1 2 --num-requests 32 --output prefix.json \\
      --strategies round_robin prefix_aware context_migration --admin-token TOKEN
  microserve bench --workload sonnet --rates 1 2 4 --output disagg.json \\
      --strategies round_robin disagg@prefill,decode balanced_disagg:fraction=0.1@prefill,decode adaptive

A strategy is name[:key=value[,key=value]][@role,role,...]; with several strategies or rates every
combination runs on the same engines with the same workload, and one PNG per metric is drawn
next to the JSON (<output>_jct_mean.png, ...). Each run starts its prompts with a short tag line
of its own, so no run finds the previous run's prompts in a prefix cache (--no-run-tag to drop it)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server root (it serves /v1/completions)")
    p.add_argument("--workload", default="sonnet", choices=["sonnet", "shared-prefix", "chat", "trace"],
                   help="sonnet: independent prompts; shared-prefix: questions about shared documents; chat: "
                        "multi-turn conversations; trace: replay --trace")
    p.add_argument("--trace", default=None, help="JSONL trace for --workload trace: "
                   '{"timestamp": s, "prompt": text | "input_len": n, "output_len": m} per line (default: none)')
    p.add_argument("--input-len", type=int, default=512, help="prompt tokens (documents for shared-prefix, "
                   "each user message for chat)")
    p.add_argument("--input-std", type=float, default=None, help="standard deviation (default 5%% of the mean)")
    p.add_argument("--output-len", type=int, default=64, help="max_tokens of each request")
    p.add_argument("--output-std", type=float, default=None, help="standard deviation (default 5%% of the mean)")
    p.add_argument("--questions-per-doc", type=int, default=4, help="shared-prefix: requests per document")
    p.add_argument("--question-len", type=int, default=32, help="shared-prefix: tokens of each question")
    p.add_argument("--turns", type=int, default=3, help="chat: turns per conversation")
    p.add_argument("--num-requests", type=int, default=None, help="requests per run (default 50; a trace: all)")
    p.add_argument("--rate", "--rates", dest="rates", type=float, nargs="+", default=None, metavar="R",
                   help="Poisson arrival rate(s) in requests/s (chat: conversations/s); default inf = all at once")
    p.add_argument("--concurrency", type=int, default=None,
                   help="at most this many requests in flight (default: no limit)")
    p.add_argument("--strategy", "--strategies", dest="strategies", nargs="+", default=None, metavar="SPEC",
                   help="router strategies to switch to through POST /admin/strategy, e.g. "
                        "balanced_disagg:fraction=0.2@prefill,decode (default: none, the router's current one)")
    p.add_argument("--sweep", action="store_true", help="draw the plots even for a single point")
    p.add_argument("--admin-token", default=None,
                   help="the router's admin token, for --strategy (default: MICROSERVE_ADMIN_TOKEN, "
                        "else MICROSERVE_CLUSTER_TOKEN)")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY' on /v1 (default: none)")
    p.add_argument("--model", default=None, help="tokenizer source: GGUF file or HF folder (default: built-in model)")
    p.add_argument("--served-model-name", default=None, help="the model field (default: first of GET /v1/models)")
    p.add_argument("--seed", type=int, default=0, help="seed of the workload's prompts, lengths and arrivals")
    p.add_argument("--slo-ttft-ms", type=float, default=None,
                   help="goodput counts requests whose TTFT is at most this (default: no TTFT bound)")
    p.add_argument("--slo-tpot-ms", type=float, default=None,
                   help="goodput counts requests whose TPOT is at most this (default: no TPOT bound)")
    p.add_argument("--slo-jct-ms", type=float, default=None,
                   help="goodput counts requests whose JCT is at most this (default: no JCT bound)")
    p.add_argument("--output", default="bench.json", help="results JSON; plots go next to it")
    p.add_argument("--pause", type=float, default=3.0, help="seconds of idle between runs of a sweep")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before a request counts as failed")
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let the model stop at end-of-sequence (by default every answer is max_tokens long)")
    p.add_argument("--no-run-tag", dest="run_tag", action="store_false", help="no per-run tag line in the prompts")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on the terminal")


def parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _abbrev(key: str) -> str:
    return "".join(w[0] for w in key.split("_") if w)


def parse_strategy(spec: str) -> dict:
    """`name[:k=v[,k=v]][@role,role]` -> {name, params, roles, label}; the label reads e.g.
    'balanced_disagg f=0.1 1P1D'."""
    head, _, roles = spec.partition("@")
    name, _, params_text = head.partition(":")
    if not name:
        raise ValueError(f"strategy {spec!r} has no name")
    params = {}
    for item in filter(None, params_text.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"strategy {spec!r}: expected key=value, got {item!r}")
        params[key.strip()] = parse_value(value.strip())
    role_list = [r.strip() for r in roles.split(",")] if roles else None
    label = " ".join([name, *(f"{_abbrev(k)}={v}" for k, v in params.items())])
    if role_list:
        counts = {r: role_list.count(r) for r in ("prefill", "decode", "both")}
        label += " " + "".join(f"{n}{r[0].upper()}" for r, n in counts.items() if n)
    return {"name": name, "params": params, "roles": role_list, "label": label}


def run(args) -> None:
    from microserve.errors import UserError

    try:
        plan = _plan(args)
    except ValueError as e:
        raise UserError(str(e)) from None
    import asyncio

    import httpx

    try:
        asyncio.run(_run(args, plan))
    except (RuntimeError, ValueError) as e:  # the server refused a strategy, listed no model; a bad trace
        raise UserError(str(e)) from None
    except httpx.HTTPError as e:  # requests that fail are records; this is the set-up calls failing
        raise UserError(f"cannot talk to {args.url}: {type(e).__name__}: {e}") from None


def _plan(args) -> dict:
    trace = args.workload == "trace"
    if trace and args.rates:
        raise ValueError("a trace gives its own send times: leave out --rate")
    if args.workload == "trace" and not args.trace:
        raise ValueError("--workload trace needs --trace FILE.jsonl")
    rates = args.rates or [math.inf]
    if any(r <= 0 for r in rates):
        raise ValueError("rates must be > 0")
    if args.concurrency is not None and args.concurrency < 1:
        raise ValueError("--concurrency must be >= 1")
    strategies = [parse_strategy(s) for s in args.strategies] if args.strategies else [None]
    token = args.admin_token or os.environ.get("MICROSERVE_ADMIN_TOKEN") or os.environ.get("MICROSERVE_CLUSTER_TOKEN")
    if args.strategies and not token:
        raise ValueError("switching strategies needs --admin-token (or MICROSERVE_ADMIN_TOKEN)")
    slo = {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms, "jct_ms": args.slo_jct_ms}
    return {"rates": rates, "strategies": strategies, "token": token, "slo": {k: v for k, v in slo.items() if v}}


async def _admin(client, url: str, token: str, method: str, body: dict | None = None) -> dict:
    r = await client.request(method, url.rstrip("/") + "/admin/strategy", json=body,
                             headers={"Authorization": f"Bearer {token}"})
    if r.status_code != 200:
        raise RuntimeError(f"{method} /admin/strategy answered {r.status_code}: {r.text[:300]}")
    return r.json()


async def _run(args, plan: dict) -> None:
    import asyncio

    from microserve.bench import client as bench_client
    from microserve.bench import metrics, workloads
    from microserve.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    spec = workloads.WorkloadSpec(args.workload, args.num_requests, args.input_len, args.output_len, args.input_std,
                                  args.output_std, args.seed, args.trace, args.questions_per_doc, args.question_len,
                                  args.turns)
    ep = bench_client.Endpoint(args.url, args.served_model_name, args.api_key, args.ignore_eos, args.timeout)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k != "func" and not k.endswith("token")}
    config["started_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    nonce = random.SystemRandom().randrange(10_000)  # unique per invocation, so repeated benches do not share caches
    result = {"config": config, "points": []}
    sweeping = len(plan["strategies"]) * len(plan["rates"]) > 1
    async with bench_client.new_client(30) as admin:
        if ep.model is None:
            ep.model = await bench_client.served_model(admin, ep)
        config["served_model_name"] = ep.model
        original = await _admin(admin, args.url, plan["token"], "GET") if plan["strategies"][0] else None
        try:
            run_index = 0
            for strategy in plan["strategies"]:
                if strategy:
                    body = {"name": strategy["name"], "params": strategy["params"],
                            "roles": strategy["roles"] or original["roles"]}
                    await _admin(admin, args.url, plan["token"], "POST", body)
                for rate in plan["rates"]:
                    if run_index:
                        await asyncio.sleep(args.pause)  # let the engines drain and their status settle
                    tag = f"[{nonce:04d}{run_index:03d}]\n" if args.run_tag else ""
                    sessions = workloads.build(spec, tokenizer, tag=tag)
                    if args.workload == "trace":
                        arrivals = [s.arrival for s in sessions]
                        span = arrivals[-1]
                        rate = (len(sessions) - 1) / span if span > 0 else math.inf
                    else:
                        arrivals = workloads.arrival_times(len(sessions), rate, args.seed)
                    label = strategy["label"] if strategy else "server"
                    began = time.strftime("%H:%M:%S")
                    records = await bench_client.run_load(sessions, ep, arrivals, args.concurrency,
                                                          desc=f"{label} @ {rate:g}/s", progress=args.progress)
                    summary = metrics.summarize(records, plan["slo"])
                    point = {"label": label, "strategy": strategy, "rate": rate, "tag": tag.strip(), "began": began,
                             "summary": summary, "requests": records}
                    result["points"].append(point)
                    print(_line(point), flush=True)
                    out.write_text(json.dumps(_finite(result), indent=1))  # partial results survive
                    run_index += 1
        finally:
            if original:  # leave the router as the sweep found it
                await _admin(admin, args.url, plan["token"], "POST", {k: original[k] for k in ("name", "params", "roles")})
    print(f"results: {out}")
    finite = all(math.isfinite(p["rate"]) for p in result["points"])
    if (sweeping or args.sweep) and finite:
        from microserve.bench.plots import draw

        prefix = out.with_suffix("")
        title = f"{args.workload}, input {args.input_len} / output {args.output_len} tokens, {ep.model}"
        paths = draw(result["points"], prefix, title)
        print(f"plots: {prefix}_*.png ({len(paths)} files)")
    elif sweeping:
        print("plots skipped: a rate of inf has no place on a rate axis", file=sys.stderr)


def _finite(x):
    """JSON has no infinity: an unbounded rate is written as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def _fmt(x, digits=0) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _line(point: dict) -> str:
    s = point["summary"]
    return (f"{point['label']:>32} @ {point['rate']:g}/s: {s['completed']}/{s['requests']} ok  "
            f"JCT mean {_fmt(s['jct_ms']['mean'])} p99 {_fmt(s['jct_ms']['p99'])} ms  "
            f"TTFT mean {_fmt(s['ttft_ms']['mean'])} p99 {_fmt(s['ttft_ms']['p99'])} ms  "
            f"TPOT mean {_fmt(s['tpot_ms']['mean'], 1)} ms  {_fmt(s['request_throughput'], 2)} req/s  "
            f"goodput {_fmt(s['goodput'], 2)}")
