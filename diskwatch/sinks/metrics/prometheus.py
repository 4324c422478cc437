"""``--metrics [ADDR:]PORT``: a Prometheus endpoint (prometheus_client).

A custom collector reads the sink's snapshot at scrape time, so nothing of
prometheus_client runs per request or per batch: a scrape costs one copy
of the aggregates under the sink's lock (a few hundred numbers). The
endpoint has its own registry: only diskwatch's metrics, not the Python
process collectors (a scrape stays small and the names are ours).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterator

from ...errors import DiskwatchError
from . import COUNTER, GAUGE, LATENCY_BOUNDS, MetricsSink, families

log = logging.getLogger("diskwatch.metrics")


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


#: scrapes served at once; a connection beyond them is closed at once
MAX_CLIENTS = 8
#: a connection that has not sent its request (or read its reply) by then is dropped
CLIENT_TIMEOUT = 10.0


def _bounded_server_class(family: int):
    """A WSGI server whose threads and idle connections are bounded.

    prometheus_client's own ``start_http_server`` starts a thread per
    connection with no timeout: a local client opening connections and
    sending nothing would grow the process without limit. Here at most
    MAX_CLIENTS connections are served at once (the rest are closed as they
    come) and each gets CLIENT_TIMEOUT seconds."""
    import socket
    import socketserver
    import threading
    from wsgiref.simple_server import WSGIServer

    class BoundedWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
        address_family = family
        daemon_threads = True
        block_on_close = False
        max_clients = MAX_CLIENTS
        # socketserver's default backlog of 5 makes a burst of connections
        # wait for SYN retransmits (seconds) instead of being refused at once
        request_queue_size = 128

        def __init__(self, *args, **kwargs) -> None:
            self.slots = threading.BoundedSemaphore(self.max_clients)
            super().__init__(*args, **kwargs)

        def server_bind(self) -> None:
            if self.address_family == socket.AF_INET6:
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            super().server_bind()

        def process_request(self, request, client_address) -> None:
            if not self.slots.acquire(blocking=False):
                self.shutdown_request(request)
                return
            try:
                super().process_request(request, client_address)
            except BaseException:
                self.slots.release()
                raise

        def process_request_thread(self, request, client_address) -> None:
            try:
                super().process_request_thread(request, client_address)
            finally:
                self.slots.release()

        def handle_error(self, request, client_address) -> None:
            # A client that timed out or went away: not worth a traceback on
            # the person's terminal (socketserver prints one by default).
            log.debug("metrics endpoint: connection from %s failed", client_address,
                      exc_info=True)

    return BoundedWSGIServer


def _quiet_handler():
    from wsgiref.simple_server import WSGIRequestHandler

    class QuietHandler(WSGIRequestHandler):
        timeout = CLIENT_TIMEOUT  # StreamRequestHandler sets it on the socket

        def log_message(self, *args) -> None:  # no line on stderr per scrape
            pass

    return QuietHandler


class MetricsServer:
    """The HTTP endpoint, in its own daemon thread; ``close()`` stops it.
    Bounded: at most MAX_CLIENTS scrapes at once, CLIENT_TIMEOUT each."""

    def __init__(self, sink: MetricsSink, host: str, port: int) -> None:
        try:
            from prometheus_client import CollectorRegistry, make_wsgi_app
        except ImportError as e:
            raise MetricsAddressError("--metrics needs prometheus_client: pip install "
                                      "prometheus_client") from e
        import socket
        import threading
        from wsgiref.simple_server import make_server
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SinkCollector(sink))
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
            self._server = make_server(host, port, make_wsgi_app(self.registry),
                                       _bounded_server_class(family),
                                       handler_class=_quiet_handler())
        except OSError as e:
            raise OSError(e.errno, f"--metrics: cannot listen on {host}:{port}: "
                          f"{e.strerror}") from None
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="diskwatch-metrics", daemon=True)
        self._thread.start()
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
