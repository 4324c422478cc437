"""The mapper in its own process (issue 18, item 1): a crash, a hang or a
limit reached is one line and the old map stays; the server, and a client
reading through it meanwhile, never notice. The answer it sends back is
checked as untrusted.

The mapper process is found as the server's child whose command line names
``diskwatch.bmap.worker``, and signalled from inside one of its reads (the
parent's thread is answering it, so the walk is surely in progress).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest
from fixtures_images import make_map, write_tree
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diskwatch.bmap.format import BmapEntry
from diskwatch.bmap.index import BlockMap, BmapObject
from diskwatch.bmap.worker import MapperFailed, MapperLimits, run_mapper
from diskwatch.demo.guest import MiB, make_partition_table, mkfs_ext4_at
from diskwatch.events import Bus, Progress
from diskwatch.pipeline.session import Session
from diskwatch.remap import Remapper, remap
from diskwatch.server import serve_in_thread
from diskwatch.sources.base import Layer
from diskwatch.sources.file import FileSource

nbd = pytest.importorskip("nbd")

TREE = {f"/srv/d{i % 7}/file-{i}.dat": 3000 + 97 * i for i in range(300)}


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    work = tmp_path_factory.mktemp("worker")
    path = work / "disk.img"
    with open(path, "wb") as f:
        f.truncate(32 * MiB)
    ((offset, length),) = make_partition_table(path, "dos", [(None, "83")])
    root = work / "tree"
    write_tree(root, TREE)
    mkfs_ext4_at(path, offset, length, root)
    return path, make_map(path, work / "disk.bmap")


def _mapper_pids() -> list[int]:
    """This process's children that are mapper processes."""
    pids = []
    for task in os.listdir("/proc/self/task"):
        try:
            children = Path(f"/proc/self/task/{task}/children").read_text().split()
        except OSError:
            continue
        for pid in map(int, children):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"diskwatch.bmap.worker" in cmdline:
                pids.append(pid)
    return pids


class SignalMapper(Layer):
    """Passes every read through; the ``at``-th read made by the thread
    named ``thread`` (the remap's; None: any) sends ``signum`` to the mapper
    process first."""

    def __init__(self, inner, signum: int, at: int = 10, thread: str | None = "remap"):
        super().__init__(inner)
        self.signum, self.at, self.thread = signum, at, thread
        self.mapper_reads = 0
        self.signalled: list[int] = []

    def pread(self, offset: int, length: int) -> bytes:
        if self.thread is None or threading.current_thread().name == self.thread:
            self.mapper_reads += 1
            if self.mapper_reads == self.at:
                for pid in _mapper_pids():
                    os.kill(pid, self.signum)
                    self.signalled.append(pid)
        return self.inner.pread(offset, length)


