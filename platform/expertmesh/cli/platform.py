"""``expertmesh platform up|down|status`` (also top-level ``expertmesh up|down`` when no other
command group owns those names): the multi-tenant platform on one gateway port.

``up`` starts a local Ray head (unless ``--address``), the state store (embedded Valkey
unless ``REDIS_URL``), the gateway, the job scheduler and the registered endpoints, writes
``state.json`` and the operator key (``admin.key``) to the state directory and prints the
gateway URL. It stays in the foreground (Ctrl-C or ``expertmesh platform down`` stops it) unless
``--detach``, which runs the same thing as a background process and returns once the
gateway answers. ``EXPERTMESH_JOB_COMMAND`` (a JSON list) replaces the jobs' entrypoint,
the training CLI. ``--demo`` also creates a ``demo`` tenant and key, trains the demo
model through the job queue (skipped when its checkpoint exists) and serves it.

The other commands (``tenants``, ``keys``, ``endpoints``, ``jobs``) live in
``cli/resources.py`` and talk HTTP to the gateway.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Annotated

import typer

from expertmesh.cli import CLIError, app

platform_app = typer.Typer(help="Bring the multi-tenant platform up and down.", no_args_is_help=True)
app.add_typer(platform_app, name="platform")

StateDirOption = Annotated[Path | None, typer.Option(
    "--state-dir", envvar="EXPERTMESH_STATE_DIR",
    help="platform state (state.json, admin.key, Valkey data); default $EXPERTMESH_HOME/platform")]
DETACH_READY_TIMEOUT_S = 600.0
DOWN_TIMEOUT_S = 120.0


def state_dir_or_default(state_dir: Path | None) -> Path:
    from expertmesh import paths

    return (state_dir or paths.home() / "platform").expanduser().resolve()


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def _demo(platform, state_dir: Path) -> None:
    from expertmesh import paths
    from expertmesh.cli.resources import wait_for_endpoint
    from expertmesh.serve.client import PlatformAPIError, PlatformClient

    client = PlatformClient(platform.url, platform.admin_key)
    try:
        client.create_tenant("demo")
    except PlatformAPIError as exc:
        if exc.status != 409:
            raise
    key_file = state_dir / "demo.key"
    key = key_file.read_text().strip() if key_file.is_file() else None
    if key is not None:
        try:
            PlatformClient(platform.url, key).list_models()
        except PlatformAPIError:
            key = None  # revoked, or the state store was reset
    if key is None:
        key = client.create_key("demo")["key"]
        key_file.write_text(key + "\n")
        key_file.chmod(0o600)
    ckpt = paths.demo_checkpoint()
    if not (ckpt / "config.json").is_file():
        job = client.submit_job({"preset": "demo"}, tenant="demo")
        typer.echo(f"demo: no checkpoint at {ckpt}; training it as job {job['job_id']} "
                   f"(`expertmesh jobs logs {job['job_id']} -f` to watch)")
        while (job := client.get_job(job["job_id"]))["state"] in ("queued", "running"):
            time.sleep(5)
        if job["state"] != "succeeded" or not job["checkpoint"]:
            raise CLIError(f"demo training job {job['job_id']} {job['state']}: {job['error']}\n{job['log_tail']}")
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        if not ckpt.exists():
            ckpt.symlink_to(job["checkpoint"], target_is_directory=True)
    client.deploy_endpoint(name="demo", tenant="demo", model=str(ckpt), min_replicas=1, max_replicas=2, replace=True)
    wait_for_endpoint(client, "demo", "demo", 300.0)
    typer.echo(f"""
demo endpoint ready. Try:

  curl {platform.url}/v1/completions -H "Authorization: Bearer {key}" \\
       -H "Content-Type: application/json" \\
       -d '{{"model": "demo", "prompt": "def fibonacci(n):", "max_tokens": 48, "temperature": 0}}'

  python -c "from openai import OpenAI; c = OpenAI(base_url='{platform.url}/v1', api_key='{key}'); \\
