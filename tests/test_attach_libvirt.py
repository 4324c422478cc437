"""Issue 20, item 4: diskwatch attach --libvirt to a domain with two qcow2 disks.

libvirt runs here as it does on a host: a libvirtd (and its virtlogd) as
root, the domain's QEMU as libvirt-qemu, its disks as libvirt names them
(``-blockdev`` nodes ``libvirt-N-format`` and ``libvirt-N-storage``, devices
``virtio-disk0``, ``virtio-disk1``), its monitor held by libvirt (diskwatch
goes through ``virsh qemu-monitor-command``). If no libvirtd answers, the
module starts one (and a virtlogd) for itself and stops them afterwards:
CI starts no services.

One transient domain for the module (TCG, the loop guest of
test_attach.py): the system disk a qcow2 over the demo guest's raw image
(its backing file), the data disk a qcow2 holding an MBR and one ext4
partition with /data/f0..f7 (test_attach_disks.py's), which the loop reads
every tick and writes a record into /data/f3. In file order: attach to the
system disk alone, then to both qcow2 disks at once (each file named on its
own device, detach puts both back on their files), kill -9 while attached
to both (the watchdog puts both back through virsh),
and last the guest stops: qemu-img check of both qcow2 files is clean, and
e2fsck of both filesystems (the images converted), and the data disk kept
every record of the last ticks.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from test_attach import BOOT_TIMEOUT, MAX_STALL, RunningGuest, start_attach, wait_back
from test_attach_disks import assert_each_disk_named, check_data_disk, make_data_disk

from diskwatch.attach.qmp import VirshMonitor
from diskwatch.demo.guest import LOOP_INIT, build_minimal_initrd

pytestmark = pytest.mark.slow

URI = "qemu:///system"


def virsh(*words: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["virsh", "-c", URI, *words], capture_output=True, text=True,
                          timeout=timeout, check=check, stdin=subprocess.DEVNULL)


def _answers() -> bool:
    try:
        return virsh("version", check=False, timeout=20).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@pytest.fixture(scope="module")
def libvirtd():
    """A libvirtd answering on qemu:///system: the host's, or one started here."""
    for tool in ("virsh", "libvirtd", "virtlogd"):
        assert shutil.which(tool), f"{tool} is missing (make setup installs libvirt)"
    if os.path.exists("/run/libvirt/libvirt-sock") and _answers():
        yield
        return
    started = []
    try:
        for daemon, sock in (("virtlogd", "/run/libvirt/virtlogd-sock"),
                             ("libvirtd", "/run/libvirt/libvirt-sock")):
            log = open(f"/tmp/diskwatch-test-{daemon}.log", "ab")  # noqa: SIM115
            started.append(subprocess.Popen([shutil.which(daemon)], stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=log))
            deadline = time.monotonic() + 60
            while not os.path.exists(sock):
                assert started[-1].poll() is None, f"{daemon} ended: see {log.name}"
                assert time.monotonic() < deadline, f"{daemon} made no socket {sock}"
                time.sleep(0.1)
        deadline = time.monotonic() + 60
        while not _answers():
            assert time.monotonic() < deadline, "libvirtd does not answer"
            time.sleep(0.2)
        yield
    finally:
        for proc in reversed(started):  # ours, by pid
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


DOMAIN = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>root=/dev/vda1 rootfstype=ext4 rw console=ttyS0 panic=-1 loglevel=6 init={init}</cmdline>
  </os>
  <features><acpi/></features>
  <on_reboot>destroy</on_reboot>
  <devices>
    <emulator>{qemu}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{root}'/>
      <backingStore type='file'>
        <format type='raw'/>
        <source file='{base}'/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{data}'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <serial type='unix'>
      <source mode='bind' path='{console}'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


class LibvirtGuest(RunningGuest):
    """The loop guest as a transient libvirt domain: RunningGuest's console
    and tick bookkeeping, its monitor through virsh, attached with --libvirt."""

    def __init__(self, work: Path, guest, base: Path, root: Path, data: Path):
        self.image = root
        self.guest = guest
        self.name = f"diskwatch-test-{os.getpid()}"
        self.attach_to = ["--libvirt", self.name, "--connect", URI]
        console_path = work / "console.sock"
        initrd = build_minimal_initrd(Path(guest.kernel), work / "minimal.initrd")
        os.chmod(initrd, 0o644)
        xml = work / "domain.xml"
        xml.write_text(DOMAIN.format(name=self.name, kernel=guest.kernel, initrd=initrd,
                                     init=LOOP_INIT, qemu=shutil.which("qemu-system-x86_64"),
                                     root=root, base=base, data=data, console=console_path))
        self.lines: list[tuple[float, str]] = []
        self.ticks: list[tuple[float, int]] = []
        self._cond = threading.Condition()
        virsh("create", str(xml))
        self.console = socket.socket(socket.AF_UNIX)
        self.console.connect(str(console_path))  # libvirt made it before QEMU ran
        threading.Thread(target=self._read_console, daemon=True).start()

    def qmp(self) -> VirshMonitor:
        return VirshMonitor(self.name, connect=URI)

    def block_state(self) -> dict[str, tuple[str, str, str]]:
        """qdev id -> (node name, driver, file) for every disk."""
        with self.qmp() as q:
            return {d["qdev"].split("/")[3]: (d["inserted"]["node-name"], d["inserted"]["drv"],
                                              d["inserted"]["file"])
                    for d in q.execute("query-block") if d.get("inserted")}

    def running(self) -> bool:
        r = virsh("domstate", self.name, check=False)
        return r.returncode == 0 and r.stdout.strip() == "running"

    def stop(self, timeout: float = 120) -> int:
        """Tell the loop to stop (it powers off); the domain is gone then.
        0 if it went by itself, 1 if it had to be destroyed."""
        if not self.running():
            return 0
        with contextlib.suppress(OSError):
            self.console.sendall(b"stop\n")
        deadline = time.monotonic() + timeout
        while self.running():
            if time.monotonic() > deadline:
                virsh("destroy", self.name, check=False)
                return 1
            time.sleep(0.2)
        return 0


