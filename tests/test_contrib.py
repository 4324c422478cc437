"""contrib/: the Grafana dashboard, the Prometheus alert rules and the systemd
units are checked by the tools that will read them (promtool,
systemd-analyze), and the dashboard asks only for metrics diskwatch exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from fixtures_server import DISKWATCH

from diskwatch.sinks.metrics import METRICS

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"
DASHBOARD = CONTRIB / "grafana" / "diskwatch-dashboard.json"
ALERTS = CONTRIB / "prometheus" / "diskwatch-alerts.yml"

_METRIC = re.compile(r"\bdiskwatch_[a-z_]+\b")
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard: panels' targets and variables."""
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        q = var.get("query")
        if isinstance(q, dict):
            exprs.append(q["query"])
    return exprs


def exported(name: str) -> bool:
    if name in METRICS:
        return True
    for suffix in _HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and METRICS.get(base, ("",))[0] == "histogram":
            return True
    return False


def test_dashboard_loads_and_uses_only_exported_metrics():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    exprs = dashboard_queries()
    assert len(exprs) >= 10
    used = {m for e in exprs for m in _METRIC.findall(e)}
    unknown = sorted(m for m in used if not exported(m))
    assert not unknown, f"the dashboard asks for metrics diskwatch does not export: {unknown}"
    # the view an operator opens it for: churn per file, partition, directory, latency
    for needed in ("diskwatch_file_requests_total", "diskwatch_partition_bytes_total",
                   "diskwatch_directory_requests_total",
                   "diskwatch_request_duration_seconds_bucket"):
        assert needed in used
    # panels do not overlap on Grafana's 24-column grid
    cells = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine


def test_alert_rules_use_exported_metrics():
    used = set(_METRIC.findall(ALERTS.read_text()))
    assert used and all(exported(m) for m in used), used


def test_alert_rules_pass_promtool():
    """The rule file parses, and the churn alert fires on a file written
    10 times a second for 10 minutes (not before, not for 'other')."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: apt-get install prometheus"
    r = subprocess.run([promtool, "check", "rules", ALERTS.name], cwd=ALERTS.parent,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([promtool, "test", "rules", "diskwatch-alerts.test.yml"],
                       cwd=ALERTS.parent, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("unit", ["diskwatch@.service", "diskwatch@.socket"])
def test_systemd_units_verify(unit, tmp_path):
    """systemd-analyze reads the units as systemd would (an instance of the
    template, ExecStart pointing at this diskwatch)."""
    for name in ("diskwatch@.service", "diskwatch@.socket"):
        text = (CONTRIB / "systemd" / name).read_text()
        text = text.replace("/usr/local/bin/diskwatch", DISKWATCH)
        (tmp_path / name.replace("@.", "@guest1.")).write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", "--man=no",
                        str(tmp_path / unit.replace("@.", "@guest1."))],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
