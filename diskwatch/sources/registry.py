"""One registry of sources and layers (nbdkit's plugins and filters).

A **source plugin** declares, once:

- ``name`` and a one-line ``summary`` (shown in ``--help``);
- how it is chosen for a SPEC on the command line: URL ``schemes``
  (``"nbd://"``), or ``recognises(spec, options) -> bool`` (a test on a
  file, e.g. the xz magic), or ``selected_by`` (an option that, when given,
  chooses it without a SPEC: ``--stream-to``);
- its ``options`` (``Option``: flag, help, type, default): the CLI builds
  one option group per plugin from them, and their values reach
  ``open(spec, options)`` as ``options.get(dest)``;
- its ``thread_model``, one of nbdkit's four (``sources/base.py`` says
  what each means): ``serialize_connections``, ``serialize_all_requests``
  (``serialize_all`` is an older name), ``serialize_requests`` or
  ``parallel`` (the default). A source that is not parallel is opened
  under a ``Serialized`` layer that declares the model, so the stack
  carries it whatever class ``open`` returns; the server applies the
  stack's model to the requests it serves. For the two models that allow
  one call at a time in the whole source, that layer also holds a lock
  around each call: the block-map generator and the remapper read the
  served stack from threads of their own, beside the server.

Plugins from outside the package are tried first, then the built-in ones in
registration order; those are declared in ``sources/builtin.py`` (imported
by the CLI and by ``open_source``) and load their modules only when chosen
(pycurl, xz and libnbd are not imported to parse a command line).

A **source outside the package** is one small file: a ``Source`` subclass
with ``plugin_name``, ``schemes`` or ``recognises``, ``options`` and
``thread_model`` as class attributes and ``__init__(self, spec, options)``
(see ``SourcePlugin.from_class``). It is found through the Python entry
point group ``diskwatch.sources`` (an installed package) or
``--plugin MODULE:CLASS`` on the command line (a file on PYTHONPATH).

A **layer plugin** wraps a source: ``wrap(source, args, options)``. Layers
stack in the order given (``--filter NAME[:ARGS]``, innermost first):
readonly, snapshot, errors, delay and watch (which publishes what reaches
the layers below it, so a trace can show what the client asked for and what
reached the image under a snapshot).
"""

from __future__ import annotations

import errno
import importlib
import inspect
import logging
import threading
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from .base import (
    PARALLEL,
    SERIALIZE_REQUESTS,
    THREAD_MODELS,
    Layer,
    Source,
    SourceError,
    thread_model,
)

log = logging.getLogger("diskwatch.sources")

ENTRY_POINT_GROUP = "diskwatch.sources"


@dataclass(frozen=True)
class Option:
    """A command-line option of a source (argparse's words)."""

    flag: str  # "--xz-cache"
    help: str
    dest: str | None = None  # default: the flag without dashes, '-' -> '_'
    type: Callable[[str], Any] | None = None
    default: Any = None
    metavar: str | None = None
    action: str | None = None  # "store_true", "append"
    choices: tuple | None = None
    short: str | None = None  # "-f"

    @property
    def key(self) -> str:
        return self.dest or self.flag.lstrip("-").replace("-", "_")


def _lazy(target: Callable | str) -> Callable:
    """'package.module:function' is imported when first called."""
    if callable(target):
        return target

    def call(*args, **kw):
        module, _, attr = target.partition(":")
        return getattr(importlib.import_module(module, __package__), attr)(*args, **kw)
    return call


@dataclass
class SourcePlugin:
    name: str
    summary: str
    open: Callable[[str | None, Any], Source] | str
    schemes: tuple[str, ...] = ()
    recognises: Callable[[str, Any], bool] | str | None = None
    selected_by: str | None = None  # an option key that chooses this plugin
    options: tuple[Option, ...] = ()
    thread_model: str = PARALLEL
    builtin: bool = False

    def __post_init__(self) -> None:
        try:
            self.thread_model = thread_model(self.thread_model)
        except ValueError as e:
            raise ValueError(f"source plugin {self.name}: {e}") from None

    def claims(self, spec: str | None, options) -> bool:
        if self.selected_by is not None:
            return bool(options.get(self.selected_by))
        if spec is None:
            return False
        if self.schemes and spec.lower().startswith(self.schemes):
            return True
        return self.recognises is not None and bool(_lazy(self.recognises)(spec, options))

    def open_source(self, spec: str | None, options) -> Source:
        src = _lazy(self.open)(spec, options)
        if self.thread_model != PARALLEL:
            src = Serialized(src, self.thread_model)
        return src

    @classmethod
    def from_class(cls, source_class: type) -> SourcePlugin:
        """A plugin from a Source subclass's class attributes."""
        name = getattr(source_class, "plugin_name", None) or source_class.__name__.lower()
        doc = inspect.getdoc(source_class) or name
        recognises = getattr(source_class, "recognises", None)
        return cls(name=name, summary=doc.splitlines()[0],
                   open=lambda spec, options: source_class(spec, options),
                   schemes=tuple(getattr(source_class, "schemes", ())),
                   recognises=recognises, options=tuple(getattr(source_class, "options", ())),
                   thread_model=getattr(source_class, "thread_model", PARALLEL))


