"""``expertmesh tenants|keys|endpoints|jobs ...``: the platform's resources over HTTP.

The gateway is found by ``--url`` / ``EXPERTMESH_URL``, else the running platform's
``state.json``, else ``http://127.0.0.1:8000``. The key is ``--api-key`` /
``EXPERTMESH_API_KEY`` (a tenant key works for ``jobs``), else ``EXPERTMESH_ADMIN_KEY``,
else the operator key ``up`` saved in the state directory. Every command takes ``--json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from expertmesh.cli import CLIError, app
from expertmesh.cli.platform import StateDirOption, state_dir_or_default

DEFAULT_URL = "http://127.0.0.1:8000"

tenants_app = typer.Typer(help="Tenants and their quotas (operator key).", no_args_is_help=True)
keys_app = typer.Typer(help="API keys (operator key).", no_args_is_help=True)
endpoints_app = typer.Typer(help="Autoscaled OpenAI-compatible endpoints (operator key).", no_args_is_help=True)
jobs_app = typer.Typer(help="Training jobs.", no_args_is_help=True)
app.add_typer(tenants_app, name="tenants")
app.add_typer(keys_app, name="keys")
app.add_typer(endpoints_app, name="endpoints")
app.add_typer(jobs_app, name="jobs")

UrlOption = Annotated[str | None, typer.Option("--url", envvar="EXPERTMESH_URL", help="gateway URL")]
KeyOption = Annotated[str | None, typer.Option("--api-key", envvar="EXPERTMESH_API_KEY",
                                               help="API key (default: the operator key)")]
JsonOption = Annotated[bool, typer.Option("--json", help="machine-readable output")]


def connect(url: str | None, api_key: str | None, state_dir: Path | None):
    from expertmesh.serve.client import PlatformClient
    from expertmesh.serve.platform import read_admin_key, read_state

    directory = state_dir_or_default(state_dir)
    if url is None:
        state = read_state(directory)
        url = state["url"] if state else DEFAULT_URL
    key = api_key or os.environ.get("EXPERTMESH_ADMIN_KEY") or read_admin_key(directory)
    if not key:
        raise CLIError(f"no API key: pass --api-key, set EXPERTMESH_ADMIN_KEY, or run `expertmesh up` "
                       f"(it saves the operator key to {directory / 'admin.key'})")
    return PlatformClient(url, key)


@contextlib.contextmanager
def api():
    from expertmesh.serve.client import PlatformAPIError

    try:
        yield
    except PlatformAPIError as exc:
        raise CLIError(exc.message) from None


def emit(data: Any, as_json: bool, text: str) -> None:
    typer.echo(json.dumps(data, indent=2) if as_json else text)


# ---- tenants -----------------------------------------------------------------------------------------
def _given_quotas(**quotas: int | None) -> dict[str, int]:
    """The quota options the user set (typer needs them spelt out on each command)."""
    return {name: value for name, value in quotas.items() if value is not None}


@tenants_app.command("create")
def tenants_create(
    name: str,
    requests_per_min: Annotated[int | None, typer.Option("--requests-per-min")] = None,
    tokens_per_min: Annotated[int | None, typer.Option("--tokens-per-min")] = None,
    max_concurrent_jobs: Annotated[int | None, typer.Option("--max-concurrent-jobs")] = None,
    cpu_slots: Annotated[int | None, typer.Option("--cpu-slots")] = None,
    gpu_slots: Annotated[int | None, typer.Option("--gpu-slots")] = None,
    url: UrlOption = None, api_key: KeyOption = None, state_dir: StateDirOption = None, as_json: JsonOption = False,
) -> None:
    """Create a tenant (default quotas unless given)."""
    given = _given_quotas(requests_per_min=requests_per_min, tokens_per_min=tokens_per_min,
                          max_concurrent_jobs=max_concurrent_jobs, cpu_slots=cpu_slots, gpu_slots=gpu_slots)
    with api():
        client = connect(url, api_key, state_dir)
        tenant = client.create_tenant(name)
        if given:
            tenant = client.update_quotas(name, **given)
    emit(tenant, as_json, f"tenant {tenant['name']} created; quotas {tenant['quotas']}")


@tenants_app.command("list")
def tenants_list(url: UrlOption = None, api_key: KeyOption = None, state_dir: StateDirOption = None,
                 as_json: JsonOption = False) -> None:
    """List tenants with their quotas."""
    with api():
        tenants = connect(url, api_key, state_dir).list_tenants()
    lines = [f"{t['name']:<24} {'DISABLED ' if t['disabled'] else ''}keys={len(t['key_ids'])} {t['quotas']}"
             for t in tenants]
    emit(tenants, as_json, "\n".join(lines) or "no tenants")


@tenants_app.command("disable")
def tenants_disable(name: str, url: UrlOption = None, api_key: KeyOption = None, state_dir: StateDirOption = None,
                    as_json: JsonOption = False) -> None:
    """Disable a tenant: its keys stop working at once."""
    with api():
        tenant = connect(url, api_key, state_dir).set_tenant_disabled(name, True)
    emit(tenant, as_json, f"tenant {name} disabled")


@tenants_app.command("enable")
def tenants_enable(name: str, url: UrlOption = None, api_key: KeyOption = None, state_dir: StateDirOption = None,
                   as_json: JsonOption = False) -> None:
    """Enable a disabled tenant."""
    with api():
        tenant = connect(url, api_key, state_dir).set_tenant_disabled(name, False)
    emit(tenant, as_json, f"tenant {name} enabled")


@tenants_app.command("quotas")
def tenants_quotas(
    name: str,
    requests_per_min: Annotated[int | None, typer.Option("--requests-per-min")] = None,
    tokens_per_min: Annotated[int | None, typer.Option("--tokens-per-min")] = None,
    max_concurrent_jobs: Annotated[int | None, typer.Option("--max-concurrent-jobs")] = None,
    cpu_slots: Annotated[int | None, typer.Option("--cpu-slots")] = None,
    gpu_slots: Annotated[int | None, typer.Option("--gpu-slots")] = None,
    url: UrlOption = None, api_key: KeyOption = None, state_dir: StateDirOption = None, as_json: JsonOption = False,
) -> None:
    """Show a tenant's quotas and usage, changing the ones given."""
    given = _given_quotas(requests_per_min=requests_per_min, tokens_per_min=tokens_per_min,
                          max_concurrent_jobs=max_concurrent_jobs, cpu_slots=cpu_slots, gpu_slots=gpu_slots)
    with api():
        client = connect(url, api_key, state_dir)
        if given:
            client.update_quotas(name, **given)
        tenant = client.get_tenant(name)
    emit(tenant, as_json, f"{name}: quotas {tenant['quotas']}; in use {tenant['usage']}")


