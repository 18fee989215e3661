"""The strategies and the Router in process, against a fake cluster: which engine gets which
sub-request call. No processes, no model: milliseconds per test."""

from __future__ import annotations

import asyncio

import pytest

from microserve.api.microserving import GenerateChunk
from microserve.api.render import Delta
from microserve.router import strategies
from microserve.router.cluster import Cluster, EngineDown, EngineError
from microserve.router.router import Router


class FakeEngine:
    """An engine as a strategy sees it: load, role, cached prefix, and the five calls, logged."""

    def __init__(self, name: str, role: str = "both", load: int = 0, cached: int = 0, fail_send: Exception | None = None):
        self.url = f"fake://{name}"
        self.name = name
        self.role = role
        self.load = load
        self.kv_free = 1.0
        self.healthy = True
        self.cached = cached  # leading prompt tokens in its prefix cache
        self.prefilling = 0
        self.fail_send = fail_send
        self.log: list[tuple] = []

    def __repr__(self) -> str:
        return self.name

    async def prep_recv(self, request_id, prompt, end, lease_s=60):
        self.log.append(("prep_recv", end))
        matched = min(self.cached, end)
        return {"kv_addr_info": {"on": self.name}, "prefix_matched_length": matched, "prompt_length": len(prompt)}

    async def remote_send(self, request_id, prompt, begin, end, kv_addr_info):
        self.log.append(("remote_send", begin, end, kv_addr_info["on"]))
        if self.fail_send is not None:
            raise self.fail_send
        return {"tokens": end - begin}

    async def start_generate(self, request_id, prompt, begin, sampling):
        self.log.append(("start_generate", begin))
        for i, finish in enumerate([None, "length"]):
            await asyncio.sleep(0)
            yield GenerateChunk([Delta(0, f"{self.name}{i} ", [i], None, finish)])

    async def abort(self, request_id):
        self.log.append(("abort",))


class FakeCluster(Cluster):
    """The real Cluster's choices (healthy, roles, round robin, least loaded) over fake engines;
    the prefix index is each fake's `cached`."""

    def __init__(self, *engines: FakeEngine):
        super().__init__([])
        self.engines = list(engines)

    def cached_tokens(self, prompt):
        return {e: min(e.cached, len(prompt)) for e in self.engines}


def run(strategy, cluster, prompt_len: int = 100, **params) -> str:
    req = strategies.RoutedRequest("r-1", list(range(prompt_len)), {"max_tokens": 2})

    async def go():
        return "".join([c.choices[0].text async for c in strategy(req, cluster, **params)])

    return asyncio.run(go())


def calls(*engines: FakeEngine) -> dict:
    return {e.name: e.log for e in engines}


def test_round_robin_takes_turns():
    a, b = FakeEngine("a"), FakeEngine("b")
    cluster = FakeCluster(a, b)
    outputs = [run(strategies.round_robin, cluster) for _ in range(4)]
    assert outputs == ["b0 b1 ", "a0 a1 ", "b0 b1 ", "a0 a1 "]
    assert calls(a, b) == {"a": [("start_generate", 0)] * 2, "b": [("start_generate", 0)] * 2}


def test_round_robin_skips_an_engine_that_is_down():
    a, b = FakeEngine("a"), FakeEngine("b")
    b.healthy = False
    assert {run(strategies.round_robin, FakeCluster(a, b)) for _ in range(3)} == {"a0 a1 "}


def test_least_loaded_picks_the_shortest_queue():
    a, b, c = FakeEngine("a", load=3), FakeEngine("b", load=1), FakeEngine("c", load=2)
    assert run(strategies.least_loaded, FakeCluster(a, b, c)) == "b0 b1 "


def test_prefix_aware_weighs_cached_tokens_against_the_queue():
    holder, idle = FakeEngine("holder", cached=96, load=1), FakeEngine("idle")
    assert run(strategies.prefix_aware, FakeCluster(holder, idle), tokens_per_queued=50) == "holder0 holder1 "
    # Each queued request costs tokens_per_queued: a long enough queue outweighs the cache.
    assert run(strategies.prefix_aware, FakeCluster(holder, idle), tokens_per_queued=200) == "idle0 idle1 "


