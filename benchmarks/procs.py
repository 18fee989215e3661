"""Start and stop `microserve` processes for benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], timeout: float = 180) -> tuple[subprocess.Popen, str]:
    """`microserve <args> --port N` in its own process group; returns (process, URL) once healthy."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "microserve.cli", *args, "--port", str(port),
                             "--log-level", "warning"], start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    stop(proc)
    raise RuntimeError(f"`microserve {' '.join(args)}` did not become healthy")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    proc.wait()
