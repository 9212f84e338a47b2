"""Bring the whole platform up on one gateway port: Ray (local, or an existing cluster), the
state store (embedded Valkey, or ``redis_url``), the gateway (a Ray Serve application at
``/``), the job scheduler (a detached Ray actor) and every endpoint in the registry.

    platform = Platform.start(PlatformConfig(state_dir=Path("~/.expertmesh/platform")))
    print(platform.url)            # http://127.0.0.1:8000
    platform.stop()

A local Ray head runs as ``ray start --head --block`` in its own session (SIGTERM stops all
of it), with free ports for everything so several clusters can share a machine, and
token authentication on (a fresh token in the state directory). ``state.json`` in the
state directory records what is running for ``expertmesh platform down`` and the CLI; the operator
key is written to ``admin.key`` (mode 0600) the first time.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from expertmesh.store import Store, free_port, open_store

log = logging.getLogger(__name__)

GATEWAY_APP = "expertmesh-gateway"
STATE_FILE = "state.json"
ADMIN_KEY_FILE = "admin.key"
RAY_TOKEN_FILE = "ray_auth_token"
DRAIN_TIMEOUT_S = 5  # `ray start` drains its node this long on SIGTERM (Ray's default: 30 s)


class PlatformError(RuntimeError):
    """The platform could not be brought up or found."""


@dataclass(frozen=True)
class PlatformConfig:
    state_dir: Path
    port: int = 8000
    host: str = "127.0.0.1"
    ray_address: str | None = None  # join this cluster (then dashboard_address is needed for jobs)
    dashboard_address: str | None = None
    redis_url: str | None = None
    home: Path | None = None  # resolves `--model demo`; default: expertmesh.paths.home()
    runs_root: Path | None = None  # job files and outputs; default: <state_dir>/runs
    num_cpus: int | None = None  # local Ray only; default: this machine's
    object_store_bytes: int = 500 * 1024**2
    appendfsync: str = "everysec"
    gateway_min_replicas: int = 1
    gateway_max_replicas: int = 2
    key_hash_n: int = 2**14
    scheduler: dict[str, Any] = field(default_factory=dict)  # SchedulerConfig fields
    job_command: tuple[str, ...] | None = None  # default: the training CLI (jobs.launcher.DEFAULT_COMMAND)
    ray_start_timeout_s: float = 120.0
    ready_timeout_s: float = 120.0


def read_state(state_dir: Path) -> dict[str, Any] | None:
    path = Path(state_dir) / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def read_admin_key(state_dir: Path) -> str | None:
    path = Path(state_dir) / ADMIN_KEY_FILE
    return path.read_text().strip() if path.is_file() else None


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


class LocalRay:
    """A Ray head node of our own: ``ray start --head --block`` in a new session."""

    def __init__(self, state_dir: Path, num_cpus: int | None, object_store_bytes: int, timeout_s: float):
        self.state_dir = state_dir
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.token_path = state_dir / RAY_TOKEN_FILE
        _write_private(self.token_path, secrets.token_hex(32))
        self.env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path)}
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
               f"--port={self.gcs_port}", f"--dashboard-port={self.dashboard_port}", "--dashboard-host=127.0.0.1",
               f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
               "--include-dashboard=true", f"--object-store-memory={object_store_bytes}", "--disable-usage-stats"]
        if num_cpus is not None:
            cmd.append(f"--num-cpus={num_cpus}")
        self.log_path = state_dir / "ray.log"
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                            env={"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S),
                                                 **os.environ, **self.env})
        from ray._private.services import get_node_ip_address

        self.ip = get_node_ip_address()
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace").splitlines()[-8:]
                raise PlatformError(f"ray start exited (code {self.process.returncode}): {' | '.join(tail)}")
            try:
                with socket.create_connection((self.ip, self.gcs_port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise PlatformError(f"the local Ray head did not come up within {timeout_s:.0f}s "
                                        f"(log: {self.log_path})") from None
                time.sleep(0.2)

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.gcs_port}"

    @property
    def dashboard_address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def stop(self, timeout_s: float = 60.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)


def _set_ray_auth_env(values: dict[str, str | None]) -> dict[str, str | None]:
    """Point this process's Ray client at a token (or back); returns the previous values.

    Ray reads ``RAY_AUTH_MODE``/``RAY_AUTH_TOKEN_PATH`` into a cached config at import, so
    the cache is refreshed too (the same two calls Ray's own test utilities make).
    """
    from ray._raylet import AuthenticationTokenLoader, Config

    previous = {name: os.environ.get(name) for name in values}
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    return previous


def gateway_deployment(min_replicas: int, max_replicas: int):
    """The gateway as a Ray Serve deployment (FastAPI ingress built on each replica)."""
    from ray import serve

    @serve.ingress()
    class Gateway:
        def __init__(self, config: dict[str, Any]):
            from expertmesh.serve.backend import ServeBackend
            from expertmesh.serve.services import GatewayConfig, build_services

            gateway_config = GatewayConfig(**config)
            telemetry = dict(gateway_config.telemetry, service_name="expertmesh-endpoint", prometheus=False)
            self.services = build_services(gateway_config, ServeBackend(telemetry_config=telemetry))

        def __serve_build_asgi_app__(self):
            from expertmesh.serve.gateway import create_app

            return create_app(self.services)

        def check_health(self) -> None:
            self.services.client.ping()

    return serve.deployment(
        Gateway, name="Gateway", max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0},
        autoscaling_config={"min_replicas": min_replicas, "max_replicas": max_replicas,
                            "target_ongoing_requests": 64, "upscale_delay_s": 5.0, "downscale_delay_s": 60.0},
        health_check_period_s=10.0)


class Platform:
    def __init__(self, config: PlatformConfig, store: Store, ray: LocalRay | None, dashboard_address: str | None,
                 admin_key: str):
        self.config, self.store, self.ray, self.dashboard_address = config, store, ray, dashboard_address
        self.admin_key = admin_key
        self.saved_env: dict[str, str | None] = {}

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    @classmethod
    def start(cls, config: PlatformConfig) -> Platform:
        from expertmesh import paths

        state_dir = Path(config.state_dir).expanduser().resolve()
        state_dir.mkdir(parents=True, exist_ok=True)
        config = PlatformConfig(**{**asdict(config), "state_dir": state_dir})
        store = open_store(config.redis_url, state_dir / "valkey", appendfsync=config.appendfsync)  # type: ignore[arg-type]
        local_ray, saved_env = None, {}
        try:
            if config.ray_address is None:
                local_ray = LocalRay(state_dir, config.num_cpus, config.object_store_bytes, config.ray_start_timeout_s)
                saved_env = _set_ray_auth_env(dict(local_ray.env))  # this process is a client of that cluster
                ray_address, dashboard = local_ray.address, local_ray.dashboard_address
            else:
                ray_address, dashboard = config.ray_address, config.dashboard_address
            platform = cls(config, store, local_ray, dashboard, cls._ensure_admin_key(store, state_dir,
                                                                                        config.key_hash_n))
            platform.saved_env = saved_env
            platform._start_services(ray_address, config.home or paths.home())
            platform._write_state()
            return platform
        except BaseException:
            import ray

            if ray.is_initialized():
                ray.shutdown()
            if local_ray is not None:
                local_ray.stop()
                _set_ray_auth_env(saved_env)
            store.close()
            raise

    @staticmethod
    def _ensure_admin_key(store: Store, state_dir: Path, hash_n: int) -> str:
        from expertmesh.tenants import HashParams, InvalidKey, TenantRegistry

        registry = TenantRegistry(store.client, HashParams(n=hash_n))
        saved = read_admin_key(state_dir)
        if saved:
            try:
                if registry.authenticate(saved).is_admin:
                    return saved
            except InvalidKey:
                pass
        issued = registry.create_admin_key()
        _write_private(state_dir / ADMIN_KEY_FILE, issued.key + "\n")
        return issued.key

    def _start_services(self, ray_address: str, home: Path) -> None:
        import ray
        from ray import serve

        from expertmesh.jobs.actor import start_scheduler_actor
        from expertmesh.serve.backend import ServeBackend
        from expertmesh.serve.endpoints import EndpointRegistry
        from expertmesh.serve.services import GatewayConfig
        from expertmesh.telemetry import TelemetryConfig

        cfg = self.config
        if not ray.is_initialized():
            ray.init(address=ray_address, log_to_driver=False, namespace="expertmesh")
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        telemetry = asdict(TelemetryConfig.from_env("expertmesh-gateway"))
        gateway_config = GatewayConfig(redis_url=self.store.url, home=str(home),
                                       dashboard_address=self.dashboard_address, telemetry=telemetry,
                                       key_hash_n=cfg.key_hash_n)
        app = gateway_deployment(cfg.gateway_min_replicas, cfg.gateway_max_replicas).bind(gateway_config.to_dict())
        serve.run(app, name=GATEWAY_APP, route_prefix="/")
        if self.dashboard_address:
            runs_root = cfg.runs_root or self.config.state_dir / "runs"
            start_scheduler_actor(self.store.url, self.dashboard_address, str(runs_root), cfg.scheduler,
                                  list(cfg.job_command) if cfg.job_command else None)
        backend = ServeBackend(telemetry_config=dict(telemetry, service_name="expertmesh-endpoint", prometheus=False))
        for record in EndpointRegistry(self.store.client).list():
            if Path(record.model.path, "config.json").is_file():
                backend.deploy(record)
            else:
                log.warning("endpoint %s not redeployed: %s is gone", record.app_name, record.model.path)
        self._wait_ready()

    def _wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + self.config.ready_timeout_s
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise PlatformError(f"the gateway did not answer {self.url}/healthz within "
                                    f"{self.config.ready_timeout_s:.0f}s")
            time.sleep(0.25)

    def _write_state(self) -> None:
        state = {"pid": os.getpid(), "url": self.url, "redis_url": self.store.url,
                 "valkey_pid": self.store.server.pid if self.store.server else None,
                 "ray_address": self.ray.address if self.ray else self.config.ray_address,
                 "ray_pid": self.ray.process.pid if self.ray else None, "dashboard": self.dashboard_address,
                 "started_at": time.time()}
        (self.config.state_dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

    def stop(self) -> None:
        """Stop what this platform started: Serve apps and scheduler (on a cluster we joined),
        then our Ray head and Valkey. The registry stays in the store for the next ``up``."""
        import ray
        from ray import serve

        from expertmesh.jobs.actor import stop_scheduler_actor

        try:
            if ray.is_initialized():
                if self.ray is None:  # a shared cluster: remove only what is ours
                    stop_scheduler_actor()
                    from expertmesh.serve.endpoints import EndpointRegistry

                    for record in EndpointRegistry(self.store.client).list():
                        serve.delete(record.app_name, _blocking=False)
                    serve.delete(GATEWAY_APP)
                ray.shutdown()  # our own cluster goes away whole below (SIGTERM to its `ray start`)
        finally:
            try:
                if self.ray is not None:
                    self.ray.stop()
                    _set_ray_auth_env(self.saved_env)
            finally:
                self.store.close()
                (self.config.state_dir / STATE_FILE).unlink(missing_ok=True)
