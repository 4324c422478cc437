"""Issue 21 item 4: files created and deleted during a session, seen
through its maps, with how long they lived and their traffic. The
definitions on known maps and requests (diskwatch/lifetimes.py); the churn
guest's temporary file, live and in the report, is in test_guest_e2e.py."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

from diskwatch.bmap.format import BmapEntry
from diskwatch.bmap.index import BlockMap, BmapObject
from diskwatch.events import Command, LateNamed, make_request
from diskwatch.lifetimes import MAX_ALIVE, Lifetimes, map_diff
from diskwatch.recording.maps import MapSchedule
from diskwatch.report.analysis import analyse
from diskwatch.report.inputs import Recording
from diskwatch.report.render import report_json, write_text
from diskwatch.sinks.activity import Activity
from diskwatch.text import safe_text

MiB = 1 << 20
R, W = int(Command.READ), int(Command.WRITE)
TMP = "/tmp/av-\x1b[2Jscratch.tmp"  # a guest's name: text, never steering the terminal


def entries(*extra):
    e = BmapEntry
    return [e(1, 0, 64 * MiB, "v", "/dev/sda"), e(1, MiB, 60 * MiB, "p", "/dev/sda1"),
            e(1, 2 * MiB, 2 * MiB + 4096, "d", "/dev/sda1", "/"),
            e(1, 3 * MiB, 3 * MiB + 4096, "d", "/dev/sda1", "/tmp"),
            e(1, 10 * MiB, 11 * MiB, "f", "/dev/sda1", "/etc/old.conf"), *extra]


def f(path):
    return BmapObject("f", "/dev/sda1", path)


def req(t, cmd, offset, length):
    return make_request((1, "", cmd, offset, length, 0, t, 0.001, 0))


START = BlockMap(entries())
WITH_TMP = BlockMap(entries(BmapEntry(1, 20 * MiB, 22 * MiB, "f", "/dev/sda1", TMP)))
RENAMED = BlockMap(entries(BmapEntry(1, 20 * MiB, 22 * MiB, "f", "/dev/sda1", "/etc/new.conf")))


def session(*maps_at):
    """The temporary file written at 1.0 s (2 MiB, before any map names it),
    mapped at request 2 (1.5 s), read at 2.0 s, gone from the map at request
    4 (3.5 s). ``maps_at``: (request index, map) swapped in."""
    reqs = [req(0.5, R, 10 * MiB, 4096), req(1.0, W, 20 * MiB, 2 * MiB),
            req(1.5, W, 3 * MiB, 4096), req(2.0, R, 20 * MiB, 8192),
            req(3.5, W, 3 * MiB, 4096), req(4.0, R, 10 * MiB, 4096)]
    recorded = [SimpleNamespace(at=at, t=reqs[at].start, why="remap (auto)", map=m)
                for at, m in maps_at]
    schedule = MapSchedule(START, recorded, load=lambda m: m.map)
    return Recording(requests=reqs, source="t", size=64 * MiB), schedule


def test_a_file_made_and_deleted_between_maps_is_listed_with_its_life():
    rec, maps = session((2, WITH_TMP), (4, START))
    a = analyse(rec, START, maps=maps)
    (life,) = a.lifetimes.gone
    assert life.obj == f(TMP)
    # born at its first write (named by the map that added it), gone by the
    # last request seen before the map without it: an upper bound
    assert (life.born, life.gone_by, life.last) == (1.0, 2.0, 2.0)
    assert life.lived == 1.0
    assert (life.writes, life.write_bytes, life.reads, life.read_bytes) == (1, 2 * MiB, 1, 8192)
    doc = json.loads(json.dumps(report_json(a)))
    (row,) = doc["lifetimes"]
    assert row["path"] == TMP and row["lived"] == 1.0 and row["renamed_from"] is None
    assert doc["lifetime_counts"] == {"deaths": 1, "renames": 0, "untracked": 0, "alive": 0}
    out = io.StringIO()
    write_text(a, out)
    text = out.getvalue()
    part = text.split("Created and deleted during the session (1;")[1].split("\n\n")[0]
    assert safe_text(TMP) in part and "\x1b" not in text


def test_a_file_renamed_into_place_did_not_die():
    rec, maps = session((2, WITH_TMP), (4, RENAMED))
    a = analyse(rec, START, maps=maps)
    assert not a.lifetimes.gone and a.lifetimes.renames == 1
    assert a.lifetimes.following[f("/etc/new.conf")].renamed_from == f(TMP)
    # and deleted then: listed under its last name, made as the first
    lives = a.lifetimes
    lives.saw(9.0)
    lives.map_changed([], [f("/etc/new.conf")], START)
    (life,) = lives.gone
    assert life.obj == f("/etc/new.conf") and life.renamed_from == f(TMP)
    assert (life.born, life.gone_by) == (1.0, 9.0)


def test_what_was_there_before_is_no_creation():
    """A map made long before the session (a stale --bmap) learns of a file
    the first remap finds: read before it is written, it was there already;
    gone, it is not listed. Nor is a map swapped in before any request."""
    lives = Lifetimes()
    lives.map_changed([f("/a")], [], None)  # no request yet: the map the session starts from
    assert not lives.alive
    lives.saw(1.0)
    lives.map_changed([f("/a"), f("/b"), BmapObject("f", "/dev/sda1", "/$Journal")], [], None)
    assert lives.alive == 2  # the filesystem's own structures are not followed
    lives.touch(f("/a"), 1.2, True, 4096)
    lives.touch(f("/b"), 1.3, False, 4096, 5 * MiB)
    lives.saw(2.0)
    lives.map_changed([], [f("/a"), f("/b")], None)
    assert [life.obj for life in lives.gone] == [f("/b")]


def test_followed_objects_are_bounded():
    lives = Lifetimes()
    lives.saw(1.0)
    lives.map_changed([f(f"/t/{k}") for k in range(MAX_ALIVE + 5)], [], None)
    assert lives.alive == MAX_ALIVE and lives.untracked == 5


def test_map_diff_and_the_live_sink_told_by_the_session():
    added, removed = map_diff(START, WITH_TMP)
    assert (added, removed) == ([f(TMP)], [])
    assert map_diff(WITH_TMP, START) == ([], [f(TMP)])
    # the UI's sink: its lifetimes told once each (the notifications)
    act = Activity()
    act.feed([req(1.0, W, 20 * MiB, 4096)], [[(20 * MiB, 20 * MiB + 4096, None)]])
    act.map_changed(added, removed, WITH_TMP)
    # the session's late naming hands on its first write, named by that map
    act.on_event(LateNamed(((1.0, W, 20 * MiB, 20 * MiB + 4096, None, f(TMP)),)))
    act.feed([req(2.0, R, 20 * MiB, 4096)], [[(20 * MiB, 20 * MiB + 4096, f(TMP))]])
    act.map_changed([], [f(TMP)], START)
    (life,) = act.new_lifetimes()
    assert life.obj == f(TMP) and life.reads == 1 and life.born == 1.0
    assert act.new_lifetimes() == []


def test_the_headless_summary_names_what_was_made_and_deleted():
    """--headless's exit summary: the lifetimes its session saw, told by
    the session's map swaps as the UI's are (the names as text)."""
    from diskwatch.events import Bus
    from diskwatch.pipeline.session import Session
    from diskwatch.sinks.summary import Summary
    session = Session(bus=Bus(), size=64 * MiB, description="t", blockmap=START)
    summary = session.pump.add(Summary(64 * MiB))
    pump = session.pump

    def feed(*reqs):
        batch = list(reqs)
        summary.feed(batch, pump.look_up(batch))
        session.late.feed(batch, pump.look_up(batch))
    feed(req(1.0, W, 20 * MiB, 2 * MiB))  # unnamed: no file there yet
    session.swap_map(WITH_TMP, "remap (test)")
    feed(req(2.0, R, 20 * MiB, 8192))
    session.swap_map(START, "remap (test)")
    out = io.StringIO()
    summary.print(out)
    (line,) = [ln for ln in out.getvalue().splitlines() if "made and deleted" in ln]
    assert line == (f"diskwatch: made and deleted while watched (1): f /dev/sda1 {safe_text(TMP)} "
                    "lived <=1.00s, 2 MiB written"), line
