"""Where endpoints run. All Ray Serve calls live in :class:`ServeBackend`; the gateway only
sees the :class:`EndpointBackend` interface, which :class:`LocalBackend` also implements
in-process (unit tests, and the benchmark's baseline).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from expertmesh.serve.endpoints import EndpointRecord
from expertmesh.serve.replica import EndpointServer

DEPLOYMENT_NAME = "EndpointServer"


class EndpointOverloaded(RuntimeError):
    """The endpoint's queue is full (answered 503 with Retry-After)."""


class EndpointUnavailable(RuntimeError):
    """The endpoint is not running (deploying, failed or deleted; answered 503)."""


@dataclass(frozen=True)
class EndpointStatus:
    status: str  # RUNNING | DEPLOYING | DEPLOY_FAILED | UNHEALTHY | DELETING | NOT_STARTED
    replicas: int
    message: str = ""

    @property
    def ready(self) -> bool:
        return self.status == "RUNNING"


class EndpointBackend(Protocol):
    def deploy(self, record: EndpointRecord) -> None: ...

    def delete(self, record: EndpointRecord) -> None: ...

    def status(self, record: EndpointRecord) -> EndpointStatus: ...

    def stream(self, record: EndpointRecord, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]: ...

    async def complete(self, record: EndpointRecord, request: dict[str, Any]) -> dict[str, Any]: ...


class LocalBackend:
    """Endpoints as in-process :class:`EndpointServer` objects (no Ray)."""

    def __init__(self, telemetry_config: dict[str, Any] | None = None, tracer: Any = None):
        self.servers: dict[str, EndpointServer] = {}
        self.telemetry_config = telemetry_config
        self.tracer = tracer  # e.g. the gateway's, so one process exports one trace per request

    def deploy(self, record: EndpointRecord) -> None:
        self.servers[record.app_name] = EndpointServer(record.to_json(), self.telemetry_config, self.tracer)

    def delete(self, record: EndpointRecord) -> None:
        self.servers.pop(record.app_name, None)

    def status(self, record: EndpointRecord) -> EndpointStatus:
        return EndpointStatus("RUNNING", 1) if record.app_name in self.servers else EndpointStatus("NOT_STARTED", 0)

    def _server(self, record: EndpointRecord) -> EndpointServer:
        server = self.servers.get(record.app_name)
        if server is None:
            raise EndpointUnavailable(f"endpoint {record.spec.name!r} is not deployed")
        return server

    async def stream(self, record: EndpointRecord, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async for event in self._server(record).generate(request):
            yield event

    async def complete(self, record: EndpointRecord, request: dict[str, Any]) -> dict[str, Any]:
        return await self._server(record).complete(request)


class ServeBackend:
    """Endpoints as Ray Serve applications (one per endpoint, no HTTP route of their own:
    the gateway calls them through deployment handles)."""

    def __init__(self, telemetry_config: dict[str, Any] | None = None, status_ttl_s: float = 1.0):
        self.telemetry_config = telemetry_config
        self.status_ttl_s = status_ttl_s
        self._handles: dict[str, Any] = {}
        self._status: dict[str, tuple[float, EndpointStatus]] = {}

    def build(self, record: EndpointRecord):
        from ray import serve

        spec = record.spec
        autoscaling = {"min_replicas": spec.min_replicas, "max_replicas": spec.max_replicas,
                       "initial_replicas": max(1, spec.min_replicas),
                       "target_ongoing_requests": spec.target_ongoing_requests,
                       "upscale_delay_s": spec.upscale_delay_s, "downscale_delay_s": spec.downscale_delay_s,
                       "look_back_period_s": 5.0, "metrics_interval_s": 1.0}
        deployment = serve.deployment(
            EndpointServer, name=DEPLOYMENT_NAME, autoscaling_config=autoscaling,
            max_ongoing_requests=spec.max_ongoing_requests, max_queued_requests=spec.max_queued_requests,
            ray_actor_options={"num_cpus": spec.num_cpus}, health_check_period_s=spec.health_check_period_s,
            health_check_timeout_s=30.0, graceful_shutdown_timeout_s=10.0)
        return deployment.bind(record.to_json(), self.telemetry_config)

    def deploy(self, record: EndpointRecord) -> None:
        """Start (or update) the application without waiting for it to be ready."""
        from ray import serve
        from ray.serve import RunTarget

        serve.run_many([RunTarget(target=self.build(record), name=record.app_name, route_prefix=None)],
                       wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
        self._status.pop(record.app_name, None)
        self._handles.pop(record.app_name, None)

    def delete(self, record: EndpointRecord) -> None:
        from ray import serve

        serve.delete(record.app_name, _blocking=False)
        self._status.pop(record.app_name, None)
        self._handles.pop(record.app_name, None)

    def status(self, record: EndpointRecord, max_age_s: float | None = None) -> EndpointStatus:
        from ray import serve

        max_age_s = self.status_ttl_s if max_age_s is None else max_age_s
        cached = self._status.get(record.app_name)
        if cached is not None and time.monotonic() - cached[0] < max_age_s:
            return cached[1]
        app = serve.status().applications.get(record.app_name)
        if app is None:
            result = EndpointStatus("NOT_STARTED", 0, "no such Serve application")
        else:
            dep = app.deployments.get(DEPLOYMENT_NAME)
            replicas = int(dep.replica_states.get("RUNNING", 0)) if dep is not None else 0
            message = app.message or (dep.message if dep is not None else "")
            result = EndpointStatus(str(getattr(app.status, "value", app.status)), replicas, message)
        self._status[record.app_name] = (time.monotonic(), result)
        return result

    def _handle(self, record: EndpointRecord):
        from ray import serve

        if record.app_name not in self._handles:
            self._handles[record.app_name] = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=record.app_name)
        return self._handles[record.app_name]

    def _check_ready(self, record: EndpointRecord) -> None:
        status = self.status(record)
        if not status.ready:
            raise EndpointUnavailable(f"endpoint {record.spec.name!r} is not ready ({status.status}"
                                      f"{': ' + status.message if status.message else ''})")

    async def stream(self, record: EndpointRecord, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        from ray.serve.exceptions import BackPressureError

        await asyncio.to_thread(self._check_ready, record)
        response = self._handle(record).options(stream=True, method_name="generate").remote(request)
        finished = False
        try:
            async for event in response:
                yield event
            finished = True
        except BackPressureError:
            raise EndpointOverloaded(f"endpoint {record.spec.name!r} is overloaded: its queue is full "
                                     f"(max_queued_requests={record.spec.max_queued_requests})") from None
        finally:
            if not finished:
                response.cancel()  # the client went away: free the engine's slot

    async def complete(self, record: EndpointRecord, request: dict[str, Any]) -> dict[str, Any]:
        from ray.serve.exceptions import BackPressureError

        await asyncio.to_thread(self._check_ready, record)
        try:
            return await self._handle(record).options(method_name="complete").remote(request)
        except BackPressureError:
            raise EndpointOverloaded(f"endpoint {record.spec.name!r} is overloaded: its queue is full "
                                     f"(max_queued_requests={record.spec.max_queued_requests})") from None
