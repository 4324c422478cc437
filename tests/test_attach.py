"""Issue 14: attach to a guest that is already running, detach, no reboot.

One guest for the whole module (a boot costs 10-20 s under TCG): a copy of
the demo guest image, booted under plain QEMU with a QMP socket and its
console on a unix socket, with the loop init (/sbin/init-loop: every second
it reads the data files, writes a record into /var/log/demo.log, syncs and
prints ``diskwatch-loop: tick N``) and, told "burst", rewrites a 4 KiB record
without pause (O_DIRECT), reading each back (a lost write prints MISMATCH).
A second, qcow2 disk sits beside the
raw one, for the refusal. The tests run in file order against that guest:
refusals first (the guest untouched), then attach + detach (with a map made from
the live image, the trace names what the loop reads and writes), then kill -9 of diskwatch while attached
(the watchdog puts the disk back). Last, the guest is told to stop and its
filesystem is checked with e2fsck. Throughout, the console counter must
never stall for long.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from diskwatch.attach.qmp import QmpSocket
from diskwatch.demo.guest import LOOP_INIT, build_minimal_initrd

pytestmark = pytest.mark.slow

DISKWATCH = str(Path(sys.executable).with_name("diskwatch"))
BOOT_TIMEOUT = 300  # TCG on a loaded 2-core machine; a quiet one boots in ~10 s
#: the longest pause of the guest's loop we accept, seconds: a tick is due
#: every ~1 s; QEMU's NBD client retries a lost server after 1, 2, 4 s.
MAX_STALL = 12.0


class RunningGuest:
    """The QEMU process, its QMP socket, and its console lines with the time each came."""

    def __init__(self, image: Path, guest, work: Path, blockdev: list[str] | None = None,
                 extra: list[str] = ()):
        """``blockdev``: the guest's disk as these -blockdev/-device words
        instead of ``-drive file=IMAGE,format=raw`` (test_attach_qcow2.py);
        ``extra``: more QEMU words (another disk: test_attach_disks.py)."""
        self.image = image
        self.guest = guest
        self.qmp_path = str(work / "qmp.sock")
        #: what ``diskwatch attach`` is given to reach the guest's monitor
        self.attach_to = [self.qmp_path]
        self.hmp_path = str(work / "hmp.sock")
        console_path = str(work / "console.sock")
        spare = work / "spare.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(spare), "16M"], check=True)
        initrd = build_minimal_initrd(Path(guest.kernel), work / "minimal.initrd")
        argv = guest.qemu_command(image, "tcg", memory_mb=256, console="chardev:con",
                                  init=LOOP_INIT, initrd=initrd, extra=[
            "-chardev", f"socket,id=con,path={console_path},server=on,wait=off",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-chardev", f"socket,id=hmp,path={self.hmp_path},server=on,wait=off",
            "-mon", "chardev=hmp,mode=readline",
            "-drive", f"file={spare},format=qcow2,if=virtio,id=spare", *extra])  # fmt: skip
        if blockdev is not None:
            at = argv.index("-drive")
            argv[at:at + 2] = blockdev
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.lines: list[tuple[float, str]] = []
        self.ticks: list[tuple[float, int]] = []
        self._cond = threading.Condition()
        deadline = time.monotonic() + 30
        while not os.path.exists(console_path):
            assert self.proc.poll() is None, self.proc.stdout.read().decode()
            assert time.monotonic() < deadline, "qemu made no console socket"
            time.sleep(0.05)
        self.console = socket.socket(socket.AF_UNIX)
        self.console.connect(console_path)
        threading.Thread(target=self._read_console, daemon=True).start()

    def _read_console(self) -> None:
        buf = b""
        while True:
            try:
                chunk = self.console.recv(4096)
            except OSError:
                chunk = b""
            with self._cond:
                if not chunk:
                    self.lines.append((time.monotonic(), "<EOF>"))
                    self._cond.notify_all()
                    return
                buf += chunk
                while b"\n" in buf:
                    raw, _, buf = buf.partition(b"\n")
                    line = raw.decode("utf-8", "replace").strip()
                    now = time.monotonic()
                    self.lines.append((now, line))
                    m = re.search(r"diskwatch-loop: tick (\d+)", line)
                    if m:
                        self.ticks.append((now, int(m.group(1))))
                self._cond.notify_all()

    def wait_line(self, pattern: str, timeout: float, after: int = 0) -> str:
        """The first console line (from index ``after``) that matches ``pattern``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for _, line in self.lines[after:]:
                    if re.search(pattern, line):
                        return line
                left = deadline - time.monotonic()
                assert left > 0, f"no console line {pattern!r}:\n" + self.tail()
                assert not self.lines or self.lines[-1][1] != "<EOF>", self.tail()
                self._cond.wait(left)

    def wait_ticks(self, count: int, timeout: float = 60) -> int:
        """Wait for ``count`` more ticks of the loop; return the last tick number."""
        with self._cond:
            start = len(self.ticks)
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.ticks) < start + count:
                left = deadline - time.monotonic()
                assert left > 0, f"the guest's loop stalled:\n{self.tail()}"
                self._cond.wait(left)
            return self.ticks[-1][1]

    def max_stall(self, since: float) -> float:
        """The longest time without a tick, from ``since`` until now."""
        with self._cond:
            times = [t for t, _ in self.ticks if t >= since]
        times = [since, *times, time.monotonic()]
        return max(b - a for a, b in zip(times, times[1:], strict=False))

    def tail(self, n: int = 30) -> str:
        return "\n".join(line for _, line in self.lines[-n:])

    def qmp(self) -> QmpSocket:
        return QmpSocket(self.qmp_path)

    def block_state(self) -> dict[str, tuple[str, str]]:
        """device -> (node name, driver) for every device."""
        with self.qmp() as q:
            return {d["device"]: (d["inserted"]["node-name"], d["inserted"]["drv"])
                    for d in q.execute("query-block") if d.get("inserted")}

    def stop(self, timeout: float = 120) -> int:
        if self.proc.poll() is None:
            try:
                self.console.sendall(b"stop\n")
            except OSError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@contextlib.contextmanager
