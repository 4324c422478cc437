"""Reads of a read-only image in a qemu format straight from its files,
where qemu itself says the bytes are.

Why: every read through the private qemu-storage-daemon costs a round trip
to a third process (diskwatch -> daemon -> file). On a 2-core machine fio,
diskwatch and the daemon compete for the cores, and 4 KiB random reads of a
qcow2 through diskwatch made 0.58x of what fio got from qemu-nbd directly.
Yet most of a qcow2 (or vdi, vhdx, vmdk...) is plain data clusters: a guest
read of one is a read of the image file at an offset only qemu knows.

So qemu is asked once: ``qemu-img map --output=json`` lists, for the whole
disk, which ranges are zero, and for data stored uncompressed and
unencrypted, the host offset and the depth in the backing chain of the file
that holds it. Ranges the map marks as data at an offset are then served
from an mmap of that file (zero-copy, as for a raw image), zero ranges from
zero pages, and everything else (compressed or encrypted clusters, layers
that are not a plain local file, an external data file, a map that is not
ready yet) still goes to the daemon. No byte of the format is parsed here:
the offsets are qemu's.

When this is right
------------------
The map describes the image as it is on disk when it is made, and stays
right for every byte the guest has not changed since: qemu formats write a
cluster in place once it is allocated, a cluster moves or is freed only when
the guest writes, zeroes or trims it, and backing files are opened read-only.
So every write, zero and trim that diskwatch sends to the daemon first marks
its range (rounded out to the image's cluster size, at least 64 KiB) in a
bitmap, from the moment the daemon starts, before the map is even ready;
those ranges are read through the daemon for the rest of the session (its
metadata cache, not the file, knows where they are now). With ``-r`` or
``--snapshot`` the daemon opens the image read-only and nothing is ever
marked. The daemon holds qemu's image locks, so no other qemu process can
write the image (or its backing files) while we serve it. Locks do not stop
a file being renamed over a path (a converted copy moved in place): only
files the daemon has open (same inode) are read, and a path that names
another file once ``qemu-img map`` is done drops the map.

The map is made in a thread when the source opens, so a large image does
not delay the start: until it is ready every read goes to the daemon. Its
memory is bounded: 17 bytes per extent, at most ``MAX_EXTENTS`` extents
(a map with more is dropped, with a log line, and the daemon serves all),
and a bitmap of one byte per granule (the cluster size, raised so that the
bitmap stays under 16 MiB).
"""

from __future__ import annotations

import bisect
import json
import logging
import mmap
import os
import shutil
import stat
import subprocess
import threading
from array import array
from collections.abc import Callable

from .qemuimg import qemu_img_info

log = logging.getLogger("diskwatch.sources.hostmap")

MAX_EXTENTS = 1_000_000  # 17 MB of map at most
MAX_GRANULES = 1 << 24  # the written-ranges bitmap: 16 MiB at most
MAP_TIMEOUT = 300.0  # qemu-img map of a very fragmented, very large image
#: formats whose map offsets are plain bytes of the layer's own file (qcow
#: v1 and luks may encrypt; vmdk is checked for a single extent in the file)
PLAIN_FORMATS = {"raw", "qcow2", "qed", "vdi", "vpc", "vhdx", "vmdk"}

ASK = 0  # the daemon serves this range
ZERO = 1  # reads as zeroes
FILE = 2  # FILE + k: data in layer k's file at hosts[i] + (offset - starts[i])

_ZEROS_MAX = 32 << 20  # the largest read the server accepts is 32 MiB (+ slack)
_zeros: memoryview | None = None


def _zero_view(length: int):
    """A read-only buffer of zeroes (the kernel's zero page: no memory)."""
    global _zeros
    if _zeros is None:
        _zeros = memoryview(mmap.mmap(-1, _ZEROS_MAX, prot=mmap.PROT_READ))
    return _zeros[:length]


