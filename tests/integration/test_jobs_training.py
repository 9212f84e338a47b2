"""The real thing, slowly: a tenant submits the ``tiny`` training preset over HTTP, the
scheduler runs ``python -m expertmesh train`` through Ray Jobs, the job records the
exported checkpoint, and an endpoint deployed from the JOB_ID answers completions."""

from __future__ import annotations

import time

import openai
import pytest

from expertmesh.serve.client import PlatformClient
from expertmesh.serve.platform import Platform, PlatformConfig
from expertmesh.store import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_training_job_to_endpoint(tmp_path):
    platform = Platform.start(PlatformConfig(state_dir=tmp_path / "state", port=free_port(), num_cpus=3,
                                             object_store_bytes=300 * 1024**2, key_hash_n=2**8,
                                             gateway_max_replicas=1, scheduler={"poll_interval_s": 1.0}))
    try:
        admin = PlatformClient(platform.url, platform.admin_key)
        admin.create_tenant("acme")
        key = admin.create_key("acme")["key"]
        tenant = PlatformClient(platform.url, key)
        job = tenant.submit_job({"preset": "tiny", "steps": 4, "checkpoint_every": 2, "eval_every": 2})
        deadline = time.monotonic() + 600
        while (job := tenant.get_job(job["job_id"]))["state"] in ("queued", "running"):
            assert time.monotonic() < deadline, tenant.job_logs(job["job_id"], tail=40)
            time.sleep(2)
        assert job["state"] == "succeeded", (job["error"], job["log_tail"])
        assert job["checkpoint"].endswith("/run/checkpoint")
        admin.deploy_endpoint(name="tiny", tenant="acme", model=job["job_id"], num_cpus=0.5)
        while (info := admin.get_endpoint("acme", "tiny"))["status"] != "RUNNING":
            assert info["status"] not in ("DEPLOY_FAILED", "UNHEALTHY"), info
            time.sleep(0.5)
        assert info["has_tokenizer"]
        out = openai.OpenAI(base_url=platform.url + "/v1", api_key=key, max_retries=0).completions.create(
            model="tiny", prompt="def ", max_tokens=8, temperature=0)
        assert out.usage.completion_tokens >= 1 and out.usage.prompt_tokens >= 1
    finally:
        platform.stop()
