#!/usr/bin/env python3
"""Regenerate screenshots/ from the real app on real workloads.

    .venv/bin/python screenshots/make_screenshots.py [--out screenshots] [--size 140x42]

It builds the demo guest (busybox on ext4, Debian's kernel; cached in
$XDG_CACHE_HOME/diskwatch-screenshots), maps it (``diskwatch bmap`` when
``diskwatch.bmap.generate`` exists, otherwise from debugfs's block lists), then
serves it with diskwatch's server and boots it under qemu (TCG unless KVM
works) with the Textual app watching, headless, and saves SVGs at moments
chosen by what the app has seen (not by the clock). Each SVG gets a PNG
beside it when rsvg-convert (Debian: librsvg2-bin) is installed.

Shots: boot.svg (mid-boot, 140x42), boot-80x24.svg, scan.svg (the churn
guest's antivirus sweeping /opt/av-test: the activity line under the views),
churn-top-writes.svg (the churn guest rewriting logs, files only, top objects
by writes; remapped live, the "lived" line of the temporary file it made and
deleted), tree.svg and tree-80x24.svg (the d key's tree of the traffic, the
busiest path opened),
exited.svg (the command has exited, its status shown), attach.svg (``diskwatch
attach`` on the loop guest, already running under plain QEMU before diskwatch
came: the harness of tests/test_attach.py boots it and drives the real app).
With ``--only attach`` only that one is made.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diskwatch.bmap.index import BlockMap  # noqa: E402
from diskwatch.demo.guest import build_guest_image, probe_kvm  # noqa: E402
from diskwatch.events import Bus  # noqa: E402
from diskwatch.pipeline.session import Session  # noqa: E402
from diskwatch.remap import Remapper  # noqa: E402
from diskwatch.server.captive import Captive, captive_env  # noqa: E402
from diskwatch.server.server import Server, ServerThread  # noqa: E402
from diskwatch.sources.file import FileSource  # noqa: E402
from diskwatch.ui.app import DiskwatchApp  # noqa: E402

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diskwatch-screenshots"


# -- block maps --

def map_with_debugfs(guest, out: Path) -> None:
    """A block map from ext4's own block lists (used when the libguestfs
    generator is not available): v for the disk, p for the partition, d/f
    for every directory and file."""
    part = out.with_suffix(".part")
    with open(guest.path, "rb") as src, open(part, "wb") as dst:
        src.seek(guest.partition_offset)
        dst.write(src.read(guest.partition_length))
    info = subprocess.run(["dumpe2fs", "-h", str(part)], capture_output=True, text=True,
                          check=True).stdout
    block = int(re.search(r"^Block size:\s+(\d+)", info, re.M).group(1))
    paths = [("d", "/"), *(("d", d) for d in guest.dirs), *(("f", f) for f in guest.files)]
    script = "".join(f'blocks "{p}"\n' for _, p in paths)
    res = subprocess.run(["debugfs", "-f", "-", str(part)], input=script,
                         capture_output=True, text=True, check=True)
    outputs = re.split(r"^debugfs: .*$", res.stdout, flags=re.M)[1:]
    base = guest.partition_offset
    lines = [f"1 0 {guest.size:x} v /dev/sda",
             f"1 {base:x} {base + guest.partition_length:x} p /dev/sda1"]
    for (kind, path), blocks in zip(paths, outputs, strict=False):
        nums = sorted(int(b) for b in blocks.split())
        run_start = prev = None
        for b in [*nums, None]:
            if b is not None and prev is not None and b == prev + 1:
                prev = b
                continue
            if run_start is not None:
                lines.append(f"1 {base + run_start * block:x} {base + (prev + 1) * block:x} "
                             f"{kind} /dev/sda1 {path}")
            run_start = prev = b
    out.write_text("\n".join(lines) + "\n")
    part.unlink()


def generator():
    try:
        from diskwatch.bmap import generate  # noqa: F401
    except ImportError:
        return None
    return generate


# -- driving the app --

async def until(pilot, app, condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        app.pump()
        if condition():
            await pilot.pause()
            return True
        await pilot.pause(0.1)
    return False


def save(app, out: Path, name: str) -> Path:
    path = app.save_screenshot(path=str(out), filename=name)
    print("wrote", path)
    return Path(path)


def to_png(svg: Path) -> None:
    """rsvg drops the SVG's no-break spaces; give it plain preserved spaces."""
    if not shutil.which("rsvg-convert"):
        return
    text = svg.read_text().replace("<svg ", '<svg xml:space="preserve" ', 1)
    with tempfile.NamedTemporaryFile("w", suffix=".svg", delete=False) as tmp:
        tmp.write(text.replace("&#160;", " "))
    subprocess.run(["rsvg-convert", tmp.name, "-o", str(svg.with_suffix(".png"))], check=True)
    os.unlink(tmp.name)
    print("wrote", svg.with_suffix(".png"))


