"""The gateway: one FastAPI app on one port for everything a tenant or operator does.

    GET  /healthz  /metrics
    GET  /v1/models                         the caller's endpoints (OpenAI "models")
    POST /v1/completions                    OpenAI completions (stream=true → SSE)
    POST /v1/chat/completions               OpenAI chat completions (stream=true → SSE)
    POST /v1/jobs  GET /v1/jobs[/{id}]      training jobs: submit, list, show
    GET  /v1/jobs/{id}/logs[?follow=true]   logs (follow streams text until the job ends)
    POST /v1/jobs/{id}/cancel
    ...  /admin/...                         tenants, keys, quotas, endpoints (operator key)
    GET  /dashboard[/api/...]               the web dashboard and its JSON API (expertmesh.dashboard)

Every request is authenticated with ``Authorization: Bearer <key>``; a tenant only ever
sees its own endpoints and jobs (anything else is a 404, as if it did not exist). Input
is validated by pydantic before any model work; every error is OpenAI-shaped,
``{"error": {"message", "type", "param", "code"}}``: 400 invalid input, 401 bad key,
403 not allowed, 404 unknown, 409 conflict, 429 quota (with Retry-After), 503 endpoint
overloaded or not ready. An unexpected failure is a 500 with an error id, never a stack
trace.

Request path of a completion: authenticate → find the tenant's endpoint → tokenize and
check the prompt → reserve ``prompt + max_tokens`` tokens and 1 request from the
tenant's quota (atomic, in Redis) → call the endpoint (Ray Serve handle; its bounded
queue answers "overloaded" at once when full) → answer with usage → give back the
unused reservation.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.exceptions import HTTPException as StarletteHTTPException

from expertmesh.serve.backend import EndpointOverloaded, EndpointUnavailable
from expertmesh.serve.endpoints import EndpointRecord
from expertmesh.serve.openai_api import (
    CHAT_TURN_STOP,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    bad_request,
    chat_body,
    chat_chunk,
    completion_body,
    completion_chunk,
    format_validation_errors,
    model_not_found,
    new_id,
    overloaded,
    rate_limited,
    render_chat,
    unauthorized,
    usage_chunk,
)
from expertmesh.serve.services import GatewayServices
from expertmesh.telemetry import extract_context, inject_context
from expertmesh.tenants.keys import InvalidKey
from expertmesh.tenants.registry import Principal

log = logging.getLogger(__name__)


# ---- telemetry: one span per request, request counter by route and status ---------------------------
class TelemetryMiddleware:
    """Pure ASGI middleware (does not buffer streaming bodies)."""

    def __init__(self, app, services: GatewayServices):
        self.app = app
        self.services = services

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        telemetry = self.services.telemetry
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
        labels: dict[str, str] = {}
        scope["expertmesh.labels"] = labels
        status = {"code": 500}

        async def send_with_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        start = time.perf_counter()
        with telemetry.tracer.start_as_current_span(f"{scope['method']} {scope['path']}", kind=SpanKind.SERVER,
                                                    context=extract_context(headers)) as span:
            try:
                await self.app(scope, receive, send_with_status)
            finally:
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                span.update_name(f"{scope['method']} {route}")
                span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", status["code"])
                for name, value in labels.items():
                    span.set_attribute(f"expertmesh.{name}", value)
                if status["code"] >= 500:
                    span.set_status(Status(StatusCode.ERROR))
                attrs = {"route": route, "status": str(status["code"]), **labels}
                attrs.pop("request_id", None)
                telemetry.metrics.requests.add(1, attrs)
                telemetry.metrics.request_duration.record(time.perf_counter() - start,
                                                          {"route": route, **({"endpoint": labels["endpoint"]}
                                                                              if "endpoint" in labels else {})})


def _labels(request: Request) -> dict[str, str]:
    return request.scope.setdefault("expertmesh.labels", {})


# ---- auth --------------------------------------------------------------------------------------------
def make_auth(services: GatewayServices):
    async def principal(request: Request) -> Principal:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthorized("You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.")
        try:
            who = await services.call(services.tenants.authenticate, token.strip())
        except InvalidKey:
            raise unauthorized() from None
        if who.tenant:
            _labels(request)["tenant"] = who.tenant
        return who

    return principal


def tenant_only(who: Principal) -> str:
    if who.is_admin or who.tenant is None:
        raise APIError(403, "operator keys manage the platform; call models with a tenant's key",
                       "permission_error", None, "tenant_key_required")
    return who.tenant


# ---- the app ------------------------------------------------------------------------------------------
def create_app(services: GatewayServices) -> FastAPI:
    app = FastAPI(title="ExpertMesh gateway", version="1", docs_url="/docs", redoc_url=None)
    auth = make_auth(services)
    install_error_handlers(app)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        await services.call(services.client.ping)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        body = await services.call(services.telemetry.prometheus_text)
        return PlainTextResponse(body, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models(who: Principal = Depends(auth)) -> dict[str, Any]:
        records = await services.call(services.endpoints.list, who.tenant)
        return {"object": "list", "data": [_model_entry(r) for r in records]}

    @app.get("/v1/models/{model}")
    async def get_model(model: str, who: Principal = Depends(auth)) -> dict[str, Any]:
        record = await services.call(services.endpoints.get, tenant_only(who), model)
        if record is None:
            raise model_not_found(model)
        return _model_entry(record)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, who: Principal = Depends(auth)):
        tenant = tenant_only(who)
        record = await _endpoint(services, request, tenant, body.model)
        prompt_ids = await _encode(services, record, body.prompt, "prompt")
        return await _generate(services, request, tenant, record, body, prompt_ids, body.max_tokens or 16,
                               chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request, who: Principal = Depends(auth)):
        tenant = tenant_only(who)
        record = await _endpoint(services, request, tenant, body.model)
        if not record.model.has_tokenizer:
            raise bad_request(f"endpoint {record.spec.name!r} serves a model without a tokenizer; chat needs text "
                              f"(use /v1/completions with token ids)", "messages", "no_tokenizer")
        prompt_ids = await _encode(services, record, render_chat(body.messages), "messages")
        return await _generate(services, request, tenant, record, body, prompt_ids, body.requested_max_tokens,
                               chat=True)

    from expertmesh.serve.admin import admin_router
    from expertmesh.serve.job_routes import job_router

    app.include_router(job_router(services, auth))
    app.include_router(admin_router(services, auth))
    from expertmesh.dashboard import mount_dashboard

    mount_dashboard(app, services, auth)  # /dashboard: web UI + its JSON API (same keys)
    app.add_middleware(TelemetryMiddleware, services=services)
    return app


def _model_entry(record: EndpointRecord) -> dict[str, Any]:
    return {"id": record.spec.name, "object": "model", "created": int(record.created_at),
            "owned_by": record.spec.tenant}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = format_validation_errors(list(exc.errors()))
        return JSONResponse(bad_request(message, param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = "Unknown route" if exc.status_code == 404 else str(exc.detail)
        err = APIError(exc.status_code, message, "invalid_request_error", None, code)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        error_id = uuid.uuid4().hex[:12]
        log.exception("unhandled error %s", error_id)
        err = APIError(500, f"internal error (id {error_id}); the operator's logs have the details", "server_error")
        return JSONResponse(err.body(), status_code=500)


# ---- completions ----------------------------------------------------------------------------------------
async def _endpoint(services: GatewayServices, request: Request, tenant: str, model: str) -> EndpointRecord:
    record = await services.call(services.endpoints.get, tenant, model)
    if record is None:
        raise model_not_found(model)
    _labels(request)["endpoint"] = f"{tenant}/{model}"
    return record


async def _encode(services: GatewayServices, record: EndpointRecord, prompt: str | list[int], param: str) -> list[int]:
    info = record.model
    if isinstance(prompt, str):
        if len(prompt) > services.config.max_prompt_chars:
            raise bad_request(f"{param} has {len(prompt)} characters; the limit is {services.config.max_prompt_chars}",
                              param)
        tokenizer = await services.call(services.tokenizer, info)
        if tokenizer is None:
            raise bad_request(f"endpoint {record.spec.name!r} serves a model without a tokenizer: send the prompt as "
                              f"a list of token ids", param, "no_tokenizer")
        ids = tokenizer.encode(prompt).ids
    else:
        ids = list(prompt)
        bad = [t for t in ids if t >= info.vocab_size]
        if bad:
            raise bad_request(f"token id {bad[0]} is outside the vocabulary [0, {info.vocab_size})", param)
    if not ids:
        raise bad_request(f"{param} is empty after tokenization", param)
    if len(ids) >= info.max_model_len:
        raise bad_request(f"{param} has {len(ids)} tokens; this model's context is {info.max_model_len} tokens, "
                          f"which leaves no room to generate", param, "context_length_exceeded")
    return ids


async def _generate(services: GatewayServices, request: Request, tenant: str, record: EndpointRecord, body: Any,
                    prompt_ids: list[int], max_tokens: int, chat: bool):
    from expertmesh.engine import SamplingParams

    max_tokens = min(max_tokens, record.model.max_model_len - len(prompt_ids))
    params = body.sampling(max_tokens, (CHAT_TURN_STOP,) if chat else ())
    try:
        SamplingParams(**params)
    except ValueError as exc:
        raise bad_request(str(exc)) from None
    reserved = len(prompt_ids) + max_tokens
    decision = await services.call(services.quotas.admit_request, tenant, reserved)
    metrics = services.telemetry.metrics
    endpoint = f"{tenant}/{record.spec.name}"
    if not decision.allowed:
        metrics.rejections.add(1, {"tenant": tenant, "reason": decision.denial.value})
        raise rate_limited(decision.message, decision.retry_after_s, decision.denial.value)
    payload = {"prompt": prompt_ids, "params": params, "trace": inject_context()}
    rid = new_id("chatcmpl" if chat else "cmpl")
    _labels(request)["request_id"] = rid
    metrics.ongoing.add(1, {"endpoint": endpoint})
    if not body.stream:
        try:
            result = await services.backend.complete(record, payload)
        except BaseException as exc:
            metrics.ongoing.add(-1, {"endpoint": endpoint})
            await services.call(services.quotas.refund_tokens, tenant, reserved)
            raise _backend_error(exc, tenant, services) from None
        metrics.ongoing.add(-1, {"endpoint": endpoint})
        used = 0 if "error" in result else len(prompt_ids) + len(result["token_ids"])
        await services.call(services.quotas.refund_tokens, tenant, reserved - used)
        if "error" in result:
            raise bad_request(result["error"], "messages" if chat else "prompt")
        _count_tokens(services, endpoint, tenant, len(prompt_ids), len(result["token_ids"]))
        if chat:
            return chat_body(rid, record.spec.name, result["text"], result["finish_reason"], len(prompt_ids),
                             len(result["token_ids"]))
        return completion_body(rid, record.spec.name, result["text"], result["token_ids"], result["finish_reason"],
                               len(prompt_ids))
    return await _stream(services, tenant, record, body, payload, rid, prompt_ids, reserved, chat)


def _backend_error(exc: BaseException, tenant: str, services: GatewayServices) -> BaseException:
    if isinstance(exc, EndpointOverloaded):
        services.telemetry.metrics.rejections.add(1, {"tenant": tenant, "reason": "overloaded"})
        return overloaded(str(exc))
    if isinstance(exc, EndpointUnavailable):
        return APIError(503, str(exc), "server_error", None, "endpoint_unavailable", {"Retry-After": "5"})
    return exc


def _count_tokens(services: GatewayServices, endpoint: str, tenant: str, prompt: int, completion: int) -> None:
    tokens = services.telemetry.metrics.tokens
    tokens.add(prompt, {"endpoint": endpoint, "tenant": tenant, "kind": "prompt"})
    tokens.add(completion, {"endpoint": endpoint, "tenant": tenant, "kind": "completion"})


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _stream(services: GatewayServices, tenant: str, record: EndpointRecord, body: Any, payload: dict[str, Any],
                  rid: str, prompt_ids: list[int], reserved: int, chat: bool):
    metrics = services.telemetry.metrics
    endpoint = f"{tenant}/{record.spec.name}"
    start = time.perf_counter()
    events = services.backend.stream(record, payload)
    try:
        first = await anext(events)
    except BaseException as exc:
        metrics.ongoing.add(-1, {"endpoint": endpoint})
        await services.call(services.quotas.refund_tokens, tenant, reserved)
        if isinstance(exc, StopAsyncIteration):
            raise APIError(500, "the endpoint returned no output", "server_error") from None
        raise _backend_error(exc, tenant, services) from None
    if "error" in first:
        await events.aclose()
        metrics.ongoing.add(-1, {"endpoint": endpoint})
        await services.call(services.quotas.refund_tokens, tenant, reserved)
        raise bad_request(first["error"], "messages" if chat else "prompt")
    metrics.ttft.record(time.perf_counter() - start, {"endpoint": endpoint})
    name, obj = record.spec.name, "chat.completion.chunk" if chat else "text_completion"

    async def chunks() -> AsyncIterator[str]:
        generated = 0
        last = time.perf_counter()
        try:
            if chat:
                yield _sse(chat_chunk(rid, name, {"role": "assistant", "content": ""}, None))
            event: dict[str, Any] | None = first
            while event is not None:
                if "error" in event:
                    yield _sse(bad_request(event["error"]).body())
                    break
                generated += len(event["token_ids"])
                if chat:
                    delta = {"content": event["text"]} if event["text"] or not event["finish_reason"] else {}
                    yield _sse(chat_chunk(rid, name, delta, event["finish_reason"]))
                else:
                    yield _sse(completion_chunk(rid, name, event["text"], event["token_ids"], event["finish_reason"]))
                event = await anext(events, None)
                now = time.perf_counter()
                if event is not None:
                    metrics.inter_token.record(now - last, {"endpoint": endpoint})
                last = now
            if body.include_usage:
                yield _sse(usage_chunk(rid, name, obj, len(prompt_ids), generated))
            yield _sse("[DONE]")
        except (EndpointOverloaded, EndpointUnavailable) as exc:
            err = _backend_error(exc, tenant, services)
            yield _sse(err.body() if isinstance(err, APIError) else {"error": {"message": str(err)}})
            yield _sse("[DONE]")
        finally:
            await events.aclose()
            metrics.ongoing.add(-1, {"endpoint": endpoint})
            _count_tokens(services, endpoint, tenant, len(prompt_ids), generated)
            services.quotas.refund_tokens(tenant, reserved - len(prompt_ids) - generated)

    return StreamingResponse(chunks(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Request-Id": rid})
