"""Sinks: what the pump feeds (pipeline/sink.py says what a sink is).

    text_trace.py  the text trace (--headless on stdout, --log FILE)
    summary.py     the exit summary of --headless
    stats.py       the aggregates the summary and the UI's views keep
    metrics/       the metrics sink and its Prometheus and OTLP ends
    tree.py        the tree of the traffic (the UI's d view)
    activity.py    scans and churn as they happen (the UI's activity lines)

Elsewhere, because their home is their job: the recorder
(recording/writer.py), the remapper (remap.py, which drives the mapper),
late naming (late.py, a sink every session has) and the UI (ui/), which
is fed by the same pump. A new sink is a module here with a class that
subclasses ``SinkBase``, and a line in the runner (or ``add_text_sinks``)
that adds it.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from .summary import Summary
from .text_trace import TextTrace


def add_text_sinks(pump: Any, *, size: int, blockmap: Any, t0: float, headless: bool,
                   no_trace: bool = False, log: IO[str] | None = None,
                   trace_out: IO[str] | None = None,
                   devices: dict[str, str] | None = None) -> Summary | None:
    """The text sinks a live session and a replay both have: the trace into
    ``log`` (--log, opened by the caller), else headless into ``trace_out``
    (None: stdout) unless ``no_trace``; headless, the summary, which is returned (printed
    by the caller at exit), else None. ``devices``: a session of several
    disks' devices by export (``Session.devices``), which the trace tells apart."""
    if log is not None:
        pump.add(TextTrace(log, blockmap, t0, disks=devices))
    elif headless and not no_trace:
        pump.add(TextTrace(sys.stdout if trace_out is None else trace_out, blockmap, t0,
                           disks=devices))
    return pump.add(Summary(size)) if headless else None
