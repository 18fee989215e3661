"""The router's OpenAI routes (router/hot_routes.py) driven as ASGI in process, against fake
engines: streams, whole answers, errors in OpenAI's shape, and a client that goes away."""

from __future__ import annotations

import asyncio
import json

from microserve.api.microserving import GenerateChunk
from microserve.api.render import Delta
from microserve.router.app import build_router_app
from microserve.router.cluster import Cluster
from microserve.router.router import Router
from microserve.tokenizer import load_tokenizer


class SlowEngine:
    """Streams `tokens` chunks `delay_s` apart; records whether its stream was closed early."""

    def __init__(self, tokens: int = 3, delay_s: float = 0.0):
        self.url, self.role, self.load, self.kv_free, self.healthy = "fake://a", "both", 0, 1.0, True
        self.tokens, self.delay_s = tokens, delay_s
        self.closed_early = False
        self.started = asyncio.Event()

    async def start_generate(self, request_id, prompt, begin, sampling):
        try:
            for i in range(self.tokens):
                self.started.set()
                await asyncio.sleep(self.delay_s)
                yield GenerateChunk([Delta(0, f" t{i}", [i], None, "length" if i == self.tokens - 1 else None)])
        except (GeneratorExit, asyncio.CancelledError):  # closed, or cancelled mid-wait
            self.closed_early = True
            raise


class OneEngineCluster(Cluster):
    def __init__(self, engine):
        super().__init__([])
        self.engines = [engine]


def make_app(engine):
    router = Router(OneEngineCluster(engine))
    return router, build_router_app(router, load_tokenizer(None), "m")  # the built-in model's


async def call(app, method: str, path: str, body: bytes, disconnect_after: int | None = None) -> list[dict]:
    """The ASGI messages the app sends; with `disconnect_after`, the client leaves after that many body parts."""
    sent: list[dict] = []
    gone = asyncio.Event()
    requested = False

    async def receive():
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        parts = [m for m in sent if m["type"] == "http.response.body"]
        if disconnect_after is not None and len(parts) >= disconnect_after:
            gone.set()

    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "scheme": "http", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1), "root_path": "",
             "http_version": "1.1", "asgi": {"version": "3.0"}}
    await app(scope, receive, send)
    return sent


def status_and_body(sent: list[dict]) -> tuple[int, bytes]:
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def completion(**extra) -> bytes:
    return json.dumps({"model": "m", "prompt": [1, 2, 3], "max_tokens": 3, **extra}).encode()


def test_a_stream_is_sent_event_by_event():
    router, app = make_app(SlowEngine())
    sent = asyncio.run(call(app, "POST", "/v1/completions", completion(stream=True)))
    status, body = status_and_body(sent)
    assert status == 200 and dict(sent[0]["headers"])[b"content-type"].startswith(b"text/event-stream")
    events = [e for e in body.decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1]) == " t0 t1 t2"
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert router.admission.active == 0


def test_a_whole_answer_and_chat():
    _, app = make_app(SlowEngine())
    status, body = status_and_body(asyncio.run(call(app, "POST", "/v1/completions", completion())))
    assert status == 200 and json.loads(body)["choices"][0]["text"] == " t0 t1 t2"
    chat = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}).encode()
    status, body = status_and_body(asyncio.run(call(app, "POST", "/v1/chat/completions", chat)))
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == " t0 t1 t2"


def test_errors_come_back_in_openai_shape():
    _, app = make_app(SlowEngine())
    cases = [(b"{not json", 400, "the request body is not valid JSON"),
             (completion(temperature=-1), 400, "temperature"),
             (completion(model="other"), 404, "does not exist"),
             (json.dumps({"model": "m", "prompt": []}).encode(), 400, "empty")]
    for body, want, says in cases:
        status, answer = status_and_body(asyncio.run(call(app, "POST", "/v1/completions", body)))
        assert status == want, (body, answer)
        assert says in json.loads(answer)["error"]["message"]
    status, _ = status_and_body(asyncio.run(call(app, "GET", "/v1/completions", b"")))
    assert status == 405


def test_a_client_that_leaves_closes_the_engine_stream_at_once():
    engine = SlowEngine(tokens=50, delay_s=0.05)
    router, app = make_app(engine)

    async def go():
        t = asyncio.get_running_loop().time()
        sent = await call(app, "POST", "/v1/completions", completion(stream=True, max_tokens=50), disconnect_after=2)
        return sent, asyncio.get_running_loop().time() - t

    sent, took = asyncio.run(go())
    assert engine.closed_early and took < 1.0  # not the 2.5 s the whole stream takes
    assert router.admission.active == 0
    assert not any(m.get("more_body") is False for m in sent[1:])  # the stream was cut, not finished
