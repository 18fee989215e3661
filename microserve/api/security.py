"""Who may call what, and how big a request may be.

Three surfaces, two kinds of secret:
  /v1/...                    user API keys (OpenAI-style `Authorization: Bearer <key>`), if any are set
  /microserving/..., /admin/ the cluster token, which user keys never grant
  /health, /metrics          open (probes and scrapers)
The KV-transfer port needs a one-time token that only `prep_recv` hands out, so it is
behind the cluster token too.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os

from microserve.api.errors import error_body

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024  # a 128k-token prompt as JSON ids is ~1 MB


def env_list(name: str) -> list[str]:
    """Comma-separated secrets from an environment variable."""
    return [s.strip() for s in os.environ.get(name, "").split(",") if s.strip()]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bearer_matches(header: str, secrets: list[str]) -> bool:
    given = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
    # Compare against every secret so the time taken says nothing about which one was close.
    ok = False
    for s in secrets:
        ok |= hmac.compare_digest(given.encode(), s.encode())
    return bool(given) and ok


class Security:
    """Pure ASGI middleware: checks keys and body size before the app sees the request
    (a body too large gets 413 without being read)."""

    def __init__(self, app, api_keys: list[str] | None = None, cluster_token: str | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, cluster_paths: tuple[str, ...] = ("/microserving/",),
                 admin_paths: tuple[str, ...] = ()):
        self.app = app
        self.api_keys = list(api_keys or [])
        self.cluster_token = cluster_token
        self.max_body_bytes = max_body_bytes
        self.cluster_paths = cluster_paths
        self.admin_paths = admin_paths  # need the cluster token, and are off when there is none

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        auth = headers.get("authorization", "")
        if path.startswith(self.admin_paths) and self.admin_paths:
            if not self.cluster_token or not _bearer_matches(auth, [self.cluster_token]):
                why = ("a valid cluster token is required (Authorization: Bearer <token>)" if self.cluster_token
                       else "the admin API is off: start with --cluster-token to enable it")
                return await _reply(send, 401, error_body(why, "authentication_error", code="invalid_token"))
        elif path.startswith(self.cluster_paths):
            if self.cluster_token and not _bearer_matches(auth, [self.cluster_token]):
                return await _reply(send, 401, error_body("a valid cluster token is required", "authentication_error",
                                                          code="invalid_token"))
        elif path.startswith("/v1/") and self.api_keys:
            if not _bearer_matches(auth, self.api_keys):
                return await _reply(send, 401, error_body("Incorrect API key provided.", "authentication_error",
                                                          code="invalid_api_key"))
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_body_bytes:
                return await _reply(send, 413, _too_large(self.max_body_bytes))
            return await self.app(scope, receive, send)
        # A chunked upload has no length up front: read it here, within the limit, then replay it.
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                return await _reply(send, 413, _too_large(self.max_body_bytes))
        return await self.app(scope, _replay(body, receive), send)


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later reads wait for the disconnect, as usual

    return replayed


def _too_large(limit: int) -> dict:
    return error_body(f"the request body is larger than {limit} bytes", code="request_too_large")


async def _reply(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def install_security(app, **kwargs) -> None:
    app.add_middleware(Security, **kwargs)
