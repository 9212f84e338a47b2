"""The dashboard in a real browser (Playwright driving Debian's headless Chromium) against the
real stack: the platform (local Ray head, Valkey, gateway on Ray Serve, job scheduler on Ray
Jobs) on a three-node Ray cluster (two more raylets joined with ``ray start``), one endpoint,
and the distributed data plane on those nodes with its controller on the platform's Valkey.

One module-scoped stack serves every test. Screenshots go to ``artifacts/dashboard/``.
Chromium comes from Debian (``make test`` installs it); nothing is downloaded here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import ray
from tiny_models import save_hf_checkpoint, servable_checkpoint_and_fake_trainer

from expertmesh.engine import SamplingParams
from expertmesh.protos import load
from expertmesh.serve.client import PlatformClient
from expertmesh.serve.platform import Platform, PlatformConfig
from expertmesh.services.dataplane import DataPlane, DataPlaneConfig
from expertmesh.services.server import channel
from expertmesh.store import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "dashboard"
NODES, SLOTS_PER_NODE = 3, 2
SCHEDULER = {"poll_interval_s": 0.3, "claim_idle_ms": 1000}
PROMPTS = [[5, 8, 11, 14], [6, 9, 12, 15], [5, 8, 11, 14, 17]]  # the same few prompts: skewed expert load
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
UI_TIMEOUT_MS = 60_000
ctl_pb, ctl_grpc = load("controller_pb2"), load("controller_pb2_grpc")

# A stand-in trainer for the job queue: writes the trainer's metrics.jsonl records (a falling loss,
# validation every 10 steps) to <out>, prints a few lines, exits 0.
FAKE_TRAINER = '''
import json, math, pathlib, sys, time
spec = json.loads(open(sys.argv[1]).read())
out = pathlib.Path(sys.argv[sys.argv.index("--out") + 1])
out.mkdir(parents=True, exist_ok=True)
with open(out / "metrics.jsonl", "w") as f:
    for step in range(1, 41):
        f.write(json.dumps({"kind": "step", "time": time.time(), "step": step,
                            "loss": 1.5 + 4.0 * math.exp(-step / 12)}) + "\\n")
        if step % 10 == 0:
            f.write(json.dumps({"kind": "eval", "time": time.time(), "step": step,
                                "val_loss": 1.7 + 4.0 * math.exp(-step / 12)}) + "\\n")
print(f"fake training {spec['name']}: 40 steps", flush=True)
print("final loss 1.58", flush=True)
'''


def _join_raylet(platform: Platform, log_path: Path) -> subprocess.Popen:
    """One more Ray node on this machine, joined to the platform's head as `ray start` would."""
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", f"--address={platform.ray.address}", "--block",
           "--num-cpus=1", f"--object-store-memory={150 * 1024**2}", "--disable-usage-stats",
           f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
           f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
    with open(log_path, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **platform.ray.env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "2"})


