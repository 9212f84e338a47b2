"""Per-tenant quotas, enforced atomically inside Redis by Lua scripts.

Two kinds of limit:

- **Rates** (``requests_per_min``, ``tokens_per_min``): two token buckets per tenant, each
  holding at most one minute's allowance and refilled continuously (a sliding window
  without the bookkeeping of a request log). A request takes 1 request and its token
  *reservation* (prompt tokens + ``max_tokens``) from both buckets in one script call,
  all or nothing, using the server's clock (``TIME``), so concurrent gateways can never
  admit more than the limit. Unused tokens are returned afterwards
  (:meth:`QuotaEnforcer.refund_tokens`).
  Example: ``tokens_per_min=6000`` refills 100 tokens/s; a request with a 20-token prompt
  and ``max_tokens=80`` reserves 100 and, if it generated 30 tokens, gets 50 back.
- **Slots** (``max_concurrent_jobs``, ``cpu_slots``, ``gpu_slots``): counters of what a
  tenant's running jobs hold. :meth:`QuotaEnforcer.acquire_slots` is idempotent per job
  id (a job that already holds its slots is granted again without counting twice) and
  :meth:`QuotaEnforcer.release_slots` only gives back what that job holds, so a scheduler
  that crashes and is replaced can replay either call safely.

The limits live in the tenant's quota hash and are read by the scripts themselves, so a
quota change applies to the next request without any cache to invalidate.

Redis keys (``T`` = tenant name)::

    em:quota:T         hash  the limits (fields = Quotas field names)
    em:bucket:T        hash  req, tok (tokens left, floats), ts (server seconds)
    em:usage:T         hash  jobs, cpu, gpu (held now)
    em:holders:T       hash  job id -> "cpu gpu" it holds
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import redis
from pydantic import BaseModel, ConfigDict, Field

from expertmesh.store import key

SECONDS_PER_MINUTE = 60.0
BUCKET_TTL_MS = 120_000  # an idle bucket is full again after 60 s; drop it after 120 s


class Quotas(BaseModel):
    """A tenant's limits. 0 means "none allowed" (e.g. ``gpu_slots=0``: no GPU jobs)."""

    model_config = ConfigDict(extra="forbid")

    max_concurrent_jobs: int = Field(default=2, ge=0, le=10_000, description="jobs running at once")
    cpu_slots: int = Field(default=4, ge=0, le=1_000_000, description="CPUs held by running jobs")
    gpu_slots: int = Field(default=0, ge=0, le=1_000_000, description="GPUs held by running jobs")
    requests_per_min: int = Field(default=600, ge=0, le=100_000_000, description="endpoint requests per minute")
    tokens_per_min: int = Field(default=200_000, ge=0, le=10_000_000_000,
                                description="prompt + completion tokens per minute (reserved up front)")


class QuotaUpdate(BaseModel):
    """A partial change of :class:`Quotas` (fields left out keep their value)."""

    model_config = ConfigDict(extra="forbid")

    max_concurrent_jobs: int | None = Field(default=None, ge=0, le=10_000)
    cpu_slots: int | None = Field(default=None, ge=0, le=1_000_000)
    gpu_slots: int | None = Field(default=None, ge=0, le=1_000_000)
    requests_per_min: int | None = Field(default=None, ge=0, le=100_000_000)
    tokens_per_min: int | None = Field(default=None, ge=0, le=10_000_000_000)


class Denial(str, Enum):
    NONE = ""
    UNKNOWN_TENANT = "unknown_tenant"
    REQUESTS = "requests_per_min"
    TOKENS = "tokens_per_min"
    TOKENS_NEVER = "tokens_per_min_too_small"
    JOBS = "max_concurrent_jobs"
    CPU = "cpu_slots"
    GPU = "gpu_slots"


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    denial: Denial
    retry_after_s: float
    message: str


@dataclass(frozen=True)
class SlotDecision:
    granted: bool
    denial: Denial
    message: str