def test_disagg_prefills_on_p_and_decodes_on_d():
    p, d = FakeEngine("p", role="prefill"), FakeEngine("d", role="decode")
    assert run(strategies.disagg, FakeCluster(p, d), prompt_len=100) == "d0 d1 "
    assert calls(p, d) == {"p": [("remote_send", 0, 99, "d")],
                           "d": [("prep_recv", 99), ("start_generate", 99)]}


def test_disagg_sends_only_what_the_decode_engine_lacks():
    p, d = FakeEngine("p", role="prefill"), FakeEngine("d", role="decode", cached=64)
    run(strategies.disagg, FakeCluster(p, d), prompt_len=100)
    assert p.log == [("remote_send", 64, 99, "d")]
    p2, d2 = FakeEngine("p", role="prefill"), FakeEngine("d", role="decode", cached=200)
    run(strategies.disagg, FakeCluster(p2, d2), prompt_len=100)
    assert p2.log == [] and d2.log == [("prep_recv", 99), ("start_generate", 99)]  # all cached: nothing moves


def test_balanced_disagg_leaves_the_last_fraction_to_the_decode_engine():
    p, d = FakeEngine("p", role="prefill"), FakeEngine("d", role="decode")
    run(strategies.balanced_disagg, FakeCluster(p, d), prompt_len=100, fraction=0.25)
    assert p.log == [("remote_send", 0, 75, "d")] and d.log == [("prep_recv", 75), ("start_generate", 75)]


def test_disagg_on_one_engine_is_data_parallel():
    only = FakeEngine("only")
    assert run(strategies.disagg, FakeCluster(only)) == "only0 only1 "
    assert only.log == [("start_generate", 0)]


def test_a_broken_transfer_falls_back_to_prefill_on_the_decode_engine():
    down = FakeEngine("p", role="prefill")
    down.fail_send = EngineDown(down, "connection refused")
    d = FakeEngine("d", role="decode")
    assert run(strategies.disagg, FakeCluster(down, d)) == "d0 d1 "
    assert d.log == [("prep_recv", 99), ("abort",), ("start_generate", 0)]


def test_a_refused_transfer_is_the_callers_error():
    p = FakeEngine("p", role="prefill", fail_send=EngineError(400, {"error": {"message": "bad range"}}))
    d = FakeEngine("d", role="decode")
    with pytest.raises(EngineError):
        run(strategies.disagg, FakeCluster(p, d))
    assert d.log == [("prep_recv", 99), ("abort",)]


def test_context_migration_moves_a_cached_prefix_to_the_decode_engine():
    holder = FakeEngine("holder", role="prefill", cached=80, load=5)
    target = FakeEngine("target", role="decode")
    run(strategies.context_migration, FakeCluster(holder, target), prompt_len=100)
    assert holder.log == [("remote_send", 0, 80, "target")]
    assert target.log == [("prep_recv", 80), ("start_generate", 80)]


def test_context_migration_recomputes_a_short_prefix():
    holder, target = FakeEngine("holder", role="prefill", cached=16), FakeEngine("target", role="decode")
    run(strategies.context_migration, FakeCluster(holder, target), min_tokens=32)
    assert holder.log == [] and target.log == [("start_generate", 0)]


def test_adaptive_is_data_parallel_for_short_prompts_and_splits_long_ones_under_load():
    a, b = FakeEngine("a", load=6), FakeEngine("b", load=5)
    run(strategies.adaptive, FakeCluster(a, b), prompt_len=20)
    assert b.log == [("start_generate", 0)] and a.log == []
    a, b = FakeEngine("a", load=6), FakeEngine("b", load=5)
    run(strategies.adaptive, FakeCluster(a, b), prompt_len=400)
    assert [c[0] for c in a.log] == ["remote_send"] and [c[0] for c in b.log] == ["prep_recv", "start_generate"]


