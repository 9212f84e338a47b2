"""``/admin``: the operator's API (tenants, keys, quotas, endpoints); operator key only.

    POST   /admin/tenants                     {"name", "quotas"?}        → 201 tenant
    GET    /admin/tenants                                                → tenants
    GET    /admin/tenants/{name}
    POST   /admin/tenants/{name}/disable | /enable
    PATCH  /admin/tenants/{name}/quotas       {field: value, ...}
    POST   /admin/tenants/{name}/keys                                    → 201 {"key", "key_id"} (shown once)
    DELETE /admin/keys/{key_id}                                          → revoked
    POST   /admin/endpoints                   EndpointSpec (+ "replace")  → 201 endpoint (deploying)
    GET    /admin/endpoints[?tenant=T]                                   → endpoints with live status
    GET    /admin/endpoints/{tenant}/{name}
    DELETE /admin/endpoints/{tenant}/{name}
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict

from expertmesh.serve.endpoints import EndpointError, EndpointNotFound, EndpointSpec, resolve_model
from expertmesh.serve.openai_api import APIError, bad_request, not_found
from expertmesh.serve.services import GatewayServices
from expertmesh.tenants.quotas import Quotas, QuotaUpdate
from expertmesh.tenants.registry import Principal, TenantError, TenantExists, TenantNotFound


class TenantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    quotas: Quotas | None = None


class EndpointCreate(EndpointSpec):
    replace: bool = False


def _tenant_error(exc: TenantError) -> APIError:
    if isinstance(exc, TenantNotFound):
        return not_found(str(exc), "name", "tenant_not_found")
    if isinstance(exc, TenantExists):
        return APIError(409, str(exc), "invalid_request_error", "name", "tenant_exists")
    return bad_request(str(exc), "name")


def admin_router(services: GatewayServices, auth) -> APIRouter:
    async def admin(who: Principal = Depends(auth)) -> Principal:
        if not who.is_admin:
            raise APIError(403, "this route needs the operator key", "permission_error", None, "admin_required")
        return who

    router = APIRouter(prefix="/admin", dependencies=[Depends(admin)])
    tenants = services.tenants

    async def tenant_call(fn, *args):
        try:
            return await services.call(fn, *args)
        except TenantError as exc:
            raise _tenant_error(exc) from None

    @router.post("/tenants", status_code=201)
    async def create_tenant(body: TenantCreate) -> dict[str, Any]:
        return (await tenant_call(tenants.create_tenant, body.name, body.quotas)).to_dict()

    @router.get("/tenants")
    async def list_tenants() -> dict[str, Any]:
        return {"object": "list", "data": [t.to_dict() for t in await tenant_call(tenants.list_tenants)]}

    @router.get("/tenants/{name}")
    async def get_tenant(name: str) -> dict[str, Any]:
        tenant = (await tenant_call(tenants.get_tenant, name)).to_dict()
        tenant["usage"] = await services.call(services.quotas.usage, name)
        return tenant

    @router.post("/tenants/{name}/disable")
    async def disable(name: str) -> dict[str, Any]:
        return (await tenant_call(tenants.set_disabled, name, True)).to_dict()

    @router.post("/tenants/{name}/enable")
    async def enable(name: str) -> dict[str, Any]:
        return (await tenant_call(tenants.set_disabled, name, False)).to_dict()

    @router.patch("/tenants/{name}/quotas")
    async def update_quotas(name: str, body: QuotaUpdate) -> dict[str, Any]:
        return (await tenant_call(tenants.update_quotas, name, body)).to_dict()

    @router.post("/tenants/{name}/keys", status_code=201)
    async def create_key(name: str) -> dict[str, Any]:
        return (await tenant_call(tenants.create_key, name)).to_dict()

    @router.delete("/keys/{key_id}")
    async def revoke_key(key_id: str) -> dict[str, Any]:
        try:
            await services.call(tenants.revoke_key, key_id)
        except TenantError as exc:
            raise not_found(str(exc), "key_id", "key_not_found") from None
        return await services.call(tenants.key_info, key_id)

    # ---- endpoints -------------------------------------------------------------------------------
    @router.post("/endpoints", status_code=201)
    async def deploy(body: EndpointCreate) -> dict[str, Any]:
        spec = EndpointSpec(**body.model_dump(exclude={"replace"}))
        if not await services.call(tenants.exists, spec.tenant):
            raise not_found(f"tenant {spec.tenant!r} does not exist", "tenant", "tenant_not_found")
        try:
            model = await services.call(resolve_model, spec.model, services.jobs.jobs, services.home, spec.tenant)
            record = await services.call(services.endpoints.create, spec, model, body.replace)
        except EndpointError as exc:
            if "already exists" in str(exc):
                raise APIError(409, f"{exc} (pass replace=true to redeploy it)", "invalid_request_error", "name",
                               "endpoint_exists") from None
            raise bad_request(str(exc), "model", "invalid_model") from None
        await services.call(services.backend.deploy, record)
        return await services.call(services.endpoint_view, record)

    @router.get("/endpoints")
    async def list_endpoints(tenant: str | None = Query(default=None, max_length=64)) -> dict[str, Any]:
        records = await services.call(services.endpoints.list, tenant)
        return {"object": "list", "data": [await services.call(services.endpoint_view, r) for r in records]}

    async def require(tenant: str, name: str):
        try:
            return await services.call(services.endpoints.require, tenant, name)
        except EndpointNotFound as exc:
            raise not_found(str(exc), "name", "endpoint_not_found") from None

    @router.get("/endpoints/{tenant}/{name}")
    async def show_endpoint(tenant: str, name: str) -> dict[str, Any]:
        return await services.call(services.endpoint_view, await require(tenant, name))

    @router.delete("/endpoints/{tenant}/{name}")
    async def delete_endpoint(tenant: str, name: str) -> dict[str, Any]:
        record = await require(tenant, name)
        await services.call(services.backend.delete, record)
        await services.call(services.endpoints.delete, tenant, name)
        return {**record.to_dict(), "deleted": True}

    return router
