"""Captive mode through the installed console script:
``diskwatch IMAGE --headless --run CMD`` runs CMD once the server listens,
with nbdkit's variables, and exits with CMD's status."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from fixtures_server import IMAGE_SIZE, SUBPROCESS_ENV, run_diskwatch

PRINT_ENV = 'printf "%s\\n" "nbd=$nbd" "uri=$uri" "unixsocket=$unixsocket" "port=$port" ' \
            '"exportname=$exportname"'


def env_lines(stdout: str) -> dict[str, str]:
    out = {}
    for line in stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep and key in ("nbd", "uri", "unixsocket", "port", "exportname"):
            out[key] = value
    return out


@pytest.mark.parametrize("command,status", [
    ("true", 0),
    ("exit 3", 3),
    ("exit 255", 255),
    ("kill -KILL $$", 128 + 9),
    ("kill -TERM $$", 128 + 15),
])
def test_exit_status_of_the_command(server_image, command, status):
    p = run_diskwatch([server_image.path, "-r", "--headless", "--run", command])
    assert p.returncode == status, p.stderr
    assert "Traceback" not in p.stderr


def test_unix_socket_variables(server_image):
    p = run_diskwatch([server_image.path, "-r", "--headless", "--run",
                       PRINT_ENV + '; test -S "$unixsocket" && echo is-a-socket'])
    assert p.returncode == 0, p.stderr
    env = env_lines(p.stdout)
    sock = env["unixsocket"]
    assert sock and os.path.isabs(sock)
    assert env["uri"] == f"nbd+unix:///?socket={sock}"
    assert env["nbd"] == env["uri"]  # nbdkit >= 1.24: both are the URI
    assert env["port"] == "" and env["exportname"] == ""
    assert "is-a-socket" in p.stdout


def test_tcp_variables(server_image):
    p = run_diskwatch([server_image.path, "-r", "-p", "0", "--headless", "--run",
                       PRINT_ENV + ' && nbdinfo --size "$uri"'])
    assert p.returncode == 0, p.stderr
    env = env_lines(p.stdout)
    port = int(env["port"])
    assert 0 < port < 65536
    assert env["uri"] == f"nbd://127.0.0.1:{port}/"
    assert env["nbd"] == env["uri"]
    assert env["unixsocket"] == ""
    assert str(IMAGE_SIZE) in p.stdout.splitlines()


def test_export_name_variable(server_image):
    p = run_diskwatch([server_image.path, "-r", "-e", "disk0", "--headless", "--run",
                       PRINT_ENV + ' && nbdinfo --json "$uri" | grep -c \'"export-name": "disk0"\''])
    assert p.returncode == 0, p.stderr
    env = env_lines(p.stdout)
    assert env["exportname"] == "disk0"
    assert env["uri"] == f"nbd+unix:///disk0?socket={env['unixsocket']}"
    assert "1" in p.stdout.splitlines()  # nbdinfo saw the export by that name


def test_variables_like_nbdkit(server_image):
    nbdkit = shutil.which("nbdkit", path=SUBPROCESS_ENV["PATH"])
    if nbdkit is None:
        pytest.skip("nbdkit is not installed")
    theirs = env_lines(subprocess.run(
        [nbdkit, "-U", "-", "-e", "disk0", "memory", "1M", "--run", PRINT_ENV],
        capture_output=True, text=True, timeout=30, env=SUBPROCESS_ENV).stdout)
    ours = env_lines(run_diskwatch([server_image.path, "-r", "-e", "disk0", "--headless",
                                    "--run", PRINT_ENV]).stdout)
    assert set(ours) == set(theirs)
    for env in (ours, theirs):
        assert env["nbd"] == env["uri"]
        assert env["exportname"] == "disk0"
        assert env["port"] == ""
        assert env["uri"].startswith("nbd+unix://")
        assert env["uri"].endswith(f"disk0?socket={env['unixsocket']}")


def test_clients_take_the_variables(server_image):
    """$nbd and $uri work as they are with qemu-img and libnbd's tools."""
    p = run_diskwatch([server_image.path, "-r", "--headless", "--run",
                       'qemu-img info "$nbd" && nbdinfo --size "$nbd" && nbdinfo --size "$uri"'])
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"virtual size: 32 MiB ({IMAGE_SIZE} bytes)" in p.stdout
    assert p.stdout.count(str(IMAGE_SIZE)) >= 3


def test_private_socket_dir_is_0700_and_removed(server_image):
    p = run_diskwatch([server_image.path, "-r", "-U", "-", "--headless", "--run",
                       'echo "$unixsocket"; stat -c %a "$(dirname "$unixsocket")"'])
    assert p.returncode == 0, p.stderr
    sock, mode = p.stdout.splitlines()[:2]
    assert mode == "700"
    assert not os.path.exists(sock)
    assert not os.path.exists(os.path.dirname(sock))


def test_given_unix_socket_is_removed_at_exit(server_image, tmp_path):
    sock = tmp_path / "dw.sock"
    p = run_diskwatch([server_image.path, "-r", "-U", sock, "--headless", "--run",
                       'test -S "$unixsocket" && echo "$unixsocket"'])
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0] == str(sock)
    assert not sock.exists()


def test_captive_read_only_refuses_writes(server_image):
    script = ("import nbd, sys\n"
              "h = nbd.NBD(); h.set_strict_mode(0); h.connect_uri(sys.argv[1])\n"
              "print('ro', h.is_read_only())\n"
              "try:\n    h.pwrite(b'x', 0)\nexcept nbd.Error as e:\n    print('errno', e.errnum)\n")
    p = run_diskwatch([server_image.path, "-r", "--headless", "--run",
                       f'/usr/bin/python3 -c "{script}" "$uri"'])
    assert p.returncode == 0, p.stderr
    assert "ro True" in p.stdout and "errno 1" in p.stdout
