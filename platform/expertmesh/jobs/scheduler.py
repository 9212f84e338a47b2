"""The job scheduler: takes queued jobs from the Redis Stream, fairly across tenants and
within their quotas, launches them, and follows them to a terminal state.

One ``step()``::

    reclaim   XAUTOCLAIM entries idle > claim_idle_ms from dead schedulers
    pull      XREADGROUP ">"   new entries into this scheduler's pending list
    waiting   XREADGROUP "0"   this scheduler's pending entries (with their fields)
    decide    fair_order(waiting, running per tenant)      (pure; see below)
    execute   per job: quota slots (idempotent) → launch (idempotent) → running → XACK+XDEL
    keep      XCLAIM JUSTID the entries still waiting, so live schedulers keep them
    monitor   poll running jobs; record succeeded/failed/cancelled, release their slots

Crash safety: an entry is acked only after the job's state left ``queued``. A scheduler
that dies anywhere before that leaves the entry pending under its name; after
``claim_idle_ms`` another scheduler claims it and replays the dispatch. Slot acquisition
is idempotent per job and the launch uses the job id as the Ray submission id, so the
replay neither double-counts quota nor starts the job twice; if the job already left
``queued`` the replay only acks.

Fairness: each round gives every tenant with waiting jobs its oldest one, tenants with
fewer running jobs first (ties: the longest-waiting job first). A tenant at its quota is
skipped for the rest of the step, its jobs keep their order, and other tenants go ahead.
Example: A has 3 waiting, B 1, nobody running → A1, B1, A2, A3.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import redis

from expertmesh.jobs.launcher import LaunchConfig, Launcher, LaunchError, LaunchStatus, prepare_launch, tail_lines
from expertmesh.jobs.model import JobState
from expertmesh.jobs.store import GROUP, STREAM, JobStore
from expertmesh.tenants.quotas import QuotaEnforcer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    claim_idle_ms: int = 30_000  # a pending entry idle this long belongs to a dead scheduler
    poll_interval_s: float = 1.0
    batch: int = 256
    log_tail_lines: int = 40

    def __post_init__(self) -> None:
        if self.claim_idle_ms <= 0 or self.poll_interval_s <= 0 or self.batch <= 0:
            raise ValueError(f"claim_idle_ms, poll_interval_s and batch must be > 0, got {self}")
        if self.claim_idle_ms < round(3 * self.poll_interval_s * 1000):
            raise ValueError(f"claim_idle_ms={self.claim_idle_ms} must be >= 3 x poll_interval_s="
                             f"{self.poll_interval_s}s, or live schedulers would steal each other's entries")


@dataclass(frozen=True)
class Waiting:
    """A queue entry this scheduler holds: stream id, job, tenant."""

    entry_id: str
    job_id: str
    tenant: str

    @property
    def order(self) -> tuple[int, int]:
        ms, seq = self.entry_id.split("-")
        return int(ms), int(seq)


class Outcome(str, Enum):
    LAUNCHED = "launched"
    BLOCKED = "blocked"  # tenant at quota: stays queued
    SKIPPED = "skipped"  # already dispatched or cancelled: acked only
    FAILED = "failed"  # could not be launched
    DROPPED = "dropped"  # entry for a job that does not exist


@dataclass
class StepReport:
    reclaimed: int = 0
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    finished: dict[str, JobState] = field(default_factory=dict)

    def launched(self) -> list[str]:
        return [j for j, o in self.outcomes.items() if o is Outcome.LAUNCHED]


def fair_order(waiting: list[Waiting], running: dict[str, int]) -> list[Waiting]:
    """Dispatch order: round-robin over tenants, fewest running first, FIFO within a tenant."""
    queues: dict[str, deque[Waiting]] = {}
    for w in sorted(waiting, key=lambda w: w.order):
        queues.setdefault(w.tenant, deque()).append(w)
    load = dict(running)
    order: list[Waiting] = []
    while queues:
        tenant = min(queues, key=lambda t: (load.get(t, 0), queues[t][0].order))
        order.append(queues[tenant].popleft())
        load[tenant] = load.get(tenant, 0) + 1
        if not queues[tenant]:
            del queues[tenant]
    return order


class Scheduler:
    def __init__(self, client: redis.Redis, launcher: Launcher, launch_config: LaunchConfig,
                 config: SchedulerConfig | None = None, consumer: str | None = None,
                 clock: Callable[[], float] = time.time):
        self.client = client
        self.jobs = JobStore(client)
        self.quotas = QuotaEnforcer(client)
        self.launcher = launcher
        self.launch_config = launch_config
        self.config = config or SchedulerConfig()
        self.consumer = consumer or f"scheduler-{uuid.uuid4().hex[:12]}"
        self.clock = clock

    # ---- one step -------------------------------------------------------------------------------------
    def step(self) -> StepReport:
        report = StepReport(reclaimed=self._reclaim())
        self._pull()
        waiting = self._my_pending()
        running = self._running_per_tenant()
        blocked: set[str] = set()
        for w in fair_order(waiting, running):
            if w.tenant in blocked:
                report.outcomes[w.job_id] = Outcome.BLOCKED
                continue
            outcome = self.dispatch(w)
            report.outcomes[w.job_id] = outcome
            if outcome is Outcome.BLOCKED:
                blocked.add(w.tenant)
        self._keep([w.entry_id for w in waiting if report.outcomes.get(w.job_id) is Outcome.BLOCKED])
        report.finished = self.monitor()
        return report

    def _reclaim(self) -> int:
        claimed, start = 0, "0-0"
        while True:
            start, entries, _deleted = self.client.xautoclaim(
                STREAM, GROUP, self.consumer, self.config.claim_idle_ms, start_id=start, count=self.config.batch)
            claimed += len(entries)
            if start == "0-0" or not entries:
                break
        if claimed:
            log.warning("RECLAIM: %s took %d pending job entries from dead schedulers", self.consumer, claimed)
        return claimed

    def _pull(self) -> None:
        self.client.xreadgroup(GROUP, self.consumer, {STREAM: ">"}, count=self.config.batch)

    def _my_pending(self) -> list[Waiting]:
        reply = self.client.xreadgroup(GROUP, self.consumer, {STREAM: "0"}, count=None)
        waiting = []
        for _stream, entries in reply or []:
            for entry_id, values in entries:
                if not values:  # deleted from the stream after being read: nothing to dispatch
                    self.client.xack(STREAM, GROUP, entry_id)
                    continue
                waiting.append(Waiting(entry_id, values["job_id"], values["tenant"]))
        return waiting

    def _running_per_tenant(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for job_id in self.jobs.active_ids():
            job = self.jobs.get(job_id)
            if job is not None:
                counts[job.tenant] = counts.get(job.tenant, 0) + 1
        return counts

    def _keep(self, entry_ids: list[str]) -> None:
        if entry_ids:  # reset their idle time: these entries are held by a live scheduler
            self.client.xclaim(STREAM, GROUP, self.consumer, 0, entry_ids, justid=True)

    def _ack(self, entry_id: str) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.xack(STREAM, GROUP, entry_id)
        pipe.xdel(STREAM, entry_id)
        pipe.execute()

    # ---- dispatch one job -----------------------------------------------------------------------------
    def dispatch(self, w: Waiting) -> Outcome:
        job = self.jobs.get(w.job_id)
        if job is None:
            self._ack(w.entry_id)
            return Outcome.DROPPED
        if job.state is not JobState.QUEUED:
            # a dead scheduler launched it before acking, or it was cancelled while queued
            if job.state.terminal:
                self.quotas.release_slots(job.tenant, job.job_id)
            self._ack(w.entry_id)
            return Outcome.SKIPPED
        grant = self.quotas.acquire_slots(job.tenant, job.job_id, job.cpu, job.gpu)
        if not grant.granted:
            if job.wait_reason != grant.message:
                self.jobs.update(job.job_id, wait_reason=grant.message)
            return Outcome.BLOCKED
        request, run_dir = prepare_launch(job, self.launch_config)
        try:
            created = self.launcher.launch(request)
        except LaunchError as exc:
            self.jobs.transition(job.job_id, [JobState.QUEUED], JobState.FAILED, error=str(exc),
                                 finished_at=self.clock())
            self.quotas.release_slots(job.tenant, job.job_id)
            self._ack(w.entry_id)
            return Outcome.FAILED
        moved = self.jobs.transition(job.job_id, [JobState.QUEUED], JobState.RUNNING, started_at=self.clock(),
                                     run_dir=str(run_dir), wait_reason="", dispatches=job.dispatches + 1)
        if not moved:  # cancelled between our read and the launch: undo the launch
            self.launcher.stop(job.job_id)
            self.quotas.release_slots(job.tenant, job.job_id)
        log.info("DISPATCH: %s (tenant %s) %s by %s", job.job_id, job.tenant,
                 "launched" if created else "was already launched; adopted", self.consumer)
        self._ack(w.entry_id)
        return Outcome.LAUNCHED if moved else Outcome.SKIPPED

    # ---- follow running jobs ----------------------------------------------------------------------------
    def monitor(self) -> dict[str, JobState]:
        finished: dict[str, JobState] = {}
        for job_id in self.jobs.active_ids():
            status, message = self.launcher.status(job_id)
            if not status.done:
                continue
            job = self.jobs.get(job_id)
            if job is None:
                continue
            logs = tail_lines(self.launcher.logs(job_id), self.config.log_tail_lines)
            now = self.clock()
            if status is LaunchStatus.SUCCEEDED:
                ckpt = Path(job.run_dir) / "checkpoint"
                checkpoint = str(ckpt) if (ckpt / "config.json").is_file() else ""
                new, fields = JobState.SUCCEEDED, {"checkpoint": checkpoint, "log_tail": logs}
            elif status is LaunchStatus.STOPPED:
                new, fields = JobState.CANCELLED, {"log_tail": logs}
            else:
                new, fields = JobState.FAILED, {"error": message or f"job ended with status {status.value}",
                                                "log_tail": logs}
            if self.jobs.transition(job_id, [JobState.RUNNING], new, finished_at=now, **fields):
                finished[job_id] = new
            self.quotas.release_slots(job.tenant, job_id)
        return finished

    # ---- forever -------------------------------------------------------------------------------------------
    def run(self, stop: Callable[[], bool]) -> None:
        """Step every ``poll_interval_s`` until ``stop()``; a failing step is logged and retried."""
        while not stop():
            try:
                self.step()
            except redis.exceptions.ConnectionError as exc:
                log.warning("scheduler step: state store unreachable (%s); retrying", exc)
            except Exception:  # noqa: BLE001 - the loop must outlive one bad step; it is logged in full
                log.exception("scheduler step failed; retrying")
            time.sleep(self.config.poll_interval_s)
