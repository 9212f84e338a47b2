"""The web dashboard the gateway serves at ``/dashboard``.

- ``routes``: the UI and its JSON API (``/dashboard/api/...``, the gateway's API keys).
- ``cluster``: cluster and experts pages from the data plane controller's state in Redis.
- ``series``: per-replica metric snapshots in bounded Redis rings, and rates/percentiles from them.
- ``prom``: the gateway's Prometheus text parsed into per-endpoint counters.
- ``views``: who sees what; the serving, jobs and tenants pages.
- ``static/``: the single-page UI (plain JS; charts by Plotly, served from the ``plotly`` package).
"""

from expertmesh.dashboard.routes import mount_dashboard

__all__ = ["mount_dashboard"]
