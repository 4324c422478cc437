"""Command line: builds the source stack, the server, the sinks, and runs them.

    diskwatch IMAGE [--bmap MAP] [--run CMD] [--headless] ...
    diskwatch bmap IMAGE -o MAP
    diskwatch demo [--churn]

Nothing imports this module; it only wires the others together.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import sys
import threading
import time

from . import __version__
from .errors import DiskwatchError
from .text import SafeFormatter, safe_text

log = logging.getLogger("diskwatch")

# Kept in step with diskwatch.sources.qemu.FORMATS (imported lazily there).
FORMATS = ("raw", "qcow2", "qcow", "vmdk", "vhdx", "vdi", "vpc", "qed", "parallels", "bochs",
           "cloop", "dmg")


class UsageError(DiskwatchError):
    """Bad input: printed as one line, exit status 1 (2 for usage)."""


def _size(text: str) -> int:
    from .sources import parse_size
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(
            f"not a TCP port: {text!r} (use 1-65535, or 0 for any free port)")
    return port


def _source_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("source")
    g.add_argument("-r", "--readonly", action="store_true", help="serve read-only: writes get EPERM")
    g.add_argument("--snapshot", action="store_true",
                   help="writes go to a temporary overlay, deleted at exit; the image is never modified")
    g.add_argument("-f", "--format", choices=FORMATS, metavar="FMT",
                   help="image format (raw, qcow2, vmdk, vhdx, vdi, vpc, qed...); default: "
                        "qemu probes, and a format other than raw is used only when the file's "
                        "name says it (.qcow2, .vmdk...)")
    g.add_argument("--xz-max-block", type=_size, default="512M", metavar="SIZE",
                   help="refuse .xz files with larger blocks (default 512M)")
    g.add_argument("--xz-cache", type=int, default=8, metavar="N",
                   help="decompressed xz blocks kept in memory (default 8)")
    g.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'",
                   help="extra HTTP header (repeatable)")
    g.add_argument("--user", help="user name for http/ftp/sftp")
    g.add_argument("--password", help="password for http/ftp/sftp ('-' reads it from stdin)")
    g.add_argument("--timeout", type=float, default=30.0, help="network timeout, seconds")
    g.add_argument("--retries", type=int, default=3, help="retries of a failed network read")
    g.add_argument("--connections", type=int, default=4, help="parallel network connections")
    g.add_argument("--insecure", action="store_true", help="do not verify TLS certificates")
    g.add_argument("--stream-to", metavar="PATH",
                   help="turn the client's writes into a byte stream into PATH (FIFO, file, socket)")
    g.add_argument("--size", type=_size, metavar="SIZE", help="size of the --stream-to disk")
    g.add_argument("--window", type=_size, default="64M", metavar="SIZE",
                   help="how far back a --stream-to client may seek (default 64M)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="diskwatch",
        description="Serve a disk image over NBD and watch, live, what the client reads and writes.",
        epilog="Other commands: 'diskwatch bmap IMAGE -o MAP' (make a block map), "
               "'diskwatch demo' (boot a tiny Linux guest and watch it).")
    p.add_argument("source", nargs="?",
                   help="disk image (raw, qcow2, vmdk, vdi, vhdx... or .xz), an http/https/ftp/"
                        "sftp URL, or an NBD server to watch (nbd://HOST[:PORT]/EXPORT, "
                        "nbd+unix:///EXPORT?socket=PATH, nbds://...)")
    p.add_argument("--version", action="version", version=f"diskwatch {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug messages and tracebacks")
    _source_args(p)
    g = p.add_argument_group("server")
    g.add_argument("-U", "--unix", metavar="PATH",
                   help="listen on a unix socket; '-' makes a private one (default with --run)")
    g.add_argument("-p", "--port", type=_port, help="listen on TCP PORT (0: any free port)")
    g.add_argument("-i", "--ipaddr", default="127.0.0.1", help="TCP address (default 127.0.0.1)")
    g.add_argument("-e", "--export-name", default="", help="export name (default: empty)")
    g.add_argument("--run", metavar="CMD",
                   help="run CMD with $nbd, $uri, $unixsocket, $port, $exportname set; "
                        "exit with its status when it exits")
    g = p.add_argument_group("watching")
    g.add_argument("--bmap", metavar="MAP",
                   help="block map naming offsets; generated first if the file does not exist")
    g.add_argument("--headless", action="store_true", help="no UI: print the trace as text")
    g.add_argument("--no-trace", action="store_true",
                   help="with --headless: print only the summary at exit (no line per request)")
    g.add_argument("--log", metavar="FILE", help="write the text trace to FILE (also with the UI)")
    g.add_argument("--record", metavar="FILE", help="write every request as JSON lines to FILE")
    g.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto",
                   help="how libguestfs and the demo run qemu (auto probes KVM)")
    return p


def build_bmap_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diskwatch bmap",
                                description="Make a block map of a disk image with libguestfs.")
    p.add_argument("source", help="disk image: raw file, .xz file or URL")
    p.add_argument("-o", "--output", required=True, help="block map file to write")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    _source_args(p)
    return p


def build_demo_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diskwatch demo",
                                description="Build a tiny Linux guest, map it, boot it and watch it.")
    p.add_argument("--churn", action="store_true",
                   help="a guest that keeps rewriting log files and re-reading a big file")
    p.add_argument("--headless", action="store_true", help="text trace instead of the UI")
    p.add_argument("--cache-dir", default=os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "diskwatch"))
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _source_options(args):
    from .sources import SourceOptions
    password = args.password
    if password == "-":
        password = sys.stdin.readline().rstrip("\n")
    return SourceOptions(
        readonly=args.readonly, snapshot=args.snapshot, xz_max_block=args.xz_max_block,
        xz_cache=args.xz_cache, headers=args.header, user=args.user, password=password,
        timeout=args.timeout, retries=args.retries, connections=args.connections,
        insecure=args.insecure, stream_to=args.stream_to, size=args.size, window=args.window,
        format=args.format)


def _open_source(args):
    from .sources import open_source
    return open_source(args.source, _source_options(args))


# --- progress line for generation in headless mode -------------------------

class ProgressPrinter:
    """Prints Progress events on stderr: one updating line on a terminal,
    a line every few seconds otherwise."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.tty = stream.isatty()
        self._last = 0.0

    def __call__(self, event) -> None:
        from .events import Message, Progress
        if isinstance(event, Message) and event.source == "diskwatch":
            self._clear()
            print(f"diskwatch: {safe_text(event.text)}", file=self.stream)
            self._said = event.text
            return
        if not isinstance(event, Progress):
            return
        if event.phase == "done":
            if event.summary not in getattr(self, "_said", ""):
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


