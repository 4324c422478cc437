"""The command line through the installed console script: signals stop the
captive command and the server and clean up, the headless trace, and bad
input gives one clear line and no traceback."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys

import pytest
from fixtures_server import SUBPROCESS_ENV, MiB, run_diskwatch, wait_until

# A captive command that says where the socket is and its pid, then waits.
WAITER = 'echo "$unixsocket $$"; exec sleep 1000'


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes (its parent reaps it)
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("socket_opt", ["-", "path"])
def test_signal_stops_command_and_server_and_cleans_up(server_image, diskwatch_proc, tmp_path,
                                                       sig, socket_opt):
    unix = "-" if socket_opt == "-" else str(tmp_path / "dw.sock")
    dw = diskwatch_proc([server_image.path, "-r", "-U", unix, "--headless", "--run", WAITER])
    sock, pid = dw.read_line().split()
    pid = int(pid)
    assert os.path.exists(sock) and pid_alive(pid)
    # the server answers while the command runs
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(sock)
        assert s.recv(8) == b"NBDMAGIC"
    os.kill(dw.proc.pid, sig)
    status, out, err = dw.wait(timeout=20)
    assert status != 0
    assert "Traceback" not in err
    assert not pid_alive(pid), "the captive command was left running"
    assert not os.path.exists(sock)
    if unix == "-":
        assert not os.path.exists(os.path.dirname(sock))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_what_the_command_started(server_image, diskwatch_proc, sig):
    """Not only the shell: a child it is waiting for goes too."""
    dw = diskwatch_proc([server_image.path, "-r", "--headless", "--run",
                         'sleep 1000 & echo "$unixsocket $!"; wait'])
    sock, pid = dw.read_line().split()
    pid = int(pid)
    assert pid_alive(pid)
    os.kill(dw.proc.pid, sig)
    status, _, err = dw.wait(timeout=20)
    assert status != 0 and "Traceback" not in err
    assert not pid_alive(pid), "the command's child was left running"
    assert not os.path.exists(sock)


def test_sigterm_without_run(server_image, diskwatch_proc, tmp_path):
    sock = tmp_path / "plain.sock"
    dw = diskwatch_proc([server_image.path, "-r", "-U", sock, "--headless"])
    # the "serving ... at URI" line on stderr tells us it listens
    line = dw.proc.stderr.readline().decode()
    assert "serving" in line and str(sock) in line
    assert sock.exists()
    os.kill(dw.proc.pid, signal.SIGTERM)
    status, _, err = dw.wait(timeout=20)
    assert status == 0
    assert "Traceback" not in err
    assert not sock.exists()


READER = ("import nbd, sys\n"
          "h = nbd.NBD(); h.connect_uri(sys.argv[1])\n"
          "h.pread(4096, 1048576)\n"
          "h.pwrite(bytes(512), 2 * 1048576)\n"
          "h.shutdown()\n")


def test_headless_log_file(rw_image, tmp_path):
    log = tmp_path / "trace.log"
    script = tmp_path / "reader.py"
    script.write_text(READER)
    p = run_diskwatch([rw_image, "--headless", "--log", log, "--run",
                       f'/usr/bin/python3 {script} "$uri"'])
    assert p.returncode == 0, p.stderr
    text = log.read_text()
    assert "read 0x100000-0x101000" in text
    assert "write 0x200000-0x200200" in text
    assert "read 0x100000" not in p.stdout  # the trace went to the file


def test_log_file_is_written_as_the_client_goes(rw_image, diskwatch_proc, tmp_path):
    """`tail -f trace.log` follows a session: lines are in the file while the
    server still runs, not at exit."""
    import time

    nbd = pytest.importorskip("nbd")
    log = tmp_path / "trace.log"
    sock = tmp_path / "dw.sock"
    dw = diskwatch_proc([rw_image, "-U", sock, "--headless", "--no-trace", "--log", log])
    assert "serving" in dw.proc.stderr.readline().decode()
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///?socket={sock}")
    h.pread(4096, MiB)
    h.pwrite(bytes(512), 2 * MiB)
    deadline = time.monotonic() + 20
    want = ("read 0x100000-0x101000", "write 0x200000-0x200200")
    # The write ends the read's line at once; the write's own line comes once
    # the client has been quiet for a moment.
    while not all(w in log.read_text() for w in want):
        assert time.monotonic() < deadline, f"not in the log yet: {log.read_text()!r}"
        assert dw.proc.poll() is None
        time.sleep(0.05)
    assert dw.proc.poll() is None  # still serving: the lines came as it went
    h.shutdown()


def test_headless_trace_on_stdout(server_image, tmp_path):
    p = run_diskwatch([server_image.path, "-r", "--headless", "--run",
                       f'/usr/bin/python3 -c "import nbd,sys; h=nbd.NBD(); h.connect_uri(sys.argv[1]);'
                       f' h.pread({MiB}, {3 * MiB})" "$uri"'])
    assert p.returncode == 0, p.stderr
    assert "read 0x300000-0x400000" in p.stdout


@pytest.mark.parametrize("args,needle,codes", [
    (["/nonexistent/disk.img"], "no such file", (1,)),
    (["{tmp}"], ("directory", "not a regular file"), (1,)),
    (["{img}", "-p", "abc"], "not a TCP port", (2,)),
    (["{img}", "-p", "70000"], "not a TCP port", (2,)),
    (["{img}", "-p=-1"], "not a TCP port", (2,)),
    (["{img}", "--xz-max-block", "12Q"], "not a size", (2,)),
    (["{img}", "--window", "1.5X"], "not a size", (2,)),
    (["{img}", "-U", "/nonexistent/dir/s.sock"], "cannot listen", (1,)),
    (["{img}", "--stream-to", "{tmp}/s.fifo"], "a disk image or --stream-to, not both", (1,)),
    (["{img}", "-U", "{img}"], "something that is not a socket is there", (1,)),
    (["{img}", "-U", "{tmp}"], "something that is not a socket is there", (1,)),
    (["{img}", "-i", "no-such-host.invalid", "-p", "0"],
     "cannot listen on no-such-host.invalid:0: ", (1,)),
    (["{img}", "--max-connections", "0"], "number of connections", (2,)),
    (["{img}", "--idle-timeout=-5"], "expected seconds", (2,)),
    (["{img}", "--handshake-timeout", "nan"], "expected seconds", (2,)),
    (["{img}", "-U", "-", "-p", "0"], "not both", (1, 2)),
    ([], "no disk image", (1, 2)),
    (["{img}", "--bmap", "/nonexistent/dir/x.bmap"], "no directory /nonexistent/dir", (1,)),
    (["{img}", "--bmap", "{tmp}"], "is a directory, not a block map", (1,)),
    (["http://127.0.0.1:9/x.img", "--timeout", "-5"], "--timeout is seconds, more than 0", (1,)),
    (["{img}", "--log", "/nonexistent/x.log"], "no directory /nonexistent", (1,)),
    (["{img}", "--record", "{tmp}"], "it is a directory", (1,)),
])
def test_bad_input_is_one_clear_line(server_image, tmp_path, args, needle, codes):
    args = [a.format(tmp=tmp_path, img=server_image.path) for a in args]
    p = run_diskwatch([*args, "-r", "--headless", "--run", "true"], timeout=20)
    assert p.returncode in codes, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("diskwatch: ")
    needles = needle if isinstance(needle, tuple) else (needle,)
    assert any(n in last for n in needles), last
    # argparse adds its usage above the message; our own errors are one line
    if p.returncode == 1:
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr


@pytest.mark.parametrize("headless", [["--headless"], []])
def test_port_in_use(server_image, headless):
    """One line, also when stdout is not a terminal and diskwatch would have
    said it runs headless (that note comes once it serves)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = run_diskwatch([server_image.path, "-r", "-p", port, *headless, "--run", "true"])
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [
        f"diskwatch: cannot listen on 127.0.0.1:{port}: Address already in use"]