def booted(image: Path, guest_image, work: Path, *, burst: bool = True, ready: str = "",
           **kwargs):
    """The loop guest booted on ``image`` (RunningGuest's ``kwargs``), at its
    first tick (and ``ready``, a console line, first); with ``burst``, its
    burst writer started: it rewrites a 4 KiB record again and again,
    O_DIRECT, and reads each back (a write lost across a pivot prints
    MISMATCH). Stopped afterwards."""
    guest = RunningGuest(image, guest_image.guest, work, **kwargs)
    try:
        if ready:
            guest.wait_line(ready, BOOT_TIMEOUT)
        guest.wait_line(r"diskwatch-loop: tick 1\b", BOOT_TIMEOUT)
        if burst:
            guest.console.sendall(b"burst\n")
            guest.wait_line(r"diskwatch-loop: burst writer started", 30)
        yield guest
    finally:
        guest.stop(timeout=30)


@pytest.fixture(scope="module")
def running_guest(guest_image, tmp_path_factory):
    work = tmp_path_factory.mktemp("attach")
    image = work / "running.img"
    shutil.copyfile(guest_image.path, image)
    with booted(image, guest_image, work) as guest:
        yield guest


def diskwatch(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([DISKWATCH, *args], capture_output=True, text=True, timeout=120,
                          **kwargs)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def start_attach(guest: RunningGuest, *args: str, devices: tuple[str, ...] = ("virtio0",)
                 ) -> tuple[subprocess.Popen, list[str]]:
    """diskwatch attach to ``devices`` in the background; returns once it
    says it is attached."""
    proc = subprocess.Popen([DISKWATCH, "attach", *guest.attach_to,
                             *(w for d in devices for w in ("--device", d)),
                             "--headless", *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    err: list[str] = []

    def read() -> None:
        for line in proc.stderr:
            err.append(line)
    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 120
    while not any("attached:" in line for line in err):
        assert proc.poll() is None or any("attached:" in line for line in err), "".join(err)
        assert time.monotonic() < deadline, "".join(err)
        time.sleep(0.05)
    return proc, err


def wait_back(err: list[str], devices: tuple[str, ...], state: Callable[[], object],
              want: object, timeout: float = 60) -> float:
    """After kill -9 of diskwatch: wait until ``state()`` (read through the
    monitor, which the watchdog holds for moments) is ``want`` again and the
    watchdog said each of ``devices`` is back (its stderr is diskwatch's,
    still read in ``err``); the seconds until the state was back."""
    killed = time.monotonic()
    deadline = killed + timeout
    while True:
        try:
            now = state()
        except Exception:  # noqa: BLE001 - the watchdog holds the monitor for a moment
            now = None
        if now == want:
            break
        assert time.monotonic() < deadline, f"still on diskwatch: {now}"
        time.sleep(0.2)
    back = time.monotonic() - killed
    while not all(any(f"watchdog: the guest's disk {d} is back on" in line for line in err)
                  for d in devices):
        assert time.monotonic() < deadline, "".join(err)
        time.sleep(0.05)
    return back


# --- refusals: one clear line each, the guest untouched ------------------------------


def test_refusals_leave_the_guest_untouched(running_guest, tmp_path):
    g = running_guest
    before = g.block_state()
    since = time.monotonic()
    # Several disks and no --device: say which there are.
    line = one_line_error(diskwatch("attach", g.qmp_path))
    assert "2 block devices" in line and "virtio0 (raw" in line and "spare (qcow2" in line
    # A qcow2 disk of -drive without node-name: its node cannot be reopened
    # (test_attach_qcow2.py attaches to a named one).
    line = one_line_error(diskwatch("attach", g.qmp_path, "--device", "spare"))
    assert "qcow2 node is one QEMU named itself" in line and "blockdev-reopen" in line
    # No such device.
    line = one_line_error(diskwatch("attach", g.qmp_path, "--device", "nope"))
    assert "no block device 'nope'" in line
    # Wrong sockets: an HMP monitor, a regular file, nothing there.
    line = one_line_error(diskwatch("attach", g.hmp_path))
    assert "not a QMP socket" in line
    line = one_line_error(diskwatch("attach", str(g.image)))
    assert "is not a socket" in line
    line = one_line_error(diskwatch("attach", str(tmp_path / "missing.sock")))
    assert "no such file" in line
    dead = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(dead))
    s.close()
    line = one_line_error(diskwatch("attach", str(dead)))
    assert "nothing listens there" in line
    # A device with a block job running: a mirror that cannot finish (1 byte/s).
    with g.qmp() as q:
        q.execute("blockdev-add", {"driver": "null-co", "node-name": "test-sink",
                                   "size": g.guest.size})
        q.execute("blockdev-mirror", {"job-id": "test-job", "device": "virtio0",
                                      "target": "test-sink", "sync": "full", "speed": 1})
    try:
        line = one_line_error(diskwatch("attach", g.qmp_path, "--device", "virtio0"))
        assert "block job" in line and "test-job" in line
    finally:
        with g.qmp() as q:
            q.execute("job-cancel", {"id": "test-job"})
            deadline = time.monotonic() + 30
            while any(j["id"] == "test-job" for j in q.execute("query-jobs")):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            q.execute("blockdev-del", {"node-name": "test-sink"})
    assert g.block_state() == before
    g.wait_ticks(1)
    assert g.max_stall(since) < MAX_STALL


def test_a_failing_attach_moves_nothing_and_ends_its_watchdog(running_guest, tmp_path):
    """QEMU cannot reach the socket (as under a confining profile): blockdev-add
    fails; under the UI that is told and ends the session, the disk never moved."""
    from diskwatch.attach import AttachedGuest, monitor_opener, prepare
    g = running_guest
    before = g.block_state()
    connect = monitor_opener(g.qmp_path)
    with connect() as monitor:
        target = prepare(monitor, "virtio0")
    said, exits = [], []
    guest = AttachedGuest(connect, target, str(tmp_path / "nobody-listens.sock"), say=said.append)
    guest.report_failure = True
    guest.on_exit = exits.append
    guest.start()
    assert guest.failed and not guest.running and exits == [1]
    assert "could not attach, nothing was moved" in said[0] and "nobody-listens.sock" in said[0]
    assert guest.watchdog is None  # told "detached" and waited for
    assert g.block_state() == before
    with g.qmp() as q:
        assert not any(n["node-name"].startswith("diskwatch-") and n["drv"] == "nbd"
                       for n in q.execute("query-named-block-nodes"))


# --- attach, watch, detach --------------------------------------------------------------


def test_attach_traces_the_loop_and_detach_puts_the_disk_back(running_guest, tmp_path):
    g = running_guest
    original_node, driver = g.block_state()["virtio0"]
    assert driver == "raw"
    trace = tmp_path / "attach.trace"
    live_map = tmp_path / "live.bmap"  # does not exist: made from the live image
    since = time.monotonic()
    proc, err = start_attach(g, "--bmap", str(live_map), "--log", str(trace))
    try:
        node, driver = g.block_state()["virtio0"]
        assert driver == "nbd" and node.startswith("diskwatch-"), (node, driver)
        # A second diskwatch on the same disk: one line, the first one untouched.
        line = one_line_error(diskwatch("attach", g.qmp_path, "--device", "virtio0"))
        assert "already on diskwatch" in line
        assert g.block_state()["virtio0"] == (node, driver)
        g.wait_ticks(4)
    finally:
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(60)
    stderr = "".join(err)
    assert status == 0, stderr
    assert "detached: virtio0 is back on" in stderr
    assert "generating it first" in stderr and live_map.exists(), stderr
    moved = re.search(r"attached: .*?\(moved in (\d+) ms\)", stderr).group(1)
    back = re.search(r"detached: .*?\(moved in (\d+) ms\)", stderr).group(1)
    print(f"attach moved the disk in {moved} ms, detach moved it back in {back} ms")
    # The device is on a raw node over the same file again; the nbd node is gone.
    node, driver = g.block_state()["virtio0"]
    assert driver == "raw" and node != original_node
    with g.qmp() as q:
        nodes = {n["node-name"]: n for n in q.execute("query-named-block-nodes")}
        assert not any(n["drv"] == "nbd" for n in nodes.values())
        assert nodes[node]["file"] == str(g.image)
        assert q.execute("query-jobs") == []
    text = trace.read_text()
    for path in g.guest.reads[3:]:  # the data files the loop reads every second
        assert f"read f /dev/sda1 {path}" in text, f"{path} not in the trace:\n{text[-3000:]}"
    assert "write f /dev/sda1 /var/log/demo.log" in text, text[-3000:]
    # The loop goes on after the detach, and never stalled.
    g.wait_ticks(2)
    stall = g.max_stall(since)
    print(f"attach, watch, detach: longest stall of the guest's loop {stall:.1f} s")
    assert stall < MAX_STALL, g.tail()


def test_attach_remaps_live_a_file_the_guest_creates_is_named(running_guest, tmp_path, guest_map):
    """Issue 18, item 6: attached, the map follows the guest as it does for
    one started under diskwatch. The guest makes a file the map made before
    does not name; an automatic remap (an update, reading again what was
    written) names it, and its write is given to it."""
    g = running_guest
    trace = tmp_path / "attach.trace"
    proc, err = start_attach(g, "--bmap", str(guest_map), "--log", str(trace))
    try:
        g.wait_ticks(1)
        after = len(g.lines)
        g.console.sendall(b"create\n")
        line = g.wait_line(r"diskwatch-loop: created /var/log/created-\d+\.log", 30, after)
        created = line.split("created ", 1)[1].strip()
        deadline = time.monotonic() + 60
        while not any(f"new {created}" in e or (created in e and "remap (auto)" in e)
                      for e in err):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(err)
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(60)
    stderr = "".join(err)
    assert status == 0, stderr
    (remapped,) = [e for e in err if created in e and "remap (auto)" in e][:1]
    assert "read again:" in remapped, remapped
    text = trace.read_text()
    assert f"write f /dev/sda1 {created}" in text, text[-3000:]


# --- the UI on a running guest -----------------------------------------------------------------


def run_attached_ui(guest: RunningGuest, bmap: Path, check, size=(140, 42)):
    """The real app on the running guest (as the runner wires it: server thread,
    session, AttachedGuest as the command); check(app, pilot) runs once the
    trace names the log the loop writes; then q (which must detach)."""
    import asyncio

    from diskwatch.attach import AttachedGuest, monitor_opener, prepare
    from diskwatch.bmap.index import BlockMap
    from diskwatch.events import Bus
    from diskwatch.pipeline.session import Session
    from diskwatch.server import serve_in_thread
    from diskwatch.sources.file import FileSource
    from diskwatch.ui.app import DiskwatchApp
    from diskwatch.ui.screens import ConfirmQuit
    from diskwatch.ui.trace import TraceView

    connect = monitor_opener(guest.qmp_path)
    with connect() as monitor:
        target = prepare(monitor, "virtio0")
    bus = Bus()
    source = FileSource(target.path)
    running = serve_in_thread({"": source}, bus)
    attached = AttachedGuest(connect, target, running.socket_path,
                             say=lambda text: None)
    session = Session(bus=bus, size=source.size, description=source.description,
                      uri=running.uri, command=attached.description,
                      blockmap=BlockMap.load(bmap), attached=True)
    session.stop_command = attached.stop

    async def main():
        app = DiskwatchApp(session)
        async with app.run_test(size=size) as pilot:
            await asyncio.to_thread(attached.start)
            deadline = time.monotonic() + 60
            while "/var/log/demo.log" not in "\n".join(app.query_one(TraceView).lines_text()):
                assert time.monotonic() < deadline, "the UI never showed the loop's log"
                app.pump()
                await pilot.pause(0.2)
            guest.wait_ticks(2)
            app.pump()
            app._refresh_views(force=True)
            await pilot.pause()
            result = check(app, pilot)
            if asyncio.iscoroutine(result):
                await result
            await pilot.press("q")
            assert not isinstance(app.screen, ConfirmQuit)  # quitting detaches: no question
            deadline = time.monotonic() + 60
            while attached.running or app.is_running:  # the quit worker detaches, then exits
                assert time.monotonic() < deadline, "q did not detach and exit"
                await asyncio.sleep(0.05)
        return app.return_code

    try:
        code = asyncio.run(main())
    finally:
        if attached.running:
            attached.stop()
        running.stop()
        source.close()
    return code


def test_ui_on_the_running_guest_and_q_detaches(running_guest, guest_map):
    g = running_guest
    seen = {}

    def check(app, pilot):
        from diskwatch.ui.trace import TraceView
        seen["trace"] = "\n".join(app.query_one(TraceView).lines_text())
        seen["status"] = str(app.query_one("#status").render())
        seen["state"] = g.block_state()["virtio0"]

    since = time.monotonic()
    code = run_attached_ui(g, guest_map, check)
    assert code == 0
    assert seen["state"][1] == "nbd"
    assert "attached (q detaches)" in seen["status"]
    for path in g.guest.reads[3:]:  # (the UI shortens long paths from the left)
        assert path.rsplit("/", 1)[1] in seen["trace"], seen["trace"][-2000:]
    # q put the disk back.
    assert g.block_state()["virtio0"][1] == "raw"
    g.wait_ticks(1)
    assert g.max_stall(since) < MAX_STALL, g.tail()


# --- diskwatch killed while attached: the watchdog puts the disk back ------------------------


def test_kill_9_while_attached_the_watchdog_puts_the_disk_back(running_guest):
    g = running_guest
    since = time.monotonic()
    proc, err = start_attach(g, "--no-trace")
    assert g.block_state()["virtio0"][1] == "nbd"
    g.wait_ticks(1)
    proc.kill()
    proc.wait()
    # It was the watchdog that put it back (wait_back reads what it said).
    back = wait_back(err, ("virtio0",), lambda: g.block_state()["virtio0"][1], "raw")
    with g.qmp() as q:
        assert not any(n["drv"] == "nbd" for n in q.execute("query-named-block-nodes"))
    g.wait_ticks(3)
    stall = g.max_stall(since)
    print(f"kill -9: the disk was back on its file {back:.1f} s later; "
          f"longest stall of the guest's loop {stall:.1f} s")
    assert stall < MAX_STALL, g.tail()
    assert "I/O error" not in g.tail(200)


# --- last: the guest stops cleanly and its filesystem is clean ------------------------------


def test_the_guest_stops_cleanly_and_its_filesystem_is_clean(running_guest):
    g = running_guest
    assert g.stop() == 0
    g.wait_line(r"diskwatch-loop: stopped", 5)
    console = "\n".join(line for _, line in g.lines)
    assert "I/O error" not in console
    assert "MISMATCH" not in console, [ln for ln in console.splitlines() if "MISMATCH" in ln][:5]
    spec = f"{g.image}?offset={g.guest.partition_offset}"
    r = subprocess.run(["e2fsck", "-f", "-n", spec], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    # No write was lost on the way (attach, detach, the watchdog's return):
    # each of the last 15 ticks left its record in its slot of the log.
    r = subprocess.run(["debugfs", "-R", "cat /var/log/demo.log", spec], capture_output=True)
    log = r.stdout.decode()
    slots = [log[i * 4096:i * 4096 + 64] for i in range(16)]
    bursts = int(re.match(r"burst (\d+) ", slots[0]).group(1))
    print(f"the guest's burst writer wrote and read back {bursts} records, none lost")
    assert bursts > 100
    last = [n for _, n in g.ticks][-15:]
    assert len(last) == 15
    for n in last:
        assert slots[n % 15 + 1].startswith(f"loop {n} "), (n, slots)
