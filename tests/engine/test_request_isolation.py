"""One request's failure inside the engine (sampling, detokenizing, stop handling) ends that
request alone: its output carries the error, its KV is freed, and every other request of
the batch gets exactly the tokens it gets without it. A forward-pass failure stops the loop."""

from __future__ import annotations

import asyncio

import pytest

from conftest import make_engine, run_to_completion
from microserve import sampling
from microserve.errors import RequestFailed
from microserve.sampling import SamplingParams

PROMPTS = [list(range(10, 30)), list(range(40, 75)), list(range(80, 92))]
MARK = 1.25  # a frequency penalty only the failing request uses


def plain(max_tokens=12):
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


def marked():
    return SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, frequency_penalty=MARK)


def outputs_without_the_failing_one(loaded):
    outs = run_to_completion(make_engine(loaded), [PROMPTS[0], PROMPTS[2]], plain())
    return [o.outputs[0].token_ids for o in outs]


def run_batch(engine):
    """The three prompts in one batch, the middle one marked; finished outputs by id."""
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"r{i}", p, marked() if i == 1 else plain())
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


def assert_isolated(engine, done, reference):
    assert done["r1"].error is not None and done["r1"].outputs == []
    assert [done["r0"].outputs[0].token_ids, done["r2"].outputs[0].token_ids] == reference
    assert done["r0"].error is None and done["r2"].error is None
    assert engine.pool.num_free_blocks == engine.pool.num_blocks
    assert not engine.groups and not engine.failed
    # The engine goes on serving.
    again = run_to_completion(engine, [PROMPTS[0]], plain())[0]
    assert again.outputs[0].token_ids == reference[0]


def test_a_failing_penalty_fails_its_request_only(tiny_engine_loaded, monkeypatch):
    reference = outputs_without_the_failing_one(tiny_engine_loaded)
    real = sampling._apply_penalties

    def broken(row_logits, r):
        if r.params.frequency_penalty == MARK:
            raise ValueError("penalty broke")
        real(row_logits, r)

    monkeypatch.setattr(sampling, "_apply_penalties", broken)
    engine = make_engine(tiny_engine_loaded)
    assert_isolated(engine, run_batch(engine), reference)


def test_a_failing_draw_fails_its_request_only(tiny_engine_loaded, monkeypatch):
    """The batched part of sampling fails: each row is retried alone to find the one at fault."""
    reference = outputs_without_the_failing_one(tiny_engine_loaded)
    real = sampling.Sampler._choose

    def broken(self, logits, rows, raw_logprobs):
        if any(r.params.frequency_penalty == MARK for r in rows):
            raise RuntimeError("draw broke")
        return real(self, logits, rows, raw_logprobs)

    monkeypatch.setattr(sampling.Sampler, "_choose", broken)
    engine = make_engine(tiny_engine_loaded)
    assert_isolated(engine, run_batch(engine), reference)


def test_a_failing_detokenizer_fails_its_request_only(tiny_engine_loaded, monkeypatch):
    reference = outputs_without_the_failing_one(tiny_engine_loaded)
    engine = make_engine(tiny_engine_loaded)
    real = engine._detokenize

    def broken(req, skip_last):
        if req.group_id == "r1" and req.num_output_tokens == 3:
            raise UnicodeError("detokenizer broke")
        real(req, skip_last)

    monkeypatch.setattr(engine, "_detokenize", broken)
    assert_isolated(engine, run_batch(engine), reference)


def test_n_siblings_fail_together(tiny_engine_loaded, monkeypatch):
    engine = make_engine(tiny_engine_loaded)
    real = engine._detokenize

    def broken(req, skip_last):
        if req.request_id == "g#1":
            raise UnicodeError("detokenizer broke")
        real(req, skip_last)

    monkeypatch.setattr(engine, "_detokenize", broken)
    engine.add_request("g", PROMPTS[1], SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=3, ignore_eos=True))
    finals = []
    while engine.has_unfinished_requests():
        finals += [o for o in engine.step() if o.finished]
    assert len(finals) == 1 and finals[0].error is not None
    assert engine.pool.num_free_blocks == engine.pool.num_blocks and not engine.groups


def test_async_engine_answers_a_failed_request_and_keeps_serving(tiny_engine_loaded, monkeypatch):
    from microserve.server.async_engine import AsyncEngine

    real = sampling._apply_penalties

    def broken(row_logits, r):
        if r.params.frequency_penalty == MARK:
            raise ValueError("penalty broke")
        real(row_logits, r)

    monkeypatch.setattr(sampling, "_apply_penalties", broken)
    aengine = AsyncEngine(make_engine(tiny_engine_loaded))

    async def run():
        aengine.start()
        with pytest.raises(RequestFailed):
            async for _ in aengine.generate("bad", PROMPTS[1], marked()):
                pass
        last = [out async for out in aengine.generate("good", PROMPTS[0], plain())][-1]
        return last, aengine.healthy

    try:
        last, healthy = asyncio.run(run())
    finally:
        aengine.shutdown()
    assert last.finished and len(last.outputs[0].token_ids) == 12 and healthy


def test_a_forward_pass_failure_stops_the_loop_and_calls_on_fatal(tiny_engine_loaded, monkeypatch):
    from microserve.server.async_engine import AsyncEngine

    engine = make_engine(tiny_engine_loaded)

    def broken(items):
        raise RuntimeError("kernel broke")

    monkeypatch.setattr(engine.runner, "execute", broken)
    fatal = []
    aengine = AsyncEngine(engine, on_fatal=fatal.append)

    async def run():
        aengine.start()
        with pytest.raises(RuntimeError, match="engine loop failed"):
            async for _ in aengine.generate("x", PROMPTS[0], plain()):
                pass

    asyncio.run(run())
    aengine._thread.join(timeout=10)
    assert len(fatal) == 1 and not aengine.healthy
