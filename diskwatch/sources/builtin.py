"""The built-in sources and layers, declared in the registry.

Each declaration names the module and function that opens it: nothing heavy
(pycurl, xz, libnbd) is imported until that source is chosen. The order is
the order in which they are asked about a SPEC: a stream is chosen by its
option, URLs by their scheme, then files by content (xz, then qemu's
formats by the rule in ``qemu.py``), and the raw file takes the rest.
"""

from __future__ import annotations

import argparse
import errno
import os

from ..units import MiB, parse_size
from .base import SourceError
from .registry import REGISTRY, LayerPlugin, Option, SourcePlugin

XZ_MAGIC = b"\xfd7zXZ\x00"


def size_arg(text: str) -> int:
    """argparse type: '64M' -> bytes."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _ro(options) -> bool:
    # --snapshot never writes the image, so it is opened read-only.
    return bool(options.get("readonly") or options.get("snapshot"))


# --- sources --------------------------------------------------------------------

def open_stream(spec, options):
    if options.get("snapshot"):
        raise SourceError(errno.EINVAL, "--snapshot and --stream-to do not go together: a "
                          "stream is written once, in order; there is nothing to overlay")
    from .stream import StreamSource
    kw = {"window": options.get("window")}
    if options.get("size") is not None:
        kw["size"] = options.get("size")
    return StreamSource(options.get("stream_to"), **kw)


def open_nbd(spec, options):
    from .nbd import NbdSource
    return NbdSource(spec, readonly=_ro(options),
                     connect_timeout=options.get("timeout") or 30.0)


def _prefetched(src, options):
    """``src`` under a Prefetch layer when ``--prefetch LIST`` is given."""
    path = options.get("prefetch")
    if not path:
        return src
    from ..prefetch import PrefetchError, read_prefetch_list
    from .prefetch import Prefetch
    try:
        ranges = read_prefetch_list(path, src.size)
    except PrefetchError as e:
        src.close()
        raise SourceError(errno.EINVAL, f"--prefetch: {e}") from None
    budget = options.get("prefetch_budget")
    return Prefetch(src, ranges) if budget is None else Prefetch(src, ranges, budget=budget)


def open_curl(spec, options):
    from .curl import CurlSource
    return _prefetched(CurlSource(
        spec, headers=tuple(options.get("headers") or ()), user=options.get("user"),
        password=options.get("password"), timeout=options.get("timeout"),
        retries=options.get("retries"), connections=options.get("connections"),
        insecure=options.get("insecure")), options)


def looks_xz(spec: str, options) -> bool:
    if options.get("format") is not None or not os.path.isfile(spec):
        return False
    try:
        with open(spec, "rb") as f:
            return f.read(6) == XZ_MAGIC
    except OSError:
        return spec.endswith(".xz")


def open_xz(spec, options):
    from .xz import XzSource
    return _prefetched(XzSource(spec, max_block=options.get("xz_max_block"),
                                cache_blocks=options.get("xz_cache"),
                                readahead=options.get("xz_readahead")), options)


def _format_of(spec: str, options) -> tuple[str, str | None]:
    """choose_format, asked once per spec (it runs qemu-img)."""
    memo = options.memo.setdefault("format", {})
    key = (spec, options.get("format"))
    if key not in memo:
        fmt = options.get("format")
        if os.path.isfile(spec):
            from .qemu import choose_format
            memo[key] = choose_format(spec, fmt)
        elif fmt not in (None, "raw"):
            raise SourceError(errno.EINVAL, f"{spec}: --format {fmt} needs an image file")
        else:
            memo[key] = ("raw", None)
    return memo[key]


def is_qemu_format(spec: str, options) -> bool:
    return _format_of(spec, options)[0] != "raw"


def open_qemu(spec, options):
    from .qemu import QemuSource
    return QemuSource(spec, _format_of(spec, options)[0], readonly=_ro(options))


def open_file(spec, options):
    from .file import FileSource
    warning = _format_of(spec, options)[1]
    src = FileSource(spec, readonly=_ro(options))
    if warning:
        src.warning = warning
    return src


FORMATS = ("raw", "qcow2", "qcow", "vmdk", "vhdx", "vdi", "vpc", "qed", "parallels", "bochs",
           "cloop", "dmg")

for plugin in (
    SourcePlugin(
        "stream", "the client's writes become a byte stream into a FIFO, file or socket",
        open_stream, selected_by="stream_to", options=(
            Option("--stream-to", "turn the client's writes into a byte stream into PATH "
                   "(FIFO, file, socket)", metavar="PATH"),
            Option("--size", "size of the --stream-to disk", type=size_arg, metavar="SIZE"),
            Option("--window", "how far back a --stream-to client may seek (default 64M)",
                   type=size_arg, default=64 * MiB, metavar="SIZE"),
        )),
    SourcePlugin(
        "nbd", "an NBD server to watch: nbd://HOST[:PORT]/EXPORT, "
        "nbd+unix:///EXPORT?socket=PATH, nbds://... (TLS)", open_nbd,
        schemes=("nbd://", "nbds://", "nbd+unix://", "nbds+unix://", "nbd+vsock://",
                 "nbds+vsock://")),
    SourcePlugin(
        "curl", "a disk image at an http, https, ftp, ftps or sftp URL", open_curl,
        schemes=("http://", "https://", "ftp://", "ftps://", "sftp://"), options=(
            Option("--header", "extra HTTP header (repeatable)", dest="headers",
                   action="append", default=[], metavar="'NAME: VALUE'"),
            Option("--user", "user name for http/ftp/sftp"),
            Option("--password", "password for http/ftp/sftp: '-' reads it from stdin, "
                   "'+FILE' from FILE (other users see a command line)"),
            Option("--timeout", "network timeout: connecting, or a transfer stalled that "
                   "long (default 30)", type=float, default=30.0, metavar="SECONDS"),
            Option("--retries", "retries of a failed network read (default 3)", type=int,
                   default=3, metavar="N"),
            Option("--connections", "parallel network connections (default 4)", type=int,
                   default=4, metavar="N"),
            Option("--insecure", "do not verify TLS certificates", action="store_true",
                   default=False),
            Option("--prefetch", "read the ranges of a prefetch list (made by diskwatch "
                   "report --prefetch-list) ahead of the guest, in order (URL and xz "
                   "sources)", metavar="LIST"),
            Option("--prefetch-budget", "memory the prefetched ranges may hold "
                   "(default 256M)", type=size_arg, metavar="SIZE"),
        )),
    SourcePlugin(
        "xz", "an xz-compressed raw image (random access by xz blocks)", open_xz,
        recognises=looks_xz, options=(
            Option("--xz-max-block", "refuse .xz files with larger blocks (default 512M)",
                   type=size_arg, default=512 * MiB, metavar="SIZE"),
            Option("--xz-cache", "decompressed xz blocks kept in memory (default 8)",
                   type=int, default=8, metavar="N"),
            Option("--xz-readahead", "sequential reads: decompress up to N blocks at once, "
                   "ahead of the reads (default: one per CPU, at most 4 and half of "
                   "--xz-cache; 0: no read-ahead)", type=int, metavar="N"),
        )),
    SourcePlugin(
        "qemu", "an image in a format qemu reads (qcow2, vmdk, vhdx, vdi, vpc, qed...), "
        "through a private qemu-storage-daemon", open_qemu, recognises=is_qemu_format,
        options=(
            Option("--format", "image format (raw, qcow2, vmdk, vhdx, vdi, vpc, qed...); "
                   "default: qemu probes, and a format other than raw is used only when the "
                   "file's name says it (.qcow2, .vmdk...)", short="-f", choices=FORMATS,
                   metavar="FMT"),
        )),
    SourcePlugin(
        "file", "a raw image file or block device", open_file,
        recognises=lambda spec, options: True),
):
    plugin.builtin = True
    REGISTRY.register_source(plugin)


# --- layers -----------------------------------------------------------------------

def wrap_readonly(src, args, options):
    from .base import ReadOnly
    return ReadOnly(src) if src.can_write else src


def wrap_snapshot(src, args, options):
    from .snapshot import Snapshot
    return Snapshot(src)


def wrap_errors(src, args, options, option: str = "--filter errors"):
    """``option``: how the rules were given, for messages (--inject-errors
    applies the same layer)."""
    from .errors import ErrorInjection, parse_error_rule
    try:
        rules = [parse_error_rule(rule, option) for rule in args.split(";") if rule.strip()]
    except ValueError as e:
        raise SourceError(errno.EINVAL, str(e)) from None
    return ErrorInjection(src, rules or [parse_error_rule("")])


def wrap_delay(src, args, options):
    from .delay import Delay, parse_delays
    try:
        return Delay(src, **parse_delays(args))
    except ValueError as e:
        raise SourceError(errno.EINVAL, f"--filter delay:{args}: {e}") from None


def wrap_watch(src, args, options):
    from .watch import Watch
    return Watch(src, label=args or "image")


for layer in (
    LayerPlugin("readonly", "refuse writes with EPERM (as -r)", wrap_readonly),
    LayerPlugin("snapshot", "writes go to a temporary overlay (as --snapshot)", wrap_snapshot),
    LayerPlugin("errors", "make calls fail (as --inject-errors)", wrap_errors,
                args="RULE[;RULE...], e.g. rate=0.1,errno=EIO,ops=pread"),
    LayerPlugin("delay", "slow calls down, for tests", wrap_delay,
                args="read=MS,write=MS,other=MS (milliseconds)"),
    LayerPlugin("watch", "publish the calls that reach the layers below it as requests of "
                "export @LABEL (the trace and --record show them)", wrap_watch,
                args="LABEL (default image)"),
):
    REGISTRY.register_layer(layer)
