"""The ext4 journal read as it is written (issue 18, item 3b): a file whose
inode, directory entry and bitmaps are only in committed transactions (not
yet checkpointed) is named where it will be.

The journals are written by e2fsprogs itself: debugfs makes image B from A
(a new file), the file's data goes home on A (data=ordered), and every other
block that differs is logged into A's journal as one transaction with
debugfs's ``journal_write``. Ground truth from other tools: ``debugfs
logdump -a`` lists the transactions and their home blocks, ``e2fsck -E
journal_only`` replays them, and debugfs on B says where the file lies.
"""

from __future__ import annotations

import random
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diskwatch.bmap import jbd2
from diskwatch.bmap.metadata import _import_tsk, ext_journal, map_metadata
from diskwatch.sources.file import FileSource

BS = 4096
MiB = 1 << 20

pytestmark = pytest.mark.skipif(shutil.which("debugfs") is None, reason="e2fsprogs")


def debugfs(image: Path, *commands: str, write: bool = False) -> str:
    r = subprocess.run(["debugfs", *(["-w"] if write else []), "-f", "-", str(image)],
                       input="\n".join(commands) + "\n", capture_output=True, text=True,
                       timeout=60, check=True)
    return r.stdout


def file_blocks(image: Path, path: str) -> list[int]:
    out = debugfs(image, f"blocks {path}")
    return [int(b) for b in out.split() if b.isdigit()]


def make_fs(path: Path, tmp: Path, files: dict[str, bytes]) -> None:
    tree = tmp / (path.name + "-tree")
    for name, data in files.items():
        f = tree / name.lstrip("/")
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(data)
    with open(path, "wb") as f:
        f.truncate(64 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", str(BS), "-d", str(tree), str(path)],
                   check=True, timeout=60)


