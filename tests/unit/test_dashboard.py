"""The dashboard's pure parts and its API in-process: metric parsing, histogram quantiles, series
rings in a real Valkey, who sees what, the controller views over a real ControllerStore, and
the HTTP routes (401 everywhere without a key, 403/404 for tenants) through FastAPI's client."""

from __future__ import annotations

import json
import math

import pytest
import torch
from fastapi.testclient import TestClient

from expertmesh.dashboard.cluster import NOT_ATTACHED, ClusterView, heatmap, plan_version_at, score
from expertmesh.dashboard.prom import BUCKET_BOUNDS_S, histogram_quantile, parse_gateway_metrics
from expertmesh.dashboard.series import GatewaySampler, SeriesConfig, SeriesStore, serving_series, tenant_totals
from expertmesh.dashboard.views import Viewer, jobs_page, loss_curve, thin
from expertmesh.jobs.model import JobRecord, JobState
from expertmesh.placement import plan_placement
from expertmesh.serve import GatewayConfig, build_services
from expertmesh.serve.backend import LocalBackend
from expertmesh.serve.gateway import create_app
from expertmesh.services.controller.store import ControllerStore
from expertmesh.telemetry import Telemetry, TelemetryConfig

N_BOUNDS = len(BUCKET_BOUNDS_S)


# ---- Prometheus text -> counters ------------------------------------------------------------------------
def test_parse_gateway_registry():
    telemetry = Telemetry(TelemetryConfig("dash-parse"))
    m = telemetry.metrics
    m.requests.add(3, {"route": "/v1/completions", "status": "200", "endpoint": "acme/chat", "tenant": "acme"})
    m.requests.add(1, {"route": "/v1/completions", "status": "503", "endpoint": "acme/chat", "tenant": "acme"})
    m.requests.add(7, {"route": "/dashboard/api/jobs", "status": "200"})  # no endpoint: not a serving request
    m.tokens.add(11, {"endpoint": "acme/chat", "tenant": "acme", "kind": "completion"})
    m.ttft.record(0.02, {"endpoint": "acme/chat"})
    m.ttft.record(0.3, {"endpoint": "acme/chat"})
    m.ongoing.add(2, {"endpoint": "beta/x"})
    telemetry.observe("expertmesh_job_queue_depth", "q", lambda: {(): 4.0})
    parsed = parse_gateway_metrics(telemetry.prometheus_text())
    chat = parsed.endpoints["acme/chat"]
    assert (chat.requests, chat.errors, chat.completion_tokens) == (4.0, 1.0, 11.0)
    assert chat.ttft_buckets[BUCKET_BOUNDS_S.index(0.025)] == 1.0 and chat.ttft_buckets[-1] == 2.0
    assert parsed.endpoints["beta/x"].in_flight == 2.0
    assert parsed.job_queue_depth == 4.0
    assert set(parsed.endpoints) == {"acme/chat", "beta/x"}


def test_histogram_quantile_interpolates_like_prometheus():
    bounds = (0.1, 0.5, math.inf)
    assert histogram_quantile(0.5, bounds, [2, 6, 6]) == pytest.approx(0.2)
    assert histogram_quantile(0.25, bounds, [2, 6, 6]) == pytest.approx(0.075)
    assert histogram_quantile(0.99, bounds, [0, 1, 3]) == 0.5  # rank in +Inf: the largest finite bound
    assert histogram_quantile(0.5, bounds, [0, 0, 0]) is None
    with pytest.raises(ValueError, match="quantile"):
        histogram_quantile(1.5, bounds, [1, 1, 1])


# ---- rings and series ---------------------------------------------------------------------------------
def _snap(t, requests, ttft_count=0, in_flight=0.0, name="acme/chat"):
    buckets = [0.0] * N_BOUNDS
    for i in range(BUCKET_BOUNDS_S.index(0.05), N_BOUNDS):
        buckets[i] = float(ttft_count)  # every observation in (0.025, 0.05]
    return {"t": t, "endpoints": {name: {"requests": requests, "in_flight": in_flight, "ttft_buckets": buckets}}}


