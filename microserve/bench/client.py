"""The load driver: sends a workload to an OpenAI-compatible `/v1/completions` endpoint as
streaming requests, open loop (each session starts at its arrival time whether or not earlier
ones have finished), and times every output chunk."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass

import httpx

from microserve.bench.metrics import request_metrics
from microserve.bench.workloads import Session


@dataclass
class Endpoint:
    url: str  # the server root, e.g. http://127.0.0.1:8000
    model: str | None = None  # None: the first entry of GET /v1/models
    api_key: str | None = None
    ignore_eos: bool = True
    timeout: float = 600.0

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def new_client(timeout: float) -> httpx.AsyncClient:
    # No connection limit: an open-loop driver must never queue requests on its own side.
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10),
                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))


async def served_model(client: httpx.AsyncClient, ep: Endpoint) -> str:
    r = await client.get(ep.url.rstrip("/") + "/v1/models", headers=ep.headers)
    r.raise_for_status()
    data = r.json().get("data") or []
    if not data:
        raise RuntimeError(f"{ep.url}/v1/models lists no model")
    return data[0]["id"]


def _error_text(status: int, body: bytes) -> str:
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body.decode(errors="replace").strip()[:200]
    return f"HTTP {status}: {message}"


async def complete(client: httpx.AsyncClient, ep: Endpoint, prompt: str, max_tokens: int) -> dict:
    """One streaming completion: send time, the arrival time of each output chunk, end time,
    usage (if the server sends it), the text, and an error message if it failed."""
    body = {"model": ep.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if ep.ignore_eos:
        body["ignore_eos"] = True
    times: list[float] = []
    parts: list[str] = []
    usage, error, done = None, None, False
    send = time.perf_counter()
    try:
        async with client.stream("POST", ep.url.rstrip("/") + "/v1/completions", json=body,
                                 headers=ep.headers) as r:
            if r.status_code != 200:
                error = _error_text(r.status_code, await r.aread())
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    now = time.perf_counter()
                    chunk = json.loads(data)
                    if "error" in chunk:  # an error reported inside a stream that had started
                        error = f"stream error: {chunk['error'].get('message', chunk['error'])}"
                        break
                    usage = chunk.get("usage") or usage
                    choices = chunk.get("choices") or []
                    if not choices:
                        continue
                    text = "".join(c.get("text") or "" for c in choices)
                    finished = any(c.get("finish_reason") for c in choices)
                    # A finish-only chunk carries no token; a chunk with empty text and no finish
                    # does (part of a multi-byte character).
                    if text or not finished:
                        times.append(now)
                    parts.append(text)
                    done = done or finished
                if error is None and not done:
                    error = "the stream ended before the response was complete"
    except (httpx.HTTPError, ValueError) as e:  # connection refused or dropped, timeout, bad JSON
        error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return {"send": send, "token_times": times, "end": time.perf_counter(), "usage": usage,
            "text": "".join(parts), "error": error}


def _record(raw: dict, t0: float, session: int, turn: int, input_len: int, max_tokens: int) -> dict:
    usage = raw["usage"] or {}
    out = usage.get("completion_tokens", len(raw["token_times"]))
    rec = {"session": session, "turn": turn, "start_s": raw["send"] - t0, "ok": raw["error"] is None,
           "error": raw["error"], "input_len": input_len, "input_tokens": usage.get("prompt_tokens", input_len),
           "max_tokens": max_tokens, "output_tokens": out}
    rec.update(request_metrics(raw["send"], raw["token_times"], raw["end"], out))
    return rec


async def run_load(sessions: list[Session], ep: Endpoint, arrivals: list[float], concurrency: int | None = None,
                   desc: str = "", progress: bool = True) -> list[dict]:
    """Start session i at arrivals[i] seconds (at most `concurrency` requests in flight, if
    given); return one record per request, in the order they finished."""
    from tqdm import tqdm

    records: list[dict] = []
    limit = asyncio.Semaphore(concurrency) if concurrency else contextlib.nullcontext()
    total = sum(len(s.turns) for s in sessions)
    async with new_client(ep.timeout) as client:
        if ep.model is None:
            ep.model = await served_model(client, ep)
        with tqdm(total=total, desc=desc, unit="req", disable=not progress, leave=False) as bar:
            t0 = time.perf_counter()

            async def run_session(i: int, s: Session) -> None:
                prompt = ""
                for t, turn in enumerate(s.turns):
                    prompt = prompt + turn.text if s.extends else turn.text
                    async with limit:
                        raw = await complete(client, ep, prompt, turn.output_len)
                    rec = _record(raw, t0, i, t, turn.input_len if t == 0 or not s.extends else None,
                                  turn.output_len)
                    records.append(rec)
                    bar.update(1)
                    if not rec["ok"]:  # a conversation cannot go on without its answer
                        for t2, rest in enumerate(s.turns[t + 1:], t + 1):
                            records.append({"session": i, "turn": t2, "start_s": None, "ok": False,
                                            "error": "not sent: an earlier turn failed", "input_len": None,
                                            "max_tokens": rest.output_len})
                            bar.update(1)
                        return
                    prompt += raw["text"]

            tasks = []
            for i, (s, at) in enumerate(zip(sessions, arrivals)):
                delay = t0 + at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(run_session(i, s)))
            await asyncio.gather(*tasks)
    return records
