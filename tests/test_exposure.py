"""Issue 9, item 8: exposure. TCP on loopback unless an address is given,
unix sockets only for our user, no secrets for the --run command, and no
output file written through a symbolic link someone planted."""

from __future__ import annotations

import base64
import hashlib
import http.server
import os
import stat
import subprocess
import threading

import pytest
from fixtures_server import DISKWATCH, SUBPROCESS_ENV, run_diskwatch

from diskwatch.files import OutputFileError, open_output, replace_atomically


def listening(port: int, tables) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp* spell them) listening on ``port``."""
    found = set()
    for name in tables:
        with open(name) as f:
            next(f)
            for line in f:
                fields = line.split()
                addr, hexport = fields[1].rsplit(":", 1)
                if fields[3] == "0A" and int(hexport, 16) == port:  # 0A: LISTEN
                    found.add(addr)
    return found


# --- TCP --------------------------------------------------------------------------

SHOW_PORT = 'echo "port=$port"; nbdinfo --size "$uri"'


def port_of(stdout: str) -> int:
    return int(next(ln for ln in stdout.splitlines() if ln.startswith("port="))[5:])


def test_tcp_listens_on_loopback_unless_an_address_is_given(server_image, tmp_path):
    script = tmp_path / "show.sh"
    # the command looks at the listening socket while diskwatch serves it
    script.write_text(SHOW_PORT + '\ncp /proc/net/tcp /proc/net/tcp6 "$0.d/"\n')
    (tmp_path / "show.sh.d").mkdir()
    p = run_diskwatch([server_image.path, "-r", "-p", "0", "--headless", "--run",
                       f"sh {script}"])
    assert p.returncode == 0, p.stderr
    port = port_of(p.stdout)
    tables = [tmp_path / "show.sh.d" / name for name in ("tcp", "tcp6")]
    assert listening(port, tables) == {"0100007F"}  # 127.0.0.1, nothing else
    # An address given is used as given.
    p = run_diskwatch([server_image.path, "-r", "-p", "0", "-i", "0.0.0.0", "--headless",
                       "--run", f"sh {script}"])
    assert p.returncode == 0, p.stderr
    assert listening(port_of(p.stdout), tables) == {"00000000"}


# --- unix sockets ---------------------------------------------------------------------

SHOW_MODES = 'stat -c "%a %F" "$unixsocket" "$(dirname "$unixsocket")"'


def test_private_unix_socket_is_0600_in_a_0700_directory(server_image):
    p = run_diskwatch([server_image.path, "-r", "--headless", "--run", SHOW_MODES])
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["600 socket", "700 directory"]


def test_given_unix_socket_is_0600_and_its_directory_is_left_alone(server_image, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # a /tmp-like directory the person chose
    p = run_diskwatch([server_image.path, "-r", "-U", shared / "nbd.sock", "--headless",
                       "--run", SHOW_MODES])
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["600 socket", "1777 directory"]


# --- secrets and the captive command -----------------------------------------------

SECRET = "s3cret-Pa55word"
DISK = bytes(range(256)) * 4096  # 1 MiB


class AuthRangeHandler(http.server.BaseHTTPRequestHandler):
    """Ranged reads of DISK for user bob with SECRET; 401 for anyone else."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _authorized(self) -> bool:
        expected = "Basic " + base64.b64encode(f"bob:{SECRET}".encode()).decode()
        if self.headers.get("Authorization") == expected:
            return True
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="disk"')
        self.send_header("Content-Length", "0")
        self.end_headers()
        return False

    def do_HEAD(self):
        if self._authorized():
            self.send_response(200)
            self.send_header("Content-Length", str(len(DISK)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()

    def do_GET(self):
        if not self._authorized():
            return
        start, end = self.headers["Range"].removeprefix("bytes=").split("-")
        body = DISK[int(start):int(end) + 1]
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(DISK)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def auth_http():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), AuthRangeHandler)
    httpd.daemon_threads = True
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/disk.img"
    httpd.shutdown()
    httpd.server_close()
    t.join()


# What the command can see of itself and of diskwatch (its parent).
DUMP_PROC = ('cat /proc/$$/environ /proc/$$/cmdline /proc/$PPID/environ /proc/$PPID/cmdline '
             '> {seen}; nbdcopy "$uri" - | md5sum')


