"""How a job reaches the cluster: a small interface, and its Ray Jobs implementation.

The job id is the Ray Jobs ``submission_id``; :meth:`RayJobsLauncher.launch` first asks
whether that submission exists and Ray itself rejects a duplicate id, so however many
times a (restarted) scheduler replays a dispatch, the job runs once.

The entrypoint is the training CLI on a spec file written for the job::

    python -m expertmesh train <runs_root>/<job id>/spec.json --out <runs_root>/<job id>/run --no-sample

``runs_root`` must be storage every node sees (one machine: a local directory); the
serving checkpoint then appears at ``<runs_root>/<job id>/run/checkpoint``.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Protocol

from expertmesh.jobs.model import JobRecord

DEFAULT_COMMAND = ("{python}", "-m", "expertmesh", "train", "{spec}", "--out", "{out}", "--no-sample")


class LaunchStatus(str, Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"
    MISSING = "MISSING"  # the cluster has no such job (e.g. the cluster was replaced)

    @property
    def done(self) -> bool:
        return self not in (LaunchStatus.PENDING, LaunchStatus.RUNNING)


class LaunchError(RuntimeError):
    """The cluster refused or could not take the job."""


@dataclass(frozen=True)
class LaunchRequest:
    submission_id: str
    entrypoint: str
    env_vars: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    entrypoint_num_cpus: float = 0.0  # the driver only orchestrates; its workers ask for their own CPUs


@dataclass(frozen=True)
class LaunchConfig:
    """Where job files go and which command runs a job (``{python}``, ``{spec}``, ``{out}`` filled in)."""

    runs_root: Path
    command: tuple[str, ...] = DEFAULT_COMMAND
    python: str = sys.executable
    env_vars: dict[str, str] = field(default_factory=dict)


def prepare_launch(job: JobRecord, config: LaunchConfig) -> tuple[LaunchRequest, Path]:
    """Write the job's spec file (idempotent) and build its launch request; returns the run dir."""
    job_dir = Path(config.runs_root).resolve() / job.job_id
    job_dir.mkdir(parents=True, exist_ok=True)
    spec_file = job_dir / "spec.json"
    spec_file.write_text(json.dumps(job.spec, indent=2) + "\n", encoding="utf-8")
    run_dir = job_dir / "run"
    argv = [part.format(python=config.python, spec=str(spec_file), out=str(run_dir)) for part in config.command]
    request = LaunchRequest(submission_id=job.job_id, entrypoint=shlex.join(argv), env_vars=dict(config.env_vars),
                            metadata={"tenant": job.tenant, "name": job.name, "expertmesh_job": job.job_id})
    return request, run_dir


class Launcher(Protocol):
    def launch(self, request: LaunchRequest) -> bool:
        """Start the job unless it exists; True when this call created it."""

    def status(self, submission_id: str) -> tuple[LaunchStatus, str]:
        """The job's status and the cluster's message about it."""

    def logs(self, submission_id: str) -> str:
        """Everything the job printed so far ("" if none or unknown)."""

    def stop(self, submission_id: str) -> bool:
        """Ask the cluster to stop the job; False if it was not running."""


def tail_lines(text: str, n: int) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-n:]) if n > 0 else ""


class RayJobsLauncher:
    """:class:`Launcher` over ``ray.job_submission.JobSubmissionClient`` (dashboard HTTP address)."""

    def __init__(self, address: str, agent_wait_s: float = 60.0, retry_interval_s: float = 0.5):
        self.address = address
        self.agent_wait_s = agent_wait_s
        self.retry_interval_s = retry_interval_s
        self._client = None

    @property
    def client(self):
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            self._client = JobSubmissionClient(self.address)
        return self._client

    def _exists(self, submission_id: str) -> bool:
        try:
            self.client.get_job_info(submission_id)
            return True
        except RuntimeError as exc:
            if "does not exist" in str(exc) or "404" in str(exc):
                return False
            raise

    def launch(self, request: LaunchRequest) -> bool:
        if self._exists(request.submission_id):
            return False
        deadline = time.monotonic() + self.agent_wait_s
        while True:
            try:
                self.client.submit_job(
                    entrypoint=request.entrypoint, submission_id=request.submission_id,
                    runtime_env={"env_vars": request.env_vars} if request.env_vars else None,
                    metadata=request.metadata, entrypoint_num_cpus=request.entrypoint_num_cpus)
                return True
            except RuntimeError as exc:
                if self._exists(request.submission_id):
                    return False  # another dispatch of the same job got there first
                # a fresh cluster answers "No available agent" until its job agent is up
                if "No available agent" in str(exc) and time.monotonic() < deadline:
                    time.sleep(self.retry_interval_s)
                    continue
                raise LaunchError(f"Ray Jobs refused {request.submission_id}: {str(exc).splitlines()[0]}") from None

    def status(self, submission_id: str) -> tuple[LaunchStatus, str]:
        try:
            info = self.client.get_job_info(submission_id)
        except RuntimeError as exc:
            if "does not exist" in str(exc) or "404" in str(exc):
                return LaunchStatus.MISSING, f"Ray has no job {submission_id}"
            raise
        return LaunchStatus(str(info.status.value)), info.message or ""

    def logs(self, submission_id: str) -> str:
        try:
            return self.client.get_job_logs(submission_id)
        except RuntimeError:
            return ""

    def stop(self, submission_id: str) -> bool:
        try:
            return bool(self.client.stop_job(submission_id))
        except RuntimeError as exc:
            if "does not exist" in str(exc) or "404" in str(exc):
                return False
            raise
