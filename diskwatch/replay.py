"""``diskwatch replay FILE``: a recording played into the same sinks as a live
session (the UI, the text trace, the summary); the replay's runner, as
runner.py is the live session's: it assembles a recording's Player
(recording/player.py), the text sinks and the loop (pipeline/loop.py).

    diskwatch replay boot.dwrec [--bmap MAP] [--speed N] [--headless]

Headless without ``--speed`` the recording is played as fast as it can be
read (the player's ``next_time``), so where lines break does not depend on
how fast it went.

The map: ``--bmap MAP`` names every request, even a map made after the
recording (a note says when it is not the one recorded with, and that it
overrides the maps the session remapped to); without it, the map the
recording was made with, if its file is still there unchanged, and then
each map the live session swapped in (a live remap, a SIGHUP reload: kept
in the recording) from the request it named first (recording/maps.py), so a
replay names every request as the live trace did.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from .recording.maps import choose_map as record_choose_map
from .recording.maps import maps_for
from .recording.player import replay_session
from .recording.reader import Recording, open_recording
from .text import safe_text


@dataclass
class ReplayConfig:
    path: str
    bmap: str | None = None
    speed: float | None = None  # None: 1x under the UI, as fast as possible headless
    headless: bool = False
    no_trace: bool = False
    log: str | None = None


def choose_map(recording: Recording, path: str | None, say: Callable[[str], None]):
    """The block map to name the replay with first (see the module docstring)."""
    from .runner import load_map
    chosen = record_choose_map(path, recording.header.bmap, say)
    return load_map(chosen) if chosen else None


def replay(cfg: ReplayConfig) -> int:
    import contextlib

    from .files import open_output
    from .pipeline.loop import run_session
    from .sinks import add_text_sinks

    def say(text: str) -> None:
        print(f"diskwatch: {safe_text(text)}", file=sys.stderr)

    recording = open_recording(cfg.path)
    header = recording.header
    if not cfg.headless and not sys.stdout.isatty():
        say("stdout is not a terminal: replaying headless (the trace on stdout)")
        cfg.headless = True
    if not recording.complete:
        say(f"{cfg.path} was cut short (a crash or kill?): replaying what it holds")
    from .runner import load_map
    chosen = record_choose_map(cfg.bmap, recording.header.bmap, say)
    maps = maps_for(recording, cfg.bmap, load_map(chosen) if chosen else None, say)
    speed = cfg.speed if cfg.speed is not None else 1.0
    fast = cfg.headless and cfg.speed is None
    exports = recording.header.exports
    # A session of several disks: the others named by the same file's lines
    # of their disk index (the recording's exports are the disks in order).
    disks = {name: load_map(chosen, k) for k, name in enumerate(exports[1:], 2)} \
        if chosen and len(exports) > 1 else {}
    session = replay_session(recording, maps, speed=speed, disks=disks)
    player, pump = session.player, session.pump
    with contextlib.ExitStack() as files:
        log = files.enter_context(open_output(cfg.log)) if cfg.log else None
        summary = add_text_sinks(pump, size=header.size, blockmap=session.blockmap, t0=0.0,
                                 headless=cfg.headless, no_trace=cfg.no_trace, log=log,
                                 devices=session.devices())
        try:
            if not cfg.headless:
                from .ui.replay import ReplayApp
                return run_session(session, headless=False, app=ReplayApp(session))
            run_session(session, headless=True, clock=player.next_time if fast else player.now,
                        done=lambda: player.finished, wait=0 if fast else 0.1)
        finally:
            pump.close()
    if summary is not None:
        summary.print(sys.stderr)
    return 130 if session.interrupted else 0


def replay_main(argv: list[str]) -> int:
    import argparse
    p = argparse.ArgumentParser(
        prog="diskwatch replay",
        description="Play a recording (diskwatch --record FILE) in the UI as if live, or "
                    "print its trace.")
    p.add_argument("file", help="the recording")
    p.add_argument("--bmap", metavar="MAP",
                   help="block map naming every request (default: the one recorded with, if "
                        "unchanged, then the maps the live session remapped to, kept in the "
                        "recording); a map made after the recording works too")
    p.add_argument("--speed", type=_speed, metavar="N",
                   help="play N times as fast (default 1; headless: as fast as it reads)")
    p.add_argument("--headless", action="store_true", help="no UI: print the trace as text")
    p.add_argument("--no-trace", action="store_true",
                   help="with --headless: print only the summary")
    p.add_argument("--log", metavar="FILE", help="write the text trace to FILE")
    p.add_argument("-v", "--verbose", action="store_true", help="debug messages and tracebacks")
    args = p.parse_args(argv)
    return replay(ReplayConfig(path=args.file, bmap=args.bmap, speed=args.speed,
                               headless=args.headless, no_trace=args.no_trace, log=args.log))


def _speed(text: str) -> float:
    import argparse
    try:
        v = float(text)
    except ValueError:
        v = 0.0
    if not 0 < v <= 10_000:
        raise argparse.ArgumentTypeError(f"not a speed: {text!r} (e.g. 0.5, 1, 8)")
    return v


__all__ = ["ReplayConfig", "replay", "replay_main", "choose_map"]

