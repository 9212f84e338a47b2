"""Tenants and their API keys, stored in Redis.

Redis keys (``T`` = tenant name, ``K`` = key id)::

    em:tenants            set   tenant names
    em:tenant:T           hash  name, created_at, disabled ("0"/"1")
    em:tenant:T:keys      set   key ids of T
    em:key:K              hash  tenant ("" for operator keys), role, salt, hash, params,
                                created_at, revoked ("0"/"1")
    em:admin_keys         set   key ids of operator keys

Authentication is one ``HGETALL em:key:K`` (the key id is embedded in the key) plus, for a
tenant key, one ``HGET`` of the tenant's ``disabled`` flag.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from enum import Enum

import redis

from expertmesh.store import key
from expertmesh.tenants.keys import HashParams, InvalidKey, VerifiedCache, check_secret, mint_key, parse_key
from expertmesh.tenants.quotas import QuotaEnforcer, Quotas, QuotaUpdate

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,38}[a-z0-9]$|^[a-z0-9]$")
NAME_RULE = "1-40 characters: lowercase letters, digits and '-', not starting or ending with '-'"


class Role(str, Enum):
    TENANT = "tenant"
    ADMIN = "admin"


class TenantError(ValueError):
    """A tenant operation that cannot be done as asked (unknown name, duplicate, bad name)."""


class TenantNotFound(TenantError):
    pass


class TenantExists(TenantError):
    pass


@dataclass(frozen=True)
class Principal:
    """Who a request authenticated as."""

    role: Role
    tenant: str | None  # None for operators
    key_id: str

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN


@dataclass(frozen=True)
class Tenant:
    name: str
    created_at: float
    disabled: bool
    quotas: Quotas
    key_ids: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "created_at": self.created_at, "disabled": self.disabled,
                "quotas": self.quotas.model_dump(), "key_ids": list(self.key_ids)}


@dataclass(frozen=True)
class IssuedKey:
    """A key as returned once to whoever created it."""

    key_id: str
    key: str
    tenant: str | None
    role: Role

    def to_dict(self) -> dict:
        return {"key_id": self.key_id, "key": self.key, "tenant": self.tenant, "role": self.role.value}


def check_name(name: str, what: str = "tenant") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise TenantError(f"invalid {what} name {name!r}: {NAME_RULE}")
    return name


class TenantRegistry:
    def __init__(self, client: redis.Redis, hash_params: HashParams | None = None,
                 quotas: QuotaEnforcer | None = None):
        self.client = client
        self.hash_params = hash_params or HashParams()
        self.quotas = quotas or QuotaEnforcer(client)
        self._verified = VerifiedCache()

    # ---- tenants --------------------------------------------------------------------------------
    def create_tenant(self, name: str, quotas: Quotas | None = None) -> Tenant:
        check_name(name)
        quotas = quotas or Quotas()
        if not self.client.sadd(key("tenants"), name):
            raise TenantExists(f"tenant {name!r} already exists")
        pipe = self.client.pipeline()
        pipe.hset(key("tenant", name), mapping={"name": name, "created_at": time.time(), "disabled": "0"})
        pipe.hset(key("quota", name), mapping=quotas.model_dump())
        pipe.execute()
        return self.get_tenant(name)

    def get_tenant(self, name: str) -> Tenant:
        pipe = self.client.pipeline()
        pipe.hgetall(key("tenant", name))
        pipe.smembers(key("tenant", name, "keys"))
        record, key_ids = pipe.execute()
        if not record:
            raise TenantNotFound(f"tenant {name!r} does not exist")
        quotas = self.quotas.get_quotas(name) or Quotas()
        return Tenant(name, float(record["created_at"]), record.get("disabled") == "1", quotas,
                      tuple(sorted(key_ids)))

    def exists(self, name: str) -> bool:
        return bool(self.client.sismember(key("tenants"), name))

    def list_tenants(self) -> list[Tenant]:
        return [self.get_tenant(n) for n in sorted(self.client.smembers(key("tenants")))]

    def set_disabled(self, name: str, disabled: bool) -> Tenant:
        if not self.exists(name):
            raise TenantNotFound(f"tenant {name!r} does not exist")
        self.client.hset(key("tenant", name), "disabled", "1" if disabled else "0")
        return self.get_tenant(name)

    def update_quotas(self, name: str, update: QuotaUpdate) -> Tenant:
        if not self.exists(name):
            raise TenantNotFound(f"tenant {name!r} does not exist")
        changes = update.model_dump(exclude_none=True)
        if changes:
            self.client.hset(key("quota", name), mapping=changes)
        return self.get_tenant(name)

    # ---- keys ------------------------------------------------------------------------------------
    def _store_key(self, tenant: str | None, role: Role) -> IssuedKey:
        new = mint_key(self.hash_params)
        pipe = self.client.pipeline()
        pipe.hset(key("key", new.key_id), mapping={
            "tenant": tenant or "", "role": role.value, "salt": new.salt_hex, "hash": new.hash_hex,
            "params": new.params.encode(), "created_at": time.time(), "revoked": "0"})
        if tenant is not None:
            pipe.sadd(key("tenant", tenant, "keys"), new.key_id)
        else:
            pipe.sadd(key("admin_keys"), new.key_id)
        pipe.execute()
        return IssuedKey(new.key_id, new.plaintext, tenant, role)

    def create_key(self, tenant: str) -> IssuedKey:
        if not self.exists(tenant):
            raise TenantNotFound(f"tenant {tenant!r} does not exist")
        return self._store_key(tenant, Role.TENANT)

    def create_admin_key(self) -> IssuedKey:
        return self._store_key(None, Role.ADMIN)

    def has_admin_key(self) -> bool:
        return bool(self.client.scard(key("admin_keys")))

    def revoke_key(self, key_id: str) -> None:
        if not self.client.exists(key("key", key_id)):
            raise TenantError(f"API key {key_id!r} does not exist")
        self.client.hset(key("key", key_id), "revoked", "1")

    def key_info(self, key_id: str) -> dict:
        record = self.client.hgetall(key("key", key_id))
        if not record:
            raise TenantError(f"API key {key_id!r} does not exist")
        return {"key_id": key_id, "tenant": record["tenant"] or None, "role": record["role"],
                "created_at": float(record["created_at"]), "revoked": record["revoked"] == "1"}

    # ---- authentication ----------------------------------------------------------------------------
    def authenticate(self, presented: str) -> Principal:
        """The principal of a key; :class:`InvalidKey` (answer 401) for anything wrong with it."""
        key_id, secret = parse_key(presented)
        record = self.client.hgetall(key("key", key_id))
        if not record or record.get("revoked") == "1":
            raise InvalidKey("unknown or revoked API key")
        if not self._verified.matches(presented, record["hash"]):
            if not check_secret(secret, record["salt"], record["hash"], HashParams.decode(record["params"])):
                raise InvalidKey("wrong API key")
            self._verified.remember(presented, record["hash"])
        role = Role(record["role"])
        if role is Role.ADMIN:
            return Principal(role, None, key_id)
        tenant = record["tenant"]
        if self.client.hget(key("tenant", tenant), "disabled") != "0":
            raise InvalidKey(f"tenant {tenant!r} is disabled")
        return Principal(role, tenant, key_id)