def test_serving_series_adds_replicas_and_survives_restarts():
    rings = {
        "r1": [_snap(100, 0), _snap(102, 10, ttft_count=4, in_flight=1), _snap(104, 30, ttft_count=8)],
        "r2": [_snap(100.5, 5), _snap(102.5, 15, in_flight=2), _snap(104.5, 2)],  # r2 restarted: counts from 0
    }
    series = serving_series(rings, bin_s=2.0)["acme/chat"]
    assert series["t"] == [102.0, 104.0]
    assert series["requests_per_s"] == [5.0 + 5.0, 10.0 + 1.0]
    assert series["in_flight"] == [3.0, 0.0]
    assert 0.025 < series["ttft_p50_s"][0] <= 0.05
    assert series["window"]["ttft"]["count"] == 8.0
    assert serving_series(rings, 2.0, visible=lambda name: name.startswith("beta/")) == {}
    assert tenant_totals(rings) == {"acme": {"requests": 30.0 + 10.0 + 2.0, "tokens": 0.0}}


def test_rings_are_bounded_and_shared(client):
    store = SeriesStore(client, SeriesConfig(sample_interval_s=1.0, ring_samples=3))
    from expertmesh.dashboard.prom import EndpointCounters

    for t in range(5):
        store.push_gateway("a", 1000.0 + t, {"acme/chat": EndpointCounters(requests=t)})
    store.push_gateway("b", 1004.0, {})
    rings = store.gateway_rings(since_s=1000.0)
    assert [s["t"] for s in rings["a"]] == [1002.0, 1003.0, 1004.0] and len(rings["b"]) == 1
    assert store.gateway_rings(since_s=1004.5) == {}
    assert store.claim_tick() and not store.claim_tick()  # one replica per interval samples endpoints
    for t in range(5):
        store.push_replicas("acme", "chat", 1000.0 + t, t % 2 + 1, "RUNNING")
    assert [s["replicas"] for s in store.replica_ring("acme", "chat", 0)] == [1, 2, 1]


# ---- who sees what -------------------------------------------------------------------------------------
def _job(job_id, tenant, state=JobState.QUEUED):
    return JobRecord(job_id=job_id, tenant=tenant, name="run", state=state, spec={}, cpu=1, gpu=0, submitted_at=1.0)


def test_scoping_and_job_counts():
    operator, acme = Viewer(None), Viewer("acme")
    assert operator.sees_endpoint("beta/x") and acme.sees_endpoint("acme/chat") and not acme.sees_endpoint("beta/x")
    assert acme.to_dict()["pages"] == ["serving", "jobs", "tenants"]
    jobs = [_job("job-a", "acme"), _job("job-b", "beta"), _job("job-c", "acme", JobState.SUCCEEDED)]
    mine = jobs_page(jobs, acme, {"queued": 9}, 9)
    assert [j["job_id"] for j in mine["jobs"]] == ["job-a", "job-c"]
    assert mine["states"]["queued"] == 1 and mine["states"]["succeeded"] == 1 and mine["queue_depth"] == 1
    everything = jobs_page(jobs, operator, {"queued": 9}, 9)
    assert len(everything["jobs"]) == 3 and everything["queue_depth"] == 9


def test_loss_curve_and_thinning(tmp_path):
    steps, values = thin(list(range(10)), [float(i) for i in range(10)], max_points=4)
    assert steps == [0, 3, 6, 9] and values == [0.0, 3.0, 6.0, 9.0]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"kind": "step", "step": 1, "loss": 3.0}, {"kind": "step", "step": 2, "loss": 2.5},
        {"kind": "step", "step": 2, "loss": 2.4}, {"kind": "eval", "step": 2, "val_loss": 2.6}]) + "\n{torn")
    curve = loss_curve(str(tmp_path))
    assert curve["steps"] == [1, 2] and curve["loss"] == [3.0, 2.4] and curve["val_loss"] == [2.6]
    assert loss_curve("")["source"] is None


# ---- controller views ------------------------------------------------------------------------------------
def _plan(version=1, load=None):
    # 12 logical experts in 3 groups, 18 physical over 3 nodes x 2 slots (3 per slot)
    load_LE = load if load is not None else torch.ones(2, 12)
    return plan_placement(load_LE, version=version, num_replicas=18, num_groups=3, num_nodes=3, num_gpus=6)


