"""Command line: parses arguments and hands them to the runner (diskwatch/runner.py).

    diskwatch IMAGE [IMAGE2 ...] [--bmap MAP] [--run CMD] [--headless] ...
    diskwatch bmap IMAGE -o MAP
    diskwatch demo [--churn]
    diskwatch replay FILE [--bmap MAP] [--speed N] [--headless]
    diskwatch attach QMP_SOCKET [--device ID] [--bmap MAP] [--headless]

Nothing imports this module; it only turns words into a RunConfig.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import sys

from . import __version__
from .errors import DiskwatchError
from .runner import RunConfig, Runner, UsageError, generate_map
from .text import SafeFormatter, safe_text
from .units import parse_size

log = logging.getLogger("diskwatch")

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
    """The source options: the stack's own, then one group per source plugin
    of the registry (sources/registry.py), built from its declarations."""
    from .sources import builtin  # noqa: F401 - registers the built-in sources
    from .sources.registry import REGISTRY
    REGISTRY.load_entry_points()
    g = p.add_argument_group("source")
    g.add_argument("-r", "--readonly", action="store_true", help="serve read-only: writes get EPERM")
    g.add_argument("--snapshot", action="store_true",
                   help="writes go to a temporary overlay, deleted at exit; the image is never modified")
    g.add_argument("--inject-errors", action="append", default=[], metavar="RULE",
                   help="make source calls fail, for testing (repeatable), e.g. "
                        "'rate=0.1,errno=EIO,ops=pread,range=1M-2M'")
    layers = "; ".join(f"{lp.name}{':' + lp.args if lp.args else ''}: {lp.summary}"
                       for lp in REGISTRY.layers.values())
    g.add_argument("--filter", action="append", default=[], metavar="NAME[:ARGS]",
                   dest="filters",
                   help="add a layer over the source (repeatable; the first given is the "
                        f"innermost; -r and --snapshot go over them all). Layers: {layers}")
    g.add_argument("--plugin", action="append", default=[], metavar="MODULE:CLASS",
                   help="load a source plugin from outside diskwatch (a Source subclass, "
                        "the module on PYTHONPATH); its options appear in --help after it")
    for plugin in REGISTRY.sources:
        if not plugin.options:
            continue
        group = p.add_argument_group(f"source: {plugin.name}", plugin.summary)
        for opt in plugin.options:
            kw = {"help": opt.help, "dest": opt.key}
            for name in ("type", "metavar", "action", "choices"):
                if getattr(opt, name) is not None:
                    kw[name] = getattr(opt, name)
            if opt.default is not None:
                kw["default"] = opt.default
            group.add_argument(*(f for f in (opt.short, opt.flag) if f), **kw)


def load_plugins(argv: list[str]) -> None:
    """--plugin MODULE:CLASS is loaded before the parser is built, so the
    plugin's options are known to it."""
    from .sources.registry import REGISTRY
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--plugin", action="append", default=[])
    known, _ = pre.parse_known_args(argv)
    for path in known.plugin:
        REGISTRY.load_plugin(path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="diskwatch",
        description="Serve a disk image over NBD and watch, live, what the client reads and writes.",
        epilog="Other commands: 'diskwatch bmap IMAGE -o MAP' (make a block map), "
               "'diskwatch demo' (boot a tiny Linux guest and watch it), "
               "'diskwatch attach QMP_SOCKET' (watch a running QEMU guest, no reboot), "
               "'diskwatch replay FILE' (play a --record FILE again), "
               "'diskwatch report FILE' (what a recording read and wrote; --svg draws it), "
               "'diskwatch import nbd-trdump|nbdkit-log LOG -o REC' (another server's log "
               "as a recording).")
    p.add_argument("source", nargs="*",
                   help="disk image (raw, qcow2, vmdk, vdi, vhdx... or .xz), an http/https/ftp/"
                        "sftp URL, or an NBD server to watch (nbd://HOST[:PORT]/EXPORT, "
                        "nbd+unix:///EXPORT?socket=PATH, nbds://...). Several: the VM's disks, "
                        "/dev/sda, /dev/sdb... in this order, each its own export; a disk's own "
                        "options as file=SOURCE,readonly=on,snapshot=on,format=FMT,export=NAME "
                        "(',,' for a comma in SOURCE)")
    p.add_argument("--version", action="version", version=f"diskwatch {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug messages and tracebacks")
    _source_args(p)
    g = p.add_argument_group("server")
    g.add_argument("-U", "--unix", metavar="PATH",
                   help="listen on a unix socket; '-' makes a private one (default with --run)")
    g.add_argument("-p", "--port", type=_port, help="listen on TCP PORT (default 10809 without -U or "
                   "--run; 0: any free port)")
    g.add_argument("-i", "--ipaddr", default="127.0.0.1", help="TCP address (default 127.0.0.1)")
    g.add_argument("-e", "--export-name", default="", help="export name (default: empty)")
    g.add_argument("--tls", choices=("off", "on", "require"), default="off",
                   help="TLS as nbdkit: 'on' lets clients upgrade (STARTTLS), "
                        "'require' refuses them anything else (default off)")
    g.add_argument("--tls-certificates", metavar="DIR",
                   help="ca-cert.pem, server-cert.pem, server-key.pem (nbdkit's and qemu's layout)")
    g.add_argument("--tls-psk", metavar="FILE",
                   help="pre-shared keys, 'username:hexkey' lines (psktool -u USER -p FILE)")
    g.add_argument("--tls-verify-peer", action="store_true",
                   help="clients must show a certificate signed by DIR/ca-cert.pem")
    g.add_argument("--max-connections", type=_connections, default=128, metavar="N",
                   help="connections served at once; more are closed at once (default 128)")
    g.add_argument("--handshake-timeout", type=_timeout, default=10.0, metavar="SECONDS",
                   help="close a connection that has not finished the handshake "
                        "(default 10; 0: never)")
    g.add_argument("--idle-timeout", type=_timeout, metavar="SECONDS",
                   help="close a connection silent that long with nothing in flight "
                        "(default and 0: never)")
    g.add_argument("--run", metavar="CMD",
                   help="run CMD with $nbd, $uri, $unixsocket, $port, $exportname set "
                        "(and $nbd1, $uri1, $exportname1... for each disk); "
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
    g.add_argument("--remap", choices=("auto", "key", "off"), default="auto",
                   help="with --bmap: make the map again from the disk as it is now, in the "
                        "background, to name files made since: auto (on the UI's m key, and "
                        "by itself once a directory or a filesystem structure was written, or "
                        "--remap-after bytes outside any named file; at most every second, reading "
                        "again only what was written), key "
                        "(only on m), off")
    g.add_argument("--remap-after", type=_size, default="1M", metavar="SIZE",
                   help="unnamed write bytes that start an automatic remap (default 1M)")
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


def _size(text: str) -> int:
    try:
        v = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a size above 0, not {text!r}")
    return v


def _connections(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a number of connections (1 or more), "
                                         f"not {text!r}")
    return n


def _timeout(text: str) -> float:
    # A negative timeout closed every connection at the first sweep; nan and
    # inf are not durations.
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not 0 <= v < float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds (0: never), not {text!r}")
    return v


def _seconds(text: str, low: float = 0.0, high: float = 3600.0) -> float:
    """Seconds in (low, high] (low 0) or [low, high]."""
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not (0 < v <= high if low == 0 else low <= v <= high):
        span = f"0 < s <= {high:g}" if low == 0 else f"{low:g} to {high:g}"
        raise argparse.ArgumentTypeError(f"expected seconds ({span}), not {text!r}")
    return v


def _method_arg(p) -> None:
    p.add_argument("--method", choices=("auto", "metadata", "watch"), default="auto",
                   help="how a missing block map is made: metadata (partition tables and "
                        "filesystem structures, exact, no appliance), watch (a libguestfs "
                        "appliance's reads), auto (metadata, and watch for what it cannot read; "
                        "the default)")
    p.add_argument("--mapper-memory", type=_mapper_memory, default="4G", metavar="SIZE",
                   help="address space the mapper process may use, at most (it parses the "
                        "filesystems in a process of its own; default 4G)")
    p.add_argument("--mapper-time", type=_mapper_time, default=600.0, metavar="SECONDS",
                   help="CPU and wall time one walk of the mapper may take (default 600)")


def _mapper_memory(text: str) -> int:
    v = _size(text)
    if v < 256 << 20:
        raise argparse.ArgumentTypeError(f"the mapper needs 256M at least, not {text!r}")
    return v


def _mapper_time(text: str) -> float:
    return _seconds(text, low=1.0, high=86400.0)


def mapper_limits(args):
    from .bmap.worker import MapperLimits
    return MapperLimits(memory=args.mapper_memory, cpu=int(args.mapper_time),
                        wall=args.mapper_time)


def build_bmap_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diskwatch bmap",
                                description="Make a block map of a disk image.")
    p.add_argument("source", help="disk image (raw, qcow2, vmdk, vdi, vhdx... or .xz), an "
                                  "http/https/ftp/sftp URL, or an NBD server (nbd://...)")
    p.add_argument("-o", "--output", required=True, metavar="MAP",
                   help="block map file to write (virt-bmap's format)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug messages and tracebacks")
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto",
                   help="how libguestfs runs qemu for the watch method (auto probes KVM)")
    _method_arg(p)
    _source_args(p)
    return p


