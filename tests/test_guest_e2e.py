"""Issue 5: a real Linux guest boots over diskwatch's NBD server, end to end.

The guest (Debian's kernel and initrd, a busybox root on ext4) is built by the
fixtures; its block map is generated with ``diskwatch bmap`` (the default
method: the filesystem's metadata, through diskwatch's own source); then the guest boots under
``qemu-system-x86_64 -accel tcg`` as the captive command, headless and under
the Textual UI driven by a Pilot. What the trace names is checked against what
the guest's init script really does.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures_images import make_map
from pilot_helpers import play_to_end

pytestmark = pytest.mark.slow

DISKWATCH = str(Path(sys.executable).with_name("diskwatch"))
BOOT_TIMEOUT = 300  # TCG on a loaded 2-core machine; a quiet one boots in ~15 s


@pytest.fixture(scope="session")
def churn_map(churn_guest_image, tmp_path_factory):
    return make_map(churn_guest_image.path, tmp_path_factory.mktemp("churn-map") / "churn.bmap")


def is_file(obj) -> bool:
    """A file the guest made or uses; not one of the filesystem's own
    structures (/$Journal, /$InodeTable...: named too, since issue 10)."""
    return obj.type == "f" and not obj.is_structure


def md5(path: Path) -> str:
    return subprocess.run(["md5sum", str(path)], capture_output=True, text=True,
                          check=True).stdout.split()[0]


@pytest.fixture(scope="session")
def headless_boot(guest_image, guest_map, tmp_path_factory):
    """The demo guest booted once, headless, with --log and --record: the
    headless test checks the trace, the report tests read the recording."""
    guest = guest_image.guest
    work = tmp_path_factory.mktemp("headless-boot")
    trace, record = work / "boot.trace", work / "boot.rec"
    before = md5(guest_image.path)
    # `; exit 7` after qemu: the command's status must come back as ours.
    command = guest.qemu_shell_command("$nbd", "tcg") + "; exit 7"
    r = subprocess.run([DISKWATCH, str(guest_image.path), "--snapshot", "--bmap", str(guest_map),
                        "--headless", "--log", str(trace), "--record", str(record),
                        "--run", command],
                       capture_output=True, text=True, timeout=BOOT_TIMEOUT)
    return r, trace, record, before


def test_headless_boot_names_the_files_the_guest_touches(guest_image, headless_boot):
    guest = guest_image.guest
    r, trace, _, before = headless_boot
    assert r.returncode == 7, r.stderr[-2000:]
    console = r.stdout
    assert guest.marker in console, console[-2000:]
    text = trace.read_text()
    lines = text.splitlines()
    read_objs = {m.group(1) for m in re.finditer(r"\] read (f /dev/sda1 [^\[]+?)  \[", text)}
    # The init script, busybox and every data file it reads are named.
    for path in guest.reads:
        assert f"f /dev/sda1 {path}" in read_objs, f"{path} not in the trace:\n{text[:3000]}"
    # Every record the guest appends reaches the disk as a write to the log.
    log_writes = [ln for ln in lines if "] write f /dev/sda1 /var/log/demo.log " in ln]
    assert len(log_writes) >= guest.write_counts["/var/log/demo.log"], text[-3000:]
    # The filesystem's own writes are named too (issue 10): the ext4 journal
    # the guest's commits go to, not "p /dev/sda1".
    journal = [ln for ln in lines if "] write f /dev/sda1 /$Journal " in ln]
    assert journal, text[-3000:]
    written = named = 0
    for m in re.finditer(r"\] write ([fdplv]) ", text):
        written += 1
        named += m.group(1) in "fd"
    print(f"\nboot: {len(journal)} journal writes; {named} of {written} write lines named "
          "below the partition")
    # Before issue 10 most of them were "p /dev/sda1" (measured: 26 of 26 named now).
    assert named >= 0.9 * written, text[-3000:]
    # The headless summary names the most-written file first, and the
    # journal its appends commit to among the filesystem's own.
    assert "most writes: f /dev/sda1 /var/log/demo.log" in r.stderr
    own = [ln for ln in r.stderr.splitlines() if "most writes (the filesystem's own): " in ln]
    assert own and "f /dev/sda1 /$Journal x" in own[0], r.stderr
    # --snapshot: the guest wrote, the image did not change.
    assert md5(guest_image.path) == before


def untimed(text: str) -> list[str]:
    return [re.sub(r"^\[\s*[0-9.]+\] ", "", ln) for ln in text.splitlines()]


def test_replaying_the_boot_prints_the_live_trace(headless_boot):
    """Byte for byte, apart from the time column; the map is the one the
    recording names (its path and hash are in the header)."""
    from diskwatch.recording.reader import open_recording
    live_run, trace, recording, _ = headless_boot
    rec = open_recording(str(recording))
    assert rec.complete and rec.header.dropped == 0 and rec.header.bmap
    r = subprocess.run([DISKWATCH, "replay", str(recording), "--headless"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    live = trace.read_text()
    assert "f /dev/sda1 /sbin/init" in r.stdout
    assert untimed(r.stdout) == untimed(live)
    # the same summary: same counts, same files on top
    summary = [ln for ln in live_run.stderr.splitlines() if "most " in ln]
    assert summary and all(ln in r.stderr for ln in summary)


def test_replaying_the_boot_under_the_pilot_shows_the_same_names(headless_boot, guest_map):
    from diskwatch.bmap.index import BlockMap
    from diskwatch.events import Bus
    from diskwatch.pipeline.session import Pump, Session
    from diskwatch.recording.player import Player
    from diskwatch.recording.reader import open_recording
    from diskwatch.ui.replay import ReplayApp
    from diskwatch.ui.top import TopObjects

    live_run, trace, recording, _ = headless_boot
    player = Player(open_recording(str(recording)), speed=256)
    session = Session(bus=Bus(), size=player.recording.header.size, description="replay",
                      started=0.0,
                      blockmap=BlockMap.load(guest_map), pump=Pump(player), player=player)
    session.pump.blockmap = lambda: session.blockmap
    live = trace.read_text()
    # every file named (the disk's own structures too: /$MBR on /dev/sda)
    live_names = set(re.findall(r"\] (?:read|write) (f /dev/sda\d* [^\[]+?)  \[", live))
    seen = {}

    async def main():
        app = ReplayApp(session, trace_cap=100_000)
        app.trace_model.per_add = 0  # list every request: the test compares them all
        async with app.run_test(size=(140, 44)) as pilot:
            await play_to_end(app, pilot, player, timeout=60)
            seen["trace"] = set(ln.label() for ln in app.trace_model.lines
                                if ln.op in ("read", "write") and ln.type == "f")
            seen["top"] = str(app.query_one(TopObjects).render())
            seen["most"] = "; ".join(f"{o} x{c.reads}" for o, c in app.stats.top(
                "reads", 5, keep=lambda o: o.type in "fd" and not o.is_structure))
            await pilot.press("q")

    asyncio.run(main())
    assert seen["trace"] == live_names
    assert "/bin/busybox" in seen["top"]
    # the live summary's "most reads" line: the same objects, counts, order
    assert f"diskwatch: most reads: {seen['most']}" in live_run.stderr.splitlines()


def _run_ui(image: Path, bmap: Path, command: str, check, size=(140, 44), record=None,
            sinks=(), remap=False, recording: Path | None = None, log: Path | None = None):
    """Boot under the real app (server thread + captive command with captured
    output), wait for the command to exit, then call check(app). ``record``:
    a list that gets every request, from the captive command's start;
    ``sinks``: more sinks for the session's pump, beside the app; ``remap``:
    live remapping as ``diskwatch IMAGE --bmap MAP`` does it (--remap auto);
    ``recording`` and ``log``: what ``--record`` and ``--log`` write."""
    from diskwatch.bmap.index import BlockMap
    from diskwatch.events import Bus
    from diskwatch.pipeline.session import Session
    from diskwatch.server import serve_in_thread
    from diskwatch.server.captive import Captive, captive_env
    from diskwatch.sources import SourceOptions, open_source
    from diskwatch.ui.app import DiskwatchApp

    bus = Bus()
    source = open_source(str(image), SourceOptions(snapshot=True))
    running = serve_in_thread({"": source}, bus)
    session = Session(bus=bus, size=source.size, description=source.description,
                      uri=running.uri, command=command, blockmap=BlockMap.load(bmap))
    captive = Captive(command, captive_env("unix", running.socket_path), capture=True, bus=bus)
    session.stop_command = captive.stop
    if record is not None:
        bus.on_requests(record.extend)  # in the server's thread: one list append per batch
    for sink in sinks:
        session.pump.add(sink)
    log_file = open(log, "w") if log is not None else None  # noqa: SIM115 - closed below
    if log_file is not None:
        from diskwatch.sinks.text_trace import TextTrace
        session.pump.add(TextTrace(log_file, session.blockmap, session.started))
    from diskwatch.runner import RunConfig, Runner
    runner = Runner(RunConfig(remap="auto"), lambda: source)
    if recording is not None:
        from diskwatch.recording.format import RecordingHeader, map_identity
        from diskwatch.recording.writer import Recorder
        runner.recorder = session.pump.add(Recorder(str(recording), RecordingHeader(
            source=source.description, size=source.size, bmap=map_identity(str(bmap)),
            started_monotonic=session.started)).attach(bus))
    if remap:
        runner.add_remapper(session, source)

    def on_exit(status):
        session.exit_status = status
    captive.on_exit = on_exit

    async def main():
        app = DiskwatchApp(session)
        async with app.run_test(size=size) as pilot:
            captive.start()
            deadline = time.monotonic() + BOOT_TIMEOUT
            while captive.wait(0) is None:
                assert time.monotonic() < deadline, "the guest did not power off in time"
                await pilot.pause(0.2)
            # The last batches are published before the command's exit.
            for _ in range(3):
                app.pump()
                await pilot.pause()
            app._refresh_views(force=True)
            await pilot.pause()
            result = check(app, pilot)
            if asyncio.iscoroutine(result):
                await result
            await pilot.press("q")
        return app.return_code

    try:
        code = asyncio.run(main())
    finally:
        if captive.running:
            captive.stop()
        running.stop()
        session.pump.close()  # the last round; the recording and the log closed
        source.close()
        if log_file is not None:
            log_file.close()
    return captive.status, code


def test_ui_shows_the_boot_in_trace_and_top_objects(guest_image, guest_map):
    from diskwatch.ui.output import CommandOutput
    from diskwatch.ui.top import TopObjects
    from diskwatch.ui.trace import TraceView
    guest = guest_image.guest
    seen = {}

    def check(app, pilot):
        seen["trace"] = "\n".join(app.query_one(TraceView).lines_text())
        seen["top_reads"] = str(app.query_one(TopObjects).render())
        seen["writes"] = app.stats.top("writes", 3, keep=is_file)
        # The guest's console, as the output panel holds it: text only (no
        # control character reaches the terminal; diskwatch/text.py).
        seen["console"] = [seg.text for strip in app.query_one(CommandOutput).lines
                           for seg in strip]

    status, code = _run_ui(guest_image.path, guest_map, guest.qemu_shell_command("$nbd", "tcg"),
                           check)
    assert status == 0 and code == 0
    console = "".join(seen["console"])
    assert guest.marker in console
    assert not re.search("[\x00-\x1f\x7f-\x9f]", console), repr(console[-500:])
    for path in ("/sbin/init", "/bin/busybox", "/etc/motd"):
        assert path in seen["trace"], seen["trace"][-3000:]
    assert "/var/log/demo.log" in seen["trace"]
    assert "/bin/busybox" in seen["top_reads"]
    top_written = seen["writes"][0][0]
    assert str(top_written) == "f /dev/sda1 /var/log/demo.log"


@pytest.fixture(scope="session")
def churn_boot(churn_guest_image, churn_map, tmp_path_factory):
    """The churn guest booted once under the UI: what the view showed, every
    request (the report tests read them as a recording), and a scrape of
    --metrics' endpoint fed by the same pump (issue 13)."""
    from fixtures_metrics import scrape

    from diskwatch.sinks.metrics import MetricsSink
    from diskwatch.sinks.metrics.prometheus import MetricsServer
    from diskwatch.ui.top import TopObjects
    guest = churn_guest_image.guest
    logs = {p for p in guest.writes if p.startswith("/var/log/av/")}
    seen = {"logs": logs, "requests": [], "t0": time.monotonic()}
    metrics = MetricsSink({"": churn_guest_image.size}, top=20, refresh=1.0)
    endpoint = MetricsServer(metrics, "127.0.0.1", 0)

    async def check(app, pilot):
        seen["metrics"] = scrape(endpoint.url)
        top = app.query_one(TopObjects)
        seen["reads"] = app.stats.top("read_bytes", 1, keep=is_file)
        seen["writes"] = app.stats.top("writes", len(logs), keep=is_file)
        await pilot.press("f")  # files only: what a person hunting churn does
        app._refresh_views(force=True)
        await pilot.pause()
        seen["reads_view"] = str(top.render()).splitlines()
        seen["remaps"] = list(app.session.remapper.said)
        # every file the live stream named in a write (the trace's lookups)
        seen["counts"] = {str(o): c for o, c in app.stats.top("writes", 10_000, keep=is_file)}
        seen["written"] = set(seen["counts"])
        # the files it made and deleted, as the activity sink followed them
        seen["lifetimes"] = list(app.activity_sink.lives.gone)
        seen["activity"] = list(app.activity)

    work = tmp_path_factory.mktemp("churn-boot")
    seen["recording"], seen["log"] = work / "churn.dwrec", work / "churn.trace"
    try:
        seen["status"], _ = _run_ui(churn_guest_image.path, churn_map,
                                    guest.qemu_shell_command("$nbd", "tcg"), check,
                                    record=seen["requests"], sinks=[metrics], remap=True,
                                    recording=seen["recording"], log=seen["log"])
    finally:
        endpoint.close()
    return seen


