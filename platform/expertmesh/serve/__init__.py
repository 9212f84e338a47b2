"""Serving: the gateway (one FastAPI app: OpenAI-compatible API, jobs, admin) and endpoints
(one Ray Serve application per endpoint running the engine, autoscaled).

    services = build_services(GatewayConfig(redis_url, home), ServeBackend())
    app = create_app(services)          # what the Ray Serve gateway deployment serves

Submodules: ``openai_api`` (schemas, chat template, errors), ``endpoints`` (spec, registry,
model resolution), ``replica`` (the engine replica), ``backend`` (Ray Serve / in-process),
``gateway``, ``admin``, ``job_routes``, ``services``, ``platform`` (bring it all up),
``client`` (HTTP client the CLI uses). Importing this package does not import Ray.
"""

from expertmesh.serve.endpoints import EndpointRecord, EndpointRegistry, EndpointSpec
from expertmesh.serve.openai_api import APIError, render_chat
from expertmesh.serve.services import GatewayConfig, GatewayServices, build_services

__all__ = ["APIError", "EndpointRecord", "EndpointRegistry", "EndpointSpec", "GatewayConfig", "GatewayServices",
           "build_services", "render_chat"]
