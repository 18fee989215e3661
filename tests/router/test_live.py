"""The dashboard's LiveView in-process: event log, timing windows, pagination, aggregates."""

from __future__ import annotations

import asyncio

from microserve.api.microserving import EngineStatus, GenerateChunk
from microserve.api.render import Delta
from microserve.router.cluster import Cluster
from microserve.router.live import LiveView, Percentiles, RequestTimer, RequestTiming, RouterState

STATE = RouterState("round_robin", {}, ["round_robin", "least_loaded"], active=3, queued=1)


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def fleet(n: int, roles: list[str] | None = None) -> Cluster:
    cluster = Cluster([f"http://10.0.0.{i // 250}:{8000 + i}" for i in range(n)], roles)
    for i, e in enumerate(cluster.engines):
        e.status = EngineStatus(running=i % 3, waiting=i % 2, num_blocks=100, free_blocks=100 - i % 10,
                                prefix_queried_tokens=100, prefix_hit_tokens=i % 5 * 10,
                                prefix_hit_rate=i % 5 / 10, reservations=i % 4)
        e.healthy = True
    return cluster


def timing(ttft: float, jct: float = 1.0, tpot: float | None = 0.01) -> RequestTiming:
    return RequestTiming(ttft, tpot, jct, 10)


def test_percentiles_are_nearest_rank():
    p = Percentiles.of([float(v) for v in range(100, 0, -1)])  # 1..100, unsorted
    assert (p.count, p.p50, p.p90, p.p99) == (100, 50.0, 90.0, 99.0)
    assert Percentiles.of([]) == Percentiles()
    assert Percentiles.of([0.5]).p99 == 0.5


def test_latency_covers_only_the_window():
    clock = Clock()
    live = LiveView(fleet(1), clock=clock, window_s=60, rate_s=10, bin_s=5)
    for i in range(50):  # old requests: slow
        live.observe(timing(ttft=10.0))
    clock.t += 61
    for i in range(1, 101):  # recent ones: TTFT 1..100 ms
        clock.t += 0.1
        live.observe(timing(ttft=i / 1000, jct=i / 100, tpot=None if i % 2 else 0.02))
    lat = live.latency()
    assert lat.requests == 100
    assert (lat.ttft.p50, lat.ttft.p90, lat.ttft.p99) == (0.05, 0.09, 0.099)
    assert lat.jct.p99 == 0.99
    assert lat.tpot.count == 50 and lat.tpot.p50 == 0.02  # single-token requests have no TPOT
    assert lat.rate_rps == 10.0  # 100 within the last 10 s
    clock.t += 61
    assert live.latency().requests == 0 and live.latency().ttft.p50 is None


def test_series_bins_requests_per_second_and_ttft():
    clock = Clock(1000.0)
    live = LiveView(fleet(1), clock=clock, window_s=60, bin_s=5)
    for k in range(10):  # 10 requests in the bin [1000, 1005)
        clock.t = 1000 + k * 0.4
        live.observe(timing(ttft=0.1 * (k + 1)))
    clock.t = 1012.0  # bins 1000 and 1005 are complete; 1010 is the current one, left out
    series = live.latency().series
    assert len(series) == 12 and series[-1].t == 1005.0
    full = next(p for p in series if p.t == 1000.0)
    assert full.rps == 2.0 and full.ttft_p50 == 0.5 and full.ttft_p90 == 0.9
    assert series[-1].rps == 0 and series[-1].ttft_p50 is None


def test_request_timer_measures_ttft_tpot_jct():
    clock = Clock(10.0)
    timer = RequestTimer(start=10.0, clock=clock)
    assert timer.finish() is None  # nothing came back
    clock.t = 10.5
    timer.chunk(GenerateChunk([Delta(0, "a", [1]), Delta(1, "b", [2])]))  # n = 2
    clock.t = 11.0
    timer.chunk(GenerateChunk([Delta(0, "cd", [3, 4]), Delta(1, "ef", [5, 6])]))
    t = timer.finish()
    assert (t.ttft, t.jct, t.tokens) == (0.5, 1.0, 6)
    assert abs(t.tpot - 0.25) < 1e-9  # 3 tokens per sequence: 2 after the first, in 0.5 s


def test_event_log_is_bounded_and_newest_first():
    live = LiveView(fleet(2), clock=Clock(), max_events=10)
    live.track()  # the engines joining: the first event, pushed out below
    for i in range(25):
        live.event("strategy", f"swap {i}")
    assert len(live.events) == 10
    events = live.snapshot(STATE, events=5).events
    assert [e.text for e in events][:2] == ["swap 24", "swap 23"]
    assert events[0].seq > events[1].seq


