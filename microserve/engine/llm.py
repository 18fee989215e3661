"""Offline API: `LLM(...).generate(prompts, params)` and a streaming variant."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from tqdm import tqdm

from microserve.config import EngineConfig
from microserve.engine.engine import LLMEngine
from microserve.engine.request import RequestOutput
from microserve.errors import RequestFailed
from microserve.sampling import SamplingParams


class LLM:
    """Loads a model (the built-in SmolLM2-135M-Instruct when `model` is None) into one engine."""

    def __init__(self, model: str | None = None, dtype: str = "auto", **engine_options):
        self.engine = LLMEngine(EngineConfig(model=model, dtype=dtype, **engine_options))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: str | list[int] | list[str | list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Run every prompt to completion, batched together; outputs come back in prompt order.
        A request that failed inside the engine comes back with `error` set and no outputs."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        order = {}
        for prompt, p in zip(prompts, params_list):
            rid = f"offline-{next(self._ids)}"
            self.engine.add_request(rid, prompt, p)
            order[rid] = len(order)
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(order), desc="Generating", disable=not use_tqdm)
        while len(done) < len(order):
            for out in self.engine.step():
                if out.finished and out.request_id in order:
                    done[out.request_id] = out
                    bar.update(1)
        bar.close()
        for out, prompt in zip(sorted(done.values(), key=lambda o: order[o.request_id]), prompts):
            out.prompt = prompt if isinstance(prompt, str) else None
        return sorted(done.values(), key=lambda o: order[o.request_id])

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield an output (with `delta_text` / `delta_token_ids`) each time the request advances."""
        rid = f"offline-{next(self._ids)}"
        self.engine.add_request(rid, prompt, params or SamplingParams())
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == rid:
                        if out.error is not None:
                            raise RequestFailed(rid)
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort_request(rid)  # a consumer that stops early frees the request's KV

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of `messages` under the model's chat template, ready for generation."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # The template already holds the special tokens it wants.
        return self.tokenizer(text, add_special_tokens=False).input_ids
