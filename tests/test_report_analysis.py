"""Issue 12, items 4-6 as plain unit tests: the report's definitions on a
known map and known requests (the guest boots in test_report_guest.py show
the same on real sessions)."""

from __future__ import annotations

import json
import random
import xml.etree.ElementTree as ET

import pytest

from diskwatch.bmap.format import BmapEntry
from diskwatch.bmap.index import BlockMap
from diskwatch.events import Command, make_request
from diskwatch.report.analysis import analyse, compare
from diskwatch.report.inputs import Recording
from diskwatch.report.render import (
    compare_json,
    report_json,
    write_compare_text,
    write_text,
)
from diskwatch.report.svg import PictureBins, render_svg
from diskwatch.text import safe_text
from diskwatch.units import format_duration

MiB = 1 << 20
R, W, FLUSH = int(Command.READ), int(Command.WRITE), int(Command.FLUSH)
EVIL = "/tmp/\x1b]0;pwned\x07\x1b[2J"


def entries():
    e = BmapEntry
    return [
        e(1, 0, 64 * MiB, "v", "/dev/sda"),
        e(1, MiB, 60 * MiB, "p", "/dev/sda1"),
        e(1, 2 * MiB, 2 * MiB + 4096, "d", "/dev/sda1", "/"),
        e(1, 3 * MiB, 3 * MiB + 4096, "d", "/dev/sda1", "/var/log"),
        e(1, 4 * MiB, 4 * MiB + 65536, "f", "/dev/sda1", "/var/log/a.log"),
        e(1, 10 * MiB, 12 * MiB, "f", "/dev/sda1", "/bin/busybox"),
        e(1, 20 * MiB, 21 * MiB, "f", "/dev/sda1", "/bin/busybox"),
        e(1, 30 * MiB, 30 * MiB + 4096, "f", "/dev/sda1", "/etc/motd"),
        e(1, 31 * MiB, 31 * MiB + 4096, "f", "/dev/sda1", EVIL),
    ]


def req(t, cmd, offset, length, duration=0.001, error=0):
    return make_request((1, "", cmd, offset, length, 0, t, duration, error))


def boot(extra_delay=0.0, antivirus=False):
    """A boot: busybox read in two extents, motd, a log appended 4 times
    (each append two requests 10 ms apart and the directory between: one burst), metadata, a flush,
    and a write where the map has nothing. With ``antivirus``, every file
    is read once more, plus a signature file, and things take longer."""
    d = extra_delay
    reqs = [
        req(0.0, R, 2 * MiB, 4096),                      # the root directory
        req(0.1 + d, R, 10 * MiB, 2 * MiB, 0.010),     # busybox, first extent
        req(0.2 + d, R, 20 * MiB, MiB, 0.020),         # busybox, second extent
        req(0.5 + 2 * d, R, 30 * MiB, 4096, 0.002),    # motd
        req(0.6 + 2 * d, R, MiB + 4096, 4096),         # partition metadata (superblock...)
        req(0.7 + 2 * d, R, 31 * MiB, 4096),           # the file with an evil name
    ]
    for i in range(4):
        t = 1.0 + i + 2 * d
        reqs += [req(t, W, 4 * MiB + i * 512, 512), req(t + 0.005, W, 3 * MiB, 4096)]
        reqs += [req(t + 0.01, W, 4 * MiB + i * 512, 512)]
    reqs += [req(5.0 + 2 * d, FLUSH, 0, 0), req(5.1 + 2 * d, W, 62 * MiB, 8192)]
    if antivirus:
        reqs += [req(5.5 + 2 * d, R, 10 * MiB, 2 * MiB), req(5.6 + 2 * d, R, 40 * MiB, 4096)]
    reqs.sort(key=lambda r: r.start)
    return Recording(requests=reqs, source="test boot", size=64 * MiB)


@pytest.fixture(scope="module")
def blockmap():
    return BlockMap(entries())