def build_demo_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diskwatch demo",
                                description="Build a tiny Linux guest, map it, boot it and watch it.")
    p.add_argument("--churn", action="store_true",
                   help="a guest that keeps rewriting log files and re-reading a big file")
    p.add_argument("--headless", action="store_true", help="text trace instead of the UI")
    p.add_argument("--cache-dir", metavar="DIR", default=os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "diskwatch"),
        help="where the demo guest's image and block map are kept between runs "
             "(default %(default)s)")
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto",
                   help="how qemu runs the guest (auto probes KVM)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug messages and tracebacks")
    return p


def _source_options(args):
    from .sources import SourceOptions
    from .sources.registry import REGISTRY
    password = getattr(args, "password", None)
    if password == "-":
        password = sys.stdin.readline().rstrip("\n")
    elif password is not None and password.startswith("+"):  # nbdkit's +FILE
        try:
            with open(password[1:]) as f:
                password = f.readline().rstrip("\n")
        except OSError as e:
            raise DiskwatchError(f"--password {password}: cannot read {password[1:]}: "
                                 f"{e.strerror}") from None
    args.password = password
    opts = SourceOptions(readonly=args.readonly, snapshot=args.snapshot,
                         inject_errors=args.inject_errors, filters=args.filters)
    # Every plugin's options, by the key it declared: the built-in ones are
    # fields of SourceOptions, the others go to opts.extra.
    for _, opt in REGISTRY.options():
        value = getattr(args, opt.key, None)
        if opt.key in SourceOptions.__dataclass_fields__:
            if value is not None:
                setattr(opts, opt.key, value)
        else:
            opts.extra[opt.key] = value
    return opts