def _reader(uri: str, size: int, stop: threading.Event, errors: list, counts: list) -> None:
    h = nbd.NBD()
    h.connect_uri(uri)
    rng = random.Random(3)
    try:
        while not stop.is_set():
            try:
                h.pread(4096, rng.randrange(size // 4096) * 4096)
                counts[0] += 1
            except nbd.Error as e:
                errors.append(str(e))
    finally:
        h.shutdown()


def test_a_mapper_killed_by_sigsegv_mid_remap_costs_one_line_and_nothing_else(disk):
    path, bmap = disk
    source = SignalMapper(FileSource(str(path), readonly=True), signal.SIGSEGV)
    bus = Bus()
    running = serve_in_thread({"": source}, bus)
    old = BlockMap.load(bmap)
    session = Session(bus=bus, size=source.size, description="disk", blockmap=old)
    said: list[tuple[str, str]] = []
    swapped: list = []

    def swap(result) -> None:
        swapped.append(result)
        session.blockmap = result.blockmap
    remapper = session.pump.add(Remapper(source, current=lambda: session.blockmap, swap=swap,
                                         say=lambda text, level: said.append((text, level)),
                                         mode="key"))
    stop, errors, counts = threading.Event(), [], [0]
    reader = threading.Thread(target=_reader, args=(running.uri, source.size, stop, errors,
                                                    counts))
    reader.start()
    try:
        assert remapper.request("key")
        assert remapper.wait(60)
        session.pump.run_once(time.monotonic())
        before = counts[0]
        deadline = time.monotonic() + 10
        while counts[0] < before + 100:  # the server still answers, after the crash
            assert time.monotonic() < deadline and reader.is_alive()
            time.sleep(0.01)
    finally:
        stop.set()
        reader.join(30)
        running.stop()
    assert source.signalled, "the mapper was never found to signal"
    assert errors == []
    assert swapped == [] and session.blockmap is old
    assert len(said) == 1, said
    text, level = said[0]
    assert text.startswith("remap (key) failed: the mapper crashed (SIGSEGV)"), text
    assert text.endswith("the old map stays") and level == "warning"
    assert not _mapper_pids()  # reaped
    # And the next remap, with no signal, maps.
    source.at = -1
    assert remapper.request("key") and remapper.wait(60)
    session.pump.run_once(time.monotonic())
    assert len(swapped) == 1 and session.blockmap is swapped[0].blockmap
    # The remapper keeps its mapper process for the next remap (an update),
    # until it is closed.
    assert _mapper_pids()
    remapper.close()
    assert not _mapper_pids()
    source.close()


def test_a_hung_mapper_is_stopped_at_its_wall_time(disk):
    path, _ = disk
    source = SignalMapper(FileSource(str(path), readonly=True), signal.SIGSTOP, thread=None)
    t0 = time.monotonic()
    try:
        with pytest.raises(MapperFailed, match=r"took longer than its 2 s and was stopped"):
            run_mapper(source, {}, limits=MapperLimits(wall=2.0))
    finally:
        source.close()
    assert 1.5 < time.monotonic() - t0 < 15
    assert source.signalled and not _mapper_pids()


def _deadlocking_iso(path: Path, depth: int = 3000) -> Path:
    """The deep chain of directories with names of 221 characters, with the
    volume's size and block size filled in so that The Sleuth Kit opens it:
    its ``open_dir`` then waits for good on a futex (seen in /proc: TSK's
    own lock, no other thread), in a process of its own or in the server's."""
    from test_bmap_more_filesystems import SECTOR, build_deep_iso
    build_deep_iso(path, depth)
    blocks = 18 + depth + 1
    with open(path, "r+b") as f:
        f.seek(16 * SECTOR + 80)
        f.write(blocks.to_bytes(4, "little") + blocks.to_bytes(4, "big"))
        f.seek(16 * SECTOR + 120)
        f.write(b"".join(n.to_bytes(2, "little") + n.to_bytes(2, "big") for n in (1, 1, SECTOR)))
    return path


def test_a_walk_that_never_returns_is_stopped_when_it_goes_silent(tmp_path):
    iso = _deadlocking_iso(tmp_path / "deadlock.iso")
    t0 = time.monotonic()
    with FileSource(str(iso), readonly=True) as source:
        result = remap(source, None, why="test", limits=MapperLimits(idle=3.0))
    assert result.blockmap is None
    assert result.line() == ("remap (test) failed: the mapper did nothing for 3 s and was "
                             "stopped; the old map stays")
    assert time.monotonic() - t0 < 30
    assert not _mapper_pids()


def test_the_mapper_runs_confined(disk):
    """Seen from outside, in the middle of a walk: its limits, and a network
    namespace of its own (as root, as CI runs)."""
    seen = {}

    class Look(Layer):
        def pread(self, offset: int, length: int) -> bytes:
            if not seen:
                (pid,) = _mapper_pids()
                seen["limits"] = Path(f"/proc/{pid}/limits").read_text()
                seen["net"] = os.readlink(f"/proc/{pid}/ns/net")
                seen["fds"] = os.listdir(f"/proc/{pid}/fd")
            return self.inner.pread(offset, length)
    path, _ = disk
    limits = MapperLimits(memory=3 << 30, cpu=321)
    with Look(FileSource(str(path), readonly=True)) as source:
        answer = run_mapper(source, {}, limits=limits)
    assert len(answer.blockmap) > len(TREE)
    rows = {line[:26].strip(): line[26:].split() for line in seen["limits"].splitlines()[1:]}
    assert rows["Max address space"][:2] == [str(3 << 30)] * 2
    assert rows["Max cpu time"][0] == "321"
    assert rows["Max file size"][:2] == ["0", "0"]
    assert rows["Max open files"][:2] == ["0", "0"]
    assert rows["Max core file size"][:2] == ["0", "0"]
    assert sorted(seen["fds"], key=int) == ["0", "1", "2", str(min(
        int(fd) for fd in seen["fds"] if int(fd) > 2))]  # stdio (null) and its socket
    if os.geteuid() == 0:
        assert seen["net"] != os.readlink("/proc/self/ns/net")
        assert answer.info["confined"] == "network namespace"


def test_the_mapper_answers_the_same_map_as_a_walk_in_process_and_is_confined(disk):
    from diskwatch.bmap.metadata import map_metadata
    path, _ = disk
    bus = Bus()
    progress: list[Progress] = []
    bus.on_event(lambda e: progress.append(e) if isinstance(e, Progress) else None)
    with FileSource(str(path), readonly=True) as source:
        answer = run_mapper(source, {"text": True}, bus=bus)
        here = BlockMap(map_metadata(source, done_event=False).entries)
    assert list(answer.blockmap.iter_entries()) == list(here.iter_entries())
    assert len(answer.blockmap) > len(TREE)
    assert answer.text.count(b"\n") == len(here)
    assert progress and all(p.phase != "done" for p in progress)
    assert answer.info["reads"] > 0


def test_a_source_that_cannot_be_read_gives_the_mapper_errnos_not_a_crash(disk):
    class Failing(Layer):
        def pread(self, offset: int, length: int) -> bytes:
            if offset > 1 * MiB:
                raise OSError(5, "Input/output error")
            return self.inner.pread(offset, length)
    path, _ = disk
    with Failing(FileSource(str(path), readonly=True)) as source, \
            pytest.raises(MapperFailed, match=r"Input/output error") as failed:
        run_mapper(source, {})
    assert "\n" not in str(failed.value) and not failed.value.fatal


# --- the answer is untrusted ---------------------------------------------------------

def _a_map() -> BlockMap:
    rng = random.Random(5)
    entries = [BmapEntry(1, 0, 64 * MiB, "v", "/dev/sda"),
               BmapEntry(1, MiB, 60 * MiB, "p", "/dev/sda1")]
    for i in range(60):
        s = rng.randrange(MiB, 59 * MiB)
        entries.append(BmapEntry(1, s, s + rng.randrange(1, 300_000), "fd"[i % 5 == 0],
                                 "/dev/sda1", f"/d/f{i} \udcff"))
    return BlockMap(entries)


def test_a_flat_map_round_trips_exactly():
    bm = _a_map()
    again = BlockMap.from_flat(bm.to_flat())
    assert list(again.iter_entries()) == list(bm.iter_entries())
    assert again.partitions() == bm.partitions()
    rng = random.Random(1)
    for _ in range(2000):
        off, n = rng.randrange(70 * MiB), rng.randrange(1, 4 * MiB)
        assert again.lookup(off, n) == bm.lookup(off, n)
    obj = BmapObject("f", "/dev/sda1", "/d/f1 \udcff")
    assert again.ranges_of(obj) == bm.ranges_of(obj)
    assert BlockMap.from_flat(BlockMap([]).to_flat()).lookup(0, 9) == [(0, 9, None)]


FLAT = _a_map().to_flat()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(FLAT) - 1), st.integers(0, 255)),
                min_size=1, max_size=8),
       st.integers(0, len(FLAT)))
