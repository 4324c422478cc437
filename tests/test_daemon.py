"""Daemon mode: diskwatch run the way contrib/systemd runs it (socket
activation, no terminal, stderr into the journal), structured journal
entries, and SIGHUP reopening log files and reloading the block map."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from fixtures_server import DISKWATCH, SUBPROCESS_ENV, MiB, nbd_handle, wait_until

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"
KiB = 1024
FILE_AT = (4 * MiB, 256 * KiB)  # the one file of the test maps


def write_map(path: Path, name: str) -> None:
    tmp = path.with_suffix(".new")
    tmp.write_text(f"1 {MiB:x} {30 * MiB:x} p /dev/sda1\n"
                   f"1 {FILE_AT[0]:x} {sum(FILE_AT):x} f /dev/sda1 {name}\n")
    os.replace(tmp, path)  # as a map generator would: the old map or the new, never half


def parse_entries(data: bytes) -> dict[str, str]:
    """One datagram of the journal's native protocol -> fields."""
    fields = {}
    pos = 0
    while pos < len(data):
        nl = data.index(b"\n", pos)
        line = data[pos:nl]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            pos = nl + 1
        else:  # NAME\n, 64-bit length, value, \n
            name = line
            (n,) = struct.unpack("<Q", data[nl + 1:nl + 9])
            value = data[nl + 9:nl + 9 + n]
            assert data[nl + 9 + n:nl + 10 + n] == b"\n"
            pos = nl + 10 + n
        fields[name.decode()] = value.decode()
    return fields


