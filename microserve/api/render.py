"""Rendering output as the OpenAI API answers it: completion and chat bodies, SSE chunks,
usage and logprobs. Both fronts render here, from the same `Delta`s: the engine's server
makes them from its outputs, the router from the chunks engines stream to it."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field

from microserve.api.tools import ToolCallStream, parse_tool_calls

TokenText = Callable[[int], str]  # token id -> its text, for logprobs

DONE = "data: [DONE]\n\n"


@dataclass
class Delta:
    """New output of one choice (or all of it, in a final answer)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list | None = None  # per token: (logprob, [(token id, logprob), ...])
    finish_reason: str | None = None
    prompt_logprobs: list | None = None  # per prompt token (None first), once, with the first delta

    @classmethod
    def from_wire(cls, choice: dict) -> "Delta":
        """A choice of a microserving start_generate chunk."""
        # logprobs stay lists ([logprob, [[id, logprob], ...]]): rendered as they are
        return cls(choice["index"], choice["text"], choice["token_ids"], choice.get("logprobs"),
                   choice["finish_reason"], choice.get("prompt_logprobs"))

    def to_wire(self) -> dict:
        out = {"index": self.index, "text": self.text, "token_ids": self.token_ids,
               "finish_reason": self.finish_reason,
               # per token: [logprob, [[token id, logprob], ...]]; the router renders them
               "logprobs": _lists(self.logprobs)}
        if self.prompt_logprobs is not None:
            out["prompt_logprobs"] = _lists(self.prompt_logprobs)
        return out

    def extend(self, more: "Delta") -> None:
        self.text += more.text
        self.token_ids = self.token_ids + more.token_ids
        if more.logprobs is not None:
            self.logprobs = (self.logprobs or []) + list(more.logprobs)
        self.finish_reason = more.finish_reason or self.finish_reason
        self.prompt_logprobs = self.prompt_logprobs or more.prompt_logprobs


def _lists(lps: list | None) -> list | None:
    return None if lps is None else [None if e is None else [e[0], [list(a) for a in e[1]]] for e in lps]


async def accumulate(deltas: AsyncIterator[Delta]) -> list[Delta]:
    """Each choice's whole output from its deltas, in index order."""
    out: dict[int, Delta] = {}
    async for d in deltas:
        out.setdefault(d.index, Delta(d.index)).extend(d)
    return [out[i] for i in sorted(out)]


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int, **extra) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, **extra}


def completion_logprobs(token_text: TokenText, ids: list[int], lps, start_offset: int = 0) -> dict | None:
    """The completions API's logprobs: `lps[i]` = (logprob, [(token id, logprob), ...])."""
    if lps is None:
        return None
    tokens = [token_text(t) for t in ids]
    offsets, pos = [], start_offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": [lp for lp, _ in lps],
            "top_logprobs": [{token_text(t): v for t, v in top} for _, top in lps], "text_offset": offsets}


def echo_logprobs(token_text: TokenText, prompt_ids: list[int], prompt_lps: list, completion: dict | None) -> dict:
    """Echo's logprobs: the prompt's tokens (the first has none: nothing predicts it), then the
    completion's, whose offsets already count the echoed text."""
    out = completion_logprobs(token_text, prompt_ids, [(None, []) if e is None else e for e in prompt_lps])
    out["top_logprobs"][0] = None
    for key, values in (completion or {}).items():
        out[key] += values
    return out


def chat_logprobs(token_text: TokenText, ids: list[int], lps) -> dict | None:
    """The chat API's logprobs (`content` entries with bytes and top alternatives)."""
    if lps is None:
        return None
    content = []
    for (lp, alts), t in zip(lps, ids):
        s = token_text(t)
        content.append({"token": s, "logprob": lp, "bytes": list(s.encode()),
                        "top_logprobs": [{"token": token_text(a), "logprob": v,
                                          "bytes": list(token_text(a).encode())} for a, v in alts]})
    return {"content": content}


