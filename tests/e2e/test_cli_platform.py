"""The operator CLI end to end: ``expertmesh platform up --detach``, tenants, keys, endpoints,
jobs (submit, logs -f, list, cancel) with ``--json``, a real OpenAI call with the printed
key, then ``down``. Jobs run a fake trainer (``EXPERTMESH_JOB_COMMAND``) so they take seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import openai
import pytest
from tiny_models import servable_checkpoint_and_fake_trainer

from expertmesh.store import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    ckpt, trainer = servable_checkpoint_and_fake_trainer(root)
    env = {**os.environ, "EXPERTMESH_HOME": str(root / "home"), "EXPERTMESH_STATE_DIR": str(root / "state"),
           "EXPERTMESH_JOB_COMMAND": json.dumps(["{python}", str(trainer), "{spec}", "--out", "{out}"])}
    for name in ("EXPERTMESH_URL", "EXPERTMESH_API_KEY", "EXPERTMESH_ADMIN_KEY", "REDIS_URL", "RAY_ADDRESS"):
        env.pop(name, None)

    def run(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "expertmesh", *args], env=env, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"expertmesh {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    port = free_port()
    up = run("platform", "up", "--detach", "--port", str(port), "--num-cpus", "3")
    url = up.stdout.strip().splitlines()[-1]
    assert url == f"http://127.0.0.1:{port}"
    yield {"run": run, "url": url, "ckpt": ckpt, "root": root}
    run("platform", "down", check=False)  # idempotent cleanup if the test did not get there


def test_cli_platform_lifecycle(cli):
    run = cli["run"]
    again = run("platform", "up", "--port", "1", check=False)
    assert again.returncode == 2 and "already up" in again.stderr

    tenant = json.loads(run("tenants", "create", "acme", "--requests-per-min", "1000", "--json").stdout)
    assert tenant["name"] == "acme" and tenant["quotas"]["requests_per_min"] == 1000
    key = run("keys", "create", "--tenant", "acme").stdout.strip().splitlines()[-1]
    assert key.startswith("em_")
    assert json.loads(run("keys", "create", "--tenant", "acme", "--json").stdout)["key"].startswith("em_")
    missing = run("keys", "create", "--tenant", "ghost", check=False)
    assert missing.returncode == 2 and missing.stderr.startswith("error: tenant 'ghost' does not exist")

    deployed = json.loads(run("endpoints", "deploy", "chat", "--tenant", "acme", "--model", str(cli["ckpt"]),
                              "--max-replicas", "2", "--num-cpus", "0.5", "--wait", "--json").stdout)
    assert deployed["status"] == "RUNNING" and deployed["max_replicas"] == 2
    listed = json.loads(run("endpoints", "list", "--json").stdout)
    assert [(e["tenant"], e["name"], e["status"]) for e in listed] == [("acme", "chat", "RUNNING")]
    out = openai.OpenAI(base_url=cli["url"] + "/v1", api_key=key, max_retries=0).completions.create(
        model="chat", prompt="hello", max_tokens=3, temperature=0)
    assert out.usage.completion_tokens == 3

    job = json.loads(run("jobs", "submit", "--preset", "tiny", "--steps", "3", "--tenant", "acme", "--json").stdout)
    logs = run("jobs", "logs", job["job_id"], "-f", timeout=120).stdout
    assert "fake training tiny" in logs and f"[job {job['job_id']} succeeded]" in logs
    shown = json.loads(run("jobs", "show", job["job_id"], "--json").stdout)
    assert shown["state"] == "succeeded" and shown["checkpoint"]
    spec = cli["root"] / "sleepy.yaml"
    spec.write_text("preset: tiny\nname: sleepy\n")
    sleepy = run("jobs", "submit", str(spec), "--api-key", key).stdout.strip().splitlines()[-1]  # as the tenant
    cancelled = json.loads(run("jobs", "cancel", sleepy, "--json").stdout)
    assert cancelled["state"] == "cancelled"
    states = {j["job_id"]: j["state"] for j in json.loads(run("jobs", "list", "--json").stdout)}
    assert states == {job["job_id"]: "succeeded", sleepy: "cancelled"}
    bad = run("jobs", "submit", "--preset", "tiny", "--steps", "0", "--tenant", "acme", check=False)
    assert bad.returncode == 2 and "steps: Input should be greater than 0" in bad.stderr

    status = json.loads(run("platform", "status", "--json").stdout)
    assert status["healthy"] and status["url"] == cli["url"]
    assert json.loads(run("platform", "down", "--json", timeout=180).stdout)["stopped"] is True
    assert run("platform", "down", check=False).returncode == 2
