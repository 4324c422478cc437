"""``--otlp ENDPOINT``: the same metrics through OpenTelemetry's OTLP exporter.

The metric families (``diskwatch.sinks.metrics.families``) become the SDK's
data model (Sum, Gauge, Histogram points, cumulative since diskwatch
started) and go out through the SDK's OTLP/HTTP protobuf exporter on a
timer, from a snapshot of the sink, like a Prometheus scrape. The SDK's
instruments are not used: Python's SDK has no asynchronous histogram (the
latency histogram would need one synchronous call per request) and no
bridge for metrics kept elsewhere; building the points from our own
aggregates keeps the request path free of OpenTelemetry calls and the
histogram exact.

Optional dependency: ``pip install 'diskwatch[otlp]'``.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.parse

from ... import __version__
from ...errors import DiskwatchError
from . import COUNTER, GAUGE, LATENCY_BOUNDS, MetricsSink, families

log = logging.getLogger("diskwatch.metrics")

_UNITS = {"bytes": "By", "seconds": "s"}


class OtlpError(DiskwatchError):
    pass


def metrics_url(endpoint: str) -> str:
    """An OTLP/HTTP base URL (``http://collector:4318``) gets the metrics
    path (``/v1/metrics``), as OTEL_EXPORTER_OTLP_ENDPOINT does; a URL with a
    path is used as given."""
    u = urllib.parse.urlsplit(endpoint)
    if u.scheme not in ("http", "https") or not u.netloc:
        raise OtlpError(f"--otlp {endpoint!r}: expected an http:// or https:// URL, "
                        "e.g. http://localhost:4318")
    if u.path in ("", "/"):
        return urllib.parse.urlunsplit((u.scheme, u.netloc, "/v1/metrics", u.query, ""))
    return endpoint


def export_interval() -> float:
    """Seconds between exports: OTEL_METRIC_EXPORT_INTERVAL (milliseconds, as
    the OpenTelemetry SDKs read it), 60 s by default as there."""
    import os
    text = os.environ.get("OTEL_METRIC_EXPORT_INTERVAL", "60000")
    try:
        ms = float(text)
    except ValueError:
        ms = -1
    if ms <= 0:
        raise OtlpError(f"OTEL_METRIC_EXPORT_INTERVAL={text!r}: expected milliseconds > 0")
    return ms / 1000


def _unit(name: str) -> str:
    for word, unit in _UNITS.items():
        if word in name:
            return unit
    return "1"


class OtlpExporter:
    """Exports the sink's metrics every ``interval`` seconds and once at close."""

    def __init__(self, sink: MetricsSink, endpoint: str, interval: float = 10.0,
                 timeout: float = 5.0) -> None:
        try:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter,
            )
            from opentelemetry.sdk.resources import Resource
        except ImportError as e:
            raise OtlpError("--otlp needs the OpenTelemetry SDK and OTLP exporter: "
                            "pip install 'diskwatch[otlp]'") from e
        # The SDK logs every failed attempt and retry (with the whole urllib3
        # error); diskwatch says it once per outage instead (-v shows them).
        logging.getLogger("opentelemetry").setLevel(
            logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.CRITICAL)
        self.sink = sink
        self.url = metrics_url(endpoint)
        self.interval = interval
        # service.name, and whatever OTEL_RESOURCE_ATTRIBUTES adds (host, guest...)
        self.resource = Resource.create({"service.name": "diskwatch",
                                         "service.version": __version__})
        self._exporter = OTLPMetricExporter(endpoint=self.url, timeout=timeout)
        self._start_ns = time.time_ns()
        self._stop = threading.Event()
        self.exports = 0
        self.failures = 0
        self._failing = False  # told once per outage
        self._thread = threading.Thread(target=self._run, name="diskwatch-otlp", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.export_now()

    def export_now(self) -> bool:
        from opentelemetry.sdk.metrics.export import MetricExportResult
        result = self._exporter.export(self.metrics_data())
        ok = result == MetricExportResult.SUCCESS
        if ok:
            self.exports += 1
            if self._failing:
                self._failing = False
                log.warning("--otlp: exporting to %s again", self.url)
        else:
            self.failures += 1
            if not self._failing:
                self._failing = True
                log.warning("--otlp: export to %s failed; trying again every %gs",
                            self.url, self.interval)
        return ok

    def metrics_data(self):
        from opentelemetry.sdk.metrics.export import (
            AggregationTemporality,
            Gauge,
            Histogram,
            HistogramDataPoint,
            Metric,
            MetricsData,
            NumberDataPoint,
            ResourceMetrics,
            ScopeMetrics,
            Sum,
        )
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        cumulative = AggregationTemporality.CUMULATIVE
        start, now = self._start_ns, time.time_ns()
        bounds = list(LATENCY_BOUNDS)
        metrics = []
        for fam in families(self.sink.snapshot()):
            if not fam.samples:
                continue
            name = fam.name.removesuffix("_total")
            if fam.kind == COUNTER or fam.kind == GAUGE:
                points = [NumberDataPoint(attributes=dict(zip(fam.labels, values, strict=True)),
                                          start_time_unix_nano=start, time_unix_nano=now,
                                          value=value)
                          for values, value in fam.samples]
                data = (Sum(data_points=points, aggregation_temporality=cumulative,
                            is_monotonic=True) if fam.kind == COUNTER
                        else Gauge(data_points=points))
            else:
                points = [HistogramDataPoint(
                    attributes=dict(zip(fam.labels, values, strict=True)),
                    start_time_unix_nano=start, time_unix_nano=now, count=sum(counts),
                    sum=total, bucket_counts=list(counts), explicit_bounds=bounds,
                    min=None, max=None)  # not kept: optional in OTLP
                    for values, counts, total in fam.samples]
                data = Histogram(data_points=points, aggregation_temporality=cumulative)
            metrics.append(Metric(name=name, description=fam.help, unit=_unit(name), data=data))
        scope = InstrumentationScope("diskwatch", __version__)
        return MetricsData(resource_metrics=[ResourceMetrics(
            resource=self.resource, scope_metrics=[ScopeMetrics(scope=scope, metrics=metrics,
                                                                schema_url="")],
            schema_url="")])

    def close(self) -> None:
        """Stop the timer and send the final values (bounded by the timeout)."""
        self._stop.set()
        self._thread.join()
        self.export_now()
        self._exporter.shutdown()
