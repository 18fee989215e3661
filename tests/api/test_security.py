"""Security rules: user keys, the cluster token, loopback binding, request limits, clean errors."""

from __future__ import annotations

import glob
import os
import socket
import stat
import subprocess
import sys

import httpx
import pytest

from server_utils import ServerProcess

pytestmark = pytest.mark.slow  # every test here starts server processes or loads the built-in model

KEY, OTHER_KEY, CLUSTER = "user-key-1", "user-key-2", "cluster-secret"
COMMON = ["--served-model-name", "tiny", "--dtype", "float32", "--kv-cache-memory", "16MiB", "--block-size", "8"]


def bearer(secret):
    return {"Authorization": f"Bearer {secret}"}


def assert_clean_error(r, status):
    """OpenAI's error shape, the right code, and nothing about our insides."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and body["error"]["message"]
    for leak in ("Traceback", 'File "', ".py", "/work", "site-packages"):
        assert leak not in r.text


@pytest.fixture(scope="module")
def secured(tiny_llama):
    env = {"MICROSERVE_CLUSTER_TOKEN": CLUSTER}
    engine = ServerProcess(["engine", "--model", tiny_llama, *COMMON, "--api-key", CLUSTER], env=env)
    router = ServerProcess(["router", "--engine", engine.url, "--model", tiny_llama, "--served-model-name", "tiny",
                            "--api-key", KEY, "--api-key", OTHER_KEY, "--max-body-bytes", "100000"], env=env)
    yield engine, router
    router.stop()
    engine.stop()


def test_user_keys_on_the_router(secured):
    _, router = secured
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 3}
    assert_clean_error(httpx.post(router.url + "/v1/completions", json=body), 401)
    assert_clean_error(httpx.post(router.url + "/v1/completions", json=body, headers=bearer("wrong")), 401)
    assert httpx.post(router.url + "/v1/completions", json=body, headers=bearer(KEY)).status_code == 200
    assert httpx.get(router.url + "/v1/models", headers=bearer(OTHER_KEY)).status_code == 200
    assert httpx.get(router.url + "/health").status_code == 200  # probes need no key


def test_user_keys_never_grant_cluster_surfaces(secured):
    engine, router = secured
    switch = {"name": "least_loaded"}
    assert_clean_error(httpx.post(router.url + "/admin/strategy", json=switch, headers=bearer(KEY)), 401)
    assert_clean_error(httpx.get(router.url + "/admin/strategy"), 401)
    assert httpx.post(router.url + "/admin/strategy", json=switch, headers=bearer(CLUSTER)).status_code == 200
    # The engine's microserving API (and with it the KV-transfer port's one-time tokens).
    prep = {"request_id": "x", "prompt": [1, 2, 3, 4], "end": 2}
    assert_clean_error(httpx.post(engine.url + "/microserving/prep_recv", json=prep, headers=bearer(KEY)), 401)
    assert_clean_error(httpx.get(engine.url + "/microserving/status"), 401)
    assert_clean_error(httpx.post(engine.url + "/v1/completions", json={"model": "tiny", "prompt": "a"},
                                  headers=bearer(KEY)), 401)
    status = httpx.get(engine.url + "/microserving/status", headers=bearer(CLUSTER)).json()
    assert status["kv_transfer"]["host"] == "127.0.0.1"
    # The shared-memory KV pool is readable and writable by its owner only.
    pools = glob.glob(f"/dev/shm/microserve-kv-{engine.proc.pid}-*")
    assert len(pools) == 2
    assert all(stat.S_IMODE(os.stat(p).st_mode) == 0o600 for p in pools)


def test_limits(secured):
    _, router = secured
    url, h = router.url + "/v1/completions", bearer(KEY)
    base = {"model": "tiny", "max_tokens": 2}
    assert_clean_error(httpx.post(url, json={**base, "prompt": "x" * 200_000}, headers=h), 413)

    def chunked():  # no Content-Length: counted as it arrives
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(30):
            yield b"y" * 10_000
        yield b'"}'

    assert_clean_error(httpx.post(url, content=chunked(), headers={**h, "content-type": "application/json"}), 413)
    assert_clean_error(httpx.post(url, json={**base, "prompt": list(range(5000))}, headers=h), 400)  # > context
    assert_clean_error(httpx.post(url, json={**base, "prompt": "a", "n": 17}, headers=h), 400)
    assert_clean_error(httpx.post(url, json={**base, "prompt": "a", "max_tokens": 10**9}, headers=h), 400)
    assert_clean_error(httpx.post(url, json={**base, "prompt": ["a"] * 65}, headers=h), 400)
    assert_clean_error(httpx.post(url, json={**base, "prompt": "a", "seed": 2**80}, headers=h), 400)
    assert_clean_error(httpx.post(url, json={**base, "prompt": "a", "stop": ["s"] * 17}, headers=h), 400)
    assert_clean_error(httpx.post(url, content=b"{not json", headers={**h, "content-type": "application/json"}), 400)
    assert httpx.post(url, json={**base, "prompt": "still fine"}, headers=h).status_code == 200


def test_servers_bind_to_loopback_by_default(tiny_llama):
    from microserve.cli import build_parser

    for cmd in (["engine"], ["router", "--engine", "http://127.0.0.1:1"], ["serve"]):
        assert build_parser().parse_args(cmd).host == "127.0.0.1"
    # Opening an engine to the network without a cluster token is refused before anything starts.
    r = subprocess.run([sys.executable, "-m", "microserve.cli", "engine", "--model", tiny_llama, "--host", "0.0.0.0"],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "MICROSERVE_CLUSTER_TOKEN": ""})
    assert r.returncode == 2 and "cluster-token" in r.stderr


def test_listening_sockets_are_loopback_only(secured):
    engine, router = secured
    ports = {engine.port, router.port}
    status = httpx.get(engine.url + "/microserving/status", headers=bearer(CLUSTER)).json()
    ports.add(status["kv_transfer"]["port"])
    listening = _listening()
    for port in ports:
        assert listening.get(port) == "127.0.0.1", (port, listening.get(port))


def _listening() -> dict[int, str]:
    """Local TCP listeners from /proc: port -> address."""
    out = {}
    with open("/proc/net/tcp") as f:
        for line in list(f)[1:]:
            local, _, state = line.split()[1:4]
            if state == "0A":  # LISTEN
                addr, port = local.split(":")
                out[int(port, 16)] = socket.inet_ntoa(bytes.fromhex(addr)[::-1])
    return out
