"""What the gateway is wired to: state store, tenants, quotas, endpoints, jobs, the endpoint
backend and telemetry. Built once per gateway replica from a :class:`GatewayConfig`."""

from __future__ import annotations

import asyncio
import functools
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from expertmesh.jobs.launcher import Launcher
from expertmesh.jobs.service import JobService
from expertmesh.jobs.store import JobStore
from expertmesh.serve.backend import EndpointBackend
from expertmesh.serve.endpoints import EndpointRecord, EndpointRegistry, ModelInfo
from expertmesh.telemetry import Telemetry, TelemetryConfig, setup_telemetry
from expertmesh.tenants.keys import HashParams
from expertmesh.tenants.quotas import QuotaEnforcer
from expertmesh.tenants.registry import TenantRegistry


@dataclass(frozen=True)
class GatewayConfig:
    """Everything a gateway replica needs, as plain values (it travels to Ray workers).

    ``dashboard_address`` is the Ray dashboard URL the job routes use for logs and cancel
    (None: job logs/cancel of running jobs are unavailable). ``home`` resolves ``--model demo``.
    """

    redis_url: str
    home: str
    dashboard_address: str | None = None
    telemetry: dict[str, Any] = field(default_factory=lambda: {"service_name": "expertmesh-gateway"})
    key_hash_n: int = 2**14
    log_poll_interval_s: float = 1.0
    max_prompt_chars: int = 1_000_000

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _NoLauncher:
    """Job routes without a cluster: nothing is running, so there is nothing to stop or read."""

    def launch(self, request):  # pragma: no cover - the gateway never launches
        raise RuntimeError("the gateway does not launch jobs; the scheduler does")

    def status(self, submission_id):
        from expertmesh.jobs.launcher import LaunchStatus

        return LaunchStatus.MISSING, "no cluster configured"

    def logs(self, submission_id):
        return ""

    def stop(self, submission_id):
        return False


@dataclass
class GatewayServices:
    config: GatewayConfig
    client: redis.Redis
    tenants: TenantRegistry
    quotas: QuotaEnforcer
    endpoints: EndpointRegistry
    jobs: JobService
    backend: EndpointBackend
    telemetry: Telemetry
    _tokenizers: dict[str, Any] = field(default_factory=dict)

    @property
    def home(self) -> Path:
        return Path(self.config.home)

    def tokenizer(self, model: ModelInfo):
        """The endpoint's tokenizer (cached per checkpoint path), or None if it has none."""
        if model.path not in self._tokenizers:
            from expertmesh.engine import load_tokenizer

            self._tokenizers[model.path] = load_tokenizer(model.path) if model.has_tokenizer else None
        return self._tokenizers[model.path]

    async def call(self, fn, *args, **kwargs):
        """Run a blocking call (Redis, scrypt, Ray Serve control) off the event loop."""
        return await asyncio.to_thread(functools.partial(fn, *args, **kwargs))

    def endpoint_view(self, record: EndpointRecord) -> dict[str, Any]:
        status = self.backend.status(record)
        return {**record.to_dict(), "status": status.status, "replicas": status.replicas,
                "status_message": status.message}


def build_services(config: GatewayConfig, backend: EndpointBackend, launcher: Launcher | None = None,
                   telemetry: Telemetry | None = None) -> GatewayServices:
    from expertmesh.store import connect

    client = connect(config.redis_url)
    quotas = QuotaEnforcer(client)
    if launcher is None:
        if config.dashboard_address:
            from expertmesh.jobs.launcher import RayJobsLauncher

            launcher = RayJobsLauncher(config.dashboard_address)
        else:
            launcher = _NoLauncher()
    telemetry = telemetry or setup_telemetry(TelemetryConfig(**config.telemetry))
    jobs = JobService(JobStore(client), quotas, launcher)
    services = GatewayServices(
        config=config, client=client, tenants=TenantRegistry(client, HashParams(n=config.key_hash_n), quotas),
        quotas=quotas, endpoints=EndpointRegistry(client), jobs=jobs, backend=backend, telemetry=telemetry)
    telemetry.observe("expertmesh_jobs", "jobs per state",
                      lambda: {(("state", s),): float(n) for s, n in jobs.jobs.state_counts().items()})
    telemetry.observe("expertmesh_job_queue_depth", "job queue entries waiting for dispatch",
                      lambda: {(): float(jobs.jobs.queue_depth())})
    return services