def boot_session(guest, bmap: Path, sock: str, accel: str, *, remap: bool = False):
    bus = Bus()
    source = FileSource(str(guest.path))
    server = Server({"": source}, bus)
    server.listen_unix(sock)
    thread = ServerThread(server).start()
    command = guest.qemu_shell_command("$nbd", accel)
    session = Session(bus=bus, size=guest.size, description=f"file {guest.path.name}",
                      uri=f"nbd+unix:///?socket={sock}", command=command,
                      blockmap=BlockMap.load(bmap))
    # what the CLI does: the command's output goes to the bus, never the screen
    session.command = "qemu-system-x86_64 -accel " + accel + " … -drive file=$nbd,if=virtio"
    captive = Captive(command, captive_env("unix", sock), capture=True, bus=bus)
    session.stop_command = captive.stop
    captive.on_exit = lambda status: setattr(session, "exit_status", status)
    if remap:  # live remaps, as diskwatch runs by default: the new files are named
        session.remapper = session.pump.add(Remapper(
            source, current=lambda: session.blockmap, mode="auto", bus=bus,
            swap=lambda r: session.swap_map(r.blockmap, f"remap ({r.why})", r.journal_map,
                                            (r.added, r.removed)),
            say=lambda text, level: None))
    return session, thread, captive


async def shoot_boot(guest, bmap, out, size, accel, tmp, *, churn: bool) -> None:
    session, thread, captive = boot_session(
        guest, bmap, f"{tmp}/{'churn' if churn else 'boot'}.sock", accel, remap=churn)
    app = DiskwatchApp(session)
    try:
        async with app.run_test(size=size) as pilot:
            captive.start()
            if not churn:
                # mid-boot: the kernel has mounted the root and started init
                # (a moment later, under a quiet machine, init is all done)
                await until(pilot, app, lambda: any(
                    o.type == "f" and o.path == "/sbin/init" for o in app.stats.objects), 180)
                await pilot.hover("#heatmap", offset=(12, 2))
                save(app, out, "boot.svg")
                await until(pilot, app, lambda: session.exit_status is not None, 120)
                await until(pilot, app, lambda: app.command_status is not None, 10)
                app.notify = lambda *a, **k: None
                save(app, out, "exited.svg")
            else:
                # the antivirus sweeping /opt/av-test: the activity line says so
                def scanning() -> bool:
                    app._refresh_views(force=True)
                    return any(s.files >= 120 for s in app.activity_sink.live_scans())
                app.notify = lambda *a, **k: None  # the toasts would cover the views
                await until(pilot, app, scanning, 180)
                await pilot.pause()
                save(app, out, "scan.svg")
                # the tree of the traffic (d), the busiest path opened (b):
                # the antivirus's tree, while it is the busiest
                await pilot.press("d")

                def opt_busiest() -> bool:
                    app._refresh_views(force=True)
                    sda1 = app.traffic.root.children.get("/dev/sda1")
                    kids = app.traffic.children(sda1, "rate", 1)[0] if sda1 else []
                    return bool(kids) and kids[0].name == "opt"
                await until(pilot, app, opt_busiest, 60)
                await pilot.press("b")
                app._refresh_views(force=True)
                await pilot.pause()
                save(app, out, "tree.svg")
                await pilot.resize_terminal(80, 24)
                await pilot.pause()
                app._refresh_views(force=True)
                await pilot.pause()
                save(app, out, "tree-80x24.svg")
                await pilot.resize_terminal(*size)
                await pilot.press("escape")
                await until(pilot, app, lambda: app.stats.ops[1] >= 40, 180)
                # the antivirus's temporary file, made and deleted: its "lived" line
                await until(pilot, app, lambda: app.activity_sink.lives.deaths >= 1, 120)
                await pilot.press("f", "s")  # files only, top objects by writes
                save(app, out, "churn-top-writes.svg")
                await until(pilot, app, lambda: session.exit_status is not None, 180)
    finally:
        if captive.running:
            captive.stop()
        if session.remapper is not None:
            session.remapper.close()
        thread.stop()


