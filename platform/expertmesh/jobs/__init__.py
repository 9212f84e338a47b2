"""Training jobs: validated specs queued in a Redis Stream, dispatched fairly within tenant
quotas to Ray Jobs by a crash-safe scheduler, followed to a terminal state.

    service = JobService(JobStore(client), QuotaEnforcer(client), RayJobsLauncher("http://127.0.0.1:8265"))
    job = service.submit("acme", {"preset": "tiny", "steps": 20})
    Scheduler(client, launcher, LaunchConfig(runs_root)).step()   # or the SchedulerService actor
"""

from expertmesh.jobs.launcher import (
    LaunchConfig,
    Launcher,
    LaunchError,
    LaunchRequest,
    LaunchStatus,
    RayJobsLauncher,
    prepare_launch,
)
from expertmesh.jobs.model import JobRecord, JobResources, JobState, is_job_id
from expertmesh.jobs.scheduler import Outcome, Scheduler, SchedulerConfig, StepReport, Waiting, fair_order
from expertmesh.jobs.service import JobError, JobNotFound, JobService
from expertmesh.jobs.store import JobStore

__all__ = [
    "JobError", "JobNotFound", "JobRecord", "JobResources", "JobService", "JobState", "JobStore", "LaunchConfig",
    "LaunchError", "LaunchRequest", "LaunchStatus", "Launcher", "Outcome", "RayJobsLauncher", "Scheduler",
    "SchedulerConfig", "StepReport", "Waiting", "fair_order", "is_job_id", "prepare_launch",
]