def generate_map(source, out_path: str, accel: str, bus=None) -> None:
    from .bmap.generate import generate_bmap
    from .events import Bus
    bus = bus or Bus()
    printer = ProgressPrinter()
    bus.on_event(printer)
    try:
        generate_bmap(source, out_path, bus=bus, accel=accel)
    finally:
        bus.unsubscribe(printer)


def load_map(path: str):
    from .bmap.index import BlockMap
    return BlockMap.load(path)


# --- serve ------------------------------------------------------------------

def serve(args) -> int:
    from .events import Bus, RequestBuffer
    from .server import Server, ServerThread, nbd_uri, private_socket_path
    from .server.activation import activated_sockets, describe
    from .server.captive import Captive, captive_env
    from .session import Session

    if args.source is None and not args.stream_to:
        raise UsageError("no disk image given: diskwatch IMAGE [--run CMD] (see --help)")
    if args.unix and args.port is not None:
        raise UsageError("give -U or -p, not both")
    # Taken first, whatever happens next: the variables must not reach a
    # captive command, and the fds must not leak into it.
    activated = activated_sockets()
    if activated and (args.unix or args.port is not None):
        raise UsageError("started with sockets (socket activation, LISTEN_FDS): "
                         "-U and -p do not apply")
    # Under socket activation stdout is the starter's (nbdcopy ... - writes
    # the image there): the trace goes to stderr. Without a terminal nobody
    # sees a UI: headless, said once.
    trace_out = sys.stderr if activated else sys.stdout
    if not args.headless:
        if activated:
            why = "started by socket activation"
        elif not sys.stdout.isatty():
            why = "stdout is not a terminal"
        else:
            why = ""
        if why:
            print(f"diskwatch: {why}: running headless (trace on "
                  f"{'stderr' if activated else 'stdout'}; --no-trace for the summary only)",
                  file=sys.stderr)
            args.headless = True
    # Whatever fails from here on (a port in use, a bad map), what was made
    # so far is undone: the source closed (a stream's FIFO removed), the log
    # files closed, the socket and its private directory removed.
    with contextlib.ExitStack() as undo:
        source = _open_source(args)

        def close_source(exc_type, exc, tb) -> None:
            if exc_type is None:
                source.close()
                return
            # Failing: a stream must not wait for a reader, and the error that
            # stopped us is the one to tell, not the abandoned stream's.
            if hasattr(source, "abort"):
                source.abort()
            try:
                source.close()
            except OSError:
                pass
        undo.push(close_source)
        warning = getattr(source, "warning", None)
        if warning:
            print(f"diskwatch: {safe_text(warning)}", file=sys.stderr)
        bus = Bus()
        blockmap = None
        pending_map = None  # a map to generate under the UI, before the command starts
        if args.bmap:
            if not os.path.exists(args.bmap):
                if args.headless:
                    print(f"diskwatch: {args.bmap} does not exist: generating it first",
                          file=sys.stderr)
                    generate_map(source, args.bmap, args.accel)
                else:
                    pending_map = args.bmap
            if pending_map is None:
                blockmap = load_map(args.bmap)

        server = Server({args.export_name: source}, bus)
        unix = args.unix
        if unix is None and args.port is None and not activated:
            unix = "-" if args.run else None
        if unix == "-":
            private_dir, unix = private_socket_path()
            undo.callback(shutil.rmtree, private_dir, ignore_errors=True)
        if activated:
            # The socket is the starter's to remove (systemd, libnbd).
            for sock in activated:
                server.add_listener(sock)
            kind, addr = describe(activated[0])
        elif unix:
            server.listen_unix(unix)
            undo.callback(_unlink_quietly, unix)
            kind, addr = "unix", unix
        else:
            port = server.listen_tcp(args.ipaddr, 10809 if args.port is None else args.port)
            kind, addr = "tcp", (args.ipaddr, port)
        uri = nbd_uri(kind, addr, args.export_name)
        t0 = time.monotonic()
        session = Session(bus=bus, size=source.size, description=source.description, uri=uri,
                          command=args.run, blockmap=blockmap, started=t0)

        sinks = []
        buffer = RequestBuffer(limit=500_000)
        from .trace import JsonlRecorder, TextTrace

        def open_log(path):
            return undo.enter_context(open(path, "w", buffering=1 << 16))
        if args.log:
            sinks.append(TextTrace(open_log(args.log), blockmap, t0))
        elif args.headless and not args.no_trace:
            sinks.append(TextTrace(trace_out, blockmap, t0))
        if args.record:
            sinks.append(JsonlRecorder(open_log(args.record), blockmap, t0))
        summary = None
        if args.headless:
            summary = _Summary(source.size, blockmap)
            bus.on_event(summary.stats.on_event)
            sinks.append(summary)
        if sinks:
            bus.on_requests(buffer)

        # The server thread gives up the GIL at every syscall; with the default
        # 5 ms switch interval the consumer thread (UI, trace writer) can then
        # keep it for 5 ms while a guest waits. A short interval bounds that stall.
        sys.setswitchinterval(float(os.environ.get("DISKWATCH_SWITCH_INTERVAL", "0.0002")))
        thread = ServerThread(server).start()
        captive = None
        status = 0
        try:
            if args.run:
                captive = Captive(args.run, captive_env(kind, addr, args.export_name),
                                  capture=not args.headless, bus=bus)
                session.stop_command = captive.stop
                announce = ""
            else:
                announce = safe_text(f"diskwatch: serving {source.description} at {uri}")

            if args.headless:
                status = _run_headless(captive, buffer, sinks, session, announce)
            else:
                if announce:
                    print(announce, file=sys.stderr)
                status = _run_ui(session, captive, buffer, sinks, source, pending_map,
                                 args.accel)
        finally:
            abort = getattr(source, "abort", None)
            if abort is not None and session.interrupted:
                abort()  # e.g. a stream whose FIFO reader never came: do not wait for one
            # Stopping the server first publishes every request it answered
            # (a client can exit before the server thread has published its last
            # batch); the last drain then finds them all.
            thread.stop()
            if captive is not None and captive.running:
                captive.stop()
            if sinks:
                _drain(buffer, sinks, float("inf"))
            for s in sinks:
                s.close()
    if summary is not None:
        summary.print(sys.stderr)
    if buffer.total_dropped:
        print(f"diskwatch: {buffer.total_dropped} requests were not traced (the trace could "
              "not keep up)", file=sys.stderr)
    return status


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class _Summary:
    """Headless: the totals printed at exit (the UI shows them live)."""

    def __init__(self, size: int, blockmap):
        from .stats import Stats
        self.stats = Stats(size, heat_cells=1)
        self.blockmap = blockmap

    def feed(self, batch) -> None:
        self.stats.add(batch, self.blockmap)

    def tick(self, now: float) -> None:
        pass

    def close(self) -> None:
        pass

    def print(self, out) -> None:
        from .events import COMMAND_NAMES
        from .stats import human_bytes, human_duration
        st = self.stats
        parts = [f"{st.ops[i]} {name} ({human_bytes(st.bytes[i])})" if name in
                 ("read", "write", "trim", "zero") else f"{st.ops[i]} {name}"
                 for i, name in enumerate(COMMAND_NAMES) if st.ops[i]]
        print(f"diskwatch: {st.requests} requests on {st.connections_total} connections: "
              + ", ".join(parts) + (f"; {st.errors} failed" if st.errors else ""), file=out)
        if st.requests:
            print(f"diskwatch: latency median {human_duration(st.latency.median)}, "
                  f"p99 {human_duration(st.latency.p99)}", file=out)
        if self.blockmap is not None:
            # Files and directories: what a person looks for (a partition's
            # own count is its metadata and journal traffic).
            for by in ("reads", "writes"):
                top = st.top(by, 5, keep=lambda obj: obj.type in ("f", "d"))
                if top:
                    print(f"diskwatch: most {by}: " + "; ".join(
                        f"{safe_text(str(obj))} x{getattr(c, by)}" for obj, c in top), file=out)