def _open_source(args):
    from .sources import open_source
    return open_source(args.source, _source_options(args))


def _open_disk(args, disk):
    """A disk after the first: the command line's source options, then its own."""
    from .sources import open_source
    opts = _source_options(args)
    for key, value in disk.options.items():
        setattr(opts, key, value)
    return open_source(disk.spec, opts)


def _disks(args) -> None:
    """The positional sources: the first is ``args.source`` (the first
    disk, with the command line's options); each source becomes a
    ``DiskSpec`` in ``args.disks``."""
    from .runner import parse_disk
    words = args.source if isinstance(args.source, list) else (
        [args.source] if args.source else [])
    args.disks = [parse_disk(w, i) for i, w in enumerate(words, 1)]
    if args.disks:
        first = args.disks[0]
        args.source = first.spec
        for key, value in first.options.items():
            setattr(args, key, value)
        if first.export is not None:
            args.export_name = first.export
    else:
        args.source = None


# --- serve ------------------------------------------------------------------

def run_config(args) -> RunConfig:
    if not hasattr(args, "disks"):
        _disks(args)
    return RunConfig(
        more_disks=args.disks[1:],
        source=args.source, stream_to=args.stream_to, unix=args.unix, port=args.port,
        ipaddr=args.ipaddr, export_name=args.export_name, run=args.run, bmap=args.bmap,
        tls=args.tls, tls_certificates=args.tls_certificates, tls_psk=args.tls_psk,
        tls_verify_peer=args.tls_verify_peer, max_connections=args.max_connections,
        handshake_timeout=args.handshake_timeout, idle_timeout=args.idle_timeout,
        headless=args.headless, no_trace=args.no_trace, log=args.log, record=args.record,
        accel=args.accel, method=args.method, remap=args.remap,
        remap_threshold=args.remap_after, mapper_limits=mapper_limits(args),
        metrics=args.metrics, otlp=args.otlp, metrics_top=args.metrics_top,
        metrics_refresh=args.metrics_refresh)


