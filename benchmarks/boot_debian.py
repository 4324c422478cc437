"""A real Linux boot under diskwatch: how much of it the live map names.

Debian 12 (debootstrap minbase, systemd, udev: about 6,200 files) on an MBR
disk with one ext4 partition boots under TCG with Debian's kernel and
initrd, from diskwatch's server (``--snapshot --bmap --record``, the map
made before boot, ``--remap auto``). A unit writes five lines to a log file
it creates at boot (``/var/log/app/boot.log``), a second apart, then powers
off. Printed from the recording's report (``diskwatch report --json``):

- the bytes read named by a file, directory or structure (the goal:
  >= 95%), the rest named only by a partition or the disk;
- the bytes written that the live trace named (>= 90%), and those the
  report leaves named only by a partition once late naming gave the rest to
  their files (<= 5%);
- the log file's write lines in the trace (named in its own lines), and the
  session's remap lines (updates, and why any was the whole walk).

    .venv/bin/python benchmarks/boot_debian.py [--work DIR] [--mirror URL]

The root tree is made once with debootstrap (a few minutes, from the
Debian mirror) and kept in ``--work``. Not run by the test suite: a boot
and a debootstrap are minutes, and the suite's guests are busybox ones.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from diskwatch.demo.guest import find_kernel, make_partition_table, mkfs_ext4_at  # noqa: E402

DISKWATCH = str(Path(sys.executable).with_name("diskwatch"))
BOOT_LOG = "/var/log/app/boot.log"
UNIT = f"""[Unit]
Description=write a log at boot, then power off
After=multi-user.target systemd-journald.service
[Service]
Type=oneshot
ExecStart=/bin/sh -c 'mkdir -p {os.path.dirname(BOOT_LOG)}; for i in 1 2 3 4 5; do echo "boot line $i $(date)" >> {BOOT_LOG}; sync; sleep 1; done; systemctl poweroff'
[Install]
WantedBy=multi-user.target
"""


def root_tree(work: Path, mirror: str) -> Path:
    root = work / "root"
    if not (root / "usr/lib/systemd/systemd").exists():
        shutil.rmtree(root, ignore_errors=True)
        print(f"debootstrap into {root} (once)...", flush=True)
        subprocess.run(["debootstrap", "--variant=minbase",
                        "--include=systemd,systemd-sysv,udev,kmod", "bookworm", str(root), mirror],
                       check=True, stdout=subprocess.DEVNULL)
    unit = root / "etc/systemd/system/bootlog.service"
    unit.write_text(UNIT)
    wants = root / "etc/systemd/system/multi-user.target.wants/bootlog.service"
    wants.unlink(missing_ok=True)
    wants.symlink_to("/etc/systemd/system/bootlog.service")
    (root / "etc/fstab").write_text("/dev/vda1 / ext4 rw 0 1\n")
    (root / "etc/hostname").write_text("diskwatch-guest\n")
    (root / "var/log/journal").mkdir(parents=True, exist_ok=True)
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/diskwatch-boot-debian"))
    ap.add_argument("--mirror", default="http://deb.debian.org/debian")
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    root = root_tree(work, args.mirror)
    image, bmap, rec = work / "debian.img", work / "debian.bmap", work / "boot.rec"
    image.unlink(missing_ok=True)
    with open(image, "wb") as f:
        f.truncate(2 << 30)
    ((offset, length),) = make_partition_table(image, "dos", [(None, "83")])
    mkfs_ext4_at(image, offset, length, root)
    subprocess.run([DISKWATCH, "bmap", str(image), "-o", str(bmap)], check=True)
    kernel, initrd = find_kernel()
    qemu = (f"qemu-system-x86_64 -accel tcg -m 1024 -nodefaults -display none "
            f"-serial file:{work}/console.log -monitor none -no-reboot -kernel {kernel} "
            f"-initrd {initrd} -append 'root=/dev/vda1 rw console=ttyS0 panic=-1' "
            f"-drive file=$nbd,format=raw,if=virtio")
    rec.unlink(missing_ok=True)
    t0 = time.monotonic()
    with open(work / "trace.txt", "w") as out:
        run = subprocess.run([DISKWATCH, str(image), "--snapshot", "--bmap", str(bmap),
                              "--headless", "--record", str(rec), "--run", qemu],
                             stdout=out, stderr=subprocess.PIPE, text=True, timeout=900)
    took = time.monotonic() - t0
    if run.returncode != 0:
        sys.exit(f"the boot failed ({run.returncode}): {run.stderr[-2000:]}")
    report = json.loads(subprocess.run([DISKWATCH, "report", str(rec), "--json"], check=True,
                                       capture_output=True, text=True).stdout)
    po, un, late = report["partition_only"], report["unmapped"], report["named_late"]
    rb, wb = report["read_bytes"], report["write_bytes"]
    named_reads = 1 - (po["read_bytes"] + un["read_bytes"]) / rb
    live_writes = 1 - (po["write_bytes"] + un["write_bytes"] + late) / wb
    left = (po["write_bytes"] + un["write_bytes"]) / wb
    trace = (work / "trace.txt").read_text()
    log_lines = [ln for ln in trace.splitlines() if f"f /dev/sda1 {BOOT_LOG}" in ln
                 and " write " in f" {ln} "]
    remaps = [ln for ln in run.stderr.splitlines() if "remap (" in ln]
    print(f"boot: {took:.1f} s under diskwatch (TCG), {report['requests']} requests, "
          f"{rb / 2**20:.1f} MiB read, {wb / 2**20:.1f} MiB written (zeroes included)")
    print(f"reads named by a file, directory or structure: {named_reads:.1%} (goal >= 95%)")
    print(f"writes named live: {live_writes:.1%} (goal >= 90%); named only by a partition in "
          f"the report: {left:.2%} (goal <= 5%); named late: {late / 2**10:.0f} KiB")
    print(f"{BOOT_LOG}: {len(log_lines)} write lines in the trace "
          f"({sum('named late' in ln for ln in log_lines)} of them named late)")
    for line in remaps:
        print("  " + line.removeprefix("diskwatch: ")[:200])


if __name__ == "__main__":
    main()