def test_an_early_failure_leaves_nothing_behind(tmp_path):
    """The port is taken: the FIFO --stream-to made, the log file handle and
    everything else are undone, with one clear line."""
    import socket as _socket
    taken = _socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    fifo = tmp_path / "out.fifo"
    try:
        p = run_diskwatch(["--stream-to", fifo, "--size", "1M", "-p", str(port), "--headless",
                           "--log", tmp_path / "trace.log"], timeout=20)
    finally:
        taken.close()
    assert p.returncode == 1 and "cannot listen" in p.stderr and "Traceback" not in p.stderr
    assert not fifo.exists()


def test_snapshot_and_stream_to_are_refused(tmp_path):
    p = run_diskwatch(["--stream-to", tmp_path / "s", "--snapshot", "--headless", "--run", "true"],
                      timeout=20)
    assert p.returncode == 1 and "do not go together" in p.stderr
    assert not (tmp_path / "s").exists()


def test_an_early_failure_closes_the_listening_socket(tmp_path):
    """Failing after the bind (here: --record names a symbolic link), the
    listening socket is closed by the undo, not left to the garbage collector."""
    import gc
    import warnings

    from diskwatch.files import OutputFileError
    from diskwatch.runner import RunConfig, Runner
    from diskwatch.sources import SourceOptions, open_source
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(MiB))
    (tmp_path / "rec").symlink_to(tmp_path / "victim")
    cfg = RunConfig(source=str(image), unix=str(tmp_path / "sock"), headless=True,
                    record=str(tmp_path / "rec"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        with pytest.raises(OutputFileError):
            Runner(cfg, lambda: open_source(str(image), SourceOptions())).run()
        gc.collect()
    unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not unclosed
    assert not (tmp_path / "sock").exists() and not (tmp_path / "victim").exists()


def test_summary_without_clients_or_requests(server_image):
    p = run_diskwatch([server_image.path, "-r", "--headless", "--run", "true"], timeout=30)
    assert p.returncode == 0, p.stderr
    assert p.stderr.strip().splitlines() == ["diskwatch: no client connected"]
    p = run_diskwatch([server_image.path, "-r", "--headless", "--run", 'nbdinfo --size "$uri"'],
                      timeout=30)
    assert p.returncode == 0, p.stderr
    assert "diskwatch: 1 request on 1 connection: 1 disc" in p.stderr.splitlines()


def test_trace_into_a_pipe_nobody_reads(server_image):
    """`diskwatch ... | head`: once the reader is gone, diskwatch stops its
    command and ends quietly with SIGPIPE's status, as coreutils do."""
    import subprocess

    from fixtures_server import DISKWATCH, SUBPROCESS_ENV
    proc = subprocess.Popen(
        [DISKWATCH, server_image.path, "-r", "--headless", "--run",
         'while :; do nbdcopy "$uri" /dev/null 2>/dev/null || exit; done'],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=SUBPROCESS_ENV)
    try:
        assert proc.stdout.readline().startswith("[")
        proc.stdout.close()  # as head does after its lines
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGPIPE, err
    assert "Broken pipe" not in err and "Traceback" not in err and "Exception" not in err


def test_map_progress_off_a_terminal_says_nothing_before_there_is_something():
    """Not a terminal: no "devices 0 (0/s)" line at the start, only the
    summary when the map is done quickly."""
    import io

    from diskwatch.events import Progress
    from diskwatch.runner import ProgressPrinter
    out = io.StringIO()
    printer = ProgressPrinter(out)
    printer(Progress("devices", "/dev/sda", 0, 0, 0.0, 0.0))
    printer(Progress("files", "/etc", 3, 10, 100.0, 0.03))
    printer(Progress("done", "", 10, 10, 300.0, 0.05, summary="10 objects"))
    assert out.getvalue() == "diskwatch: block map: 10 objects\n"


@pytest.mark.parametrize("output,needle", [
    ("/nonexistent/dir/x.bmap", "cannot write /nonexistent/dir/x.bmap: there is no directory"),
    ("{tmp}", "it is a directory"),
])
def test_bmap_to_where_it_cannot_be_written(server_image, tmp_path, output, needle):
    """The path given, not the temporary file's name; before any mapping."""
    p = run_diskwatch(["bmap", server_image.path, "-o", output.format(tmp=tmp_path)], timeout=30)
    assert p.returncode == 1, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and ".tmp" not in lines[0], lines


@pytest.mark.parametrize("args", [
    ["replay", "{missing}", "--headless"],
    ["report", "{missing}"],
    ["import", "nbdkit-log", "{missing}", "-o", "{tmp}/x.rec"],
])
def test_a_missing_input_names_the_file_first(tmp_path, args):
    missing = tmp_path / "nope.rec"
    p = run_diskwatch([a.format(missing=missing, tmp=tmp_path) for a in args], timeout=30)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [f"diskwatch: {missing}: No such file or directory"]


def test_help_gives_the_defaults():
    out = run_diskwatch(["--help"], timeout=30, env={**SUBPROCESS_ENV, "COLUMNS": "300"}).stdout
    for flag, default in [("--timeout SECONDS", "(default 30)"), ("--retries N", "(default 3)"),
                          ("--connections N", "(default 4)"), ("-p PORT, --port PORT",
                                                               "default 10809")]:
        line = next(line for line in out.splitlines() if line.lstrip().startswith(flag))
        assert default in line, line


def test_every_option_of_every_command_has_help():
    """`diskwatch CMD --help` explains each option (it used to list bare
    '-v, --verbose', '--accel', '--cache-dir CACHE_DIR')."""
    import argparse

    from diskwatch import cli
    from diskwatch.report.command import build_import_parser, build_report_parser
    parsers = [cli.build_parser(), cli.build_bmap_parser(), cli.build_demo_parser(),
               cli.build_attach_parser(), build_report_parser(), build_import_parser()]
    for parser in parsers:
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, (parser.prog, action.option_strings or action.dest)
    replay_help = run_diskwatch(["replay", "--help"], timeout=30).stdout
    assert "--verbose" in replay_help and "debug messages and tracebacks" in replay_help


def test_counts_say_one_thing_in_the_singular():
    from diskwatch.units import count
    assert count(1, "file") == "1 file" and count(0, "file") == "0 files"
    assert count(1, "directory", "directories") == "1 directory"
    assert count(2, "directory", "directories") == "2 directories"


@pytest.mark.parametrize("args,needle", [
    (["report", "{rec}", "--top", "0"], "argument --top: expected a number of rows (1 or more)"),
    (["report", "{rec}", "--top", "-1"], "argument --top: expected a number of rows"),
    (["import", "nbdkit-log", "/dev/null", "-o", "{tmp}/x.rec", "--size", "-5"],
     "argument --size: expected a size in bytes (1 or more), not '-5'"),
])
def test_report_and_import_refuse_counts_below_one(tmp_path, args, needle):
    p = run_diskwatch([a.format(rec=tmp_path / "none.rec", tmp=tmp_path) for a in args],
                      timeout=30)
    assert p.returncode == 2 and needle in p.stderr.strip().splitlines()[-1], p.stderr
    assert not (tmp_path / "x.rec").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_under_the_ui_leaves_as_quitting_does(server_image, tmp_path, sig):
    """The Textual UI in a real terminal (a pty): SIGTERM or SIGHUP (the
    terminal went away) stops the command and the server and removes the
    socket, as the q key does. The handler only queues the signal: it runs
    in the app's own thread, between two bytecodes, and takes no lock."""
    import fcntl
    import pty
    import struct
    import termios
    import threading

    ready = tmp_path / "ready"
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    exe = os.path.join(os.path.dirname(sys.executable), "diskwatch")
    proc = subprocess.Popen(
        [exe, server_image.path, "-r", "--run",
         f'echo "$unixsocket $$" > {ready}.tmp && mv {ready}.tmp {ready} && exec sleep 1000'],
        stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
        env=dict(os.environ, TERM="xterm-256color"))
    os.close(slave)
    screen = bytearray()

    def drain() -> None:  # a terminal that is never read would block the app
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                return
            if not chunk:
                return
            screen.extend(chunk)
    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        wait_until(ready.exists, timeout=60, what="the command under the UI")
        sock, pid = ready.read_text().split()
        pid = int(pid)
        assert pid_alive(pid) and os.path.exists(sock)
        os.kill(proc.pid, sig)
        proc.wait(timeout=30)
        assert not pid_alive(pid), "the captive command was left running"
        assert not os.path.exists(sock)
        assert b"Traceback" not in screen, re.sub(rb"\x1b\[[0-9;?>$]*[a-zA-Z]", b"", bytes(screen))[-3000:].decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
