"""Pilot tests of the Textual UI with real traffic: Debian's libnbd Python
client against diskwatch's own server, serving a real image file, named
through a small hand-written block map."""

from __future__ import annotations

import asyncio
import functools
import re
import subprocess
import threading
import time

import pytest

from diskwatch.bmap.index import BlockMap
from diskwatch.events import Bus, ConnectionEvent, Message, Progress
from diskwatch.pipeline.session import Session
from diskwatch.server.server import Server, ServerThread
from diskwatch.sources.file import FileSource
from diskwatch.ui.app import DiskwatchApp
from diskwatch.ui.heatmap import Heatmap
from diskwatch.ui.output import CommandOutput
from diskwatch.ui.progress import BmapProgress
from diskwatch.ui.rates import Rates
from diskwatch.ui.screens import ConfirmQuit, HelpScreen
from diskwatch.ui.top import TopObjects
from diskwatch.ui.trace import TraceView

nbd = pytest.importorskip("nbd", reason="Debian's python3-libnbd is needed (make setup)")

MiB = 1 << 20
SIZE = 64 * MiB
PASSWD = 3 * MiB  # 8 KiB
BUSYBOX = 4 * MiB  # 2 MiB
LOG = 10 * MiB  # 1 MiB
BMAP = f"""\
# a hand-written map of the test image: two partitions, a few files
1 0 {SIZE:x} v /dev/sda
1 {MiB:x} {40 * MiB:x} p /dev/sda1
1 {40 * MiB:x} {SIZE:x} p /dev/sda2
1 {2 * MiB:x} {2 * MiB + 4096:x} d /dev/sda1 /etc
1 {PASSWD:x} {PASSWD + 8192:x} f /dev/sda1 /etc/passwd
1 {BUSYBOX:x} {BUSYBOX + 2 * MiB:x} f /dev/sda1 /bin/busybox
1 {LOG:x} {LOG + MiB:x} f /dev/sda1 /var/log/boot log.txt
1 {41 * MiB:x} {45 * MiB:x} f /dev/sda2 /Program Files (x86)/McAfee/log0.txt
"""


