"""Start and stop real `microserve` server processes for tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx

TOKEN = "secret-admin-token"  # the cluster token router tests start with


SERVE_TOKEN = "e2e-cluster-token"  # the cluster token of the shared `serve` (tests/e2e/conftest.py)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not become healthy")


UVICORN_STARTUP_FAILURE = 3  # uvicorn's exit code when it cannot bind (or its start-up fails)


class PortTaken(RuntimeError):
    pass


class ServerProcess:
    """`python -m microserve.cli <args> --port N`, waited on until /health answers, stopped on exit."""

    def __init__(self, args: list[str], timeout: float = 120, port: int | None = None, env: dict | None = None):
        self.args = args
        self.env = {**os.environ, "MICROSERVE_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        self.log = open(os.devnull, "w") if not os.environ.get("MICROSERVE_TEST_LOGS") else None
        for attempt in range(3):
            self._start(port or free_port())
            try:
                self._wait(timeout)
                return
            except PortTaken:
                # Most likely free_port's port was handed out again before the server bound
                # it (e.g. to the engine's own KV listener, which binds an ephemeral port):
                # another port. A server that cannot start at all fails three times.
                if port is not None or attempt == 2:
                    raise

    def _start(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "microserve.cli", *self.args, "--port", str(port)],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT if self.log else None,
            start_new_session=True,
        )

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if self.proc.returncode == UVICORN_STARTUP_FAILURE:
                    raise PortTaken(f"server exited with {self.proc.returncode} while starting: {self.args}")
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.args}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server did not become healthy: {self.args}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.log:
            self.log.close()

    def metric(self, name: str) -> float:
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)


def prompt_of(n, seed):
    """`n` random token ids of the SmolLM2 vocabulary, the same for the same seed."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 49152, (n,), generator=g).tolist()


def complete(server, prompt, max_tokens=12):
    """Greedy /v1/completions text of model `tiny`."""
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": max_tokens,
                                                         "temperature": 0, "ignore_eos": True}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def start_serve(*args: str, env: dict | None = None, timeout: float = 300) -> tuple[str, subprocess.Popen]:
    """`microserve serve ARGS` in its own process group, waited on until its router is healthy."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "microserve.cli", "serve", "--port", str(port), *args],
                            env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, timeout=timeout)
    except Exception:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return url, proc


def stop_serve(proc: subprocess.Popen) -> None:
    """SIGTERM to `serve` and everything it started; SIGKILL if they linger."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