def test_top_churn_timeline_unmapped_and_latency(blockmap):
    a = analyse(boot(), blockmap)
    assert a.requests == 20 and a.by_command["flush"] == [1, 0]
    top = a.top_files("read_bytes", 3)
    assert [n for n, _ in top] == ["f /dev/sda1 /bin/busybox", "f /dev/sda1 /etc/motd",
                                   f"f /dev/sda1 {EVIL}"]
    assert top[0][1].read_bytes == 3 * MiB and top[0][1].reads == 2
    # the log: 8 write requests in 4 bursts, one a second
    (churn_log, churn_dir) = a.churn()
    assert churn_log.name == "f /dev/sda1 /var/log/a.log"
    assert (churn_log.bursts, churn_log.writes, churn_log.write_bytes) == (4, 8, 4096)
    assert churn_log.period == pytest.approx(1.0) and churn_log.per_minute == pytest.approx(60)
    assert churn_dir.name == "d /dev/sda1 /var/log" and churn_dir.bursts == 4
    # directories sum their subtree (the filesystem's root left out)
    dirs = dict(a.top_dirs("write_bytes"))
    assert dirs["d /dev/sda1 /var/log"].write_bytes == 4096 + 4 * 4096
    assert dirs["d /dev/sda1 /var"].write_bytes == 4096 + 4 * 4096
    assert dict(a.top_dirs("read_bytes"))["d /dev/sda1 /bin"].read_bytes == 3 * MiB
    # first access, in order
    assert [(t, op, n.split(" ", 2)[2]) for t, op, n in a.timeline()] == [
        (0.0, "read", "/"), (0.1, "read", "/bin/busybox"), (0.5, "read", "/etc/motd"),
        (0.7, "read", EVIL), (1.0, "write", "/var/log/a.log"), (1.005, "write", "/var/log")]
    # the 8 KiB write past the partition's end: only the disk (v) covers it
    assert a.unmapped.write_bytes == 0
    assert a.partition_only.read_bytes == 4096 and a.partition_only.write_bytes == 8192
    lat = {(r.type, r.op): r for r in a.latency_rows()}
    assert lat[("file", "read")].count == 4
    assert lat[("file", "read")].p50 == pytest.approx(0.002)
    assert lat[("file", "read")].max == pytest.approx(0.020)
    assert lat[("-", "flush")].count == 1


def test_text_and_json(blockmap, tmp_path):
    import io
    a = analyse(boot(), blockmap)
    buf = io.StringIO()
    write_text(a, buf)
    text = buf.getvalue()
    assert "\x1b" not in text and "\x07" not in text
    assert safe_text(EVIL) in text
    for title in ("Files, most bytes read", "Churn", "First access", "does not name", "Latency"):
        assert title in text
    churn_part = text.split("Churn")[1].split("\n")
    assert "/var/log/a.log" in churn_part[2]  # the first row under the heading
    doc = json.loads(json.dumps(report_json(a)))
    assert doc["schema"] == "diskwatch-report/1"
    assert doc["objects"][0]["name"] == "f /dev/sda1 /bin/busybox"
    assert doc["churn"][0]["bursts"] == 4
    assert doc["timeline"][1] == {"t": 0.1, "op": "read", "name": "f /dev/sda1 /bin/busybox"}
    assert any(o["path"] == EVIL for o in doc["objects"])  # JSON keeps names as they are


def test_without_a_map_the_totals_and_latency_remain():
    import io
    a = analyse(boot(), None)
    buf = io.StringIO()
    write_text(a, buf)
    assert "give --bmap" in buf.getvalue()
    assert a.read_bytes == 4096 * 4 + 3 * MiB and not a.objects
    # busy places by 1 MiB region: busybox's first extent (2 MiB read from 10 MiB) leads
    (start, end, t), *_ = a.top_regions("bytes")
    assert (start, end, t.read_bytes, t.reads) == (10 * MiB, 11 * MiB, 2 * MiB, 1)
    assert "0xa00000-0xb00000" in buf.getvalue()
    assert report_json(a)["regions"][0]["start"] == 10 * MiB


def test_compare_shows_what_the_other_run_touched_and_how_late(blockmap):
    e = entries() + [BmapEntry(1, 40 * MiB, 40 * MiB + 4096, "f", "/dev/sda1",
                               "/av/signatures.db")]
    bm_b = BlockMap(e)
    c = compare(analyse(boot(), blockmap), analyse(boot(0.5, antivirus=True), bm_b))
    assert [n for n, _ in c.only_b] == ["f /dev/sda1 /av/signatures.db"]
    assert c.only_a == []
    assert c.changed[0].name == "f /dev/sda1 /bin/busybox"
    assert c.changed[0].delta_bytes == 2 * MiB
    ms = {m.name: m for m in c.milestones}
    assert ms["f /dev/sda1 /etc/motd"].delta == pytest.approx(1.0)
    assert ms["f /dev/sda1 /bin/busybox"].delta == pytest.approx(0.5)
    # both runs touch the disk first at 0: the same counted from there
    assert ms["f /dev/sda1 /etc/motd"].delta_from_first == pytest.approx(1.0)
    late = Recording(requests=[r._replace(start=r.start + 20) for r in boot(0.5).requests],
                     size=64 * MiB)
    m = {m.name: m for m in compare(c.a, analyse(late, bm_b)).milestones}
    assert m["f /dev/sda1 /etc/motd"].delta == pytest.approx(21.0)
    assert m["f /dev/sda1 /etc/motd"].delta_from_first == pytest.approx(1.0)
    named = compare(c.a, c.b, ["/etc/motd"])
    assert [m.name for m in named.milestones] == ["f /dev/sda1 /etc/motd"]
    import io
    buf = io.StringIO()
    write_compare_text(c, buf)
    assert "Touched by B only: 1 files" in buf.getvalue()
    assert compare_json(c)["only_b"][0]["name"] == "f /dev/sda1 /av/signatures.db"


