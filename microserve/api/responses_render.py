"""Rendering the Responses API from `Delta`s, as render.py does for chat: the Response object
(a `message` item and/or `function_call` items, usage, the request's settings echoed) and the
streamed events, numbered by `sequence_number`, from `response.created` to
`response.completed` (`response.incomplete` when max_output_tokens cut it short,
`response.failed` after an `error` event when it broke)."""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass

from microserve.api.protocol import ChatMessage
from microserve.api.render import Delta, TokenText, chat_logprobs
from microserve.api.tools import FunctionCall, ToolCall, ToolCallStream, parse_tool_calls
from microserve.errors import RequestFailed, UserError

log = logging.getLogger("microserve.server")


@dataclass
class ResponseResult:
    body: dict  # the Response object
    message: ChatMessage  # the assistant's turn, as the store keeps it


def new_item_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def text_part(text: str, logprobs: list | None = None) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def message_item(item_id: str, status: str, parts: list[dict]) -> dict:
    return {"type": "message", "id": item_id, "role": "assistant", "status": status, "content": parts}


def call_item(item_id: str, call: ToolCall, status: str) -> dict:
    return {"type": "function_call", "id": item_id, "call_id": call.id, "name": call.function.name,
            "arguments": call.function.arguments, "status": status}


def assistant_message(items: list[dict]) -> ChatMessage:
    """The output items as one assistant chat turn: its text, then its calls."""
    text = "".join(p["text"] for i in items if i["type"] == "message" for p in i["content"])
    calls = [ToolCall(id=i["call_id"], function=FunctionCall(name=i["name"], arguments=i["arguments"]))
             for i in items if i["type"] == "function_call"]
    return ChatMessage(role="assistant", content=text, tool_calls=calls or None)


def response_usage(input_tokens: int, output_tokens: int) -> dict:
    return {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens}


