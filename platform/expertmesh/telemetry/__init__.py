"""OpenTelemetry for ExpertMesh: one tracer and one meter provider per process, the platform's
metric instruments, and exporters (Prometheus text by default, OTLP/HTTP when configured).

    telemetry = setup_telemetry(TelemetryConfig.from_env(service_name="expertmesh-gateway"))
    with telemetry.tracer.start_as_current_span("POST /v1/completions"): ...
    telemetry.metrics.requests.add(1, {"endpoint": "chat", "tenant": "acme", "status": "200"})
    body = telemetry.prometheus_text()     # what GET /metrics serves

Providers are owned by the returned :class:`Telemetry` object, not installed as OTel's
process globals, so tests and several apps in one process do not fight over them;
``setup_telemetry`` returns the same object for the same config within a process.

Trace context crosses process hops in W3C ``traceparent`` form: :func:`inject_context`
writes it into a dict that travels with the request (gateway → endpoint replica) and
:func:`extract_context` continues the trace on the other side.

Metric names (Prometheus form, as served at ``/metrics``)::

    expertmesh_requests_total{endpoint,tenant,route,status}
    expertmesh_tokens_total{endpoint,tenant,kind=prompt|completion}
    expertmesh_request_duration_seconds{endpoint,route}          histogram
    expertmesh_time_to_first_token_seconds{endpoint}             histogram
    expertmesh_inter_token_latency_seconds{endpoint}             histogram
    expertmesh_ongoing_requests{endpoint}                        gauge (gateway in-flight)
    expertmesh_rejections_total{tenant,reason}                   429/503 by reason
    expertmesh_job_queue_depth                                   gauge (stream entries waiting)
    expertmesh_jobs{state}                                       gauge (jobs per state)
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry import propagate
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import Histogram, MeterProvider
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True)
class TelemetryConfig:
    """``otlp_endpoint`` (e.g. ``http://collector:4318``) turns on OTLP/HTTP export of traces
    and metrics; ``prometheus`` keeps the pull endpoint (``/metrics``) on."""

    service_name: str = "expertmesh"
    prometheus: bool = True
    otlp_endpoint: str | None = None
    otlp_export_interval_s: float = 10.0

    @classmethod
    def from_env(cls, service_name: str = "expertmesh", environ: Mapping[str, str] | None = None) -> TelemetryConfig:
        """``OTEL_EXPORTER_OTLP_ENDPOINT`` and ``EXPERTMESH_PROMETHEUS=0|1`` (read here, at the edge)."""
        env = os.environ if environ is None else environ
        return cls(service_name=service_name, prometheus=env.get("EXPERTMESH_PROMETHEUS", "1") != "0",
                   otlp_endpoint=env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None)


class PlatformMetrics:
    """The instruments every component records into (see the module docstring for names)."""

    def __init__(self, meter: Any):
        self.requests = meter.create_counter("expertmesh_requests", unit="1", description="API requests answered")
        self.tokens = meter.create_counter("expertmesh_tokens", unit="1", description="tokens processed")
        self.request_duration = meter.create_histogram(
            "expertmesh_request_duration", unit="s", description="request latency at the gateway")
        self.ttft = meter.create_histogram("expertmesh_time_to_first_token", unit="s",
                                           description="time from request arrival to the first generated token")
        self.inter_token = meter.create_histogram("expertmesh_inter_token_latency", unit="s",
                                                  description="time between consecutive generated tokens")
        self.ongoing = meter.create_up_down_counter("expertmesh_ongoing_requests", unit="1",
                                                    description="requests in flight at the gateway")
        self.rejections = meter.create_counter("expertmesh_rejections", unit="1",
                                               description="requests refused by quota or overload")


class Telemetry:
    def __init__(self, config: TelemetryConfig, span_exporter: SpanExporter | None = None):
        self.config = config
        resource = Resource.create({"service.name": config.service_name})
        self.tracer_provider = TracerProvider(resource=resource)
        if span_exporter is not None:
            self.tracer_provider.add_span_processor(SimpleSpanProcessor(span_exporter))
        readers: list[Any] = []
        self.registry = None
        if config.prometheus:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader
            from prometheus_client import CollectorRegistry

            self.registry = CollectorRegistry(auto_describe=True)
            readers.append(PrometheusMetricReader(registry=self.registry, disable_target_info=True))
        if config.otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

            base = config.otlp_endpoint.rstrip("/")
            self.tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(f"{base}/v1/traces")))
            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter(f"{base}/v1/metrics"),
                                                         export_interval_millis=config.otlp_export_interval_s * 1000))
        latency_view = View(instrument_type=Histogram,
                            aggregation=ExplicitBucketHistogramAggregation(LATENCY_BUCKETS_S))
        self.meter_provider = MeterProvider(metric_readers=readers, resource=resource, views=[latency_view])
        self.tracer = self.tracer_provider.get_tracer("expertmesh")
        self.meter = self.meter_provider.get_meter("expertmesh")
        self.metrics = PlatformMetrics(self.meter)

    def observe(self, name: str, description: str,
                read: Callable[[], Mapping[tuple[tuple[str, str], ...], float]]) -> None:
        """An observable gauge whose value(s) ``read()`` returns at collection time, keyed by
        attribute tuples: ``{(("state", "running"),): 2.0}``; ``{(): 3.0}`` for no attributes.
        A failing ``read`` reports nothing for that collection."""

        def callback(_options: CallbackOptions):
            try:
                values = read()
            except Exception:  # noqa: BLE001 - a metrics scrape must not fail because Redis blinked
                return []
            return [Observation(v, dict(attrs)) for attrs, v in values.items()]

        self.meter.create_observable_gauge(name, callbacks=[callback], unit="1", description=description)

    def prometheus_text(self) -> bytes:
        if self.registry is None:
            return b""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


_lock = threading.Lock()
_instances: dict[TelemetryConfig, Telemetry] = {}


def setup_telemetry(config: TelemetryConfig | None = None, span_exporter: SpanExporter | None = None) -> Telemetry:
    """The process's :class:`Telemetry` for ``config`` (created on first use).

    Passing a ``span_exporter`` (tests: an in-memory one) always builds a fresh instance.
    """
    config = config or TelemetryConfig()
    if span_exporter is not None:
        return Telemetry(config, span_exporter)
    with _lock:
        if config not in _instances:
            _instances[config] = Telemetry(config)
        return _instances[config]


def inject_context(carrier: dict[str, str] | None = None) -> dict[str, str]:
    """The current trace context as W3C headers (``traceparent``) to send along a hop."""
    carrier = {} if carrier is None else carrier
    propagate.inject(carrier)
    return carrier


def extract_context(carrier: Mapping[str, str] | None) -> Context:
    return propagate.extract(dict(carrier or {}))


__all__ = ["LATENCY_BUCKETS_S", "PlatformMetrics", "Telemetry", "TelemetryConfig", "extract_context",
           "inject_context", "setup_telemetry"]
