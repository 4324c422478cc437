"""Issue 9, item 7: text from outside is text.

A guest's console (the captive command's output) and the file names in a
block map are the guest's to choose: ESC c, CSI 2J, OSC 0 (title), OSC 52
(clipboard), DCS, CR, BS, bidi overrides, bytes that are not UTF-8. Shown
anywhere (UI output panel, trace, top objects, heatmap, headless trace,
summary) they must be text, never a command to the terminal.
"""

from __future__ import annotations

import asyncio
import re
import subprocess

import pytest
from fixtures_server import DISKWATCH, IMAGE_SIZE, SUBPROCESS_ENV
from rich.text import Text

from diskwatch.bmap.index import BlockMap
from diskwatch.events import Bus, ConnectionEvent, make_request
from diskwatch.pipeline.session import Session
from diskwatch.server.captive import Captive
from diskwatch.text import TerminalText, safe_text
from diskwatch.ui.app import DiskwatchApp
from diskwatch.ui.heatmap import Heatmap
from diskwatch.ui.output import CommandOutput
from diskwatch.ui.status import StatusBar
from diskwatch.ui.top import TopObjects
from diskwatch.ui.trace import TraceView

MiB = 1 << 20

# What a terminal would act on: C0 (but the newline ending a line), DEL, C1,
# bidi controls and lone surrogates (which would not even encode).
RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069"
                         "\ud800-\udfff]")


# --- safe_text ----------------------------------------------------------------

@pytest.mark.parametrize("raw,shown", [
    ("/etc/passwd", "/etc/passwd"),
    ("/Program Files (x86)/été/日本語.txt", "/Program Files (x86)/été/日本語.txt"),
    ("a\x1bc", "a\\x1bc"),
    ("\x1b[2J", "\\x1b[2J"),
    ("\x1b]0;title\x07", "\\x1b]0;title\\x07"),
    ("cr\rbs\bdel\x7ftab\tnl\n", "cr\\x0dbs\\x08del\\x7ftab\\x09nl\\x0a"),
    ("c1 csi \x9b2J", "c1 csi \\u009b2J"),
    ("evil\u202etxt.exe", "evil\\u202etxt.exe"),  # right-to-left override
    ("zero\u200bwidth\u2028line", "zero\\u200bwidth\\u2028line"),
    (b"latin1-\xff\xe9".decode("utf-8", "surrogateescape"), "latin1-\\xff\\xe9"),
    ("lone \ud800 surrogate", "lone \\ud800 surrogate"),
    ("tag \U000e0041", "tag \\U000e0041"),
    ("nbsp\xa0kept", "nbsp\xa0kept"),
])
def test_safe_text_escapes_what_a_terminal_would_act_on(raw, shown):
    assert safe_text(raw) == shown
    assert not RAW_CONTROL.search(safe_text(raw))


def test_safe_text_returns_printable_text_itself():
    s = "/usr/share/doc/busybox/README"
    assert safe_text(s) is s


# --- TerminalText ---------------------------------------------------------------

def decode(*lines: str) -> list[Text]:
    t = TerminalText()
    return [t.line(line) for line in lines]


def test_terminal_text_drops_screen_title_and_clipboard_sequences():
    line = ("\x1bc\x1b[2J\x1b[H\x1b[?1049h\x1b]0;pwned\x07\x1b]52;c;aGVsbG8=\x1b\\"
            "\x1bP1$r0m\x1b\\\x1b_apc\x1b\\\x1b(B\x1b#8\x1b7\x1b8login: ")
    [text] = decode(line)
    assert text.plain == "login: "
    assert text.spans == []