def test_churn_ranks_the_log_files_and_the_rescanned_file_first(churn_guest_image, churn_boot):
    guest = churn_guest_image.guest
    seen, logs = churn_boot, churn_boot["logs"]
    assert len(logs) >= 2
    assert seen["status"] == 0
    # The most read object, by bytes, is the file the loop re-reads.
    assert str(seen["reads"][0][0]) == f"f /dev/sda1 {guest.big_file}"
    # The most written objects are the churned log files.
    assert {str(o).split(" ", 2)[2] for o, _ in seen["writes"]} == logs
    # And the top-objects view, files only, shows the big file in its first rows.
    assert any(guest.big_file in row for row in seen["reads_view"][:4]), seen["reads_view"]


def test_churn_boot_is_remapped_live_and_names_the_log_created_at_boot(churn_guest_image,
                                                                       churn_boot):
    """Issue 10, item 6: the guest creates a log the map made before boot
    does not know; its writes pile up unnamed, diskwatch remaps by itself
    (through the served snapshot), and the trace names the log's writes."""
    (created,) = churn_guest_image.guest.created
    assert created not in churn_guest_image.guest.files  # not in the image
    remaps = churn_boot["remaps"]
    assert any(re.match(r"remap \(auto\): \+\d+ objects, -\d+, ", ln) and created in ln
               for ln in remaps), remaps
    assert f"f /dev/sda1 {created}" in churn_boot["written"], sorted(churn_boot["written"])
    print("\n" + "\n".join(remaps))


