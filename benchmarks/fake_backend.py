"""A fake inference backend for measuring routers: it speaks the OpenAI routes (what vllm-router
and sglang-router forward to) and the microserving calls and status stream (what microserve's
router uses), and answers every request with `--tokens` tokens, one SSE chunk each, `--token-ms`
apart. It does no work of its own (asyncio + httptools on uvloop, about 0.1-0.25 CPU-ms per
request), so what a router adds is what the router costs.

    python benchmarks/fake_backend.py --port 18801 [--tokens 8] [--token-ms 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from urllib.parse import parse_qs, urlsplit

import httptools
import uvloop

MODEL = "fake"
MAX_MODEL_LEN = 4096


class Backend:
    """What the routes answer; `active` counts streams under way (reported as running)."""

    def __init__(self, tokens: int, token_s: float):
        self.tokens = tokens
        self.token_s = token_s
        self.active = 0
        self.instance = f"fake-{time.time_ns()}"

    def status(self) -> dict:
        return {"running": self.active, "waiting": 0, "num_blocks": 4096, "free_blocks": 4096,
                "fingerprint": {"block_size": 16}, "instance": self.instance, "healthy": True,
                "max_model_len": MAX_MODEL_LEN}

    def get(self, path: str, query: dict) -> tuple[int, dict]:
        if path == "/microserving/status":
            return 200, self.status()
        if path == "/microserving/kv_events":
            return 200, {"events": [], "next": 0, "dropped": False}
        if path == "/microserving/prefix_hashes":
            return 200, {"hashes": []}
        if path == "/v1/models":
            return 200, {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "fake",
                                                      "max_model_len": MAX_MODEL_LEN}]}
        if path in ("/get_model_info", "/model_info"):
            return 200, {"model_path": MODEL, "tokenizer_path": MODEL, "is_generation": True}
        if path in ("/get_server_info", "/server_info"):
            return 200, {"model_path": MODEL, "max_total_num_tokens": 1 << 20}
        return 200, {}  # /health, /health_generate, /readiness, /liveness, ...

    def chunk(self, path: str, i: int, last: bool) -> dict:
        finish = "length" if last else None
        head = {"id": "fake-0", "created": 0, "model": MODEL}
        if path == "/v1/chat/completions":
            return {**head, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": {"content": f" t{i}"}, "logprobs": None, "finish_reason": finish}]}
        choice = {"index": 0, "text": f" t{i}", "logprobs": None, "finish_reason": finish}
        if path == "/microserving/start_generate":
            choice["token_ids"] = [100 + i]
        return {**head, "object": "text_completion", "choices": [choice]}

    def whole(self, path: str, n: int) -> dict:
        text = "".join(f" t{i}" for i in range(n))
        usage = {"prompt_tokens": 16, "completion_tokens": n, "total_tokens": 16 + n}
        if path == "/v1/chat/completions":
            return {"id": "fake-0", "object": "chat.completion", "created": 0, "model": MODEL, "usage": usage,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "length"}]}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}
        if path == "/microserving/start_generate":
            choice["token_ids"] = [100 + i for i in range(n)]
        return {"id": "fake-0", "object": "text_completion", "created": 0, "model": MODEL,
                "choices": [choice], "usage": usage}


class Connection(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection; requests are answered one at a time, in order."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.parser = httptools.HttpRequestParser(self)
        self.transport = None
        self.url = b""
        self.body: list[bytes] = []

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data: bytes):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_url(self, url: bytes):
        self.url += url

    def on_body(self, body: bytes):
        self.body.append(body)

    def on_message_complete(self):
        method, url, body = self.parser.get_method(), self.url.decode(), b"".join(self.body)
        self.url, self.body = b"", []
        asyncio.get_running_loop().create_task(self.answer(method, url, body))

    def reply(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.transport.write(b"HTTP/1.1 %d OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                             % (status, len(data)) + data)

    async def answer(self, method: bytes, url: str, body: bytes) -> None:
        parts = urlsplit(url)
        if method == b"GET" and parts.path == "/microserving/watch":
            return await self.watch(float(parse_qs(parts.query).get("heartbeat_s", ["5"])[0]))
        if method == b"GET":
            return self.reply(*self.backend.get(parts.path, parse_qs(parts.query)))
        req = json.loads(body or b"{}")
        if parts.path == "/microserving/abort":
            return self.reply(200, {})
        n = int(req.get("max_tokens") or req.get("max_completion_tokens") or 8)
        n = min(n, self.backend.tokens) if self.backend.tokens else n
        if not req.get("stream"):
            await asyncio.sleep(self.backend.token_s * n)
            return self.reply(200, self.backend.whole(parts.path, n))
        await self.stream(parts.path, n)

    async def stream(self, path: str, n: int) -> None:
        self.backend.active += 1
        try:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n")
            for i in range(n):
                await asyncio.sleep(self.backend.token_s)
                self.send_event(b"data: " + json.dumps(self.backend.chunk(path, i, i == n - 1)).encode() + b"\n\n")
            self.send_event(b"data: [DONE]\n\n")
            self.transport.write(b"0\r\n\r\n")
        finally:
            self.backend.active -= 1

    def send_event(self, data: bytes) -> None:
        self.transport.write(b"%x\r\n%s\r\n" % (len(data), data))

    async def watch(self, heartbeat_s: float) -> None:
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n")
        while not self.transport.is_closing():
            line = {"status": self.backend.status(), "events": [], "next": 0}
            self.send_event(json.dumps(line).encode() + b"\n")
            await asyncio.sleep(heartbeat_s)


async def serve(host: str, port: int, tokens: int, token_s: float) -> None:
    backend = Backend(tokens, token_s)
    server = await asyncio.get_running_loop().create_server(lambda: Connection(backend), host, port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--tokens", type=int, default=8, help="tokens per answer, at most (0: as max_tokens asks)")
    ap.add_argument("--token-ms", type=float, default=2.0, help="time between two tokens of a stream")
    args = ap.parse_args()
    uvloop.run(serve(args.host, args.port, args.tokens, args.token_ms / 1000))


if __name__ == "__main__":
    main()