def layer_files(chain: list[dict]) -> list[str | None]:
    """For each image of ``qemu-img info --backing-chain`` (top first): the
    local file whose bytes the map's offsets at that depth refer to, or
    None when they cannot be read directly."""
    files: list[str | None] = []
    for image in chain:
        name = image.get("filename", "")
        fmt = image.get("format")
        specific = (image.get("format-specific") or {}).get("data") or {}
        ok = (fmt in PLAIN_FORMATS and not image.get("encrypted")
              and "encrypt" not in specific and not specific.get("data-file")
              and not name.startswith("json:") and "://" not in name)
        if ok and fmt == "vmdk":
            extents = specific.get("extents") or []
            ok = (len(extents) == 1 and os.path.abspath(extents[0].get("filename", ""))
                  == os.path.abspath(name))
        if ok:
            try:
                ok = stat.S_ISREG(os.stat(name).st_mode)
            except OSError:
                ok = False
        files.append(name if ok else None)
    return files


class HostMap:
    """Sorted extents of the disk: starts[i] .. starts[i+1] is of kind
    kinds[i] (ASK, ZERO or FILE + layer), at hosts[i] in that layer's file."""

    def __init__(self, size: int, files: list[str | None], written: bytearray,
                 granule: int, allowed: set[tuple[int, int]] | None = None,
                 copy: bool = False):
        self.size = size
        #: answer with copies, not views of the files (a writable image)
        self.copy = copy
        self.files = files
        #: (st_dev, st_ino) of the files qemu has open: a path may name
        #: another file by now (renamed over), which qemu does not serve
        self.allowed = allowed
        self.written = written  # one byte per granule: 1 once the guest changed it
        self.granule = granule
        self.starts = array("q")
        self.hosts = array("q")
        self.kinds = bytearray()
        self._fds: list[int] = []
        self._fd_of: list[int] = []  # per layer: its fd, or -1
        self._maps: list = []
        self.views: list = []
        self.ready = False
        self.served = 0  # reads served from the map (for tests and the log)

    # --- building -------------------------------------------------------------

    def _open_layers(self) -> list[int]:
        """Map each usable layer file; returns their sizes (-1: unusable)."""
        sizes = []
        for name in self.files:
            view, n, fd = None, -1, -1
            if name is not None:
                try:
                    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as e:
                    log.debug("%s: not read directly: %s", name, e)
                else:
                    self._fds.append(fd)
                    st = os.fstat(fd)
                    n = st.st_size
                    if self.allowed is not None and (st.st_dev, st.st_ino) not in self.allowed:
                        log.info("%s: not the file qemu opened (replaced?): read through "
                                 "qemu", name)
                        n = 0
                    if n > 0:
                        m = mmap.mmap(fd, n, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
                        self._maps.append(m)
                        view = memoryview(m)
                    else:
                        n = -1
            self.views.append(view)
            self._fd_of.append(fd)
            sizes.append(n)
        return sizes

    def add(self, start: int, length: int, kind: int, host: int) -> None:
        """Append the next extent, merging it with the last when they
        continue each other."""
        starts = self.starts
        if starts:
            last = len(starts) - 1
            prev_kind = self.kinds[last]
            if prev_kind == kind and (kind < FILE or self.hosts[last] + (start - starts[last])
                                      == host):
                return
        if len(starts) >= MAX_EXTENTS:
            raise OverflowError
        starts.append(start)
        self.hosts.append(host)
        self.kinds.append(kind)

    def load(self, lines) -> None:
        """Read ``qemu-img map --output=json`` line by line (one extent per
        line; never the whole output in memory at once)."""
        sizes = self._open_layers()
        pos = 0
        for line in lines:
            text = line.strip().lstrip("[").rstrip(",]").strip()
            if not text:
                continue
            e = json.loads(text)
            start, length = int(e["start"]), int(e["length"])
            if start != pos or length <= 0:
                raise ValueError(f"map not contiguous at {start} (expected {pos})")
            kind, host = ASK, 0
            if e.get("zero"):
                kind = ZERO
            elif e.get("data") and "offset" in e:
                depth, host = int(e.get("depth", 0)), int(e["offset"])
                if (0 <= depth < len(sizes) and sizes[depth] >= 0
                        and host >= 0 and host + length <= sizes[depth]):
                    kind = FILE + depth
            self.add(start, length, kind, host)
            pos = start + length
        if pos != self.size:
            raise ValueError(f"map ends at {pos}, the disk at {self.size}")
        self.starts.append(self.size)  # sentinel: the end of the last extent
        self.hosts.append(0)
        self.kinds.append(ASK)
        self.ready = True

    # --- reading (any thread; the server's loop calls view_for) ----------------

    def view_for(self, offset: int, length: int):
        """A buffer of [offset, offset+length) when one extent holds it all,
        else None (the daemon reads it)."""
        if not self.ready:
            return None
        starts = self.starts
        i = bisect.bisect_right(starts, offset) - 1
        if starts[i + 1] < offset + length:
            return None
        kind = self.kinds[i]
        if kind == ASK:
            return None
        g = self.granule
        if self.written.find(1, offset // g, (offset + length - 1) // g + 1) >= 0:
            return None
        if kind >= FILE:
            host = self.hosts[i] + offset - starts[i]
            if self.copy:
                # Not a view: a reply waits in the queue while later requests
                # run, and a trim then a write elsewhere may reuse this host
                # cluster for another range of the disk.
                data = os.pread(self._fd_of[kind - FILE], length, host)
                if len(data) != length:
                    return None
            else:
                data = self.views[kind - FILE][host:host + length]
        elif length <= _ZEROS_MAX:
            data = _zero_view(length)
        else:
            return None
        self.served += 1
        return data

    def pread(self, offset: int, length: int) -> bytes | None:
        """The bytes of a range that may span extents, or None if any part
        of it must come from the daemon."""
        if not self.ready or length <= 0:
            return None
        g = self.granule
        if self.written.find(1, offset // g, (offset + length - 1) // g + 1) >= 0:
            return None
        starts, kinds, hosts = self.starts, self.kinds, self.hosts
        i = bisect.bisect_right(starts, offset) - 1
        end = offset + length
        parts = []
        while offset < end:
            kind = kinds[i]
            n = min(starts[i + 1], end) - offset
            if kind >= FILE:
                # pread, not the mmap: a file cut short under us is an
                # error here, not a SIGBUS
                host = hosts[i] + offset - starts[i]
                data = os.pread(self._fd_of[kind - FILE], n, host)
                if len(data) != n:
                    return None
                parts.append(data)
            elif kind == ZERO:
                parts.append(bytes(n))
            else:
                return None
            offset += n
            i += 1
        self.served += 1
        return b"".join(parts)

    def check_files(self) -> None:
        """Each layer's path still names the file mapped (qemu-img map read
        the path: a file renamed over it meanwhile would be another map)."""
        for name, fd in zip(self.files, self._fd_of, strict=True):
            if name is not None and fd >= 0:
                st, now = os.fstat(fd), os.stat(name)
                if (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino):
                    raise ValueError(f"{name} was replaced while it was mapped")

    def extents_served_directly(self) -> int:
        """Bytes of the disk that reads take from the files (for the log)."""
        starts, kinds = self.starts, self.kinds
        return sum(starts[i + 1] - starts[i] for i in range(len(starts) - 1)
                   if kinds[i] != ASK)

    def close(self) -> None:
        self.ready = False
        for view in self.views:
            if view is not None:
                view.release()
        for m in self._maps:
            try:
                m.close()
            except BufferError:
                pass  # a reply still holds a slice; the map goes with it
        for fd in self._fds:
            os.close(fd)
        self._fds, self._maps, self.views, self._fd_of = [], [], [], []


class HostMapper:
    """Makes a HostMap for an image in a thread; ``map`` is None until it
    is ready (and stays None if it cannot be made)."""

    def __init__(self, path: str, fmt: str, size: int, info: dict,
                 qemu_files: Callable[[], set[tuple[int, int]]] | None = None,
                 writable: bool = False):
        """``qemu_files``: the (st_dev, st_ino) of every file the daemon has
        open; only those are read directly. ``writable``: the daemon may
        write the image (reads are answered with copies)."""
        self.path = path
        self.writable = writable
        self.qemu_files = qemu_files
        self.fmt = fmt
        self.size = size
        granule = max(64 * 1024, int(info.get("cluster-size") or 0))
        while size // granule >= MAX_GRANULES:
            granule *= 2
        self.granule = granule
        # A read-only daemon is never written: no bitmap to hold (up to 16 MiB)
        self.written = bytearray(size // granule + 1) if writable else bytearray()
        self.map: HostMap | None = None
        self.failure: str | None = None
        self._proc: subprocess.Popen | None = None
        self._closed = False
        self._stopped = False
        self._lock = threading.Lock()
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="diskwatch-qemu-img-map")
        self._thread.start()

    def _run(self) -> None:
        hm = None
        try:
            files = layer_files(qemu_img_info(self.path, self.fmt, chain=True))
            if not any(files):
                raise ValueError("no layer of the image is a plain local file")
            allowed = self.qemu_files() if self.qemu_files is not None else None
            hm = HostMap(self.size, files, self.written, self.granule, allowed,
                         copy=self.writable)
            qemu_img = shutil.which("qemu-img") or "qemu-img"
            cmd = [qemu_img, "map", "--output=json", "-U", "-f", self.fmt,
                   os.path.abspath(self.path)]
            with self._lock:
                if self._closed:
                    return
                self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True)
            timer = threading.Timer(MAP_TIMEOUT, self._proc.kill)
            timer.start()
            try:
                hm.load(self._proc.stdout)
            finally:
                timer.cancel()
                if self._proc.poll() is None:
                    self._proc.kill()
                err = self._proc.stderr.read().strip()
                status = self._proc.wait()
            if status != 0:
                raise ValueError(f"qemu-img map exited with {status}: {err[-200:]}")
            hm.check_files()
        except OverflowError:
            self._give_up(hm, f"more than {MAX_EXTENTS} extents")
        except (OSError, ValueError, KeyError) as e:
            self._give_up(hm, str(e))
        else:
            with self._lock:
                if self._closed:
                    hm.close()
                    return
                hm.ready = not self._stopped
                self.map = hm
            if log.isEnabledFor(logging.INFO):  # a pass over every extent, for this line only
                log.info("%s: %d extents mapped; reads of %d of %d bytes go straight to the "
                         "image's files", self.path, len(hm.starts) - 1,
                         hm.extents_served_directly(), self.size)
        finally:
            self.done.set()

    def changed(self, offset: int, length: int) -> None:
        """The guest is about to write, zero or trim this range: from now on
        it is read through the daemon. Called before the request is sent
        (never for a read-only daemon: writes are refused above it)."""
        if length > 0 and self.writable:
            g = self.granule
            first, last = offset // g, (offset + length - 1) // g
            self.written[first:last + 1] = b"\x01" * (last - first + 1)

    def stop_serving(self) -> None:
        """The daemon is gone: every read fails as it does, none from the
        map (a half-working disk would be harder to understand)."""
        with self._lock:  # not between _run's look at _stopped and its publishing
            self._stopped = True
            m = self.map
        if m is not None:
            m.ready = False

    def _give_up(self, hm: HostMap | None, why: str) -> None:
        if hm is not None:
            hm.close()
        self.failure = why
        log.info("%s: every read goes through qemu-storage-daemon (%s)", self.path, why)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            proc, hm, self.map = self._proc, self.map, None
        if proc is not None and proc.poll() is None:
            proc.kill()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if hm is not None:
            hm.close()


__all__ = ["HostMap", "HostMapper", "layer_files", "MAX_EXTENTS"]