@pytest.fixture(scope="module")
def libvirt_guest(libvirtd, guest_image):
    # libvirt's QEMU runs as libvirt-qemu: the images sit in a directory it can
    # traverse (pytest's own are 0700), which libvirt chowns and gives back.
    work = Path(tempfile.mkdtemp(prefix="diskwatch-libvirt-", dir="/var/tmp"))
    os.chmod(work, 0o755)
    base = work / "base.raw"
    shutil.copyfile(guest_image.path, base)
    root = work / "root.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base),
                    str(root)], check=True)
    raw = make_data_disk(work)
    data = work / "data.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(data)], check=True)
    raw.unlink()
    for path in (base, root, data):
        os.chmod(path, 0o644)
    guest = LibvirtGuest(work, guest_image.guest, base, root, data)
    try:
        guest.wait_line(r"diskwatch-loop: data disk /dev/vdb1", BOOT_TIMEOUT)
        guest.wait_line(r"diskwatch-loop: tick 1\b", BOOT_TIMEOUT)
        yield guest, data
    finally:
        guest.stop(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


BOTH = ("virtio-disk0", "virtio-disk1")


def drivers(g: LibvirtGuest) -> tuple[str, str]:
    state = g.block_state()
    return state["virtio-disk0"][1], state["virtio-disk1"][1]


def files(g: LibvirtGuest) -> tuple[str, str]:
    """The file each disk's qcow2 node reads (an nbd: URI while attached)."""
    state = g.block_state()
    return state["virtio-disk0"][2], state["virtio-disk1"][2]


def test_attach_to_the_domain_s_system_disk_names_its_files(libvirt_guest, tmp_path):
    g, data = libvirt_guest
    since = time.monotonic()
    before = files(g)
    assert before == (str(g.image), str(data)) and drivers(g) == ("qcow2", "qcow2")
    log = tmp_path / "trace.txt"
    proc, err = start_attach(g, "--bmap", str(tmp_path / "root.bmap"), "--log", str(log),
                             devices=("virtio-disk0",))
    said = "".join(err)
    assert "attached: virtio-disk0's I/O goes through diskwatch" in said, said
    assert "the backing file's reads too (export backing)" in said, said
    assert files(g)[0].startswith("json:") or "nbd" in files(g)[0], files(g)
    assert files(g)[1] == str(data)  # the other disk untouched
    g.wait_ticks(3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, "".join(err)
    assert files(g) == before
    said = "".join(err)
    assert re.search(r"detached: virtio-disk0 is back on \S+root\.qcow2", said), said
    trace = log.read_text()
    assert "write f /dev/sda1 /var/log/demo.log" in trace, trace[-2000:]
    assert "read f /dev/sda1 /usr/share/demo/data/table.csv" in trace, trace[-2000:]
    g.wait_ticks(2)
    assert g.max_stall(since) < MAX_STALL, g.tail()


def test_one_attach_moves_both_qcow2_disks_names_each_and_detach_puts_both_back(libvirt_guest,
                                                                                tmp_path):
    g, data = libvirt_guest
    since = time.monotonic()
    before = files(g)
    log = tmp_path / "trace.txt"
    proc, err = start_attach(g, "--bmap", str(tmp_path / "vm.bmap"), "--log", str(log),
                             devices=BOTH)
    said = "".join(err)
    assert "attached: virtio-disk0 and virtio-disk1's I/O goes through diskwatch" in said, said
    now = files(g)
    assert now[0] != before[0] and now[1] != before[1], now
    g.wait_ticks(3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, "".join(err)
    assert files(g) == before
    said = "".join(err)
    assert re.search(r"detached: virtio-disk0 is back on \S+root\.qcow2; virtio-disk1 is back on "
                     r"\S+data\.qcow2", said), said
    assert_each_disk_named(log)
    g.wait_ticks(2)
    assert g.max_stall(since) < MAX_STALL, g.tail()


def test_kill_9_while_attached_the_watchdog_puts_both_disks_back_through_libvirt(libvirt_guest):
    g, data = libvirt_guest
    since = time.monotonic()
    before = files(g)
    proc, err = start_attach(g, "--no-trace", devices=BOTH)
    now = files(g)
    assert now[0] != before[0] and now[1] != before[1], now
    g.wait_ticks(1)
    proc.kill()
    proc.wait()
    wait_back(err, BOTH, lambda: files(g), before)
    g.wait_ticks(3)
    assert g.max_stall(since) < MAX_STALL, g.tail()
    assert "I/O error" not in g.tail(200)


def test_the_guest_stops_and_both_qcow2_files_and_filesystems_are_clean(libvirt_guest,
                                                                          tmp_path):
    g, data = libvirt_guest
    assert g.stop() == 0
    console = "\n".join(line for _, line in g.lines)
    assert "diskwatch-loop: stopped" in console
    assert "I/O error" not in console
    for image in (g.image, data):
        r = subprocess.run(["qemu-img", "check", "--output=json", str(image)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        check = json.loads(r.stdout)
        assert check.get("corruptions", 0) == 0 and check.get("leaks", 0) == 0, check
    raws = []
    for image in (g.image, data):
        raw = tmp_path / f"{image.stem}.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
        raws.append(raw)
    r = subprocess.run(["e2fsck", "-f", "-n", f"{raws[0]}?offset={g.guest.partition_offset}"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    check_data_disk(g, raws[1])
