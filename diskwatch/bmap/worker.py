"""The mapper's own process: filesystem parsers never run in the server's.

The metadata method runs The Sleuth Kit (C) and diskwatch's own walkers
over structures the guest writes. A crafted ``$MFT`` or a directory cycle
must cost at most a failed remap, never the disk the guest is using, and a
walk of 500,000 files must not hold the server's interpreter for seconds.
So every metadata walk (the first map of ``--bmap``, ``diskwatch bmap``, every
remap) runs here, in a process of its own, as libguestfs runs filesystem
code in an appliance::

    server's process                               mapper process
    ----------------                               --------------
    run_mapper(source, job) --- socketpair ------> main(): limits first
      J job (JSON), O old map (flat)      ------>    map_metadata(ChannelSource)
      thread: D data / E errno  <-- R offset,len --    pread -> one R per read
      bus <- Progress           <-- P progress ---
      BlockMap.from_flat        <-- A answer -----   BlockMap(...).to_flat()
      MapperFailed(one line)    <-- X error, EOF, a signal, a limit

**How it reads the disk.** It has no file, no descriptor of the image and
no address: one end of a socketpair. Each ``pread`` of the walk is a frame
``R offset length``; the parent's calling thread answers it with
``source.pread`` on the *served* source (a ``--snapshot`` overlay, a qcow2,
an xz image or a URL are read exactly as the guest sees them), at most
``MAX_READ`` bytes, inside the disk. The Sleuth Kit reads in 64 KiB blocks
through its own cache, so a 100,000-file ext4 walk is a few thousand
frames. The thread blocks in ``recv`` with the GIL released: the server's
interpreter spends a few microseconds a read on it, and ``from_flat`` once.

**What bounds it** (``MapperLimits``; said in one line when reached, the
old map stays):

- memory: ``RLIMIT_AS`` (default 4 GiB; a 1,000,000-object walk peaks near
  600 MB), set before anything is parsed;
- CPU: ``RLIMIT_CPU`` (default 600 s a job), then SIGXCPU; wall time: the parent
  kills it after ``wall`` seconds (default 600), after ``idle`` seconds
  without a frame (default 60: a walk reads all the time, so silence is a
  hang; a crafted ISO 9660 makes The Sleuth Kit wait for good on a lock of
  its own), and when the remap is cancelled (the session ends);
- its answer: at most ``answer`` bytes (default 1 GiB), checked before the
  parent allocates it; every other frame at most ``MAX_FRAME``;
- nothing to write: ``RLIMIT_FSIZE`` 0, no core dumps, ``RLIMIT_NOFILE`` 0
  once the walk's modules are imported (no file or socket can be opened),
  ``PR_SET_NO_NEW_PRIVS``, and it dies with its parent (``PR_SET_PDEATHSIG``);
- no network: a network namespace of its own with only a loopback that is
  down (``unshare(CLONE_NEWNET)``, as root, or in a user namespace where
  unprivileged ones are allowed). Where neither is allowed it runs without,
  and the answer says so (``confined``): it can open no socket anyway.

**What it answers** is checked as untrusted (``BlockMap.from_flat``): a
compromised mapper can name bytes wrongly, not crash the server or make it
allocate what it chooses. Its names are text like any the guest wrote.

**One process per session, job after job** (``MapperSession``). ``diskwatch
bmap`` and the first map of ``--bmap`` run one job in a new process
(``run_mapper``). A live session's remapper keeps its process, which keeps
what its last walk found (``incremental.py``'s ``MapperState``), so an
automatic remap is an *update* that reads again only what the guest wrote
and answers a patch (``BlockMap.patched``) instead of the map. Each job has
a walk's limits (the wall and idle times are the parent's; the CPU limit is
set again for each job with ``prlimit``: what the process used so far plus
``cpu``). A job that fails ends its process (a crash, a limit, a hang, a
malformed answer), and the next job starts a new one with the whole walk.
What a hostile filesystem can do to a kept process is what it could do to
one walk: the process is as confined, and its answers as untrusted; it can
name bytes wrongly in the next answers too, until a whole walk.

Why this module is over 800 lines: it is both ends of one protocol (the
parent's ``run_mapper``/``MapperSession`` and the child's ``main``), whose
frames, limits and checks must agree; split, each half would import the
other's definitions. The walks themselves live elsewhere (metadata.py,
incremental.py, vm.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import DiskwatchError

__all__ = ["MAX_READ", "MapperAnswer", "MapperFailed", "MapperLimits", "MapperSession",
           "run_mapper"]

#: one read the mapper may ask for (TSK asks 64 KiB; the ISO walker up to a few MiB)
MAX_READ = 32 << 20
#: any frame from the mapper but its answer
MAX_FRAME = 1 << 20
#: Progress events passed on to the bus, at most, a second
PROGRESS_RATE = 20

_HEAD = struct.Struct("<cI")  # kind, payload length
_READ = struct.Struct("<QI")  # offset, length


@dataclass(frozen=True)
class MapperLimits:
    """What one mapper process may spend (see the module docstring)."""

    memory: int = 4 << 30
    cpu: int = 600
    wall: float = 600.0
    #: seconds without a frame (a read, progress) before it is taken as hung
    idle: float = 60.0
    answer: int = 1 << 30


class MapperFailed(DiskwatchError):
    """The mapper ended without an answer: one line saying why."""

    def __init__(self, message: str, *, fatal: bool = False, cancelled: bool = False):
        super().__init__(message)
        #: it cannot run at all (pytsk3 missing): trying again is no use
        self.fatal = fatal
        self.cancelled = cancelled


@dataclass
class MapperAnswer:
    """What the mapper said: its JSON ``info`` and the map, unpacked."""

    info: dict
    blockmap: object  # BlockMap
    text: bytes = b""  # the map's lines (a job with "text"), for a map file
    #: ext3/4: the journal's blocks by the object whose metadata each carries
    journal: object = None
    #: an update's answer: (objects gone, ranges added) for ``BlockMap.patched``
    #: of the map the process last answered (``blockmap`` is then None)
    patch: tuple | None = None
    #: a ``vm`` job's other disks' maps (disk 2, ...; ``blockmap`` is disk 1's)
    more: list = field(default_factory=list)


# --------------------------------------------------------------------------
# the server's side


def run_mapper(source, job: dict, *, old_flat: bytes | None = None, bus=None,
               cancelled: Callable[[], bool] | None = None,
               limits: MapperLimits | None = None) -> MapperAnswer:
    """Run one mapper process over ``source`` and return its answer.

    Runs in the calling thread (the main thread for ``diskwatch bmap``),
    which serves the mapper's reads. ``job``: ``disk`` (the device name,
    "/dev/sda"), ``text`` (also answer the map's lines). With ``old_flat``
    (``BlockMap.to_flat()`` of the map in use) the mapper keeps what it could
    not read from it and says how the maps differ. A ``vm`` job (``"kind":
    "vm", "disks": [[device, size], ...]``) maps the disks of a VM
    together: ``source`` is their ``vm.DiskSet``, and the answer has a map
    per disk (``blockmap``, then ``more``). Raises ``MapperFailed``
    (one line) for every way it can end without an answer; never anything
    else for what the disk holds."""
    session = MapperSession(source, limits=limits)
    try:
        return session.run(job, old_flat=old_flat, bus=bus, cancelled=cancelled)
    finally:
        session.close()


class MapperSession:
    """One mapper process kept for a session's remaps, job after job.

    A job is the whole walk (``{"kind": "walk", "keep": True}``: the process
    keeps what it found) or an **update** (``{"kind": "update", "dirty":
    [[start, end], ...]}``: the disk byte ranges the guest wrote to named
    structures since the last answer), which reads again only what those
    ranges name (``incremental.py``) and answers ``same`` when nothing
    changed. The first job, or any after a failure, starts a new process:
    a crash, a limit or a hang costs that job, and the next one walks anew.

    Each job has the limits of a walk: the wall time and the idle time are
    the parent's (it kills the process), the CPU time is set for each job
    with ``prlimit`` (the process's use so far plus ``limits.cpu``). The
    process must be started and used from one long-lived thread: it dies
    with the thread that started it (``PR_SET_PDEATHSIG``).
    """

    def __init__(self, source, *, limits: MapperLimits | None = None):
        self.source = source
        self.limits = limits or MapperLimits()
        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        #: the process holds a walk's state (an update can start from it)
        self.has_state = False
        #: the map the process's state is (set by the caller: the answer's map)
        self.answered = None
        self.jobs = 0  # jobs answered by the running process

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def run(self, job: dict, *, old_flat: bytes | None = None, bus=None,
            cancelled: Callable[[], bool] | None = None) -> MapperAnswer:
        """One job; raises ``MapperFailed`` (and ends the process) as ``run_mapper``."""
        from .index import BlockMap
        limits = self.limits
        cancelled = cancelled or (lambda: False)
        source = self.source
        job = dict(job, size=source.size, description=source.description or "a disk",
                   old=old_flat is not None)
        if self._proc is None or self._proc.poll() is not None:
            self._start()
        proc, sock = self._proc, self._sock
        assert proc is not None and sock is not None
        self._cpu_for_job(proc, limits.cpu)
        deadline = time.monotonic() + limits.wall
        channel = _Channel(sock, lambda: _check(proc, cancelled, deadline, limits, channel))
        ok = False
        try:
            try:
                channel.send(b"J", json.dumps(job).encode())
                if old_flat is not None:
                    channel.send(b"O", old_flat)
                while True:
                    kind, payload = channel.recv(b"A", limits.answer)
                    if kind == b"R":
                        _serve_read(channel, source, payload)
                    elif kind == b"P":
                        _progress(bus, payload, channel)
                    elif kind == b"A":
                        answer = _answer(payload, BlockMap)
                        ok = True
                        self.jobs += 1
                        self.has_state = bool(job.get("keep"))
                        return answer
                    elif kind == b"X":
                        ok = True  # it said why; the process goes on, without its state
                        self.has_state = False
                        self.answered = None
                        _failed(payload)
                    else:
                        raise MapperFailed(f"the mapper said something unknown ({kind!r})")
            except _Ended:
                raise _why_ended(proc, limits) from None
        finally:
            if not ok:
                self.close()

    def _start(self) -> None:
        self.close()
        ours, theirs = socket.socketpair()
        try:
            self._proc = _spawn(theirs, self.limits)
        except OSError as e:
            ours.close()
            raise MapperFailed(f"the mapper process cannot start: {e}") from None
        finally:
            theirs.close()
        self._sock = ours
        self.has_state = False
        self.jobs = 0

    @staticmethod
    def _cpu_for_job(proc: subprocess.Popen, cpu: int) -> None:
        """This job may use ``cpu`` seconds more than the process has so far."""
        import resource
        try:
            with open(f"/proc/{proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            used = (int(fields[11]) + int(fields[12])) // os.sysconf("SC_CLK_TCK")
            resource.prlimit(proc.pid, resource.RLIMIT_CPU,
                             (used + cpu, resource.RLIM_INFINITY))
        except (OSError, ValueError, IndexError):
            pass  # it has ended: the job's first frame says so

    def close(self) -> None:
        sock, proc = self._sock, self._proc
        self._sock = self._proc = None
        self.has_state = False
        self.answered = None
        if sock is not None:
            sock.close()
        if proc is not None:
            _reap(proc)


class _Ended(Exception):
    """The mapper's end of the socket closed."""


def _spawn(sock: socket.socket, limits: MapperLimits) -> subprocess.Popen:
    import diskwatch
    root = os.path.dirname(os.path.dirname(os.path.abspath(diskwatch.__file__)))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8",
           "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))}
    # Its tracebacks are for a developer (-v shows the log): a person gets
    # the one line run_mapper raises.
    verbose = os.environ.get("DISKWATCH_MAPPER_STDERR") == "1"
    return subprocess.Popen(
        [sys.executable, "-m", "diskwatch.bmap.worker", str(sock.fileno()),
         str(limits.memory), str(limits.cpu)],
        pass_fds=(sock.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=None if verbose else subprocess.DEVNULL, cwd="/", env=env,
        start_new_session=True)  # a ^C in the terminal is diskwatch's to handle


def _check(proc: subprocess.Popen, cancelled: Callable[[], bool], deadline: float,
           limits: MapperLimits, channel: _Channel) -> None:
    """Between two waits for the mapper: end it if it must end."""
    if cancelled():
        proc.kill()
        raise MapperFailed("block-map generation cancelled", cancelled=True)
    now = time.monotonic()
    if now > deadline:
        proc.kill()
        raise MapperFailed(f"the mapper took longer than its {limits.wall:g} s and was stopped")
    if now - channel.last_frame > limits.idle:
        # A walk reads all the time (TSK in 64 KiB blocks): silence is a hang,
        # such as The Sleuth Kit waiting for good on a lock of its own.
        proc.kill()
        raise MapperFailed(f"the mapper did nothing for {limits.idle:g} s and was stopped")


def _serve_read(channel: _Channel, source, payload: bytes) -> None:
    if len(payload) != _READ.size:
        raise MapperFailed("the mapper sent a malformed read")
    offset, length = _READ.unpack(payload)
    if length > MAX_READ or offset > source.size or length > source.size - offset:
        channel.send(b"E", json.dumps({"errno": errno.EINVAL, "error": (
            f"read of {length} bytes at {offset} outside the disk or over {MAX_READ}")}).encode())
        return
    try:
        data = source.pread(offset, length)
    except OSError as e:
        channel.send(b"E", json.dumps({"errno": e.errno or errno.EIO,
                                       "error": str(e)[:500]}).encode())
        return
    if len(data) != length:
        channel.send(b"E", json.dumps({"errno": errno.EIO, "error": "short read"}).encode())
        return
    channel.send(b"D", data)


def _progress(bus, payload: bytes, channel: _Channel) -> None:
    if bus is None:
        return
    now = time.monotonic()
    if now - channel.last_progress < 1 / PROGRESS_RATE:
        return
    from ..events import Progress
    try:
        p = json.loads(payload)
        event = Progress(str(p["phase"])[:32], str(p["current"])[:4096], int(p["done"]),
                         int(p["total"]), float(p["rate"]), float(p["elapsed"]))
    except (ValueError, KeyError, TypeError):
        return  # a malformed progress line is no reason to stop a walk
    channel.last_progress = now
    bus.publish(event)


def _answer(payload: bytes, BlockMap) -> MapperAnswer:
    mv = memoryview(payload)
    try:
        (ilen,) = struct.unpack_from("<I", mv, 0)
        info = json.loads(bytes(mv[4:4 + ilen]))
        flat_len, text_len = int(info["flat"]), int(info.get("text", 0))
        journal_len = int(info.get("journal", 0))
        if min(flat_len, text_len, journal_len) < 0 or \
                4 + ilen + flat_len + text_len + journal_len != len(mv):
            raise ValueError("lengths do not add up")
        start = 4 + ilen
        patch = None
        more: list = []
        if info.get("same") is True and flat_len == 0:
            blockmap = None  # an update that changed nothing: the map in use stays
        elif "patch" in info:
            blockmap, patch = None, _patch(info["patch"], mv[start:start + flat_len])
        elif "flats" in info:  # a vm job: one map per disk, one after the other
            lengths = [int(n) for n in info["flats"]]
            if not lengths or min(lengths) < 0 or sum(lengths) != flat_len:
                raise ValueError("the disks' maps do not add up")
            at, maps = start, []
            for n in lengths:
                maps.append(BlockMap.from_flat(mv[at:at + n]))
                at += n
            blockmap, more = maps[0], maps[1:]
        else:
            blockmap = BlockMap.from_flat(mv[start:start + flat_len])
        text = bytes(mv[start + flat_len:start + flat_len + text_len])
        journal = (BlockMap.from_flat(mv[start + flat_len + text_len:]) if journal_len
                   else None)
    except (struct.error, ValueError, KeyError, TypeError) as e:
        raise MapperFailed(f"the mapper's answer is malformed ({e})") from None
    return MapperAnswer(info, blockmap, text, journal, patch, more)


def _patch(head: dict, packed: memoryview) -> tuple[set, list]:
    """An update's patch, checked as untrusted (``BlockMap.patched`` checks
    the ranges and types)."""
    from .index import BmapObject

    def obj(o) -> BmapObject:
        if not (isinstance(o, list) and len(o) == 3 and all(isinstance(x, str) for x in o[:2])
                and (o[2] is None or isinstance(o[2], str))):
            raise ValueError("a patch names an object wrongly")
        return BmapObject(*o)
    gone = {obj(o) for o in head["gone"]}
    table = [obj(o) for o in head["objects"]]
    n = int(head["fresh"])
    if n < 0 or len(packed) != n * 20:
        raise ValueError("a patch's ranges do not add up")
    starts, ends, idx = array("Q"), array("Q"), array("I")
    starts.frombytes(packed[:8 * n])
    ends.frombytes(packed[8 * n:16 * n])
    idx.frombytes(packed[16 * n:])
    if n and max(idx) >= len(table):
        raise ValueError("a patch's range names no object")
    return gone, list(zip(starts, ends, map(table.__getitem__, idx), strict=True))


def _failed(payload: bytes) -> None:
    try:
        said = json.loads(payload)
        message, fatal = str(said["error"]), bool(said.get("fatal"))
    except (ValueError, KeyError, TypeError):
        message, fatal = "the mapper failed", False
    raise MapperFailed(" ".join(message.split())[:500], fatal=fatal)


def _why_ended(proc: subprocess.Popen, limits: MapperLimits) -> MapperFailed:
    try:
        code = proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        return MapperFailed("the mapper stopped answering and was stopped")
    if code == -signal.SIGXCPU:
        return MapperFailed(f"the mapper used its {limits.cpu} s of CPU and was stopped")
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        hint = (f" (at its {_gib(limits.memory)} memory limit?)"
                if -code in (signal.SIGSEGV, signal.SIGABRT, signal.SIGKILL) else "")
        return MapperFailed(f"the mapper crashed ({name}){hint}")
    return MapperFailed(f"the mapper exited with status {code} without an answer")


def _gib(n: int) -> str:
    return f"{n / (1 << 30):g} GiB" if n >= 1 << 30 else f"{n >> 20} MiB"


def _reap(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


class _Channel:
    """Frames over one end of the socketpair: ``kind`` (one byte), a length,
    the payload. ``tick`` runs whenever a wait gives up for a moment (the
    parent's checks of cancellation and time); None: wait for good."""

    WAIT = 0.25

    def __init__(self, sock: socket.socket, tick: Callable[[], None] | None = None):
        self.sock = sock
        self.tick = tick
        self.last_progress = float("-inf")
        self.last_frame = time.monotonic()
        sock.settimeout(self.WAIT if tick is not None else None)

    def send(self, kind: bytes, payload: bytes | bytearray | memoryview) -> None:
        self._all(_HEAD.pack(kind, len(payload)))
        self._all(payload)

    def _all(self, data: bytes | bytearray | memoryview) -> None:
        """Everything sent. A wait that gives up is not an end: the other
        side may be busy a moment (a mapper just started, still importing,
        reads its first job late: a big old map filled the socket and a
        timed-out sendall was taken for the mapper's end, "stopped
        answering", under load). ``tick`` decides when waiting is over."""
        view = memoryview(data).cast("B")
        while view:
            try:
                n = self.sock.send(view)
            except (BrokenPipeError, ConnectionResetError):
                raise _Ended() from None
            except TimeoutError:
                if self.tick is not None:
                    self.tick()
                continue
            view = view[n:]

    def recv(self, big: bytes = b"", limit: int = MAX_FRAME) -> tuple[bytes, bytearray]:
        """The next frame; one of kind ``big`` may be up to ``limit`` bytes,
        any other up to ``MAX_FRAME`` (checked before anything is allocated)."""
        kind, length = _HEAD.unpack(self._exactly(_HEAD.size))
        self.last_frame = time.monotonic()
        if length > (limit if kind == big else MAX_FRAME):
            raise MapperFailed(f"the mapper's {kind!r} frame would be {length} bytes, over "
                               f"its limit of {limit if kind == big else MAX_FRAME}")
        return kind, self._exactly(length)

    def _exactly(self, n: int) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                k = self.sock.recv_into(view[got:], min(n - got, 1 << 22))
            except TimeoutError:
                if self.tick is not None:
                    self.tick()
                continue
            except ConnectionResetError:
                k = 0
            if k == 0:
                raise _Ended()
            got += k
        return buf


# --------------------------------------------------------------------------
# the mapper's side


def _confine(memory: int, cpu: int) -> str:
    """Limits first, before anything the guest wrote is read. Returns how
    the network was taken away ("" where it could not be)."""
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    # The soft limit is set again for each job by the parent (prlimit); a
    # mapper that lifted it itself still meets the parent's wall time.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, resource.RLIM_INFINITY))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if os.getppid() == 1:  # the parent died before PDEATHSIG was set
        os._exit(1)
    CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
    if libc.unshare(CLONE_NEWNET) == 0:
        return "network namespace"
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
        return "user and network namespace"
    return ""


class _ChannelSource:
    """The disk as the mapper sees it: every read a frame to the parent.
    Duck-typed as a ``Source`` (size, description, pread)."""

    blocking = True

    def __init__(self, channel: _Channel, size: int, description: str):
        self.channel = channel
        self.size = size
        self.description = description
        self.reads = 0

    def pread(self, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        out = bytearray()
        while length > 0:  # the parent answers at most MAX_READ at once
            n = min(length, MAX_READ)
            self.reads += 1
            self.channel.send(b"R", _READ.pack(offset, n))
            kind, payload = self.channel.recv(b"D", MAX_READ)
            if kind == b"E":
                said = json.loads(payload)
                raise OSError(int(said["errno"]), str(said["error"]))
            if kind != b"D" or len(payload) != n:
                raise OSError(errno.EIO, "the server answered a read wrongly")
            if not out and n == length:
                return bytes(payload)
            out += payload
            offset += n
            length -= n
        return bytes(out)


class _ProgressBus:
    """What ``map_metadata`` publishes to, sent on as P frames."""

    def __init__(self, channel: _Channel):
        self.channel = channel

    def publish(self, event) -> None:
        from ..events import Progress
        if isinstance(event, Progress) and event.phase != "done":
            self.channel.send(b"P", json.dumps({
                "phase": event.phase, "current": event.current, "done": event.done,
                "total": event.total, "rate": event.rate, "elapsed": event.elapsed}).encode())


def main(argv: list[str]) -> int:
    fd, memory, cpu = int(argv[0]), int(argv[1]), int(argv[2])
    confined = _confine(memory, cpu)
    channel = _Channel(socket.socket(fileno=fd))
    try:
        kind, payload = channel.recv()
        # Everything the walk needs, imported now: after this no file opens.
        import codecs

        from .format import BmapEntry, _sort_key, format_entry  # noqa: F401
        from .incremental import MapperState, NeedsFullWalk  # noqa: F401
        from .index import BlockMap  # noqa: F401
        from .luks import luks_volumes  # noqa: F401 - volumes.assemble's, imported late
        from .md import md_volumes  # noqa: F401
        from .metadata import MetadataError, _import_tsk, map_metadata, map_vm  # noqa: F401
        from .ntfs import map_ntfs  # noqa: F401 - NTFS that TSK refuses
        from .vm import find_vm_volumes  # noqa: F401
        with contextlib.suppress(ImportError):
            import pyfsntfs  # noqa: F401
        for name in ("utf-8", "utf-16-be", "utf-16-le", "utf-16", "latin-1", "ascii", "cp437"):
            codecs.lookup(name)  # an encoding is a module imported when first used
        try:
            pytsk3 = _import_tsk()
        except MetadataError as e:
            channel.send(b"X", json.dumps({"error": str(e), "fatal": True}).encode())
            return 0
        import resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (0, 0))
        state = None
        source = None
        while True:  # one job after another, until the parent closes its end
            job = json.loads(payload)
            old_flat = channel.recv(b"O", 1 << 40)[1] if job.get("old") else None
            if source is None or source.size != int(job["size"]):
                source, state = _ChannelSource(channel, int(job["size"]),
                                               str(job["description"])), None
            try:
                state = _job(channel, job, source, old_flat, confined, pytsk3, state)
            except MemoryError:
                state = None
                channel.send(b"X", json.dumps({"error": (
                    f"the mapper reached its {_gib(memory)} memory limit")}).encode())
            except MetadataError as e:
                state = None
                channel.send(b"X", json.dumps({"error": str(e), "fatal": True}).encode())
            except Exception as e:  # noqa: BLE001 - a disk may hold anything: said in one line
                state = None
                channel.send(b"X", json.dumps({"error": f"{type(e).__name__}: {e}"}).encode())
            kind, payload = channel.recv()
    except _Ended:
        return 1
    return 0


def _job(channel: _Channel, job: dict, source: _ChannelSource, old_flat, confined: str,
         pytsk3, state):
    """One job: ``update`` (the byte ranges written since the last answer:
    read again what they name, ``incremental.py``) or the whole walk.
    Returns the state the next update starts from."""
    from .incremental import NeedsFullWalk
    if job.get("kind") == "vm":
        _walk_vm(channel, job, source, confined)
        return None
    why_full = ""
    if job.get("kind") == "update":
        if state is None:
            why_full = "no walk to start from"
        else:
            try:
                return _update(channel, job, state, confined)
            except NeedsFullWalk as e:
                why_full = str(e)
    return _walk(channel, job, source, old_flat, confined, pytsk3, why_full,
                 None if state is None else state.blockmap)


def _update(channel: _Channel, job: dict, state, confined: str):
    from .index import BlockMap
    t0 = time.monotonic()
    reads = state.source.reads
    dirty = [(int(s), int(e)) for s, e in job.get("dirty", ()) if 0 <= int(s) < int(e)]
    up = state.update(dirty, cancelled=lambda: False)
    info: dict = {
        "incremental": {"dirs": up.dirs, "inodes": up.inodes, "journals": up.journals,
                        "dirty": len(dirty)},
        "warnings": up.warnings, "objects": len(up.blockmap.object_table()),
        "reads": state.source.reads - reads, "confined": confined,
        "added_objects": [list(o) for o in up.added], "removed": [list(o) for o in up.removed],
        "changed": up.changed, "added": [],
    }
    # Not the map: the patch the parent applies to its own copy of the same
    # map (BlockMap.patched), so an update costs what changed on both sides.
    flat = journal = b""
    if not up.same:
        table = list(dict.fromkeys(o for _, _, o in up.fresh))
        index = {o: i for i, o in enumerate(table)}
        info["patch"] = {"gone": [list(o) for o in up.gone], "objects": [list(o) for o in table],
                         "fresh": len(up.fresh)}
        flat = b"".join((array("Q", [f[0] for f in up.fresh]).tobytes(),
                         array("Q", [f[1] for f in up.fresh]).tobytes(),
                         array("I", [index[f[2]] for f in up.fresh]).tobytes()))
    if not up.same or up.journal_changed:
        journal = BlockMap(up.journal).to_flat() if up.journal else b""
    info["journal_changed"] = not up.same or up.journal_changed
    info["same"] = up.same
    info["flat"], info["text"], info["journal"] = len(flat), 0, len(journal)
    info["mapped"] = time.monotonic() - t0
    head = json.dumps(info).encode()
    channel.send(b"A", b"".join((struct.pack("<I", len(head)), head, flat, journal)))
    return state


def _walk(channel: _Channel, job: dict, source: _ChannelSource, old_flat, confined: str,
          pytsk3, why_full: str = "", old_map=None):
    from .format import _sort_key, format_entry
    from .incremental import MapperState
    from .index import BlockMap
    from .metadata import map_metadata
    t0 = time.monotonic()
    walked: dict = {}
    meta = map_metadata(source, disk=str(job.get("disk", "/dev/sda")),
                        bus=_ProgressBus(channel), done_event=False,
                        keep=walked if job.get("keep") else None)
    entries = meta.entries
    info: dict = {
        "filesystems": [vars(f) for f in meta.filesystems], "warnings": meta.warnings,
        "objects": meta.objects, "elapsed": meta.elapsed, "reads": source.reads,
        "confined": confined,
    }
    if why_full:
        info["full_because"] = why_full
    old = BlockMap.from_flat(old_flat) if old_flat is not None else old_map
    if old is not None:
        info["kept"] = keep_unread(meta, old.entries())
    text = b""
    if job.get("text"):
        text = b"".join(map(format_entry, sorted(entries, key=_sort_key)))
    blockmap = BlockMap(entries)
    if old is not None:
        info.update(compare(old, blockmap))
    flat = blockmap.to_flat()
    journal = BlockMap(meta.journal).to_flat() if meta.journal else b""
    info["flat"], info["text"], info["journal"] = len(flat), len(text), len(journal)
    info["mapped"] = time.monotonic() - t0
    # The state reads what it needs now: after the answer the parent
    # serves no reads until the next job.
    state = MapperState(pytsk3, source, meta, walked, blockmap) if job.get("keep") else None
    head = json.dumps(info).encode()
    channel.send(b"A", b"".join((struct.pack("<I", len(head)), head, flat, text, journal)))
    return state


#: disks of one VM mapped together at most (device_name: /dev/sda to /dev/sdz)
MAX_DISKS = 26


def vm_layout(job: dict, size: int) -> list[tuple[str, int, int]]:
    """A ``vm`` job's disks as (device, base, size): end to end, filling
    ``size`` (the ``DiskSet`` the parent serves) exactly."""
    disks = job.get("disks")
    if not isinstance(disks, list) or not 1 <= len(disks) <= MAX_DISKS:
        raise ValueError("a vm job names 1 to 26 disks")
    out, base = [], 0
    for device, n in disks:
        if not isinstance(device, str) or not isinstance(n, int) or n < 0:
            raise ValueError("a vm job's disk is malformed")
        out.append((device, base, n))
        base += n
    if base != size:
        raise ValueError("a vm job's disks do not add up to its size")
    return out


def _walk_vm(channel: _Channel, job: dict, source: _ChannelSource, confined: str) -> None:
    """The VM's disks mapped together (``metadata.map_vm``): one map per
    disk (their flat forms one after the other, ``flats`` their lengths)
    and the lines of all of them."""
    from .format import _sort_key, format_entry
    from .index import BlockMap
    from .metadata import map_vm
    t0 = time.monotonic()
    disks = vm_layout(job, source.size)
    meta = map_vm(source, disks, bus=_ProgressBus(channel))
    info: dict = {
        "filesystems": [vars(f) for f in meta.filesystems], "warnings": meta.warnings,
        "objects": meta.objects, "elapsed": meta.elapsed, "reads": source.reads,
        "confined": confined,
    }
    text = b""
    if job.get("text"):
        text = b"".join(map(format_entry, sorted(meta.entries, key=_sort_key)))
    flats = [BlockMap(meta.entries, disk=k).to_flat() for k in range(1, len(disks) + 1)]
    info["flats"] = [len(f) for f in flats]
    info["flat"], info["text"], info["journal"] = sum(info["flats"]), len(text), 0
    info["mapped"] = time.monotonic() - t0
    head = json.dumps(info).encode()
    channel.send(b"A", b"".join((struct.pack("<I", len(head)), head, *flats, text)))


#: the object types a remap keeps from the old map where the walk could not read
_NAMED = frozenset("fd")


def keep_unread(meta, old_entries) -> int:
    """What the metadata walk did not map (another method's filesystems) or
    mapped only in part keeps the old entries of the objects it missed
    (added to ``meta.entries``). Returns how many objects were kept."""
    from .format import BmapEntry
    unread = {f.device for f in meta.filesystems if f.method != "metadata"}
    partial = {f.device for f in meta.filesystems if f.method == "metadata" and f.warning}
    if not old_entries or not (unread or partial):
        return 0
    walked = {(e.type, e.device, e.path) for e in meta.entries if e.device in partial}
    kept = set()
    for start, end, obj in old_entries:
        if obj.type in _NAMED and (obj.device in unread or (
                obj.device in partial and (obj.type, obj.device, obj.path) not in walked)):
            meta.entries.append(BmapEntry(1, start, end, obj.type, obj.device, obj.path))
            kept.add(obj)
    return len(kept)


def compare(old, new) -> dict:
    """How ``new`` differs from ``old`` (two BlockMaps): ``added`` (indices
    into the new map's object table, files first as a person looks for
    them), ``removed`` (objects, as lists), ``changed`` (a count)."""
    def by_object(blockmap) -> dict:
        ranges: dict = {}
        for start, end, obj in blockmap.iter_entries():
            ranges.setdefault(obj, []).append((start, end))
        return ranges
    before, after = by_object(old), by_object(new)
    key = _object_key
    table = new.object_table()
    added = sorted((i for i, o in enumerate(table) if o not in before), key=lambda i: key(table[i]))
    removed = sorted((o for o in before if o not in after), key=key)
    changed = sum(1 for o, r in after.items() if o in before and sorted(before[o]) != sorted(r))
    return {"added": added, "removed": [list(o) for o in removed], "changed": changed}


def _object_key(obj) -> tuple:
    return (obj.type, obj.device, obj.path or "")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
