"""Metrics for monitoring systems: Prometheus (``--metrics``) and OTLP (``--otlp``).

``MetricsSink`` (aggregate.py) is a session sink that keeps plain counters;
``families(snapshot)`` turns a snapshot of them into the metric families
below, which both exporters publish unchanged (prometheus.py at scrape
time, otlp.py on its export timer). Names are Prometheus's (OTLP gets the
same names without ``_total``, as OpenTelemetry spells counters).

Cardinality is bounded whatever the guest does (``series_bound``): commands,
errnos and buckets are fixed sets; partitions come from the block map and
stop at ``MAX_PARTITIONS`` ("other" beyond); top-level directories and files
are each at most ``top`` series and an "other" series (see topn.py: a
heavy-hitters sketch picks the busiest; counting stays exact).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from ...wire import COMMAND_NAMES, DATA_COMMANDS
from .aggregate import (
    LATENCY_BOUNDS,
    OPS,
    OTHER,
    MetricsSink,
    Snapshot,
    series_bound,
)

__all__ = ["MetricsSink", "Snapshot", "Family", "families", "METRICS", "series_bound",
           "LATENCY_BOUNDS"]

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

#: every metric diskwatch exports: name -> (kind, labels, help). Counter names
#: end in _total (Prometheus's spelling; OTLP drops the suffix).
METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "diskwatch_requests_total": (
        COUNTER, ("export", "command"), "NBD requests answered, by command"),
    "diskwatch_bytes_total": (
        COUNTER, ("export", "command"),
        "Bytes of the disk that read, write, trim, zero and cache requests covered"),
    "diskwatch_errors_total": (
        COUNTER, ("export", "command", "errno"), "Requests answered with an error, by errno"),
    "diskwatch_request_duration_seconds": (
        HISTOGRAM, ("export", "command"),
        "Time from a request's arrival until its reply was queued"),
    "diskwatch_connections": (GAUGE, ("export",), "Client connections open now"),
    "diskwatch_connections_opened_total": (
        COUNTER, ("export",), "Client connections that reached the transmission phase"),
    "diskwatch_export_size_bytes": (GAUGE, ("export",), "Size of the export"),
    "diskwatch_dropped_requests_total": (
        COUNTER, (), "Requests not counted because the consumer could not keep up"),
    "diskwatch_partition_requests_total": (
        COUNTER, ("partition", "op"),
        "Requests touching a partition, LV or device (block map); 'unmapped': no object, "
        "'other': past the partition limit"),
    "diskwatch_partition_bytes_total": (
        COUNTER, ("partition", "op"), "Bytes of requests inside a partition (block map)"),
    "diskwatch_directory_requests_total": (
        COUNTER, ("partition", "directory", "op"),
        "Requests touching a top-level directory's files and blocks; the busiest only, "
        "the rest as directory='other'"),
    "diskwatch_directory_bytes_total": (
        COUNTER, ("partition", "directory", "op"),
        "Bytes inside a top-level directory; the busiest only, the rest as 'other'"),
    "diskwatch_file_requests_total": (
        COUNTER, ("partition", "path", "op"),
        "Requests touching a file; the busiest files only, the rest as path='other'"),
    "diskwatch_file_bytes_total": (
        COUNTER, ("partition", "path", "op"),
        "Bytes inside a file; the busiest files only, the rest as path='other'"),
    "diskwatch_journal_carried_bytes_total": (
        COUNTER, ("partition", "path"),
        "Bytes the filesystem's journal wrote carrying a file's or directory's metadata "
        "(ext3/4, named by live remaps); the busiest only, the rest as path='other'"),
}


@dataclass
class Family:
    """One metric and its samples, independent of the exporter.

    Counters and gauges: ``samples`` of (label values, value). Histograms:
    (label values, (bucket counts per LATENCY_BOUNDS and +Inf, not
    cumulative), sum)."""

    name: str
    kind: str
    labels: tuple[str, ...]
    help: str
    samples: list = field(default_factory=list)


def _family(name: str) -> Family:
    kind, labels, text = METRICS[name]
    return Family(name, kind, labels, text)


def _object_samples(requests: Family, nbytes: Family, key: tuple[str, ...],
                    counts: list[int], every_op: bool = False) -> None:
    for i, op in enumerate(OPS):
        # A top-N member has a series per op from the moment it is one, at 0
        # (so the first increase counts); a partition only for ops it saw.
        if every_op or counts[i] or counts[i + 4]:
            requests.samples.append(((*key, op), counts[i]))
            nbytes.samples.append(((*key, op), counts[i + 4]))


def families(snap: Snapshot) -> Iterator[Family]:
    """The metric families of a snapshot, in METRICS order."""
    f = {name: _family(name) for name in METRICS}
    for export, c in snap.exports.items():
        f["diskwatch_connections"].samples.append(((export,), c.connections))
        f["diskwatch_connections_opened_total"].samples.append(((export,), c.connections_total))
        f["diskwatch_export_size_bytes"].samples.append(((export,), c.size))
        for cmd, name in enumerate(COMMAND_NAMES):
            if not c.ops[cmd]:
                continue
            f["diskwatch_requests_total"].samples.append(((export, name), c.ops[cmd]))
            if cmd in DATA_COMMANDS:
                f["diskwatch_bytes_total"].samples.append(((export, name), c.bytes[cmd]))
            buckets = c.buckets[cmd]
            if buckets is not None:
                f["diskwatch_request_duration_seconds"].samples.append(
                    ((export, name), buckets, c.seconds[cmd]))
        for (cmd, errno_name), n in sorted(c.errors.items()):
            f["diskwatch_errors_total"].samples.append(
                ((export, COMMAND_NAMES[cmd], errno_name), n))
    f["diskwatch_dropped_requests_total"].samples.append(((), snap.dropped))
    if snap.mapped:
        preq, pbytes = f["diskwatch_partition_requests_total"], f["diskwatch_partition_bytes_total"]
        for label, counts in snap.partitions.items():
            _object_samples(preq, pbytes, (label,), counts)
        for prefix, members, other in (
                ("directory", snap.directories, snap.directories_other),
                ("file", snap.files, snap.files_other)):
            req = f[f"diskwatch_{prefix}_requests_total"]
            nbytes = f[f"diskwatch_{prefix}_bytes_total"]
            for key, counts in members.items():
                _object_samples(req, nbytes, tuple(key.split("\0", 1)), counts, every_op=True)
            _object_samples(req, nbytes, ("", OTHER), other, every_op=True)
        if snap.journal or snap.journal_other:
            carried = f["diskwatch_journal_carried_bytes_total"]
            for key, n in sorted(snap.journal.items()):
                carried.samples.append((tuple(key.split("\0", 1)), n))
            carried.samples.append((("", OTHER), snap.journal_other))
    yield from f.values()
