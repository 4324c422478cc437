"""Issue 12, item 7: nbd-server's transaction log and nbdkit's log filter
output, made by the real servers while a real client (libnbd) does a known
workload, import as exactly the requests the client sent.

nbd-server runs in the foreground for one client (``-d``) on a loopback
port; nbdkit runs as libnbd's subprocess on a socket pair
(``connect_command``: ``nbdkit -s``), so no port or socket race exists.
"""

from __future__ import annotations

import errno
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from diskwatch.errors import DiskwatchError
from diskwatch.events import Command
from diskwatch.report.importers import ImportFormatError
from diskwatch.report.inputs import open_input, sniff

nbd = pytest.importorskip("nbd")

MiB = 1 << 20
DISK = 16 * MiB
READ, WRITE, DISC, FLUSH, TRIM, CACHE, ZERO, BLOCK_STATUS = (
    int(Command.READ), int(Command.WRITE), int(Command.DISC), int(Command.FLUSH),
    int(Command.TRIM), int(Command.CACHE), int(Command.WRITE_ZEROES), int(Command.BLOCK_STATUS))
FUA, NO_HOLE = 1, 2


def workload(h, fail) -> list[tuple[int, int, int, int, int]]:
    """Known requests; returns (command, offset, length, flags, errno) of each
    as sent. ``fail(h)`` makes one request the server refuses and returns
    its tuple."""
    sent = []

    def did(cmd, offset, length, flags=0, err=0):
        sent.append((cmd, offset, length, flags, err))

    h.pwrite(b"a" * 4096, 8192)
    did(WRITE, 8192, 4096)
    h.pread(512, 0)
    did(READ, 0, 512)
    h.pwrite(b"b" * 65536, MiB, nbd.CMD_FLAG_FUA)
    did(WRITE, MiB, 65536, FUA)
    h.flush()
    did(FLUSH, 0, 0)
    h.trim(4096, 0)
    did(TRIM, 0, 4096)
    h.zero(8192, 2 * MiB)
    did(ZERO, 2 * MiB, 8192)
    h.zero(4096, 3 * MiB, nbd.CMD_FLAG_NO_HOLE)
    did(ZERO, 3 * MiB, 4096, NO_HOLE)
    for i in range(5):  # an appending log: the same file written again and again
        h.pwrite(b"c" * 512, 5 * MiB + i * 512)
        did(WRITE, 5 * MiB + i * 512, 512)
    h.pread(131072, 4 * MiB)
    did(READ, 4 * MiB, 131072)
    if h.can_cache():
        h.cache(4096, 6 * MiB)
        did(CACHE, 6 * MiB, 4096)
    if h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION):
        h.block_status(65536, 0, lambda *args: 0)
        did(BLOCK_STATUS, 0, 65536)
    sent.append(fail(h))
    h.pread(4096, 7 * MiB)
    did(READ, 7 * MiB, 4096)
    return sent


def imported(recording):
    return [(r.command, r.offset, r.length, r.flags, r.error) for r in recording.requests]


def import_as_recording(log: Path, kind: str, tmp_path: Path):
    """`diskwatch import KIND LOG -o REC`, read back: the same requests, to the bit."""
    from diskwatch.cli import main
    out = tmp_path / f"{kind}.rec"
    assert main(["import", kind, str(log), "-o", str(out)]) == 0
    assert sniff(str(out)) == "diskwatch"
    original, again = open_input(str(log), kind), open_input(str(out))
    assert [tuple(r) for r in again.requests] == [tuple(r) for r in original.requests]
    assert (again.origin, again.timed, again.source) == (kind, original.timed, original.source)
    return again


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(DISK)
    return path


def _free_port() -> int:
    # nbd-server has no "port 0": take a free port from the kernel and hand it over.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _connect_when_listening(port: int, proc: subprocess.Popen, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        h = nbd.NBD()
        h.set_export_name("disk")
        try:
            h.connect_tcp("127.0.0.1", str(port))
            return h
        except nbd.Error:
            del h
            if proc.poll() is not None:
                raise AssertionError(f"nbd-server exited: {proc.stderr.read()}") from None
            if time.monotonic() > deadline:
                raise AssertionError("nbd-server did not start listening") from None
            time.sleep(0.05)  # polling a real listener, not standing in for one