def test_track_notes_joins_drains_health_flips_and_departures():
    cluster = fleet(3, ["prefill", "decode", "decode"])
    live = LiveView(cluster, clock=Clock())
    live.track()
    assert [(e.kind, e.text) for e in live.events] == [
        ("joined", "http://10.0.0.0:8000 joined as prefill"),
        ("joined", "2 engines (http://10.0.0.0:8001, http://10.0.0.0:8002) joined as decode")]
    live.track()
    assert len(live.events) == 2  # nothing changed
    a, b, c = cluster.engines
    b.healthy = False
    c.draining = True
    cluster.engines.remove(c)
    cluster.draining.append(c)
    live.track()
    assert [(e.kind, e.text) for e in list(live.events)[2:]] == [
        ("down", "http://10.0.0.0:8001 down (status stream lost)"),
        ("draining", "http://10.0.0.0:8002 draining (no new requests)")]
    b.healthy = True
    cluster.draining.remove(c)
    a.role = "both"
    live.track()
    assert [(e.kind, e.text) for e in list(live.events)[4:]] == [
        ("role", "http://10.0.0.0:8000 now both"), ("up", "http://10.0.0.0:8001 up again"),
        ("left", "http://10.0.0.0:8002 left the router")]


def test_many_engines_changing_at_once_are_one_event():
    cluster = fleet(600)
    live = LiveView(cluster, clock=Clock(), max_events=50)
    live.track()
    assert len(live.events) == 1
    assert live.events[0].text.startswith("600 engines (http://10.0.0.0:8000, http://10.0.0.0:8001, "
                                          "http://10.0.0.0:8002 and 597 more) joined as both")
    for e in cluster.engines[:400]:
        e.healthy = False
    live.track()
    assert len(live.events) == 2 and live.events[-1].text.startswith("400 engines")


def test_failovers_from_one_engine_are_counted_in_one_event():
    clock = Clock()
    live = LiveView(fleet(1), clock=clock)
    live.failover("r-1", "http://a", "http://b")
    for i in range(2, 6):
        clock.t += 1
        live.failover(f"r-{i}", "http://a", "http://c")
    assert len(live.events) == 1
    assert live.events[0].text == "5 requests failed over from http://a; the last one to http://c"
    live.failover("r-9", "http://z", "http://b")
    clock.t += 10
    live.failover("r-10", "http://z", "http://b")  # long after: a new event
    assert [e.text.split(" failed")[0] for e in live.events] == ["5 requests", "request r-9", "request r-10"]


def test_snapshot_pages_engines_and_aggregates_all_of_them():
    cluster = fleet(1000, ["prefill"] * 250 + ["decode"] * 750)
    cluster.engines[7].healthy = False
    live = LiveView(cluster, clock=Clock())
    snap = live.snapshot(STATE, page=3, per_page=50)
    assert (snap.engines_total, snap.engines_up, snap.matched, snap.pages, snap.page) == (1000, 999, 1000, 20, 3)
    assert [r.id for r in snap.engines] == list(range(100, 150))
    row = snap.engines[0]
    assert (row.url, row.role, row.health, row.running, row.kv_used_blocks, row.kv_free_blocks) == \
        ("http://10.0.0.0:8100", "prefill", "up", 100 % 3, 0, 100)
    prefill, decode = snap.roles
    assert (prefill.role, prefill.engines, prefill.up, decode.engines, decode.up) == ("prefill", 250, 249, 750, 750)
    assert prefill.running == sum(i % 3 for i in range(250))
    assert decode.kv_used_blocks == sum(i % 10 for i in range(250, 1000))
    assert prefill.prefix_hit_rate == round(sum(i % 5 * 10 for i in range(250)) / (250 * 100), 4)
    assert snap.router.active == 3 and snap.router.strategies == ["round_robin", "least_loaded"]
    assert live.snapshot(STATE, page=99, per_page=50).page == 20  # past the end: the last page


def test_snapshot_filters_by_url_role_or_health():
    cluster = fleet(120, ["prefill"] * 20 + ["decode"] * 100)
    cluster.engines[5].healthy = False
    live = LiveView(cluster, clock=Clock())
    assert live.snapshot(STATE, query="prefill").matched == 20
    down = live.snapshot(STATE, query="DOWN")
    assert down.matched == 1 and down.engines[0].url == "http://10.0.0.0:8005"
    assert live.snapshot(STATE, query=":8119").engines[0].id == 119
    empty = live.snapshot(STATE, query="nothing like this")
    assert (empty.matched, empty.pages, empty.engines) == (0, 1, [])


def test_router_feeds_the_live_view():
    """Strategy swaps and fail-overs reach the log through the Router, without engines."""
    from microserve.router.cluster import EngineDown
    from microserve.router.router import Router

    cluster = fleet(2)
    router = Router(cluster, strategy="round_robin")
    router.set_strategy("least_loaded", None, {}, None)
    router.set_strategy("least_loaded", None, {}, None)  # the same again: no event
    a, b = cluster.engines
    router._failed_over("r-1", EngineDown(a, "gone"), b)
    texts = [e.text for e in router.live.events]
    assert texts == ["strategy round_robin -> least_loaded",
                     f"request r-1 failed over from {a.url}; continued on {b.url}"]
    snap = router.live_snapshot(per_page=1)
    assert snap.router.strategy == "least_loaded" and snap.pages == 2 and len(snap.engines) == 1
    assert router.metrics.failovers._value.get() == 1
    asyncio.run(cluster.stop())


def test_serve_banner_links_the_dashboard_with_the_token():
    from microserve.launch.local import _banner

    text = _banner("http://127.0.0.1:8000", "m", "2 engines", "round_robin", "tok-123", "none")
    assert "http://127.0.0.1:8000/dashboard?token=tok-123" in text
