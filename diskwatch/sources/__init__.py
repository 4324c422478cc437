"""Sources: what holds the bytes diskwatch serves. ``open_source`` builds the
stack from the command line's words: the source itself (file, xz, URL,
stream) and the layers over it (read-only, snapshot)."""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass, field

from .base import Layer, ReadOnly, Source, SourceError
from .nbd import is_nbd_url

URL_SCHEMES = ("http://", "https://", "ftp://", "ftps://", "sftp://")
XZ_MAGIC = b"\xfd7zXZ\x00"

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtpe]?)(i?b?)\s*$", re.I)


def parse_size(text: str) -> int:
    """'512', '64K', '1.5G', '2GiB' -> bytes (powers of 1024, as qemu-img does)."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (use a number with an optional K, M, G, T suffix)")
    num, unit = float(m.group(1)), m.group(2).upper()
    return int(num * (1024 ** ("KMGTPE".index(unit) + 1 if unit else 0)))


@dataclass
class SourceOptions:
    readonly: bool = False
    snapshot: bool = False
    xz_max_block: int = 512 * 1024 * 1024
    xz_cache: int = 8
    headers: list[str] = field(default_factory=list)
    user: str | None = None
    password: str | None = None
    timeout: float = 30.0
    retries: int = 3
    connections: int = 4
    insecure: bool = False
    stream_to: str | None = None
    size: int | None = None
    window: int = 64 * 1024 * 1024
    format: str | None = None  # --format: None probes (see sources/qemu.py for the rule)
    #: --inject-errors rules (sources/errors.py), applied over the source itself
    inject_errors: list[str] = field(default_factory=list)


def is_url(spec: str) -> bool:
    return spec.lower().startswith(URL_SCHEMES)


def _looks_xz(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(6) == XZ_MAGIC
    except OSError:
        return path.endswith(".xz")


def open_source(spec: str | None, opts: SourceOptions) -> Source:
    """The source for ``spec`` with its layers. Raises SourceError with a
    message a person can act on."""
    src: Source
    if opts.stream_to and opts.snapshot:
        raise SourceError(errno.EINVAL, "--snapshot and --stream-to do not go together: a "
                          "stream is written once, in order; there is nothing to overlay")
    if opts.stream_to:
        from .stream import StreamSource
        kw = {"window": opts.window}
        if opts.size is not None:
            kw["size"] = opts.size
        src = StreamSource(opts.stream_to, **kw)
    elif spec is None:
        raise SourceError(errno.EINVAL, "no disk image given (a file, .xz file or URL)")
    elif is_nbd_url(spec):
        from .nbd import NbdSource
        src = NbdSource(spec, readonly=opts.readonly or opts.snapshot)
    elif is_url(spec):
        from .curl import CurlSource
        src = CurlSource(spec, headers=tuple(opts.headers), user=opts.user,
                         password=opts.password, timeout=opts.timeout, retries=opts.retries,
                         connections=opts.connections, insecure=opts.insecure)
    elif opts.format is None and os.path.isfile(spec) and _looks_xz(spec):
        from .xz import XzSource
        src = XzSource(spec, max_block=opts.xz_max_block, cache_blocks=opts.xz_cache)
    else:
        fmt, warning = "raw", None
        if os.path.isfile(spec):
            from .qemu import choose_format
            fmt, warning = choose_format(spec, opts.format)
        elif opts.format not in (None, "raw"):
            raise SourceError(errno.EINVAL, f"{spec}: --format {opts.format} needs an "
                              "image file")
        # --snapshot never writes the image, so it is opened read-only.
        if fmt == "raw":
            from .file import FileSource
            src = FileSource(spec, readonly=opts.readonly or opts.snapshot)
        else:
            from .qemu import QemuSource
            src = QemuSource(spec, fmt, readonly=opts.readonly or opts.snapshot)
        if warning:
            src.warning = warning
    if opts.inject_errors:
        from .errors import ErrorInjection, parse_error_rule
        try:
            rules = [parse_error_rule(r) for r in opts.inject_errors]
        except ValueError as e:
            src.close()
            raise SourceError(errno.EINVAL, str(e)) from None
        src = ErrorInjection(src, rules)
    if opts.readonly:
        if src.can_write:
            src = ReadOnly(src)
        if "read-only" not in src.description:
            try:
                src.description += " (read-only)"
            except AttributeError:
                pass  # a layer whose description is computed
    elif opts.snapshot:
        from .snapshot import Snapshot
        src = Snapshot(src)
    return src


__all__ = ["Source", "Layer", "ReadOnly", "SourceError", "SourceOptions", "open_source",
           "parse_size", "is_url"]