@dataclass
class LayerPlugin:
    name: str
    summary: str
    wrap: Callable[[Source, str, Any], Source] | str
    args: str = ""  # what ARGS in --filter NAME:ARGS means

    def apply(self, source: Source, args: str, options) -> Source:
        return _lazy(self.wrap)(source, args, options)


@dataclass
class Registry:
    sources: list[SourcePlugin] = field(default_factory=list)
    layers: dict[str, LayerPlugin] = field(default_factory=dict)
    _loaded_entry_points: bool = False

    def register_source(self, plugin: SourcePlugin | type) -> SourcePlugin:
        if isinstance(plugin, type):
            plugin = SourcePlugin.from_class(plugin)
        if any(p.name == plugin.name for p in self.sources):
            raise ValueError(f"a source named {plugin.name!r} is registered already")
        taken = {o.flag for p in self.sources for o in p.options}
        for o in plugin.options:
            if o.flag in taken:
                raise ValueError(f"source plugin {plugin.name}: option {o.flag} is taken")
        if plugin.builtin:
            self.sources.append(plugin)
        else:
            # Plugins from outside are asked first: they are what the person
            # added, and the built-in file source takes any path.
            self.sources.insert(0, plugin)
        return plugin

    def register_layer(self, plugin: LayerPlugin) -> LayerPlugin:
        self.layers[plugin.name] = plugin
        return plugin

    def load_entry_points(self) -> None:
        if self._loaded_entry_points:
            return
        self._loaded_entry_points = True
        from importlib.metadata import entry_points
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                self.register_source(ep.load())
            except Exception as e:  # noqa: BLE001 - one broken plugin does not stop diskwatch
                log.warning("source plugin %s (%s) not loaded: %s", ep.name, ep.value, e)

    def load_plugin(self, path: str) -> SourcePlugin:
        """--plugin MODULE:NAME (a Source subclass or a SourcePlugin)."""
        module, sep, attr = path.partition(":")
        if not sep or not module or not attr:
            raise SourceError(errno.EINVAL, f"--plugin {path}: expected MODULE:CLASS, "
                              "e.g. mysource:MySource (the module on PYTHONPATH)")
        try:
            obj = getattr(importlib.import_module(module), attr)
        except ImportError as e:
            raise SourceError(errno.ENOENT, f"--plugin {path}: cannot import {module}: "
                              f"{e}") from None
        except AttributeError:
            raise SourceError(errno.ENOENT, f"--plugin {path}: {module} has no "
                              f"{attr}") from None
        if not (isinstance(obj, SourcePlugin) or
                (isinstance(obj, type) and issubclass(obj, Source))):
            raise SourceError(errno.EINVAL, f"--plugin {path}: not a Source subclass nor a "
                              "SourcePlugin")
        try:
            return self.register_source(obj)
        except ValueError as e:
            raise SourceError(errno.EINVAL, f"--plugin {path}: {e}") from None

    def options(self) -> list[tuple[SourcePlugin, Option]]:
        return [(p, o) for p in self.sources for o in p.options]

    def choose(self, spec: str | None, options) -> SourcePlugin:
        for plugin in self.sources:
            if plugin.selected_by is not None and plugin.claims(spec, options):
                return plugin
        if spec is None:
            raise SourceError(errno.EINVAL, "no disk image given (a file, .xz file or URL)")
        for plugin in self.sources:
            if plugin.selected_by is None and plugin.claims(spec, options):
                return plugin
        raise SourceError(errno.EINVAL, f"{spec}: no source takes it")

    def layer(self, name: str) -> LayerPlugin:
        try:
            return self.layers[name]
        except KeyError:
            raise SourceError(errno.EINVAL, f"--filter {name}: no such layer (layers: "
                              f"{', '.join(sorted(self.layers))})") from None


class Serialized(Layer):
    """A source plugin's thread model, declared over what its ``open``
    returned (see the module docstring). For serialize_requests that is
    all: each caller (a connection of the server, the remapper) is its own
    handle. For serialize_all_requests and serialize_connections a lock is
    held for the whole call, whoever calls; the server's own requests never
    wait on it for one another (it serves them one at a time already)."""

    def __init__(self, next: Source, model: str):
        super().__init__(next)
        self.thread_model = model
        self._lock = threading.Lock() if model != SERIALIZE_REQUESTS else nullcontext()

    def _locked(name):  # noqa: N805 - a helper building methods, not a method
        def call(self, *args, **kw):
            with self._lock:
                return getattr(self.next, name)(*args, **kw)
        call.__name__ = name
        return call

    pread = _locked("pread")
    pwrite = _locked("pwrite")
    flush = _locked("flush")
    trim = _locked("trim")
    zero = _locked("zero")
    extents = _locked("extents")
    cache = _locked("cache")
    del _locked

    def view_for(self, offset, length):
        return None  # a view would be read outside the lock, and outside the server's turns


REGISTRY = Registry()
register_source = REGISTRY.register_source
register_layer = REGISTRY.register_layer


__all__ = ["Option", "SourcePlugin", "LayerPlugin", "Registry", "REGISTRY", "Serialized",
           "register_source", "register_layer", "THREAD_MODELS", "ENTRY_POINT_GROUP"]