def test_svg_is_a_document_with_axes_partitions_and_a_labelled_file(blockmap):
    rec = boot()
    a = analyse(rec, blockmap)
    bins = PictureBins(rec.disk_size())
    bins.add_requests(rec.requests)
    files = sorted(((o, t.bytes) for o, t in a.objects.items() if o.type == "f"),
                   key=lambda ob: -ob[1])
    svg = render_svg(bins, title=f"boot {EVIL}", blockmap=blockmap, files=files)
    root = ET.fromstring(svg)  # well-formed, whatever the names held
    ns = {"s": "http://www.w3.org/2000/svg"}
    time_ticks = [t.text for t in root.findall("s:g[@id='time-axis']/s:text", ns)]
    assert "0" in time_ticks and "5" in time_ticks and "time (s)" in time_ticks
    offset_ticks = [t.text for t in root.findall("s:g[@id='offset-axis']/s:text", ns)]
    assert "0 B" in offset_ticks and "64 MiB" in offset_ticks
    parts = root.findall(".//s:rect[@class='partition']", ns)
    assert [p.get("data-name") for p in parts] == ["p /dev/sda1"]
    labels = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")
              if t.get("class") == "file-label"]
    assert any(label.startswith("/bin/busybox") for label in labels), labels
    bands = {p.get("data-name") for p in root.findall(".//s:path[@class='file-band']", ns)}
    assert "f /dev/sda1 /bin/busybox" in bands
    assert root.find(".//s:g[@class='reads']/s:path", ns) is not None
    assert root.find(".//s:g[@class='writes']/s:path", ns) is not None
    assert root.find(".//s:polyline[@class='read-rate']", ns) is not None
    assert "\x1b" not in svg


