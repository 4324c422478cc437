"""Command line: parses arguments and hands them to the runner (diskwatch/runner.py).

    diskwatch IMAGE [--bmap MAP] [--run CMD] [--headless] ...
    diskwatch bmap IMAGE -o MAP
    diskwatch demo [--churn]

Nothing imports this module; it only turns words into a RunConfig.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import __version__
from .errors import DiskwatchError
from .runner import RunConfig, Runner, generate_map
from .text import SafeFormatter, safe_text

log = logging.getLogger("diskwatch")

# Kept in step with diskwatch.sources.qemu.FORMATS (imported lazily there).
FORMATS = ("raw", "qcow2", "qcow", "vmdk", "vhdx", "vdi", "vpc", "qed", "parallels", "bochs",
           "cloop", "dmg")


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
    g.add_argument("--password", help="password for http/ftp/sftp: '-' reads it from stdin, "
                                      "'+FILE' from FILE (other users see a command line)")
    g.add_argument("--timeout", type=float, default=30.0, help="network timeout, seconds")
    g.add_argument("--retries", type=int, default=3, help="retries of a failed network read")
    g.add_argument("--connections", type=int, default=4, help="parallel network connections")
    g.add_argument("--insecure", action="store_true", help="do not verify TLS certificates")
    g.add_argument("--stream-to", metavar="PATH",
                   help="turn the client's writes into a byte stream into PATH (FIFO, file, socket)")
    g.add_argument("--size", type=_size, metavar="SIZE", help="size of the --stream-to disk")
    g.add_argument("--window", type=_size, default="64M", metavar="SIZE",
                   help="how far back a --stream-to client may seek (default 64M)")
    g.add_argument("--inject-errors", action="append", default=[], metavar="RULE",
                   help="make source calls fail, for testing (repeatable), e.g. "
                        "'rate=0.1,errno=EIO,ops=pread,range=1M-2M'")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="diskwatch",
        description="Serve a disk image over NBD and watch, live, what the client reads and writes.",
        epilog="Other commands: 'diskwatch bmap IMAGE -o MAP' (make a block map), "
               "'diskwatch demo' (boot a tiny Linux guest and watch it), "
               "'diskwatch report FILE' (what a recording read and wrote; --svg draws it).")
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
    g.add_argument("--record", metavar="FILE",
                   help="record every request to FILE (replay it: diskwatch replay FILE)")
    g.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto",
                   help="how libguestfs and the demo run qemu (auto probes KVM)")
    _method_arg(g)
    g = p.add_argument_group("monitoring (daemon mode: --headless --no-trace --metrics PORT)")
    g.add_argument("--metrics", metavar="[ADDR:]PORT",
                   help="serve Prometheus metrics on http://ADDR:PORT/metrics (ADDR "
                        "127.0.0.1 by default; PORT 0: any free port, printed)")
    g.add_argument("--otlp", metavar="URL",
                   help="export the same metrics by OTLP/HTTP to URL (e.g. "
                        "http://localhost:4318) every $OTEL_METRIC_EXPORT_INTERVAL ms (60000); "
                        "needs pip install 'diskwatch[otlp]'")
    g.add_argument("--metrics-top", type=_top, default=20, metavar="N",
                   help="files and top-level directories with their own series: the N "
                        "busiest (default 20, at most 500); the rest are counted as 'other'")
    g.add_argument("--metrics-refresh", type=_seconds, default=10.0, metavar="SECONDS",
                   help="how often the busiest files are chosen again (default 10)")
    return p


def _top(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 500:
        raise argparse.ArgumentTypeError(f"expected 1 to 500, not {text!r}")
    return n


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not 0 < v <= 3600:
        raise argparse.ArgumentTypeError(f"expected seconds (0 < s <= 3600), not {text!r}")
    return v


def _method_arg(p) -> None:
    p.add_argument("--method", choices=("auto", "metadata", "watch"), default="auto",
                   help="how a missing block map is made: metadata (partition tables and "
                        "filesystem structures, exact, no appliance), watch (a libguestfs "
                        "appliance's reads), auto (metadata, and watch for what it cannot read; "
                        "the default)")


def build_bmap_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diskwatch bmap",
                                description="Make a block map of a disk image.")
    p.add_argument("source", help="disk image: raw file, .xz file or URL")
    p.add_argument("-o", "--output", required=True, help="block map file to write")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    _method_arg(p)
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
    elif password is not None and password.startswith("+"):  # nbdkit's +FILE
        try:
            with open(password[1:]) as f:
                password = f.readline().rstrip("\n")
        except OSError as e:
            raise DiskwatchError(f"--password {password}: cannot read {password[1:]}: "
                             f"{e.strerror}") from None
    return SourceOptions(
        readonly=args.readonly, snapshot=args.snapshot, xz_max_block=args.xz_max_block,
        xz_cache=args.xz_cache, headers=args.header, user=args.user, password=password,
        timeout=args.timeout, retries=args.retries, connections=args.connections,
        insecure=args.insecure, stream_to=args.stream_to, size=args.size, window=args.window,
        format=args.format, inject_errors=args.inject_errors)


def _open_source(args):
    from .sources import open_source
    return open_source(args.source, _source_options(args))


# --- serve ------------------------------------------------------------------

def run_config(args) -> RunConfig:
    return RunConfig(
        source=args.source, stream_to=args.stream_to, unix=args.unix, port=args.port,
        ipaddr=args.ipaddr, export_name=args.export_name, run=args.run, bmap=args.bmap,
        headless=args.headless, no_trace=args.no_trace, log=args.log, record=args.record,
        accel=args.accel, method=args.method, metrics=args.metrics, otlp=args.otlp, metrics_top=args.metrics_top,
        metrics_refresh=args.metrics_refresh)


def serve(args) -> int:
    # Bad monitoring settings are told before anything starts.
    if args.metrics is not None:
        from .metrics.prometheus import parse_address
        parse_address(args.metrics)
    if args.otlp:
        from .metrics.otlp import export_interval, metrics_url
        metrics_url(args.otlp)
        export_interval()
    return Runner(run_config(args), lambda: _open_source(args)).run()


def bmap_main(argv: list[str]) -> int:
    args = build_bmap_parser().parse_args(argv)
    _setup_logging(args.verbose)
    source = _open_source(args)
    try:
        generate_map(source, args.output, args.accel, method=args.method)
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
    from .journal import JournalHandler, stderr_is_journal, use_journal
    if stderr_is_journal():
        # Under systemd: structured entries (PRIORITY, CODE_*, DISKWATCH_*)
        # by the journal's native protocol; the journal filters by priority.
        journal = JournalHandler()
        use_journal(journal)
        logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                            handlers=[journal])
        return
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
        if argv and argv[0] == "report":
            from .report.command import report_main
            return report_main(argv[1:])
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
    if name == "guestfs":  # not installed, or installed but invisible to this Python
        from .bmap.generate import _guestfs_hint
        return _guestfs_hint(e)
    hints = {
        "pytsk3": "pytsk3 (The Sleuth Kit) is missing: pip install pytsk3",
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
