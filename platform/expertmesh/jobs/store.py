"""Jobs in Redis: records, the dispatch queue (a Stream with a consumer group) and atomic
state transitions.

Redis keys (``T`` = tenant, ``J`` = job id)::

    em:job:J              hash    the JobRecord (see jobs.model)
    em:jobs               zset    J -> submitted_at (all jobs)
    em:jobs:tenant:T      zset    J -> submitted_at (T's jobs)
    em:jobs:active        set     jobs in state running (what schedulers poll)
    em:jobs:states        hash    state -> number of jobs in it (a metric source)
    em:jobq               stream  {job_id, tenant}: one entry per job waiting for dispatch;
                                  consumer group "schedulers"; acked and deleted once the
                                  job is launched, failed to launch, or was cancelled

Every state change goes through one Lua script that checks the current state, so the
scheduler, the monitor and a cancel racing each other cannot undo one another: a job
cancelled while queued is never moved to running.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import redis

from expertmesh.jobs.model import JobRecord, JobResources, JobState, new_job_id
from expertmesh.store import key

STREAM = key("jobq")
GROUP = "schedulers"

# KEYS: job hash, active set, state counts.  ARGV: job id, allowed from-states (comma separated),
# new state, then field/value pairs.  Returns {1, previous} on success, {0, current or ''}.
_TRANSITION_LUA = """
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return {0, ''} end
local ok = false
for s in string.gmatch(ARGV[2], '[^,]+') do
  if s == cur then ok = true end
end
if not ok then return {0, cur} end
redis.call('HSET', KEYS[1], 'state', ARGV[3])
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[3] == 'running' then
  redis.call('SADD', KEYS[2], ARGV[1])
else
  redis.call('SREM', KEYS[2], ARGV[1])
end
redis.call('HINCRBY', KEYS[3], cur, -1)
redis.call('HINCRBY', KEYS[3], ARGV[3], 1)
return {1, cur}
"""


class JobStore:
    def __init__(self, client: redis.Redis):
        self.client = client
        self._transition = client.register_script(_TRANSITION_LUA)
        self.ensure_group()

    def ensure_group(self) -> None:
        try:
            self.client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # ---- writes ------------------------------------------------------------------------------------
    def submit(self, tenant: str, spec: dict, resources: JobResources, name: str) -> JobRecord:
        """Store a validated job as queued and enqueue it for dispatch (one MULTI/EXEC)."""
        job = JobRecord(job_id=new_job_id(), tenant=tenant, name=name, state=JobState.QUEUED, spec=spec,
                        cpu=resources.cpu, gpu=resources.gpu, submitted_at=time.time())
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(key("job", job.job_id), mapping=job.to_redis())
        pipe.zadd(key("jobs"), {job.job_id: job.submitted_at})
        pipe.zadd(key("jobs", "tenant", tenant), {job.job_id: job.submitted_at})
        pipe.hincrby(key("jobs", "states"), JobState.QUEUED.value, 1)
        pipe.xadd(STREAM, {"job_id": job.job_id, "tenant": tenant})
        pipe.execute()
        return job

    def transition(self, job_id: str, allowed: Iterable[JobState], new: JobState, **fields: object) -> bool:
        """Move ``job_id`` to ``new`` if it is in one of ``allowed``; set ``fields`` with it."""
        pairs: list[str] = []
        for name, value in fields.items():
            pairs += [name, "" if value is None else str(value)]
        done, _ = self._transition(
            keys=[key("job", job_id), key("jobs", "active"), key("jobs", "states")],
            args=[job_id, ",".join(s.value for s in allowed), new.value, *pairs])
        return bool(int(done))

    def update(self, job_id: str, **fields: object) -> None:
        """Set non-state fields (e.g. ``wait_reason``) of an existing job."""
        if "state" in fields:
            raise ValueError("use transition() to change a job's state")
        self.client.hset(key("job", job_id), mapping={k: "" if v is None else str(v) for k, v in fields.items()})

    # ---- reads ---------------------------------------------------------------------------------------
    def get(self, job_id: str) -> JobRecord | None:
        raw = self.client.hgetall(key("job", job_id))
        return JobRecord.from_redis(raw) if raw else None

    def list(self, tenant: str | None = None, limit: int = 100) -> list[JobRecord]:
        index = key("jobs") if tenant is None else key("jobs", "tenant", tenant)
        ids = self.client.zrevrange(index, 0, limit - 1)
        pipe = self.client.pipeline()
        for job_id in ids:
            pipe.hgetall(key("job", job_id))
        return [JobRecord.from_redis(raw) for raw in pipe.execute() if raw]

    def active_ids(self) -> list[str]:
        return sorted(self.client.smembers(key("jobs", "active")))

    def state_counts(self) -> dict[str, int]:
        raw = self.client.hgetall(key("jobs", "states"))
        return {s.value: int(raw.get(s.value, 0)) for s in JobState}

    def queue_depth(self) -> int:
        """Stream entries not yet acknowledged (queued jobs, including ones being dispatched)."""
        return int(self.client.xlen(STREAM))