def test_nbd_server_transaction_log_imports_the_requests_sent(disk, tmp_path):
    if not Path("/usr/bin/nbd-server").exists():
        pytest.fail("nbd-server is missing: apt-get install nbd-server (see the Makefile)")
    log = tmp_path / "transactions.log"
    port = _free_port()
    conf = tmp_path / "nbd-server.conf"
    conf.write_text(f"[generic]\n    listenaddr = 127.0.0.1\n    port = {port}\n"
                    f"[disk]\n    exportname = {disk}\n    transactionlog = {log}\n"
                    "    fua = true\n    flush = true\n    trim = true\n")
    proc = subprocess.Popen(["nbd-server", "-C", str(conf), "-d"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        h = _connect_when_listening(port, proc)

        def fail(h):  # a read past the end: nbd-server answers EINVAL
            h.set_strict_mode(0)
            with pytest.raises(nbd.Error):
                h.pread(512, DISK - 256)
            h.set_strict_mode(nbd.STRICT_COMMANDS | nbd.STRICT_FLAGS | nbd.STRICT_BOUNDS)
            return (READ, DISK - 256, 512, 0, errno.EINVAL)

        sent = workload(h, fail)
        h.shutdown()
        del h
        proc.wait(timeout=30)  # -d: one client, then it exits (and the log is complete)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert sniff(str(log)) == "nbd-trdump"
    rec = open_input(str(log))
    assert rec.origin == "nbd-trdump" and not rec.timed and not rec.truncated
    # the client's disconnect is a request in nbd-server's log
    assert imported(rec) == sent + [(DISC, 0, 0, 0, 0)]
    assert [r.start for r in rec.requests] == list(range(len(sent) + 1))
    # nbd-trdump itself reads the same file the same way
    dump = subprocess.run(["nbd-trdump"], stdin=open(log, "rb"), capture_output=True,
                          text=True).stdout
    assert dump.count("\n> ") + dump.startswith("> ") == len(rec.requests)
    import_as_recording(log, "nbd-trdump", tmp_path)


def test_nbdkit_log_filter_imports_the_requests_sent(disk, tmp_path):
    log = tmp_path / "nbdkit.log"
    trigger = tmp_path / "fail-now"
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.set_export_name("my export")
    # The error filter fails writes while the trigger file exists: one
    # known request gets ENOSPC, and the log records it.
    h.connect_command(["nbdkit", "-s", "--exit-with-parent", "--filter=log", "--filter=error",
                       "file", str(disk), f"logfile={log}", "error=ENOSPC",
                       "error-pwrite-rate=100%", f"error-file={trigger}"])

    def fail(h):
        trigger.touch()
        try:
            with pytest.raises(nbd.Error):
                h.pwrite(b"d" * 1024, 8 * MiB, nbd.CMD_FLAG_FUA)
        finally:
            trigger.unlink()
        return (WRITE, 8 * MiB, 1024, FUA, errno.ENOSPC)

    sent = workload(h, fail)
    assert any(s[0] == BLOCK_STATUS for s in sent) and any(s[0] == CACHE for s in sent)
    h.shutdown()
    del h  # closing the handle waits for nbdkit, which closes the log
    assert sniff(str(log)) == "nbdkit-log"
    rec = open_input(str(log))
    assert rec.origin == "nbdkit-log" and rec.timed
    assert imported(rec) == sent
    assert rec.size == DISK and "my export" in rec.source
    assert {r.export for r in rec.requests} == {"my export"}
    starts = [r.start for r in rec.requests]
    assert starts[0] == 0.0 and starts == sorted(starts)
    assert all(r.duration >= 0 for r in rec.requests)
    import_as_recording(log, "nbdkit-log", tmp_path)


def test_imported_log_reports_through_the_command(disk, tmp_path):
    """nbdkit's log through `diskwatch report --from nbdkit-log`: counts and
    the failed request, as text and as JSON."""
    import json
    log = tmp_path / "nbdkit.log"
    h = nbd.NBD()
    h.connect_command(["nbdkit", "-s", "--exit-with-parent", "--filter=log", "file",
                       str(disk), f"logfile={log}"])
    for i in range(10):
        h.pread(4096, i * 65536)
    h.pwrite(b"x" * 8192, MiB)
    h.shutdown()
    del h
    from diskwatch.cli import main
    out = tmp_path / "report.json"
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["report", "--from", "nbdkit-log", str(log), "--json"]) == 0
    doc = json.loads(buf.getvalue())
    out.write_text(buf.getvalue())
    assert doc["schema"] == "diskwatch-report/1"
    assert doc["commands"]["read"] == {"requests": 10, "bytes": 40960}
    assert doc["commands"]["write"] == {"requests": 1, "bytes": 8192}
    assert doc["read_bytes"] == 40960 and doc["write_bytes"] == 8192


def _request(cmd, offset, length, cookie, flags=0):
    return struct.pack(">IIQQI", 0x25609513, flags << 16 | cmd, cookie, offset, length)


def _reply(cookie, error=0):
    return struct.pack(">IIQ", 0x67446698, error, cookie)


def test_transaction_log_with_data_and_a_torn_end(tmp_path):
    """datalog: write data follows its request; a file cut mid-record reads
    up to the cut and says so; replies may come out of order."""
    log = tmp_path / "t.log"
    datalog_on = struct.pack(">IIQQI", 0x25609514, 1, 0, 0x4A93BA39A54F31B6, 1)
    body = (datalog_on + _request(WRITE, 4096, 8, 1) + b"12345678" + _request(READ, 0, 512, 2)
            + _reply(2) + _reply(1, errno.EIO) + _request(READ, 512, 512, 3))
    log.write_bytes(body + _request(READ, 0, 512, 4)[:10])
    rec = open_input(str(log), "nbd-trdump")
    assert imported(rec) == [(WRITE, 4096, 8, 0, errno.EIO), (READ, 0, 512, 0, 0),
                             (READ, 512, 512, 0, 0)]
    assert rec.truncated


def test_bad_inputs_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.log"
    bad.write_bytes(_request(READ, 0, 512, 1) + b"\x00" * 16)
    with pytest.raises(ImportFormatError, match=r"byte 28: magic 0x00000000 .* not an "
                                                 r"nbd-server transaction log"):
        open_input(str(bad), "nbd-trdump")
    text = tmp_path / "k.log"
    text.write_text("2020-08-06 02:07:23.080907 connection=1 Read id=1 offset=0x0 count=0x200 ...\n"
                    "garbage\n")
    with pytest.raises(ImportFormatError, match=r"k.log:2: not a line of nbdkit's log filter"):
        open_input(str(text), "nbdkit-log")
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(DiskwatchError, match="empty file"):
        open_input(str(empty))


@pytest.mark.parametrize("line, needle", [
    ('{"t":0,"op":"read","offset":0,"length":1e400}', "not a diskwatch request record"),
    ('{"t":0,"op":"read","offset":-5,"length":512}', "offset -5 is out of range"),
    ('{"t":0,"op":"read","offset":99999999999999999999999,"length":1}', "offset .* out of range"),
    ('{"t":0,"op":"read","offset":0,"length":4294967296}', "length .* out of range"),
    ('{"t":1e999,"op":"read","offset":0,"length":1}', "not a number of seconds"),
    ('{"t":0,"op":"read","offset":0,"length":1,"duration":-1}', "not a number of seconds"),
    ('{"t":0,"op":"read","offset":0,"length":1,"conn":-1}', "connection -1 is out of range"),
])
def test_jsonl_numbers_out_of_range_are_one_line_errors(tmp_path, line, needle):
    """Numbers the recording's columns cannot hold (or that are no numbers)
    are the file's error, said with its line, not an OverflowError later."""
    path = tmp_path / "r.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ImportFormatError, match=rf"r.jsonl:1: .*{needle}"):
        open_input(str(path), "jsonl")


def test_nbdkit_log_numbers_out_of_range_are_one_line_errors(tmp_path):
    text = tmp_path / "k.log"
    text.write_text("2020-08-06 02:07:23.080907 connection=1 Read id=1 offset=0x10000000000000000 "
                    "count=0x200 ...\n")
    with pytest.raises(ImportFormatError, match=r"k.log:1: offset .* out of range"):
        open_input(str(text), "nbdkit-log")
    text.write_text("2020-13-06 02:07:23.080907 connection=1 Read id=1 offset=0x0 count=0x200\n")
    with pytest.raises(ImportFormatError, match=r"k.log:1: not a time"):
        open_input(str(text), "nbdkit-log")


def test_a_negative_command_number_is_unknown():
    from diskwatch.report.importers import _command
    assert _command(-1) == _command(1000) == Command.UNKNOWN


def test_jsonl_bytes_that_are_not_utf8(tmp_path):
    """A stray byte is the line's error (with its number); in a name it is kept."""
    path = tmp_path / "b.jsonl"
    path.write_bytes(b'{"t":0}\xff\n')
    with pytest.raises(ImportFormatError, match=r"b.jsonl:1: not a diskwatch request record"):
        open_input(str(path), "jsonl")
    path.write_bytes(b'{"t":0,"op":"read","offset":0,"length":512,"export":"a\xffb"}\n')
    assert [q.export for q in open_input(str(path), "jsonl").requests] == ["a\udcffb"]
