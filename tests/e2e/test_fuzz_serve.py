"""The fuzz of valid requests (tests/fuzz_requests.py) against `microserve serve` as users run
it: the built-in model on its C++ kernels, and a simulated fleet. After it, every engine is
up, a plain request answers and no KV block is held. benchmarks/fuzz_serve.py is the long run."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings

from fuzz_requests import FLEETS, TOKEN, Fuzzer, cases, check_cluster
from server_utils import start_serve, stop_serve

pytestmark = pytest.mark.slow  # loads the built-in model or starts server processes

EXAMPLES = int(os.environ.get("MICROSERVE_FUZZ_SERVE_EXAMPLES", "40"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module", params=["builtin", "simulated"])
def fleet(request):
    url, proc = start_serve(*FLEETS[request.param], env={"MICROSERVE_CLUSTER_TOKEN": TOKEN})
    fuzzer = Fuzzer(url, TOKEN)
    yield fuzzer, url
    fuzzer.close()
    stop_serve(proc)


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
