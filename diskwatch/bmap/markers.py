"""The watch method's marker filesystem: a tiny ext4 image whose marker
file *K* holds the tag ``DWMARKF<K>`` in its only block and whose marker
directory *K* holds an entry named ``DWMARKD<K>`` (see ``generate.py`` for
how reading a marker tells the server which object the next reads belong
to). Built once with mkfs.ext4 -d and cached in ~/.cache/diskwatch.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

from ..errors import DiskwatchError

MARKER_BLOCK = 4096
FILE_POOL = 4096  # marker files: windows per round
DIR_POOL = 1024  # marker directories: directories per round
_TAG = re.compile(rb"DWMARK([FD])(\d{8})")


class MarkerError(DiskwatchError, RuntimeError):
    """The marker filesystem cannot be made or read."""


def build_marker_fs(
    path: str, work: str, files: int = FILE_POOL, dirs: int = DIR_POOL
) -> dict[int, tuple[str, int]]:
    """Make the marker ext4 image at ``path``; return block offset -> ("F"|"D", K)."""
    mkfs = shutil.which("mkfs.ext4") or "/sbin/mkfs.ext4"
    tree = os.path.join(work, "markers")
    os.mkdir(tree)
    for k in range(files):
        with open(os.path.join(tree, f"f{k:05d}"), "wb") as f:
            f.write(b"DWMARKF%08d\n" % k)
    for k in range(dirs):
        d = os.path.join(tree, f"d{k:05d}")
        os.mkdir(d)
        open(os.path.join(d, f"DWMARKD{k:08d}"), "wb").close()
    size = (files + dirs) * MARKER_BLOCK * 2 + (files + 2 * dirs) * 512 + (8 << 20)
    with open(path, "wb") as f:
        f.truncate(size)
    proc = subprocess.run(
        [mkfs, "-q", "-F", "-b", str(MARKER_BLOCK), "-O", "^has_journal,^inline_data",
         "-N", str(files + 2 * dirs + 64), "-E", "nodiscard", "-L", "dwmarkers", "-d", tree, path],
        capture_output=True, text=True,
    )  # fmt: skip
    shutil.rmtree(tree, ignore_errors=True)
    if proc.returncode != 0:
        raise MarkerError(
            f"mkfs.ext4 failed making the marker filesystem: "
            f"{proc.stderr.strip()[-200:]} (apt-get install e2fsprogs)"
        )
    return scan_markers(path, files + dirs)


def scan_markers(path: str, count: int) -> dict[int, tuple[str, int]]:
    """Block offset -> ("F"|"D", K) for every marker tag in the image at ``path``."""
    tags: dict[int, tuple[str, int]] = {}
    with open(path, "rb") as f:
        data = f.read()
    for m in _TAG.finditer(data):
        tags[m.start() - m.start() % MARKER_BLOCK] = (m.group(1).decode(), int(m.group(2)))
    found = len(set(tags.values()))
    if found != count:
        raise MarkerError(f"marker filesystem {path} holds {found} of {count} markers")
    return tags


def marker_image(work: str) -> tuple[str, dict[int, tuple[str, int]]]:
    """The marker image (cached in ~/.cache/diskwatch: it costs seconds to
    build and never changes) and its tags."""
    count = FILE_POOL + DIR_POOL
    cache = os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "diskwatch"
    )
    cached = os.path.join(cache, f"markers-v1-{FILE_POOL}-{DIR_POOL}.img")
    try:
        return cached, scan_markers(cached, count)
    except (OSError, MarkerError):
        pass
    try:
        os.makedirs(cache, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix="markers-", dir=cache)
        try:
            img = os.path.join(tmp, "markers.img")
            tags = build_marker_fs(img, tmp)
            os.replace(img, cached)  # atomic: a concurrent builder's copy is as good
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cached, tags
    except OSError:  # no writable cache: build it for this run only
        img = os.path.join(work, "markers.img")
        return img, build_marker_fs(img, work)