class Journal:
    """A datagram socket standing in for /run/systemd/journal/socket."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.entries: list[dict[str, str]] = []

    def wait_for(self, **want) -> dict[str, str]:
        deadline = time.monotonic() + 30
        while True:
            for e in self.entries:
                if all(e.get(k) == v for k, v in want.items()):
                    return e
            left = deadline - time.monotonic()
            assert left > 0, f"no journal entry with {want}: {self.entries}"
            self.sock.settimeout(left)
            self.entries.append(parse_entries(self.sock.recv(1 << 20)))


def unit_command(image: Path, extra: str) -> list[str]:
    """ExecStart of contrib/systemd/diskwatch@.service with DISKWATCH_ARGS
    expanded as systemd expands an unbraced $VAR (split on whitespace)."""
    unit = (CONTRIB / "systemd" / "diskwatch@.service").read_text()
    exec_start = re.search(r"^ExecStart=(.*)$", unit, re.M).group(1)
    words = shlex.split(exec_start.replace("/usr/local/bin/diskwatch", DISKWATCH))
    i = words.index("$DISKWATCH_ARGS")
    return words[:i] + [str(image), *extra.split()] + words[i + 1:]


def test_the_unit_under_socket_activation_logs_structured_entries(rw_image, tmp_path):
    """As systemd runs diskwatch@guest.service: started at the first connection
    with the socket, no terminal, stderr into the journal (JOURNAL_STREAM):
    notices arrive as structured entries; SIGHUP reloads, SIGTERM stops."""
    journal = Journal(tmp_path / "journal.sock")
    sock = tmp_path / "guest1.sock"
    stderr_file = tmp_path / "stderr"
    with open(stderr_file, "wb") as err:
        st = os.fstat(err.fileno())
        cmd = ["systemd-socket-activate", "-l", str(sock),
               "-E", f"JOURNAL_STREAM={st.st_dev}:{st.st_ino}",
               "-E", f"DISKWATCH_JOURNAL_SOCKET={journal.path}",
               *[f"-E{n}" for n in ("PATH", "PYTHONPATH") if n in SUBPROCESS_ENV],
               *unit_command(rw_image, "--metrics 0")]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                env=SUBPROCESS_ENV, start_new_session=True)
    try:
        # said once it listens (the file exists from bind(), before listen():
        # a connection then is refused)
        wait_until(lambda: b"Listening on" in stderr_file.read_bytes(), 20,
                   "the activation socket")
        # the first connection starts diskwatch
        r = subprocess.run(["nbdinfo", "--size", f"nbd+unix:///?socket={sock}"],
                           capture_output=True, text=True, timeout=30, env=SUBPROCESS_ENV)
        assert r.returncode == 0 and int(r.stdout) == 32 * MiB, r.stderr
        entry = journal.wait_for(DISKWATCH_EVENT="metrics")
        assert entry["SYSLOG_IDENTIFIER"] == "diskwatch" and entry["PRIORITY"] == "6"
        assert entry["MESSAGE"] == f"metrics at {entry['DISKWATCH_METRICS_URL']}"
        assert entry["CODE_FUNC"] and entry["CODE_LINE"].isdigit()
        text = urllib.request.urlopen(entry["DISKWATCH_METRICS_URL"], timeout=10).read()
        assert b'diskwatch_export_size_bytes{export=""} 3.3554432e+07' in text
        wait_until(lambda: b"serving" in stderr_file.read_bytes(), 20, "the serving line")
        proc.send_signal(signal.SIGHUP)  # systemctl reload
        entry = journal.wait_for(DISKWATCH_EVENT="reload")
        assert entry["MESSAGE"] == "SIGHUP: nothing to reload"
        assert proc.poll() is None, "SIGHUP must not stop a service"
        proc.send_signal(signal.SIGTERM)  # systemctl stop
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        journal.sock.close()
    err_text = stderr_file.read_text()
    assert " on 1 connection: " in err_text  # the summary, on the journal stream
    assert "Traceback" not in err_text


def test_sighup_reopens_the_log_and_reloads_the_map(rw_image, tmp_path):
    bmap = tmp_path / "disk.bmap"
    write_map(bmap, "/old/name")
    log = tmp_path / "trace.log"
    record = tmp_path / "session.dwrec"
    sock = tmp_path / "dw.sock"
    proc = subprocess.Popen(
        [DISKWATCH, str(rw_image), "-U", str(sock), "--headless", "--no-trace", "--bmap",
         str(bmap), "--log", str(log), "--metrics", "0", "--metrics-refresh", "0.2",
         "--record", str(record)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env=SUBPROCESS_ENV, start_new_session=True)  # no controlling terminal: a service
    err = b""

    def wait_stderr(pattern: bytes) -> re.Match:
        nonlocal err
        deadline = time.monotonic() + 30
        while (m := re.search(pattern, err)) is None:
            assert time.monotonic() < deadline, err
            chunk = os.read(proc.stderr.fileno(), 65536)
            assert chunk, err
            err += chunk
        return m
    try:
        url = wait_stderr(rb"metrics at (\S+)").group(1).decode()
        wait_stderr(rb"serving ")
        h = nbd_handle(f"nbd+unix:///?socket={sock}")
        h.pread(64 * KiB, FILE_AT[0])
        wait_until(lambda: "read f /dev/sda1 /old/name" in log.read_text(), 20,
                   "the read in the trace")
        wait_until(lambda: b'path="/old/name"' in urllib.request.urlopen(url).read(), 20,
                   "the file in the metrics")
        # logrotate: the log is renamed, then SIGHUP; the map was remade meanwhile
        rotated = tmp_path / "trace.log.1"
        os.rename(log, rotated)
        write_map(bmap, "/new/name")
        proc.send_signal(signal.SIGHUP)
        wait_stderr(rb"SIGHUP: reopened 2 log file\(s\), reloaded the block map")  # and --record
        assert log.exists()
        h.pwrite(b"n" * 4096, FILE_AT[0])
        wait_until(lambda: "write f /dev/sda1 /new/name" in log.read_text(), 20,
                   "the write in the new log, with the new name")
        old = rotated.read_text()
        assert "/old/name" in old and "/new/name" not in old and "write" not in old
        wait_until(lambda: b'path="/new/name"' in urllib.request.urlopen(url).read(), 20,
                   "the new name in the metrics")
        # a map that no longer parses: told, and the old one stays
        bmap.write_text("this is not a block map\n")
        proc.send_signal(signal.SIGHUP)
        wait_stderr(rb"not reloaded: .*the old one stays")
        h.pread(4096, FILE_AT[0] + 8192)
        wait_until(lambda: "read f /dev/sda1 /new/name" in log.read_text(), 20,
                   "names from the kept map")
        h.shutdown()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stderr.close()
    # The recording kept the reloaded map (the file changed since): its
    # replay names the requests as the live trace did, before and after.
    from diskwatch.recording.format import map_identity
    from diskwatch.recording.reader import open_recording
    rec = open_recording(str(record))
    (reloaded,) = rec.maps
    assert reloaded.why == "reload" and reloaded.path == str(bmap) and reloaded.at == 1
    write_map(bmap, "/old/name")  # the first map is kept by reference: put it back
    assert rec.header.bmap == map_identity(str(bmap))
    r = subprocess.run([DISKWATCH, "replay", str(record), "--headless"], capture_output=True,
                       text=True, timeout=60, env=SUBPROCESS_ENV)
    assert r.returncode == 0, r.stderr
    named = re.findall(r"\] (\w+) f /dev/sda1 (\S+)", r.stdout)
    assert named == [("read", "/old/name"), ("write", "/new/name"), ("read", "/new/name")]
    assert r.stdout == old + log.read_text()


def test_a_signal_anywhere_in_the_headless_loop_is_obeyed(tmp_path):
    """SIGTERM at each line the headless loop runs (its wait between rounds,
    a pump round, a SIGHUP's reload), alone and after a SIGHUP: it stops every
    time, after the reload. A handler taking a lock that the line it
    interrupts holds (Event.set() inside Event.wait()) hangs here at once; a
    real service hung so about once in 40 stops."""
    script = Path(__file__).with_name("signals_everywhere.py")
    try:  # a new session: no controlling terminal, so SIGHUP means reload
        r = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                           text=True, timeout=60, env=SUBPROCESS_ENV, start_new_session=True)
    except subprocess.TimeoutExpired as e:  # run() killed it (SIGKILL: it handles SIGTERM)
        out = e.stdout or b""  # bytes, even with text=True
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
        raise AssertionError(f"the loop hung: {out.splitlines()[-2:]}") from None
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    m = re.search(r"^ok (\d+) cases: (\d+) lines of 3 rounds", r.stdout, re.M)
    assert m and int(m.group(2)) >= 20, r.stdout[-2000:]  # the scan covered real rounds
    # it landed in the loop, in a pump round and in the reload
    assert all(f"SIGTERM at {f}" in r.stdout for f in ("runner.py", "session.py", "logfile.py"))


def big_map(path: Path, files: int) -> None:
    """A map that takes a while to read (``files`` lines): a reload is seen
    in progress by its open fd."""
    with open(path, "w") as f:
        f.write(f"1 {MiB:x} {30 * MiB:x} p /dev/sda1\n")
        for i in range(files):
            start = MiB + 256 * i
            f.write(f"1 {start:x} {start + 256:x} f /dev/sda1 /dir/file{i}\n")


def reading(pid: int, path: Path) -> bool:
    """Whether process ``pid`` has ``path`` open."""
    fds = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fds):
        try:
            if os.readlink(fds / fd) == str(path):
                return True
        except FileNotFoundError:  # closed meanwhile
            pass
    return False


@pytest.mark.parametrize("started", ["socket-activated", "-U"])
@pytest.mark.parametrize("sigterm", ["during the reload", "right after SIGHUP"])
def test_sigterm_during_a_reload_stops_once_it_is_done(rw_image, tmp_path, started, sigterm):
    """systemctl reload then stop, as a service, started both ways: the stop
    comes while the map is being read again (its fd is open), or back to back
    with the SIGHUP. The reload ends, is told, then diskwatch stops, status 0."""
    bmap = tmp_path / "disk.bmap"
    big_map(bmap, 50_000)
    sock = tmp_path / "dw.sock"
    args = f"--bmap {bmap}"
    if started == "socket-activated":
        cmd = ["systemd-socket-activate", "-l", str(sock),
               *[f"-E{n}" for n in ("PATH", "PYTHONPATH") if n in SUBPROCESS_ENV],
               *unit_command(rw_image, args)]
    else:
        cmd = [DISKWATCH, str(rw_image), "-U", str(sock), "--headless", "--no-trace",
               *args.split()]
    stderr_file = tmp_path / "stderr"
    with open(stderr_file, "wb") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                env=SUBPROCESS_ENV, start_new_session=True)
    try:
        if started == "socket-activated":  # the first connection starts diskwatch
            wait_until(lambda: b"Listening on" in stderr_file.read_bytes(), 20,
                       "the activation socket")
            r = subprocess.run(["nbdinfo", "--size", f"nbd+unix:///?socket={sock}"],
                               capture_output=True, text=True, timeout=60, env=SUBPROCESS_ENV)
            assert r.returncode == 0, r.stderr
        wait_until(lambda: b"serving" in stderr_file.read_bytes(), 60, "the serving line")
        assert not reading(proc.pid, bmap)
        proc.send_signal(signal.SIGHUP)
        if sigterm == "during the reload":
            wait_until(lambda: reading(proc.pid, bmap), 20, "the map read again")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    err_text = stderr_file.read_text()
    assert f"SIGHUP: reloaded the block map {bmap}" in err_text, err_text
    assert "Traceback" not in err_text
