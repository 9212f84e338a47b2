"""Job records and states.

    queued ──dispatch──► running ──► succeeded
       │                    ├──────► failed      (error + log tail recorded)
       │                    └──────► cancelled   (Ray job stopped)
       ├──► cancelled (before dispatch)
       └──► failed    (could not be launched)

A job's id (``job-<10 hex>``) is also its Ray Jobs ``submission_id``, which is what makes
dispatch idempotent: Ray refuses a second submission with the same id.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Any

JOB_ID_HEX_CHARS = 10


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


def new_job_id() -> str:
    return f"job-{secrets.token_hex(JOB_ID_HEX_CHARS // 2)}"


def is_job_id(text: str) -> bool:
    return (isinstance(text, str) and text.startswith("job-") and len(text) == 4 + JOB_ID_HEX_CHARS
            and all(c in "0123456789abcdef" for c in text[4:]))


@dataclass(frozen=True)
class JobResources:
    """What a running job holds against its tenant's slots: 1 CPU per training worker."""

    cpu: int
    gpu: int = 0

    @classmethod
    def for_spec(cls, spec: Any) -> JobResources:
        workers = spec.elastic.max_workers if spec.elastic is not None else spec.workers
        return cls(cpu=int(workers), gpu=0)


@dataclass
class JobRecord:
    """One job as stored in ``em:job:<id>`` (every field a string in Redis)."""

    job_id: str
    tenant: str
    name: str
    state: JobState
    spec: dict[str, Any]
    cpu: int
    gpu: int
    submitted_at: float
    started_at: float | None = None
    finished_at: float | None = None
    run_dir: str = ""
    checkpoint: str = ""
    error: str = ""
    log_tail: str = ""
    wait_reason: str = ""
    dispatches: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_redis(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("spec", "extra"):
                out[f.name] = json.dumps(value)
            elif isinstance(value, JobState):
                out[f.name] = value.value
            elif value is None:
                out[f.name] = ""
            else:
                out[f.name] = str(value)
        return out

    @classmethod
    def from_redis(cls, raw: dict[str, str]) -> JobRecord:
        def opt_float(v: str | None) -> float | None:
            return float(v) if v else None

        return cls(
            job_id=raw["job_id"], tenant=raw["tenant"], name=raw["name"], state=JobState(raw["state"]),
            spec=json.loads(raw["spec"]), cpu=int(raw["cpu"]), gpu=int(raw["gpu"]),
            submitted_at=float(raw["submitted_at"]), started_at=opt_float(raw.get("started_at")),
            finished_at=opt_float(raw.get("finished_at")), run_dir=raw.get("run_dir", ""),
            checkpoint=raw.get("checkpoint", ""), error=raw.get("error", ""), log_tail=raw.get("log_tail", ""),
            wait_reason=raw.get("wait_reason", ""), dispatches=int(raw.get("dispatches") or 0),
            extra=json.loads(raw.get("extra") or "{}"),
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
        return data