def test_plan_and_balancedness_helpers():
    plan = _plan()
    grid = heatmap(plan, 0)
    assert len(grid) == 6 and len(grid[0]) == 12 and sum(map(sum, grid)) == 18
    assert score(torch.zeros(2, 12), plan) is None
    assert score(torch.tensor([[0.0] * 12, [1.0, 1, 1, 9] * 3]), plan) == pytest.approx(0.6)  # idle layer left out (not 1.0)
    events = [{"at": 10.0, "old": 1, "new": 2}, {"at": 20.0, "old": 2, "new": 3}]
    assert [plan_version_at(t, events, 3) for t in (5.0, 15.0, 25.0)] == [1, 2, 3]
    assert plan_version_at(5.0, [], 7) == 7


def test_cluster_view_over_a_real_controller_store(client):
    view = ClusterView(client, ray_nodes=lambda: None,
                       describe=lambda shards, routers, per_node: {
                           "slots": [{"slot": i, "node": i, "address": a, "healthy": a != "dead:1",
                                      "forwarder": True, "experts": {"1": [0, 1, 2]}} for i, a in enumerate(shards)],
                           "attention": [{"rank": 0, "address": routers[0], "healthy": True}]},
                       controller_status=lambda address: {"healthy": True, "plan_version": 1})
    assert view.experts() == {"attached": False, "message": NOT_ATTACHED}
    assert view.cluster()["attached"] is False
    store = ControllerStore.for_plane(client, "p1")
    store.save_plan(_plan())
    store.save_topology({"shards": ["a:1", "a:2", "b:1", "b:2", "c:1", "dead:1"], "routers": ["r:1"],
                         "moe_layers": [1, 2], "num_logical": 12, "n_group": 3, "nodes": ["n0", "n1", "n2"],
                         "slots_per_node": 2,
                         "controller": "c:1"})
    skewed = torch.tensor([[9.0, 1, 1, 1] * 3, [1.0, 1, 1, 9] * 3])
    store.append_load(skewed, window_s=600)
    view._cache = None
    assert view.cluster()["attached"] is False  # state of a plane that has not started yet
    store.make_current()
    view._cache = None
    c = view.cluster()
    assert c["attached"] and [n["healthy"] for n in c["nodes"]] == [True, True, False]
    assert [s["node"] for s in c["slots"]] == [0, 0, 1, 1, 2, 2] and c["message"] is None
    assert c["slots"][0]["experts_per_layer"] == 3
    assert [n["slots"] for n in c["nodes"]][2] == [4, 5] and c["nodes"][2]["healthy_slots"] == 1
    x = view.experts(layer=2)
    assert x["plan_version"] == 1 and x["expert_load"] == skewed[1].tolist()
    assert x["balancedness_now"] == pytest.approx(score(skewed, _plan()))
    better = _plan(2, skewed)
    store.save_plan(better, replaced=(x["balancedness_now"], score(skewed, better)))
    committed = view.experts(layer=2)  # the count comes with the plan, before the event is logged
    assert committed["plan_version"] == 2 and committed["replacements"] == 1
    assert committed["balancedness_before_last_replacement"] == pytest.approx(x["balancedness_now"])
    store.record_replacement(1, 2, x["balancedness_now"], score(skewed, better), 0.1)
    after = view.experts(layer=2)
    assert after["plan_version"] == 2 and after["balancedness_now"] > x["balancedness_now"]
    assert after["heatmap_slots"][5] == "slot 5 (node 2)"
    assert after["history"][0]["plan_version"] == 1  # the report came in under plan 1
    assert after["events"][0]["kind"] == "replacement" and "v1 → v2" in after["events"][0]["label"]
    with pytest.raises(ValueError, match="MoE layers"):
        view.experts(layer=0)

    # a second plane on the same store: shown from its start, with its own plans and no history of p1's
    second = ControllerStore.for_plane(client, "p2")
    second.save_plan(_plan())
    second.save_topology({"shards": ["d:1"] * 6, "routers": ["r:2"], "moe_layers": [1, 2], "num_logical": 12,
                          "n_group": 3, "nodes": ["n0", "n1", "n2"], "slots_per_node": 2})
    second.make_current()
    view._cache = None
    assert view.experts(layer=2)["plan_version"] == 1 and view.experts(layer=2)["replacements"] == 0
    assert view.cluster()["slots"][0]["address"] == "d:1"
    store.drop()  # the first plane stops: the pointer names p2, which stays shown
    assert client.get("em:ctl:current") in ("p2", b"p2") and store.topology() is None and store.current_plan() is None
    second.drop()
    assert client.get("em:ctl:current") is None and not client.keys("em:ctl:*")
    view._cache = None
    assert view.cluster()["attached"] is False and view.experts()["attached"] is False
    with pytest.raises(ValueError, match="plane id"):
        ControllerStore.for_plane(client, "a:b")