@pytest.mark.parametrize("how", ["+FILE", "-"])
def test_password_never_reaches_the_command(auth_http, tmp_path, how):
    pwfile = tmp_path / "pw"
    pwfile.write_text(SECRET + "\n")
    os.chmod(pwfile, 0o600)
    seen = tmp_path / "seen"
    password = f"+{pwfile}" if how == "+FILE" else "-"
    p = subprocess.run([DISKWATCH, auth_http, "--user", "bob", "--password", password,
                        "--headless", "--no-trace", "--run", DUMP_PROC.format(seen=seen)],
                       input=SECRET + "\n", capture_output=True, text=True, timeout=60,
                       env=SUBPROCESS_ENV)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split()[0] == hashlib.md5(DISK).hexdigest()  # the password worked
    data = seen.read_bytes()
    assert b"PATH=" in data and b"\0--headless\0" in data  # read the shell's and diskwatch's
    assert SECRET.encode() not in data


def test_password_on_the_command_line_is_not_in_the_commands_environment(auth_http, tmp_path):
    """Given literally, the password is on diskwatch's own command line (which
    is why '+FILE' and '-' exist), but not in the command's environment or
    arguments."""
    seen = tmp_path / "seen"
    p = subprocess.run([DISKWATCH, auth_http, "--user", "bob", "--password", SECRET,
                        "--headless", "--no-trace", "--run",
                        f"cat /proc/$$/environ /proc/$$/cmdline > {seen}; nbdinfo --size \"$uri\""],
                       capture_output=True, text=True, timeout=60, env=SUBPROCESS_ENV)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == [str(len(DISK))]
    assert SECRET.encode() not in seen.read_bytes()


def test_unreadable_password_file_is_one_line(tmp_path):
    p = run_diskwatch(["http://127.0.0.1:9/x.img", "--password", f"+{tmp_path}/nope",
                       "--headless", "--run", "true"])
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [
        f"diskwatch: --password +{tmp_path}/nope: cannot read {tmp_path}/nope: "
        "No such file or directory"]


# --- output files and planted links -------------------------------------------------

@pytest.mark.parametrize("option", ["--log", "--record"])
def test_trace_and_record_are_not_written_through_a_planted_link(server_image, tmp_path,
                                                                 option):
    victim = tmp_path / "bashrc"
    victim.write_text("precious\n")
    planted = tmp_path / "trace.out"
    planted.symlink_to(victim)
    p = run_diskwatch([server_image.path, "-r", option, planted, "--headless", "--run",
                       'nbdinfo --size "$uri"'])
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [
        f"diskwatch: refusing to write {planted}: it is a symbolic link "
        "(give the file's real path, or remove the link)"]
    assert victim.read_text() == "precious\n"
    assert planted.is_symlink()


def test_trace_file_is_written_from_its_start(server_image, tmp_path):
    log = tmp_path / "trace.log"
    log.write_text("old content that is longer than the new trace\n" * 1000)
    p = run_diskwatch([server_image.path, "-r", "--log", log, "--headless", "--run",
                       'nbdinfo --size "$uri"'])
    assert p.returncode == 0, p.stderr
    assert "old content" not in log.read_text()


def test_bmap_is_not_generated_through_a_planted_link(server_image, tmp_path):
    """Refused at once, before minutes of mapping, for both ways of making a map."""
    planted = tmp_path / "disk.bmap"
    planted.symlink_to(tmp_path / "missing-target")
    for args in (["bmap", server_image.path, "-o", planted],
                 [server_image.path, "-r", "--bmap", planted, "--headless", "--run", "true"]):
        p = run_diskwatch(args, timeout=30)
        assert p.returncode == 1
        assert p.stderr.strip().splitlines()[-1] == (
            f"diskwatch: refusing to write {planted}: it is a symbolic link "
            "(give the file's real path, or remove the link)"), p.stderr
        assert not (tmp_path / "missing-target").exists()


def test_replace_atomically_never_follows_what_is_in_the_directory(tmp_path):
    target = tmp_path / "map.bmap"
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    # the old writer used MAP.tmp: a link planted there is not followed now
    (tmp_path / "map.bmap.tmp").symlink_to(victim)
    with replace_atomically(target) as f:
        f.write(b"1 0 200 v /dev/sda\n")
    assert target.read_bytes() == b"1 0 200 v /dev/sda\n"
    assert victim.read_text() == "precious\n"
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    # a failure leaves the old file and no temporary behind
    with pytest.raises(RuntimeError), replace_atomically(target) as f:
        f.write(b"half")
        raise RuntimeError("mapping failed")
    assert target.read_bytes() == b"1 0 200 v /dev/sda\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.bmap", "map.bmap.tmp", "victim"]
    with pytest.raises(OutputFileError):
        with replace_atomically(tmp_path / "map.bmap.tmp"):
            pass


def test_open_output_refuses_a_link_and_writes_a_fifo_as_is(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OutputFileError, match="symbolic link"):
        open_output(tmp_path / "link")
    assert not (tmp_path / "elsewhere").exists()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with open_output(fifo) as f:
            f.write("line\n")
        assert os.read(reader, 100) == b"line\n"
    finally:
        os.close(reader)
