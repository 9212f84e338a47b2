"""Tenants, API keys and quotas over Redis (see ``registry``, ``keys`` and ``quotas``).

    registry = TenantRegistry(store.client)
    registry.create_tenant("acme", Quotas(requests_per_min=60))
    issued = registry.create_key("acme")          # issued.key is shown once
    principal = registry.authenticate(issued.key) # Principal(role=TENANT, tenant="acme", ...)
"""

from expertmesh.tenants.keys import HashParams, InvalidKey
from expertmesh.tenants.quotas import Denial, QuotaEnforcer, Quotas, QuotaUpdate, RateDecision, SlotDecision
from expertmesh.tenants.registry import (
    IssuedKey,
    Principal,
    Role,
    Tenant,
    TenantError,
    TenantExists,
    TenantNotFound,
    TenantRegistry,
    check_name,
)

__all__ = [
    "Denial", "HashParams", "InvalidKey", "IssuedKey", "Principal", "QuotaEnforcer", "QuotaUpdate", "Quotas",
    "RateDecision", "Role", "SlotDecision", "Tenant", "TenantError", "TenantExists", "TenantNotFound",
    "TenantRegistry", "check_name",
]
