"""Signals delivered at every line the headless loop runs, one case per line.

Run by test_daemon.py in a child process (a hang is caught by its timeout,
and the last lines on stdout say where): a Python signal handler runs
in the main thread between two bytecodes, wherever that thread is, so where
the signal lands is made deterministic by raising it from a trace function
at the Nth line executed (``sys.settrace``), N = 1, 2, ... over the loop's
rounds: its wait, a reload (the real ``Runner.reload``: reopening a log,
reading and swapping a block map), a pump round.

    python signals_everywhere.py DIR  ->  "case"/"SIGTERM at FILE:LINE" lines, "ok N cases"
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from diskwatch import runner
from diskwatch.events import Bus
from diskwatch.logfile import ReopenableFile
from diskwatch.pipeline import loop
from diskwatch.pipeline.session import Pump, Session

#: short rounds: a case stops after a few of them
loop.TICK = 0.002
#: lines not counted: the block map's parser (thousands of them in a reload,
#: all alike: no lock, nothing shared)
BMAP = str(Path(runner.__file__).with_name("bmap"))


class SignalAt:
    """A trace function counting the lines executed from the loop's first
    pump round on, raising at the Nth line the signals ``plan[N]``."""

    def __init__(self, plan: dict[int, list[int]]) -> None:
        self.plan = plan
        self.counting = False
        self.lines = 0
        self.rounds = 0
        self.measured = 0  # lines before the SIGTERM that ends a measuring run
        self.where: list[str] = []

    def __call__(self, frame, event, arg):
        if event == "call" and frame.f_code is Pump.run_once.__code__:
            self.counting = True
            self.rounds += 1
        return self.local

    def local(self, frame, event, arg):
        if event == "line" and self.counting and BMAP not in frame.f_code.co_filename:
            self.lines += 1
            for signum in self.plan.get(self.lines, ()):
                where = (f"{signal.Signals(signum).name} at "
                         f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}")
                print(where, flush=True)  # said first: the handler may never return
                self.where.append(where)
                signal.raise_signal(signum)
        return self.local


def run_loop(tmp: Path, plan: dict[int, list[int]], stop_after_rounds: int = 0):
    """One headless session under the tracer; returns (tracer, reloads, status,
    interrupted). ``stop_after_rounds``: a SIGTERM once that many rounds ran
    (to measure a scan's length)."""
    bmap = tmp / "disk.bmap"
    bmap.write_text("1 100000 1f00000 p /dev/sda1\n1 400000 440000 f /dev/sda1 /a/file\n")
    session = Session(bus=Bus(), size=32 << 20, description="signals everywhere")
    live = runner.Runner(runner.RunConfig(bmap=str(bmap), headless=True), lambda: None)
    session.blockmap = runner.load_map(str(bmap))
    reloads = 0
    with ReopenableFile(str(tmp / "trace.log")) as log:
        live.logs.append(log)

        def on_reload() -> None:
            nonlocal reloads
            reloads += 1
            live.reload(session)
        tracer = SignalAt(plan)
        if stop_after_rounds:
            def measure(frame, event, arg):
                if tracer.rounds == stop_after_rounds and event == "call" \
                        and frame.f_code is Pump.run_once.__code__:
                    tracer.measured = tracer.lines
                    signal.raise_signal(signal.SIGTERM)
                return tracer(frame, event, arg)
            sys.settrace(measure)
        else:
            sys.settrace(tracer)
        try:
            status = loop.run_session(session, headless=True, on_reload=on_reload)
        finally:
            sys.settrace(None)
    return tracer, reloads, status, session.interrupted


def main(tmp: Path) -> int:
    if loop.has_controlling_terminal():
        print("run me without a controlling terminal (SIGHUP would end the loop)")
        return 2
    cases = 0

    def case(plan: dict[int, list[int]], want_reloads: int) -> None:
        nonlocal cases
        cases += 1
        print("case", {at: [signal.Signals(n).name for n in sigs] for at, sigs in plan.items()},
              flush=True)
        tracer, reloads, status, interrupted = run_loop(tmp, plan)
        if not (status == 0 and interrupted and reloads == want_reloads):
            print(f"FAIL {tracer.where}: status {status}, interrupted {interrupted}, "
                  f"{reloads} reload(s) instead of {want_reloads}", flush=True)
            raise SystemExit(1)

    # what the lines are, without the imports a first reload makes
    run_loop(tmp, {1: [signal.SIGHUP]}, stop_after_rounds=2)
    # a SIGTERM at each line of three rounds of the loop
    rounds = run_loop(tmp, {}, stop_after_rounds=3)[0].measured
    for at in range(1, rounds + 1):
        case({at: [signal.SIGTERM]}, want_reloads=0)
    # a SIGHUP, then a SIGTERM at each line from the same one (back to back)
    # through the reload to a few rounds after it: the reload is done, then the stop
    with_reload = run_loop(tmp, {1: [signal.SIGHUP]}, stop_after_rounds=4)[0].measured
    for at in range(1, with_reload + 1):
        plan = {1: [signal.SIGHUP]}
        plan.setdefault(at, []).append(signal.SIGTERM)
        case(plan, want_reloads=1)
    print(f"ok {cases} cases: {rounds} lines of 3 rounds, {with_reload} with a reload")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
