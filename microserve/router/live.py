"""What the router's dashboard shows: its engines page by page with aggregates by role, the
requests' TTFT / TPOT / JCT over the last minutes, and a bounded log of what happened
(engines joining, draining, going down and coming back; strategy swaps; fail-overs).

`LiveView` keeps the log and the timing windows; the Router feeds it, `GET /admin/live`
serves `snapshot()`, and the page (dashboard.html) polls that. Everything here is O(engines)
per snapshot and bounded in memory, so a fleet of a thousand engines costs little.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from microserve.api.microserving import GenerateChunk
from microserve.router.cluster import Cluster, Engine


@dataclass(frozen=True)
class LiveEvent:
    seq: int  # increases by one per event: the page tells new ones from old
    t: float  # clock time (seconds since the epoch with the default clock)
    kind: str  # joined | left | draining | down | up | strategy | failover
    text: str


@dataclass(frozen=True)
class RequestTiming:
    """One finished request: time to first token, time per output token after the first
    (None with a single token), job completion time; all in seconds."""

    ttft: float
    tpot: float | None
    jct: float
    tokens: int


class RequestTimer:
    """Times one request's stream as the router passes its chunks on."""

    def __init__(self, start: float, clock: Callable[[], float] = time.monotonic):
        self.start = start
        self.clock = clock
        self.first: float | None = None
        self.tokens = 0
        self.sequences = 1

    def chunk(self, chunk: GenerateChunk) -> None:
        if self.first is None:
            self.first = self.clock()
        for d in chunk.choices:
            self.tokens += len(d.token_ids)
            self.sequences = max(self.sequences, d.index + 1)

    def finish(self) -> RequestTiming | None:
        """The request's timing, or None if it produced no chunk."""
        if self.first is None:
            return None
        end = self.clock()
        per_sequence = self.tokens / self.sequences  # n > 1: the sequences decode side by side
        tpot = (end - self.first) / (per_sequence - 1) if per_sequence > 1 else None
        return RequestTiming(self.first - self.start, tpot, end - self.start, self.tokens)


@dataclass
class Percentiles:
    count: int = 0
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None

    @classmethod
    def of(cls, values: list[float]) -> "Percentiles":
        """Nearest-rank percentiles (each one a value that was observed)."""
        if not values:
            return cls()
        s = sorted(values)

        def rank(p: float) -> float:
            return s[max(0, math.ceil(p / 100 * len(s)) - 1)]

        return cls(len(s), rank(50), rank(90), rank(99))


@dataclass
class SeriesPoint:
    t: float  # start of the bin
    rps: float  # requests finished per second in the bin
    ttft_p50: float | None
    ttft_p90: float | None


@dataclass
class Latency:
    window_s: float
    requests: int  # finished within the window
    rate_rps: float  # finished per second over the last `rate_s`
    rate_s: float
    ttft: Percentiles
    tpot: Percentiles
    jct: Percentiles
    series: list[SeriesPoint] = field(default_factory=list)  # oldest first, the current partial bin left out


@dataclass
class EngineRow:
    id: int  # stable for a URL as long as this router runs
    url: str
    node: str | None
    role: str
    health: str  # up | down | draining
    load: int
    running: int
    waiting: int
    kv_used_blocks: int
    kv_free_blocks: int
    prefix_hit_rate: float
    reservations: int


@dataclass
class RoleSummary:
    role: str
    engines: int = 0
    up: int = 0
    running: int = 0
    waiting: int = 0
    kv_used_blocks: int = 0
    kv_free_blocks: int = 0
    prefix_queried_tokens: int = 0
    prefix_hit_tokens: int = 0
    reservations: int = 0
    prefix_hit_rate: float = 0.0  # hit tokens over queried tokens, across the role's engines

    def add(self, e: Engine, health: str) -> None:
        s = e.status
        self.engines += 1
        self.up += health == "up"
        self.running += s.running
        self.waiting += s.waiting
        self.kv_used_blocks += s.num_blocks - s.free_blocks
        self.kv_free_blocks += s.free_blocks
        self.prefix_queried_tokens += s.prefix_queried_tokens
        self.prefix_hit_tokens += s.prefix_hit_tokens
        self.reservations += s.reservations
        if self.prefix_queried_tokens:
            self.prefix_hit_rate = round(self.prefix_hit_tokens / self.prefix_queried_tokens, 4)