def _wait(predicate, what: str, timeout_s: float = 120.0, interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval_s)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: `make browser-deps` (apt-get install chromium) installs it")
    root = tmp_path_factory.mktemp("dashboard")
    ckpt, _ = servable_checkpoint_and_fake_trainer(root)
    dp_ckpt = save_hf_checkpoint(root / "dp", seed=3, n_routed_experts=12, n_group=3, topk_group=2,
                                 num_experts_per_tok=4)
    trainer = root / "fake_trainer.py"
    trainer.write_text(FAKE_TRAINER)
    config = PlatformConfig(state_dir=root / "state", port=free_port(), num_cpus=2, object_store_bytes=300 * 1024**2,
                            key_hash_n=2**8, gateway_max_replicas=1, scheduler=SCHEDULER, home=root / "home",
                            job_command=("{python}", str(trainer), "{spec}", "--out", "{out}"))
    platform = Platform.start(config)
    workers: list[subprocess.Popen] = []
    plane = None
    state: dict = {}
    try:
        workers = [_join_raylet(platform, root / f"raylet{i}.log") for i in range(NODES - 1)]

        def joined() -> bool:
            for i, worker in enumerate(workers):  # `ray start` gives a raylet 30 s to register: a loaded
                if worker.poll() is not None:     # machine can miss that, so a failed join is retried
                    workers[i] = _join_raylet(platform, root / f"raylet{i}.log")
            return sum(n["Alive"] for n in ray.nodes()) >= NODES

        _wait(joined, f"{NODES} Ray nodes", timeout_s=300)
        admin = PlatformClient(platform.url, platform.admin_key)
        keys = {}
        for tenant in ("acme", "beta"):
            admin.create_tenant(tenant, {"max_concurrent_jobs": 1, "cpu_slots": 2, "requests_per_min": 6000,
                                         "tokens_per_min": 10_000_000})
            keys[tenant] = admin.create_key(tenant)["key"]
        admin.deploy_endpoint(name="chat", tenant="acme", model=str(ckpt), num_cpus=0.25)
        jobs = {t: admin.submit_job({"preset": "tiny", "name": f"{t}-run"}, tenant=t)["job_id"]
                for t in ("acme", "beta")}
        plane = DataPlane.start(DataPlaneConfig(str(dp_ckpt), num_nodes=NODES, slots_per_node=SLOTS_PER_NODE,
                                                redis_url=platform.store.url, rebalance_interval_s=None,
                                                load_window_s=600, min_gain=0.001))
        _wait(lambda: admin.get_endpoint("acme", "chat")["status"] == "RUNNING", "endpoint acme/chat", 180)
        headers = {"Authorization": f"Bearer {keys['acme']}"}
        for _ in range(4):  # streamed completions: requests/s, TTFT and inter-token latency to plot
            with httpx.stream("POST", f"{platform.url}/v1/completions", headers=headers, timeout=120,
                              json={"model": "chat", "prompt": "def f(", "max_tokens": 6, "stream": True}) as r:
                assert r.status_code == 200
                r.read()
        for job_id in jobs.values():
            _wait(lambda j=job_id: admin.get_job(j)["state"] == "succeeded", f"job {job_id}", 180)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        state.update(platform=platform, admin=admin, keys=keys, jobs=jobs, plane=plane, url=platform.url,
                     dp_ckpt=dp_ckpt)
        yield state
    finally:
        plane = state.get("plane", plane)  # a test may have replaced it
        if plane is not None:
            plane.stop()
        for worker in workers:
            worker.terminate()
        for worker in workers:
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, 9)
        platform.stop()


@pytest.fixture(scope="module")
def browser(stack):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def _login(browser, url: str, key: str, page_name: str | None = None):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{url}/dashboard" + (f"#{page_name}" if page_name else ""))
    page.fill("#key-input", key)
    page.click("#login-button")
    page.wait_for_selector("#app:not([hidden])")
    page.errors = errors  # type: ignore[attr-defined]
    return page


def _shot(page, name: str) -> None:
    page.wait_for_timeout(300)  # let Plotly finish its transition
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _api(stack, path: str, key: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"{stack['url']}/dashboard/api/{path}", headers=headers, timeout=30)


def _settled_balancedness(stack, poll_s: float = 6.0, timeout_s: float = 120.0) -> float:
    """The dashboard's current balancedness once the controller's load polls (every 5 s) bring
    nothing new: two reads a poll apart agree."""
    key, deadline, last = stack["platform"].admin_key, time.monotonic() + timeout_s, None
    while True:
        now = _api(stack, "experts", key).json()["balancedness_now"]
        if now is not None and now == last:
            return now
        assert time.monotonic() < deadline, f"balancedness did not settle: {last} -> {now}"
        last = now
        time.sleep(poll_s)