def _drain(buffer, sinks, now: float) -> None:
    batch, _ = buffer.drain()
    if batch:
        for s in sinks:
            s.feed(batch)
    for s in sinks:
        s.tick(now)


def _run_headless(captive, buffer, sinks, session, announce: str = "") -> int:
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum, frame):
        received.append(signum)
        session.interrupted = True
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    # Said only once Ctrl-C/SIGTERM are handled: a script that signals us as
    # soon as it reads this line must not kill us before we clean up.
    if announce:
        print(announce, file=sys.stderr, flush=True)
    try:
        if captive is not None:
            captive.on_exit = lambda status: stop.set()
            captive.start()
        while not stop.is_set():
            stop.wait(0.1)  # the trace is written at 10 Hz from aggregated batches
            _drain(buffer, sinks, time.monotonic())
        if captive is not None and received:
            # Interrupted: the command goes too (it may already have the
            # terminal's SIGINT), then its status is ours.
            captive.stop()
        _drain(buffer, sinks, float("inf"))
        if captive is not None:
            return captive.wait() or 0
        return 0
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _run_ui(session, captive, buffer, sinks, source, pending_map, accel) -> int:
    from .events import Message
    from .ui.app import DiskwatchApp
    app = DiskwatchApp(session)
    if captive is not None:
        def on_exit(status: int) -> None:
            session.exit_status = status
        captive.on_exit = on_exit
    stop = threading.Event()
    threads = []
    if sinks:
        # --log beside the UI: drained by a timer thread, not by the UI.
        def pump():
            while not stop.wait(0.1):
                _drain(buffer, sinks, time.monotonic())
            _drain(buffer, sinks, float("inf"))
        threads.append(threading.Thread(target=pump, daemon=True, name="trace-pump"))

    def prepare_and_start():
        # Under the UI the map is made while the person watches its progress;
        # the command starts once names are known, so the trace has them all.
        if pending_map is not None:
            try:
                from .bmap.generate import generate_bmap
                generate_bmap(source, pending_map, bus=session.bus, accel=accel)
                session.blockmap = load_map(pending_map)
            except Exception as e:  # noqa: BLE001 - shown in the UI, the session goes on
                session.bus.publish(Message(f"block map generation failed: {e}",
                                            level="error"))
        if captive is not None and not stop.is_set():
            captive.start()
    threads.append(threading.Thread(target=prepare_and_start, daemon=True, name="prepare"))
    for t in threads:
        t.start()

    def on_signal(signum, frame):
        # SIGTERM/SIGHUP under the UI: leave as if the person quit (the
        # command is stopped and the socket removed on the way out). The
        # handler runs inside the app's loop thread; call_from_thread wants
        # another thread.
        session.interrupted = True
        if app.is_running:
            threading.Thread(target=app.call_from_thread, args=(app.exit,), daemon=True).start()
        # else: the app has not mounted yet; it sees session.interrupted then.
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        result = app.run()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        stop.set()
        for t in threads:
            if t.name == "trace-pump":
                t.join()
    if captive is not None:
        if captive.running:
            captive.stop()
        status = captive.wait(0) if captive.proc is not None else None
        return status if status is not None else (result if isinstance(result, int) else 0)
    return result if isinstance(result, int) else 0


