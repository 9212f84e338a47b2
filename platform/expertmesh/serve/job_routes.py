"""``/v1/jobs``: training jobs over HTTP. A tenant key acts on its own jobs; an operator key
sees every job and submits on behalf of a tenant (``"tenant"`` in the body)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from expertmesh.jobs.model import JobRecord, JobState
from expertmesh.jobs.service import JobError, JobNotFound
from expertmesh.serve.openai_api import APIError, bad_request, not_found
from expertmesh.serve.services import GatewayServices
from expertmesh.tenants.registry import Principal

FOLLOW_MAX_S = 24 * 3600.0


class JobSubmit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    spec: dict[str, Any] = Field(description="a training spec (the `expertmesh train` format; `preset` allowed)")
    tenant: str | None = Field(default=None, description="operator keys only: the tenant to submit for")


def job_router(services: GatewayServices, auth) -> APIRouter:
    router = APIRouter(prefix="/v1/jobs")

    def scope(who: Principal) -> str | None:
        return None if who.is_admin else who.tenant

    async def get_job(job_id: str, who: Principal):
        try:
            return await services.call(services.jobs.get, job_id, scope(who))
        except JobNotFound as exc:
            raise not_found(str(exc), "job_id", "job_not_found") from None

    @router.post("", status_code=201)
    async def submit(body: JobSubmit, who: Principal = Depends(auth)) -> dict[str, Any]:
        if who.is_admin:
            if not body.tenant:
                raise bad_request("operator keys must say which tenant the job is for (\"tenant\")", "tenant")
            tenant = body.tenant
            if not await services.call(services.tenants.exists, tenant):
                raise not_found(f"tenant {tenant!r} does not exist", "tenant", "tenant_not_found")
        else:
            if body.tenant not in (None, who.tenant):
                raise APIError(403, "a tenant key can only submit jobs for its own tenant", "permission_error",
                               "tenant")
            tenant = who.tenant
        try:
            job = await services.call(services.jobs.submit, tenant, body.spec)
        except JobError as exc:
            raise bad_request(str(exc), "spec", "invalid_spec") from None
        return job.to_dict()

    @router.get("")
    async def list_jobs(who: Principal = Depends(auth), limit: int = Query(default=100, ge=1, le=1000),
                        tenant: str | None = Query(default=None, max_length=64)) -> dict[str, Any]:
        if not who.is_admin and tenant not in (None, who.tenant):
            return {"object": "list", "data": []}
        jobs = await services.call(services.jobs.list, tenant if who.is_admin else who.tenant, limit)
        return {"object": "list", "data": [j.to_dict() for j in jobs]}

    @router.get("/{job_id}")
    async def show(job_id: str, who: Principal = Depends(auth)) -> dict[str, Any]:
        return (await get_job(job_id, who)).to_dict()

    @router.post("/{job_id}/cancel")
    async def cancel(job_id: str, who: Principal = Depends(auth)) -> dict[str, Any]:
        await get_job(job_id, who)
        return (await services.call(services.jobs.cancel, job_id, scope(who))).to_dict()

    @router.get("/{job_id}/logs")
    async def logs(job_id: str, who: Principal = Depends(auth), follow: bool = False,
                   tail: int | None = Query(default=None, ge=1, le=100_000)):
        job = await get_job(job_id, who)
        if not follow:
            return PlainTextResponse(await services.call(services.jobs.logs, job_id, scope(who), tail))
        if job.state.terminal:  # following a job that has already ended: its logs, then how it ended
            text = await services.call(services.jobs.logs, job_id, scope(who), tail)
            return PlainTextResponse(text + _end_line(job))

        async def stream() -> AsyncIterator[str]:
            sent = 0
            loop = asyncio.get_running_loop()
            deadline = loop.time() + FOLLOW_MAX_S
            while loop.time() < deadline:
                current = await services.call(services.jobs.get, job_id)
                text = await services.call(services.jobs.logs, job_id)
                if len(text) > sent:
                    yield text[sent:]
                    sent = len(text)
                if current.state.terminal:
                    yield _end_line(current)
                    return
                await asyncio.sleep(services.config.log_poll_interval_s)

        return StreamingResponse(stream(), media_type="text/plain; charset=utf-8")

    return router


def _end_line(job: JobRecord) -> str:
    """The line a followed log ends with: ``[job ID STATE]``, with the error when it did not succeed."""
    if job.state is not JobState.SUCCEEDED and job.error:
        return f"\n[job {job.job_id} {job.state.value}: {job.error}]\n"
    return f"\n[job {job.job_id} {job.state.value}]\n"