def test_elastic_disagg_is_data_parallel_while_idle():
    p, d = FakeEngine("p", role="prefill"), FakeEngine("d", role="decode")
    run(strategies.elastic_disagg, FakeCluster(p, d))
    assert len(p.log + d.log) == 1 and (p.log + d.log)[0] == ("start_generate", 0)
    assert p.prefilling == d.prefilling == 0  # counted only until the first chunk


def test_elastic_disagg_splits_under_load_and_lets_d_take_prompts_p_is_backed_up_on():
    p, d = FakeEngine("p", role="prefill", load=2), FakeEngine("d", role="decode", load=3)
    run(strategies.elastic_disagg, FakeCluster(p, d))
    assert [c[0] for c in p.log] == ["remote_send"] and [c[0] for c in d.log] == ["prep_recv", "start_generate"]
    p, d = FakeEngine("p", role="prefill", load=6), FakeEngine("d", role="decode", load=1)
    p.prefilling = 5  # five prompts queued on P, one sequence decoding on D: D prefills this one itself
    run(strategies.elastic_disagg, FakeCluster(p, d))
    assert p.log == [] and d.log == [("start_generate", 0)]


USER_STRATEGY = '''
from microserve.router.strategies import generate_on


async def strategy(req, cluster, prefer="b"):
    engine = next(e for e in cluster.healthy if e.url.endswith(prefer))
    async for chunk in generate_on(engine, req):
        yield chunk
'''


def test_a_user_strategy_from_source():
    fn = strategies.load_strategy_source(USER_STRATEGY)
    a, b = FakeEngine("a"), FakeEngine("b")
    assert run(fn, FakeCluster(a, b)) == "b0 b1 "
    assert run(fn, FakeCluster(a, b), prefer="a") == "a0 a1 "


def test_a_broken_user_strategy_is_refused_with_its_error():
    with pytest.raises(ValueError, match="ZeroDivisionError"):
        strategies.load_strategy_source("1 / 0")
    with pytest.raises(ValueError, match="no `strategy`"):
        strategies.load_strategy_source("x = 1")


async def _text(routed) -> str:
    return "".join([c.choices[0].text async for c in routed.chunks()])


def test_hot_swap_keeps_running_requests_on_their_strategy():
    a, b = FakeEngine("a"), FakeEngine("b")
    router = Router(FakeCluster(a, b), strategy="least_loaded")

    async def go():
        before = await router.route([1, 2, 3], {})  # under way: its first chunk is out
        router.set_strategy(None, USER_STRATEGY, {"prefer": "b"}, None)
        after = await router.route([1, 2, 3], {})
        return await _text(before), await _text(after)

    assert asyncio.run(go()) == ("a0 a1 ", "b0 b1 ")
    assert router.describe_strategy() == {"name": "strategy", "params": {"prefer": "b"}, "roles": ["both", "both"]}
    assert router.admission.active == 0  # both slots given back


def test_a_bad_swap_leaves_the_strategy_as_it_was():
    from microserve.errors import UserError

    router = Router(FakeCluster(FakeEngine("a"), FakeEngine("b")), strategy="round_robin")
    for bad in [dict(name="no_such"), dict(name="round_robin", params={"nope": 1}), dict(source="not python")]:
        with pytest.raises(UserError):
            router.set_strategy(bad.get("name"), bad.get("source"), bad.get("params", {}), None)
    with pytest.raises(UserError):
        router.set_strategy("disagg", None, {}, ["prefill"])  # one role for two engines
    assert router.describe_strategy()["name"] == "round_robin"


def test_swapping_roles_with_the_strategy():
    a, b = FakeEngine("a"), FakeEngine("b")
    router = Router(FakeCluster(a, b), strategy="round_robin")
    router.set_strategy("disagg", None, {}, ["prefill", "decode"])
    assert asyncio.run(_route_text(router)) == "b0 b1 "
    assert [c[0] for c in a.log] == ["remote_send"]


async def _route_text(router) -> str:
    return await _text(await router.route(list(range(40)), {}))