def serve(args, config: RunConfig | None = None, open_source=None, open_disk=None) -> int:
    # Bad monitoring settings are told before anything starts.
    if args.metrics is not None:
        from .sinks.metrics.prometheus import parse_address
        parse_address(args.metrics)
    if args.otlp:
        from .sinks.metrics.otlp import export_interval, metrics_url
        metrics_url(args.otlp)
        export_interval()
    return Runner(config or run_config(args), open_source or (lambda: _open_source(args)),
                  open_disk=open_disk or (lambda disk: _open_disk(args, disk))).run()


def bmap_main(argv: list[str]) -> int:
    load_plugins(argv)
    args = build_bmap_parser().parse_args(argv)
    _setup_logging(args.verbose)
    source = _open_source(args)
    try:
        generate_map(source, args.output, args.accel, method=args.method,
                     limits=mapper_limits(args))
    finally:
        source.close()
    return 0


#: the options of ``diskwatch IMAGE`` that attach takes: how to watch. The
#: rest (source, layers, filters, socket, TLS, --run) would change what the
#: guest's disk is or how QEMU reaches it: attach decides those itself.
_WATCHING_OPTIONS = ("--bmap", "--method", "--headless", "--no-trace", "--log", "--record",
                     "--accel", "--metrics", "--otlp", "--metrics-top", "--metrics-refresh",
                     "--remap", "--remap-after", "--mapper-memory", "--mapper-time")


def build_attach_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="diskwatch attach",
        description="Watch a running QEMU guest's disk: move its I/O onto diskwatch through "
                    "QMP, no reboot; quitting (q, Ctrl-C, SIGTERM) puts it back.",
        epilog="A --bmap file that does not exist yet is made from the live image (a qcow2 "
               "disk's: from the guest's view through its tables); the map then follows the "
               "guest's files (--remap), a qcow2 disk's too. The "
               "other options of 'diskwatch IMAGE' (the source, layers, the socket, TLS, "
               "--run) are attach's to decide.")
    p.add_argument("qmp", nargs="?", metavar="QMP_SOCKET",
                   help="the QEMU's QMP unix socket (-qmp unix:PATH,server=on,wait=off)")
    p.add_argument("--libvirt", metavar="DOMAIN",
                   help="a libvirt domain instead of a QMP socket (through virsh; libvirt "
                        "marks the domain tainted)")
    p.add_argument("-c", "--connect", metavar="URI", help="libvirt connection URI for --libvirt")
    p.add_argument("--device", metavar="ID", action="append",
                   help="the block device (query-block's device, node or qdev id); "
                        "needed when the guest has several; repeated, several disks at once "
                        "(raw or qcow2: /dev/sda, /dev/sdb... in the order given)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug messages and tracebacks")
    # The watching options, as diskwatch IMAGE defines them (one definition):
    # taken as words here, checked by its parser.
    g = p.add_argument_group("watching (as for diskwatch IMAGE)")
    for action in build_parser()._actions:
        name = next((o for o in action.option_strings if o in _WATCHING_OPTIONS), None)
        if name is None:
            continue
        if action.nargs == 0:
            g.add_argument(name, action="store_true", help=action.help)
        else:
            g.add_argument(name, metavar=action.metavar, choices=action.choices,
                           help=action.help)
    return p


