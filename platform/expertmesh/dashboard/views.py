"""What each key may see, and the serving, jobs and tenants pages built from the platform's stores.

Scoping rule (the same as the gateway's APIs): an operator key sees everything; a tenant key
sees its own endpoints, jobs and usage, and anything else does not exist for it (a 404, never
a 403 that would confirm the name). Cluster and experts pages are the operator's: a tenant key
gets 403 there, and the UI does not offer them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expertmesh.jobs.model import JobRecord, JobState

MAX_LOSS_POINTS = 2000  # a long run's curve is thinned to about this many steps
LOG_TAIL_LINES = 200


@dataclass(frozen=True)
class Viewer:
    """Who is looking: ``tenant`` None means the operator."""

    tenant: str | None

    @property
    def is_operator(self) -> bool:
        return self.tenant is None

    @classmethod
    def of(cls, principal: Any) -> Viewer:
        return cls(None if principal.is_admin else principal.tenant)

    def sees_tenant(self, tenant: str) -> bool:
        return self.is_operator or tenant == self.tenant

    def sees_endpoint(self, endpoint: str) -> bool:
        """``endpoint`` is ``"tenant/name"`` (the gateway's metric label)."""
        return self.sees_tenant(endpoint.split("/", 1)[0])

    def to_dict(self) -> dict[str, Any]:
        return {"role": "operator" if self.is_operator else "tenant", "tenant": self.tenant,
                "pages": (["cluster", "experts", "serving", "jobs", "tenants"] if self.is_operator
                          else ["serving", "jobs", "tenants"])}


# ---- jobs ------------------------------------------------------------------------------------------------
def job_summary(job: JobRecord) -> dict[str, Any]:
    return {"job_id": job.job_id, "tenant": job.tenant, "name": job.name, "state": job.state.value,
            "submitted_at": job.submitted_at, "started_at": job.started_at, "finished_at": job.finished_at,
            "wait_reason": job.wait_reason, "error": job.error, "cpu": job.cpu, "gpu": job.gpu,
            "checkpoint": job.checkpoint}


def jobs_page(jobs: list[JobRecord], viewer: Viewer, global_counts: dict[str, int] | None,
              global_queue_depth: int | None) -> dict[str, Any]:
    """The job list with per-state counts; an operator gets the platform-wide counts and the
    dispatch queue depth, a tenant the counts of its own jobs."""
    visible = [j for j in jobs if viewer.sees_tenant(j.tenant)]
    if viewer.is_operator and global_counts is not None:
        counts = dict(global_counts)
    else:
        counts = {s.value: 0 for s in JobState}
        for job in visible:
            counts[job.state.value] += 1
    queued = (global_queue_depth if viewer.is_operator and global_queue_depth is not None
              else counts.get(JobState.QUEUED.value, 0))
    return {"jobs": [job_summary(j) for j in visible], "states": counts, "queue_depth": queued}


def thin(steps: list[int], values: list[float], max_points: int = MAX_LOSS_POINTS) -> tuple[list[int], list[float]]:
    """Every k-th point (the last one always kept) so a curve has at most ``max_points``."""
    if len(steps) <= max_points:
        return steps, values
    stride = -(-len(steps) // max_points)
    keep = list(range(0, len(steps), stride))
    if keep[-1] != len(steps) - 1:
        keep.append(len(steps) - 1)
    return [steps[i] for i in keep], [values[i] for i in keep]


def loss_curve(run_dir: str) -> dict[str, Any]:
    """Training and validation loss per step from the run's ``metrics.jsonl`` (the trainer writes it)."""
    from expertmesh.train.monitor import METRICS_FILE, loss_history, read_records

    if not run_dir:
        return {"steps": [], "loss": [], "val_steps": [], "val_loss": [], "source": None}
    path = Path(run_dir) / METRICS_FILE
    history = loss_history(read_records(path))
    steps, losses = thin(history.steps, history.losses)
    return {"steps": steps, "loss": losses, "val_steps": history.val_steps, "val_loss": history.val_losses,
            "source": str(path) if path.is_file() else None}


# ---- tenants ---------------------------------------------------------------------------------------------
def tenant_usage(tenant: Any, usage: dict[str, int], last_minute: dict[str, float] | None) -> dict[str, Any]:
    """A tenant's quotas next to what it uses: job slots held now, and the requests and tokens
    its endpoints answered in the last minute (from the gateway metrics, all replicas)."""
    q = tenant.quotas
    minute = last_minute or {"requests": 0.0, "tokens": 0.0}
    rows = [
        ("max_concurrent_jobs", usage.get("jobs", 0), q.max_concurrent_jobs),
        ("cpu_slots", usage.get("cpu", 0), q.cpu_slots),
        ("gpu_slots", usage.get("gpu", 0), q.gpu_slots),
        ("requests_per_min", int(minute["requests"]), q.requests_per_min),
        ("tokens_per_min", int(minute["tokens"]), q.tokens_per_min),
    ]
    return {"name": tenant.name, "disabled": tenant.disabled, "created_at": tenant.created_at,
            "quotas": [{"quota": name, "used": used, "limit": limit,
                        "fraction": (used / limit) if limit else (1.0 if used else 0.0)} for name, used, limit in rows]}


# ---- serving ---------------------------------------------------------------------------------------------
def serving_page(endpoint_views: list[dict[str, Any]], series: dict[str, dict[str, Any]],
                 replica_rings: dict[str, list[dict[str, Any]]], viewer: Viewer,
                 metrics_enabled: bool) -> dict[str, Any]:
    """Endpoints (status, replicas now) with their time series; only what ``viewer`` sees."""
    endpoints = []
    for view in endpoint_views:
        name = f"{view['tenant']}/{view['name']}"
        if not viewer.sees_endpoint(name):
            continue
        ring = replica_rings.get(name, [])
        endpoints.append({
            "endpoint": name, "tenant": view["tenant"], "name": view["name"], "status": view.get("status"),
            "replicas": view.get("replicas"), "min_replicas": view.get("min_replicas"),
            "max_replicas": view.get("max_replicas"), "series": series.get(name),
            "replicas_series": {"t": [s["t"] for s in ring], "replicas": [s["replicas"] for s in ring]},
        })
    message = None if metrics_enabled else ("Prometheus metrics are off in this gateway (EXPERTMESH_PROMETHEUS=0): "
                                            "request rates and latencies are not available")
    return {"endpoints": endpoints, "metrics_enabled": metrics_enabled, "message": message}
