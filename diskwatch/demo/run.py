"""`diskwatch demo`: build the demo guest once, then hand the CLI what to run.

The image lives in a cache directory, so the second run starts at once; its
block map is made again each run from the filesystem metadata (well under a
second). The guest is served with --snapshot: its writes (the log file
churn) never change the cached image, and the cached map stays true.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from .guest import GuestImage, build_guest_image, find_kernel, require_tool

CACHE_FORMAT = 1


@dataclass
class DemoPlan:
    image: str
    bmap: str
    command: str
    accel: str
    guest: GuestImage


def _load_cached(meta: Path, image: Path) -> GuestImage | None:
    try:
        with open(meta, "rb") as f:
            stamp, guest = pickle.load(f)  # our own cache file, written below
    except (OSError, pickle.PickleError, EOFError, AttributeError, ValueError):
        return None
    if stamp != (CACHE_FORMAT, __version__) or not image.exists():
        return None
    if not (Path(guest.kernel).exists() and Path(guest.initrd).exists()):
        return None  # the kernel was upgraded: rebuild against the new one
    return guest


def choose_accel(accel: str, say: Callable[[str], None]) -> str:
    """The same decision as the block-map generator's (one probe, one rule)."""
    from ..bmap.generate import choose_accel as decide
    chosen, why = decide(accel)
    if chosen == "kvm":
        say(f"the guest runs with -accel kvm: {why}")
    else:
        say(f"the guest runs under TCG (slower; about 15-25 s to boot): {why}")
    return chosen


def prepare_demo(cache_dir: str, *, churn: bool = False, accel: str = "auto",
                 say: Callable[[str], None] = print) -> DemoPlan:
    """Build (once) the guest image; decide KVM or TCG; return what to serve and run."""
    require_tool("qemu-system-x86_64")
    find_kernel()  # says which package when there is no kernel in /boot
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    name = "churn" if churn else "guest"
    image = cache / f"{name}.img"
    meta = cache / f"{name}.meta"
    bmap = cache / f"{name}.bmap"
    guest = _load_cached(meta, image)
    if guest is None:
        say(f"building the demo guest image in {image} (once)")
        for stale in (bmap, image):
            if stale.exists():
                stale.unlink()
        tmp = cache / f"{name}.img.tmp"
        guest = build_guest_image(tmp, churn=churn)
        os.replace(tmp, image)
        guest.path = image
        with open(meta, "wb") as f:
            pickle.dump(((CACHE_FORMAT, __version__), guest), f)
    # The block map is made afresh each run, from the image's metadata, under
    # the UI: it takes well under a second, so the guest starts booting as soon
    # as the UI is up (and a map cached by an older diskwatch is not reused).
    bmap.unlink(missing_ok=True)
    accel = choose_accel(accel, say)
    command = guest.qemu_shell_command("$nbd", accel)
    return DemoPlan(str(image), str(bmap), command, accel, guest)
