"""`microserve bench`: metric arithmetic on hand-computed cases, workload shapes, the load
driver against a fake server, and short real runs against `microserve serve` with a tiny model."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from server_utils import ServerProcess

from microserve.bench import client as bench_client
from microserve.bench import workloads
from microserve.bench.cli import parse_strategy
from microserve.bench.metrics import (
    distribution,
    meets_slo,
    percentile,
    request_metrics,
    summarize,
)

TOKEN = "bench-admin-token"

# ---------------------------------------------------------------- metrics


def test_request_metrics_from_chunk_times():
    # Sent at 10.0 s; chunks at 10.2, 10.25, 10.35, 10.4; response ends at 10.5.
    m = request_metrics(10.0, [10.2, 10.25, 10.35, 10.4], 10.5, output_tokens=4)
    assert m["ttft_ms"] == pytest.approx(200)  # 10.2 - 10.0
    assert m["tpot_ms"] == pytest.approx(200 / 3)  # (10.4 - 10.2) / (4 - 1)
    assert m["itl_ms"] == pytest.approx([50, 100, 50])
    assert m["jct_ms"] == pytest.approx(500)  # 10.5 - 10.0
    # Usage says 7 tokens came in those 4 chunks: TPOT spreads the same 200 ms over 6 gaps.
    assert request_metrics(10.0, [10.2, 10.25, 10.35, 10.4], 10.5, 7)["tpot_ms"] == pytest.approx(200 / 6)
    one = request_metrics(0.0, [0.3], 0.31, 1)
    assert one["tpot_ms"] is None and one["itl_ms"] == [] and one["ttft_ms"] == pytest.approx(300)
    assert request_metrics(0.0, [], 0.1, 0)["ttft_ms"] is None  # failed before any output


def test_percentiles_exact():
    xs = [5, 1, 4, 2, 3]  # sorted 1..5; rank = (n - 1) q / 100 = 4q / 100
    assert percentile(xs, 50) == 3  # rank 2
    assert percentile(xs, 90) == pytest.approx(4.6)  # rank 3.6: 4 + 0.6 (5 - 4)
    assert percentile(xs, 99) == pytest.approx(4.96)  # rank 3.96
    assert percentile([10, 20], 50) == 15 and percentile([10, 20], 90) == pytest.approx(19)
    assert percentile([10, 20], 99) == pytest.approx(19.9)
    assert percentile([7], 99) == 7
    d = distribution([1, 2, 3, 4, 10])
    assert d["mean"] == 4  # 20 / 5
    assert d["p50"] == 3 and d["p90"] == pytest.approx(7.6)  # rank 3.6: 4 + 0.6 (10 - 4)
    assert distribution([]) == {"mean": None, "p50": None, "p90": None, "p99": None}


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=40), st.sampled_from([0, 1, 50, 90, 99, 100]))
def test_percentile_matches_numpy(xs, q):
    assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-9, abs=1e-6)


def rec(start, ttft, tpot, jct, out, ok=True, error=None):
    return {"start_s": start, "ttft_ms": ttft, "tpot_ms": tpot, "itl_ms": [tpot] if tpot else [], "jct_ms": jct,
            "input_tokens": 100, "output_tokens": out, "ok": ok, "error": error}


def test_summary_throughput_and_goodput():
    records = [
        rec(0.0, 100, 20, 1000, 10),  # ends at 1.0 s
        rec(0.5, 300, 30, 1500, 20),  # ends at 2.0 s
        rec(1.0, 200, 50, 3000, 30),  # ends at 4.0 s: the last
        {"start_s": 1.5, "jct_ms": 500, "ok": False, "error": "HTTP 500: boom"},
        {"start_s": None, "ok": False, "error": "not sent: an earlier turn failed"},
    ]
    s = summarize(records, {"ttft_ms": 250, "tpot_ms": 40})
    assert s["duration_s"] == pytest.approx(4.0)  # first send 0.0 to last end 4.0
    assert (s["requests"], s["completed"], s["failed"]) == (5, 3, 2)
    assert s["errors"] == {"HTTP 500: boom": 1, "not sent: an earlier turn failed": 1}
    assert s["request_throughput"] == pytest.approx(0.75)  # 3 / 4
    assert s["output_throughput"] == pytest.approx(15)  # (10 + 20 + 30) / 4
    assert s["total_token_throughput"] == pytest.approx(90)  # (300 + 60) / 4
    # Only the first meets TTFT <= 250 and TPOT <= 40 (the second is slow to start, the third slow to decode).
    assert s["goodput"] == pytest.approx(0.25) and s["slo_attainment"] == pytest.approx(1 / 5)
    assert summarize(records, {"ttft_ms": 250})["goodput"] == pytest.approx(0.5)  # the first and third
    assert summarize(records, {"jct_ms": 1200, "ttft_ms": None})["goodput"] == pytest.approx(0.25)
    assert summarize(records)["goodput"] == pytest.approx(0.75)  # no SLO: every finished request counts
    assert s["jct_ms"]["mean"] == pytest.approx(5500 / 3) and s["jct_ms"]["p50"] == 1500
    assert s["ttft_ms"]["p90"] == pytest.approx(280)  # sorted 100, 200, 300: rank 1.8 -> 200 + 0.8 * 100
    assert not meets_slo({"ok": False, "ttft_ms": 1}, {})
    assert meets_slo({"ok": True, "ttft_ms": 100, "tpot_ms": None}, {"tpot_ms": 10})  # one-token answer


def test_strategy_specs():
    b = parse_strategy("balanced_disagg:fraction=0.1")
    assert b == {"name": "balanced_disagg", "params": {"fraction": 0.1}, "roles": None,
                 "label": "balanced_disagg f=0.1"}
    a = parse_strategy("adaptive:long_prompt=128,busy=2")
    assert a["params"] == {"long_prompt": 128, "busy": 2} and isinstance(a["params"]["busy"], int)
    assert a["label"] == "adaptive lp=128 b=2"
    d = parse_strategy("disagg@prefill,decode")
    assert d["roles"] == ["prefill", "decode"] and d["label"] == "disagg 1P1D"
    assert parse_strategy("round_robin")["label"] == "round_robin"
    with pytest.raises(ValueError):
        parse_strategy("disagg:fraction")


def test_report_merges_repeated_points_and_tabulates():
    from microserve.bench.report import merge, table

    def point(label, rate, jct):
        summary = summarize([rec(0.0, 100, 20, jct, 10)])
        return {"label": label, "rate": rate, "summary": summary}

    first = {"points": [point("round_robin", 1, 900), point("round_robin", 2, 1000), point("disagg", 1, 800)]}
    repeat = {"points": [point("round_robin", 1, 700)]}
    merged = merge([first, repeat])
    assert [(p["label"], p["rate"], p["summary"]["jct_ms"]["mean"]) for p in merged] == [
        ("round_robin", 1, 700), ("round_robin", 2, 1000), ("disagg", 1, 800)]
    rows = table(merged).splitlines()
    assert rows[0].startswith("| strategy | rate | JCT mean | JCT P99 |") and len(rows) == 5
    assert rows[2] == "| round_robin | 1 | 700 | 700 | 100 | 100 | 20 | 20 | 1.43 | 1.43 | 1/1 |"  # 1 / 0.7 s


# ---------------------------------------------------------------- workloads


def ids(tok, text):
    return tok(text, add_special_tokens=True).input_ids


def test_sonnet_prompts_have_the_sampled_token_lengths(smollm_tokenizer):
    spec = workloads.WorkloadSpec("sonnet", num_requests=12, input_len=300, input_std=30, output_len=40, seed=3)
    sessions = workloads.build(spec, smollm_tokenizer, tag="[0001]\n")
    assert len(sessions) == 12
    lens = [s.turns[0].input_len for s in sessions]
    assert [len(ids(smollm_tokenizer, s.turns[0].text)) for s in sessions] == lens
    assert len(set(lens)) > 3 and 200 < min(lens) and max(lens) < 400  # ~N(300, 30)
    assert all(s.turns[0].text.startswith("[0001]\n") for s in sessions)
    again = workloads.build(spec, smollm_tokenizer, tag="[0001]\n")
    assert [s.turns[0].text for s in again] == [s.turns[0].text for s in sessions]  # the seed decides
    other = workloads.build(workloads.WorkloadSpec("sonnet", 12, 300, 40, 30, seed=4), smollm_tokenizer)
    assert [s.turns[0].text for s in other] != [s.turns[0].text for s in sessions]
    # Another run's tag changes only the tag: the same lengths and the same text after it.
    retagged = workloads.build(spec, smollm_tokenizer, tag="[0002]\n")
    assert [s.turns[0].input_len for s in retagged] == lens
    assert [s.turns[0].text[7:] for s in retagged] == [s.turns[0].text[7:] for s in sessions]
    exact = workloads.build(workloads.WorkloadSpec("sonnet", 3, 64, 8, 0, 0), smollm_tokenizer)
    assert [len(ids(smollm_tokenizer, s.turns[0].text)) for s in exact] == [64, 64, 64]
    assert [s.turns[0].output_len for s in exact] == [8, 8, 8]


def test_shared_prefix_requests_share_their_document(smollm_tokenizer):
    spec = workloads.WorkloadSpec("shared-prefix", num_requests=10, input_len=200, output_len=8, seed=1,
                                  questions_per_doc=4, question_len=16)
    sessions = workloads.build(spec, smollm_tokenizer)
    assert len(sessions) == 10
    groups: dict[int, list] = {}
    for s in sessions:
        groups.setdefault(s.group, []).append(s)
    assert sorted(len(g) for g in groups.values()) == [2, 4, 4]  # 10 requests, 4 per document
    assert [s.group for s in sessions] != sorted(s.group for s in sessions)  # shuffled in time
    docs = []
    for g in groups.values():
        doc_len = g[0].meta["doc_len"]
        heads = {tuple(ids(smollm_tokenizer, s.turns[0].text)[:doc_len]) for s in g}
        assert len(heads) == 1  # one document, the same tokens, at the start of every question
        for s in g:
            assert len(ids(smollm_tokenizer, s.turns[0].text)) == s.turns[0].input_len == doc_len + 16
        assert len({s.turns[0].text for s in g}) == len(g)  # but different questions
        docs.append(heads.pop())
    assert len(set(docs)) == 3


def test_chat_turns_extend_the_previous_turn(smollm_tokenizer):
    spec = workloads.WorkloadSpec("chat", num_requests=7, input_len=40, output_len=5, seed=2, turns=3)
    sessions = workloads.build(spec, smollm_tokenizer, tag="[7]\n")
    assert [len(s.turns) for s in sessions] == [3, 3, 1]
    first, later = sessions[0].turns[0], sessions[0].turns[1]
    assert first.text.startswith("[7]\nUser: ") and first.text.endswith("\nAssistant:")
    assert later.text.startswith("\nUser: ") and later.text.endswith("\nAssistant:")
    assert len(ids(smollm_tokenizer, first.text)) == first.input_len

    # What the driver sends: each prompt = previous prompt + previous answer + the new message.
    sent = []

    async def handler(request: httpx.Request):
        body = json.loads(request.content)
        sent.append(body)
        answer = f" answer{len(sent)}"
        chunks = [{"choices": [{"index": 0, "text": answer, "finish_reason": None}]},
                  {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]},
                  {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": body["max_tokens"]}}]
        sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return httpx.Response(200, content=sse.encode(), headers={"content-type": "text/event-stream"})

    ep = bench_client.Endpoint("http://fake", model="m")
    real = bench_client.new_client
    bench_client.new_client = lambda timeout: httpx.AsyncClient(transport=httpx.MockTransport(handler))
    try:
        records = asyncio.run(bench_client.run_load(sessions[:1], ep, [0.0], progress=False))
    finally:
        bench_client.new_client = real
    t = sessions[0].turns
    assert [b["prompt"] for b in sent] == [t[0].text, t[0].text + " answer1" + t[1].text,
                                           t[0].text + " answer1" + t[1].text + " answer2" + t[2].text]
    assert all(b["stream"] and b["ignore_eos"] and b["temperature"] == 0 and b["stream_options"]["include_usage"]
               for b in sent)
    assert [r["turn"] for r in records] == [0, 1, 2] and all(r["ok"] for r in records)
    assert [r["output_tokens"] for r in records] == [t[0].output_len, t[1].output_len, t[2].output_len]


def test_trace_replay(tmp_path, smollm_tokenizer):
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"timestamp": 12.5, "prompt": "Hello there", "output_len": 3}\n\n'
                     '{"timestamp": 10.0, "input_len": 50, "output_len": 7}\n'
                     '{"timestamp": 11.0, "input_len": 20}\n')
    entries = workloads.read_trace(str(trace))
    assert [e["timestamp"] for e in entries] == [0.0, 1.0, 2.5]
    sessions = workloads.build(workloads.WorkloadSpec("trace", trace=str(trace), output_len=9), smollm_tokenizer)
    assert [s.arrival for s in sessions] == [0.0, 1.0, 2.5]
    assert [s.turns[0].output_len for s in sessions] == [7, 9, 3]  # 9: the default for a line without one
    assert [len(ids(smollm_tokenizer, s.turns[0].text)) for s in sessions[:2]] == [50, 20]
    assert sessions[2].turns[0].text == "Hello there"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 1, "input_len": 5}\n{"prompt": "no time"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        workloads.read_trace(str(bad))


def test_poisson_arrivals():
    assert workloads.arrival_times(4, float("inf"), 0) == [0.0] * 4
    one, two = workloads.arrival_times(2000, 1.0, 5), workloads.arrival_times(2000, 2.0, 5)
    assert one[0] == 0.0 and two == pytest.approx([t / 2 for t in one])  # the same pattern, twice as fast
    assert one[-1] / 1999 == pytest.approx(1.0, rel=0.1)  # mean gap 1 / rate
    assert workloads.arrival_times(50, 1.0, 6) != workloads.arrival_times(50, 1.0, 5)


# ---------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def served(tiny_llama):
    server = ServerProcess(["serve", "--engines", "2", "--model", tiny_llama, "--served-model-name", "tiny",
                            "--dtype", "float32", "--admin-token", TOKEN])
    yield server
    server.stop()


def bench(*args) -> int:
    from microserve.cli import main

    return main(["bench", "--no-progress", *args])


@pytest.mark.slow
def test_bench_run_against_a_served_model(served, tiny_llama, tmp_path):
    out = tmp_path / "run.json"
    assert bench("--url", served.url, "--model", tiny_llama, "--workload", "sonnet", "--input-len", "48",
                 "--output-len", "12", "--output-std", "0", "--rate", "50", "--num-requests", "8",
                 "--slo-ttft-ms", "60000", "--output", str(out)) == 0
    result = json.loads(out.read_text())
    assert result["config"]["served_model_name"] == "tiny" and len(result["points"]) == 1
    point = result["points"][0]
    s = point["summary"]
    assert (s["requests"], s["completed"], s["failed"]) == (8, 8, 0) and s["errors"] == {}
    assert s["goodput"] == pytest.approx(s["request_throughput"]) and s["output_throughput"] > 0
    for r in point["requests"]:
        assert r["ok"] and r["output_tokens"] == r["max_tokens"] == 12  # ignore_eos
        assert r["input_tokens"] == r["input_len"]  # the server counts what the workload built
        assert 0 < r["ttft_ms"] <= r["jct_ms"] and len(r["itl_ms"]) >= 1 and r["tpot_ms"] > 0
    assert s["ttft_ms"]["p50"] <= s["ttft_ms"]["p90"] <= s["ttft_ms"]["p99"]


@pytest.mark.slow
def test_failures_are_counted_not_raised(served, tiny_llama, tmp_path):
    out = tmp_path / "bad.json"
    assert bench("--url", served.url, "--model", tiny_llama, "--served-model-name", "no-such-model",
                 "--input-len", "20", "--output-len", "4", "--num-requests", "3", "--output", str(out)) == 0
    s = json.loads(out.read_text())["points"][0]["summary"]
    assert s["failed"] == 3 and s["completed"] == 0
    assert list(s["errors"].values()) == [3] and "HTTP 404" in next(iter(s["errors"]))


@pytest.mark.slow
def test_sweep_strategies_and_rates(served, tiny_llama, tmp_path):
    out = tmp_path / "sweep.json"
    assert bench("--url", served.url, "--model", tiny_llama, "--input-len", "40", "--output-len", "6",
                 "--num-requests", "5", "--rates", "20", "40", "--strategies", "round_robin",
                 "balanced_disagg:fraction=0.2@prefill,decode", "--admin-token", TOKEN, "--pause", "0.2",
                 "--output", str(out)) == 0
    points = json.loads(out.read_text())["points"]
    assert [(p["label"], p["rate"]) for p in points] == [
        ("round_robin", 20), ("round_robin", 40), ("balanced_disagg f=0.2 1P1D", 20),
        ("balanced_disagg f=0.2 1P1D", 40)]
    assert all(p["summary"]["completed"] == 5 for p in points)
    assert len({p["tag"] for p in points}) == 4  # every run its own prompts' tag
    for name in ("jct_mean", "jct_p99", "ttft_mean", "ttft_p99", "tpot_mean", "throughput", "goodput"):
        png = tmp_path / f"sweep_{name}.png"
        assert png.read_bytes()[:4] == b"\x89PNG"
    # The sweep leaves the router as it found it.
    got = httpx.get(served.url + "/admin/strategy", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert got["name"] == "round_robin" and got["roles"] == ["both", "both"]
