"""Job queue, scheduler and job service against a real Valkey with a fake launcher (no Ray)."""

from __future__ import annotations

import threading

import pytest

from expertmesh.jobs import (
    JobError,
    JobNotFound,
    JobService,
    JobState,
    JobStore,
    LaunchConfig,
    LaunchError,
    LaunchStatus,
    Outcome,
    Scheduler,
    SchedulerConfig,
    Waiting,
    fair_order,
)
from expertmesh.jobs.store import GROUP, STREAM
from expertmesh.tenants import HashParams, QuotaEnforcer, Quotas, TenantRegistry

TINY = {"preset": "tiny", "steps": 5}


class FakeLauncher:
    """Records launches like Ray Jobs would: one job per submission id."""

    def __init__(self):
        self.jobs: dict[str, dict] = {}
        self.submit_calls = 0
        self.lock = threading.Lock()
        self.refuse = False

    def launch(self, request):
        with self.lock:
            self.submit_calls += 1
            if self.refuse:
                raise LaunchError("cluster is full of bees")
            if request.submission_id in self.jobs:
                return False
            self.jobs[request.submission_id] = {"status": LaunchStatus.RUNNING, "logs": "starting\n",
                                                "request": request, "message": ""}
            return True

    def status(self, sid):
        job = self.jobs.get(sid)
        return (job["status"], job["message"]) if job else (LaunchStatus.MISSING, "no such job")

    def logs(self, sid):
        return self.jobs.get(sid, {}).get("logs", "")

    def stop(self, sid):
        job = self.jobs.get(sid)
        if job is None or job["status"].done:
            return False
        job["status"] = LaunchStatus.STOPPED
        return True

    def finish(self, sid, status, logs="", message=""):
        self.jobs[sid].update(status=status, message=message)
        self.jobs[sid]["logs"] += logs


class SimulatedCrash(BaseException):
    """The scheduler process dies (not an error it could handle)."""


class CrashAfterLaunch(FakeLauncher):
    def __init__(self, inner):
        self.inner = inner

    def launch(self, request):
        self.inner.launch(request)
        raise SimulatedCrash()

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture
def tenants(client):
    reg = TenantRegistry(client, HashParams(n=2**8))
    reg.create_tenant("acme", Quotas(max_concurrent_jobs=2, cpu_slots=4))
    reg.create_tenant("beta", Quotas(max_concurrent_jobs=1, cpu_slots=1))
    return reg


@pytest.fixture
def launcher():
    return FakeLauncher()


@pytest.fixture
def service(client, tenants, launcher):
    return JobService(JobStore(client), QuotaEnforcer(client), launcher)


def make_scheduler(client, launcher, tmp_path, **config):
    cfg = dict(claim_idle_ms=300, poll_interval_s=0.1)
    cfg.update(config)
    return Scheduler(client, launcher, LaunchConfig(tmp_path / "runs"), SchedulerConfig(**cfg))


def test_fair_order_is_round_robin_fewest_running_first():
    w = [Waiting(f"{i}-0", f"a{i}", "a") for i in (1, 2, 3)] + [Waiting("5-0", "b1", "b"), Waiting("6-0", "c1", "c")]
    assert [x.job_id for x in fair_order(w, {})] == ["a1", "b1", "c1", "a2", "a3"]
    assert [x.job_id for x in fair_order(w, {"a": 2, "b": 1})] == ["c1", "b1", "a1", "a2", "a3"]


def test_submit_validates_spec_and_quota(service, client):
    job = service.submit("acme", TINY)
    assert job.state is JobState.QUEUED and job.cpu == 1 and job.spec["steps"] == 5
    assert client.xlen(STREAM) == 1
    with pytest.raises(JobError, match="steps: Input should be greater than 0"):
        service.submit("acme", {"preset": "tiny", "steps": 0})
    with pytest.raises(JobError, match="unknown preset"):
        service.submit("acme", {"preset": "huge"})
    with pytest.raises(JobError, match="never run within tenant 'beta'.*cpu=2 > cpu_slots=1"):
        service.submit("beta", {"preset": "tiny", "workers": 2})
    with pytest.raises(JobNotFound):
        service.get(job.job_id, tenant="beta")  # other tenants' jobs do not exist for them


def test_dispatch_within_quotas_and_fair_across_tenants(service, client, launcher, tmp_path):
    a = [service.submit("acme", TINY) for _ in range(3)]
    b = [service.submit("beta", TINY) for _ in range(2)]
    sched = make_scheduler(client, launcher, tmp_path)
    report = sched.step()
    assert sorted(report.launched()) == sorted([a[0].job_id, a[1].job_id, b[0].job_id])
    assert report.outcomes[a[2].job_id] is Outcome.BLOCKED and report.outcomes[b[1].job_id] is Outcome.BLOCKED
    assert QuotaEnforcer(client).usage("acme") == {"jobs": 2, "cpu": 2, "gpu": 0}
    assert "max_concurrent_jobs quota reached" in service.get(a[2].job_id).wait_reason
    req = launcher.jobs[a[0].job_id]["request"]
    assert "-m expertmesh train" in req.entrypoint and f"{a[0].job_id}/spec.json" in req.entrypoint
    assert (tmp_path / "runs" / a[0].job_id / "spec.json").is_file()
    # a finishes: its slot goes to acme's next job
    ckpt = tmp_path / "runs" / a[0].job_id / "run" / "checkpoint"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")
    launcher.finish(a[0].job_id, LaunchStatus.SUCCEEDED, "done\n")
    sched.step()
    done = service.get(a[0].job_id)
    assert done.state is JobState.SUCCEEDED and done.checkpoint == str(ckpt) and "done" in done.log_tail
    report = sched.step()
    assert service.get(a[2].job_id).state is JobState.RUNNING
    assert service.get(b[1].job_id).state is JobState.QUEUED
    assert client.xlen(STREAM) == 1  # only b[1] is still waiting


