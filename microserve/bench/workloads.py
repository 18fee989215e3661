"""Workloads: the prompts to send, their lengths and (for traces) their send times.

Lengths are counted in the served model's tokens, the way the server counts them
(`tokenizer(text).input_ids`, special tokens included), so `--input-len 512` means the
server sees 512 prompt tokens."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

CORPUS = Path(__file__).parent / "data" / "sonnets.txt"
WORKLOADS = ("sonnet", "shared-prefix", "chat", "trace")


@dataclass
class Turn:
    """One request. For a chat turn after the first, `text` is what the user adds after the
    previous answer, and the prompt is only known once that answer has arrived."""

    text: str
    input_len: int  # tokens of `text`
    output_len: int


@dataclass
class Session:
    """Requests sent one after another, each once the previous one has finished: a chat.
    Every other workload has one turn per session."""

    turns: list[Turn]
    group: int = 0  # the document (shared-prefix) or conversation (chat) it belongs to
    arrival: float | None = None  # seconds after the start, from a trace; otherwise drawn from the rate
    extends: bool = False  # later turns are prompt + answer + text (chat)
    meta: dict = field(default_factory=dict)


@dataclass
class WorkloadSpec:
    name: str
    num_requests: int | None = None  # None: 50, or every line of a trace
    input_len: int = 512
    output_len: int = 64
    input_std: float | None = None  # None: 5% of the mean
    output_std: float | None = None
    seed: int = 0
    trace: str | None = None
    questions_per_doc: int = 4
    question_len: int = 32
    turns: int = 3


class Prompter:
    """Text of an exact token count, made of corpus lines drawn at random (LLMPerf-style)."""

    def __init__(self, tokenizer, rng: random.Random, lines: list[str] | None = None):
        self.tok = tokenizer
        self.rng = rng
        self.lines = lines if lines is not None else [s for s in CORPUS.read_text().splitlines() if s.strip()]
        self._line_len: dict[str, int] = {}

    def count(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=True).input_ids)

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def text(self, n: int, prefix: str = "", suffix: str = "") -> str:
        """prefix + corpus lines + suffix, exactly n tokens in all."""
        fixed = self.count(prefix + suffix)
        if n < fixed:
            raise ValueError(f"{n} tokens is too short: the fixed parts alone take {fixed}")
        if n == fixed:
            return prefix + suffix
        body, have = "", 0
        while have < n - fixed + 16:  # a little spare to trim back
            line = self.rng.choice(self.lines)
            if line not in self._line_len:
                self._line_len[line] = len(self._ids(line + "\n"))
            body += line + "\n"
            have += self._line_len[line]
        ids = self._ids(body)
        # Cut the body by tokens; decoding and re-encoding can merge across the cut or the
        # joins, so look for the nearest cut that gives exactly n.
        want = n - fixed
        for d in sorted(range(-16, 17), key=abs):
            k = want + d
            if 0 < k <= len(ids):
                candidate = prefix + self.tok.decode(ids[:k], clean_up_tokenization_spaces=False) + suffix
                if self.count(candidate) == n:
                    return candidate
        raise ValueError(f"cannot build a prompt of exactly {n} tokens with this tokenizer")


def sample_len(rng: random.Random, mean: int, std: float | None, low: int = 1) -> int:
    std = 0.05 * mean if std is None else std
    return max(low, round(rng.gauss(mean, std)) if std > 0 else mean)


def build(spec: WorkloadSpec, tokenizer, tag: str = "") -> list[Session]:
    """The sessions of a workload. The same spec and seed give the same sessions; `tag` goes
    at the start of every prompt (a run's own tag keeps the server's prefix cache from
    carrying one run's prompts into the next without changing anything else)."""
    if spec.name not in WORKLOADS:
        raise ValueError(f"unknown workload {spec.name!r} (one of {', '.join(WORKLOADS)})")
    rng = random.Random(spec.seed)
    prompter = Prompter(tokenizer, rng)
    return {"sonnet": _sonnet, "shared-prefix": _shared_prefix, "chat": _chat, "trace": _trace}[spec.name](
        spec, prompter, rng, tag)


def _sonnet(spec: WorkloadSpec, p: Prompter, rng: random.Random, tag: str) -> list[Session]:
    low = p.count(tag) + 1
    sessions = []
    for i in range(spec.num_requests or 50):
        n = sample_len(rng, spec.input_len, spec.input_std, low)
        sessions.append(Session([Turn(p.text(n, prefix=tag), n, sample_len(rng, spec.output_len, spec.output_std))],
                                group=i))
    return sessions


QUESTION = "\n\nQuestion: "


def _shared_prefix(spec: WorkloadSpec, p: Prompter, rng: random.Random, tag: str) -> list[Session]:
    """Long documents, each asked several questions in separate requests (LooGLE-like). The
    requests of all documents arrive shuffled, so a document's questions are spread out in time."""
    total = spec.num_requests or 50
    q = spec.questions_per_doc
    low = p.count(tag) + 1
    sessions = []
    for d in range(math.ceil(total / q)):
        doc_len = sample_len(rng, spec.input_len, spec.input_std, low)
        for _ in range(20):
            doc = p.text(doc_len, prefix=tag)
            # The document's tokens must be a token prefix of every question's prompt, or no
            # prefix cache could share them; a cut right before the separator can merge with it.
            probe = p.tok(doc + QUESTION, add_special_tokens=True).input_ids
            if probe[:doc_len] == p.tok(doc, add_special_tokens=True).input_ids:
                break
        else:
            raise ValueError("cannot build a document whose tokens survive the question separator")
        for j in range(min(q, total - d * q)):
            n = doc_len + sample_len(rng, spec.question_len, 0, p.count(QUESTION) + 1)
            sessions.append(Session([Turn(p.text(n, prefix=doc + QUESTION), n,
                                          sample_len(rng, spec.output_len, spec.output_std))],
                                    group=d, meta={"doc_len": doc_len, "question": j}))
    rng.shuffle(sessions)
    return sessions


def _chat(spec: WorkloadSpec, p: Prompter, rng: random.Random, tag: str) -> list[Session]:
    """Conversations of `turns` turns: each turn's prompt is the previous prompt, the previous
    answer and the new user message, sent once the previous answer is complete."""
    total = spec.num_requests or 50
    sessions = []
    for c in range(math.ceil(total / spec.turns)):
        turns = []
        for t in range(min(spec.turns, total - c * spec.turns)):
            head = (tag + "User: ") if t == 0 else "\nUser: "
            low = p.count(head + "\nAssistant:") + 1
            n = sample_len(rng, spec.input_len, spec.input_std, low)
            turns.append(Turn(p.text(n, prefix=head, suffix="\nAssistant:"), n,
                              sample_len(rng, spec.output_len, spec.output_std)))
        sessions.append(Session(turns, group=c, extends=True))
    return sessions


def _trace(spec: WorkloadSpec, p: Prompter, rng: random.Random, tag: str) -> list[Session]:
    if not spec.trace:
        raise ValueError("the trace workload needs --trace FILE.jsonl")
    entries = read_trace(spec.trace)
    if spec.num_requests:
        entries = entries[:spec.num_requests]
    sessions = []
    for i, e in enumerate(entries):
        if "prompt" in e:
            text = tag + str(e["prompt"])
            n = p.count(text)
        else:
            n = max(int(e["input_len"]), p.count(tag) + 1)
            text = p.text(n, prefix=tag)
        out = int(e.get("output_len", spec.output_len))
        sessions.append(Session([Turn(text, n, out)], group=i, arrival=e["timestamp"]))
    return sessions


def read_trace(path: str) -> list[dict]:
    """JSON lines of {"timestamp": s, "prompt": text | "input_len": n, "output_len": m}, sorted
    by timestamp and shifted so the first is at 0."""
    entries = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                e = json.loads(line)
                e["timestamp"] = float(e["timestamp"])
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{lineno}: expected JSON with a numeric \"timestamp\" ({err})") from None
            if "prompt" not in e and "input_len" not in e:
                raise ValueError(f"{path}:{lineno}: give \"prompt\" or \"input_len\"")
            entries.append(e)
    if not entries:
        raise ValueError(f"{path}: the trace is empty")
    entries.sort(key=lambda e: e["timestamp"])
    t0 = entries[0]["timestamp"]
    for e in entries:
        e["timestamp"] -= t0
    return entries


def arrival_times(n: int, rate: float, seed: int) -> list[float]:
    """Poisson arrivals at `rate` per second, the first at 0. The same unit draws are scaled by
    1/rate, so every rate sees the same pattern, only faster or slower."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed + 7919)  # its own stream: the prompts do not change it
    t, times = 0.0, []
    for i in range(n):
        if i:
            t += rng.expovariate(1.0) / rate
        times.append(t)
    return times
