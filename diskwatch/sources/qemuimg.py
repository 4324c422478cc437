"""``qemu-img info``: what qemu says an image is (its format, its backing
chain). Asked by the qemu source to choose a format and by the host map
(hostmap.py) to find the image's layers; neither imports the other for it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess

from .base import SourceError

INFO_TIMEOUT = 30.0


def qemu_img_info(path: str, fmt: str | None = None, chain: bool = False):
    """``qemu-img info --output=json`` of an image (probed when fmt is None);
    with ``chain``, the list for the image and its backing files, top first.
    The path is made absolute so that qemu never reads a protocol prefix
    ("nbd:", "json:") out of a file name."""
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise SourceError(errno.ENOENT, "qemu-img is missing: apt-get install qemu-utils "
                          "(it reads qcow2, vmdk, vdi and other image formats)")
    cmd = [qemu_img, "info", "--output=json", "-U"]
    if fmt:
        cmd += ["-f", fmt]
    if chain:
        cmd.append("--backing-chain")
    cmd.append(os.path.abspath(path))
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=INFO_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise SourceError(errno.ETIMEDOUT, f"qemu-img info {path} took over "
                          f"{INFO_TIMEOUT:.0f} s") from None
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise SourceError(errno.EINVAL, f"{path}: qemu cannot open it"
                          f"{' as ' + fmt if fmt else ''}: {last}")
    return json.loads(r.stdout)
