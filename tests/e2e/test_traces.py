"""OpenTelemetry traces across processes: a router (disagg) and two simulated engines export
to an OTLP/HTTP receiver in this process; one completion is one trace holding the router's
spans and both engines' spans, linked by the traceparent on every sub-request call."""

from __future__ import annotations

import gzip
import threading
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                       ExportTraceServiceResponse)

from server_utils import ServerProcess

pytestmark = pytest.mark.slow  # starts server processes

ENGINE = ["engine", "--simulate", "llama-3.1-8b@h100", "--served-model-name", "tiny", "--block-size", "8"]


@dataclass
class ReceivedSpan:
    service: str
    instance: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    start_ns: int
    end_ns: int
    attributes: dict = field(default_factory=dict)


def _value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def decode(body: bytes) -> list[ReceivedSpan]:
    """The spans of one ExportTraceServiceRequest."""
    req = ExportTraceServiceRequest()
    req.ParseFromString(body)
    out = []
    for rs in req.resource_spans:
        res = {a.key: _value(a.value) for a in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(ReceivedSpan(res.get("service.name", ""), res.get("service.instance.id", ""), s.name,
                                        s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                                        s.start_time_unix_nano, s.end_time_unix_nano,
                                        {a.key: _value(a.value) for a in s.attributes}))
    return out


class OTLPReceiver:
    """POST /v1/traces (OTLP/HTTP, protobuf) on 127.0.0.1, in a thread; keeps every span."""

    def __init__(self):
        self.spans: list[ReceivedSpan] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                receiver.spans += decode(body)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def tree(spans: list[ReceivedSpan]) -> str:
    """One trace as an indented tree: service, span name, offset from the root and duration."""
    by_id = {s.span_id: s for s in spans}
    children: dict[str, list[ReceivedSpan]] = {}
    for s in spans:
        children.setdefault(s.parent_id if s.parent_id in by_id else "", []).append(s)
    t0 = min(s.start_ns for s in spans)
    lines = []

    def walk(parent: str, depth: int):
        for s in sorted(children.get(parent, []), key=lambda s: s.start_ns):
            where = s.service + (f" {s.instance}" if s.instance else "")
            lines.append(f"{'  ' * depth}{s.name:<{28 - 2 * depth}} {where:<34} "
                         f"+{(s.start_ns - t0) / 1e6:7.2f} ms {(s.end_ns - s.start_ns) / 1e6:8.2f} ms")
            walk(s.span_id, depth + 1)

    walk("", 0)
    return "\n".join(lines)


def test_one_trace_across_router_and_engines(tiny_llama):
    receiver = OTLPReceiver()
    flag = ["--otlp-traces-endpoint", receiver.url]
    prefill = ServerProcess([*ENGINE, *flag])
    decode_ = ServerProcess([*ENGINE, *flag])
    router = ServerProcess(["router", "--engine", prefill.url, "--engine", decode_.url, "--roles", "prefill,decode",
                            "--strategy", "disagg", "--model", tiny_llama, "--served-model-name", "tiny", *flag])
    try:
        r = httpx.post(router.url + "/v1/completions", timeout=60,
                       json={"model": "tiny", "prompt": list(range(100, 140)), "max_tokens": 6, "ignore_eos": True})
        assert r.status_code == 200, r.text
        # A client's own traceparent is honoured by an engine's OpenAI route too.
        client_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
        r = httpx.post(decode_.url + "/v1/completions", timeout=60,
                       headers={"traceparent": f"00-{client_trace}-00f067aa0ba902b7-01"},
                       json={"model": "tiny", "prompt": "Hello", "max_tokens": 3})
        assert r.status_code == 200, r.text
    finally:
        for p in (router, prefill, decode_):
            p.stop()  # SIGTERM: each process flushes its spans as it stops
        receiver.close()
    spans = receiver.spans
    roots = [s for s in spans if s.name == "router.request"]
    assert len(roots) == 1, [s.name for s in spans]
    trace = [s for s in spans if s.trace_id == roots[0].trace_id]
    print("\n" + tree(trace))
    _check_request_trace(trace, roots[0], f"127.0.0.1:{prefill.port}", f"127.0.0.1:{decode_.port}")
    client = [s for s in spans if s.trace_id == client_trace]
    assert {s.name for s in client} >= {"engine.generate", "queue", "prefill", "decode"}
    assert next(s for s in client if s.name == "engine.generate").parent_id == "00f067aa0ba902b7"


def _check_request_trace(trace: list[ReceivedSpan], root: ReceivedSpan, prefill: str, decode_: str) -> None:
    by_id = {s.span_id: s for s in trace}
    names = lambda where: {s.name for s in trace if s.instance == where}  # noqa: E731
    assert {s.service for s in trace} == {"microserve-router", "microserve-engine"}
    assert root.attributes["microserve.strategy"] == "disagg"
    assert {"prep_recv", "remote_send", "start_generate"} <= {s.name for s in trace
                                                              if s.service == "microserve-router"}
    assert {"engine.remote_send", "prefill", "kv.send"} <= names(prefill)
    assert {"engine.prep_recv", "engine.start_generate", "kv.receive", "queue", "prefill", "decode"} <= names(decode_)
    # Each engine span hangs under the router's span for the call that reached it.
    for call, engine_span, where in (("remote_send", "engine.remote_send", prefill),
                                     ("start_generate", "engine.start_generate", decode_),
                                     ("prep_recv", "engine.prep_recv", decode_)):
        span = next(s for s in trace if s.name == engine_span)
        parent = by_id[span.parent_id]
        assert parent.name == call and parent.service == "microserve-router"
        assert parent.attributes["microserve.engine.url"] == "http://" + where
        assert by_id[parent.parent_id] is root
    generate = next(s for s in trace if s.name == "engine.start_generate")
    phases = {s.name: s for s in trace if s.parent_id == generate.span_id}
    assert phases["queue"].end_ns <= phases["prefill"].start_ns + 1000
    assert phases["prefill"].end_ns <= phases["decode"].start_ns + 1000
    assert phases["decode"].attributes["microserve.output_tokens"] == 6
    assert root.start_ns <= generate.start_ns and generate.end_ns <= root.end_ns + 5_000_000