print(c.completions.create(model='demo', prompt='import os', max_tokens=32).choices[0].text)"
""")


def _up_foreground(config, demo: bool, as_json: bool = False) -> None:
    from expertmesh.serve.platform import Platform

    stop = threading.Event()
    platform = Platform.start(config)
    # after Platform.start: ray.init installs its own SIGTERM handler, which would end this
    # process before the platform is stopped
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        if as_json:
            from expertmesh.serve.platform import read_state

            typer.echo(json.dumps({**(read_state(config.state_dir) or {}), "state_dir": str(config.state_dir)}))
        typer.echo(f"gateway: {platform.url}", err=as_json)
        typer.echo(f"operator key: {config.state_dir / 'admin.key'} (or export EXPERTMESH_ADMIN_KEY)", err=as_json)
        typer.echo(f"dashboard: {platform.url}/dashboard (sign in with the operator key or a tenant key)",
                   err=as_json)
        typer.echo(f"metrics: {platform.url}/metrics   API docs: {platform.url}/docs"
                   + (f"   Ray dashboard: {platform.dashboard_address}" if platform.dashboard_address else ""),
                   err=as_json)
        if demo:
            _demo(platform, config.state_dir)
        typer.echo("Ctrl-C or `expertmesh platform down` stops the platform", err=True)
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        typer.echo("stopping the platform...", err=True)
        platform.stop()


def _up_detached(argv: list[str], state_dir: Path, as_json: bool = False) -> None:
    from expertmesh.serve.platform import read_state

    log_path = state_dir / "platform.log"
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        child = subprocess.Popen([sys.executable, "-m", "expertmesh", "platform", "up", *argv], stdout=log,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + DETACH_READY_TIMEOUT_S
    while time.monotonic() < deadline:
        state = read_state(state_dir)
        if state is not None and state.get("pid") == child.pid:
            if as_json:
                typer.echo(json.dumps({**state, "state_dir": str(state_dir), "log": str(log_path)}, indent=2))
                return
            typer.echo(f"gateway: {state['url']}  (pid {child.pid}, log {log_path})")
            typer.echo(f"dashboard: {state['url']}/dashboard")
            typer.echo(f"operator key: {state_dir / 'admin.key'}")
            typer.echo(state["url"])
            return
        if child.poll() is not None:
            tail = log_path.read_text(errors="replace").splitlines()[-10:]
            raise CLIError(f"the platform exited during startup (code {child.returncode}); log {log_path}:\n"
                           + "\n".join(tail))
        time.sleep(0.5)
    child.terminate()
    raise CLIError(f"the platform did not come up within {DETACH_READY_TIMEOUT_S:.0f}s; see {log_path}")


def _job_command(text: str | None) -> tuple[str, ...] | None:
    """``EXPERTMESH_JOB_COMMAND``: a JSON list replacing the job entrypoint, with ``{python}``,
    ``{spec}`` and ``{out}`` filled in (e.g. a wrapper that sets up the node first)."""
    if not text:
        return None
    try:
        command = json.loads(text)
    except ValueError:
        command = None
    if not isinstance(command, list) or not command or not all(isinstance(part, str) for part in command):
        raise CLIError(f"EXPERTMESH_JOB_COMMAND must be a JSON list of strings, got {text!r}")
    return tuple(command)


@platform_app.command("up")
def up(
    detach: Annotated[bool, typer.Option("--detach", help="run in the background and return when ready")] = False,
    state_dir: StateDirOption = None,
    port: Annotated[int, typer.Option("--port", help="gateway port")] = 8000,
    host: Annotated[str, typer.Option("--host", help="gateway bind address")] = "127.0.0.1",
    address: Annotated[str | None, typer.Option("--address", help="join this Ray cluster (GCS address)")] = None,
    dashboard: Annotated[str | None, typer.Option("--dashboard", help="with --address: its dashboard URL "
                                                                      "(Ray Jobs)")] = None,
    num_cpus: Annotated[int | None, typer.Option("--num-cpus", help="local Ray: CPUs to offer")] = None,
    demo: Annotated[bool, typer.Option("--demo", help="demo tenant, key, trained demo model, endpoint")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the platform's state as JSON when ready")] = False,
) -> None:
    """Start the platform (local Ray, Valkey, gateway, scheduler) and print the gateway URL."""
    from expertmesh.serve.platform import PlatformConfig, read_state

    directory = state_dir_or_default(state_dir)
    state = read_state(directory)
    if state is not None and alive(state.get("pid")):
        raise CLIError(f"the platform is already up at {state['url']} (pid {state['pid']}); "
                       f"`expertmesh platform down` first")
    if not 0 < port < 65536:
        raise CLIError(f"--port must be in 1..65535, got {port}")
    if detach:
        argv = ["--state-dir", str(directory), "--port", str(port), "--host", host]
        for flag, value in (("--address", address), ("--dashboard", dashboard), ("--num-cpus", num_cpus)):
            if value is not None:
                argv += [flag, str(value)]
        _up_detached(argv + (["--demo"] if demo else []), directory, as_json)
        return
    if address is not None and dashboard is None:
        raise CLIError("--address needs --dashboard (the cluster's dashboard URL, for Ray Jobs)")
    config = PlatformConfig(state_dir=directory, port=port, host=host, ray_address=address,
                            dashboard_address=dashboard, redis_url=os.environ.get("REDIS_URL") or None,
                            num_cpus=num_cpus, job_command=_job_command(os.environ.get("EXPERTMESH_JOB_COMMAND")))
    _up_foreground(config, demo, as_json)


def _stop_leftovers(state: dict) -> list[str]:
    """Stop the Ray head and Valkey a platform process recorded, if they outlived it."""
    from expertmesh.store import EmbeddedValkey

    stopped = []
    if alive(state.get("ray_pid")):
        os.kill(state["ray_pid"], signal.SIGTERM)
        stopped.append(f"Ray head (pid {state['ray_pid']})")
    if alive(state.get("valkey_pid")):
        EmbeddedValkey.stop_pid(state["valkey_pid"])
        stopped.append(f"Valkey (pid {state['valkey_pid']})")
    return stopped


@platform_app.command("down")
def down(state_dir: StateDirOption = None,
         as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False) -> None:
    """Stop the platform started by `expertmesh up` (state survives for the next `up`)."""
    from expertmesh.serve.platform import STATE_FILE, read_state

    directory = state_dir_or_default(state_dir)
    state = read_state(directory)
    if state is None:
        raise CLIError(f"no platform is up (no {directory / STATE_FILE})")
    pid = state.get("pid")
    if alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + DOWN_TIMEOUT_S
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        if alive(pid):
            raise CLIError(f"the platform (pid {pid}) did not stop within {DOWN_TIMEOUT_S:.0f}s")
        leftovers = _stop_leftovers(state)
        message = "platform stopped" + (f" (and what it left running: {', '.join(leftovers)})" if leftovers else "")
    else:  # the owner died: stop what it left behind
        leftovers = _stop_leftovers(state)
        message = f"the platform process was gone; stopped {', '.join(leftovers) or 'nothing'}"
    (directory / STATE_FILE).unlink(missing_ok=True)
    typer.echo(json.dumps({"stopped": True, "pid": pid, "leftovers": leftovers}) if as_json else message)


@platform_app.command("status")
def status(state_dir: StateDirOption = None,
           as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False) -> None:
    """Is the platform up, where, and is its gateway healthy."""
    import httpx

    from expertmesh.serve.platform import read_state

    directory = state_dir_or_default(state_dir)
    state = read_state(directory)
    if state is None:
        raise CLIError(f"no platform is up (state dir {directory})")
    try:
        healthy = httpx.get(f"{state['url']}/healthz", timeout=5).status_code == 200
    except httpx.HTTPError:
        healthy = False
    info = {**state, "running": alive(state.get("pid")), "healthy": healthy, "state_dir": str(directory)}
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    typer.echo(f"gateway {info['url']}  {'healthy' if healthy else 'NOT ANSWERING'}  (pid {info['pid']}, "
               f"{'running' if info['running'] else 'gone'})")
    typer.echo(f"state store {info['redis_url']}  Ray {info['ray_address']}  dashboard {info['dashboard']}")



from expertmesh.cli import resources  # noqa: E402,F401  (tenants, keys, endpoints, jobs)
