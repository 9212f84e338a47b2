"""Time series for the serving page: bounded rings in Redis, a sampler per gateway replica, and
the pure arithmetic that turns cumulative snapshots into rates and percentiles.

Why Redis and not memory: the gateway runs as several Ray Serve replicas behind one port, and
each dashboard poll may land on any of them. Every replica samples *its own* registry (its
counters are its own) into its own ring, and whichever replica answers a poll reads all rings
and adds them up, so every poll sees the same numbers and a replica restart loses nothing.

Keys (``R`` = gateway replica id, ``T``/``N`` = tenant/endpoint name)::

    em:dash:gw:R          list   JSON snapshots {"t", "endpoints": {"T/N": EndpointCounters}}, newest
                                 last, at most ``ring_samples`` (expires when the replica is gone)
    em:dash:gateways      zset   R -> time of its last snapshot
    em:dash:replicas:T:N  list   JSON {"t", "replicas", "status"} per sample interval, bounded
    em:dash:tick          str    SET NX PX: one replica per interval samples endpoint replicas

With the defaults (2 s interval, 900 samples) a ring spans 30 minutes.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from expertmesh.dashboard.prom import (
    BUCKET_BOUNDS_S,
    EndpointCounters,
    bucket_delta,
    counter_delta,
    histogram_quantile,
    parse_gateway_metrics,
)
from expertmesh.store import key

log = logging.getLogger(__name__)

QUANTILES = (0.5, 0.9, 0.99)
GATEWAYS = key("dash", "gateways")
TICK = key("dash", "tick")


@dataclass(frozen=True)
class SeriesConfig:
    sample_interval_s: float = 2.0
    ring_samples: int = 900

    def __post_init__(self) -> None:
        if self.sample_interval_s <= 0 or self.ring_samples < 2:
            raise ValueError(f"sample_interval_s must be > 0 and ring_samples >= 2, got "
                             f"{self.sample_interval_s} and {self.ring_samples}")

    @property
    def span_s(self) -> float:
        return self.sample_interval_s * self.ring_samples


class SeriesStore:
    """The rings in Redis (every method is one or two round trips)."""

    def __init__(self, client: redis.Redis, config: SeriesConfig):
        self.r, self.config = client, config

    def push_gateway(self, replica: str, t_s: float, endpoints: dict[str, EndpointCounters]) -> None:
        ring = key("dash", "gw", replica)
        pipe = self.r.pipeline(transaction=False)
        pipe.rpush(ring, json.dumps({"t": t_s, "endpoints": {n: c.to_dict() for n, c in endpoints.items()}}))
        pipe.ltrim(ring, -self.config.ring_samples, -1)
        pipe.expire(ring, int(self.config.span_s) + 60)
        pipe.zadd(GATEWAYS, {replica: t_s})
        pipe.zremrangebyscore(GATEWAYS, "-inf", t_s - self.config.span_s)
        pipe.execute()

    def gateway_rings(self, since_s: float) -> dict[str, list[dict[str, Any]]]:
        replicas = self.r.zrangebyscore(GATEWAYS, since_s, "+inf")
        pipe = self.r.pipeline(transaction=False)
        for replica in replicas:
            pipe.lrange(key("dash", "gw", replica), 0, -1)
        rings = {}
        for replica, raw in zip(replicas, pipe.execute(), strict=True):
            rings[replica] = [s for s in map(json.loads, raw) if s["t"] >= since_s]
        return rings

    def claim_tick(self) -> bool:
        """True for exactly one caller per sample interval across all replicas."""
        return bool(self.r.set(TICK, "1", nx=True, px=max(1, int(self.config.sample_interval_s * 1000 * 0.9))))

    def push_replicas(self, tenant: str, name: str, t_s: float, replicas: int, status: str) -> None:
        ring = key("dash", "replicas", tenant, name)
        pipe = self.r.pipeline(transaction=False)
        pipe.rpush(ring, json.dumps({"t": t_s, "replicas": replicas, "status": status}))
        pipe.ltrim(ring, -self.config.ring_samples, -1)
        pipe.expire(ring, int(self.config.span_s) + 60)
        pipe.execute()

    def replica_ring(self, tenant: str, name: str, since_s: float) -> list[dict[str, Any]]:
        raw = self.r.lrange(key("dash", "replicas", tenant, name), 0, -1)
        return [s for s in map(json.loads, raw) if s["t"] >= since_s]


# ---- pure: snapshots -> series ------------------------------------------------------------------------
@dataclass
class _Bin:
    """One replica's observations of one endpoint inside one time bin (counts, not rates)."""

    seconds: float = 0.0
    requests: float = 0.0
    errors: float = 0.0
    tokens: float = 0.0
    in_flight: float = 0.0  # the last snapshot's gauge
    ttft: list[float] = field(default_factory=lambda: [0.0] * len(BUCKET_BOUNDS_S))
    itl: list[float] = field(default_factory=lambda: [0.0] * len(BUCKET_BOUNDS_S))
    latency: list[float] = field(default_factory=lambda: [0.0] * len(BUCKET_BOUNDS_S))