def test_terminal_text_keeps_colours_as_a_terminal_applies_them():
    first, second, third = decode("[  \x1b[0;32mOK  \x1b[0m] Started \x1b[1mJournal\x1b[22m.",
                                  "\x1b[38;5;208morange \x1b[48;2;0;0;255mon blue",
                                  "still orange on blue\x1b[m plain")
    assert first.plain == "[  OK  ] Started Journal."
    spans = {first.plain[s.start:s.end]: s.style for s in first.spans}
    assert spans["OK  "].color.number == 2 and not spans["OK  "].bold
    assert spans["Journal"].bold
    assert second.plain == "orange on blue"
    # the SGR state carries over to the next line, as on a terminal
    assert third.plain == "still orange on blue plain"
    carried = third.spans[0].style
    assert carried.color.number == 208 and carried.bgcolor.triplet == (0, 0, 255)
    assert third.spans[0].end == len("still orange on blue")


def test_terminal_text_carriage_return_rewrites_backspace_is_shown():
    cr, trailing, bs, bare_esc, cut, tab = decode(
        "progress 10%\rprogress 55%\rprogress 100%", "done\r", "back\bspace", "lone \x1b",
        "cut \x1b[3", "\tx")
    assert cr.plain == "progress 100%"  # what the progress bar means
    assert trailing.plain == "done"  # a CR with nothing after it changes nothing
    assert bs.plain == "back\\x08space"  # not applied: nothing printed is hidden
    assert bare_esc.plain == "lone \\x1b"
    assert cut.plain == "cut "
    assert tab.plain == " " * 8 + "x"


def test_terminal_text_never_conceals_or_blinks():
    [text] = decode("\x1b[8msecret\x1b[5m blink")
    assert text.plain == "secret blink"
    assert all(not s.style.conceal and not s.style.blink for s in text.spans)


@pytest.mark.parametrize("junk", [
    "\x1b[38;5;999mx", "\x1b[38;2;1;2mx", "\x1b[38;2;300;0;0mx", "\x1b[;;;mx",
    "\x1b[38:2::1:2:3mx", "\x1b[4:3mx", "\x1b[99999999999999999999mx", "\x1b[1;2\x1bcx",
    "\x1b]8;;http://evil/\x1b\\x\x1b]8;;\x1b\\", "\x9b2Jx", "\x1b\x1b\x1bx",
])
def test_terminal_text_survives_malformed_sequences(junk):
    [text] = decode(junk)
    assert "x" in text.plain
    assert not RAW_CONTROL.search(text.plain)
    assert all(s.style.link is None for s in text.spans)  # OSC 8 links are not kept


# --- the UI: a --run command and a block map with hostile text --------------------

SIZE = 64 * MiB
HOSTILE_NAMES = {
    # offset (MiB) -> the file name, as bytes in the map
    2: b"/etc/\x1bc\x1b[2Jreset-screen",
    3: b"/tmp/\x1b]0;pwned\x07title",
    4: b"/tmp/\x1b]52;c;aGVsbG8=\x1b\\clipboard",
    5: b"/tmp/cr\rback\bspace",
    6: b"/tmp/invoice\xe2\x80\xaecod.exe",  # U+202E right-to-left override
    7: b"/tmp/latin1-\xff",
}


