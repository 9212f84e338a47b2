"""``/dashboard``: the web UI and its JSON API on the gateway's port.

    GET /dashboard                         the single-page UI (login: paste a key)
    GET /dashboard/static/{file}           its JS/CSS (from the package)
    GET /dashboard/vendor/plotly.min.js    the charting library, from the installed ``plotly`` package
    GET /dashboard/api/whoami              role, tenant, the pages this key may open
    GET /dashboard/api/cluster             operator: nodes, slots, health, failures recovered
    GET /dashboard/api/experts[?layer=L]   operator: placement heatmap, load, balancedness over time
    GET /dashboard/api/serving[?window_s=] requests/s, TTFT/ITL percentiles, in flight, replicas
    GET /dashboard/api/jobs                jobs (states, queue)
    GET /dashboard/api/jobs/{id}           one job: record, loss curve, log tail
    GET /dashboard/api/tenants             quota use

The HTML and assets are public (they hold no data); every ``/dashboard/api/...`` path, known
or not, needs ``Authorization: Bearer <key>`` (the gateway's API keys) and answers 401 with
a JSON error without one. The UI keeps the key in ``sessionStorage`` and polls the API.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Query
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse

from expertmesh.dashboard.cluster import ClusterView
from expertmesh.dashboard.series import GatewaySampler, SeriesConfig, SeriesStore, serving_series, tenant_totals
from expertmesh.dashboard.views import (
    LOG_TAIL_LINES,
    Viewer,
    jobs_page,
    job_summary,
    loss_curve,
    serving_page,
    tenant_usage,
)
from expertmesh.serve.openai_api import APIError, bad_request, not_found
from expertmesh.tenants.registry import Principal, TenantNotFound

STATIC_DIR = Path(str(resources.files("expertmesh.dashboard") / "static"))
STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
MAX_WINDOW_S = 3600.0


class PlotlyMissing(RuntimeError):
    """The ``plotly`` package (which ships plotly.min.js) is not installed."""


def plotly_js_path() -> Path:
    """The minified Plotly bundle inside the installed ``plotly`` package (MIT license)."""
    try:
        import plotly
    except ImportError:
        raise PlotlyMissing("the dashboard's charts need the plotly package: pip install 'plotly>=5'") from None
    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise PlotlyMissing(f"{path} is missing from the installed plotly package; reinstall plotly")
    return path


def _operator_only(viewer: Viewer) -> None:
    if not viewer.is_operator:
        raise APIError(403, "the cluster and experts pages need the operator key", "permission_error", None,
                       "operator_required")


def mount_dashboard(app: FastAPI, services: Any, auth, series_config: SeriesConfig | None = None,
                    cluster: ClusterView | None = None) -> GatewaySampler:
    """Add the dashboard's routes to the gateway ``app``; the sampler runs between the app's
    startup and shutdown (returned for tests)."""
    store = SeriesStore(services.client, series_config or SeriesConfig())
    sampler = GatewaySampler(services, store)
    cluster = cluster or ClusterView(services.client)
    app.include_router(dashboard_router(services, auth, sampler, cluster))
    app.router.on_startup.append(sampler.start)
    app.router.on_shutdown.append(sampler.stop)
    return sampler


def dashboard_router(services: Any, auth, sampler: GatewaySampler, cluster: ClusterView) -> APIRouter:
    router = APIRouter(prefix="/dashboard", include_in_schema=False)

    async def viewer(who: Principal = Depends(auth)) -> Viewer:
        return Viewer.of(who)

    # ---- UI ----------------------------------------------------------------------------------------
    @router.get("")
    async def page() -> HTMLResponse:
        return HTMLResponse((STATIC_DIR / "index.html").read_text(encoding="utf-8"),
                            headers={"Cache-Control": "no-cache"})

    @router.get("/")
    async def page_slash() -> RedirectResponse:
        return RedirectResponse("/dashboard")

    @router.get("/static/{name}")
    async def static(name: str) -> FileResponse:
        if name not in STATIC_FILES:  # a fixed list: no path ever reaches the filesystem unchecked
            raise not_found(f"no dashboard asset {name!r}", "name", "not_found")
        return FileResponse(STATIC_DIR / name, media_type=STATIC_FILES[name], headers={"Cache-Control": "no-cache"})

    @router.get("/vendor/plotly.min.js")
    async def plotly_js() -> FileResponse:
        try:
            path = plotly_js_path()
        except PlotlyMissing as exc:
            raise APIError(503, str(exc), "server_error", None, "plotly_missing") from None
        return FileResponse(path, media_type="text/javascript", headers={"Cache-Control": "max-age=86400"})

    # ---- API ---------------------------------------------------------------------------------------
    @router.get("/api/whoami")
    async def whoami(v: Viewer = Depends(viewer)) -> dict[str, Any]:
        return v.to_dict()

    @router.get("/api/cluster")
    async def cluster_page(v: Viewer = Depends(viewer)) -> dict[str, Any]:
        _operator_only(v)
        return await services.call(cluster.cluster)

    @router.get("/api/experts")
    async def experts_page(v: Viewer = Depends(viewer), layer: int | None = Query(default=None, ge=0, le=10_000)):
        _operator_only(v)
        try:
            return await services.call(cluster.experts, layer)
        except ValueError as exc:
            raise bad_request(str(exc), "layer") from None

    @router.get("/api/serving")
    async def serving(v: Viewer = Depends(viewer),
                      window_s: float = Query(default=900.0, gt=0, le=MAX_WINDOW_S)) -> dict[str, Any]:
        await services.call(sampler.sample_if_due)
        since = time.time() - window_s
        rings = await services.call(sampler.store.gateway_rings, since)
        series = serving_series(rings, sampler.store.config.sample_interval_s, v.sees_endpoint)
        records = await services.call(services.endpoints.list, v.tenant)
        views = [await services.call(services.endpoint_view, r) for r in records]
        replica_rings = {f"{r.spec.tenant}/{r.spec.name}": await services.call(
            sampler.store.replica_ring, r.spec.tenant, r.spec.name, since) for r in records}
        return serving_page(views, series, replica_rings, v, services.telemetry.registry is not None)

    @router.get("/api/jobs")
    async def jobs(v: Viewer = Depends(viewer), limit: int = Query(default=200, ge=1, le=1000)) -> dict[str, Any]:
        records = await services.call(services.jobs.list, v.tenant, limit)
        counts = await services.call(services.jobs.jobs.state_counts) if v.is_operator else None
        depth = await services.call(services.jobs.jobs.queue_depth) if v.is_operator else None
        return jobs_page(records, v, counts, depth)

    @router.get("/api/jobs/{job_id}")
    async def job(job_id: str, v: Viewer = Depends(viewer)) -> dict[str, Any]:
        from expertmesh.jobs.service import JobNotFound

        try:
            record = await services.call(services.jobs.get, job_id, v.tenant)
        except JobNotFound as exc:
            raise not_found(str(exc), "job_id", "job_not_found") from None
        try:
            logs = await services.call(services.jobs.logs, job_id, v.tenant, LOG_TAIL_LINES)
        except Exception:  # noqa: BLE001 - Ray Jobs unreachable: the record's own tail still shows
            logs = record.log_tail
        return {**job_summary(record), "spec": record.spec, "run_dir": record.run_dir,
                "loss": await services.call(loss_curve, record.run_dir), "logs": logs}

    @router.get("/api/tenants")
    async def tenants(v: Viewer = Depends(viewer)) -> dict[str, Any]:
        if v.is_operator:
            listed = await services.call(services.tenants.list_tenants)
        else:
            try:
                listed = [await services.call(services.tenants.get_tenant, v.tenant)]
            except TenantNotFound:
                listed = []
        await services.call(sampler.sample_if_due)
        minute = tenant_totals(await services.call(sampler.store.gateway_rings, time.time() - 60.0))
        rows = []
        for tenant in listed:
            usage = await services.call(services.quotas.usage, tenant.name)
            rows.append(tenant_usage(tenant, usage, minute.get(tenant.name)))
        return {"tenants": rows}

    @router.get("/api/{rest:path}")
    async def unknown(rest: str, v: Viewer = Depends(viewer)) -> dict[str, Any]:
        raise not_found(f"no dashboard API /dashboard/api/{rest}", None, "not_found")

    return router