HISTOGRAM_COLUMNS = ("ttft", "itl", "latency")


def _add(into: list[float], delta: list[float]) -> None:
    for i, d in enumerate(delta):
        into[i] += d


def _quantiles(buckets: list[float]) -> dict[str, float | None]:
    return {f"p{round(q * 100)}": histogram_quantile(q, BUCKET_BOUNDS_S, buckets) for q in QUANTILES}


def _replica_bins(snapshots: list[dict[str, Any]], bin_s: float,
                  visible: Callable[[str], bool]) -> dict[tuple[str, int], _Bin]:
    """(endpoint, bin) -> what this replica observed in that bin, from consecutive snapshots."""
    bins: dict[tuple[str, int], _Bin] = {}
    ordered = sorted(snapshots, key=lambda s: s["t"])
    for older, newer in zip(ordered, ordered[1:], strict=False):
        dt = newer["t"] - older["t"]
        if dt <= 0:
            continue
        slot = int(math.floor(newer["t"] / bin_s))
        for name, raw in newer["endpoints"].items():
            if not visible(name):
                continue
            now = EndpointCounters.from_dict(raw)
            prev = EndpointCounters.from_dict(older["endpoints"][name]) if name in older["endpoints"] else None
            b = bins.setdefault((name, slot), _Bin())
            b.seconds += dt
            b.requests += counter_delta(now.requests, prev.requests if prev else None)
            b.errors += counter_delta(now.errors, prev.errors if prev else None)
            b.tokens += counter_delta(now.completion_tokens, prev.completion_tokens if prev else None)
            b.in_flight = now.in_flight
            for column, field_name in zip(HISTOGRAM_COLUMNS, ("ttft_buckets", "itl_buckets", "latency_buckets"),
                                          strict=True):
                _add(getattr(b, column), bucket_delta(getattr(now, field_name),
                                                      getattr(prev, field_name) if prev else None))
    return bins


