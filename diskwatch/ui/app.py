"""The Textual app: trace, heatmap, rates, top objects, block-map progress and
command output, refreshed from aggregates on a timer.

Threads: the server thread only appends request batches to a bounded buffer
and low-rate events to a deque (the session's ``LiveFeed``); a timer in the
app's thread (10 Hz by default) runs the session's pump, which drains both,
looks requests up in the block map once and feeds every sink: the app's own
(counters, trace lines) and any other (--log). No message is posted per
request. A replay drives the same pump from a recording.

Under a flood the repaint, not the counting, is what costs the UI thread
(and so the server thread, which shares the GIL): the busy panels (trace,
heatmap, rates) are then repainted at ``BUSY_PAINT`` intervals instead of
every tick, while the counters are still updated on every tick, exactly.

State the views show but do not compute (paused, the filters, the clock, the
command's state, the block map's progress, the activity lines: scans and
churn as they happen) is held in reactive attributes of
the app that the widgets bind to (``data_bind`` in ``compose``); the timer
only sets them, and a widget repaints when what it shows changed. The panels
that draw aggregates (trace, heatmap, rates, top, the tree of the traffic
the d key switches to) are asked to sample them
on the timer instead: binding a counter that moves with every request would
repaint them once per change, which is what the timer is there to avoid.
Widgets tell the app things through the messages of ``messages.py``; their
colours are in ``app.tcss``. The picture the p key saves is a ``Picture``
the app is handed (a sink it asks for an SVG), not drawn here.

    app = DiskwatchApp(session)      # subscribes to session.bus at once
    status = app.run()               # main thread; returns the command's status
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from textual import work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.reactive import var
from textual.screen import Screen
from textual.widgets import Footer, Input

from ..events import ConnectionEvent, Message, Progress
from ..pipeline.session import Session
from ..pipeline.sink import Pieces, Sink
from ..report.picture import SessionPicture
from ..sinks.activity import Activity
from ..sinks.stats import Stats
from ..sinks.tree import TrafficTree
from ..text import safe_text
from .activity import ActivityPanel, activity_lines, lifetime_text, scan_text
from .heatmap import Heatmap
from .output import CommandOutput
from .progress import BmapProgress
from .rates import Rates
from .screens import ConfirmQuit, HelpScreen
from .status import StatusBar
from .top import TopObjects
from .trace import TraceLine, TraceModel, TraceView
from .tree import TrafficScreen

TYPE_FILTERS = ("all", "files", "no-dirs")
#: requests per second above which the busy panels repaint less often
BUSY_RATE = 2000
#: seconds between repaints of the busy panels when busy
BUSY_PAINT = 0.25
OP_FILTERS = ("all", "reads", "writes")
#: notifications of scans started or ended, at most, per refresh (a replay
#: seeking through a recording may bring many at once)
NOTIFY_MAX = 3


class Picture(Sink, Protocol):
    """What the p key saves: a sink of the session's pump (the app adds it)
    that draws, when asked, everything it was fed. ``traffic``: (block-map
    object, bytes read and written) of every object seen so far."""

    def svg(self, *, title: str, blockmap: Any, traffic: Iterable[tuple[Any, int]]) -> str: ...


def _disk_size(session: Session, k: int) -> int:
    """Disk ``k``'s size: the session's, else (a replay, which knows the
    first disk's only) its map's extent, else the first disk's."""
    export, size, _ = session.disks[k]
    if size:
        return size
    blockmap = session.blockmap if k == 0 else session.maps.get(export)
    ends = [end for _, end, _ in blockmap.partitions()] if blockmap is not None else []
    return max(ends) if ends else session.size


class DiskwatchApp(App[int | None]):
    """Live view of a diskwatch ``Session``.

    ``clock`` (default ``time.monotonic``, the clock of ``Request.start``)
    is injectable so snapshots are deterministic; ``tick`` is the refresh
    period in seconds; ``picture`` is what the p key saves in
    ``picture_dir`` (a ``report.picture.SessionPicture`` unless given)."""

    CSS_PATH = "app.tcss"
    TITLE = "diskwatch"

    #: what the views show (bound in compose); vars: the app itself does
    #: not repaint when they change, the widgets bound to them do
    paused: var[bool] = var(False)
    #: requests counted while paused, not yet in the trace
    held_count: var[int] = var(0)
    type_filter: var[str] = var("all")  # one of TYPE_FILTERS
    op_filter: var[str] = var("all")  # one of OP_FILTERS
    search_text: var[str] = var("")
    #: whole seconds since the session started, by ``clock``
    elapsed: var[int] = var(0)
    #: the captive command or attached guest in words ("" without one)
    command_label: var[str] = var("")
    #: the last block-map generation ``Progress`` event
    progress: var[Progress | None] = var(None)
    #: the activity lines (ui/activity.py): scans going on or just ended,
    #: files churning now; the panels are bound to it
    activity: var[tuple] = var(())

    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
        Binding("space", "pause", "Pause"),
        Binding("f", "cycle_type", "Files"),
        Binding("r", "cycle_op", "R/W"),
        Binding("slash", "search", "Search"),
        Binding("m", "remap", "Remap"),
        Binding("d", "tree", "Tree"),
        Binding("c", "clear", "Clear", show=False),
        Binding("s", "sort_top", "Top sort", show=False),
        Binding("h", "toggle('heatmap')", "Heatmap", show=False),
        Binding("k", "next_disk", "Next disk"),
        Binding("t", "toggle('top')", "Top", show=False),
        Binding("o", "toggle('output')", "Output", show=False),
        Binding("a", "toggle('rates')", "Rates", show=False),
        Binding("end", "follow", "Follow", show=False),
        Binding("p", "save_picture", "Picture", show=False),
        Binding("question_mark", "help", "Help"),
    ]

    def __init__(
        self,
        session: Session,
        *,
        clock: Callable[[], float] = time.monotonic,
        tick: float = 0.1,
        trace_cap: int = 5000,
        picture_dir: str = ".",
        picture: Picture | None = None,
    ) -> None:
        super().__init__()
        self.session = session
        # For the p key: by default the picture `diskwatch report --svg`
        # draws (offset x time of everything seen, binned), of the session so far.
        self.picture: Picture = SessionPicture(session.size) if picture is None else picture
        self.picture_dir = picture_dir
        session.pump.add(self.picture)
        #: with several disks, each disk's picture by export (the first's is
        #: ``picture``): p saves the one of the disk the heatmap shows
        self.pictures: dict[str, Any] = {}
        if picture is None and len(session.disks) > 1:
            self.picture.export = session.disks[0][0]
            self.pictures = {session.disks[0][0]: self.picture}
            for k, (export, _, _) in enumerate(session.disks[1:], 1):
                self.pictures[export] = session.pump.add(
                    SessionPicture(_disk_size(session, k), export=export))
        self.clock = clock
        self.tick = tick
        self.stats = Stats(session.size)
        #: the disk the heatmap shows (an index into session.disks; k cycles)
        self.heat_disk = 0
        if len(session.disks) > 1:
            self.stats.set_disks([(export, _disk_size(session, k))
                                  for k, (export, _, _) in enumerate(session.disks)])
        self._blockmap = session.blockmap  # the one the heatmap and top table know
        self._fed = 0  # requests fed in the current pump round
        # Fed by the session's pump (subscribed to the bus when the session
        # was made): requests made before the first frame count.
        self.sink = _AppSink(self)
        session.pump.add(self.sink)
        # Scans and churn as they happen, and the tree of the traffic: sinks
        # of the same pump, read on the timer.
        self.activity_sink = Activity()
        self.traffic = TrafficTree()
        session.pump.add(self.activity_sink)
        session.pump.add(self.traffic)
        self.trace_model = TraceModel(started=session.started, cap=trace_cap,
                                      disks=session.devices())
        self.held: deque[tuple[Any, Any]] = deque(maxlen=50_000)
        self.command_status: int | None = None  # from the "exit" Message
        self._last_tick = clock()
        self._last_top = 0.0
        self._last_paint = 0.0  # time.monotonic() of the last repaint of the busy panels
        self._decay_pending = 0.0  # heat decay not applied yet (seconds)
        self.busy = False  # the request rate is high: repaint less often
        self._quitting = False
        self._views_ready = False

    # -- layout --

    def compose(self) -> ComposeResult:
        app = DiskwatchApp
        yield StatusBar(self.session.description, self.session.size, id="status").data_bind(
            app.elapsed, app.paused, app.type_filter, app.op_filter, app.search_text,
            held=app.held_count, command=app.command_label)
        with Horizontal(id="main"):
            with Vertical(id="left"):
                yield TraceView(self.trace_model, id="trace").data_bind(app.paused)
                yield CommandOutput(self.session.command, id="output")
            with Vertical(id="right"):
                yield BmapProgress(id="bmap").data_bind(app.progress)
                yield Rates(id="rates")
                yield Heatmap(self.stats.heat, self.session.blockmap, id="heatmap")
                yield TopObjects(id="top")
        yield ActivityPanel(id="activity").data_bind(lines=app.activity)
        yield Input(placeholder="search paths (enter applies, escape clears)", id="search")
        yield Footer()

    def on_mount(self) -> None:
        # Held, not queried: a modal screen may be on top when the timer fires.
        self.trace_view = self.query_one(TraceView)
        self.heatmap = self.query_one(Heatmap)
        self.rates = self.query_one(Rates)
        self.top = self.query_one(TopObjects)
        self.output = self.query_one(CommandOutput)
        self.search_input = self.query_one("#search", Input)
        self._views_ready = True
        self.top.has_map = self.session.blockmap is not None
        if self.session.command is None:
            self.output.display = False
        self.trace_view.focus()
        self._refresh_views(force=True)
        self.set_interval(self.tick, self._on_tick)
        if self.session.interrupted:  # a signal came before the app was running
            self.exit()

    @property
    def views_ready(self) -> bool:
        """Mounted: exit() is safe now (before, on_mount itself sees
        session.interrupted and exits)."""
        return self._views_ready

    def on_resize(self) -> None:
        self.screen.set_class(self.size.width < 100, "-narrow")
        self.screen.set_class(self.size.height < 30, "-short")

    def on_unmount(self) -> None:
        for sink in (self.sink, self.picture, *self.pictures.values(), self.activity_sink,
                     self.traffic):
            self.session.pump.remove(sink)

    # -- the timer: drain, aggregate, repaint --

    def nothing_more(self) -> bool:
        """Nothing more will be read: the guest's command exited."""
        return self.session.command is not None and self.exit_status is not None

    def _on_tick(self) -> None:
        self.pump()

    def pump(self) -> None:
        """Drain what came since the last call and repaint (the timer calls it;
        tests may too)."""
        if not self._views_ready:
            return
        now = self.clock()
        dt, self._last_tick = now - self._last_tick, now
        if self.session.blockmap is not self._blockmap:
            self._set_blockmap(self.session.blockmap)
        if self.heat_disk and self.heatmap.blockmap is not self._heat_map():
            self.heatmap.set_blockmap(self._heat_map())  # that disk's remap
        self._fed = 0
        self.session.pump.run_once(now)  # calls add_requests() and handle_event() below
        if self.nothing_more():
            self.activity_sink.end()  # no scan goes on
        self.busy = self._fed > BUSY_RATE * max(dt, self.tick)
        if not self.paused:  # paused, the heat holds still
            self._decay_pending += dt
        if not self.paused:
            wall = time.monotonic()
            if not self.busy or wall - self._last_paint >= BUSY_PAINT:
                self._last_paint = wall
                self._refresh_views()
            else:
                self._refresh_status()
        else:
            self._refresh_status()

    def _refresh_views(self, force: bool = False) -> None:
        now = self.clock()
        self.trace_view.sync()
        if self._decay_pending:  # decay is exponential: applying it late is the same
            self.stats.decay(self._decay_pending)
            self._decay_pending = 0.0
        self.heatmap.update()
        self.rates.update_stats(self.stats, now)
        wall = time.monotonic()
        if force or wall - self._last_top >= 0.5:  # a table of names need not move at 10 Hz
            self._last_top = wall
            self.top.update_stats(self.stats, self._object_filter(), self.activity_sink.churn_of)
            self._refresh_activity(now)
            if isinstance(self.screen, TrafficScreen):
                self.screen.sync()
        self._refresh_status()

    def _refresh_activity(self, now: float) -> None:
        """The activity lines, and a notification for each scan that started
        or ended (names are the guest's: never markup)."""
        news = self.activity_sink.news()
        for kind, scan in news[-NOTIFY_MAX:]:
            self.notify(safe_text(scan_text(scan)), title=f"scan {kind}", markup=False,
                        timeout=5 if kind == "started" else 10)
        for life in self.activity_sink.new_lifetimes()[-NOTIFY_MAX:]:
            self.notify(safe_text(lifetime_text(life)), title="created and deleted",
                        markup=False, timeout=8)
        self.activity = activity_lines(self.activity_sink, now)

    def _refresh_status(self) -> None:
        """Set what the status bar shows that no action sets: the clock and
        the command's state (the bar repaints only when they changed)."""
        self.elapsed = int(self.clock() - self.session.started)
        self.command_label = self._command_label()

    def _command_label(self) -> str:
        if self.session.command is None:
            return ""
        status = self.exit_status
        if self.session.attached:
            return "attached (q detaches)" if status is None else "not attached"
        return "command running" if status is None else f"command exited {status}"

    def add_requests(self, batch: Any, pieces: Pieces | None) -> None:
        attributed = self.stats.add(batch, pieces=pieces)
        self._fed += len(attributed)
        if self.paused:
            self.held_count += len(attributed)
            self.held.extend(attributed)
        else:
            self.trace_model.add(attributed)

    def _set_blockmap(self, blockmap: Any) -> None:
        self._blockmap = blockmap
        if not self.heat_disk:
            self.heatmap.set_blockmap(blockmap)
        top = self.top
        top.has_map = blockmap is not None
        top.update_stats(self.stats, self._object_filter(), self.activity_sink.churn_of)

    # -- events other than requests (drained on the timer, in this thread) --

    def handle_event(self, event: object) -> None:
        self.stats.on_event(event)
        if isinstance(event, Progress):
            self.progress = event  # the block-map panel is bound to it
        elif isinstance(event, Message):
            output = self.output
            output.display = True
            output.add_message(event)
            if event.source == "exit":
                self.command_status = event.status
                self.notify(
                    f"command exited with status {event.status}; q quits with that status",
                    severity="information" if event.status == 0 else "warning",
                )
        elif isinstance(event, ConnectionEvent):
            pass  # counted by Stats

    # -- filters --

    def _object_filter(self) -> Callable[[Any], bool] | None:
        tf, text = self.type_filter, self.search_text.lower()
        if tf == "all" and not text:
            return None

        def keep(obj: Any) -> bool:
            if tf == "files" and obj.type != "f":
                return False
            if tf == "no-dirs" and obj.type == "d":
                return False
            return not text or text in str(obj).lower()

        return keep

    def _line_filter(self) -> Callable[[TraceLine], bool] | None:
        tf, of, text = self.type_filter, self.op_filter, self.search_text.lower()
        if tf == "all" and of == "all" and not text:
            return None

        def keep(line: TraceLine) -> bool:
            if of == "reads" and line.op != "read":
                return False
            if of == "writes" and line.op != "write":
                return False
            t = line.type
            if tf == "files" and t != "f":
                return False
            if tf == "no-dirs" and t == "d":
                return False
            return not text or text in line.label().lower()

        return keep

    def _apply_filters(self) -> None:
        self.trace_model.set_filter(self._line_filter())
        trace = self.trace_view
        trace.follow = True
        trace.sync()
        trace.scroll_to_end()
        self.top.update_stats(self.stats, self._object_filter(), self.activity_sink.churn_of)
        self._refresh_status()

    # -- actions --

    def action_pause(self) -> None:
        self.paused = not self.paused  # the trace view and the status bar are bound to it
        trace = self.trace_view
        if not self.paused:
            if self.held:
                self.trace_model.add(self.held)
            self.held.clear()
            self.held_count = 0
            trace.follow = True
            self._refresh_views(force=True)
            trace.scroll_to_end()
        self._refresh_status()

    def action_cycle_type(self) -> None:
        self.type_filter = TYPE_FILTERS[(TYPE_FILTERS.index(self.type_filter) + 1) % 3]
        self._apply_filters()

    def action_cycle_op(self) -> None:
        self.op_filter = OP_FILTERS[(OP_FILTERS.index(self.op_filter) + 1) % 3]
        self._apply_filters()

    def action_search(self) -> None:
        search = self.search_input
        search.value = self.search_text
        search.add_class("-visible")
        search.focus()

    def set_search(self, text: str) -> None:
        self.search_text = text.strip()
        self._apply_filters()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "search":
            self.set_search(event.value)
            event.input.remove_class("-visible")
            self.trace_view.focus()

    def on_key(self, event: Any) -> None:
        search = self.search_input
        if event.key == "escape" and search.has_focus:
            search.value = ""
            search.remove_class("-visible")
            self.set_search("")
            self.trace_view.focus()
            event.stop()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # "m Remap" is in the footer only where a remap can be made (a live
        # session with a map and --remap auto or key).
        if action == "remap":
            return self.session.remapper is not None
        # "n Next disk" only with several disks.
        if action == "next_disk":
            return len(self.session.disks) > 1 and not isinstance(self.screen, TrafficScreen)
        # The filters and panels are the main screen's: not in the tree's footer.
        if action in ("cycle_type", "cycle_op", "search", "tree") and isinstance(
                self.screen, TrafficScreen):
            return False
        return True

    def action_remap(self) -> None:
        """Make the block map again from the disk as it is now, in the
        background (diskwatch/remap.py); its progress shows in the block-map
        panel, the old map serves until the new one is complete."""
        remapper = self.session.remapper
        if remapper is None:
            return
        others = self.session.disk_remappers
        started = [r.request("key") for r in (remapper, *others)]
        if not any(started):
            self.notify("a remap is already running")
        elif others:
            self.notify(f"remapping {sum(started)} of the {len(started)} disks as they are now")
        else:
            self.notify("remapping the disk as it is now")

    def _heat_map(self) -> Any:
        """The map of the disk the heatmap shows."""
        if not self.heat_disk:
            return self.session.blockmap
        return self.session.maps.get(self.session.disks[self.heat_disk][0])

    def action_next_disk(self) -> None:
        """The heatmap shows the session's next disk (several disks only)."""
        disks = self.session.disks
        if len(disks) < 2:
            return
        self.heat_disk = (self.heat_disk + 1) % len(disks)
        export, _, device = disks[self.heat_disk]
        title = f"disk {self.heat_disk + 1} of {len(disks)}: {device}"
        self.heatmap.show_disk(self.stats.heats[export], self._heat_map(), title)
        self.heatmap.update()

    def action_clear(self) -> None:
        self.clear_counts()
        self._refresh_views(force=True)

    def clear_counts(self) -> None:
        """Forget what was counted: the counters, the trace, the activity, the tree."""
        self.stats.clear()
        self.activity_sink.clear()
        self.traffic.clear()
        self.activity = ()
        self.trace_model.clear()
        self.held.clear()
        self.held_count = 0

    def action_sort_top(self) -> None:
        top = self.top
        top.toggle_sort()
        top.update_stats(self.stats, self._object_filter(), self.activity_sink.churn_of)

    def action_toggle(self, panel: str) -> None:
        widget = self.screen_stack[0].query_one(f"#{panel}")
        widget.display = not widget.display

    def action_follow(self) -> None:
        trace = self.trace_view
        trace.follow = True
        trace.scroll_to_end()

    def action_tree(self) -> None:
        """Switch to the tree of the traffic (d or escape comes back)."""
        if not isinstance(self.screen, TrafficScreen):
            self.traffic.fold(self.clock())
            self.push_screen(TrafficScreen(self.traffic))

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_save_picture(self) -> str | None:
        """Save what has been seen so far as an SVG in ``picture_dir``
        (offset over time, partitions, the busiest files, throughput)."""
        stats = self.stats
        picture, which, device = self.picture, "", ""
        if self.pictures:  # several disks: the one the heatmap shows
            export, _, device = self.session.disks[self.heat_disk]
            picture = self.pictures[export]
            which = f", disk {self.heat_disk + 1} of {len(self.pictures)} ({device})"
        title = (f"{self.session.description}{which}: {stats.requests} requests, "
                 f"{self.clock() - self.session.started:.0f} s")
        svg = picture.svg(
            title=title, blockmap=self._heat_map(),
            traffic=((o, c.read_bytes + c.write_bytes) for o, c in stats.objects.items()
                     if o is not None and (not device or o.device.startswith(device))))
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for n in range(100):
            name = f"diskwatch-{stamp}{f'-{n}' if n else ''}.svg"
            path = os.path.join(self.picture_dir, name)
            try:
                with open(path, "x", encoding="utf-8", errors="replace") as f:
                    f.write(svg)
            except FileExistsError:
                continue
            except OSError as e:
                self.notify(f"could not save the picture: {e.strerror}: {path}",
                            severity="error", markup=False)  # a path, not markup
                return None
            self.notify(f"picture saved: {path}", markup=False)
            return path
        return None

    # -- quitting --

    @property
    def exit_status(self) -> int | None:
        if self.session.exit_status is not None:
            return self.session.exit_status
        return self.command_status

    @property
    def command_running(self) -> bool:
        return self.session.command is not None and self.exit_status is None

    async def action_quit(self) -> None:
        if self._quitting:
            return
        if self.command_running and self.session.attached:
            # Quitting puts the guest's disk back on its file: nothing to confirm.
            self._quitting = True
            self.notify("detaching: putting the guest's disk back on its file…")
            self._shutdown_and_exit(stop_command=True)
            return
        if self.command_running:
            if not isinstance(self.screen, ConfirmQuit):
                self.push_screen(ConfirmQuit(self.session.command or ""), self._quit_answered)
            return
        self._quitting = True
        self._shutdown_and_exit(stop_command=False)

    def _quit_answered(self, yes: bool | None) -> None:
        if yes and not self._quitting:
            self._quitting = True
            self.notify("stopping the command…")
            self._shutdown_and_exit(stop_command=True)

    @work(thread=True, exclusive=True, group="quit")
    def _shutdown_and_exit(self, stop_command: bool) -> None:
        # In a thread: stopping a command may take its grace period, and the
        # UI should keep painting meanwhile.
        if stop_command:
            self.session.stop_command()
        self.session.shutdown()
        self.call_from_thread(self._exit_with_status)

    def _exit_with_status(self) -> None:
        self.pump()  # the exit Message may have just arrived
        status = self.exit_status
        code = 0 if status is None else (status if status >= 0 else 128 - status)
        self.exit(result=status, return_code=code)

    # -- command palette --

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Pause / resume", "Freeze the views (counting goes on)",
                            self.action_pause)
        yield SystemCommand("Filter: cycle type", "All / files only / hide directories",
                            self.action_cycle_type)
        yield SystemCommand("Filter: cycle reads/writes", "All / reads only / writes only",
                            self.action_cycle_op)
        yield SystemCommand("Search paths", "Show only objects whose name contains text",
                            self.action_search)
        yield SystemCommand("Clear", "Forget the trace and all counters", self.action_clear)
        yield SystemCommand("Tree of the traffic", "Directories by what their subtree read "
                            "and wrote", self.action_tree)
        yield SystemCommand("Top objects: switch sort", "By reads / by writes",
                            self.action_sort_top)
        for panel, name in (("heatmap", "disk heatmap"), ("top", "top objects"),
                            ("output", "command output"), ("rates", "rates")):
            yield SystemCommand(f"Toggle {name}", f"Show or hide the {name} panel",
                                lambda p=panel: self.action_toggle(p))
        yield SystemCommand("Help", "What the views show", self.action_help)


class _AppSink:
    """The app as one of the session's sinks (runs in the app's thread: the
    pump is run by the app's timer)."""

    def __init__(self, app: DiskwatchApp) -> None:
        self.app = app

    def feed(self, batch: Any, pieces: Pieces | None) -> None:
        self.app.add_requests(batch, pieces)

    def on_event(self, event: object) -> None:
        self.app.handle_event(event)

    def tick(self, now: float) -> None:
        pass

    def close(self) -> None:
        pass