def attach_main(argv: list[str]) -> int:
    args = build_attach_parser().parse_args(argv)
    watching = ["-v"] if args.verbose else []
    for name in _WATCHING_OPTIONS:
        value = getattr(args, name.lstrip("-").replace("-", "_"))
        if value is True:
            watching.append(name)
        elif value not in (None, False):
            watching.append(f"{name}={value}")
    # The watching options are checked before the guest is touched.
    serve_args = build_parser().parse_args([*watching, "-U", "-", "--", "IMAGE"])
    _setup_logging(serve_args.verbose)
    if bool(args.qmp) == bool(args.libvirt):
        raise UsageError("give a QMP socket or --libvirt DOMAIN (see diskwatch attach --help)")
    from .attach import AttachedGuest, monitor_opener, prepare
    connect = monitor_opener(args.qmp, args.libvirt, args.connect)
    devices = args.device or [None]
    if len(set(devices)) != len(devices):
        raise UsageError("the same --device twice")
    with connect() as monitor:
        targets = [prepare(monitor, device) for device in devices]
    if len({t.disk.node for t in targets}) != len(targets):
        raise UsageError("two --device name the same disk")
    from .bmap.format import device_name
    from .runner import DiskSpec
    # Each disk its export on the one socket, in the order given: "" (the
    # first), sdb, sdc...; a qcow2 disk's raw backing file after them all,
    # as backing (the first disk's), sdb-backing... (attach/follow.py).
    placed = [(t, "" if k == 1 else device_name(k)[5:], device_name(k))
              for k, t in enumerate(targets, 1)]
    views = {}
    for t, export, device in placed:
        if t.view is not None:
            t.view.place(export, device)
            views[export] = t.view
    target = targets[0]
    # QEMU opened a raw disk as raw: never probed (a guest can write any
    # header at offset 0); a qcow2 disk's image file is served as its bytes.
    serve_args.source = target.path
    serve_args.readonly = target.disk.readonly
    serve_args.format = "raw"
    config = run_config(serve_args)
    config.more_disks = [DiskSpec(t.path, {"readonly": t.disk.readonly, "format": "raw"},
                                  export=export) for t, export, _ in placed[1:]]
    config.more_disks += [DiskSpec(v.backing, {"readonly": True, "format": "raw"},
                                   export=v.backing_export)
                          for v in views.values() if v.backing_export]
    more = [(t, export) for t, export, _ in placed[1:]]
    config.guest = lambda socket_path, private_dir: AttachedGuest(
        connect, target, socket_path, private_dir=private_dir, more=more)
    if not views:
        return serve(serve_args, config)
    config.attach_views = views

    def open_disk(disk):
        """A qcow2 disk's export is its image file, served growing."""
        view = views.get(disk.export)
        return view.open_source() if view is not None else _open_disk(serve_args, disk)
    first = views.get("")
    return serve(serve_args, config, open_source=first.open_source if first else None,
                 open_disk=open_disk)


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
        if argv and argv[0] == "replay":
            _setup_logging("-v" in argv)
            from .replay import replay_main
            return replay_main(argv[1:])
        if argv and argv[0] == "attach":
            return attach_main(argv[1:])
        if argv and argv[0] == "report":
            from .report.command import report_main
            return report_main(argv[1:])
        if argv and argv[0] == "import":
            from .report.command import import_main
            return import_main(argv[1:])
        load_plugins(argv)
        args = build_parser().parse_args(argv)
        _setup_logging(args.verbose)
        return serve(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError as e:
        if not _stdout_is_broken():
            return _report(e, verbose)
        # The reader of the trace went away (`diskwatch ... | head`): end
        # quietly, as coreutils and nbdkit do, with SIGPIPE's status.
        _discard_stdout()
        return 128 + signal.SIGPIPE
    except (DiskwatchError, OSError, ValueError, ImportError) as e:
        return _report(e, verbose)


def _report(e: BaseException, verbose: bool) -> int:
    """The one line for an error that ends diskwatch; status 1."""
    if verbose:
        raise e
    msg = str(e)
    if isinstance(e, OSError) and e.strerror:
        # the file first, as coreutils say it: "cat: x: No such file or directory"
        msg = (f"{e.filename}: " if e.filename else "") + e.strerror
    if isinstance(e, ImportError):
        msg = _import_hint(e)
    print(f"diskwatch: {safe_text(msg)}", file=sys.stderr)  # may quote a URL or a name
    return 1


def _stdout_is_broken() -> bool:
    """Whether stdout is a pipe nobody reads any more (POLLERR on its write end)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _discard_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's last flush of what is
    still buffered does not print an 'Exception ignored' of its own."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _import_hint(e: ImportError) -> str:
    name = getattr(e, "name", "") or ""
    if name == "guestfs":  # not installed, or installed but invisible to this Python
        from .bmap.generate import _guestfs_hint
        return _guestfs_hint(e)
    hints = {
        "pytsk3": "pytsk3 (The Sleuth Kit) is missing: pip install pytsk3",
        "nbd": "the libnbd Python module is missing: apt-get install python3-libnbd",
        "pycurl": "pycurl is missing: apt-get install python3-pycurl",
        "xz": "python-xz is missing: pip install python-xz",
        "textual": "textual is missing: pip install textual",
    }
    return hints.get(name, f"{e}")


if __name__ == "__main__":
    sys.exit(main())