def test_a_damaged_flat_map_is_refused_or_looks_up_without_failing(flips, cut):
    """A compromised mapper may answer anything: it is refused, or it names
    bytes (rightly or not), but a lookup never raises."""
    blob = bytearray(FLAT[:cut] if cut < len(FLAT) // 2 else FLAT)
    for at, value in flips:
        if at < len(blob):
            blob[at] = value
    try:
        bm = BlockMap.from_flat(bytes(blob))
    except ValueError:
        return
    rng = random.Random(len(blob))
    for _ in range(200):
        for start, end, obj in bm.lookup(rng.randrange(1 << 40), rng.randrange(1, 1 << 24)):
            assert start < end and (obj is None or isinstance(obj, BmapObject))
        bm.first(rng.randrange(1 << 40), rng.randrange(1, 1 << 20))
    bm.partitions()


def test_the_mapper_limits_are_options_and_a_limit_reached_is_one_line(tmp_path):
    import subprocess

    from fixtures_server import DISKWATCH
    iso = _deadlocking_iso(tmp_path / "deadlock.iso")
    out = tmp_path / "map"
    r = subprocess.run([DISKWATCH, "bmap", str(iso), "-o", str(out), "--mapper-time", "3"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and not out.exists()
    assert r.stderr.strip().splitlines() == [
        f"diskwatch: block map of file {iso}: the mapper took longer than its 3 s and was "
        "stopped"], r.stderr
    r = subprocess.run([DISKWATCH, "bmap", str(iso), "-o", str(out), "--mapper-memory", "10M"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--mapper-memory: the mapper needs 256M at least" in r.stderr


def test_a_send_that_waits_on_a_busy_mapper_is_not_its_end():
    """A big job (the old map) for a mapper that reads it late (just
    started, still importing; a loaded machine): the send waits, ticking
    (the parent's checks of time and cancellation), and every byte arrives.
    A timed-out send was taken for the mapper's end ("stopped answering")
    and cost a real boot its first walk under load."""
    import socket

    from diskwatch.bmap.worker import _HEAD, _Channel
    ours, theirs = socket.socketpair()
    ticked = threading.Event()
    payload = bytes(range(256)) * (32 << 10)  # 8 MiB: many socket buffers
    got = bytearray()

    def mapper() -> None:
        ticked.wait(30)  # reads only once the parent has had to wait
        want = _HEAD.size + len(payload)
        while len(got) < want:
            chunk = theirs.recv(1 << 20)
            if not chunk:
                break
            got.extend(chunk)

    t = threading.Thread(target=mapper)
    t.start()
    try:
        _Channel(ours, ticked.set).send(b"O", payload)
    finally:
        t.join(30)
        ours.close()
        theirs.close()
    assert ticked.is_set()
    assert bytes(got[_HEAD.size:]) == payload and _HEAD.unpack(got[:_HEAD.size]) == (b"O", len(payload))