# KEYS: quota hash, bucket hash.  ARGV: requests, tokens, ttl_ms.
# Returns {code, retry_after_s (string)}: 0 ok, 1 requests, 2 tokens, 3 tokens never fit, -1 no quota.
_RATE_LUA = """
local lim = redis.call('HMGET', KEYS[1], 'requests_per_min', 'tokens_per_min')
local rpm, tpm = tonumber(lim[1]), tonumber(lim[2])
if rpm == nil or tpm == nil then return {-1, '0'} end
local creq, ctok = tonumber(ARGV[1]), tonumber(ARGV[2])
if ctok > tpm then return {3, '0'} end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local b = redis.call('HMGET', KEYS[2], 'req', 'tok', 'ts')
local req, tok, ts = tonumber(b[1]) or rpm, tonumber(b[2]) or tpm, tonumber(b[3]) or now
local dt = math.max(0, now - ts)
req = math.min(rpm, req + dt * rpm / 60)
tok = math.min(tpm, tok + dt * tpm / 60)
if req < creq then
  redis.call('HSET', KEYS[2], 'req', req, 'tok', tok, 'ts', now)
  local wait = 60
  if rpm > 0 then wait = (creq - req) * 60 / rpm end
  return {1, tostring(wait)}
end
if tok < ctok then
  redis.call('HSET', KEYS[2], 'req', req, 'tok', tok, 'ts', now)
  return {2, tostring((ctok - tok) * 60 / tpm)}
end
redis.call('HSET', KEYS[2], 'req', req - creq, 'tok', tok - ctok, 'ts', now)
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return {0, '0'}
"""

# KEYS: quota hash, bucket hash.  ARGV: tokens to give back.
_REFUND_LUA = """
local tpm = tonumber(redis.call('HGET', KEYS[1], 'tokens_per_min'))
local tok = tonumber(redis.call('HGET', KEYS[2], 'tok'))
if tpm == nil or tok == nil then return 0 end
redis.call('HSET', KEYS[2], 'tok', math.min(tpm, tok + tonumber(ARGV[1])))
return 1
"""

# KEYS: quota hash, usage hash, holders hash.  ARGV: job id, cpu, gpu.
# Returns 0 granted, 1 already held, -1 no quota, 2 jobs, 3 cpu, 4 gpu.
_ACQUIRE_LUA = """
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then return 1 end
local lim = redis.call('HMGET', KEYS[1], 'max_concurrent_jobs', 'cpu_slots', 'gpu_slots')
local mj, mc, mg = tonumber(lim[1]), tonumber(lim[2]), tonumber(lim[3])
if mj == nil then return -1 end
local u = redis.call('HMGET', KEYS[2], 'jobs', 'cpu', 'gpu')
local j, c, g = tonumber(u[1]) or 0, tonumber(u[2]) or 0, tonumber(u[3]) or 0
local cpu, gpu = tonumber(ARGV[2]), tonumber(ARGV[3])
if j + 1 > mj then return 2 end
if c + cpu > mc then return 3 end
if g + gpu > mg then return 4 end
redis.call('HSET', KEYS[2], 'jobs', j + 1, 'cpu', c + cpu, 'gpu', g + gpu)
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2] .. ' ' .. ARGV[3])
return 0
"""

