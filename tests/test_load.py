"""Load: 64 libnbd clients at once with mixed reads and writes for a few
seconds (benchmarks/bench_load.py's run, lighter): every read checked
against each client's model as it goes, every region read back, the image
compared once the server exited; no client starved."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from fixtures_server import DISKWATCH

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from bench_load import report, run_load  # noqa: E402

pytest.importorskip("nbd")


@pytest.mark.slow
@pytest.mark.timeout(300, method="thread")
def test_64_clients_mixed_reads_and_writes(tmp_path):
    r = run_load([DISKWATCH], str(tmp_path), clients=64, seconds=6, region=1 << 20)
    print("\n" + report(r))
    assert not r["errors"], r["errors"][:5]
    assert r["writes"] > 64 and r["reads"] > 64
    assert r["rate_min"] > 0  # every client got through
    assert r["peak_rss"] < 256 << 20
