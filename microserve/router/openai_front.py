"""The router's OpenAI-compatible completions, chat and responses: tokenize once, route each prompt
through the router, render what the engines stream back (api/render.py, as engines do). Each
answers a dict (the whole answer) or the SSE events of a stream, which router/hot_routes.py sends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

from microserve.api.ids import new_id
from microserve.api.errors import check_model, sse_errors
from microserve.api.protocol import ChatCompletionRequest, CompletionRequest, prompt_list
from microserve.api.render import ChatRender, CompletionRender, Delta, accumulate
from microserve.api.responses import ResponsesAPI, ResponsesRequest
from microserve.api.streams import ChatRun, merge
from microserve.errors import UserError
from microserve.router.router import Routed, Router
from microserve.api.tools import chat_prompt_ids
from microserve.tokenizer import encode, token_text


# Prompts up to this long are tokenized on the event loop (about 50 us): handing them to a
# thread costs more than that in wake-ups. Longer ones go to a thread.
INLINE_TOKENIZE_CHARS = 2048


async def deltas(routed: Routed, prompt_logprobs: list | None = None) -> AsyncIterator[Delta]:
    """The choices' output in the engines' chunks; `prompt_logprobs`, when the prompt was
    scored, go with each choice's first delta."""
    started = set()
    async with aclosing(routed.chunks()) as chunks:
        async for chunk in chunks:
            for d in chunk.choices:
                if prompt_logprobs is not None and d.index not in started:
                    started.add(d.index)
                    d.prompt_logprobs = prompt_logprobs
                yield d


class RouterFront:
    def __init__(self, router: Router, tokenizer, model_name: str):
        self.router = router
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.token_text = token_text(tokenizer)
        self.responses_api = ResponsesAPI(model_name, self.token_text)  # the router process's response store

    async def tokenize(self, prompt) -> list[int]:
        if not isinstance(prompt, str):
            return list(prompt)
        if len(prompt) <= INLINE_TOKENIZE_CHARS:
            return encode(self.tokenizer, prompt)
        # in a thread: a long prompt would stall every stream this loop serves
        return await asyncio.to_thread(encode, self.tokenizer, prompt)

    async def route_all(self, ids_list: list[list[int]], sampling: dict) -> list[Routed]:
        """Each prompt routed as its own request; all or none of them started."""
        routed = []
        try:
            for ids in ids_list:
                routed.append(await self.router.route(ids, sampling))
        except Exception:
            for r in routed:  # closing them aborts what already started
                await r.aclose()
            raise
        return routed

    async def completions(self, req: CompletionRequest):
        check_model(req.model, self.model_name)
        prompts = prompt_list(req.prompt)
        ids_list = [await self.tokenize(p) for p in prompts]
        if not all(ids_list):
            raise UserError("the prompt is empty")
        sampling = req.forwarded(req.max_tokens, req.logprobs)
        scores = None
        if req.prompt_logprobs is not None:  # checked like the rest before anything starts
            scores = await asyncio.gather(*(self.router.score_prompt(ids, req.prompt_logprobs) for ids in ids_list))
        routed = await self.route_all(ids_list, sampling)
        echoes = [(p if isinstance(p, str) else self.tokenizer.decode(ids)) if req.echo else ""
                  for p, ids in zip(prompts, ids_list)]
        render = CompletionRender(new_id("cmpl"), self.model_name, req.n, ids_list, self.token_text,
                                  echoes, req.include_usage)
        streams = [deltas(r, scores[i] if scores else None) for i, r in enumerate(routed)]
        if not req.stream:
            return render.body(await asyncio.gather(*(accumulate(d) for d in streams)))
        return sse_errors(render.stream(merge(streams)))

    async def start_chat(self, req: ChatCompletionRequest) -> ChatRun:
        """Route a chat request; chat and responses render what it yields."""
        check_model(req.model, self.model_name)
        messages = req.message_dicts()
        args = (self.tokenizer, messages, req.tools_offered, req.add_generation_prompt)
        if sum(len(str(m.get("content") or "")) for m in messages) <= INLINE_TOKENIZE_CHARS and not req.tools_offered:
            ids = chat_prompt_ids(*args)
        else:
            ids = await asyncio.to_thread(chat_prompt_ids, *args)
        routed = await self.router.route(ids, req.forwarded(req.completion_max_tokens, req.top_logprobs_wanted))
        return ChatRun(new_id("chatcmpl"), len(ids), deltas(routed))

    async def chat(self, req: ChatCompletionRequest):
        run = await self.start_chat(req)
        render = ChatRender(run.request_id, self.model_name, req.n, run.prompt_tokens, self.token_text,
                            req.include_usage, tools=bool(req.tools_offered))
        if not req.stream:
            return render.body(await accumulate(run.deltas))
        return sse_errors(render.stream(run.deltas))

    async def responses(self, req: ResponsesRequest):
        return await self.responses_api.create(req, self.start_chat)