# KEYS: usage hash, holders hash.  ARGV: job id.  Returns 1 released, 0 not held.
_RELEASE_LUA = """
local held = redis.call('HGET', KEYS[2], ARGV[1])
if not held then return 0 end
local sp = string.find(held, ' ')
local cpu, gpu = tonumber(string.sub(held, 1, sp - 1)), tonumber(string.sub(held, sp + 1))
redis.call('HINCRBY', KEYS[1], 'jobs', -1)
redis.call('HINCRBYFLOAT', KEYS[1], 'cpu', -cpu)
redis.call('HINCRBYFLOAT', KEYS[1], 'gpu', -gpu)
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""

_SLOT_DENIALS = {-1: Denial.UNKNOWN_TENANT, 2: Denial.JOBS, 3: Denial.CPU, 4: Denial.GPU}


def quota_key(tenant: str) -> str:
    return key("quota", tenant)


class QuotaEnforcer:
    """Atomic quota checks for one Redis (any number of gateways and schedulers may share it)."""

    def __init__(self, client: redis.Redis):
        self.client = client
        self._rate = client.register_script(_RATE_LUA)
        self._refund = client.register_script(_REFUND_LUA)
        self._acquire = client.register_script(_ACQUIRE_LUA)
        self._release = client.register_script(_RELEASE_LUA)

    # ---- limits --------------------------------------------------------------------------------
    def set_quotas(self, tenant: str, quotas: Quotas) -> None:
        self.client.hset(quota_key(tenant), mapping=quotas.model_dump())

    def get_quotas(self, tenant: str) -> Quotas | None:
        raw = self.client.hgetall(quota_key(tenant))
        return Quotas(**{k: int(float(v)) for k, v in raw.items()}) if raw else None

    # ---- endpoint rates ------------------------------------------------------------------------
    def admit_request(self, tenant: str, tokens: int, requests: int = 1) -> RateDecision:
        """Take ``requests`` and ``tokens`` from the tenant's buckets, or neither."""
        if tokens < 0 or requests < 0:
            raise ValueError(f"tokens and requests must be >= 0, got tokens={tokens} requests={requests}")
        code, wait = self._rate(keys=[quota_key(tenant), key("bucket", tenant)],
                                args=[requests, tokens, BUCKET_TTL_MS])
        code, wait_s = int(code), float(wait)
        if code == 0:
            return RateDecision(True, Denial.NONE, 0.0, "")
        if code == -1:
            return RateDecision(False, Denial.UNKNOWN_TENANT, 0.0, f"tenant {tenant!r} has no quotas")
        if code == 1:
            return RateDecision(False, Denial.REQUESTS, wait_s,
                                f"rate limit reached for requests_per_min; retry in {wait_s:.1f}s")
        if code == 2:
            return RateDecision(False, Denial.TOKENS, wait_s,
                                f"rate limit reached for tokens_per_min (this request reserves {tokens} "
                                f"tokens: prompt + max_tokens); retry in {wait_s:.1f}s")
        return RateDecision(False, Denial.TOKENS_NEVER, 0.0,
                            f"this request reserves {tokens} tokens (prompt + max_tokens), more than the "
                            f"tenant's tokens_per_min; lower max_tokens")

    def refund_tokens(self, tenant: str, tokens: int) -> None:
        if tokens > 0:
            self._refund(keys=[quota_key(tenant), key("bucket", tenant)], args=[tokens])

    # ---- job slots -----------------------------------------------------------------------------
    def acquire_slots(self, tenant: str, job_id: str, cpu: int, gpu: int) -> SlotDecision:
        code = int(self._acquire(keys=[quota_key(tenant), key("usage", tenant), key("holders", tenant)],
                                 args=[job_id, cpu, gpu]))
        if code in (0, 1):
            return SlotDecision(True, Denial.NONE, "")
        denial = _SLOT_DENIALS[code]
        usage = self.usage(tenant)
        limits = self.get_quotas(tenant)
        limit = getattr(limits, denial.value, None) if limits else None
        return SlotDecision(False, denial, f"{denial.value} quota reached: job {job_id} needs cpu={cpu} gpu={gpu}; "
                                           f"tenant holds jobs={usage['jobs']} cpu={usage['cpu']} "
                                           f"gpu={usage['gpu']} of {denial.value}={limit}")

    def release_slots(self, tenant: str, job_id: str) -> bool:
        return bool(self._release(keys=[key("usage", tenant), key("holders", tenant)], args=[job_id]))

    def usage(self, tenant: str) -> dict[str, int]:
        raw = self.client.hmget(key("usage", tenant), "jobs", "cpu", "gpu")
        return {name: int(float(v or 0)) for name, v in zip(("jobs", "cpu", "gpu"), raw, strict=True)}

    def holders(self, tenant: str) -> dict[str, str]:
        return self.client.hgetall(key("holders", tenant))