def bmap_main(argv: list[str]) -> int:
    args = build_bmap_parser().parse_args(argv)
    _setup_logging(args.verbose)
    source = _open_source(args)
    try:
        generate_map(source, args.output, args.accel)
    finally:
        source.close()
    return 0


def demo_main(argv: list[str]) -> int:
    args = build_demo_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from .demo.run import prepare_demo
    plan = prepare_demo(args.cache_dir, churn=args.churn, accel=args.accel,
                        say=lambda text: print(f"diskwatch: {text}", file=sys.stderr))
    words = [plan.image, "--snapshot", "--bmap", plan.bmap, "--run", plan.command,
             "--accel", plan.accel]
    if args.headless:
        words.append("--headless")
    if args.verbose:
        words.append("-v")
    return serve(build_parser().parse_args(words))


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(SafeFormatter("diskwatch: %(message)s"))  # messages quote names
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, handlers=[handler])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verbose = "-v" in argv or "--verbose" in argv
    try:
        if argv and argv[0] == "bmap":
            return bmap_main(argv[1:])
        if argv and argv[0] == "demo":
            return demo_main(argv[1:])
        args = build_parser().parse_args(argv)
        _setup_logging(args.verbose)
        return serve(args)
    except KeyboardInterrupt:
        return 130
    except (DiskwatchError, OSError, ValueError, ImportError) as e:
        if verbose:
            raise
        msg = str(e)
        if isinstance(e, OSError) and e.strerror:
            msg = e.strerror + (f": {e.filename}" if e.filename else "")
        if isinstance(e, ImportError):
            msg = _import_hint(e)
        print(f"diskwatch: {safe_text(msg)}", file=sys.stderr)  # may quote a URL or a name
        return 1


def _import_hint(e: ImportError) -> str:
    name = getattr(e, "name", "") or ""
    hints = {
        "guestfs": "the libguestfs Python module is missing: apt-get install python3-guestfs "
                   "libguestfs-tools (and use Debian's python3 or a venv made with "
                   "--system-site-packages)",
        "nbd": "the libnbd Python module is missing: apt-get install python3-libnbd",
        "pycurl": "pycurl is missing: apt-get install python3-pycurl",
        "xz": "python-xz is missing: pip install python-xz",
        "textual": "textual is missing: pip install textual",
    }
    return hints.get(name, f"{e}")


if __name__ == "__main__":
    sys.exit(main())