# ---- keys ---------------------------------------------------------------------------------------------
@keys_app.command("create")
def keys_create(tenant: Annotated[str, typer.Option("--tenant", help="tenant the key belongs to")],
                url: UrlOption = None, api_key: KeyOption = None, state_dir: StateDirOption = None,
                as_json: JsonOption = False) -> None:
    """Create an API key for a tenant. The key is shown once, alone on the last line."""
    with api():
        issued = connect(url, api_key, state_dir).create_key(tenant)
    if as_json:
        typer.echo(json.dumps(issued, indent=2))
        return
    typer.echo(f"key {issued['key_id']} for tenant {tenant} (shown once; only its hash is stored):")
    typer.echo(issued["key"])


@keys_app.command("revoke")
def keys_revoke(key_id: str, url: UrlOption = None, api_key: KeyOption = None, state_dir: StateDirOption = None,
                as_json: JsonOption = False) -> None:
    """Revoke a key by its id (the 12 hex characters after ``em_``)."""
    with api():
        info = connect(url, api_key, state_dir).revoke_key(key_id)
    emit(info, as_json, f"key {key_id} revoked")


# ---- endpoints -------------------------------------------------------------------------------------------
def wait_for_endpoint(client, tenant: str, name: str, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        info = client.get_endpoint(tenant, name)
        if info["status"] == "RUNNING":
            return info
        if info["status"] in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise CLIError(f"endpoint {name} failed to deploy: {info['status_message']}")
        if time.monotonic() > deadline:
            raise CLIError(f"endpoint {name} is still {info['status']} after {timeout_s:.0f}s")
        time.sleep(1.0)


@endpoints_app.command("deploy")
def endpoints_deploy(
    name: str,
    tenant: Annotated[str, typer.Option("--tenant")],
    model: Annotated[str, typer.Option("--model", help="checkpoint DIR, a JOB_ID, or 'demo'")],
    min_replicas: Annotated[int, typer.Option("--min-replicas")] = 1,
    max_replicas: Annotated[int, typer.Option("--max-replicas")] = 1,
    max_ongoing_requests: Annotated[int, typer.Option("--max-ongoing-requests", help="per replica")] = 8,
    max_queued_requests: Annotated[int, typer.Option("--max-queued-requests", help="-1: unbounded")] = 16,
    target_ongoing_requests: Annotated[float, typer.Option("--target-ongoing-requests")] = 2.0,
    num_cpus: Annotated[float, typer.Option("--num-cpus", help="CPUs per replica")] = 1.0,
    kv_cache_dtype: Annotated[str, typer.Option("--kv-cache-dtype")] = "auto",
    replace: Annotated[bool, typer.Option("--replace", help="redeploy an existing endpoint")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="return once it serves")] = False,
    timeout_s: Annotated[float, typer.Option("--timeout")] = 300.0,
    url: UrlOption = None, api_key: KeyOption = None, state_dir: StateDirOption = None, as_json: JsonOption = False,
) -> None:
    """Deploy an autoscaled endpoint for a tenant."""
    model_ref = model
    if model not in ("demo",) and not model.startswith("job-") and Path(model).expanduser().exists():
        model_ref = str(Path(model).expanduser().resolve())
    with api():
        client = connect(url, api_key, state_dir)
        info = client.deploy_endpoint(
            name=name, tenant=tenant, model=model_ref, min_replicas=min_replicas, max_replicas=max_replicas,
            max_ongoing_requests=max_ongoing_requests, max_queued_requests=max_queued_requests,
            target_ongoing_requests=target_ongoing_requests, num_cpus=num_cpus, kv_cache_dtype=kv_cache_dtype,
            replace=replace)
        if wait:
            info = wait_for_endpoint(client, tenant, name, timeout_s)
    emit(info, as_json, f"endpoint {name} (tenant {tenant}) {info['status']}: {info['model_path']}, "
                        f"replicas {min_replicas}..{max_replicas}")


