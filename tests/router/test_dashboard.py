"""The router's live page (/dashboard) over a simulated fleet in two roles, under load: its
data endpoint is behind the cluster token, and the page, in headless Chromium, shows the
engines, their events and the requests' latency, and switches the strategy.

MICROSERVE_DASHBOARD_FIGURE=docs/figures/dashboard.png also writes the page's screenshot
there, after a minute of load (the figure in the README)."""

from __future__ import annotations

import os
import threading
import time

import httpx
import pytest

from browser import Chromium, find_chromium
from server_utils import start_serve, stop_serve

pytestmark = pytest.mark.slow  # starts `serve` (simulated engines and a router) and a browser

PROFILE = "llama-3.1-8b@h100"
TOKEN = "dashboard-test-token"
ROLES = ["prefill"] * 3 + ["decode"] * 5
FIGURE = os.environ.get("MICROSERVE_DASHBOARD_FIGURE")


@pytest.fixture(scope="module")
def fleet():
    url, proc = start_serve("--simulate", PROFILE, "--roles", ",".join(ROLES), "--strategy", "disagg",
                            env={"MICROSERVE_CLUSTER_TOKEN": TOKEN}, timeout=120)
    try:
        yield url
    finally:
        stop_serve(proc)


class Load:
    """A few clients sending completions in a loop until stopped."""

    def __init__(self, url: str, clients: int = 6):
        self.url = url
        self.stopping = threading.Event()
        self.done = 0
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]
        for t in self.threads:
            t.start()

    def _client(self, i: int) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            k = 0
            while not self.stopping.is_set():
                k += 1
                prompt = f"client {i} asks question {k}: " + "tell me a long story about routers " * (5 + k % 20)
                r = client.post("/v1/completions", json={"model": PROFILE, "prompt": prompt, "ignore_eos": True,
                                                         "max_tokens": 16 + 8 * (k % 6), "temperature": 0})
                self.done += r.status_code == 200

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=60)


def admin(url: str, token: str | None = TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"} if token else {}


def test_live_data_needs_the_cluster_token(fleet):
    page = httpx.get(fleet + "/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert TOKEN not in page.text and "http://" not in page.text.split("<script>")[0]  # no data, nothing external
    for token in (None, "wrong-token"):
        r = httpx.get(fleet + "/admin/live", headers=admin(fleet, token))
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
    r = httpx.get(fleet + "/admin/live", params={"per_page": 5, "page": 2}, headers=admin(fleet))
    assert r.status_code == 200
    snap = r.json()
    assert (snap["engines_total"], snap["pages"], snap["page"], len(snap["engines"])) == (8, 2, 2, 3)
    assert [(s["role"], s["engines"]) for s in snap["roles"]] == [("prefill", 3), ("decode", 5)]
    assert snap["router"]["strategy"] == "disagg" and "least_loaded" in snap["router"]["strategies"]
    assert any("joined as decode" in e["text"] for e in snap["events"])


def test_page_shows_the_engines_and_switches_strategy(fleet, tmp_path):
    binary = find_chromium()
    if binary is None:
        pytest.skip("no chromium binary (Debian: apt-get install chromium; or set MICROSERVE_CHROMIUM)")
    pytest.importorskip("websockets", reason="the DevTools client needs the websockets package")
    engines = httpx.get(fleet + "/admin/engines", headers=admin(fleet)).json()["engines"]
    load = Load(fleet)
    browser = Chromium(binary)
    try:
        page = browser.page()
        page.set_size(1400, 1000)
        page.goto(fleet + "/dashboard")  # no token: the page asks for it
        page.wait_for("!document.getElementById('gate').hidden")
        page.goto(f"{fleet}/dashboard?token={TOKEN}")
        page.wait_for("document.querySelectorAll('#engines tr[data-url]').length === 8")
        assert page.evaluate("location.search") == ""  # the token left the address bar
        shown = page.evaluate("[...document.querySelectorAll('#engines tr[data-url]')].map(r => r.dataset.url)")
        assert sorted(shown) == sorted(e["url"] for e in engines)
        assert page.evaluate("document.getElementById('engines').textContent").count("prefill") == 3
        page.wait_for("document.getElementById('t-ttft').textContent.includes('ms')", timeout=30)
        switch_strategy(fleet, page, "least_loaded")
        drain_one(fleet, page, engines[-1]["url"])
        if FIGURE:
            time.sleep(60)  # a minute of load on the chart
        page.set_size(1400, page.evaluate("document.documentElement.scrollHeight"))
        time.sleep(1.5)  # a poll and a redraw at the new size
        page.screenshot(FIGURE or str(tmp_path / "dashboard.png"))
        page.close()
    finally:
        browser.stop()
        load.stop()
    assert load.done > 0


def switch_strategy(url: str, page, name: str) -> None:
    page.evaluate(f"""(() => {{ const s = document.getElementById('strategy');
        s.value = {name!r}; s.dispatchEvent(new Event('change')); document.getElementById('apply').click(); }})()""")
    deadline = time.monotonic() + 10
    while httpx.get(url + "/admin/strategy", headers=admin(url)).json()["name"] != name:
        assert time.monotonic() < deadline, "the switcher did not change the router's strategy"
        time.sleep(0.1)
    page.wait_for(f"document.getElementById('event-rows').textContent.includes('-> {name}')")


def drain_one(url: str, page, engine_url: str) -> None:
    """A drain shows in the event log, and the engine leaves the table."""
    r = httpx.post(url + "/admin/engines", json={"action": "drain", "url": engine_url, "timeout_s": 10},
                   headers=admin(url), timeout=30)
    assert r.status_code == 200, r.text
    page.wait_for(f"document.getElementById('event-rows').textContent.includes('{engine_url} left the router')")
    page.wait_for("document.querySelectorAll('#engines tr[data-url]').length === 7")
