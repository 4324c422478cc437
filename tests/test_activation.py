"""Socket activation (LISTEN_PID/LISTEN_FDS) as libnbd's tools and systemd
start a server, and headless without a terminal.

``nbdinfo -- [ diskwatch IMAGE ]``: libnbd makes a unix socket, starts
diskwatch with it as fd 3 and connects; diskwatch must serve that fd (it used
to listen on TCP 10809 and hang the client), keep the starter's stdout clean
(nbdcopy writes the image there) and run headless."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess

import pytest
from fixtures_server import DISKWATCH, SUBPROCESS_ENV, md5

from diskwatch.server.activation import ActivationError, activated_sockets


def run(args: list, timeout: float = 60.0, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, timeout=timeout,
                          env=SUBPROCESS_ENV, **kw)


def test_nbdinfo_starts_diskwatch_by_socket_activation(server_image):
    r = run(["nbdinfo", "--json", "--", "[", DISKWATCH, server_image.path, "-r", "]"])
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    # stdout is nbdinfo's alone: it parses as JSON (no trace line in it)
    info = json.loads(r.stdout)
    export = info["exports"][0]
    assert export["export-size"] == server_image.size
    assert export["is_read_only"] is True
    err = r.stderr.decode()
    assert "started by socket activation: running headless" in err
    # diskwatch saw nbdinfo's requests: its trace and summary are on stderr
    assert "] read 0x" in err and "requests on 1 connection" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("target", ["file", "stdout"])
def test_nbdcopy_through_socket_activation_copies_every_byte(server_image, tmp_path, target):
    out = tmp_path / "out.img"
    dest = str(out) if target == "file" else "-"
    with open(out, "wb") if target == "stdout" else open(os.devnull, "wb") as sink:
        r = subprocess.run(["nbdcopy", "--", "[", DISKWATCH, server_image.path, "-r", "]", dest],
                           stdout=sink, stderr=subprocess.PIPE, timeout=60, env=SUBPROCESS_ENV)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    # to stdout too: nothing of diskwatch's is mixed into the copy
    assert md5(out) == server_image.md5
    err = r.stderr.decode()
    assert "requests on 1 connection" in err and "read (" in err


def test_systemd_socket_activation_serves_every_connection(server_image, tmp_path):
    """systemd's own activator (as a .socket unit with Accept=no does it):
    one diskwatch serves the passed socket for connection after connection."""
    sock = tmp_path / "activated.sock"
    # It passes on only the variables named with -E (the tests' PYTHONPATH)
    keep = [f"-E{name}" for name in ("PATH", "PYTHONPATH") if name in SUBPROCESS_ENV]
    proc = subprocess.Popen(["systemd-socket-activate", "-l", str(sock), *keep, DISKWATCH,
                             str(server_image.path), "-r", "--no-trace"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=SUBPROCESS_ENV,
                            start_new_session=True)
    try:
        # systemd-socket-activate says "Listening on PATH as 3." once bound
        line = proc.stderr.readline().decode()
        assert "Listening on" in line, line
        uri = f"nbd+unix:///?socket={sock}"
        for _ in range(2):
            r = run(["nbdinfo", "--json", uri], timeout=30)
            assert r.returncode == 0, r.stderr
            assert json.loads(r.stdout)["exports"][0]["export-size"] == server_image.size
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = err.decode()
    assert proc.returncode == 0, text
    assert f"at nbd+unix:///?socket={sock}" in text
    assert "requests on 2 connections" in text
    assert out == b""


def test_without_a_terminal_diskwatch_runs_headless_and_says_so(server_image):
    # stdout is a pipe, no --headless: the trace goes there instead of a UI
    r = run([DISKWATCH, server_image.path, "-r", "--run", "nbdinfo $uri"])
    assert r.returncode == 0, r.stderr.decode()
    err = r.stderr.decode().splitlines()
    said = [ln for ln in err if "running headless" in ln]
    assert said == ["diskwatch: stdout is not a terminal: running headless "
                    "(trace on stdout; --no-trace for the summary only)"]
    out = r.stdout.decode()
    assert f"export-size: {server_image.size}" in out  # the command's output
    assert "] read 0x" in out  # the text trace, not escape sequences of a UI
    assert "\x1b[" not in out


def test_variables_for_another_process_are_ignored_and_removed():
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x",
           "OTHER": "kept"}
    assert activated_sockets(env) == []
    assert env == {"OTHER": "kept"}


def test_an_fd_that_is_not_a_listening_socket_is_refused():
    a, b = socket.socketpair()
    saved = os.dup(3) if _fd_open(3) else None
    try:
        os.dup2(a.fileno(), 3)
        env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1"}
        with pytest.raises(ActivationError, match="fd 3 is not a listening stream socket"):
            activated_sockets(env)
    finally:
        if saved is not None:
            os.dup2(saved, 3)
            os.close(saved)
        else:
            os.close(3)
        a.close()
        b.close()


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
