"""What tenants do with jobs (the gateway's job routes call this): submit, look, cancel, logs."""

from __future__ import annotations

import time
from collections.abc import Iterator

from expertmesh.jobs.launcher import Launcher, tail_lines
from expertmesh.jobs.model import JobRecord, JobResources, JobState
from expertmesh.jobs.store import JobStore
from expertmesh.tenants.quotas import QuotaEnforcer


class JobError(ValueError):
    """A job request that cannot be done as asked (bad spec, over a hard quota)."""


class JobNotFound(JobError):
    pass


class JobService:
    def __init__(self, jobs: JobStore, quotas: QuotaEnforcer, launcher: Launcher):
        self.jobs = jobs
        self.quotas = quotas
        self.launcher = launcher

    def submit(self, tenant: str, raw_spec: dict) -> JobRecord:
        """Validate a training spec (the training CLI's format) and queue it for ``tenant``.

        Raises:
            JobError: the spec is invalid, or the job could never fit the tenant's quotas.
        """
        from expertmesh.train.spec import spec_from_dict

        if not isinstance(raw_spec, dict):
            raise JobError(f"spec must be a mapping of sections, got {type(raw_spec).__name__}")
        try:
            spec = spec_from_dict(raw_spec, source="spec")
        except ValueError as exc:
            raise JobError(str(exc)) from None
        resources = JobResources.for_spec(spec)
        quotas = self.quotas.get_quotas(tenant)
        if quotas is None:
            raise JobError(f"tenant {tenant!r} does not exist")
        too_big = [f"{what}={need} > {what}_slots={limit}" for what, need, limit in
                   (("cpu", resources.cpu, quotas.cpu_slots), ("gpu", resources.gpu, quotas.gpu_slots)) if need > limit]
        if quotas.max_concurrent_jobs == 0:
            too_big.append("max_concurrent_jobs=0")
        if too_big:
            raise JobError(f"job can never run within tenant {tenant!r}'s quotas: {', '.join(too_big)}")
        return self.jobs.submit(tenant, spec.model_dump(mode="json"), resources, spec.name)

    def get(self, job_id: str, tenant: str | None = None) -> JobRecord:
        """The job; :class:`JobNotFound` if it does not exist or belongs to another tenant."""
        job = self.jobs.get(job_id)
        if job is None or (tenant is not None and job.tenant != tenant):
            raise JobNotFound(f"job {job_id!r} does not exist")
        return job

    def list(self, tenant: str | None = None, limit: int = 100) -> list[JobRecord]:
        return self.jobs.list(tenant, limit)

    def cancel(self, job_id: str, tenant: str | None = None) -> JobRecord:
        """Cancel a queued job, or stop a running one's Ray job. Terminal jobs are left as they are."""
        job = self.get(job_id, tenant)
        now = time.time()
        if job.state is JobState.QUEUED and self.jobs.transition(job_id, [JobState.QUEUED], JobState.CANCELLED,
                                                                 finished_at=now):
            self.quotas.release_slots(job.tenant, job_id)  # a dispatch in flight may have taken them
            return self.get(job_id)
        job = self.get(job_id)
        if job.state is JobState.RUNNING:
            self.launcher.stop(job_id)
            logs = tail_lines(self.launcher.logs(job_id), 40)
            if self.jobs.transition(job_id, [JobState.RUNNING], JobState.CANCELLED, finished_at=now, log_tail=logs):
                self.quotas.release_slots(job.tenant, job_id)
        return self.get(job_id)

    def logs(self, job_id: str, tenant: str | None = None, tail: int | None = None) -> str:
        job = self.get(job_id, tenant)
        text = self.launcher.logs(job_id) if job.state is not JobState.QUEUED else ""
        if not text and job.log_tail:
            text = job.log_tail + "\n"
        return tail_lines(text, tail) + "\n" if tail is not None and text else text

    def follow_logs(self, job_id: str, tenant: str | None = None, poll_interval_s: float = 1.0,
                    timeout_s: float | None = None) -> Iterator[str]:
        """New log text as it appears, until the job is terminal (or ``timeout_s``)."""
        sent = 0
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.get(job_id, tenant)
            text = self.launcher.logs(job_id) if job.state is not JobState.QUEUED else ""
            if len(text) > sent:
                yield text[sent:]
                sent = len(text)
            if job.state.terminal:
                if sent == 0 and job.log_tail:
                    yield job.log_tail + "\n"
                return
            if deadline is not None and time.monotonic() > deadline:
                return
            time.sleep(poll_interval_s)