def test_the_remapped_churn_boot_replays_and_reports_as_it_was_live(churn_guest_image,
                                                                    churn_map, churn_boot):
    """The recording of that boot keeps the maps it remapped to: its replay
    prints the live --log trace byte for byte, the log created at boot named
    where the live trace named it, and the report gives that log its
    writes; with --bmap (the map made before boot) it is nowhere."""
    import json

    from diskwatch.recording.reader import open_recording
    (created,) = churn_guest_image.guest.created
    rec = open_recording(str(churn_boot["recording"]))
    assert rec.complete and rec.header.dropped == 0
    assert len(rec.maps) == len(churn_boot["remaps"]) >= 1
    r = subprocess.run([DISKWATCH, "replay", str(churn_boot["recording"]), "--headless"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    live = churn_boot["log"].read_text()
    name = f"write f /dev/sda1 {created}  ["
    assert name in live
    assert r.stdout == live
    doc = json.loads(_report(str(churn_boot["recording"]), "--json").stdout)
    (log,) = [o for o in doc["objects"] if o["name"] == f"f /dev/sda1 {created}"]
    counts = churn_boot["counts"][f"f /dev/sda1 {created}"]  # what the live view counted
    assert log["writes"] >= counts.writes > 0 and log["write_bytes"] >= counts.write_bytes
    # the journal writes that carried its metadata: the live view and the
    # report (from the recording's JMAP frames) give it the same bytes
    assert rec.journal_maps and log["journal_bytes"] == counts.journal_bytes > 0
    assert [m["t"] for m in doc["maps"]] == [m.t for m in rec.maps]
    first_only = json.loads(_report(str(churn_boot["recording"]), "--json",
                                    "--bmap", str(churn_map)).stdout)
    assert not [o for o in first_only["objects"] if created in o["name"]]


def test_the_churn_guest_s_temporary_file_is_listed_with_its_life(churn_guest_image,
                                                                 churn_boot):
    """Issue 21 item 4: the guest makes a 64 KiB file, keeps it 3 s and
    deletes it. No map made before boot or at its end has it; the live
    remaps in between do: it is listed with its lifetime and its writes,
    live (the activity sink) and in the report of the recording."""
    import json
    (temp,) = churn_guest_image.guest.temporary
    assert temp not in churn_guest_image.guest.files
    name = f"f /dev/sda1 {temp}"
    (life,) = [x for x in churn_boot["lifetimes"] if str(x.obj) == name]
    # it lived 3 s in the guest (more under TCG): at least that, gone by a
    # remap a few seconds later at most
    assert 2.5 <= life.lived < 30, life
    assert life.write_bytes >= 65536 and life.writes >= 1
    assert life.born < life.gone_by
    doc = json.loads(_report(str(churn_boot["recording"]), "--json").stdout)
    (row,) = [x for x in doc["lifetimes"] if x["name"] == name]
    assert row["write_bytes"] >= 65536 and 2.5 <= row["lived"] < 30, row
    text = _report(str(churn_boot["recording"])).stdout
    part = text.split("Created and deleted during the session")[1].split("\n\n")[0]
    assert temp in part
    print(f"\nlive: {life}\nreport: {row}")


def test_churn_logs_are_the_most_written_files_in_the_metrics(churn_boot):
    """The same boot as Prometheus sees it: the churned logs lead the file
    series by writes (beside the filesystem's own structures, which the
    metadata map names /$Journal, /$InodeTable...), and the series stay
    within the top-N bound."""
    logs = churn_boot["logs"]
    samples = churn_boot["metrics"]
    writes = sorted(((v, dict(k[1:])["path"]) for k, v in samples.items()
                     if k[0] == "diskwatch_file_requests_total" and ("op", "write") in k
                     and dict(k[1:])["path"] != "other"
                     and not dict(k[1:])["path"].startswith("/$")), reverse=True)
    most_written = {path for _, path in writes[:len(logs) + 1]}
    assert logs <= most_written, writes[:10]
    assert all(v > 0 for v, p in writes if p in logs)
    file_series = [k for k in samples if k[0].startswith("diskwatch_file_")]
    assert len(file_series) <= (20 + 1) * 2 * 4
    assert samples[("diskwatch_requests_total", ("command", "write"), ("export", ""))] > 0


def test_demo_command_reports_a_missing_piece_with_its_package(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}  # no qemu on this PATH
    r = subprocess.run([DISKWATCH, "demo", "--headless", "--cache-dir", str(tmp_path / "c")],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1
    assert "qemu-system-x86" in r.stderr and "Traceback" not in r.stderr


# --- issue 12: report and compare on the same boots (no boot of their own) ---


def _report(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([DISKWATCH, "report", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r


def _churn_recording(churn_boot, path: Path) -> Path:
    """The churn boot's requests as JSON lines (the format --record wrote
    before recordings had their own; the report reads both)."""
    import json

    from diskwatch.events import COMMAND_NAMES
    t0 = churn_boot["t0"]
    with open(path, "w") as f:
        for r in churn_boot["requests"]:
            f.write(json.dumps({"t": r.start - t0, "conn": r.conn, "export": r.export,
                                "op": COMMAND_NAMES[r.command], "offset": r.offset,
                                "length": r.length, "flags": r.flags,
                                "duration": r.duration, "error": r.error}) + "\n")
    return path


def test_report_names_what_the_demo_boot_read_first_and_rewrote(guest_image, guest_map,
                                                                headless_boot, tmp_path):
    import json
    import xml.etree.ElementTree as ET
    guest = guest_image.guest
    from diskwatch.report.inputs import sniff
    r, _, record, _ = headless_boot
    assert r.returncode == 7, r.stderr[-2000:]
    assert sniff(str(record)) == "diskwatch"  # --record's own format, read by recording/reader.py
    doc = json.loads(_report(str(record), "--bmap", str(guest_map), "--json").stdout)
    assert doc["requests"] > 50 and doc["mapped"] and doc["unmapped"]["read_bytes"] == 0
    files = [t["name"].split(" ", 2)[2] for t in doc["timeline"] if t["name"].startswith("f ")]
    # mounting reads the filesystem's structures (/$Superblock...); then the
    # kernel runs /sbin/init before any other file is read; every file the
    # init script reads is in the timeline
    guest_files = [f for f in files if not f.startswith("/$") and ":$" not in f]
    assert guest_files[0] == "/sbin/init", files
    assert set(guest.reads) <= set(files)
    # the log the guest appends to (a record and a sync each time) is the churn
    (churn,) = [c for c in doc["churn"] if c["type"] == "file" and not c["fs_structure"]]
    assert churn["name"] == "f /dev/sda1 /var/log/demo.log"
    assert churn["bursts"] == guest.write_counts["/var/log/demo.log"]
    text = _report(str(record), "--bmap", str(guest_map)).stdout
    assert "Files, most bytes read" in text and "f /dev/sda1 /bin/busybox" in text
    svg, png = tmp_path / "boot.svg", tmp_path / "boot.png"
    _report(str(record), "--bmap", str(guest_map), "--svg", str(svg), "--png", str(png))
    root = ET.parse(svg).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    assert [e.get("data-name") for e in root.iter(ns + "rect")
            if e.get("class") == "partition"] == ["p /dev/sda1"]
    labels = [e.text for e in root.iter(ns + "text") if e.get("class") == "file-label"]
    assert any(label.startswith("/bin/busybox") for label in labels), labels
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_and_compare_show_the_churn_guests_extra_files(churn_guest_image, churn_map,
                                                              guest_map, headless_boot,
                                                              churn_boot, tmp_path):
    import json
    guest = churn_guest_image.guest
    logs = churn_boot["logs"]
    assert churn_boot["status"] == 0
    churn_rec = _churn_recording(churn_boot, tmp_path / "churn.jsonl")
    doc = json.loads(_report(str(churn_rec), "--bmap", str(churn_map), "--json").stdout)
    # the churned logs top the churn list, each with as many bursts as the
    # guest's loop wrote records
    top = doc["churn"][:len(logs)]  # the guest's files before the filesystem's journal
    assert {c["name"].split(" ", 2)[2] for c in top} == logs
    for c in top:
        assert c["bursts"] == guest.write_counts[c["name"].split(" ", 2)[2]]
    assert doc["objects"][0]["name"] == f"f /dev/sda1 {guest.big_file}"
    _, _, demo_rec, _ = headless_boot
    cmp = json.loads(_report(str(demo_rec), "--bmap", str(guest_map), "--against",
                             str(churn_rec), "--against-bmap", str(churn_map), "--json").stdout)
    only_churn = {o["name"].split(" ", 2)[2] for o in cmp["only_b"]}
    assert logs | {guest.big_file, "/var/log/av"} <= only_churn
    # the churn guest reads every file the demo guest reads
    assert [o for o in cmp["only_a"] if o["name"].startswith("f ")] == []
    milestones = {m["name"]: m for m in cmp["milestones"]}
    assert milestones["f /dev/sda1 /sbin/init"]["a"] is not None
    assert milestones["f /dev/sda1 /sbin/init"]["b"] is not None