@dataclass
class RouterState:
    """What the Router adds to a snapshot."""

    strategy: str
    params: dict
    strategies: list[str]  # the built-in names the switcher offers
    active: int  # requests running on the engines
    queued: int  # waiting for admission


@dataclass
class LiveSnapshot:
    t: float
    router: RouterState
    engines_total: int
    engines_up: int
    matched: int  # engines that fit the filter
    page: int
    per_page: int
    pages: int
    engines: list[EngineRow]
    roles: list[RoleSummary]
    latency: Latency
    events: list[LiveEvent]  # newest first


@dataclass(frozen=True)
class _Cached:
    at: float
    value: Latency


def health_of(e: Engine) -> str:
    return "draining" if e.draining else "up" if e.healthy else "down"


def _listing(urls: list[str], most: int = 3) -> str:
    shown = ", ".join(urls[:most])
    return shown + (f" and {len(urls) - most} more" if len(urls) > most else "")


class LiveView:
    """The dashboard's memory: a bounded event log, the finished requests' timings over the
    last `window_s`, and what each engine looked like at the last `track()` (to tell changes)."""

    def __init__(self, cluster: Cluster, clock: Callable[[], float] = time.time, window_s: float = 300.0,
                 max_events: int = 500, max_timings: int = 100_000, bin_s: float = 5.0, rate_s: float = 10.0):
        self.cluster = cluster
        self.clock = clock
        self.window_s = window_s
        self.bin_s = bin_s
        self.rate_s = rate_s
        self.events: deque[LiveEvent] = deque(maxlen=max_events)
        self._timings: deque[tuple[float, RequestTiming]] = deque(maxlen=max_timings)
        self._seen: dict[str, tuple[str, str]] = {}  # url -> (health, role) at the last track()
        self._ids: dict[str, int] = {}
        self._seq = 0
        self._failovers: tuple[str, int, int] | None = None  # (from which engine, event seq, count)
        self._latency: _Cached | None = None

    # ------------------------------------------------------------ what happened

    def event(self, kind: str, text: str) -> LiveEvent:
        self._seq += 1
        ev = LiveEvent(self._seq, self.clock(), kind, text)
        self.events.append(ev)
        return ev

    def failover(self, request_id: str, failed: str | None, target: str) -> None:
        """A request continued on `target`. Fail-overs from the same engine within a few seconds
        become one event with a count, so an engine dying under 500 requests is one line."""
        source = failed or "an engine"
        last = self.events[-1] if self.events else None
        run = self._failovers
        if last is not None and run is not None and run[:2] == (source, last.seq) and self.clock() - last.t < 5:
            count = run[2] + 1
            self.events[-1] = LiveEvent(last.seq, self.clock(), "failover",
                                        f"{count} requests failed over from {source}; the last one to {target}")
            self._failovers = (source, last.seq, count)
            return
        ev = self.event("failover", f"request {request_id} failed over from {source}; continued on {target}")
        self._failovers = (source, ev.seq, 1)

    def track(self) -> None:
        """Compare the cluster with the last look: one event per kind of change (joined, left,
        draining, down, up), naming the engines, however many changed at once."""
        now = {e.url: (health_of(e), e.role) for e in self.cluster.engines + self.cluster.draining}
        changes: dict[str, list[str]] = {}
        for url, (health, role) in now.items():
            before = self._seen.get(url)
            if before is None:
                self._ids.setdefault(url, len(self._ids))
                changes.setdefault(f"joined as {role}" + ("" if health == "up" else f" ({health})"), []).append(url)
            elif before[0] != health:
                changes.setdefault(health, []).append(url)
            elif before[1] != role:
                changes.setdefault(f"role {role}", []).append(url)
        gone = [u for u in self._seen if u not in now]
        if gone:
            changes["left"] = gone
        self._seen = now
        for what, urls in changes.items():
            self._note_change(what, urls)

    def _note_change(self, what: str, urls: list[str]) -> None:
        kind = what.split(" ")[0]
        verb = {"joined": what, "left": "left the router", "draining": "draining (no new requests)",
                "down": "down (status stream lost)", "up": "up again", "role": f"now {what[5:]}"}[kind]
        subject = urls[0] if len(urls) == 1 else f"{len(urls)} engines ({_listing(urls)})"
        self.event(kind, f"{subject} {verb}")

    async def run(self, every_s: float = 0.5) -> None:
        """track() until cancelled (the Router runs this beside its status streams)."""
        while True:
            self.track()
            await asyncio.sleep(every_s)

    # ------------------------------------------------------------ request timings

    def observe(self, timing: RequestTiming) -> None:
        self._timings.append((self.clock(), timing))

    def latency(self) -> Latency:
        """Percentiles and the series over the window; computed at most once a second, however
        many pages poll (sorting 100k timings takes a few ms)."""
        now = self.clock()
        if self._latency is not None and 0 <= now - self._latency.at < 1.0:
            return self._latency.value
        self._latency = _Cached(now, self._compute_latency(now))
        return self._latency.value

    def _compute_latency(self, now: float) -> Latency:
        while self._timings and self._timings[0][0] < now - self.window_s:
            self._timings.popleft()
        timings = [t for _, t in self._timings]
        recent = sum(1 for t, _ in self._timings if t >= now - self.rate_s)
        return Latency(self.window_s, len(timings), round(recent / self.rate_s, 3), self.rate_s,
                       Percentiles.of([t.ttft for t in timings]),
                       Percentiles.of([t.tpot for t in timings if t.tpot is not None]),
                       Percentiles.of([t.jct for t in timings]), self._series(now))

    def _series(self, now: float) -> list[SeriesPoint]:
        """Requests per second and TTFT per `bin_s` bin, over the window, on bins aligned to the clock."""
        current = math.floor(now / self.bin_s)
        bins: dict[int, list[float]] = {b: [] for b in range(current - int(self.window_s / self.bin_s), current)}
        for t, timing in self._timings:
            b = math.floor(t / self.bin_s)
            if b in bins:
                bins[b].append(timing.ttft)
        out = []
        for b, ttfts in bins.items():
            p = Percentiles.of(ttfts)
            out.append(SeriesPoint(b * self.bin_s, round(len(ttfts) / self.bin_s, 3), p.p50, p.p90))
        return out

    # ------------------------------------------------------------ the snapshot

    def snapshot(self, router: RouterState, page: int = 1, per_page: int = 50, query: str = "",
                 events: int = 100) -> LiveSnapshot:
        """One page of engines (those whose id, URL, node, role or health contain `query`),
        aggregates by role over all of them, latency, and the newest `events`."""
        self.track()
        engines = self.cluster.engines + self.cluster.draining
        rows = [self._row(e) for e in engines]
        q = query.strip().lower()
        if q:
            rows = [r for r in rows if q in f"e{r.id} {r.url} {r.node or ''} {r.role} {r.health}".lower()]
        rows.sort(key=lambda r: r.id)
        per_page = max(1, min(per_page, 500))
        pages = max(1, -(-len(rows) // per_page))
        page = max(1, min(page, pages))
        return LiveSnapshot(self.clock(), router, len(engines), sum(health_of(e) == "up" for e in engines),
                            len(rows), page, per_page, pages, rows[(page - 1) * per_page: page * per_page],
                            self._roles(engines), self.latency(), list(self.events)[::-1][:events])

    def _row(self, e: Engine) -> EngineRow:
        s = e.status
        return EngineRow(self._ids.setdefault(e.url, len(self._ids)), e.url, e.node, e.role, health_of(e), e.load,
                         s.running, s.waiting, s.num_blocks - s.free_blocks, s.free_blocks,
                         round(s.prefix_hit_rate, 4), s.reservations)

    @staticmethod
    def _roles(engines: list[Engine]) -> list[RoleSummary]:
        by_role: dict[str, RoleSummary] = {}
        for e in engines:
            by_role.setdefault(e.role, RoleSummary(e.role)).add(e, health_of(e))
        return [by_role[r] for r in ("both", "prefill", "decode") if r in by_role]