def differing_blocks(a: Path, b: Path) -> list[int]:
    da, db = a.read_bytes(), b.read_bytes()
    return [k for k in range(len(da) // BS) if da[k * BS:(k + 1) * BS] != db[k * BS:(k + 1) * BS]]


def log_transaction(image: Path, source: Path, blocks: list[int], tmp: Path,
                    revoke: list[int] = (), commit: bool = True) -> None:
    """One transaction in ``image``'s journal holding ``blocks`` as they are
    in ``source``, written by debugfs."""
    data = source.read_bytes()
    payload = tmp / "payload.bin"
    payload.write_bytes(b"".join(data[k * BS:(k + 1) * BS] for k in blocks))
    opts = ""
    if blocks:
        opts += " -b " + ",".join(map(str, blocks))
    if revoke:
        opts += " -r " + ",".join(map(str, revoke))
    if not commit:
        opts += " -c"
    debugfs(image, "jo", f"jw{opts} {payload}", "jc", write=True)


def copy_blocks(src: Path, dst: Path, blocks: list[int]) -> None:
    data = src.read_bytes()
    with open(dst, "r+b") as f:
        for k in blocks:
            f.seek(k * BS)
            f.write(data[k * BS:(k + 1) * BS])


def logdump(image: Path) -> list[tuple[int, int]]:
    """(FS block, journal block) of every logged block, as debugfs reads the log."""
    out = debugfs(image, "logdump -a")
    return [(int(a), int(b)) for a, b in re.findall(r"FS block (\d+) logged at journal block (\d+)", out)]


@pytest.fixture(scope="module")
def journaled(tmp_path_factory):
    """(A with the new file only in its journal, B where it is home, the
    file's data blocks, the logged blocks)."""
    tmp = tmp_path_factory.mktemp("jbd2")
    a, b = tmp / "a.img", tmp / "b.img"
    make_fs(a, tmp, {"/srv/old.txt": b"old\n" * 100, "/etc/hostname": b"guest\n"})
    shutil.copy(a, b)
    new = tmp / "new.bin"
    new.write_bytes(random.Random(1).randbytes(300_000))
    debugfs(b, f"write {new} /srv/new.log", write=True)
    data = file_blocks(b, "/srv/new.log")
    meta = [k for k in differing_blocks(a, b) if k not in data]
    copy_blocks(b, a, data)  # data=ordered: the data is home before the commit
    log_transaction(a, b, meta, tmp)
    return a, b, data, meta


def test_the_scan_finds_what_logdump_lists(journaled):
    a, _, _, meta = journaled
    pytsk3 = _import_tsk()
    with FileSource(str(a), readonly=True) as vol:
        scan, copies = ext_journal(pytsk3, vol)
    ours = [(home, jblock) for t in scan.transactions for home, jblock, _ in t.blocks]
    assert ours == logdump(a) and sorted(h for h, _ in ours) == sorted(meta)
    assert set(copies) == set(meta)
    assert scan.summary() == f"journal: 1 transactions (1-1) read, {len(meta)} blocks seen as logged"


def test_the_view_reads_what_e2fsck_replays(journaled, tmp_path):
    """Every block of the volume, through the view, is what e2fsck's own
    replay of the journal leaves (but the superblock's block, whose recovery
    flag e2fsck clears, and the journal's own blocks)."""
    a, _, _, _ = journaled
    replayed = tmp_path / "replayed.img"
    shutil.copy(a, replayed)
    subprocess.run(["e2fsck", "-y", "-E", "journal_only", str(replayed)], check=True,
                   capture_output=True, timeout=60)
    journal = set(file_blocks(a, "<8>"))
    pytsk3 = _import_tsk()
    with FileSource(str(a), readonly=True) as vol:
        _, copies = ext_journal(pytsk3, vol)
        view = jbd2.JournalView(vol, BS, copies)
        got = view.pread(0, vol.size)
    want = replayed.read_bytes()
    differ = [k for k in range(len(want) // BS)
              if got[k * BS:(k + 1) * BS] != want[k * BS:(k + 1) * BS]]
    assert [k for k in differ if k != 0 and k not in journal] == []
    assert a.read_bytes() != want  # the journal held something to replay


def test_a_file_only_in_the_journal_is_named_where_debugfs_finds_it(journaled):
    a, b, data, _ = journaled
    with FileSource(str(a), readonly=True) as vol:
        meta = map_metadata(vol, done_event=False)
    ranges = sorted((e.start // BS, e.end // BS) for e in meta.entries if e.path == "/srv/new.log")
    merged = []
    for s, e in ranges:
        if merged and merged[-1][1] == s:
            merged[-1] = (merged[-1][0], e)
        else:
            merged.append((s, e))
    want = []
    for k in data:
        if want and want[-1][1] == k:
            want[-1] = (want[-1][0], k + 1)
        else:
            want.append((k, k + 1))
    assert merged == want
    assert meta.filesystems[0].journal.startswith("journal: 1 transactions")


def test_each_journal_copy_is_given_to_what_debugfs_says_it_carries(journaled):
    """The copy of the inode-table block that holds the new file's inode
    (debugfs imap) is the file's; the copy of its directory's block (debugfs
    blocks) is the directory's. Where each copy lies: logdump's journal
    block, through the journal inode's blocks (debugfs blocks <8>)."""
    a, b, _, _ = journaled
    jblocks = file_blocks(a, "<8>")
    logged = dict(logdump(a))  # FS block -> journal block
    imap = debugfs(b, "imap /srv/new.log")
    inode_block = int(re.search(r"located at block (\d+)", imap).group(1))
    (dir_block,) = file_blocks(b, "/srv")
    with FileSource(str(a), readonly=True) as vol:
        meta = map_metadata(vol, done_event=False)
    carried = {(e.start // BS): (e.type, e.path) for e in meta.journal}
    assert carried[jblocks[logged[inode_block]]] == ("f", "/srv/new.log")
    assert carried[jblocks[logged[dir_block]]] == ("d", "/srv")


def test_a_revoke_in_a_later_transaction_cancels_the_copy(journaled, tmp_path):
    a, b, _, meta = journaled
    c = tmp_path / "c.img"
    shutil.copy(a, c)
    gone = meta[-1]
    log_transaction(c, b, [], tmp_path, revoke=[gone])
    pytsk3 = _import_tsk()
    with FileSource(str(c), readonly=True) as vol:
        scan, copies = ext_journal(pytsk3, vol)
    assert [t.revoked for t in scan.transactions] == [[], [gone]]
    assert gone not in copies and set(copies) == set(meta) - {gone}
    out = debugfs(c, "logdump -a")
    assert f"Revoke FS block {gone}" in out


def test_an_uncommitted_transaction_is_not_read(journaled, tmp_path):
    a, b, _, meta = journaled
    c = tmp_path / "c.img"
    shutil.copy(a, c)
    log_transaction(c, b, [meta[0]], tmp_path, commit=False)
    pytsk3 = _import_tsk()
    with FileSource(str(c), readonly=True) as vol:
        scan, copies = ext_journal(pytsk3, vol)
    assert len(scan.transactions) == 1 and set(copies) == set(meta)


def test_an_escaped_block_reads_with_its_magic(tmp_path):
    """A logged block that begins with the journal's magic is stored with it
    zeroed (flag 1 in logdump); the view gives it back whole."""
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    make_fs(a, tmp_path, {"/f": b"x"})
    shutil.copy(a, b)
    free = 10_000  # a block nothing uses, in group 0
    content = struct.pack(">I", jbd2.MAGIC) + random.Random(2).randbytes(BS - 4)
    with open(b, "r+b") as f:
        f.seek(free * BS)
        f.write(content)
    log_transaction(a, b, [free], tmp_path)
    assert "(flags 0x9)" in debugfs(a, "logdump -a") or "(flags 0x1)" in debugfs(a, "logdump -a")
    pytsk3 = _import_tsk()
    with FileSource(str(a), readonly=True) as vol:
        _, copies = ext_journal(pytsk3, vol)
        assert copies[free][1] is True
        assert jbd2.JournalView(vol, BS, copies).pread(free * BS, BS) == content


# --- a journal the guest wrote is untrusted ----------------------------------------------

def _superblock(maxlen: int, start: int, seq: int, incompat: int) -> bytes:
    sb = bytearray(BS)
    struct.pack_into(">III", sb, 0, jbd2.MAGIC, jbd2.SUPERBLOCK_V2, 0)
    struct.pack_into(">IIIII", sb, 12, BS, maxlen, 1, seq, start)
    struct.pack_into(">I", sb, 0x28, incompat)
    return bytes(sb)


@settings(max_examples=300, deadline=None)
@given(st.integers(2, 64), st.integers(0, 70), st.sampled_from([0, 2, 8, 0x10, 0x12, 0x21]),
       st.lists(st.tuples(st.integers(0, 63), st.integers(1, 5), st.integers(0, 9),
                          st.binary(min_size=0, max_size=64)), max_size=40))
def test_a_hostile_log_is_scanned_within_its_journal(maxlen, start, incompat, blocks):
    """Blocks with the magic and any type, sequence and tags: the scan reads
    each journal block at most once, only inside the journal, and what it
    would replay comes from inside the journal."""
    journal = [bytearray(BS) for _ in range(maxlen)]
    journal[0][:] = _superblock(maxlen, start, 7, incompat)
    for at, btype, seq, body in blocks:
        if 1 <= at < maxlen:
            struct.pack_into(">III", journal[at], 0, jbd2.MAGIC, btype, 7 + seq % 3)
            journal[at][12:12 + len(body)] = body
    reads: list[int] = []

    def read(n: int) -> bytes:
        assert 0 <= n < maxlen
        reads.append(n)
        return bytes(journal[n])
    scan = jbd2.scan_journal(read, maxlen)
    assert len(reads) <= maxlen + 1
    assert all(1 <= jblock < maxlen for jblock, _ in scan.replay.values())


# --- live: a small file created through the server is named by itself ---------------

def test_a_small_new_file_written_through_the_server_is_named_by_an_automatic_remap(
        journaled, tmp_path):
    """A client writes what a kernel would for a 300 KB file under data=ordered
    (its data home, its metadata as one committed transaction in the
    journal: far under the 1 MiB of unnamed writes that used to be needed):
    the journal writes are structure writes, the remap follows once they
    settle, reads the journal, and the trace names the file from then on."""
    import io
    import time

    nbd = pytest.importorskip("nbd")
    from diskwatch.bmap.index import BlockMap, BmapObject
    from diskwatch.events import Bus
    from diskwatch.pipeline.session import Session
    from diskwatch.remap import Remapper
    from diskwatch.server import serve_in_thread
    from diskwatch.sinks.metrics import MetricsSink, families
    from diskwatch.sinks.summary import Summary
    from diskwatch.sinks.text_trace import TextTrace
    from diskwatch.sources.snapshot import Snapshot
    a_journaled, b, data, _ = journaled
    a = tmp_path / "a.img"  # A as it was: the new file nowhere
    make_fs(a, tmp_path, {"/srv/old.txt": b"old\n" * 100, "/etc/hostname": b"guest\n"})
    changed = differing_blocks(a, a_journaled)
    with FileSource(str(a), readonly=True) as vol:
        old = BlockMap(map_metadata(vol, done_event=False).entries)
    assert BmapObject("f", "/dev/sda", "/srv/new.log") not in old.object_table()
    source = Snapshot(FileSource(str(a)), tmpdir=str(tmp_path))
    bus = Bus()
    running = serve_in_thread({"": source}, bus)
    session = Session(bus=bus, size=source.size, description="a.img", blockmap=old)
    out = io.StringIO()
    session.pump.add(TextTrace(out, session.blockmap, session.started))
    summary = session.pump.add(Summary(source.size))
    metrics = session.pump.add(MetricsSink({"": source.size}))
    said: list[str] = []

    remapper = session.pump.add(Remapper(
        source, current=lambda: session.blockmap, say=lambda text, level: said.append(text),
        swap=lambda result: session.swap_map(result.blockmap, "remap", result.journal_map)))
    new = a_journaled.read_bytes()
    h = nbd.NBD()
    try:
        h.connect_uri(running.uri)
        for k in changed:
            h.pwrite(new[k * BS:(k + 1) * BS], k * BS)
        h.flush()
        running.thread.call(lambda: None)
        session.pump.run_once(time.monotonic())
        assert 0 < remapper.unnamed < MiB and remapper.structure > 0
        deadline = time.monotonic() + 30
        while remapper.remaps == 0:  # settles, remaps, swaps: no write needed
            assert time.monotonic() < deadline, said
            session.pump.run_once(time.monotonic())
            time.sleep(0.05)
        assert said[0].startswith("remap (auto): +"), said
        assert "/srv/new.log" in said[0]
        h.pread(4096, data[0] * BS)
        running.thread.call(lambda: None)
        session.pump.run_once(time.monotonic())
        session.pump.close()
    finally:
        h.shutdown()
        running.stop()
        source.close()
    text = out.getvalue()
    assert "read f /dev/sda /srv/new.log" in text
    # Its data was written before any map knew it: named late, in one line,
    # and counted as its writes in the summary (the top objects' counts).
    (line,) = [ln for ln in text.splitlines() if "named late: write f /dev/sda /srv/new.log" in ln]
    assert f"in {len(data)} requests" in line or len(data) == 1, line
    counts = summary.stats.objects[BmapObject("f", "/dev/sda", "/srv/new.log")]
    assert counts.write_bytes == len(data) * BS and counts.writes == len(data)
    assert session.late.named_late >= len(data) * BS
    # The journal's writes carried its inode and its directory's block: given
    # to them (what each file cost in journal writes), and said in one line.
    assert counts.journal_bytes > 0
    assert summary.stats.objects[BmapObject("d", "/dev/sda", "/srv")].journal_bytes > 0
    (line,) = [ln for ln in text.splitlines() if "] journal: " in ln]
    assert "written to the journal carried" in line and "/srv/new.log" in line, line
    # And the metrics: each owner's journal bytes, as a counter (the same total).
    (carried,) = [f for f in families(metrics.snapshot())
                  if f.name == "diskwatch_journal_carried_bytes_total"]
    by_path = {labels: n for labels, n in carried.samples}
    assert by_path[("/dev/sda", "/srv/new.log")] == counts.journal_bytes
    assert by_path[("/dev/sda", "/srv")] > 0