def serving_series(rings: dict[str, list[dict[str, Any]]], bin_s: float,
                   visible: Callable[[str], bool] = lambda _name: True) -> dict[str, dict[str, Any]]:
    """Per endpoint: time-binned rates and percentiles summed over gateway replicas.

    Each replica's consecutive snapshots give the requests, errors, completion tokens and
    histogram observations of that interval, binned by the interval's end (``bin_s``). A
    replica's rate in a bin is its count over its seconds in that bin; the rates of all
    replicas add up (two replicas at 5 req/s each plot as 10 req/s), as do in-flight gauges
    and histogram deltas. Percentiles per bin come from the merged deltas (None where nothing
    was observed); ``window`` holds the same percentiles over the whole window.
    """
    merged: dict[str, dict[int, dict[str, Any]]] = {}
    for snapshots in rings.values():
        for (name, slot), b in _replica_bins(snapshots, bin_s, visible).items():
            m = merged.setdefault(name, {}).setdefault(slot, {
                "requests_per_s": 0.0, "errors_per_s": 0.0, "tokens_per_s": 0.0, "in_flight": 0.0,
                **{c: [0.0] * len(BUCKET_BOUNDS_S) for c in HISTOGRAM_COLUMNS}})
            m["requests_per_s"] += b.requests / b.seconds
            m["errors_per_s"] += b.errors / b.seconds
            m["tokens_per_s"] += b.tokens / b.seconds
            m["in_flight"] += b.in_flight
            for column in HISTOGRAM_COLUMNS:
                _add(m[column], getattr(b, column))
    out: dict[str, dict[str, Any]] = {}
    for name, by_slot in merged.items():
        slots = sorted(by_slot)
        series: dict[str, Any] = {"t": [s * bin_s for s in slots]}
        for column in ("requests_per_s", "errors_per_s", "tokens_per_s", "in_flight"):
            series[column] = [round(by_slot[s][column], 4) for s in slots]
        window: dict[str, Any] = {}
        for column in HISTOGRAM_COLUMNS:
            per_bin = [_quantiles(by_slot[s][column]) for s in slots]
            for q in (f"p{round(q * 100)}" for q in QUANTILES):
                series[f"{column}_{q}_s"] = [p[q] for p in per_bin]
            total = [0.0] * len(BUCKET_BOUNDS_S)
            for s in slots:
                _add(total, by_slot[s][column])
            window[column] = {**_quantiles(total), "count": total[-1]}
        series["window"] = window
        out[name] = series
    return out


def tenant_totals(rings: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Requests and tokens (prompt + completion) per tenant between the first and last snapshot
    of each replica's ring (pass rings cut to the last minute for "per minute" use)."""
    totals: dict[str, dict[str, float]] = {}
    for snapshots in rings.values():
        ordered = sorted(snapshots, key=lambda s: s["t"])
        for older, newer in zip(ordered, ordered[1:], strict=False):
            for name, raw in newer["endpoints"].items():
                now = EndpointCounters.from_dict(raw)
                prev = EndpointCounters.from_dict(older["endpoints"][name]) if name in older["endpoints"] else None
                t = totals.setdefault(name.split("/", 1)[0], {"requests": 0.0, "tokens": 0.0})
                t["requests"] += counter_delta(now.requests, prev.requests if prev else None)
                t["tokens"] += counter_delta(now.prompt_tokens + now.completion_tokens,
                                             prev.prompt_tokens + prev.completion_tokens if prev else None)
    return totals


# ---- the sampler (one per gateway replica) ---------------------------------------------------------------
class GatewaySampler:
    """Every ``sample_interval_s``: this replica's registry into its ring, and (one replica per
    interval) each endpoint's running replica count into the endpoint's ring.

    Runs as a daemon thread between the app's startup and shutdown; a dashboard poll also
    samples when the last sample is older than the interval (so an app without lifespan
    events, e.g. under a test client, still fills its ring)."""

    def __init__(self, services: Any, store: SeriesStore, replica_id: str | None = None,
                 clock: Callable[[], float] = time.time):
        self.services, self.store, self.clock = services, store, clock
        self.replica_id = replica_id or uuid.uuid4().hex[:12]
        self._last_s = -math.inf
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample_if_due(self) -> bool:
        with self._lock:
            now = self.clock()
            if now - self._last_s < self.store.config.sample_interval_s * 0.9:
                return False
            self._last_s = now
        self.sample(now)
        return True

    def sample(self, now_s: float) -> None:
        text = self.services.telemetry.prometheus_text()
        if text:
            self.store.push_gateway(self.replica_id, now_s, parse_gateway_metrics(text).endpoints)
        if self.store.claim_tick():
            for record in self.services.endpoints.list():
                status = self.services.backend.status(record)
                self.store.push_replicas(record.spec.tenant, record.spec.name, now_s, status.replicas, status.status)

    def _run(self) -> None:
        while not self._stop.wait(self.store.config.sample_interval_s):
            try:
                self.sample_if_due()
            except Exception:  # noqa: BLE001 - a failed sample (Redis blinked) must not end the sampler
                log.warning("dashboard sample failed", exc_info=True)

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="dashboard-sampler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