class CompletionRender:
    """/v1/completions: several prompts (each with n choices) in one answer."""

    def __init__(self, request_id: str, model: str, n: int, prompt_ids: list[list[int]], token_text: TokenText,
                 echoes: list[str], include_usage: bool = False):
        self.head = {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model}
        self.n = n
        self.prompt_ids = prompt_ids
        self.prompt_tokens = sum(map(len, prompt_ids))
        self.token_text = token_text
        self.echoes = echoes  # per prompt: the text put before its output ("" without echo)
        self.include_usage = include_usage

    def body(self, finals: list[list[Delta]]) -> dict:
        """The whole answer; finals[i] holds prompt i's choices."""
        choices, completion = [], 0
        for i, deltas in enumerate(finals):
            for d in deltas:
                echo = self.echoes[i]
                choices.append({"index": i * self.n + d.index, "text": echo + d.text,
                                "logprobs": self._logprobs(i, d, len(echo)), "finish_reason": d.finish_reason})
                completion += len(d.token_ids)
        return {**self.head, "choices": choices, "usage": usage(self.prompt_tokens, completion)}

    def _logprobs(self, prompt: int, d: Delta, offset: int) -> dict | None:
        lps = completion_logprobs(self.token_text, d.token_ids, d.logprobs, offset)
        if d.prompt_logprobs is None:
            return lps
        return echo_logprobs(self.token_text, self.prompt_ids[prompt], d.prompt_logprobs, lps)

    async def stream(self, deltas: AsyncIterator[tuple[int, Delta]]) -> AsyncIterator[str]:
        """SSE chunks from (prompt index, delta) pairs."""
        completion, sent = 0, {}  # choice index -> characters of its text sent so far
        extra = {"usage": None} if self.include_usage else {}
        async with aclosing(deltas):  # a client that goes away ends (and aborts) the generation now
            async for i, d in deltas:
                index = i * self.n + d.index
                text = d.text
                if index not in sent:
                    text, sent[index] = self.echoes[i] + text, len(self.echoes[i])
                completion += len(d.token_ids)
                if not text and not d.token_ids and not d.finish_reason:
                    continue
                choice = {"index": index, "text": text, "logprobs": self._logprobs(i, d, sent[index]),
                          "finish_reason": d.finish_reason}
                sent[index] += len(d.text)
                yield sse({**self.head, "choices": [choice], **extra})
        if self.include_usage:
            yield sse({**self.head, "choices": [], "usage": usage(self.prompt_tokens, completion)})
        yield DONE


class ChatRender:
    """/v1/chat/completions: n choices of one conversation. With `tools`, each choice's text
    is read for tool calls (api/tools.py): `message.tool_calls`, `finish_reason: "tool_calls"`,
    and in a stream the tool-call deltas OpenAI sends (index, id, name, then argument pieces)."""

    def __init__(self, request_id: str, model: str, n: int, prompt_tokens: int, token_text: TokenText,
                 include_usage: bool = False, tools: bool = False):
        self.head = {"id": request_id, "created": int(time.time()), "model": model}
        self.n = n
        self.prompt_tokens = prompt_tokens
        self.token_text = token_text
        self.include_usage = include_usage
        self.tools = tools

    def body(self, finals: list[Delta]) -> dict:
        choices = [self._choice(d) for d in finals]
        completion = sum(len(d.token_ids) for d in finals)
        return {**self.head, "object": "chat.completion", "choices": choices,
                "usage": usage(self.prompt_tokens, completion)}

    def _choice(self, d: Delta) -> dict:
        message = {"role": "assistant", "content": d.text, "refusal": None}
        finish = d.finish_reason
        if self.tools:
            content, calls = parse_tool_calls(d.text)
            message["content"] = content
            if calls:
                message["tool_calls"] = [c.model_dump() for c in calls]
                finish = "tool_calls" if finish == "stop" else finish
        return {"index": d.index, "message": message,
                "logprobs": chat_logprobs(self.token_text, d.token_ids, d.logprobs), "finish_reason": finish}

    async def stream(self, deltas: AsyncIterator[Delta]) -> AsyncIterator[str]:
        """SSE chunks: the assistant role first, then content, then each choice's finish reason
        (an aborted choice just ends)."""
        for i in range(self.n):
            yield self._chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                               "finish_reason": None})
        completion = 0
        calls = {i: ToolCallStream() for i in range(self.n)} if self.tools else None
        async with aclosing(deltas):
            async for d in deltas:
                completion += len(d.token_ids)
                for chunk in self._delta_chunks(d, calls):
                    yield chunk
        if self.include_usage:
            yield sse({**self.head, "object": "chat.completion.chunk", "choices": [],
                       "usage": usage(self.prompt_tokens, completion)})
        yield DONE

    def _delta_chunks(self, d: Delta, calls: dict | None) -> list[str]:
        out = []
        lps = chat_logprobs(self.token_text, d.token_ids, d.logprobs)
        if calls is None:
            if d.text or d.token_ids:
                out.append(self._chunk({"index": d.index, "delta": {"content": d.text}, "logprobs": lps,
                                        "finish_reason": None}))
        else:
            stream = calls[d.index]
            pieces = stream.feed(d.text) + (stream.finish() if d.finish_reason else [])
            out += [self._chunk({"index": d.index, "delta": p, "logprobs": None, "finish_reason": None})
                    for p in pieces]
        if d.finish_reason and d.finish_reason != "abort":
            finish = "tool_calls" if calls and calls[d.index].tool_calls and d.finish_reason == "stop" \
                else d.finish_reason
            out.append(self._chunk({"index": d.index, "delta": {}, "logprobs": None, "finish_reason": finish}))
        return out

    def _chunk(self, choice: dict) -> str:
        extra = {"usage": None} if self.include_usage else {}
        return sse({**self.head, "object": "chat.completion.chunk", "choices": [choice], **extra})


def engine_chunk(head: dict, deltas: list[Delta]) -> str:
    """One SSE chunk of a microserving start_generate stream (text, token ids, raw logprobs)."""
    return f"data: {json.dumps({**head, 'choices': [d.to_wire() for d in deltas]})}\n\n"
