"""The gateway's Prometheus text, read back into per-endpoint numbers the serving page plots.

A gateway replica's registry (what ``GET /metrics`` serves) is parsed with
``prometheus_client``'s own text parser into one :class:`EndpointCounters` per endpoint
(``"tenant/name"``, the ``endpoint`` label the gateway sets on completion routes):

    expertmesh_requests_total{endpoint,status}            -> requests, errors (status >= 500)
    expertmesh_tokens_total{endpoint,kind}                -> prompt_tokens, completion_tokens
    expertmesh_time_to_first_token_seconds_bucket{le}     -> ttft_buckets (cumulative counts)
    expertmesh_inter_token_latency_seconds_bucket{le}     -> itl_buckets
    expertmesh_request_duration_seconds_bucket{le}        -> latency_buckets (summed over routes)
    expertmesh_ongoing_requests                           -> in_flight (gauge)

Counters are cumulative per replica; rates and percentiles come from differences of two
snapshots (``series.py``). Percentiles use Prometheus' ``histogram_quantile`` rule: find the
bucket holding the rank and interpolate linearly inside it.

    histogram_quantile(0.5, (0.1, 0.5, inf), (2, 6, 6))  # rank 3 lies in (0.1, 0.5]: 0.2
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from expertmesh.telemetry import LATENCY_BUCKETS_S

BUCKET_BOUNDS_S: tuple[float, ...] = (*LATENCY_BUCKETS_S, math.inf)  # every latency histogram's `le` bounds
HISTOGRAMS = {  # metric family name (as the parser reports it) -> EndpointCounters field
    "expertmesh_time_to_first_token_seconds": "ttft_buckets",
    "expertmesh_inter_token_latency_seconds": "itl_buckets",
    "expertmesh_request_duration_seconds": "latency_buckets",
}


def _zeros() -> list[float]:
    return [0.0] * len(BUCKET_BOUNDS_S)


@dataclass
class EndpointCounters:
    """One endpoint's counters in one gateway replica at one instant (cumulative since start).

    ``*_buckets`` are cumulative histogram counts aligned with :data:`BUCKET_BOUNDS_S`
    (the last one, ``+Inf``, is the number of observations)."""

    requests: float = 0.0
    errors: float = 0.0
    prompt_tokens: float = 0.0
    completion_tokens: float = 0.0
    in_flight: float = 0.0
    ttft_buckets: list[float] = field(default_factory=_zeros)
    itl_buckets: list[float] = field(default_factory=_zeros)
    latency_buckets: list[float] = field(default_factory=_zeros)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EndpointCounters:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class GatewayCounters:
    """Everything the serving page needs from one replica's registry at one instant."""

    endpoints: dict[str, EndpointCounters] = field(default_factory=dict)
    job_queue_depth: float | None = None
    jobs_by_state: dict[str, float] = field(default_factory=dict)
    rejections_by_reason: dict[str, float] = field(default_factory=dict)

    def endpoint(self, name: str) -> EndpointCounters:
        if name not in self.endpoints:
            self.endpoints[name] = EndpointCounters()
        return self.endpoints[name]


def _bucket_index(le: str) -> int | None:
    bound = math.inf if le in ("+Inf", "Inf", "inf") else float(le)
    for i, b in enumerate(BUCKET_BOUNDS_S):
        if math.isclose(b, bound) or (math.isinf(b) and math.isinf(bound)):
            return i
    return None  # a bucket layout we do not know: ignored, not guessed


def parse_gateway_metrics(text: str | bytes) -> GatewayCounters:
    """The ExpertMesh metrics of one Prometheus text exposition (other metrics are ignored)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    out = GatewayCounters()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels, value = sample.labels, float(sample.value)
            endpoint = labels.get("endpoint")
            if family.name == "expertmesh_requests" and sample.name.endswith("_total") and endpoint:
                counters = out.endpoint(endpoint)
                counters.requests += value
                if labels.get("status", "").isdigit() and int(labels["status"]) >= 500:
                    counters.errors += value
            elif family.name == "expertmesh_tokens" and sample.name.endswith("_total") and endpoint:
                kind = labels.get("kind")
                if kind == "prompt":
                    out.endpoint(endpoint).prompt_tokens += value
                elif kind == "completion":
                    out.endpoint(endpoint).completion_tokens += value
            elif family.name in HISTOGRAMS and sample.name.endswith("_bucket") and endpoint:
                index = _bucket_index(labels.get("le", ""))
                if index is not None:
                    getattr(out.endpoint(endpoint), HISTOGRAMS[family.name])[index] += value
            elif family.name == "expertmesh_ongoing_requests" and endpoint:
                out.endpoint(endpoint).in_flight += value
            elif family.name == "expertmesh_job_queue_depth":
                out.job_queue_depth = value
            elif family.name == "expertmesh_jobs" and "state" in labels:
                out.jobs_by_state[labels["state"]] = value
            elif family.name == "expertmesh_rejections" and sample.name.endswith("_total"):
                reason = labels.get("reason", "unknown")
                out.rejections_by_reason[reason] = out.rejections_by_reason.get(reason, 0.0) + value
    return out


def bucket_delta(newer: list[float], older: list[float] | None) -> list[float]:
    """Observations between two cumulative snapshots; a counter that went down (the replica
    restarted) counts from zero, as Prometheus' ``rate`` does."""
    if older is None or any(n < o for n, o in zip(newer, older, strict=True)):
        return list(newer)
    return [n - o for n, o in zip(newer, older, strict=True)]


def counter_delta(newer: float, older: float | None) -> float:
    if older is None or newer < older:
        return newer
    return newer - older


def histogram_quantile(q: float, bounds: tuple[float, ...], cumulative: list[float]) -> float | None:
    """The ``q`` quantile of a histogram given cumulative bucket counts (None: no observations).

    Linear interpolation inside the bucket that holds rank ``q * total``; a rank in the
    ``+Inf`` bucket answers the largest finite bound (the histogram cannot say more)."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    if len(bounds) != len(cumulative):
        raise ValueError(f"{len(bounds)} bucket bounds but {len(cumulative)} counts")
    total = cumulative[-1] if cumulative else 0.0
    if total <= 0:
        return None
    rank = q * total
    previous_count, lower = 0.0, 0.0
    for bound, count in zip(bounds, cumulative, strict=True):
        if count >= rank and count > previous_count:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - previous_count) / (count - previous_count)
        previous_count, lower = count, (bound if not math.isinf(bound) else lower)
    return lower
