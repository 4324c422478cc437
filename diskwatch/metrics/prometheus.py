"""``--metrics [ADDR:]PORT``: a Prometheus endpoint (prometheus_client).

A custom collector reads the sink's snapshot at scrape time, so nothing of
prometheus_client runs per request or per batch: a scrape costs one copy
of the aggregates under the sink's lock (a few hundred numbers). The
endpoint has its own registry: only diskwatch's metrics, not the Python
process collectors (a scrape stays small and the names are ours).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

from ..errors import DiskwatchError
from . import COUNTER, GAUGE, LATENCY_BOUNDS, MetricsSink, families


class MetricsAddressError(DiskwatchError):
    pass


def parse_address(text: str) -> tuple[str, int]:
    """``PORT``, ``ADDR:PORT`` or ``[V6]:PORT`` -> (host, port); loopback by default."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host = "127.0.0.1"
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise MetricsAddressError(f"--metrics {text!r}: expected [ADDR:]PORT with a port "
                                  "0-65535 (0: any free port)")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise MetricsAddressError(f"--metrics {text!r}: {host!r} is not an IP address"
                                      ) from None
    return host, port


class SinkCollector:
    """A prometheus_client collector over a MetricsSink's snapshot."""

    def __init__(self, sink: MetricsSink) -> None:
        self.sink = sink

    def describe(self) -> list:
        return []  # unchecked collector: registration does not call collect()

    def collect(self) -> Iterator:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )
        from prometheus_client.utils import floatToGoString
        les = [floatToGoString(b) for b in LATENCY_BOUNDS] + ["+Inf"]
        for fam in families(self.sink.snapshot()):
            if fam.kind == COUNTER:
                m = CounterMetricFamily(fam.name, fam.help, labels=fam.labels)
            elif fam.kind == GAUGE:
                m = GaugeMetricFamily(fam.name, fam.help, labels=fam.labels)
            else:
                m = HistogramMetricFamily(fam.name, fam.help, labels=fam.labels)
                for values, counts, total in fam.samples:
                    cumulative, acc = [], 0
                    for le, n in zip(les, counts, strict=True):
                        acc += n
                        cumulative.append((le, acc))
                    m.add_metric(list(values), cumulative, total)
                yield m
                continue
            for values, value in fam.samples:
                m.add_metric(list(values), value)
            yield m


class MetricsServer:
    """The HTTP endpoint, in its own daemon thread; ``close()`` stops it."""

    def __init__(self, sink: MetricsSink, host: str, port: int) -> None:
        try:
            from prometheus_client import CollectorRegistry, start_http_server
        except ImportError as e:
            raise MetricsAddressError("--metrics needs prometheus_client: pip install "
                                      "prometheus_client") from e
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SinkCollector(sink))
        try:
            self._server, self._thread = start_http_server(port, host, registry=self.registry)
        except OSError as e:
            raise OSError(e.errno, f"--metrics: cannot listen on {host}:{port}: "
                          f"{e.strerror}") from None
        self.host = host
        self.port = self._server.server_address[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
