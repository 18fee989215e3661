"""Built-in strategies. A strategy is an async generator `(request, cluster, **params)` that
yields the engine's output chunks (`GenerateChunk`s, as `Engine.start_generate` gives them);
each one here uses only the public Cluster/Engine API."""

from __future__ import annotations

import logging
import types
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from microserve.api.microserving import GenerateChunk
from microserve.router.cluster import Cluster, Engine, EngineDown, EngineError

log = logging.getLogger("microserve.router")


@dataclass
class RoutedRequest:
    """A user request as a strategy sees it (the engine has its own `Request` per sequence)."""

    request_id: str
    prompt: list[int]  # token ids: the router tokenizes once for every engine
    sampling: dict = field(default_factory=dict)  # OpenAI-style fields for start_generate


async def generate_on(engine: Engine, req: RoutedRequest) -> AsyncIterator[GenerateChunk]:
    """Data parallel: the whole request on one engine."""
    async for chunk in engine.start_generate(req.request_id, req.prompt, 0, req.sampling):
        yield chunk


async def split(req: RoutedRequest, prefill: Engine, decode: Engine, end: int) -> AsyncIterator[GenerateChunk]:
    """Positions [0, end) prefilled on `prefill` and moved to `decode`, which does the rest.
    If the transfer breaks (the prefill engine dies, the link fails), `decode` prefills itself."""
    recv = await decode.prep_recv(req.request_id, req.prompt, end)
    matched = recv["prefix_matched_length"]
    begin = end
    if matched < end:
        try:
            await prefill.remote_send(req.request_id, req.prompt, matched, end, recv["kv_addr_info"])
        except (EngineDown, EngineError) as e:
            if isinstance(e, EngineError) and e.status < 500:
                await decode.abort(req.request_id)
                raise
            log.warning("KV transfer for %s failed (%s); prefilling on %s instead", req.request_id, e, decode.url)
            await decode.abort(req.request_id)  # frees the reservation; the id is free again
            begin = 0
    async for chunk in decode.start_generate(req.request_id, req.prompt, begin, req.sampling):
        yield chunk


async def round_robin(req: RoutedRequest, cluster: Cluster) -> AsyncIterator[GenerateChunk]:
    async for chunk in generate_on(cluster.next_round_robin(), req):
        yield chunk


async def least_loaded(req: RoutedRequest, cluster: Cluster) -> AsyncIterator[GenerateChunk]:
    async for chunk in generate_on(cluster.least_loaded(cluster.healthy), req):
        yield chunk


async def prefix_aware(req: RoutedRequest, cluster: Cluster, tokens_per_queued: int = 256) -> AsyncIterator[GenerateChunk]:
    """The engine holding the longest prefix, where each queued request costs `tokens_per_queued`."""
    cached = cluster.cached_tokens(req.prompt)
    best = max(cluster.healthy, key=lambda e: cached[e] - tokens_per_queued * e.load)
    async for chunk in generate_on(best, req):
        yield chunk


async def disagg(req: RoutedRequest, cluster: Cluster) -> AsyncIterator[GenerateChunk]:
    """Prefill on the least loaded prefill engine, decode on the least loaded decode engine."""
    async for chunk in balanced_disagg(req, cluster, fraction=0.0):
        yield chunk


async def balanced_disagg(req: RoutedRequest, cluster: Cluster, fraction: float = 0.1) -> AsyncIterator[GenerateChunk]:
    """Like disagg, but the decode engine prefills the last `fraction` of the prompt itself."""
    decode = cluster.least_loaded(cluster.with_role("decode"))
    prefills = [e for e in cluster.with_role("prefill") if e is not decode]
    end = min(len(req.prompt) - 1, int(len(req.prompt) * (1 - fraction)))
    if not prefills or end < 1:  # one engine, or nothing worth moving: data parallel
        async for chunk in generate_on(decode, req):
            yield chunk
        return
    async for chunk in split(req, cluster.least_loaded(prefills), decode, end):
        yield chunk


