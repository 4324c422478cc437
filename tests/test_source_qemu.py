"""Issue 11: images in qemu's formats, read through qemu's own block layer.

The demo guest (a real bootable disk) is converted with qemu-img to qcow2
(compressed clusters), to qcow2 over a raw backing file, and to vmdk, vdi,
vhdx, vpc and qed. What nbdcopy reads through diskwatch must equal
``qemu-img convert -O raw`` of the same image; writes without --snapshot must
land in the image (``qemu-img compare`` against the expected raw); a raw
image that looks like qcow2 inside is never reinterpreted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from diskwatch.sources import SourceOptions, open_source
from diskwatch.sources.qemu import choose_format

DISKWATCH = str(Path(sys.executable).with_name("diskwatch"))
WRITE_AT, WRITE_LEN = 3 * 1024 * 1024 + 512, 70_000  # crosses clusters, not aligned


def md5_file(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def qemu_img(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=True)


def diskwatch(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([DISKWATCH, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def guest_formats(guest_image, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """name -> (image, md5 of its raw conversion by qemu-img)."""
    work = tmp_path_factory.mktemp("formats")
    raw = Path(guest_image.path)
    out: dict[str, Path] = {}
    out["qcow2-compressed"] = work / "guest.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-c", str(raw), str(out["qcow2-compressed"]))
    # An overlay over a raw backing file, with data of its own on top.
    base = work / "base.img"
    shutil.copyfile(raw, base)
    out["qcow2-backing"] = work / "overlay.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw",
             str(out["qcow2-backing"]))
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5c 40M 1M",
                    str(out["qcow2-backing"])], check=True, capture_output=True)
    for fmt, ext in (("vmdk", "vmdk"), ("vdi", "vdi"), ("vhdx", "vhdx"), ("vpc", "vhd"),
                     ("qed", "qed")):
        out[fmt] = work / f"guest.{ext}"
        qemu_img("convert", "-f", "raw", "-O", fmt, str(raw), str(out[fmt]))
    result = {}
    for name, path in out.items():
        as_raw = work / f"{name}.raw"
        qemu_img("convert", "-O", "raw", str(path), str(as_raw))
        result[name] = (path, md5_file(as_raw))
        as_raw.unlink()
    return result


FORMAT_NAMES = ["qcow2-compressed", "qcow2-backing", "vmdk", "vdi", "vhdx", "vpc", "qed"]


def test_nbdcopy_through_diskwatch_reads_what_qemu_img_converts(guest_formats, tmp_path):
    # One diskwatch per format, all in one shell loop would hide which one
    # failed: each runs on its own, read-only, and nbdcopy writes the disk out.
    for name in FORMAT_NAMES:
        image, expected = guest_formats[name]
        out = tmp_path / f"{name}.out"
        r = diskwatch(str(image), "-r", "--headless", "--no-trace",
                      "--run", f'nbdcopy "$uri" {out}')
        assert r.returncode == 0, f"{name}: {r.stderr}"
        assert md5_file(out) == expected, name
        out.unlink()


def _merged(entries) -> list[tuple[int, int, int]]:
    out: list[list[int]] = []
    for start, length, flags in entries:
        if out and out[-1][2] == flags and out[-1][0] + out[-1][1] == start:
            out[-1][1] += length
        else:
            out.append([start, length, flags])
    return [tuple(e) for e in out]


def test_block_status_passes_through_holes_of_a_qcow2(tmp_path):
    image = tmp_path / "sparse.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(image), "64M")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 1M 1M", "-c", "write -P 2 40M 192k",
                    "-c", "write -z 41M 1M", str(image)], check=True, capture_output=True)
    truth = json.loads(qemu_img("map", "--output=json", "-f", "qcow2", str(image)).stdout)
    expected = _merged((e["start"], e["length"], (0 if e["data"] else 1) | (2 if e["zero"] else 0))
                       for e in truth)
    r = diskwatch(str(image), "-r", "--headless", "--no-trace",
                  "--run", 'nbdinfo --map --json "$uri"')
    assert r.returncode == 0, r.stderr
    got = _merged((e["offset"], e["length"], e["type"]) for e in json.loads(r.stdout))
    assert got == expected
    assert (1 << 20, 1 << 20, 0) in got and (0, 1 << 20, 3) in got


def test_writes_land_in_the_qcow2(guest_formats, tmp_path):
    image, _ = guest_formats["qcow2-compressed"]
    work = tmp_path / "rw.qcow2"
    shutil.copyfile(image, work)
    expected = tmp_path / "expected.raw"
    qemu_img("convert", "-O", "raw", str(work), str(expected))
    data = os.urandom(WRITE_LEN)
    (tmp_path / "data").write_bytes(data)
    with open(expected, "r+b") as f:
        f.seek(WRITE_AT)
        f.write(data)
    # nbdcopy with a subrange is not in Debian 12's libnbd: the write goes in
    # through the Python bindings, from the captive command.
    script = (f"import nbd,sys; h=nbd.NBD(); h.connect_uri(sys.argv[1]); "
              f"h.pwrite(open('{tmp_path / 'data'}','rb').read(), {WRITE_AT}); h.flush(); "
              f"h.shutdown()")
    r = diskwatch(str(work), "--headless", "--no-trace",
                  "--run", f'/usr/bin/python3 -c "{script}" "$uri"')
    assert r.returncode == 0, r.stderr
    cmp = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(work),
                          str(expected)], capture_output=True, text=True)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    # And --snapshot leaves the qcow2 as it was.
    before = md5_file(work)
    r = diskwatch(str(work), "--snapshot", "--headless", "--no-trace",
                  "--run", f'/usr/bin/python3 -c "{script}" "$uri"')
    assert r.returncode == 0, r.stderr
    assert md5_file(work) == before


@pytest.fixture
def disguised_qcow2(tmp_path) -> Path:
    """A raw image whose first bytes are a qcow2 header pointing at a host
    file: what a guest could write into its own raw disk."""
    path = tmp_path / "disk.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/hostname", "-F", "raw",
                    "-u", str(path), "1M"], check=True)
    with open(path, "r+b") as f:
        f.truncate(1024 * 1024)
    return path


@pytest.mark.parametrize("explicit", [False, True], ids=["probed", "format-raw"])
def test_a_raw_image_with_a_qcow2_header_is_served_as_raw(disguised_qcow2, tmp_path, explicit):
    out = tmp_path / "out"
    args = ["--format", "raw"] if explicit else []
    r = diskwatch(str(disguised_qcow2), "-r", *args, "--headless", "--no-trace",
                  "--run", f'nbdcopy "$uri" {out}')
    assert r.returncode == 0, r.stderr
    assert md5_file(out) == md5_file(disguised_qcow2)  # its own bytes, not /etc/hostname
    if explicit:
        assert "looks like" not in r.stderr
    else:
        assert "looks like a qcow2 image inside" in r.stderr and "--format qcow2" in r.stderr


def test_format_rule(disguised_qcow2, tmp_path):
    assert choose_format(str(disguised_qcow2), None)[0] == "raw"
    assert choose_format(str(disguised_qcow2), "qcow2") == ("qcow2", None)
    named = tmp_path / "real.qcow2"
    shutil.copyfile(disguised_qcow2, named)
    assert choose_format(str(named), None) == ("qcow2", None)
    # Named like qcow2, raw inside: refused, with the way out.
    fake = tmp_path / "fake.qcow2"
    fake.write_bytes(bytes(65536))
    r = diskwatch(str(fake), "-r", "--headless", "--run", "true")
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "--format raw" in r.stderr, r.stderr
    assert choose_format(str(fake), "raw") == ("raw", None)


def test_a_missing_backing_file_is_one_line(tmp_path):
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(tmp_path / "gone.img"),
                    "-F", "raw", "-u", str(overlay), "1M"], check=True)
    r = diskwatch(str(overlay), "-r", "--headless", "--run", "true")
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1, r.stderr
    assert "Could not open backing file" in r.stderr and "gone.img" in r.stderr
    assert "--blockdev" not in r.stderr  # qemu's echo of our own arguments is left out


def test_a_broken_image_is_one_line_and_the_daemon_is_gone(tmp_path):
    bad = tmp_path / "bad.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(bad), "1M"], check=True)
    with open(bad, "r+b") as f:  # a cluster size qemu refuses
        f.seek(20)
        f.write((40).to_bytes(4, "big"))
    r = diskwatch(str(bad), "-r", "--headless", "--run", "true")
    assert r.returncode == 1
    assert r.stderr.startswith("diskwatch: ") and r.stderr.count("\n") == 1, r.stderr
    assert "qemu" in r.stderr and "cluster" in r.stderr.lower()


def test_daemon_death_is_eio_with_its_status(guest_formats):
    nbd = pytest.importorskip("nbd")
    from diskwatch.server import serve_in_thread
    image, _ = guest_formats["vdi"]
    src = open_source(str(image), SourceOptions(readonly=True))
    try:
        daemon = src.inner.daemon if hasattr(src, "inner") else src.daemon
        with serve_in_thread({"": src}) as running:
            h = nbd.NBD()
            h.connect_uri(running.uri)
            assert len(h.pread(4096, 0)) == 4096
            os.kill(daemon.proc.pid, 9)
            daemon.proc.wait()
            with pytest.raises(nbd.Error) as e:
                h.pread(4096, 0)
                h.pread(4096, 8192)  # the first may race the daemon's last reply
            assert e.value.errnum == 5  # EIO
            h.shutdown()
        # The private directory with its socket goes with the source.
    finally:
        src.close()
    assert not os.path.exists(daemon.dir)


@pytest.mark.slow
def test_the_guest_boots_from_its_qcow2_with_the_same_names(guest_image, guest_formats, tmp_path):
    """The block map is made from the qcow2 itself (libguestfs reading
    through diskwatch's private qemu), then the guest boots from the qcow2
    under --snapshot and the trace names what it really reads and writes."""
    guest = guest_image.guest
    image, _ = guest_formats["qcow2-compressed"]
    bmap = tmp_path / "guest.bmap"
    r = diskwatch("bmap", str(image), "-r", "-o", str(bmap), "--accel", "tcg", timeout=600)
    assert r.returncode == 0, r.stderr
    trace = tmp_path / "boot.trace"
    before = md5_file(image)
    command = guest.qemu_shell_command("$nbd", "tcg")
    r = diskwatch(str(image), "--snapshot", "--bmap", str(bmap), "--headless",
                  "--log", str(trace), "--run", command, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert guest.marker in r.stdout, r.stdout[-2000:]
    text = trace.read_text()
    for path in guest.reads:
        assert f"read f /dev/sda1 {path} " in text, f"{path} not in the trace:\n{text[:3000]}"
    assert len([ln for ln in text.splitlines() if "] write f /dev/sda1 /var/log/demo.log " in ln]) \
        >= guest.write_counts["/var/log/demo.log"], text[-3000:]
    assert md5_file(image) == before


def _children(pid: int) -> list[int]:
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            kids += [int(k) for k in f.read().split()]
    return kids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # ESRCH: reaped while being read
        return False


@pytest.mark.parametrize("kill_what", ["daemon", "diskwatch"])
def test_the_daemon_is_supervised(guest_formats, tmp_path, kill_what):
    """Its death is EIO and one line naming the signal; diskwatch's death
    (SIGKILL, no cleanup) takes the daemon with it."""
    nbd = pytest.importorskip("nbd")
    from fixtures_server import wait_until
    image, _ = guest_formats["vdi"]
    sock = tmp_path / "dw.sock"
    # TMPDIR: the daemon's private directory outlives a SIGKILLed diskwatch.
    dw = subprocess.Popen([DISKWATCH, str(image), "-r", "-U", str(sock), "--headless",
                           "--no-trace"], stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ, TMPDIR=str(tmp_path)))
    try:
        wait_until(lambda: sock.exists() or dw.poll() is not None, what="diskwatch's socket")
        (qsd,) = [p for p in _children(dw.pid) if "qemu-storage-daemon" in
                  Path(f"/proc/{p}/cmdline").read_text()]
        if kill_what == "daemon":
            h = nbd.NBD()
            h.connect_uri(f"nbd+unix:///?socket={sock}")
            os.kill(qsd, 9)
            wait_until(lambda: not _alive(qsd), what="the daemon's death")
            # Reads of a read-only image's plain clusters skip the daemon
            # (sources/hostmap.py) until diskwatch has seen it exit.
            errors: list = []

            def read_fails() -> bool:
                try:
                    h.pread(4096, 0)
                except nbd.Error as e:
                    errors.append(e)
                return bool(errors)
            wait_until(read_fails, what="a read to fail")
            assert errors[0].errnum == 5
            h.shutdown()
            dw.terminate()
            assert dw.wait(30) == 0
            err = dw.stderr.read()
            assert re.search(r"qemu-storage-daemon serving \S+guest\.vdi was killed by "
                             r"signal 9", err), err
            assert "Traceback" not in err
        else:
            dw.kill()
            dw.wait()
            wait_until(lambda: not _alive(qsd), what="the daemon to die with diskwatch")
    finally:
        if dw.poll() is None:
            dw.kill()
            dw.wait()
