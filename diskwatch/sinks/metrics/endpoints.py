"""The metrics sink of a live session with its ends: the Prometheus
endpoint (--metrics [ADDR:]PORT) and the OTLP exporter (--otlp URL), each
said once in the journal (or on stderr) where it serves or sends."""

from __future__ import annotations

import contextlib
from typing import Any

from ...errors import closer
from ...journal import notice
from . import MetricsSink


def add_metrics(pump: Any, sizes: dict[str, int], undo: contextlib.ExitStack, *, top: int,
                refresh: float, address: str | None = None,
                otlp: str | None = None) -> MetricsSink:
    """The sink (``sizes``: bytes per export), added to ``pump``, and its
    ends, whose closing goes on ``undo``: pushed before the pump's close
    there, they stop after it, so the final export has the final counts."""
    sink = pump.add(MetricsSink(sizes, top=top, refresh=refresh))
    if address is not None:
        from .prometheus import MetricsServer, parse_address
        server = MetricsServer(sink, *parse_address(address))
        undo.callback(server.close)
        notice(f"metrics at {server.url}", DISKWATCH_EVENT="metrics",
               DISKWATCH_METRICS_URL=server.url)
    if otlp:
        from .otlp import OtlpExporter, export_interval
        exporter = OtlpExporter(sink, otlp, interval=export_interval())
        undo.push(closer(exporter.close))
        notice(f"metrics to OTLP {exporter.url} every {exporter.interval:g}s",
               DISKWATCH_EVENT="otlp", DISKWATCH_OTLP_URL=exporter.url)
    return sink
