"""GET /admin/prometheus_targets: the router's engines as Prometheus HTTP service discovery,
in process (no engines are started: the app's lifespan does not run)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from microserve.router.app import build_router_app
from microserve.router.cluster import Cluster
from microserve.router.prometheus import prometheus_targets
from microserve.router.router import Router

TOKEN = "t0ken"


def _router() -> Router:
    cluster = Cluster(["http://127.0.0.1:20001", "http://10.0.0.7:20002/"], roles=["prefill", "decode"], token=TOKEN)
    cluster.engines[1].node = "node-b"
    return Router(cluster)


def test_one_target_group_per_engine_with_its_role():
    groups = prometheus_targets(_router().cluster.engines)
    assert groups == [
        {"targets": ["127.0.0.1:20001"],
         "labels": {"engine": "http://127.0.0.1:20001", "role": "prefill", "__scheme__": "http"}},
        {"targets": ["10.0.0.7:20002"],
         "labels": {"engine": "http://10.0.0.7:20002", "role": "decode", "__scheme__": "http", "node": "node-b"}},
    ]


def test_an_engine_behind_a_path_prefix_is_scraped_under_it():
    router = Router(Cluster(["https://gw.example/engines/a"]))
    (group,) = prometheus_targets(router.cluster.engines)
    assert group["targets"] == ["gw.example"]
    assert group["labels"]["__scheme__"] == "https"
    assert group["labels"]["__metrics_path__"] == "/engines/a/metrics"


def test_the_endpoint_needs_the_cluster_token():
    router = _router()
    client = TestClient(build_router_app(router, None, "m", cluster_token=TOKEN))
    assert client.get("/admin/prometheus_targets").status_code == 401
    r = client.get("/admin/prometheus_targets", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200
    assert r.json() == prometheus_targets(router.cluster.engines)
    assert [g["labels"]["role"] for g in r.json()] == ["prefill", "decode"]