# ---- tests --------------------------------------------------------------------------------------------
def test_unauthenticated_api_calls_get_401(stack):
    for path in ("whoami", "cluster", "experts", "serving", "jobs", f"jobs/{stack['jobs']['acme']}", "tenants",
                 "no/such/route"):
        for key in (None, "em_0123456789ab_notarealsecretnotarealsecret"):
            r = _api(stack, path, key)
            assert r.status_code == 401, (path, key, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{stack['url']}/dashboard", timeout=30).status_code == 200  # the shell holds no data


def test_operator_sees_cluster_with_its_nodes(stack, browser):
    page = _login(browser, stack["url"], stack["platform"].admin_key, "cluster")
    page.wait_for_function("document.getElementById('cluster-node-count').textContent === '3'")
    total = NODES * SLOTS_PER_NODE
    page.wait_for_function(f"document.getElementById('cluster-slots').textContent === '{total} / {total}'")
    assert page.text_content("#cluster-ray-nodes") == f"{NODES} / {NODES}"
    assert page.text_content("#cluster-plan") == "v1"
    assert page.locator("#nodes-table tr[data-node]").count() == NODES
    assert page.is_hidden("#cluster-message")
    _shot(page, "cluster")
    assert page.errors == []


def test_balancedness_changes_live_after_forced_replacement(stack, browser):
    plane = stack["plane"]
    for _ in range(2):
        plane.generate(PROMPTS, GREEDY)  # skewed load; the controller collects it within its poll (5 s)
    settled = _settled_balancedness(stack)  # else the forced re-placement may see load the page did not
    page = _login(browser, stack["url"], stack["platform"].admin_key, "experts")
    page.wait_for_function(f"""(() => {{
        const text = document.getElementById('experts-balancedness-now').textContent;
        return /^[01]\\.\\d{{3}}$/.test(text) && Math.abs(parseFloat(text) - {settled}) < 0.0011; }})()""")
    before = page.text_content("#experts-balancedness-now")
    assert page.text_content("#experts-plan-version") == "v1"
    _shot(page, "experts-before")
    stub = ctl_grpc.ControllerStub(channel(plane.controller_address))
    result = stub.Rebalance(ctl_pb.RebalanceRequest(force=True), timeout=300)
    assert result.replaced and result.new_version > result.old_version == 1, result.reason
    assert float(before) == pytest.approx(result.balancedness_before, abs=2e-3)
    # no reload: the page's own polling picks the new plan up
    page.wait_for_function(f"document.getElementById('experts-plan-version').textContent === 'v{result.new_version}'")
    after = page.text_content("#experts-balancedness-now")
    assert after != before
    assert float(after) == pytest.approx(result.balancedness_after, abs=2e-3)
    assert page.text_content("#experts-balancedness-before") == before
    # the re-placement is marked on the balancedness chart once its event is logged (after the switch,
    # which comes after the commit the version above is read from): a later poll draws it
    page.wait_for_function("(document.getElementById('chart-balancedness').layout?.shapes?.length ?? 0) >= 1")
    heat = page.evaluate("document.getElementById('chart-heatmap').data[0].z")
    assert len(heat) == NODES * SLOTS_PER_NODE and len(heat[0]) == 12
    _shot(page, "experts-after")
    assert page.errors == []


def test_serving_page_shows_endpoint_rates_and_latency(stack, browser):
    body = _api(stack, "serving", stack["platform"].admin_key).json()
    chat = next(e for e in body["endpoints"] if e["endpoint"] == "acme/chat")
    assert chat["status"] == "RUNNING" and chat["replicas"] == 1
    window = chat["series"]["window"]
    assert window["ttft"]["count"] >= 4 and window["ttft"]["p50"] > 0 and window["itl"]["count"] > 0
    assert sum(chat["series"]["requests_per_s"]) > 0
    page = _login(browser, stack["url"], stack["platform"].admin_key, "serving")
    page.wait_for_selector("[data-endpoint='acme/chat'] .summary:has-text('TTFT p50')")
    _shot(page, "serving")
    assert page.errors == []


def test_tenant_sees_only_its_own_jobs(stack, browser):
    acme_job, beta_job = stack["jobs"]["acme"], stack["jobs"]["beta"]
    acme = stack["keys"]["acme"]
    assert _api(stack, f"jobs/{beta_job}", acme).status_code == 404
    assert [j["job_id"] for j in _api(stack, "jobs", acme).json()["jobs"]] == [acme_job]
    assert _api(stack, "cluster", acme).status_code == 403
    assert [e["endpoint"] for e in _api(stack, "serving", stack["keys"]["beta"]).json()["endpoints"]] == []
    page = _login(browser, stack["url"], acme, "jobs")
    page.wait_for_selector(f"#jobs-table tr[data-job-id='{acme_job}']")
    assert page.locator(f"#jobs-table tr[data-job-id='{beta_job}']").count() == 0
    assert page.text_content("#jobs-table").count("job-") == 1
    assert page.is_hidden("#nav a[data-page='cluster']") and page.is_hidden("#nav a[data-page='experts']")
    page.click(f"#jobs-table tr[data-job-id='{acme_job}']")
    page.wait_for_function("(document.getElementById('chart-loss').data || [])[0]?.x.length === 40")
    page.wait_for_selector("#job-logs:has-text('fake training acme-run')")
    _shot(page, "jobs-tenant")
    page.goto(f"{stack['url']}/dashboard#tenants")  # same tab: the key is still in sessionStorage
    page.wait_for_selector("#tenants-table tr[data-tenant='acme']")
    assert page.locator("#tenants-table tr[data-tenant='beta']").count() == 0
    assert page.errors == []


def test_operator_sees_every_job_and_tenant(stack, browser):
    page = _login(browser, stack["url"], stack["platform"].admin_key, "jobs")
    for job_id in stack["jobs"].values():
        page.wait_for_selector(f"#jobs-table tr[data-job-id='{job_id}']")
    page.click("#nav a[data-page='tenants']")
    page.wait_for_selector("#tenants-table tr[data-tenant='beta']")
    assert json.loads(json.dumps(_api(stack, "tenants", stack["platform"].admin_key).json()))["tenants"][0]["quotas"]
    _shot(page, "tenants")
    assert page.errors == []


def test_a_replacement_data_plane_starts_fresh_and_is_shown(stack):
    """Runs last (it replaces the plane). A stopped plane removes its controller state from the
    platform's store, so the pages stop showing it; a new plane on the same store gets a fresh
    controller (plan v1, no re-placements, its own slots) instead of the old plane's plan and
    addresses, and the pages show it."""
    admin_key = stack["platform"].admin_key
    old = stack["plane"]
    before = [t for t, _ in old.generate(PROMPTS, GREEDY)]
    old.stop()
    stack["plane"] = None
    _wait(lambda: _api(stack, "cluster", admin_key).json()["attached"] is False, "the stopped plane to leave", 30)
    assert _api(stack, "experts", admin_key).json()["attached"] is False
    new = DataPlane.start(DataPlaneConfig(str(stack["dp_ckpt"]), num_nodes=NODES, slots_per_node=SLOTS_PER_NODE,
                                          redis_url=stack["platform"].store.url, rebalance_interval_s=None))
    stack["plane"] = new
    assert new.plane_id != old.plane_id
    assert [t for t, _ in new.generate(PROMPTS, GREEDY)] == before

    def shown() -> bool:
        c = _api(stack, "cluster", admin_key).json()
        return c["attached"] and c["controller"]["address"] == new.controller_address
    _wait(shown, "the new plane on the cluster page", 30)
    c = _api(stack, "cluster", admin_key).json()
    assert c["plan_version"] == 1 and c["replacements"] == 0 and c["message"] is None
    assert sorted(s["address"] for s in c["slots"]) == sorted(new.shard_addresses)
    assert all(s["healthy"] for s in c["slots"])
    assert _api(stack, "experts", admin_key).json()["plan_version"] == 1