# ---- HTTP -------------------------------------------------------------------------------------------------
@pytest.fixture
def api(client, valkey, tmp_path):
    services = build_services(GatewayConfig(valkey.url, str(tmp_path / "home"), key_hash_n=2**8), LocalBackend(),
                              telemetry=Telemetry(TelemetryConfig("dash-api")))
    http = TestClient(create_app(services))
    admin = {"Authorization": f"Bearer {services.tenants.create_admin_key().key}"}
    keys = {}
    for tenant in ("acme", "beta"):
        assert http.post("/admin/tenants", json={"name": tenant}, headers=admin).status_code == 201
        keys[tenant] = {"Authorization": f"Bearer {http.post(f'/admin/tenants/{tenant}/keys', headers=admin).json()['key']}"}
    jobs = {t: services.jobs.submit(t, {"preset": "tiny", "name": f"{t}-run"}).job_id for t in ("acme", "beta")}
    return {"http": http, "admin": admin, "keys": keys, "jobs": jobs, "services": services}


def test_api_auth_and_scoping(api):
    http, admin, acme = api["http"], api["admin"], api["keys"]["acme"]
    for path in ("whoami", "cluster", "experts", "serving", "jobs", f"jobs/{api['jobs']['acme']}", "tenants", "x/y"):
        for headers in ({}, {"Authorization": "Bearer em_0123456789ab_wrongwrongwrongwrongwrongwr"},
                        {"Authorization": "Basic abc"}):
            r = http.get(f"/dashboard/api/{path}", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, r.text)
    assert http.get("/dashboard/api/cluster", headers=acme).status_code == 403
    assert http.get("/dashboard/api/experts", headers=acme).status_code == 403
    assert http.get(f"/dashboard/api/jobs/{api['jobs']['beta']}", headers=acme).status_code == 404
    assert http.get("/dashboard/api/jobs/job-0000000000", headers=admin).status_code == 404
    assert [j["tenant"] for j in http.get("/dashboard/api/jobs", headers=acme).json()["jobs"]] == ["acme"]
    assert len(http.get("/dashboard/api/jobs", headers=admin).json()["jobs"]) == 2
    assert [t["name"] for t in http.get("/dashboard/api/tenants", headers=acme).json()["tenants"]] == ["acme"]
    assert http.get("/dashboard/api/experts?layer=-1", headers=admin).status_code == 400
    assert http.get("/dashboard/api/x/y", headers=admin).status_code == 404
    assert http.get("/dashboard/api/cluster", headers=admin).json()["message"] == NOT_ATTACHED


def test_ui_assets(api):
    http = api["http"]
    page = http.get("/dashboard")
    assert page.status_code == 200 and "/dashboard/vendor/plotly.min.js" in page.text
    assert http.get("/dashboard/static/app.js").headers["content-type"].startswith("text/javascript")
    assert http.get("/dashboard/static/..%2F__init__.py").status_code == 404
    assert http.get("/dashboard/static/index.html").status_code == 404  # only the listed assets
    plotly = http.get("/dashboard/vendor/plotly.min.js")
    assert plotly.status_code == 200 and len(plotly.content) > 1_000_000


def test_sampler_fills_the_ring_on_poll(api):
    services = api["services"]
    services.telemetry.metrics.requests.add(5, {"endpoint": "acme/chat", "status": "200", "route": "/v1/completions"})
    sampler = GatewaySampler(services, SeriesStore(services.client, SeriesConfig(sample_interval_s=0.01)))
    assert sampler.sample_if_due()
    rings = sampler.store.gateway_rings(0)
    assert rings[sampler.replica_id][-1]["endpoints"]["acme/chat"]["requests"] == 5.0
