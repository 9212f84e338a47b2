"""State store, tenants, API keys and quotas against a real embedded Valkey (no Ray)."""

from __future__ import annotations

import threading
import time

import pytest

from expertmesh.store import EmbeddedValkey, StoreError, ValkeyConfig, connect, key, open_store
from expertmesh.tenants import (
    Denial,
    HashParams,
    InvalidKey,
    QuotaEnforcer,
    Quotas,
    QuotaUpdate,
    Role,
    TenantError,
    TenantExists,
    TenantNotFound,
    TenantRegistry,
)

FAST_HASH = HashParams(n=2**8)


@pytest.fixture
def registry(client):
    return TenantRegistry(client, FAST_HASH)


# ---- store -------------------------------------------------------------------------------------------
def test_key_namespacing():
    assert key("tenant", "acme") == "em:tenant:acme"
    with pytest.raises(ValueError, match="':'"):
        key("a:b")
    with pytest.raises(ValueError):
        key()


def test_embedded_valkey_persists_across_crash_with_appendfsync_always(tmp_path):
    store = open_store(None, tmp_path / "v", appendfsync="always")
    assert store.server is not None and store.url.startswith("redis://127.0.0.1:")
    store.client.set(key("x"), "1")
    store.client.xadd(key("stream"), {"a": "b"})
    store.server.kill()  # SIGKILL: only what was fsynced survives
    restarted = EmbeddedValkey(ValkeyConfig(tmp_path / "v")).start()
    c = connect(restarted.url)
    assert c.get(key("x")) == "1"
    assert c.xlen(key("stream")) == 1
    assert c.config_get("appendonly")["appendonly"] == "yes"
    c.close()
    restarted.stop()
    assert restarted.pid is None


def test_external_url_is_used_as_is(valkey):
    store = open_store(valkey.url)
    assert store.server is None and store.client.ping()
    store.close()  # does not stop someone else's server
    assert connect(valkey.url).ping()


def test_unreachable_store_is_one_clear_error():
    with pytest.raises(StoreError, match="cannot reach the state store"):
        connect("redis://127.0.0.1:1/0")


def test_config_validation():
    with pytest.raises(ValueError, match="appendfsync"):
        ValkeyConfig(data_dir=".", appendfsync="sometimes")  # type: ignore[arg-type]


# ---- tenants and keys ----------------------------------------------------------------------------------
def test_create_list_disable_tenants(registry):
    registry.create_tenant("acme", Quotas(requests_per_min=10))
    registry.create_tenant("beta")
    assert [t.name for t in registry.list_tenants()] == ["acme", "beta"]
    assert registry.get_tenant("acme").quotas.requests_per_min == 10
    with pytest.raises(TenantExists):
        registry.create_tenant("acme")
    with pytest.raises(TenantError, match="invalid tenant name"):
        registry.create_tenant("Bad Name")
    with pytest.raises(TenantNotFound):
        registry.get_tenant("nope")
    assert registry.set_disabled("beta", True).disabled
    updated = registry.update_quotas("acme", QuotaUpdate(tokens_per_min=5))
    assert updated.quotas.tokens_per_min == 5 and updated.quotas.requests_per_min == 10


def test_keys_are_hashed_and_verified_by_id(registry, client):
    registry.create_tenant("acme")
    issued = registry.create_key("acme")
    assert issued.key.startswith(f"em_{issued.key_id}_")
    stored = client.hgetall(key("key", issued.key_id))
    assert issued.key.split("_", 2)[2] not in str(stored)  # only salt + hash are stored
    assert stored["params"] == FAST_HASH.encode() and len(stored["salt"]) == 32
    principal = registry.authenticate(issued.key)
    assert principal.tenant == "acme" and principal.role is Role.TENANT
    assert registry.authenticate(issued.key) == principal  # cached path
    second = registry.create_key("acme")
    assert second.key != issued.key and registry.get_tenant("acme").key_ids == tuple(
        sorted([issued.key_id, second.key_id]))


@pytest.mark.parametrize("bad", ["", "Bearer x", "em_zzzzzzzzzzzz_abcdefghijklmnopqrstuvwxyz", "em_123_abc"])
def test_malformed_keys_rejected(registry, bad):
    with pytest.raises(InvalidKey):
        registry.authenticate(bad)


