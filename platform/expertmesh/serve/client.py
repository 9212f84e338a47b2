"""A small HTTP client for the gateway's admin and job routes (what the CLI uses).

    client = PlatformClient("http://127.0.0.1:8000", api_key)
    client.create_tenant("acme")
    key = client.create_key("acme")["key"]

Errors come back as :class:`PlatformAPIError` carrying the HTTP status and the gateway's
OpenAI-shaped message.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx


class PlatformAPIError(RuntimeError):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(f"{message} (HTTP {status})")
        self.status, self.message, self.code = status, message, code


class PlatformClient:
    def __init__(self, url: str, api_key: str | None, timeout_s: float = 60.0):
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.ConnectError:
            raise PlatformAPIError(0, f"cannot reach the gateway at {self.url}: is the platform up? "
                                      f"(`expertmesh up`, or set --url / EXPERTMESH_URL)") from None
        except httpx.HTTPError as exc:
            raise PlatformAPIError(0, f"request to {self.url}{path} failed: {exc}") from None
        if response.status_code >= 400:
            try:
                err = response.json()["error"]
                raise PlatformAPIError(response.status_code, err["message"], err.get("code"))
            except (ValueError, KeyError, TypeError):
                raise PlatformAPIError(response.status_code, response.text[:500] or response.reason_phrase) from None
        if response.headers.get("content-type", "").startswith("application/json"):
            return response.json()
        return response.text

    # ---- health --------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return self._request("GET", "/healthz")

    def list_models(self) -> list[dict[str, Any]]:
        """The caller's endpoints (``GET /v1/models``; works with a tenant key)."""
        return self._request("GET", "/v1/models")["data"]

    # ---- tenants and keys ------------------------------------------------------------------------
    def create_tenant(self, name: str, quotas: dict[str, int] | None = None) -> dict[str, Any]:
        return self._request("POST", "/admin/tenants", json={"name": name, "quotas": quotas})

    def list_tenants(self) -> list[dict[str, Any]]:
        return self._request("GET", "/admin/tenants")["data"]

    def get_tenant(self, name: str) -> dict[str, Any]:
        return self._request("GET", f"/admin/tenants/{name}")

    def set_tenant_disabled(self, name: str, disabled: bool) -> dict[str, Any]:
        return self._request("POST", f"/admin/tenants/{name}/{'disable' if disabled else 'enable'}")

    def update_quotas(self, name: str, **quotas: int) -> dict[str, Any]:
        return self._request("PATCH", f"/admin/tenants/{name}/quotas", json=quotas)

    def create_key(self, tenant: str) -> dict[str, Any]:
        return self._request("POST", f"/admin/tenants/{tenant}/keys")

    def revoke_key(self, key_id: str) -> dict[str, Any]:
        return self._request("DELETE", f"/admin/keys/{key_id}")

    # ---- endpoints ----------------------------------------------------------------------------------
    def deploy_endpoint(self, **spec: Any) -> dict[str, Any]:
        return self._request("POST", "/admin/endpoints", json=spec)

    def list_endpoints(self, tenant: str | None = None) -> list[dict[str, Any]]:
        return self._request("GET", "/admin/endpoints", params={"tenant": tenant} if tenant else None)["data"]

    def get_endpoint(self, tenant: str, name: str) -> dict[str, Any]:
        return self._request("GET", f"/admin/endpoints/{tenant}/{name}")

    def delete_endpoint(self, tenant: str, name: str) -> dict[str, Any]:
        return self._request("DELETE", f"/admin/endpoints/{tenant}/{name}")

    # ---- jobs -------------------------------------------------------------------------------------
    def submit_job(self, spec: dict[str, Any], tenant: str | None = None) -> dict[str, Any]:
        return self._request("POST", "/v1/jobs", json={"spec": spec, "tenant": tenant})

    def list_jobs(self, tenant: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if tenant:
            params["tenant"] = tenant
        return self._request("GET", "/v1/jobs", params=params)["data"]

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}")

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/jobs/{job_id}/cancel")

    def job_logs(self, job_id: str, tail: int | None = None) -> str:
        return self._request("GET", f"/v1/jobs/{job_id}/logs", params={"tail": tail} if tail else None)

    def follow_job_logs(self, job_id: str) -> Iterator[str]:
        """Log text as the job writes it, until the job ends."""
        try:
            with self._http.stream("GET", f"/v1/jobs/{job_id}/logs", params={"follow": "true"},
                                   timeout=httpx.Timeout(10.0, read=None)) as response:
                if response.status_code >= 400:
                    response.read()
                    try:
                        err = response.json()["error"]
                        raise PlatformAPIError(response.status_code, err["message"], err.get("code"))
                    except (ValueError, KeyError, TypeError):
                        raise PlatformAPIError(response.status_code, response.text[:500]) from None
                yield from response.iter_text()
        except httpx.ConnectError:
            raise PlatformAPIError(0, f"cannot reach the gateway at {self.url}") from None