def test_failure_records_log_tail(service, client, launcher, tmp_path):
    job = service.submit("acme", TINY)
    sched = make_scheduler(client, launcher, tmp_path, log_tail_lines=2)
    sched.step()
    launcher.finish(job.job_id, LaunchStatus.FAILED, "line1\nline2\nValueError: boom\n", "exit code 1")
    assert sched.step().finished == {job.job_id: JobState.FAILED}
    failed = service.get(job.job_id)
    assert failed.error == "exit code 1" and failed.log_tail == "line2\nValueError: boom"
    assert QuotaEnforcer(client).usage("acme")["jobs"] == 0


def test_launch_refused_fails_the_job(service, client, launcher, tmp_path):
    job = service.submit("acme", TINY)
    launcher.refuse = True
    make_scheduler(client, launcher, tmp_path).step()
    failed = service.get(job.job_id)
    assert failed.state is JobState.FAILED and "bees" in failed.error
    assert client.xlen(STREAM) == 0 and QuotaEnforcer(client).usage("acme")["jobs"] == 0


def test_cancel_queued_and_running(service, client, launcher, tmp_path):
    queued = service.submit("beta", TINY)
    running = service.submit("acme", TINY)
    sched = make_scheduler(client, launcher, tmp_path)
    blocker = service.submit("beta", TINY)
    sched.step()
    assert service.get(running.job_id).state is JobState.RUNNING
    assert service.cancel(blocker.job_id).state is JobState.CANCELLED  # was queued behind `queued`
    assert service.cancel(running.job_id).state is JobState.CANCELLED
    assert launcher.jobs[running.job_id]["status"] is LaunchStatus.STOPPED
    assert service.cancel(running.job_id).state is JobState.CANCELLED  # idempotent
    sched.step()
    assert blocker.job_id not in launcher.jobs  # never launched
    assert QuotaEnforcer(client).usage("acme")["jobs"] == 0
    assert service.get(queued.job_id).state is JobState.RUNNING


def test_scheduler_killed_after_launch_neither_loses_nor_duplicates(service, client, launcher, tmp_path):
    job = service.submit("acme", TINY)
    dying = make_scheduler(client, CrashAfterLaunch(launcher), tmp_path)
    with pytest.raises(SimulatedCrash):
        dying.step()
    assert service.get(job.job_id).state is JobState.QUEUED  # launched, but the record never moved
    assert client.xpending(STREAM, GROUP)["pending"] == 1
    survivor = make_scheduler(client, launcher, tmp_path)
    import time

    time.sleep(0.4)  # > claim_idle_ms
    report = survivor.step()
    assert report.reclaimed == 1
    assert service.get(job.job_id).state is JobState.RUNNING
    assert len(launcher.jobs) == 1 and launcher.submit_calls == 2  # replayed, Ray-side dedup held
    assert client.xpending(STREAM, GROUP)["pending"] == 0 and client.xlen(STREAM) == 0
    assert QuotaEnforcer(client).usage("acme") == {"jobs": 1, "cpu": 1, "gpu": 0}


def test_scheduler_killed_before_launch_loses_nothing(service, client, launcher, tmp_path):
    job = service.submit("acme", TINY)
    dying = make_scheduler(client, launcher, tmp_path)
    dying._pull()  # claimed the entry, then died
    survivor = make_scheduler(client, launcher, tmp_path)
    assert survivor.step().launched() == []  # not idle long enough: still the dead one's
    import time

    time.sleep(0.4)
    assert survivor.step().launched() == [job.job_id]


def test_live_scheduler_keeps_its_blocked_entries(service, client, launcher, tmp_path):
    """Blocked entries are re-claimed by their holder every step, so another live scheduler
    does not steal them."""
    service.submit("beta", TINY)
    waiting = service.submit("beta", TINY)
    a = make_scheduler(client, launcher, tmp_path)
    b = make_scheduler(client, launcher, tmp_path)
    import time

    for _ in range(4):
        a.step()
        time.sleep(0.15)
        assert b.step().reclaimed == 0
    assert service.get(waiting.job_id).state is JobState.QUEUED


def test_logs_and_follow(service, client, launcher, tmp_path):
    job = service.submit("acme", TINY)
    assert service.logs(job.job_id) == ""
    sched = make_scheduler(client, launcher, tmp_path)
    sched.step()
    assert service.logs(job.job_id) == "starting\n"
    launcher.finish(job.job_id, LaunchStatus.SUCCEEDED, "a\nb\nc\n")
    assert service.logs(job.job_id, tail=2) == "b\nc\n"
    sched.step()
    assert "".join(service.follow_logs(job.job_id, poll_interval_s=0.01)) == "starting\na\nb\nc\n"


def test_scheduler_config_validation():
    with pytest.raises(ValueError, match="steal"):
        SchedulerConfig(claim_idle_ms=100, poll_interval_s=1.0)