def test_svg_size_is_bounded_whatever_the_number_of_requests():
    rnd = random.Random(1)
    size = 8 << 30
    bins = PictureBins(size)
    # random reads and writes over the whole disk for 20 minutes, fed as the
    # pump feeds batches
    flood = [req(i * 0.012, R if i % 3 else W, rnd.randrange(size // 4096) * 4096, 4096)
             for i in range(100_000)]
    for i in range(0, len(flood), 5000):
        bins.add_requests(flood[i:i + 5000])
    assert bins.width > 1.0 and bins.used <= bins.cols
    svg = render_svg(bins, title="flood")
    root = ET.fromstring(svg)
    elements = sum(1 for _ in root.iter())
    assert elements < 2 * bins.rows * 4 + 400
    assert len(svg) < 3_000_000


def test_svg_cuts_a_long_idle_stretch_out_of_the_time_axis():
    """A boot's firmware and kernel time (no disk requests) is a labelled
    break, not three quarters of the picture."""
    bins = PictureBins(64 * MiB)
    bins.add(0.2, R, 0, 512)  # qemu probes the disk as it starts
    for i in range(40):  # then, 30 s later, the boot reads
        bins.add(30.0 + i * 0.05, R, 10 * MiB + i * 65536, 65536)
    root = ET.fromstring(render_svg(bins, title="boot"))
    ns = {"s": "http://www.w3.org/2000/svg"}
    (label,) = root.findall(".//s:text[@class='time-break-label']", ns)
    idle = float(label.text.split()[0])
    assert 28 <= idle <= 30
    ticks = [float(t.text) for t in root.findall("s:g[@id='time-axis']/s:text", ns)
             if t.text.replace(".", "").isdigit()]
    assert ticks[0] == 0 and 30 in ticks and 31 in ticks and not any(5 <= t <= 25 for t in ticks)


def test_the_command_writes_text_json_svg_and_png(tmp_path, capsys):
    """`diskwatch report` end to end on a JSON-lines recording and a map file."""
    from diskwatch.bmap.format import write_bmap
    from diskwatch.cli import main
    from diskwatch.events import COMMAND_NAMES
    bmap = tmp_path / "disk.bmap"
    write_bmap(bmap, entries())
    rec = tmp_path / "boot.jsonl"
    with open(rec, "w") as f:
        for r in boot().requests:
            f.write(json.dumps({"t": r.start, "conn": 1, "export": "", "op": COMMAND_NAMES[r.command],
                                "offset": r.offset, "length": r.length, "flags": 0,
                                "duration": r.duration, "error": 0}) + "\n")
    assert main(["report", str(rec), "--bmap", str(bmap)]) == 0
    text = capsys.readouterr().out
    assert "Churn" in text and "\x1b" not in text
    assert main(["report", str(rec), "--bmap", str(bmap), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["churn"][0]["name"].endswith("/var/log/a.log")
    svg, png = tmp_path / "p.svg", tmp_path / "p.png"
    assert main(["report", str(rec), "--bmap", str(bmap), "--svg", str(svg), "--png", str(png)]) == 0
    assert ET.parse(svg).getroot().tag == "{http://www.w3.org/2000/svg}svg"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    planted = tmp_path / "planted.svg"
    planted.symlink_to(tmp_path / "victim")
    assert main(["report", str(rec), "--svg", str(planted)]) == 1
    err = capsys.readouterr().err
    assert "symbolic link" in err and err.count("\n") == 1
    assert not (tmp_path / "victim").exists()
    assert main(["report", str(tmp_path / "missing.rec")]) == 1
    assert capsys.readouterr().err.count("\n") == 1


def test_churn_puts_the_guests_files_before_the_filesystems_structures():
    """Every sync commits the journal, so it churns more than any file: it is
    listed after the files that cause it, in its own table."""
    import io
    bm = BlockMap(entries() + [BmapEntry(1, 50 * MiB, 51 * MiB, "f", "/dev/sda1", "/$Journal")])
    reqs = []
    for i in range(4):
        reqs += [req(1.0 + i, W, 4 * MiB + i * 512, 512), req(1.001 + i, FLUSH, 0, 0)]
        reqs += [req(1.002 + i, W, 50 * MiB + i * 8192, 8192), req(1.003 + i, FLUSH, 0, 0)]
        reqs += [req(1.004 + i, W, 50 * MiB + i * 8192 + 4096, 4096), req(1.005 + i, FLUSH, 0, 0)]
    a = analyse(Recording(requests=reqs, source="sync", size=64 * MiB), bm)
    rows = a.churn()
    assert [(c.name, c.bursts, c.fs_structure) for c in rows if c.type == "file"] == [
        ("f /dev/sda1 /var/log/a.log", 4, False), ("f /dev/sda1 /$Journal", 8, True)]
    assert rows[-1].name == "f /dev/sda1 /$Journal"
    buf = io.StringIO()
    write_text(a, buf)
    text = buf.getvalue()
    assert text.index("/var/log/a.log", text.index("Churn")) < text.index(
        "The filesystem's own structures written again") < text.index("/$Journal", text.index("Churn"))
    assert report_json(a)["churn"][-1]["fs_structure"] is True
    # and in the top tables: the guest's files, then the structures in their own
    assert [n for n, _ in a.top_files("write_bytes")] == ["f /dev/sda1 /var/log/a.log"]
    assert [n for n, _ in a.top_files("write_bytes", fs_structures=True)] == [
        "f /dev/sda1 /$Journal"]


def test_a_diskwatch_recording_is_read_again_for_each_pass(tmp_path, capsys):
    """--record's own format: the report and the picture each read the file
    (nothing held in memory between); a file without its closing frame (a
    crash) reads as cut short."""
    from diskwatch.cli import main
    from diskwatch.recording.format import RecordingHeader
    from diskwatch.recording.writer import Recorder
    path = tmp_path / "boot.rec"
    recorder = Recorder(str(path), RecordingHeader(source="file boot.img", size=64 * MiB))
    requests = list(boot().requests)
    recorder.feed(requests[:10], None)
    recorder.flush()
    recorder.feed(requests[10:], None)
    recorder.close()
    svg = tmp_path / "boot.svg"
    assert main(["report", str(path), "--json", "--svg", str(svg)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["requests"], doc["origin"], doc["truncated"]) == (len(requests), "diskwatch", False)
    assert doc["read_bytes"] == 4096 * 4 + 3 * MiB
    root = ET.parse(svg).getroot()
    assert root.find(".//{http://www.w3.org/2000/svg}g[@class='reads']/"
                     "{http://www.w3.org/2000/svg}path") is not None
    cut = tmp_path / "cut.rec"
    data = path.read_bytes()
    cut.write_bytes(data[:data.rindex(b"META")])  # as if killed before closing
    assert main(["report", str(cut), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["truncated"] is True


def test_the_recorded_map_path_is_shown_as_text(tmp_path, capsys):
    """The map path comes from the recording (someone else's file): told on
    stderr, its escapes are shown, never sent to the terminal."""
    from diskwatch.bmap.format import write_bmap
    from diskwatch.cli import main
    from diskwatch.recording.format import RecordingHeader, map_identity
    from diskwatch.recording.writer import Recorder
    bmap = tmp_path / "map\x1b]0;owned\x07.bmap"
    write_bmap(str(bmap), [BmapEntry(1, 0, MiB, "f", "/dev/sda1", "/a")])
    path = tmp_path / "boot.rec"
    recorder = Recorder(str(path), RecordingHeader(source="file boot.img", size=64 * MiB,
                                                   bmap=map_identity(str(bmap))))
    recorder.feed(list(boot().requests), None)
    recorder.close()
    assert main(["report", str(path)]) == 0
    err = capsys.readouterr().err
    assert "naming with the block map it was recorded with" in err
    assert "\x1b" not in err and "\x07" not in err and "\\x1b]0;owned\\x07" in err


def test_latency_per_file_is_its_requests_p50_and_p99(blockmap):
    """Issue 21 item 5: p50/p99 (nearest rank) of the requests that touched
    each file, a request counted once however many of its pieces it has."""
    import io
    reqs = list(boot().requests)
    # one request over both of busybox's extents would be two pieces: still one request
    reqs.append(req(6.0, R, 10 * MiB, 11 * MiB, 0.040))  # busybox's first extent and beyond
    reqs.sort(key=lambda r: r.start)
    a = analyse(Recording(requests=reqs, source="t", size=64 * MiB), blockmap)
    busybox = next(t for o, t in a.objects.items() if o.path == "/bin/busybox")
    assert busybox.latency_seen == 3
    assert busybox.latency_percentiles() == (pytest.approx(0.020), pytest.approx(0.040))
    rows = a.slowest_files(3)
    assert [r[0] for r in rows] == ["f /dev/sda1 /bin/busybox", "f /dev/sda1 /etc/motd",
                                    "f /dev/sda1 /var/log/a.log"]
    doc = report_json(a)
    by_name = {o["name"]: o for o in doc["objects"]}
    assert by_name["f /dev/sda1 /etc/motd"]["latency"] == {
        "requests": 1, "p50": pytest.approx(0.002), "p99": pytest.approx(0.002)}
    buf = io.StringIO()
    write_text(a, buf)
    part = buf.getvalue().split("Files, slowest requests")[1].split("\n")
    cols = f"{format_duration(0.020)} {format_duration(0.040)} 3".split()
    assert "/bin/busybox" in part[2] and part[2].split()[:len(cols)] == cols


def test_latency_samples_are_bounded_and_stay_representative():
    """However many requests a file has, at most LATENCY_SAMPLES latencies
    are kept (a uniform sample), and its percentiles stay close to the truth."""
    from diskwatch.report.analysis import LATENCY_SAMPLES
    bm = BlockMap(entries())
    rng = random.Random(7)
    durations = [rng.expovariate(1000) for _ in range(20_000)]  # mean 1 ms
    reqs = [req(i * 1e-4, R, 10 * MiB, 4096, d) for i, d in enumerate(durations)]
    a = analyse(Recording(requests=reqs, source="t", size=64 * MiB), bm)
    t = next(t for o, t in a.objects.items() if o.path == "/bin/busybox")
    assert t.latency_seen == 20_000 and len(t.latency) == LATENCY_SAMPLES
    s = sorted(durations)
    p50, p99 = t.latency_percentiles()
    # the sample's quantiles, within a few percentile points of the population's
    assert s[int(0.45 * len(s))] < p50 < s[int(0.55 * len(s))]
    assert s[int(0.97 * len(s))] < p99 <= s[-1]
    again = next(t2 for o, t2 in analyse(Recording(requests=reqs, source="t", size=64 * MiB),
                                          bm).objects.items() if o.path == "/bin/busybox")
    assert again.latency_percentiles() == (p50, p99)