async def shoot_small(guest, bmap, out, accel, tmp) -> None:
    session, thread, captive = boot_session(guest, bmap, f"{tmp}/small.sock", accel)
    app = DiskwatchApp(session)
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            captive.start()
            await until(pilot, app, lambda: app.stats.ops[1] >= 3, 180)
            save(app, out, "boot-80x24.svg")
    finally:
        if captive.running:
            captive.stop()
        thread.stop()


def shoot_attach(out: Path, size=(140, 42)) -> Path:
    """The UI attached to a guest that was running before diskwatch came."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from test_attach import RunningGuest, run_attached_ui

    with tempfile.TemporaryDirectory(prefix="dw-shots-") as tmp:
        work = Path(tmp)
        guest = build_guest_image(work / "running.img")
        bmap = work / "running.bmap"
        subprocess.run([str(Path(sys.executable).parent / "diskwatch"), "bmap", str(guest.path),
                        "-o", str(bmap)], check=True)
        running = RunningGuest(guest.path, guest, work)
        try:
            running.wait_line(r"diskwatch-loop: tick 1\b", 300)
            running.wait_ticks(5)  # at work for a while before diskwatch comes

            async def check(app, pilot):
                start = len(running.ticks)
                while len(running.ticks) < start + 6:  # a few seconds of the loop under diskwatch
                    await pilot.pause(0.2)
                app.pump()
                app._refresh_views(force=True)
                await pilot.pause()
                save(app, out, "attach.svg")
            run_attached_ui(running, bmap, check, size=size)
        finally:
            running.stop()
    return out / "attach.svg"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent))
    ap.add_argument("--size", default="140x42", help="terminal size of the main shots")
    ap.add_argument("--only", choices=("attach",), help="make only this shot")
    args = ap.parse_args()
    out = Path(args.out)
    if args.only == "attach":
        svg = shoot_attach(out)
        to_png(svg)
        return 0
    size = tuple(int(x) for x in args.size.split("x"))
    CACHE.mkdir(parents=True, exist_ok=True)
    accel = "kvm" if probe_kvm(timeout=15) else "tcg"
    print("accelerator:", accel)
    with tempfile.TemporaryDirectory(prefix="dw-shots-") as tmp:
        shots = []
        for churn in (False, True):
            name = "churn" if churn else "boot"
            guest = build_guest_image(CACHE / f"{name}.img", churn=churn)
            bmap = CACHE / f"{name}.bmap"
            if generator() is None:
                map_with_debugfs(guest, bmap)
            else:
                subprocess.run([str(Path(sys.executable).parent / "diskwatch"), "bmap", str(guest.path),
                                "-o", str(bmap)], check=True)
            asyncio.run(shoot_boot(guest, bmap, out, size, accel, tmp, churn=churn))
            if not churn:
                asyncio.run(shoot_small(guest, bmap, out, accel, tmp))
        shots = sorted(out.glob("*.svg"))
        for svg in shots:
            to_png(svg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