async def context_migration(req: RoutedRequest, cluster: Cluster, min_tokens: int = 32) -> AsyncIterator[GenerateChunk]:
    """Decode on the least loaded decode engine; if another engine holds more of the prompt's
    prefix, it sends that KV over instead of the target recomputing it."""
    target = cluster.least_loaded(cluster.with_role("decode"))
    cached = cluster.cached_tokens(req.prompt)
    holder = max(cluster.healthy, key=lambda e: cached[e])
    have = cached[holder]
    if holder is target or have - cached[target] < min_tokens:
        async for chunk in generate_on(target, req):
            yield chunk
        return
    async for chunk in split(req, holder, target, min(have, len(req.prompt) - 1)):
        yield chunk


async def adaptive(req: RoutedRequest, cluster: Cluster, long_prompt: int = 256, busy: int = 4) -> AsyncIterator[GenerateChunk]:
    """Short prompts, or an idle cluster: data parallel on the least loaded engine. A long
    prompt while engines are busy: disaggregate, moving more of the prefill to the decode
    engine (fraction up to 0.5) as the decode side's queue shrinks relative to the prefill side's."""
    engines = cluster.healthy
    least = cluster.least_loaded(engines)
    if len(engines) < 2 or len(req.prompt) < long_prompt or least.load < busy:
        async for chunk in generate_on(least, req):
            yield chunk
        return
    decode = cluster.least_loaded(cluster.with_role("decode"))
    others = [e for e in engines if e is not decode]
    prefill = cluster.least_loaded(others)
    fraction = min(0.5, max(0.0, (prefill.load - decode.load) / (2 * max(1, prefill.load))))
    end = min(len(req.prompt) - 1, int(len(req.prompt) * (1 - fraction)))
    async for chunk in split(req, prefill, decode, end):
        yield chunk


async def _counted(engine: Engine, chunks: AsyncIterator[GenerateChunk]) -> AsyncIterator[GenerateChunk]:
    """`chunks`, counted in `engine.prefilling` until the first one arrives."""
    engine.prefilling += 1
    counting = True
    try:
        async for chunk in chunks:
            if counting:
                engine.prefilling -= 1
                counting = False
            yield chunk
    finally:
        if counting:
            engine.prefilling -= 1


async def elastic_disagg(req: RoutedRequest, cluster: Cluster, idle_load: int = 2) -> AsyncIterator[GenerateChunk]:
    """Data parallel while the engines are nearly idle (fewer than `idle_load` requests on the
    pair); under load, prefill on P and decode on D, except when the decode engine can take the
    whole request at a lower cost in waiting: a prompt prefilled on D stalls each of D's
    running decodes for one prefill, a prompt sent to P waits behind each prompt queued there.
    So D takes it when P has more prompts queued than D has sequences decoding."""
    decode = cluster.least_loaded(cluster.with_role("decode"))
    prefills = [e for e in cluster.with_role("prefill") if e is not decode]
    if not prefills or len(req.prompt) < 2:
        async for chunk in generate_on(decode, req):
            yield chunk
        return
    prefill = min(prefills, key=lambda e: (e.prefilling, e.load))
    queued = prefill.prefilling
    decoding = decode.load - decode.prefilling
    if not queued and prefill.load + decode.load < idle_load:
        engine = cluster.least_loaded([prefill, decode])
        chunks = generate_on(engine, req)
    elif queued > decoding and not decode.prefilling:
        engine, chunks = decode, generate_on(decode, req)
    else:
        engine, chunks = prefill, split(req, prefill, decode, len(req.prompt) - 1)
    async for chunk in _counted(engine, chunks):
        yield chunk


BUILTIN = {f.__name__: f for f in (round_robin, least_loaded, prefix_aware, disagg, balanced_disagg,
                                   context_migration, adaptive, elastic_disagg)}


def load_strategy_source(source: str, name: str = "user_strategy"):
    """A strategy from Python source: the module must define `strategy` (an async generator
    function, or a class whose instances are called like one)."""
    module = types.ModuleType(name)
    try:
        exec(compile(source, f"<{name}>", "exec"), module.__dict__)
    except Exception as e:  # whatever user code raises, the caller gets a clear refusal
        raise ValueError(f"the strategy source failed to load: {type(e).__name__}: {e}") from None
    fn = getattr(module, "strategy", None)
    if fn is None:
        raise ValueError("the strategy source defines no `strategy`")
    return fn() if isinstance(fn, type) else fn


def load_strategy_file(path: str):
    with open(path) as f:
        return load_strategy_source(f.read(), name=path)


__all__ = ["BUILTIN", "RoutedRequest", "generate_on", "split", "load_strategy_source", "load_strategy_file"]
