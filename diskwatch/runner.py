"""The session runner: assembles the source, the server, the map, the
pipeline and the sinks, and owns the teardown.

    config = RunConfig(source=..., headless=True, log="trace.log", ...)
    status = Runner(config, open_source).run()

``Runner.run`` checks what can be told before anything starts
(``_check``), opens the source, decides about the map (load it, generate it
first headless, or generate it under the UI while the person watches),
binds the server (``_serve``), makes the session, adds the sinks (each
built by its own package: ``sinks.add_text_sinks``,
``Recorder.for_session``, ``sinks.metrics.endpoints.add_metrics``, the
remapper), and ``_watch`` serves and runs the session with
``pipeline.loop.run_session`` (headless or UI: they differ only in which
sinks the pump feeds and who calls it; a replay runs the same loop), then
stops everything in the order that loses no request. Whatever fails early
(a port in use, a bad map) undoes what was made so far and reports the
first error, not the ones the undoing causes.

What only a live session has stays here: SIGHUP's reload (log files
reopened, the map read again) and the extras of a live map swap (the
metrics forget old names, the recording keeps the map).

Why one module of about 800 lines: its one job is the assembly and its
order (what is made before what, undone in reverse); the parts it calls
live in their packages. What an attached qcow2 disk adds here
(``_decide_attached_map``, ``_attached_maps``, ``_add_followers``: which
export has which map, and a follower beside each remapper) is wiring of
the same order; the logic it wires is attach/follow.py's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from .errors import DiskwatchError, closer
from .events import Bus, Message, Progress
from .pipeline.loop import run_session
from .pipeline.session import Session
from .text import safe_text


class UsageError(DiskwatchError):
    """Bad input: printed as one line, exit status 1 (2 for usage)."""


#: a disk's own options (``file=SOURCE,KEY=VALUE,...``): key -> (SourceOptions field, kind)
DISK_OPTIONS = {"readonly": bool, "snapshot": bool, "format": str, "export": str}
#: disks in one session: /dev/sda ... /dev/sdz
MAX_DISKS = 26


@dataclass
class DiskSpec:
    """One disk of the VM as the command line gives it: its source, its own
    options (``SourceOptions`` fields over the command line's), its export
    name (None: the default, see ``export_names``)."""

    spec: str
    options: dict
    export: str | None = None


def parse_disk(word: str, index: int) -> DiskSpec:
    """``SOURCE``, or qemu's way, ``file=SOURCE,readonly=on,snapshot=on,
    format=qcow2,export=NAME`` (``,,`` is a comma in a value)."""
    if not word.startswith("file="):
        return DiskSpec(word, {})
    fields, cur, i = [], [], 0
    while i < len(word):
        c = word[i]
        if c == "," and word[i + 1:i + 2] == ",":
            cur.append(",")
            i += 2
            continue
        if c == ",":
            fields.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    fields.append("".join(cur))
    spec, options, export = "", {}, None
    for f in fields:
        key, eq, value = f.partition("=")
        if key == "file":
            spec = value
            continue
        kind = DISK_OPTIONS.get(key)
        if kind is None:
            raise UsageError(f"disk {index}: unknown option {safe_text(key)!r} (use "
                             f"file=, {', '.join(k + '=' for k in DISK_OPTIONS)})")
        if kind is bool:
            if value not in ("", "on", "off", "yes", "no", "true", "false"):
                raise UsageError(f"disk {index}: {key}={safe_text(value)!r}: use on or off")
            options[key] = value in ("", "on", "yes", "true")
        elif key == "export":
            export = value
        elif not eq or not value:
            raise UsageError(f"disk {index}: {key}= needs a value")
        else:
            options[key] = value
    if not spec:
        raise UsageError(f"disk {index}: file= is empty")
    return DiskSpec(spec, options, export)


def export_names(first: str, more: list[DiskSpec]) -> list[str]:
    """Every disk's export name: the first's is -e's (default ''), the
    others' their export= or sdb, sdc... Two alike are refused."""
    from .bmap.format import device_name
    names = [first] + [d.export if d.export is not None else device_name(i)[5:]
                       for i, d in enumerate(more, 2)]
    for i, name in enumerate(names, 1):
        if names.index(name) != i - 1:
            raise UsageError(f"disks {names.index(name) + 1} and {i} have the same export "
                             f"name {safe_text(name)!r}: give one of them export=NAME")
    return names


@dataclass
class RunConfig:
    """What to serve and how to watch it (the CLI fills it from its arguments)."""

    source: str | None = None  # image path or URL (None with --stream-to)
    #: the VM's other disks, in order (/dev/sdb, /dev/sdc...): ``DiskSpec``s
    more_disks: list = field(default_factory=list)
    stream_to: str | None = None
    unix: str | None = None  # socket path, "-" for a private one
    port: int | None = None
    ipaddr: str = "127.0.0.1"
    export_name: str = ""
    #: --tls off|on|require and its credentials (server/tls.py)
    tls: str = "off"
    tls_certificates: str | None = None
    tls_psk: str | None = None
    tls_verify_peer: bool = False
    #: limits (server/server.py's memory budget)
    max_connections: int = 128
    handshake_timeout: float | None = 10.0
    idle_timeout: float | None = None
    run: str | None = None  # the captive command
    bmap: str | None = None
    headless: bool = False
    no_trace: bool = False
    log: str | None = None
    record: str | None = None
    accel: str = "auto"
    method: str = "auto"  # how a missing block map is made (bmap/make.py)
    #: --remap auto|key|off and the unnamed write bytes that start an
    #: automatic remap (diskwatch/remap.py)
    remap: str = "auto"
    remap_threshold: int | None = None
    #: what one mapper process may spend (bmap.worker.MapperLimits; None: its defaults)
    mapper_limits: Any = None
    #: --metrics [ADDR:]PORT (Prometheus endpoint), --otlp URL, and their knobs
    metrics: str | None = None
    otlp: str | None = None
    metrics_top: int = 20
    metrics_refresh: float = 10.0
    #: diskwatch attach: makes the running guest to attach (an
    #: ``attach.AttachedGuest``) from the socket path and its private
    #: directory; it plays the captive command's part
    guest: Callable[[str, str | None], Any] | None = None
    #: diskwatch attach to qcow2 disks: by each one's export, what names its
    #: image file's offsets (an ``attach.follow.Qcow2View``: the map made
    #: from the guest's view, translated; its backing file as an export of
    #: its own, after every disk's; a sink that follows the guest's
    #: allocations and hands its remapper the guest's writes)
    attach_views: dict = field(default_factory=dict)


# --- block maps ---------------------------------------------------------------

class ProgressPrinter:
    """Prints Progress events on stderr: one updating line on a terminal,
    a line every few seconds otherwise."""

    def __init__(self, stream: IO[str] = sys.stderr):
        self.stream = stream
        self.tty = stream.isatty()
        # Not a terminal: the first line after 5 s, not at once (a line at
        # the start says "0 done" and nothing else; a fast map says only "done")
        self._last = 0.0 if self.tty else time.monotonic()
        self._said = ""

    def __call__(self, event: object) -> None:
        if isinstance(event, Message) and event.source == "diskwatch":
            self._clear()
            print(f"diskwatch: {safe_text(event.text)}", file=self.stream)
            self._said = event.text
            return
        if not isinstance(event, Progress):
            return
        if event.phase == "done":
            if event.summary not in self._said:
                self._clear()
                print(f"diskwatch: block map: {safe_text(event.summary)}", file=self.stream)
            return
        now = time.monotonic()
        if now - self._last < (0.1 if self.tty else 5.0):
            return
        self._last = now
        total = f"/{event.total}" if event.total else ""
        line = safe_text(f"block map: {event.phase} {event.done}{total} "
                         f"({event.rate:.0f}/s) {event.current}")
        if self.tty:
            width = shutil.get_terminal_size().columns - 1
            self.stream.write("\r" + line[:width].ljust(width))
            self.stream.flush()
        else:
            print(f"diskwatch: {line}", file=self.stream)

    def _clear(self) -> None:
        if self.tty:
            self.stream.write("\r" + " " * (shutil.get_terminal_size().columns - 1) + "\r")


def generate_map(source, out_path: str, accel: str, bus=None, method: str = "auto",
                 limits=None, more: tuple = ()):
    """Make the map file (progress on stderr); returns the map, indexed (and
    with ``more``, the VM's other disks, the list of every disk's map)."""
    from .bmap.make import make_bmap
    from .events import Bus
    bus = bus or Bus()
    printer = ProgressPrinter()
    bus.on_event(printer)
    try:
        made = make_bmap(source, out_path, method=method, bus=bus, accel=accel, limits=limits,
                         more=more)
    finally:
        bus.unsubscribe(printer)
    first = made.blockmap if made.blockmap is not None else load_map(out_path)
    return [first, *made.more] if more else first


def load_map(path: str, disk: int = 1):
    from .bmap.index import BlockMap
    if os.path.isdir(path):
        raise UsageError(f"--bmap {path}: is a directory, not a block map file")
    return BlockMap.load(path, disk=disk)


# --- the live runner --------------------------------------------------------------

class Runner:
    """Serves ``config.source`` and watches it; see the module docstring."""

    def __init__(self, config: RunConfig, open_source: Callable[[], Any],
                 open_disk: Callable[[DiskSpec], Any] | None = None):
        self.config = config
        self.open_source = open_source
        self.open_disk = open_disk  # a disk after the first
        #: (export name, source) of each disk, the first first
        self.disks: list[tuple[str, Any]] = []
        self.summary = None
        self.pump = None
        self.recorder = None  # the Recorder, with --record
        self.activated: list = []  # sockets passed by socket activation
        self.trace_out: IO[str] = sys.stdout
        self.logs: list = []  # ReopenableFiles of --log/--record (SIGHUP reopens them)
        self.metrics = None  # the MetricsSink, with --metrics or --otlp
        self.remapper = None  # the Remapper, with a map and --remap auto|key
        self.more_remappers: list = []  # the other disks' (a session of several)
        self.followers: dict = {}  # each qcow2 disk's Qcow2Follower, by export
        self.guest = None  # the attached guest (diskwatch attach)
        self.private_dir: str | None = None

    def run(self) -> int:
        tls, headless_note = self._check()
        # Whatever fails from here on (a port in use, a bad map), what was made
        # so far is undone: the source closed (a stream's FIFO removed), the log
        # files closed, the socket and its private directory removed.
        with contextlib.ExitStack() as undo:
            source = self.open_source()
            undo.push(_source_closer(source))
            if source.warning:
                print(f"diskwatch: {safe_text(source.warning)}", file=sys.stderr)
            names = export_names(self.config.export_name, self.config.more_disks)
            self.disks = [(names[0], source)]
            for name, disk in zip(names[1:], self.config.more_disks, strict=True):
                more = self.open_disk(disk)
                undo.push(_source_closer(more))
                if more.warning:
                    print(f"diskwatch: {safe_text(more.warning)}", file=sys.stderr)
                self.disks.append((name, more))
            blockmap, pending_map = self._decide_map(source)
            bus = Bus()
            server, kind, addr, uri = self._serve(source, bus, tls, undo)
            if headless_note:
                print(headless_note, file=sys.stderr)
            session = self._session(source, bus, uri, addr, blockmap)
            self._more_maps(session)
            self.pump = pump = session.pump
            # The pump closes the sinks (after its last round) before their
            # files are closed and what they feed (metrics endpoints) stops;
            # failing early, its own errors are not the story.
            after_pump = undo.enter_context(contextlib.ExitStack())
            undo.push(closer(pump.close))
            self._add_sinks(session, source, after_pump)
            status = self._watch(session, source, server, kind, addr, tls, pending_map)
        self._tell_the_end(pump)
        return status

    def _check(self):
        """What is told before anything starts: bad arguments, sockets passed
        by socket activation that -U/-p contradict, bad TLS settings; and
        whether the session runs headless after all (the note that says why
        comes once serving starts). Returns (tls, that note)."""
        from .server.activation import activated_sockets
        from .server.tls import make_tls
        cfg = self.config
        if cfg.source is None and not cfg.stream_to:
            raise UsageError("no disk image given: diskwatch IMAGE [--run CMD] (see --help)")
        if len(cfg.more_disks) + 1 > MAX_DISKS:
            raise UsageError(f"{len(cfg.more_disks) + 1} disks: at most {MAX_DISKS} "
                             "(/dev/sda to /dev/sdz)")
        if cfg.unix and cfg.port is not None:
            raise UsageError("give -U or -p, not both")
        if cfg.source is not None and cfg.stream_to:
            raise UsageError(f"give a disk image or --stream-to, not both ({cfg.source} and "
                             f"--stream-to {cfg.stream_to})")
        # Taken first, whatever happens next: the variables must not reach a
        # captive command, and the fds must not leak into it.
        self.activated = activated = activated_sockets()
        if activated and (cfg.unix or cfg.port is not None):
            raise UsageError("started with sockets (socket activation, LISTEN_FDS): "
                             "-U and -p do not apply")
        # Bad TLS settings are told before anything starts.
        tls = make_tls(cfg.tls, cfg.tls_certificates, cfg.tls_psk, cfg.tls_verify_peer)
        # Under socket activation stdout is the starter's (nbdcopy ... - writes
        # the image there): the trace goes to stderr. Without a terminal nobody
        # sees a UI: headless, said once.
        self.trace_out = sys.stderr if activated else sys.stdout
        headless_note = ""
        if not cfg.headless:
            if activated:
                why = "started by socket activation"
            elif not sys.stdout.isatty():
                why = "stdout is not a terminal"
            else:
                why = ""
            if why:
                # said once serving starts: an early failure is one line alone
                headless_note = (f"diskwatch: {why}: running headless (trace on "
                                 f"{'stderr' if activated else 'stdout'}; --no-trace for "
                                 "the summary only)")
                cfg.headless = True
        return tls, headless_note

    def _serve(self, source, bus: Bus, tls, undo: contextlib.ExitStack):
        """The server of ``source``, listening (not yet serving): returns
        (server, kind, address, NBD URI)."""
        from .server import Server, nbd_uri, private_socket_path
        cfg = self.config
        server = Server(dict(self.disks) if self.disks else {cfg.export_name: source}, bus,
                        tls=tls,
                        max_connections=cfg.max_connections,
                        handshake_timeout=cfg.handshake_timeout or None,
                        idle_timeout=cfg.idle_timeout or None)
        # Its listening sockets, failing before the server thread (which
        # closes them when it ends) starts; a second close does nothing.
        undo.callback(server.close)
        kind, addr = self._bind(server, undo, private_socket_path)
        return server, kind, addr, nbd_uri(kind, addr, cfg.export_name, tls is not None)

    def _session(self, source, bus: Bus, uri: str, addr, blockmap) -> Session:
        """The session (with the attached guest, diskwatch attach, made now
        that its socket is there)."""
        cfg = self.config
        if cfg.guest is not None:
            self.guest = cfg.guest(addr, self.private_dir)
        session = Session(bus=bus, size=source.size, description=source.description,
                          uri=uri, command=self.guest.description if self.guest else cfg.run,
                          blockmap=blockmap, attached=self.guest is not None)
        if self.guest is not None and not cfg.headless:
            # Under the UI the terminal is the UI's: its messages go to the output panel.
            self.guest.say = lambda text: bus.publish(Message(safe_text(text)))
            self.guest.report_failure = True
        return session

    def _watch(self, session: Session, source, server, kind: str, addr, tls,
               pending_map: str | None) -> int:
        """Serve, start the command (or the attached guest), run the session
        (pipeline/loop.py) and stop it all in the order that loses no request;
        returns the exit status."""
        from .server import ServerThread
        from .server.captive import Captive, captive_env
        cfg = self.config
        # The server thread gives up the GIL at every syscall; with the default
        # 5 ms switch interval the consumer thread (UI, trace writer) can then
        # keep it for 5 ms while a guest waits. A short interval bounds that stall.
        sys.setswitchinterval(float(os.environ.get("DISKWATCH_SWITCH_INTERVAL", "0.0002")))
        thread = ServerThread(server).start()
        captive = None
        try:
            if cfg.run:
                captive = Captive(cfg.run, captive_env(kind, addr, cfg.export_name,
                                                       tls is not None,
                                                       exports=[n for n, _ in self.disks]),
                                  capture=not cfg.headless, bus=session.bus)
                session.stop_command = captive.stop
                announce = ""
            elif self.guest is not None:
                captive = self.guest
                session.stop_command = captive.stop
                announce = ""
            else:
                announce = safe_text(f"diskwatch: serving {source.description} at "
                                     f"{session.uri}")
                if len(self.disks) > 1:
                    from .server import nbd_uri
                    announce = "\n".join(safe_text(
                        f"diskwatch: serving disk {k} ({device}) {d.description} at "
                        f"{nbd_uri(kind, addr, name, tls is not None)}")
                        for k, ((name, d), (_, _, device)) in
                        enumerate(zip(self.disks, session.disks, strict=True), 1))
            prepare = None
            if pending_map is not None:
                def prepare() -> None:
                    self._generate_under_ui(session, source, pending_map)
            return run_session(session, headless=cfg.headless, captive=captive,
                               announce=announce, prepare=prepare,
                               on_reload=lambda: self.reload(session))
        finally:
            if session.interrupted:
                source.abort()  # e.g. a stream whose FIFO reader never came: do not wait for one
            # An attached guest goes back onto its file while the server
            # still answers (its last requests go through us).
            if self.guest is not None and self.guest.running:
                self.guest.stop()
            # Stopping the server first publishes every request it answered
            # (a client can exit before the server thread has published its
            # last batch); the pump's last round then finds them all.
            thread.stop()
            if captive is not None and captive.running:
                captive.stop()
            session.pump.close()

    def _tell_the_end(self, pump) -> None:
        """What stays on the terminal once the session is over: the summary,
        and what was not traced or recorded."""
        if self.guest is not None and not self.config.headless and self.guest.last_said:
            # Said in the UI's panel as the UI closed: said again where it stays.
            print(f"diskwatch: {safe_text(self.guest.last_said)}", file=sys.stderr)
        if self.summary is not None:
            self.summary.print(sys.stderr)
        dropped = pump.feed.total_dropped
        if dropped:
            print(f"diskwatch: {dropped} requests were not traced (the trace could "
                  "not keep up)", file=sys.stderr)
        if self.recorder is not None and self.recorder.error:
            print(safe_text(f"diskwatch: recording to {self.recorder.path} stopped: "
                            f"{self.recorder.error}"), file=sys.stderr)
        if self.recorder is not None and self.recorder.dropped:
            why = "it stopped" if self.recorder.error else "the recorder could not keep up"
            print(f"diskwatch: {self.recorder.dropped} requests were not recorded ({why})",
                  file=sys.stderr)

    def _decide_map(self, source):
        cfg = self.config
        if cfg.attach_views:
            return self._decide_attached_map()
        blockmap = None
        pending_map = None  # a map to generate under the UI, before the command starts
        more = tuple(d for _, d in self.disks[1:])
        self.more_maps: list = []  # the other disks' maps, in order
        if cfg.bmap:
            if not os.path.exists(cfg.bmap):
                from .files import check_output_path
                check_output_path(cfg.bmap)  # said before the mapping, not after
                if cfg.headless:
                    print(f"diskwatch: {cfg.bmap} does not exist: generating it first",
                          file=sys.stderr)
                    blockmap = generate_map(source, cfg.bmap, cfg.accel, method=cfg.method,
                                            limits=cfg.mapper_limits, more=more)
                    if more:
                        blockmap, *self.more_maps = blockmap
                else:
                    pending_map = cfg.bmap
            if pending_map is None and blockmap is None:
                blockmap = load_map(cfg.bmap)
                # one file, every disk: its DISK column (virt-bmap's first)
                self.more_maps = [load_map(cfg.bmap, k) for k in range(2, len(more) + 2)]
        return blockmap, pending_map

    def _backing_exports(self) -> dict:
        """The qcow2 disks' backing files' exports: export -> its disk's view."""
        return {v.backing_export: v for v in self.config.attach_views.values()
                if v.backing_export}

    def _guest_disks(self) -> list[tuple[str, Any]]:
        """(export, source) of the guest's own disks, in order (/dev/sda,
        /dev/sdb...): every disk but the backing files' exports."""
        backings = self._backing_exports()
        return [(name, d) for name, d in self.disks if name not in backings]

    def _decide_attached_map(self):
        """The map of a guest with qcow2 disks: made (before the UI starts)
        from each disk's guest view (a raw disk's: its source), or loaded
        (each disk by its index in the file), then translated to each image
        file's offsets (and its backing's)."""
        cfg = self.config
        self.more_maps = []
        if not cfg.bmap:
            return None, None
        guests = self._guest_disks()
        if not os.path.exists(cfg.bmap):
            from .files import check_output_path
            check_output_path(cfg.bmap)
            print(f"diskwatch: {cfg.bmap} does not exist: generating it first (from the "
                  "guest's view of the qcow2 image)", file=sys.stderr)
            views = cfg.attach_views
            sources = [views[name].map_source() if name in views else d for name, d in guests]
            try:
                made = generate_map(sources[0], cfg.bmap, cfg.accel, method=cfg.method,
                                    limits=cfg.mapper_limits, more=tuple(sources[1:]))
            finally:
                for name, source in zip((n for n, _ in guests), sources, strict=True):
                    if name in views:
                        source.close()
            guest_maps = made if len(sources) > 1 else [made]
        else:
            guest_maps = [load_map(cfg.bmap, k) for k in range(1, len(guests) + 1)]
        maps = self._attached_maps(guest_maps)
        self.more_maps = [maps.get(name) for name, _ in self.disks[1:]]
        return maps[self.disks[0][0]], None

    def _attached_maps(self, guest_maps: list) -> dict:
        """Every export's map from the guest's disks' maps (in disk order): a
        raw disk's as it is, a qcow2's translated (``Qcow2View.views``), its
        backing's the guest map."""
        views = self.config.attach_views
        out = {}
        for (name, _), guest_map in zip(self._guest_disks(), guest_maps, strict=True):
            view = views.get(name)
            if view is None:
                out[name] = guest_map
                continue
            out[name], backing = view.views(guest_map)
            if backing:
                out[view.backing_export] = guest_map
        return out

    def _more_maps(self, session: Session) -> None:
        """The VM's disks and their maps into the session (one disk: nothing)."""
        if len(self.disks) < 2:
            return
        from .bmap.format import device_name
        backings = self._backing_exports()
        # a backing file's export is named after its disk: /dev/sda backing
        session.set_disks([(name, d.size, f"{backings[name].device} backing" if name in backings
                            else device_name(k)) for k, (name, d) in enumerate(self.disks, 1)],
                          {name: m for (name, _), m in zip(self.disks[1:], self.more_maps, strict=False)})

    def _bind(self, server, undo: contextlib.ExitStack, private_socket_path):
        from .server.activation import describe
        cfg = self.config
        if self.activated:
            # The socket is the starter's to remove (systemd, libnbd).
            for sock in self.activated:
                server.add_listener(sock)
            return describe(self.activated[0])
        unix = cfg.unix
        if unix is None and cfg.port is None:
            unix = "-" if cfg.run or cfg.guest else None

        def unless_handed_over(undo_step: Callable[[], None]) -> None:
            # An attached guest whose detach failed is the watchdog's: it
            # serves this very socket path now, which must stay.
            if self.guest is None or not self.guest.abandoned:
                undo_step()
        if unix == "-":
            self.private_dir, unix = private_socket_path()
            private_dir = self.private_dir
            undo.callback(unless_handed_over,
                          lambda: shutil.rmtree(private_dir, ignore_errors=True))
        if unix:
            server.listen_unix(unix)
            path = unix
            undo.callback(unless_handed_over, lambda: _unlink_quietly(path))
            return "unix", unix
        port = server.listen_tcp(cfg.ipaddr, 10809 if cfg.port is None else cfg.port)
        return "tcp", (cfg.ipaddr, port)

    def _add_sinks(self, session: Session, source, undo: contextlib.ExitStack) -> None:
        """Sinks into the pump; what they open goes on ``undo``, which is
        unwound after the pump has closed them."""
        from .logfile import ReopenableFile
        from .sinks import add_text_sinks
        cfg = self.config
        pump = session.pump
        log = None
        if cfg.log:
            log = undo.enter_context(ReopenableFile(cfg.log))
            self.logs.append(log)
        self.summary = add_text_sinks(pump, size=source.size, blockmap=session.blockmap,
                                      t0=session.started, headless=cfg.headless,
                                      no_trace=cfg.no_trace, log=log, trace_out=self.trace_out,
                                      devices=session.devices())
        if cfg.record:
            from .recording.writer import Recorder
            self.recorder = Recorder.for_session(
                cfg.record, session, source=source.description, size=source.size,
                export=cfg.export_name, command=cfg.run, bmap=cfg.bmap,
                exports=[n for n, _ in self.disks])
            undo.callback(self.recorder.close)  # failing early (else the pump closed it)
            self.logs.append(self.recorder)
            pump.add(self.recorder.attach(session.bus))
        if cfg.metrics is not None or cfg.otlp:
            from .sinks.metrics.endpoints import add_metrics
            self.metrics = add_metrics(pump, {n: d.size for n, d in self.disks} or
                                       {cfg.export_name: source.size}, undo,
                                       top=cfg.metrics_top, refresh=cfg.metrics_refresh,
                                       address=cfg.metrics, otlp=cfg.otlp)
        self._add_followers(session)
        if cfg.bmap and cfg.remap != "off":
            self.add_remapper(session, source)

    def _add_followers(self, session: Session) -> None:
        """Each qcow2 disk's follower of its allocations (attach/follow.py),
        once there is a map to translate."""
        self.followers: dict = {}
        if session.blockmap is None:
            return
        first = self.disks[0][0]
        for name, view in self.config.attach_views.items():
            if name == first:
                def swap(blockmap, why: str) -> None:
                    self.swap_map(session, blockmap, why=why)
            else:
                def swap(blockmap, why: str, name=name) -> None:
                    session.swap_disk_map(name, blockmap, why)
                    if self.recorder is not None:
                        self.recorder.keep_disk_map(name, blockmap, why)
            self.followers[name] = session.pump.add(view.follower(swap, export=name))

    def add_remapper(self, session: Session, source) -> None:
        """Live remapping through the served source (a --snapshot overlay
        included): on the UI's key, and by itself with --remap auto. Each
        disk has its remapper (and mapper process), on its own writes; a
        qcow2 disk's reads the guest's view and is fed by its follower."""
        from .remap import REMAP_THRESHOLD, Remapper
        cfg = self.config
        if cfg.headless:
            def say(text: str, level: str) -> None:
                print(f"diskwatch: {safe_text(text)}", file=sys.stderr, flush=True)
        else:
            def say(text: str, level: str) -> None:
                session.bus.publish(Message(text, level=level))
        several = len(session.disks) > 1
        devices = {name: device for name, _, device in session.disks}
        backings = self._backing_exports()
        # (a session assembled by hand, as a test does, has no disks list)
        disks = self._guest_disks() or [(session.export, source)]
        for k, (name, disk) in enumerate(disks):
            device = devices.get(name, "/dev/sda")
            if k == 0:
                def take(result) -> None:
                    self.take_remap(session, result)
                def current():
                    return session.blockmap
                said = say
            else:
                # the recording keeps the other disks' maps (DMAP frames)
                def take(result, name=name, device=device) -> None:
                    session.swap_disk_map(name, result.blockmap,
                                          f"remap of {device} ({result.why})",
                                          result.journal_map, (result.added, result.removed))
                    if self.recorder is not None and not result.unchanged:
                        self.recorder.keep_disk_map(name, result.blockmap,
                                                    f"remap ({result.why})")
                def current(name=name):
                    return session.maps.get(name)
                def said(text: str, level: str, device=device) -> None:
                    say(f"{device}: {text}", level)
            follower = self.followers.get(name)
            if follower is None:
                remapper = session.pump.add(Remapper(
                    disk, current=current, swap=take, say=said, mode=cfg.remap,
                    bus=None if cfg.headless else session.bus,
                    threshold=cfg.remap_threshold or REMAP_THRESHOLD, limits=cfg.mapper_limits,
                    export=name if several else None, disk=device))
            else:
                # A qcow2 disk: the guest's view is read, in guest offsets;
                # its follower feeds it, ticks it and translates its maps.
                view = follower.view
                guest = view.map_source()
                remapper = Remapper(
                    guest, current=lambda view=view: view.guest_map, swap=follower.take_remap,
                    say=said, mode=cfg.remap, bus=None if cfg.headless else session.bus,
                    threshold=cfg.remap_threshold or REMAP_THRESHOLD, limits=cfg.mapper_limits,
                    disk=device)
                backing = next((b for b, v in backings.items() if v is view), None)

                def swap_backing(blockmap, why: str, backing=backing) -> None:
                    session.swap_disk_map(backing, blockmap, why)
                    if self.recorder is not None:
                        self.recorder.keep_disk_map(backing, blockmap, why)
                follower.remap_with(remapper, guest, take,
                                    swap_backing if backing is not None else None)
            if k == 0:
                self.remapper = session.remapper = remapper
            else:
                self.more_remappers.append(remapper)
                session.disk_remappers.append(remapper)

    def reload(self, session: Session) -> None:
        """SIGHUP (a service): reopen the log files (logrotate moved them) and
        read the block map again (it was remade). A failure is told and the
        old file or map is kept."""
        from .journal import notice
        for f in self.logs:
            try:
                f.reopen()
            except OSError as e:
                notice(f"SIGHUP: cannot reopen {f.path}: {e.strerror}; still writing the old "
                       "file", DISKWATCH_EVENT="reload-failed", priority="warning")
        what = f"reopened {len(self.logs)} log file(s)" if self.logs else ""
        path = self.config.bmap
        if path and session.blockmap is not None:
            try:
                blockmap = load_map(path)
                if self.config.attach_views:  # a guest with qcow2 disks: translated
                    guest_maps = [blockmap] + [load_map(path, k) for k in
                                               range(2, len(self._guest_disks()) + 1)]
            except (OSError, ValueError) as e:
                notice(f"SIGHUP: block map {path} not reloaded: {e}; the old one stays",
                       DISKWATCH_EVENT="reload-failed", priority="warning")
            else:
                if self.config.attach_views:
                    maps = self._attached_maps(guest_maps)
                    for name, _ in self.disks[1:]:
                        session.swap_disk_map(name, maps[name])
                    blockmap = maps[self.disks[0][0]]
                self.swap_map(session, blockmap, path=path)
                what = ", ".join(filter(None, (what, f"reloaded the block map {path}")))
        notice(f"SIGHUP: {what or 'nothing to reload'}", DISKWATCH_EVENT="reload")

    def take_remap(self, session: Session, result) -> None:
        """A live remap's result: swapped in, unless it names everything as
        the map in use does (then it is not swapped, nor kept in the
        recording, and only what the journal's writes carried is handed on)."""
        if result.unchanged:
            session.carry_journal(result.journal_map)
        else:
            self.swap_map(session, result.blockmap, remapped=True, why=f"remap ({result.why})",
                          journal_map=result.journal_map, changes=(result.added, result.removed))
        if self.recorder is not None and result.journal_map is not None:
            self.recorder.add_journal_map(result.journal_map)

    def swap_map(self, session: Session, blockmap, *, path: str | None = None,
                 remapped: bool = False, why: str = "", journal_map=None,
                 changes: tuple | None = None) -> None:
        """A new block map in a live session (SIGHUP's reload, a live remap):
        ``Session.swap_map`` (every sink, late naming), then what only a
        live session has: the metrics forget old names, and the recording
        keeps it (``Recorder.keep_map``: a BMAP frame at the next request),
        so a replay names each request with the map that named it live."""
        session.swap_map(blockmap, why, journal_map, changes)
        if self.metrics is not None:
            self.metrics.forget_names()
        if self.recorder is not None:
            self.recorder.keep_map(blockmap, why, path=path, remapped=remapped)

    def _generate_under_ui(self, session: Session, source, path: str) -> None:
        try:
            from .bmap.make import make_bmap
            made = make_bmap(source, path, method=self.config.method, bus=session.bus,
                             accel=self.config.accel, limits=self.config.mapper_limits,
                             more=tuple(d for _, d in self.disks[1:]))
            if made.more:
                session.maps = {name: m for (name, _), m in zip(self.disks[1:], made.more, strict=True)}
            session.blockmap = made.blockmap if made.blockmap is not None else load_map(path)
            if self.recorder is not None:
                from .recording.format import map_identity
                self.recorder.set_meta(bmap=map_identity(path))
        except Exception as e:  # noqa: BLE001 - shown in the UI, the session goes on
            session.bus.publish(Message(f"block map generation failed: {e}", level="error"))


def _source_closer(source):
    def close_source(exc_type, exc, tb) -> None:
        if exc_type is None:
            source.close()
            return
        # Failing: a stream must not wait for a reader, and the error that
        # stopped us is the one to tell, not the abandoned stream's.
        source.abort()
        try:
            source.close()
        except OSError:
            pass
    return close_source


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
