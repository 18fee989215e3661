"""The fuzz of valid requests (tests/fuzz_requests.py) against `microserve serve` as users run
it: the built-in model on its C++ kernels, and a simulated fleet. After it, every engine is
up, a plain request answers and no KV block is held. benchmarks/fuzz_serve.py is the long run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings

from fuzz_requests import Fuzzer, cases, check_cluster
from server_utils import free_port, wait_healthy

EXAMPLES = int(os.environ.get("MICROSERVE_FUZZ_SERVE_EXAMPLES", "40"))
TOKEN = "fuzz-serve-token"
SIMULATED = "llama-3.1-8b@h100"
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def start_serve(*args: str):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "microserve.cli", "serve", "--port", str(port), *args],
                            env={**os.environ, "MICROSERVE_CLUSTER_TOKEN": TOKEN}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, timeout=300)
    except Exception:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return url, proc


def stop(proc) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module", params=["builtin", "simulated"])
def fleet(request):
    args = ["--engines", "2"] if request.param == "builtin" else ["--engines", "4", "--simulate", SIMULATED]
    url, proc = start_serve(*args)
    fuzzer = Fuzzer(url, TOKEN)
    yield fuzzer, url
    fuzzer.close()
    stop(proc)


def test_fuzz_valid_requests_through_serve(fleet):
    fuzzer, url = fleet

    @SETTINGS
    @given(case=cases(fuzzer.model))
    def fuzz(case):
        fuzzer.run(case)

    fuzz()
    check_cluster(url, TOKEN)
    t = fuzzer.tally
    print(f"\n{t.cases} cases ({t.streamed} streamed, {t.tokens} tokens counted) by strategy "
          f"{dict(t.by_strategy)}, fields {dict(t.by_field)}")
    assert t.cases >= EXAMPLES // 2 and len(t.by_strategy) >= 3