def hostile_map(path) -> BlockMap:
    lines = [b"1 0 %x v /dev/sda" % SIZE, b"1 %x %x p /dev/\x1b[31msda1" % (MiB, SIZE)]
    lines += [b"1 %x %x f /dev/sda1 %s" % (mib * MiB, mib * MiB + 65536, name)
              for mib, name in HOSTILE_NAMES.items()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return BlockMap.load(path)


# What the guest's console prints: a systemd-like console reset first (ESC c,
# CSI 2J, cursor home), the title and the clipboard, a DCS, a progress line
# rewritten with CR, a BS, and colours.
HOSTILE_OUTPUT = (
    r"printf '\033c\033[2J\033[H\033]0;pwned title\007\033]52;c;aGVsbG8=\033\\';"
    r"printf '\033P1$r0m\033\\Welcome to \033[1;32mDebian GNU/Linux 12\033[0m!\n';"
    r"printf 'fsck 10%%\rfsck 100%%\n';"
    r"printf 'back\bspace\n';"
    r"printf '[  \033[0;32mOK  \033[0m] Reached target \033[1mMulti-User System\033[0m.\n'"
)
# The same text without anything a terminal would act on: the screen must be
# the same, byte for byte.
CLEAN_OUTPUT = (
    r"printf 'Welcome to \033[1;32mDebian GNU/Linux 12\033[0m!\n';"
    r"printf 'fsck 100%%\n';"
    r"printf '%s\n' 'back\x08space';"
    r"printf '[  \033[0;32mOK  \033[0m] Reached target \033[1mMulti-User System\033[0m.\n'"
)
STARTED = 1000.0


def make_app(tmp_path, blockmap: BlockMap):
    bus = Bus()
    session = Session(bus=bus, size=SIZE, description="file guest\x1b]0;x\x07.img",
                      uri="nbd+unix:///?socket=/tmp/s", command="qemu-system-x86_64 $nbd",
                      blockmap=blockmap, started=STARTED)
    app = DiskwatchApp(session, clock=lambda: STARTED + 5.0)
    app.notify = lambda *a, **k: None  # the exit toast times out: keep it out of the picture
    return app, bus


def feed(app, bus, command: str):
    """Run ``command`` as the real captive command (output captured, as under
    the UI), and read every file of the map once."""

    async def run_before(pilot):
        bus.publish(ConnectionEvent(1, True, "unix"))
        captive = Captive(command, {}, capture=True, bus=bus)
        captive.start()
        while captive.wait(0) is None:
            await asyncio.sleep(0.02)
        # The output panel appears with the first line: let the layout (and
        # the heatmap's cell size) settle before the requests light cells.
        app.pump()
        await pilot.pause()
        await pilot.pause()
        bus.publish_requests([make_request((1, "", 0, mib * MiB, 65536, 0, STARTED + i, 1e-4, 0))
                              for i, mib in enumerate(HOSTILE_NAMES)])
        app.pump()
        app._refresh_views(force=True)
        await pilot.pause()
        await pilot.hover(Heatmap, offset=(2, 1))  # the heatmap's line about a cell
        await pilot.pause()

    return run_before


def test_snapshot_hostile_console_and_names_are_text(snap_compare, tmp_path):
    app, bus = make_app(tmp_path, hostile_map(tmp_path / "hostile.bmap"))
    assert snap_compare(app, terminal_size=(120, 34), run_before=feed(app, bus, HOSTILE_OUTPUT))


def test_hostile_console_output_changes_nothing_but_its_text(tmp_path):
    """The screen after the hostile output equals the screen after the same
    visible text printed cleanly; no rendered segment holds a control."""
    blockmap = hostile_map(tmp_path / "hostile.bmap")

    async def screen_of(command: str) -> tuple[str, list[str]]:
        app, bus = make_app(tmp_path, blockmap)
        async with app.run_test(size=(120, 34)) as pilot:
            await feed(app, bus, command)(pilot)
            output = app.query_one(CommandOutput)
            shown = [seg.text for strip in output.lines for seg in strip]
            shown += app.query_one(TraceView).lines_text()
            shown.append(str(app.query_one(TopObjects).render()))
            shown += [seg.text for seg in app.query_one(Heatmap)._info_line()]
            shown.append(app.query_one(StatusBar).render().plain)
            return app.export_screenshot(), shown

    hostile_svg, hostile_segments = asyncio.run(screen_of(HOSTILE_OUTPUT))
    clean_svg, _ = asyncio.run(screen_of(CLEAN_OUTPUT))
    for text in hostile_segments:
        assert not RAW_CONTROL.search(text), repr(text)
    assert hostile_svg == clean_svg


def test_ui_trace_top_and_heatmap_show_hostile_names_escaped(tmp_path):
    app, bus = make_app(tmp_path, hostile_map(tmp_path / "hostile.bmap"))

    async def main():
        async with app.run_test(size=(160, 40)) as pilot:
            await feed(app, bus, "true")(pilot)
            trace = "\n".join(app.query_one(TraceView).lines_text())
            top = str(app.query_one(TopObjects).render())
            heatmap = app.query_one(Heatmap)
            heatmap.cursor = 2 * MiB // app.stats.heat.cell_size
            info = "".join(s.text for s in heatmap._info_line())
            legend = "".join(s.text for line in heatmap._legend_lines(160) for s in line)
            return trace, top, info, legend

    trace, top, info, legend = asyncio.run(main())
    for shown in ("/etc/\\x1bc\\x1b[2Jreset-screen", "/tmp/\\x1b]0;pwned\\x07title",
                  "/tmp/\\x1b]52;c;aGVsbG8=\\x1b\\clipboard", "/tmp/cr\\x0dback\\x08space",
                  "/tmp/invoice\\u202ecod.exe", "/tmp/latin1-\\xff"):
        assert shown in trace, trace
        assert shown[-24:] in top, top  # the table trims names from the left
    assert "/etc/\\x1bc\\x1b[2Jreset-screen" in info
    assert "\\x1b[31msda1" in legend
    for text in (trace, top, info, legend):
        assert not RAW_CONTROL.search(text), repr(text)


# --- the headless trace: the real CLI, a real client ------------------------------

def run(args: list) -> subprocess.CompletedProcess:
    """The console script, its output as bytes (a raw ESC must not hide in decoding)."""
    return subprocess.run([DISKWATCH, *map(str, args)], capture_output=True, timeout=60,
                          env=SUBPROCESS_ENV)


def test_headless_trace_and_summary_hold_no_raw_escape(server_image, tmp_path):
    """A map whose names hold escape sequences, the real console script, and
    nbdcopy reading the whole image: stdout (the trace), stderr (the summary,
    with the most-read names) and the --log file hold no ESC or other control."""
    lines = [b"1 0 %x v /dev/sda" % IMAGE_SIZE,
             b"1 0 %x p /dev/sda1\x1b[2J" % (16 * MiB)]
    lines += [b"1 %x %x f /dev/sda1 %s" % (mib * MiB, mib * MiB + 65536, name)
              for mib, name in HOSTILE_NAMES.items()]
    bmap = tmp_path / "hostile.bmap"
    bmap.write_bytes(b"\n".join(lines) + b"\n")
    log = tmp_path / "trace.log"
    p = run([server_image.path, "-r", "--bmap", bmap, "--headless",
             "--run", 'nbdcopy --no-extents "$uri" - > /dev/null'])
    assert p.returncode == 0, p.stderr
    for stream in (p.stdout, p.stderr):
        assert b"\x1b" not in stream and b"\r" not in stream and b"\b" not in stream
        assert b"\x07" not in stream and b"\xe2\x80\xae" not in stream, stream
    trace = p.stdout.decode()
    assert "f /dev/sda1 /etc/\\x1bc\\x1b[2Jreset-screen  [" in trace, trace
    assert "/tmp/invoice\\u202ecod.exe" in trace and "/tmp/latin1-\\xff" in trace
    assert "most reads: f /dev/sda1 /" in p.stderr.decode()
    # --log writes the same trace to a file: the same holds there
    p = run([server_image.path, "-r", "--bmap", bmap, "--headless", "--no-trace",
             "--log", log, "--run", 'nbdcopy --no-extents "$uri" - > /dev/null'])
    assert p.returncode == 0, p.stderr
    data = log.read_bytes()
    assert b"reset-screen" in data and b"\x1b" not in data and b"\r" not in data


def test_a_command_with_brackets_is_its_title_not_markup(tmp_path):
    """The output panel's border title is the command as text: "[/]" used to
    be parsed as markup (a MarkupError ended the app at mount), and
    "[@click=app.quit]" as an action."""
    command = "echo '[/]' [@click=app.quit]quit[/] [b]x"
    session = Session(bus=Bus(), size=SIZE, description="file x.img", uri="nbd://x",
                      command=command, blockmap=None, started=STARTED)
    app = DiskwatchApp(session, clock=lambda: STARTED + 5.0)

    async def title() -> str:
        async with app.run_test(size=(120, 34)) as pilot:
            await pilot.pause()
            return app.query_one(CommandOutput)._border_title.plain

    assert asyncio.run(title()) == f"$ {command}"


def test_log_lines_under_the_ui_become_messages_not_terminal_writes():
    """While the UI runs, a log line from another thread (a qemu daemon's
    stderr, an upstream server lost) is a Message for the output panel,
    which shows it escaped; the stderr handler, which would write across the
    app's screen, gets nothing until the UI is gone."""
    import io
    import logging
    import threading

    from diskwatch.events import Message
    from diskwatch.pipeline.loop import logs_as_messages
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    bus = Bus()
    got: list = []
    bus.on_event(got.append)
    qemu = logging.getLogger("diskwatch.sources.qemu")
    try:
        with logs_as_messages(bus):
            t = threading.Thread(target=qemu.error, args=("qemu-storage-daemon: \x1b[2J gone",))
            t.start()
            t.join()
            qemu.info("not shown")  # below WARNING, as on stderr
        qemu.warning("after the UI")
    finally:
        root.removeHandler(handler)
    assert [(m.text, m.level) for m in got if isinstance(m, Message)] == [
        ("qemu-storage-daemon: \x1b[2J gone", "error")]
    assert stream.getvalue() == "after the UI\n"


def _nodes(node):
    for child in node.children:
        yield child
        yield from _nodes(child)


def test_the_tree_and_the_activity_lines_show_hostile_names_escaped(tmp_path):
    """Issue 21: the tree of the traffic names each directory and file by
    its last part, and the activity line names a churning file: the
    guest's text, escaped, never markup nor a terminal command."""
    from diskwatch.ui.activity import ActivityPanel
    from diskwatch.ui.tree import TrafficTreeView
    app, bus = make_app(tmp_path, hostile_map(tmp_path / "hostile.bmap"))
    title = 3 * MiB  # /tmp/\x1b]0;pwned\x07title, written in bursts: churn

    async def main():
        async with app.run_test(size=(160, 40)) as pilot:
            await feed(app, bus, "true")(pilot)
            bursts = [make_request((1, "", 0, 20 * MiB, 4096, 0, STARTED + 3.9, 1e-4, 0))]
            for i in range(4):
                bursts += [make_request((1, "", 1, title, 4096, 0, STARTED + 4 + i * 0.1, 1e-4, 0)),
                           make_request((1, "", 3, 0, 0, 0, STARTED + 4.01 + i * 0.1, 1e-4, 0))]
            bus.publish_requests(bursts)
            app.pump()
            app._refresh_views(force=True)
            await pilot.pause()
            activity = str(app.query_one(ActivityPanel).render())
            await pilot.press("d")
            view = app.screen.query_one(TrafficTreeView)
            for _ in range(4):  # open every directory, level by level
                opened = [n for n in _nodes(view.root) if n.allow_expand and not n.is_expanded]
                for node in opened:
                    node.expand()
                await pilot.pause()
                app._refresh_views(force=True)
                await pilot.pause()
            tree = "\n".join("".join(seg.text for seg in view.render_line(y))
                             for y in range(view.scrollable_content_region.height))
            return activity, tree

    activity, tree = asyncio.run(main())
    assert "churn" in activity and "/tmp/\\x1b]0;pwned\\x07title" in activity, activity
    for shown in ("\\x1bc\\x1b[2Jreset-screen", "\\x1b]0;pwned\\x07title",
                  "\\x1b]52;c;aGVsbG8=\\x1b\\clipboard", "cr\\x0dback\\x08space",
                  "invoice\\u202ecod.exe", "latin1-\\xff", "/dev/\\x1b[31msda1"):
        assert shown in tree, tree
    for text in (activity, tree):
        assert not RAW_CONTROL.search(text), repr(text)