def status_of(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def failure(exc: Exception) -> str:
    """What a client may read of why a stream broke (internals stay in the log)."""
    if isinstance(exc, (RequestFailed, UserError)):
        return str(exc)
    log.exception("internal error in a stream", exc_info=exc)
    return "internal server error"


class EventStream:
    """The events of one streamed response, numbered, and its output items as they were sent:
    at most one item is open (receiving deltas) at a time."""

    def __init__(self):
        self.seq = 0
        self.items: list[dict] = []
        self.open: dict | None = None

    def event(self, type_: str, **fields) -> str:
        body = {"type": type_, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {type_}\ndata: {json.dumps(body, ensure_ascii=False)}\n\n"

    def _where(self) -> dict:
        return {"item_id": self.open["id"], "output_index": len(self.items) - 1}

    def _add(self, item: dict) -> list[str]:
        out = self.close("completed")
        self.items.append(item)
        self.open = item
        return out + [self.event("response.output_item.added", output_index=len(self.items) - 1, item=item)]

    def message(self) -> list[str]:
        """Open a message item unless one is open."""
        if self.open is not None and self.open["type"] == "message":
            return []
        out = self._add(message_item(new_item_id("msg"), "in_progress", []))
        self.open["content"].append(text_part(""))
        return out + [self.event("response.content_part.added", **self._where(), content_index=0,
                                 part=text_part(""))]

    def text(self, delta: str, logprobs: list | None = None) -> list[str]:
        out = self.message()
        part = self.open["content"][0]
        part["text"] += delta
        part["logprobs"] += logprobs or []
        return out + [self.event("response.output_text.delta", **self._where(), content_index=0, delta=delta,
                                 logprobs=logprobs or [])]

    def call(self, call_id: str, name: str) -> list[str]:
        call = ToolCall(id=call_id, function=FunctionCall(name=name, arguments=""))
        return self._add(call_item(new_item_id("fc"), call, "in_progress"))

    def arguments(self, delta: str) -> list[str]:
        self.open["arguments"] += delta
        return [self.event("response.function_call_arguments.delta", **self._where(), delta=delta)]

    def close(self, status: str) -> list[str]:
        """The open item's done events."""
        item = self.open
        if item is None:
            return []
        item["status"] = status
        if item["type"] == "message":
            part = item["content"][0]
            out = [self.event("response.output_text.done", **self._where(), content_index=0, text=part["text"],
                              logprobs=part["logprobs"]),
                   self.event("response.content_part.done", **self._where(), content_index=0, part=part)]
        else:
            out = [self.event("response.function_call_arguments.done", **self._where(), name=item["name"],
                              arguments=item["arguments"])]
        out.append(self.event("response.output_item.done", output_index=len(self.items) - 1, item=item))
        self.open = None
        return out


class ResponseRender:
    """One response: its body from the whole output, or its events from the deltas. `echo`
    holds the request's settings the Response object repeats (ResponsesRequest.echo)."""

    def __init__(self, response_id: str, echo: dict, model: str, prompt_tokens: int, token_text: TokenText,
                 tools: bool = False):
        self.response_id = response_id
        self.echo = echo
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.token_text = token_text
        self.tools = tools
        self.created_at = int(time.time())

    def response(self, status: str, output: list[dict], output_tokens: int | None,
                 error: dict | None = None) -> dict:
        return {"id": self.response_id, "object": "response", "created_at": self.created_at, "status": status,
                "error": error,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "model": self.model, "output": output, **self.echo,
                "usage": None if output_tokens is None else response_usage(self.prompt_tokens, output_tokens)}

    def finished(self, items: list[dict], output_tokens: int, finish_reason: str | None) -> ResponseResult:
        body = self.response(status_of(finish_reason), items, output_tokens)
        return ResponseResult(body, assistant_message(items))

    def result(self, final: Delta) -> ResponseResult:
        """The whole answer: its text (less the calls, with tools) as a message, then its calls."""
        status = status_of(final.finish_reason)
        content, calls = parse_tool_calls(final.text) if self.tools else (final.text, [])
        lps = chat_logprobs(self.token_text, final.token_ids, final.logprobs)
        items = []
        if content or not calls:
            parts = [text_part(content or "", lps["content"] if lps else None)]
            items.append(message_item(new_item_id("msg"), status, parts))
        items += [call_item(new_item_id("fc"), c, "completed") for c in calls]
        return self.finished(items, len(final.token_ids), final.finish_reason)

    async def stream(self, deltas: AsyncIterator[Delta],
                     keep: Callable[[ResponseResult], None]) -> AsyncIterator[str]:
        """The events; `keep` gets the finished response before its last event goes out."""
        events = EventStream()
        yield events.event("response.created", response=self.response("in_progress", [], None))
        yield events.event("response.in_progress", response=self.response("in_progress", [], None))
        calls = ToolCallStream() if self.tools else None
        tokens, finish = 0, None
        try:
            async with aclosing(deltas):  # a client that goes away ends (and aborts) the generation now
                async for d in deltas:
                    tokens += len(d.token_ids)
                    finish = d.finish_reason or finish
                    for event in self._delta_events(events, d, calls):
                        yield event
            for event in self._last_events(events, tokens, finish, keep):
                yield event
        except Exception as e:
            message = failure(e)
            yield events.event("error", code="server_error", message=message, param=None)
            failed = self.response("failed", events.items, tokens, {"code": "server_error", "message": message})
            yield events.event("response.failed", response=failed)

    def _delta_events(self, events: EventStream, d: Delta, calls: ToolCallStream | None) -> list[str]:
        if calls is None:
            lps = chat_logprobs(self.token_text, d.token_ids, d.logprobs)
            return events.text(d.text, lps["content"] if lps else None) if d.text else []
        out = []
        for piece in calls.feed(d.text) + (calls.finish() if d.finish_reason else []):
            if piece.get("content"):
                out += events.text(piece["content"])
            for call in piece.get("tool_calls", []):
                if "id" in call:
                    out += events.call(call["id"], call["function"]["name"])
                if call["function"].get("arguments"):
                    out += events.arguments(call["function"]["arguments"])
        return out

    def _last_events(self, events: EventStream, tokens: int, finish: str | None,
                     keep: Callable[[ResponseResult], None]) -> list[str]:
        out = [] if events.items else events.message()  # an empty answer is an empty message
        out += events.close(status_of(finish))
        result = self.finished(events.items, tokens, finish)
        keep(result)
        kind = "response.incomplete" if result.body["status"] == "incomplete" else "response.completed"
        return out + [events.event(kind, response=result.body)]
