"""Sources: what holds the bytes diskwatch serves. ``open_source`` builds the
stack from the command line's words: the source a plugin of the registry
claims (file, qemu's formats, xz, URL, NBD server, stream, or one from
outside the package) and the layers over it (errors, --filter layers,
read-only, snapshot)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..units import parse_size
from .base import Layer, ReadOnly, Source, SourceError
from .registry import REGISTRY, LayerPlugin, Option, SourcePlugin, register_layer, register_source


@dataclass
class SourceOptions:
    """What the command line says about the source and its layers. Options
    of plugins from outside the package are in ``extra``; a source reads
    any option as ``options.get(key)``."""

    readonly: bool = False
    snapshot: bool = False
    xz_max_block: int = 512 * 1024 * 1024
    xz_cache: int = 8
    xz_readahead: int | None = None  # None: one per CPU (see XzSource)
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
    #: --filter NAME[:ARGS] layers, innermost first (see sources/registry.py)
    filters: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    memo: dict = field(default_factory=dict, repr=False)  # answers worth asking once

    def get(self, key: str, default=None):
        if key in self.__dataclass_fields__ and key not in ("extra", "memo"):
            return getattr(self, key)
        return self.extra.get(key, default)


def open_source(spec: str | None, opts: SourceOptions) -> Source:
    """The source for ``spec`` with its layers: the plugin that claims it
    (sources/registry.py), then --inject-errors, the --filter layers in
    order, then -r or --snapshot outermost. Raises SourceError with a
    message a person can act on."""
    from . import builtin  # noqa: F401 - registers the built-in sources and layers
    REGISTRY.load_entry_points()
    plugin = REGISTRY.choose(spec, opts)
    layers = [(REGISTRY.layer(name), args) for name, _, args in
              (f.partition(":") for f in opts.filters)]
    src = plugin.open_source(spec, opts)
    try:
        if opts.inject_errors:
            from .builtin import wrap_errors
            src = wrap_errors(src, ";".join(opts.inject_errors), opts, "--inject-errors")
        for layer, args in layers:
            src = layer.apply(src, args, opts)
        if opts.readonly:
            src = REGISTRY.layer("readonly").apply(src, "", opts)
            if "read-only" not in src.description:
                try:
                    src.description += " (read-only)"
                except AttributeError:
                    pass  # a layer whose description is computed
        elif opts.snapshot:
            src = REGISTRY.layer("snapshot").apply(src, "", opts)
    except BaseException:
        src.close()
        raise
    return src


__all__ = ["Source", "Layer", "ReadOnly", "SourceError", "SourceOptions", "open_source",
           "parse_size", "REGISTRY", "Option", "SourcePlugin", "LayerPlugin",
           "register_source", "register_layer"]