@endpoints_app.command("list")
def endpoints_list(tenant: Annotated[str | None, typer.Option("--tenant")] = None, url: UrlOption = None,
                   api_key: KeyOption = None, state_dir: StateDirOption = None, as_json: JsonOption = False) -> None:
    """List endpoints with their live status and replica counts."""
    with api():
        endpoints = connect(url, api_key, state_dir).list_endpoints(tenant)
    lines = [f"{e['tenant']}/{e['name']:<20} {e['status']:<12} replicas={e['replicas']} "
             f"({e['min_replicas']}..{e['max_replicas']})  {e['model_path']}" for e in endpoints]
    emit(endpoints, as_json, "\n".join(lines) or "no endpoints")


@endpoints_app.command("delete")
def endpoints_delete(name: str, tenant: Annotated[str, typer.Option("--tenant")], url: UrlOption = None,
                     api_key: KeyOption = None, state_dir: StateDirOption = None, as_json: JsonOption = False) -> None:
    """Delete an endpoint (its Serve application and its registry entry)."""
    with api():
        info = connect(url, api_key, state_dir).delete_endpoint(tenant, name)
    emit(info, as_json, f"endpoint {name} (tenant {tenant}) deleted")


# ---- jobs ----------------------------------------------------------------------------------------------------
def _read_spec(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise CLIError(f"spec file not found: {path}")
    try:
        raw = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (ValueError, yaml.YAMLError) as exc:
        raise CLIError(f"cannot parse {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise CLIError(f"spec {path} must be a mapping of sections")
    return raw


@jobs_app.command("submit")
def jobs_submit(
    spec: Annotated[Path | None, typer.Argument(metavar="SPEC", help="training spec file (YAML or JSON)")] = None,
    preset: Annotated[str | None, typer.Option("--preset", help="a built-in spec: demo or tiny")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="override the spec's steps")] = None,
    tenant: Annotated[str | None, typer.Option("--tenant", help="with the operator key: the tenant")] = None,
    url: UrlOption = None, api_key: KeyOption = None, state_dir: StateDirOption = None, as_json: JsonOption = False,
) -> None:
    """Submit a training job; prints its id."""
    if (spec is None) == (preset is None):
        raise CLIError("give a spec file or --preset NAME (exactly one)")
    raw = _read_spec(spec) if spec is not None else {"preset": preset}
    if steps is not None:
        raw["steps"] = steps
    with api():
        job = connect(url, api_key, state_dir).submit_job(raw, tenant)
    emit(job, as_json, f"job {job['job_id']} queued for tenant {job['tenant']}\n{job['job_id']}")


@jobs_app.command("list")
def jobs_list(tenant: Annotated[str | None, typer.Option("--tenant")] = None,
              limit: Annotated[int, typer.Option("--limit")] = 50, url: UrlOption = None,
              api_key: KeyOption = None, state_dir: StateDirOption = None, as_json: JsonOption = False) -> None:
    """List jobs, newest first."""
    with api():
        jobs = connect(url, api_key, state_dir).list_jobs(tenant, limit)
    lines = [f"{j['job_id']}  {j['tenant']:<16} {j['state']:<10} {j['name']:<12} {j['checkpoint'] or j['error'][:60]}"
             for j in jobs]
    emit(jobs, as_json, "\n".join(lines) or "no jobs")


@jobs_app.command("show")
def jobs_show(job_id: str, url: UrlOption = None, api_key: KeyOption = None, state_dir: StateDirOption = None,
              as_json: JsonOption = False) -> None:
    """One job's record."""
    with api():
        job = connect(url, api_key, state_dir).get_job(job_id)
    emit(job, as_json, "\n".join(f"{k}: {v}" for k, v in job.items() if k != "spec"))


@jobs_app.command("logs")
def jobs_logs(job_id: str, follow: Annotated[bool, typer.Option("--follow", "-f", help="stream until it ends")] = False,
              tail: Annotated[int | None, typer.Option("--tail", help="last N lines")] = None, url: UrlOption = None,
              api_key: KeyOption = None, state_dir: StateDirOption = None, as_json: JsonOption = False) -> None:
    """A job's logs (-f follows them until the job ends)."""
    with api():
        client = connect(url, api_key, state_dir)
        if follow and not as_json:
            for text in client.follow_job_logs(job_id):
                typer.echo(text, nl=False)
            return
        text = client.job_logs(job_id, tail)
    emit({"job_id": job_id, "logs": text}, as_json, text.rstrip("\n"))


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, url: UrlOption = None, api_key: KeyOption = None, state_dir: StateDirOption = None,
                as_json: JsonOption = False) -> None:
    """Cancel a queued job or stop a running one."""
    with api():
        job = connect(url, api_key, state_dir).cancel_job(job_id)
    emit(job, as_json, f"job {job_id} {job['state']}")