def test_wrong_secret_revoked_and_disabled_rejected(registry):
    registry.create_tenant("acme")
    issued = registry.create_key("acme")
    forged = issued.key[:-4] + ("AAAA" if not issued.key.endswith("AAAA") else "BBBB")
    with pytest.raises(InvalidKey, match="wrong"):
        registry.authenticate(forged)
    registry.authenticate(issued.key)
    registry.set_disabled("acme", True)
    with pytest.raises(InvalidKey, match="disabled"):
        registry.authenticate(issued.key)
    registry.set_disabled("acme", False)
    registry.revoke_key(issued.key_id)
    with pytest.raises(InvalidKey, match="revoked"):
        registry.authenticate(issued.key)  # even though this process verified it before


def test_admin_key(registry):
    assert not registry.has_admin_key()
    admin = registry.create_admin_key()
    assert registry.has_admin_key()
    principal = registry.authenticate(admin.key)
    assert principal.is_admin and principal.tenant is None


# ---- quotas ----------------------------------------------------------------------------------------------
def test_rate_limit_denies_and_refills(registry, client):
    registry.create_tenant("acme", Quotas(requests_per_min=3, tokens_per_min=600))
    q = QuotaEnforcer(client)
    assert all(q.admit_request("acme", tokens=10).allowed for _ in range(3))
    denied = q.admit_request("acme", tokens=10)
    assert not denied.allowed and denied.denial is Denial.REQUESTS and 0 < denied.retry_after_s <= 20
    assert q.admit_request("acme", tokens=601).denial is Denial.TOKENS_NEVER
    assert q.admit_request("ghost", tokens=1).denial is Denial.UNKNOWN_TENANT


def test_token_bucket_all_or_nothing_and_refund(registry, client):
    registry.create_tenant("acme", Quotas(requests_per_min=1000, tokens_per_min=100))
    q = QuotaEnforcer(client)
    assert q.admit_request("acme", tokens=80).allowed
    denied = q.admit_request("acme", tokens=80)
    assert denied.denial is Denial.TOKENS
    req_left = float(client.hget(key("bucket", "acme"), "req"))
    assert req_left > 998  # the denied request took no request allowance either
    q.refund_tokens("acme", 70)
    assert q.admit_request("acme", tokens=80).allowed


def test_rate_limit_holds_under_concurrent_hammering(registry, valkey):
    """8 threads × 40 attempts, each on its own connection: admitted never exceeds the limit
    plus what refilled during the run."""
    limit = 50
    registry.create_tenant("acme", Quotas(requests_per_min=limit, tokens_per_min=10_000_000))
    admitted = []
    barrier = threading.Barrier(8)

    def worker():
        q = QuotaEnforcer(connect(valkey.url))
        barrier.wait()
        admitted.append(sum(q.admit_request("acme", tokens=1).allowed for _ in range(40)))

    start = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refill = (time.monotonic() - start) * limit / 60
    assert limit <= sum(admitted) <= limit + int(refill) + 1


def test_job_slots_atomic_under_concurrency(registry, valkey, client):
    registry.create_tenant("acme", Quotas(max_concurrent_jobs=5, cpu_slots=8, gpu_slots=0))
    granted: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def worker(w):
        q = QuotaEnforcer(connect(valkey.url))
        barrier.wait()
        for i in range(10):
            job = f"job-{w}-{i}"
            if q.acquire_slots("acme", job, cpu=1, gpu=0).granted:
                with lock:
                    granted.append(job)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    q = QuotaEnforcer(client)
    assert len(granted) == 5
    assert q.usage("acme") == {"jobs": 5, "cpu": 5, "gpu": 0}
    # idempotent: acquiring again for a holder is granted without counting twice
    assert q.acquire_slots("acme", granted[0], cpu=1, gpu=0).granted
    assert q.usage("acme")["jobs"] == 5
    for job in granted:
        assert q.release_slots("acme", job)
        assert not q.release_slots("acme", job)  # double release gives nothing back
    assert q.usage("acme") == {"jobs": 0, "cpu": 0, "gpu": 0}


def test_slot_denials_name_the_quota(registry, client):
    registry.create_tenant("acme", Quotas(max_concurrent_jobs=3, cpu_slots=4, gpu_slots=0))
    q = QuotaEnforcer(client)
    assert q.acquire_slots("acme", "a", cpu=3, gpu=0).granted
    cpu = q.acquire_slots("acme", "b", cpu=2, gpu=0)
    assert cpu.denial is Denial.CPU and "cpu_slots=4" in cpu.message
    assert q.acquire_slots("acme", "c", cpu=0, gpu=1).denial is Denial.GPU
    assert q.acquire_slots("ghost", "d", cpu=0, gpu=0).denial is Denial.UNKNOWN_TENANT