def sync(coro_fn):
    """Run an async test with asyncio.run (no pytest-asyncio needed)."""

    @functools.wraps(coro_fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(coro_fn(*args, **kwargs))

    return wrapper


class Served:
    """A real image served by diskwatch's server in its own thread."""

    def __init__(self, tmp_path, *, blockmap=True, command=None):
        self.image = tmp_path / "disk.img"
        with open(self.image, "wb") as f:
            f.truncate(SIZE)
            f.seek(PASSWD)
            f.write(b"root:x:0:0:root:/root:/bin/sh\n".ljust(8192, b"\n"))
        (tmp_path / "disk.bmap").write_text(BMAP)
        self.blockmap = BlockMap.load(tmp_path / "disk.bmap")
        self.bus = Bus()
        self.server = Server({"": FileSource(str(self.image))}, self.bus)
        sock = str(tmp_path / "nbd.sock")
        self.server.listen_unix(sock)
        self.thread = ServerThread(self.server).start()
        self.uri = f"nbd+unix:///?socket={sock}"
        self.session = Session(
            bus=self.bus, size=SIZE, description="file disk.img", uri=self.uri,
            command=command, blockmap=self.blockmap if blockmap else None,
        )

    def client(self):
        h = nbd.NBD()
        h.connect_uri(self.uri)
        return h

    def stop(self):
        self.thread.stop()


@pytest.fixture
def served(tmp_path):
    s = Served(tmp_path)
    yield s
    s.stop()


async def wait_for(pilot, app, condition, timeout=10.0):
    """Pump the app until condition() holds: the server publishes a batch just
    after its replies are on their way, so the client can be a moment ahead."""
    deadline = time.monotonic() + timeout
    while True:
        app.pump()
        if condition():
            await pilot.pause()
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {condition.__doc__ or condition}")
        await pilot.pause(0.01)


def trace_text(app) -> list[str]:
    return app.query_one(TraceView).lines_text()


@sync
async def test_trace_names_the_files_a_client_reads(served):
    app = DiskwatchApp(served.session)
    async with app.run_test(size=(120, 36)) as pilot:
        h = served.client()
        assert h.pread(8192, PASSWD).startswith(b"root:x:0:0")
        for _ in range(2):
            h.pread(8192, PASSWD)
        for i in range(8):
            h.pread(65536, BUSYBOX + i * 65536)
        for i in range(5):
            h.pwrite(b"log line\n".ljust(4096), LOG + i * 4096)
        h.flush()
        h.pread(4096, 50 * MiB)  # in sda2, but in no file
        await wait_for(pilot, app, lambda: app.stats.requests == 3 + 8 + 5 + 1 + 1)
        lines = trace_text(app)
        passwd = [ln for ln in lines if "/etc/passwd" in ln]
        assert len(passwd) == 1 and passwd[0].split()[1] == "read" and passwd[0].endswith("×3")
        assert any("/bin/busybox" in ln and ln.endswith("×8") for ln in lines)
        log = [ln for ln in lines if "/var/log/boot log.txt" in ln]
        assert len(log) == 1 and " write " in log[0] and log[0].endswith("×5")
        assert any(" flush " in ln for ln in lines)
        assert lines[-1].split()[1:4] == ["read", "p", "/dev/sda2"]  # newest at the bottom
        # top objects: busybox read most, the log written most
        top = app.query_one(TopObjects)
        app._refresh_views(force=True)
        await pilot.pause()
        assert str(top.render()).splitlines()[1].split()[:3] == ["f", "/bin/busybox", "8"]
        await pilot.press("s")
        assert "/var/log/boot log.txt" in str(top.render()).splitlines()[1]
        h.shutdown()


@sync
async def test_top_objects_by_writes_show_what_the_journal_wrote_for_each(served):
    """Issue 18 (3a): once a remap read the journal, the top objects by
    writes have a journal column, each object's share of the journal's
    writes (its write amplification); none before."""
    from diskwatch.bmap.index import BmapObject
    from diskwatch.events import JournalCarried
    app = DiskwatchApp(served.session)
    async with app.run_test(size=(160, 40)) as pilot:
        h = served.client()
        for i in range(3):
            h.pwrite(b"log line\n".ljust(4096), LOG + i * 4096)
        await wait_for(pilot, app, lambda: app.stats.requests == 3)
        top = app.query_one(TopObjects)
        await pilot.press("s")
        app._refresh_views(force=True)
        await pilot.pause()
        assert "journal" not in str(top.render()).splitlines()[0]
        log = BmapObject("f", "/dev/sda1", "/var/log/boot log.txt")
        served.session.pump.deliver(JournalCarried(((1.0, 1, 0, 12288, log),)))
        app._refresh_views(force=True)
        await pilot.pause()
        header, row = str(top.render()).splitlines()[:2]
        # the columns after the name: journal, then the latency's (where there is room)
        cols = header.split()
        at = cols.index("journal") - len(cols)
        assert cols[len(cols) + at + 1:] in ([], ["p99"], ["p50", "p99"]), header
        assert "/var/log/boot log.txt" in row and row.split()[at] == "12K", row
        h.shutdown()


@sync
async def test_heatmap_lights_the_cells_read_and_written(served):
    app = DiskwatchApp(served.session)
    async with app.run_test(size=(100, 30)) as pilot:
        heatmap = app.query_one(Heatmap)
        heat = app.stats.heat
        h = served.client()
        h.pread(8192, PASSWD)
        h.pwrite(b"x" * 4096, LOG)
        await wait_for(pilot, app, lambda: app.stats.requests == 2)
        cs = heat.cell_size

        def cells(offset, length):
            return list(range(offset // cs, (offset + length - 1) // cs + 1))

        read_cell, write_cell = cells(PASSWD, 8192)[0], cells(LOG, 4096)[0]
        assert [i for i, v in enumerate(heat.reads) if v] == cells(PASSWD, 8192)
        assert [i for i, v in enumerate(heat.writes) if v] == cells(LOG, 4096)
        # lit cells are drawn in another colour than their partition's tint
        assert heatmap.cell_rgb(read_cell) != heatmap._bases[read_cell]
        assert heatmap.cell_rgb(read_cell)[1] > heatmap.cell_rgb(read_cell)[0]  # green
        assert heatmap.cell_rgb(write_cell)[0] > heatmap.cell_rgb(write_cell)[1]  # red
        # partitions are named in the legend
        legend = "".join(seg.text for line in heatmap._legend for seg in line)
        assert "sda1" in legend and "sda2" in legend
        # the cell under the mouse: its byte range and the file in it
        region = heatmap.content_region
        x, y = read_cell % heatmap._cols, read_cell // heatmap._cols // 2
        await pilot.hover(Heatmap, offset=(x + region.x - heatmap.region.x,
                                           y + region.y - heatmap.region.y))
        assert heatmap.cursor is not None
        start, end = heat.cell_range(heatmap.cursor)
        assert start <= PASSWD < end
        info = "".join(s.text for s in heatmap._info_line())
        assert f"{start:#x}-{end:#x}" in info and "/etc/passwd" in info
        h.shutdown()


@sync
async def test_counters_match_what_the_client_did(served):
    app = DiskwatchApp(served.session)
    async with app.run_test(size=(80, 24)) as pilot:
        h = served.client()
        await wait_for(pilot, app, lambda: app.stats.connections == 1)
        for i in range(20):
            h.pread(4096, i * 4096)
        for i in range(7):
            h.pwrite(b"y" * 512, 20 * MiB + i * 512)
        h.trim(65536, 30 * MiB)
        h.zero(65536, 31 * MiB)
        h.flush()
        await wait_for(pilot, app, lambda: app.stats.requests == 30)
        st = app.stats
        assert (st.ops[0], st.bytes[0]) == (20, 20 * 4096)
        assert (st.ops[1], st.bytes[1]) == (7, 7 * 512)
        assert st.ops[3] == 1 and st.ops[4] == 1 and st.ops[6] == 1 and st.errors == 0
        assert st.latency.median is not None
        text = str(app.query_one(Rates).query_one("#rates-text").render())
        assert "Σ   20" in text and "Σ    7" in text and "conn 1" in text
        assert "trim 1" in text and "zero 1" in text and "flush 1" in text
        h.shutdown()
        del h  # closes the connection
        await wait_for(pilot, app, lambda: app.stats.connections == 0)


@sync
async def test_bindings_filter_pause_search_clear_toggle(served):
    app = DiskwatchApp(served.session)
    async with app.run_test(size=(120, 36)) as pilot:
        h = served.client()
        h.pread(4096, 2 * MiB)  # the /etc directory
        h.pread(8192, PASSWD)
        h.pwrite(b"z" * 4096, LOG)
        h.pread(512, 0)  # the whole device
        await wait_for(pilot, app, lambda: app.stats.requests == 4)
        assert len(trace_text(app)) == 4
        await pilot.press("f")  # files only
        assert [ln.split()[2] for ln in trace_text(app)] == ["f", "f"]
        await pilot.press("f")  # hide directories
        assert len(trace_text(app)) == 3 and not any("/etc " in ln for ln in trace_text(app))
        await pilot.press("f", "r")  # all types, reads only
        assert [ln.split()[1] for ln in trace_text(app)] == ["read"] * 3
        await pilot.press("r")  # writes only
        assert [ln.split()[1] for ln in trace_text(app)] == ["write"]
        await pilot.press("r")  # all again
        await pilot.press("slash", *"passwd", "enter")
        assert len(trace_text(app)) == 1 and "/etc/passwd" in trace_text(app)[0]
        assert "/passwd" in str(app.query_one("#status").render())
        await pilot.press("slash", "escape")
        assert len(trace_text(app)) == 4

        await pilot.press("space")  # pause: the trace holds still, counting goes on
        h.pread(4096, BUSYBOX)
        await wait_for(pilot, app, lambda: app.stats.requests == 5)
        assert len(trace_text(app)) == 4 and "PAUSED" in str(app.query_one("#status").render())
        await pilot.press("space")
        assert "/bin/busybox" in trace_text(app)[-1]

        for key, panel in (("h", "#heatmap"), ("t", "#top"), ("a", "#rates")):
            await pilot.press(key)
            assert not app.query_one(panel).display
            await pilot.press(key)
            assert app.query_one(panel).display

        await pilot.press("c")
        assert trace_text(app) == [] and app.stats.requests == 0 and not app.stats.objects

        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)
        h.shutdown()
        await pilot.press("q")
    assert app.return_code == 0


@sync
async def test_offsets_without_a_map_then_names_once_it_is_generated(tmp_path):
    served = Served(tmp_path, blockmap=False)
    app = DiskwatchApp(served.session)
    try:
        async with app.run_test(size=(100, 30)) as pilot:
            h = served.client()
            for i in range(4):  # sequential: one line for the run
                h.pread(4096, PASSWD + i * 4096)
            await wait_for(pilot, app, lambda: app.stats.requests == 4)
            assert trace_text(app)[-1].split()[1:3] == ["read", f"@ {PASSWD:#x}-{PASSWD + 16384:#x}"[:1]]
            assert f"@ {PASSWD:#x}-{PASSWD + 16384:#x}" in trace_text(app)[-1]
            assert trace_text(app)[-1].endswith("×4")
            assert "no block map" in str(app.query_one(TopObjects).render())

            # the generator reports progress, then the map appears
            bar = app.query_one(BmapProgress)
            assert not bar.display or "-active" not in bar.classes
            served.bus.publish(Progress("files", "/etc/passwd", 3, 10, 150.0, 0.02))
            app.pump()
            await pilot.pause()
            assert "-active" in bar.classes and "/etc/passwd" in str(
                bar.query_one("#bmap-detail").render())
            served.session.blockmap = served.blockmap
            served.bus.publish(Progress("done", "", 10, 10, 150.0, 0.07,
                                        summary="1 partition, 3 files in 0.1s"))
            h.pread(8192, PASSWD)
            await wait_for(pilot, app, lambda: app.stats.requests == 5)
            assert "1 partition, 3 files" in str(bar.query_one("#bmap-detail").render())
            assert "/etc/passwd" in trace_text(app)[-1]
            app._refresh_views(force=True)
            assert "/etc/passwd" in str(app.query_one(TopObjects).render())
            h.shutdown()
    finally:
        served.stop()


@sync
async def test_command_output_and_quit_with_its_status(served):
    served.session.command = "guest --boot"
    app = DiskwatchApp(served.session)
    async with app.run_test(size=(100, 30)) as pilot:
        out = app.query_one(CommandOutput)
        assert out.display and out.border_subtitle == "running"

        def command_thread():  # the captive command's output comes from another thread
            served.bus.publish(Message("Booting from Hard Disk...", "stdout"))
            served.bus.publish(Message("a warning", "stderr"))
            served.bus.publish(Message("command exited with status 3", "exit", status=3))

        t = threading.Thread(target=command_thread)
        t.start()
        t.join()
        await wait_for(pilot, app, lambda: app.command_status == 3)
        assert out.lines_seen == 3 and out.border_subtitle == "exit 3"
        assert "exited 3" in str(app.query_one("#status").render())
        # the command has exited: no question, and the UI stays open until q
        assert app.is_running
        await pilot.press("q")
    assert app.return_value == 3 and app.return_code == 3


@sync
async def test_quitting_while_the_command_runs_asks_then_stops_it(served):
    proc = subprocess.Popen(["sleep", "60"])
    stopped = []

    def stop_command():
        stopped.append(True)
        proc.terminate()
        served.session.exit_status = proc.wait()

    served.session.command = "sleep 60"
    served.session.stop_command = stop_command
    app = DiskwatchApp(served.session)
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("q")
            assert isinstance(app.screen, ConfirmQuit)
            await pilot.press("n")  # stay
            assert not isinstance(app.screen, ConfirmQuit) and proc.poll() is None
            await pilot.press("q")
            assert isinstance(app.screen, ConfirmQuit)
            await pilot.press("y")
            await app.workers.wait_for_complete()
            await pilot.pause()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert stopped == [True] and proc.returncode == -15
    assert app.return_value == -15 and app.return_code == 143


@sync
async def test_trace_memory_is_bounded_and_folds_repeats(served):
    app = DiskwatchApp(served.session, trace_cap=50)
    async with app.run_test(size=(80, 24)) as pilot:
        h = served.client()
        for i in range(200):  # alternating objects: no folding, one line each
            h.pread(512, PASSWD if i % 2 else BUSYBOX)
        await wait_for(pilot, app, lambda: app.stats.requests == 200)
        assert len(app.trace_model.lines) == 50 and len(trace_text(app)) == 50
        assert app.stats.ops[0] == 200  # the aggregates saw everything
        # it follows the tail...
        trace = app.query_one(TraceView)
        assert trace.max_scroll_y > 0 and trace.scroll_y == trace.max_scroll_y
        # ...unless scrolled up, until scrolled back to the end
        await pilot.press("home")
        await pilot.pause()
        assert trace.scroll_y == 0
        h.pread(512, LOG)
        await wait_for(pilot, app, lambda: app.stats.requests == 201)
        assert trace.scroll_y == 0 and "/var/log/boot log.txt" in trace_text(app)[-1]
        await pilot.press("end")
        await wait_for(pilot, app, lambda: trace.scroll_y == trace.max_scroll_y)
        served.bus.publish(ConnectionEvent(99, True, "test"))
        await wait_for(pilot, app, lambda: app.stats.connections == 2)
        h.shutdown()


def test_trace_lists_the_newest_requests_of_a_flood_and_says_how_many_it_left_out():
    """TraceModel is plain Python: a flood of unrelated requests is listed
    from the newest `per_add` on, after one marker line counting the rest;
    requests that continue the last line are still folded into it."""
    from diskwatch.events import make_request
    from diskwatch.ui.trace import TraceModel

    def req(offset, t, cmd=0):
        return make_request((1, "", cmd, offset, 4096, 0, 100.0 + t, 1e-4, 0))

    model = TraceModel(started=100.0, cap=5000, per_add=1000)
    scattered = [(req(((i * 7919) % 9973) * 8192, i / 1e4), None) for i in range(3000)]
    assert model.add(scattered) == 1001
    marker, *listed = model.lines
    assert marker.skipped == 2000 and marker.nbytes == 2000 * 4096 and model.skipped == 2000
    assert "2,000 requests not listed" in marker.label()
    assert [ln.start for ln in listed] == [r.offset for r, _ in scattered[2000:]]
    assert model.requests == 3000
    # a sequential run continues the last line: folded whole, nothing left out
    last = listed[-1]
    run = [(req(last.end + i * 4096, 1 + i / 1e4), None) for i in range(2500)]
    assert model.add(run) == 0
    assert model.lines[-1] is last and last.count == 2501 and model.skipped == 2000
    # with a map, 500 + 2000 hits on two files: the old file's line goes on
    # counting, the new file's 2000 hits start after a marker for the rest
    f1, f2 = object(), object()
    model = TraceModel(per_add=1000)
    model.add([(req(0, 0), [(0, 4096, f1)])])
    hits = [(req(0, i), [(0, 4096, f1)]) for i in range(500)]
    hits += [(req(8192, i), [(8192, 12288, f2)]) for i in range(2000)]
    model.add(hits)
    assert [(ln.obj, ln.count, ln.skipped) for ln in model.lines] == [
        (f1, 501, 0), (None, 1, 1000), (f2, 1000, 0)]


@sync
async def test_p_saves_a_picture_of_what_has_been_seen(served, tmp_path):
    """The p key writes the report's picture of the session so far: the
    partitions, the busiest file marked, reads and writes drawn."""
    import xml.etree.ElementTree as ET
    pictures = tmp_path / "pictures [red on]x"  # the path is told as text, not markup
    pictures.mkdir()
    app = DiskwatchApp(served.session, picture_dir=str(pictures))
    async with app.run_test(size=(120, 36)) as pilot:
        h = served.client()
        for i in range(8):
            h.pread(65536, BUSYBOX + i * 65536)
        h.pwrite(b"x" * 4096, LOG)
        await wait_for(pilot, app, lambda: app.stats.requests == 9)
        await pilot.press("p")
        await pilot.pause()
        (saved,) = pictures.iterdir()
        from textual.content import Content
        told = [(Content.from_markup(n.message) if n.markup else Content(n.message)).plain
                for n in app._notifications]  # as the toast renders it
        assert f"picture saved: {saved}" in told, told
        root = ET.parse(saved).getroot()
        ns = "{http://www.w3.org/2000/svg}"
        parts = [e.get("data-name") for e in root.iter(ns + "rect")
                 if e.get("class") == "partition"]
        assert parts == ["p /dev/sda1", "p /dev/sda2"]
        labels = [e.text for e in root.iter(ns + "text") if e.get("class") == "file-label"]
        assert labels[0].startswith("/bin/busybox"), labels
        assert any(g.get("class") == "reads" and len(g) for g in root.iter(ns + "g"))
        assert any(g.get("class") == "writes" and len(g) for g in root.iter(ns + "g"))
        await pilot.press("p")  # a second save in the same second gets its own name
        await pilot.pause()
        assert len(list(pictures.iterdir())) == 2
        h.shutdown()


@sync
async def test_p_saves_the_picture_the_app_is_handed(tmp_path):
    """The picture is something the app is handed and asks for an SVG: it is
    fed as a sink, and given the title, the map and every object's traffic."""
    from diskwatch.events import make_request

    class Drawn:
        def __init__(self) -> None:
            self.fed = 0

        def feed(self, batch, pieces) -> None:
            self.fed += len(batch)

        def on_event(self, event) -> None:
            pass

        def tick(self, now) -> None:
            pass

        def close(self) -> None:
            pass

        def svg(self, *, title, blockmap, traffic) -> str:
            return f"<svg>{title}; fed {self.fed}; map {blockmap}; {list(traffic)}</svg>"

    bus = Bus()
    session = Session(bus=bus, size=SIZE, description="file disk.img", started=100.0)
    app = DiskwatchApp(session, clock=lambda: 103.0, picture=Drawn(), picture_dir=str(tmp_path))
    async with app.run_test(size=(120, 36)) as pilot:
        bus.publish_requests([make_request((1, "", 0, 0, 4096, 0, 101.0, 0.0001, 0))])
        app.pump()
        await pilot.press("p")
        await pilot.pause()
    (saved,) = tmp_path.iterdir()
    assert saved.read_text() == "<svg>file disk.img: 1 requests, 3 s; fed 1; map None; []</svg>"


# --- issue 21: the tree of the traffic, churn as it happens -----------------------------

def tree_lines(app) -> list[str]:
    """What the tree view shows, line by line (its labels, as drawn)."""
    from diskwatch.ui.tree import TrafficTreeView
    view = app.screen.query_one(TrafficTreeView)
    return ["".join(seg.text for seg in view.render_line(y))
            for y in range(view.scrollable_content_region.height)]


def shown_dirs(app) -> list[str]:
    return re.findall(r"[▼▶] (\S+/) ", "\n".join(tree_lines(app)))


@sync
async def test_the_d_key_shows_the_tree_of_the_traffic_per_partition(served):
    from diskwatch.ui.tree import TrafficScreen
    app = DiskwatchApp(served.session)
    async with app.run_test(size=(80, 24)) as pilot:
        h = served.client()
        for i in range(8):
            h.pread(65536, BUSYBOX + i * 65536)
        h.pread(8192, PASSWD)
        h.pwrite(b"log line\n".ljust(4096), LOG)
        h.pread(4096, 41 * MiB)  # sda2's file
        await wait_for(pilot, app, lambda: app.stats.requests == 11)
        # the timer's refresh between the screen's push and its mount (CI's
        # snapshot of the tree failed so: the screen had no tree yet)
        app.push_screen(TrafficScreen(app.traffic))
        app._refresh_views(force=True)
        app.screen.action_busiest()
        await pilot.pause()
        app.pop_screen()
        await pilot.pause()
        await pilot.press("d")
        assert isinstance(app.screen, TrafficScreen)
        app._refresh_views(force=True)
        await pilot.pause()
        lines = tree_lines(app)
        sda1 = next(ln for ln in lines if "/dev/sda1" in ln)
        assert sda1.split()[-4:-1] == ["520K", "4.0K", "10"], sda1  # read, written, requests
        assert any("/dev/sda2" in ln for ln in lines)
        await pilot.press("b")  # the busiest path, opened down to its file
        await pilot.pause()
        app._refresh_views(force=True)
        await pilot.pause()
        lines = tree_lines(app)
        assert any("bin/" in ln for ln in lines) and any("busybox" in ln for ln in lines), lines
        assert "/dev/sda1 /bin/busybox: read 512K in 8 requests" in str(
            app.screen.query_one("#tree-detail").render())
        await pilot.press("s")  # by bytes
        assert "by bytes" in app.screen.query_one("#tree").border_title
        # live: more reads of the log show at the next refresh
        for i in range(40):
            h.pread(4096, LOG + i * 4096)
        await wait_for(pilot, app, lambda: app.stats.requests == 51)
        app._refresh_views(force=True)
        await pilot.pause()
        assert shown_dirs(app)[:2] == ["bin/", "var/"]  # 512K, 160K
        await pilot.press("s")  # by requests: the log's 41 first
        app._refresh_views(force=True)
        await pilot.pause()
        assert shown_dirs(app)[:2] == ["var/", "bin/"]
        await pilot.press("escape")
        assert not isinstance(app.screen, TrafficScreen)
        h.shutdown()


@sync
async def test_a_file_written_in_bursts_is_flagged_churning_as_it_happens(served):
    """Each append a write and a flush (what a log does with sync): from the
    third burst the file is churning: the activity line under the views
    says so with its bursts, period and rate, and the top objects by writes
    show its period."""
    from diskwatch.ui.activity import ActivityPanel
    app = DiskwatchApp(served.session)
    async with app.run_test(size=(160, 40)) as pilot:
        h = served.client()
        panel = app.query_one(ActivityPanel)
        for i in range(2):
            h.pwrite(b"log line\n".ljust(4096), LOG + i * 4096)
            h.flush()
        await wait_for(pilot, app, lambda: app.stats.requests == 4)
        app._refresh_views(force=True)
        await pilot.pause()
        assert not panel.display and app.activity == ()  # two bursts: no churn yet
        for i in range(2, 6):
            h.pwrite(b"log line\n".ljust(4096), LOG + i * 4096)
            h.flush()
        await wait_for(pilot, app, lambda: app.stats.requests == 12)
        app._refresh_views(force=True)
        await pilot.pause()
        (line,) = str(panel.render()).splitlines()
        assert line.startswith("churn") and "/var/log/boot log.txt" in line, line
        assert "6 bursts · every " in line and "/min" in line, line
        await pilot.press("s")  # top objects by writes
        header, row = str(app.query_one(TopObjects).render()).splitlines()[:2]
        cols = header.split()
        at = cols.index("every") - len(cols)
        assert cols[len(cols) + at + 1:] in ([], ["p99"], ["p50", "p99"]), header
        assert "/var/log/boot log.txt" in row, (header, row)
        assert row.split()[at].endswith("s"), row
        if cols[-1] == "p99":  # its writes' latency: a duration
            assert row.split()[-1].endswith("s"), row
        h.shutdown()


@sync
async def test_a_file_made_and_deleted_is_shown_with_its_life(served):
    """Issue 21 item 4: a client writes where no file is (a new file), a map
    swapped in names it (as a live remap's), the client reads it back, then
    a map without it (deleted): the activity line says it lived, how long
    and its traffic, and a notification tells it once."""
    from diskwatch.ui.activity import ActivityPanel
    tmp = 20 * MiB
    lines = [*BMAP.encode().splitlines(True),
             f"1 {tmp:x} {tmp + 65536:x} f /dev/sda1 /tmp/av scratch.tmp\n".encode()]
    with_tmp = BlockMap.from_lines(lines)
    app = DiskwatchApp(served.session)
    notes = []
    async with app.run_test(size=(120, 36)) as pilot:
        app.notify = lambda message, **kw: notes.append((kw.get("title"), message))
        h = served.client()
        h.pwrite(b"x" * 65536, tmp)
        h.flush()
        await wait_for(pilot, app, lambda: app.stats.requests == 2)
        served.session.swap_map(with_tmp, "remap (test)")
        h.pread(4096, tmp)
        await wait_for(pilot, app, lambda: app.stats.requests == 3)
        assert app.activity_sink.lives.alive == 1
        served.session.swap_map(served.blockmap, "remap (test)")
        app._refresh_views(force=True)
        await pilot.pause()
        (line,) = str(app.query_one(ActivityPanel).render()).splitlines()
        assert line.split()[:2] == ["lived", "/tmp/av"] and "scratch.tmp" in line, line
        assert "64K written · 1 reads" in line and "≤" in line, line
        assert notes == [("created and deleted", notes[0][1])]
        assert notes[0][1].startswith("/dev/sda1 /tmp/av scratch.tmp: lived ≤"), notes
        app._refresh_views(force=True)
        await pilot.pause()
        assert len(notes) == 1  # told once
        h.shutdown()


@sync
async def test_top_objects_by_latency_give_p50_and_p99_of_each(served):
    """Issue 21 item 5: `s` cycles reads, writes, latency: by latency the
    table gives each object's p50 and p99 (durations), sorted by p99."""
    app = DiskwatchApp(served.session)
    async with app.run_test(size=(120, 36)) as pilot:
        h = served.client()
        for i in range(20):
            h.pread(65536, BUSYBOX + i * 65536)
            h.pread(4096, PASSWD)
        await wait_for(pilot, app, lambda: app.stats.requests == 40)
        top = app.query_one(TopObjects)
        await pilot.press("s", "s")
        app._refresh_views(force=True)
        await pilot.pause()
        assert top.border_title == "top objects by p99 latency (of the most requested)"
        assert top.border_subtitle == "s: by reads"
        header, *rows = str(top.render()).splitlines()
        assert header.split()[-2:] == ["p50", "p99"], header
        shown = app.stats.slowest(len(rows))
        assert len(rows) >= 2 and [r.split()[1] for r in rows[:2]] == [
            o.path or o.device for o, _ in shown[:2]], rows
        for row, (_, c) in zip(rows, shown, strict=False):
            p50, p99 = row.split()[-2:]
            assert p50.endswith("s") and p99.endswith("s"), row
            assert c.latency()[0] <= c.latency()[1]
        await pilot.press("s")
        assert top.border_title == "top objects by reads"
        h.shutdown()


@sync
async def test_with_two_disks_k_shows_the_second_disks_heat_and_partitions(tmp_path):
    """Issue 20 item 3: a session of two disks (two exports of one server):
    the heatmap starts on the first; k shows the second, with its own
    partitions and the heat of its own requests only; k again, the first."""
    size2 = 32 * MiB
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    for path, size in ((a, SIZE), (b, size2)):
        with open(path, "wb") as f:
            f.truncate(size)
    map2 = BlockMap.from_lines([f"2 0 {size2:x} v /dev/sdb\n".encode(),
                                f"2 {MiB:x} {size2:x} p /dev/sdb1\n".encode(),
                                f"2 {8 * MiB:x} {9 * MiB:x} f /dev/sdb1 /data/f\n".encode()],
                               disk=2)
    (tmp_path / "a.bmap").write_text(BMAP)
    bus = Bus()
    server = Server({"": FileSource(str(a)), "sdb": FileSource(str(b))}, bus)
    sock = str(tmp_path / "nbd.sock")
    server.listen_unix(sock)
    thread = ServerThread(server).start()
    session = Session(bus=bus, size=SIZE, description="file a.img", uri=f"nbd+unix:///?socket={sock}",
                      blockmap=BlockMap.load(tmp_path / "a.bmap"))
    session.set_disks([("", SIZE, "/dev/sda"), ("sdb", size2, "/dev/sdb")], {"sdb": map2})
    app = DiskwatchApp(session, picture_dir=str(tmp_path))
    try:
        async with app.run_test(size=(120, 36)) as pilot:
            heatmap = app.query_one(Heatmap)
            assert heatmap.border_title == "disk" and app.check_action("next_disk", ()) is True
            h = nbd.NBD()
            h.set_export_name("sdb")
            h.connect_uri(f"nbd+unix:///sdb?socket={sock}")
            for i in range(8):
                h.pwrite(b"d" * 65536, 8 * MiB + i * 65536)
            await wait_for(pilot, app, lambda: app.stats.requests == 8)
            first = app.stats.heat
            assert not any(first.ever_written)  # the first disk's heat: none of disk 2's writes
            await pilot.press("k")
            assert heatmap.border_title == "disk 2 of 2: /dev/sdb"
            assert heatmap.heat is app.stats.heats["sdb"] and heatmap.blockmap is map2
            heat = heatmap.heat
            cell = 8 * MiB // heat.cell_size
            assert heat.ever_written[cell] and heat.writes[cell] > 0
            assert sum(1 for x in heat.ever_written if x) <= (MiB // heat.cell_size) + 2
            app._refresh_views(force=True)
            await pilot.pause()
            legend = "".join(seg.text for line in heatmap._legend_lines(60) for seg in line)
            assert "sdb1" in legend, legend
            # the rates: each disk's line, the writes on /dev/sdb's
            rates = str(app.query_one(Rates).text.render()).splitlines()
            (sda,) = [ln for ln in rates if ln.startswith("sda ")]
            (sdb,) = [ln for ln in rates if ln.startswith("sdb ")]
            assert sda.split()[-2:] == ["w", "0B/s"] and sdb.split()[-2] == "w", rates
            assert sum(app.stats.disk_series["sdb"].series(app.clock(), "write_bytes")) == \
                8 * 65536 and not sum(app.stats.disk_series[""].series(app.clock(), "write_bytes"))
            # p: the picture of the disk shown, its own requests only
            svg = open(app.action_save_picture()).read()
            assert "disk 2 of 2 (/dev/sdb)" in svg and "/data/f" in svg
            assert sum(map(sum, app.pictures["sdb"].writes)) >= 8
            assert sum(map(sum, app.pictures[""].writes)) == 0
            await pilot.press("k")
            assert heatmap.border_title == "disk 1 of 2: /dev/sda" and heatmap.heat is first
            h.shutdown()
    finally:
        thread.stop()
