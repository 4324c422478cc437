"""Generate a block map by watching a libguestfs appliance read the disk.

Like virt-bmap, but with no side channel: the disk is served from this
process (``serve_in_thread``), so every read the appliance makes is seen
here, and the reads seen while an object is being examined belong to it.

Speed comes from letting the appliance walk many objects in one call
(``debug sh`` + ``xargs``) while telling the server where each object starts.
The "marker" export is a tiny ext4 filesystem built here: marker file *K*
holds the tag ``DWMARKF<K>`` in its only block, marker directory *K* holds an
entry named ``DWMARKD<K>``. The appliance runs ``cat M0 F0 M1 F1 ...`` (and
``ls -f`` for directories); reading marker K hits the server at a block whose
tag names K, and since the appliance reads synchronously and the server
handles both exports on one thread, every disk read that follows, up to the
next marker, belongs to object K. A pool of markers is reused in rounds: a
remount of the marker filesystem forgets its cached pages.

Metadata: each filesystem is first walked with ``find`` (stat of everything:
inodes and dentries stay cached), then the disk's page cache is dropped
(``drop_caches=1`` keeps inodes and dentries) and the directories are read,
with readahead off; then ``filefrag`` maps every file (extent trees, FAT
chains) and the files are read, with nothing dropped any more, so a file's
window holds its data and no metadata. File reads lying wholly inside ranges
the metadata walks read are counted (``metadata_reread_bytes``), not removed:
on filesystems with blocks under 4 KiB a small file can share a page with
metadata.

Files: one marker per file costs two NBD round trips per file. So files are
read ``FILES_PER_WINDOW`` to a marker window, by a few ``cat``s at once
(``xargs -P``), and the reads of a window are told apart by the files'
extents, which ``filefrag -v`` reported in the metadata walk (translated to
disk offsets through the partition's or LV's linear segments found in the
devices phase): a file's ranges are the reads the server saw in its window,
cut to its extents. filefrag only disambiguates; nothing the server did not
see is mapped. Bytes read in a window that lie in no extent of its files are
counted (``unmatched_bytes``), never attributed. A file whose extents are
unknown (filefrag failed, inline data, a non-linear LV, no translation) is
read in a window of its own as before; one whose window saw none of its
extents is read again alone (``files_alone``).

Partitions and LVs are mapped by reading, under their own marker window, the
first and last sector of each linear segment (``dmsetup table`` for LVs),
instead of reading them whole; a non-linear LV is read whole.

The drives are added as qcow2 overlays made here with ``qemu-img create -u``
over the NBD URIs: libguestfs's own read-only overlay is made inside
``add_drive`` while holding the GIL, and its ``qemu-img`` would wait forever
for this process's server thread. The appliance's writes go to the overlay;
the exports are read-only anyway.

Why this module is over 800 lines: it does one job, one appliance driven
through the phases above by one class (``_Generator``), whose steps share
its state (the appliance, the collector, the progress); what stands alone
is apart: the marker filesystem (``markers.py``) and the arithmetic on
ranges (``watch_ranges.py``).
"""

from __future__ import annotations

import base64
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import DiskwatchError
from ..events import Bus, Message, Progress
from ..files import check_output_path, replace_atomically
from ..sources.base import ReadOnly, Source
from .format import BmapEntry, merge_ranges, write_bmap
from .markers import DIR_POOL, FILE_POOL, MARKER_BLOCK, MarkerError, marker_image
from .watch_ranges import _inside, attribute, parse_filefrag, to_disk

__all__ = ["GenerateError", "GenerateResult", "Skipped", "choose_accel", "generate_bmap"]

# Files whose extents are known are read many to a marker window. A process
# start costs tens of ms under TCG, so each `cat` gets many files: measured
# on 10,000 files, 32 files per cat took 35 s, 512-1024 per cat 12-16 s.
# Two readers at once (xargs -P) measured no better or worse than one with
# one vCPU; two keep a request in flight while the other cat works.
FILES_PER_WINDOW = 1024  # files read under one marker when their extents are known
FILE_READERS = 2  # `cat`s reading at once (xargs -P)
FILES_PER_READER = FILES_PER_WINDOW // FILE_READERS  # files per `cat` (xargs -n)
PROGRESS_INTERVAL = 0.05  # at most 20 Progress events per second
MOUNT = "/sysroot"
MARKER_MOUNT = "/tmp/dwm"
INSTALL_HINT = "python3-guestfs is missing: apt-get install python3-guestfs libguestfs-tools"
#: ntfs-3g (FUSE) reads the partition through the block device's page cache,
#: whose readahead pulls neighbouring files' clusters into a file's window and
#: hides them from their own: measured 0.42 byte precision on a Windows-like disk.
NTFS_REFUSED = ("the watch method cannot map NTFS exactly (ntfs-3g's reads go through the "
                "block device's readahead, which lumps neighbouring files together): "
                "use --method metadata or auto")

#: the drives' labels in the appliance: the image (export "") and the markers
DRIVE_LABELS = {"": "dwdisk", "marker": "dwmarker"}
_SD_NAME = re.compile(r"(/dev/[sv]d[a-z]+)(\d*)")
_NOT_FILESYSTEMS = {"", "unknown", "swap", "LVM2_member", "crypto_LUKS"}


class GenerateError(DiskwatchError, RuntimeError):
    """Block-map generation failed; the message says what to do."""


@dataclass(frozen=True)
class Skipped:
    kind: str  # "filesystem", "file", "directory", "device"
    device: str
    path: str
    reason: str


@dataclass
class GenerateResult:
    out_path: str
    accel: str = ""  # "kvm" or "tcg"
    devices: int = 0
    partitions: int = 0
    lvs: int = 0
    filesystems: int = 0
    directories: int = 0
    files: int = 0
    entries: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    elapsed: float = 0.0
    #: seconds per phase: probe, markers, launch, devices, filesystems (listing
    #: them), metadata, directories, files, shutdown, write
    timings: dict[str, float] = field(default_factory=dict)
    #: bytes of file reads that lay wholly in ranges the metadata walk had read
    #: (re-read metadata, or data sharing a page with metadata); kept in the map
    metadata_reread_bytes: int = 0
    #: directories read on their own, after the batch saw none of their blocks
    directories_alone: int = 0
    #: disk reads outside any object's window inside a walk (should be 0)
    unattributed_bytes: int = 0
    #: markers that never reached the server (their object got no reads)
    missed_markers: int = 0
    #: files read many to a window, their reads told apart by their extents
    files_by_extents: int = 0
    #: bytes read inside such a window that lie in no extent of its files (not
    #: attributed to anything; should be 0)
    unmatched_bytes: int = 0
    #: bytes of those files' extents the server never saw read (should be 0)
    unseen_bytes: int = 0
    #: files read again on their own (their window saw none of their extents)
    files_alone: int = 0

    @property
    def objects(self) -> int:
        return self.devices + self.partitions + self.lvs + self.directories + self.files

    @property
    def objects_per_second(self) -> float:
        return self.objects / self.elapsed if self.elapsed > 0 else 0.0

    def summary(self) -> str:
        return (
            f"{self.devices} devices, {self.partitions} partitions, {self.lvs} LVs, "
            f"{self.filesystems} filesystems, {self.directories} directories, "
            f"{self.files} files; {self.entries} ranges written to {self.out_path} "
            f"in {self.elapsed:.1f} s ({self.objects_per_second:.0f} objects/s, {self.accel})"
            + (f"; {len(self.skipped)} skipped" if self.skipped else "")
        )


# --------------------------------------------------------------------------
# KVM or TCG

def _probe_kvm(timeout: float) -> bool:
    try:
        from ..demo.guest import probe_kvm
    except ImportError:  # the demo package is optional
        return False
    return probe_kvm(timeout)  # its answer is kept on disk for this boot of the host


def choose_accel(accel: str = "auto", timeout: float = 8.0) -> tuple[str, str]:
    """("kvm"|"tcg", why). "auto" respects LIBGUESTFS_BACKEND_SETTINGS=force_tcg,
    else probes KVM with a timeout (a guest that hangs counts as no KVM)."""
    if accel in ("kvm", "tcg"):
        return accel, f"{accel} (as asked)"
    if accel != "auto":
        raise GenerateError(f"unknown accelerator {accel!r}: use auto, kvm or tcg")
    if "force_tcg" in os.environ.get("LIBGUESTFS_BACKEND_SETTINGS", ""):
        return "tcg", "tcg (LIBGUESTFS_BACKEND_SETTINGS=force_tcg)"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg", "tcg (no usable /dev/kvm)"
    if _probe_kvm(timeout):
        return "kvm", "kvm (probe guest booted)"
    return "tcg", ("tcg (a KVM guest did not boot within the probe's time; KVM looks broken "
                   "here; the answer is kept until the host reboots)")


# --------------------------------------------------------------------------
# Watching the server


class _Collector:
    """The request subscriber (server thread): follows markers, files disk reads
    under the current object."""

    def __init__(self, tags: dict[int, tuple[str, int]], on_marker: Callable[[int], None]):
        self.tags = tags
        self.on_marker = on_marker
        self.kind = ""  # "F" or "D" during a walk; "" outside
        self.obj = -1  # current object (index in the batch); -1: none yet
        self.seen = 0  # markers seen in this batch
        self.reads: list[tuple[int, int, int]] = []  # (obj, offset, length) on the disk

    def reset(self, kind: str, obj: int = -1) -> list[tuple[int, int, int]]:
        reads, self.reads = self.reads, []
        self.kind, self.obj, self.seen = kind, obj, 0
        return reads

    def __call__(self, batch) -> None:
        for r in batch:
            if r.command != 0 or r.error:
                continue
            if r.export == "marker":
                if not self.kind:
                    continue
                tags = self.tags
                page = r.offset - r.offset % MARKER_BLOCK
                end = r.offset + r.length
                while page < end:
                    t = tags.get(page)
                    if t is not None and t[0] == self.kind:
                        self.obj = t[1]
                        self.seen += 1
                        self.on_marker(t[1])
                    page += MARKER_BLOCK
            else:
                self.reads.append((self.obj, r.offset, r.length))


class _Progress:
    def __init__(self, bus: Bus | None, t0: float):
        self.bus = bus
        self.t0 = t0
        self.last = 0.0
        self.lock = threading.Lock()
        self.phase = "launch"
        self.done = 0
        self.total = 0
        #: marker K -> (objects done once its window starts, the first of them)
        self.marks: list[tuple[int, str]] = []
        self.base = 0

    def marker(self, k: int) -> None:
        if k < len(self.marks):
            done, name = self.marks[k]
            self.publish(self.base + done, name)

    def publish(
        self,
        done: int | None = None,
        current: str = "",
        *,
        phase: str | None = None,
        force: bool = False,
        summary: str = "",
    ) -> None:
        if self.bus is None:
            return
        now = time.monotonic()
        with self.lock:
            if phase is not None:
                self.phase = phase
            if done is not None:
                self.done = done
            if not force and now - self.last < PROGRESS_INTERVAL:
                return
            self.last = now
            elapsed = now - self.t0
            ev = Progress(
                self.phase,
                current,
                self.done,
                max(self.total, self.done),
                self.done / elapsed if elapsed > 0 else 0.0,
                elapsed,
                summary,
            )
        self.bus.publish(ev)


# --------------------------------------------------------------------------
# The generator


def guestfs_problem() -> str:
    """Why libguestfs's Python module cannot be used here ("" if it can): not
    installed, or installed for Debian's python3 but invisible to this one."""
    try:
        import guestfs  # noqa: F401
    except ImportError as e:
        return _guestfs_hint(e)
    return ""


def _guestfs_hint(e: ImportError) -> str:
    import glob
    import sys

    installed = glob.glob("/usr/lib/python3/dist-packages/guestfs.py") + glob.glob(
        "/usr/lib/python3/dist-packages/libguestfsmod*.so")
    if not installed:
        return INSTALL_HINT
    if "libguestfsmod" in str(e) or getattr(e, "name", "") != "guestfs":
        return (f"python3-guestfs is installed but cannot be loaded by {sys.executable} "
                f"(Python {sys.version_info.major}.{sys.version_info.minor}): {e}; use Debian's "
                "/usr/bin/python3, or a venv made from it with --system-site-packages")
    return (f"python3-guestfs is installed (for Debian's /usr/bin/python3) but {sys.executable} "
            "does not see it: make the venv from /usr/bin/python3 with --system-site-packages")


def _import_guestfs():
    try:
        import guestfs
    except ImportError as e:
        raise GenerateError(_guestfs_hint(e)) from None
    return guestfs


class _Generator:
    def __init__(self, source: Source, out_path: str, bus: Bus | None, accel: str, verbose: bool,
                 only: set[str] | None = None):
        self.source = source
        #: map only these filesystems (devices), and no devices: the metadata
        #: method has mapped the rest (None: everything)
        self.only = only
        self.out_path = os.fspath(out_path)
        self.bus = bus
        self.accel = accel
        self.verbose = verbose
        self.t0 = time.monotonic()
        self.result = GenerateResult(self.out_path)
        self.entries: list[BmapEntry] = []
        self.progress = _Progress(bus, self.t0)
        self.g = None
        self.rs = None
        self.work = ""
        #: device -> its linear pieces on the disk (device start, disk start, length)
        self.translate: dict[str, list[tuple[int, int, int]]] = {}
        #: marker kinds ("F", "D") read since the marker filesystem was mounted
        self.markers_used: set[str] = set()
        self.kernel_names: dict[str, str] = {}  # libguestfs's /dev/sdX -> the kernel's

    # --- helpers ---------------------------------------------------------

    def say(self, text: str, level: str = "info") -> None:
        if self.bus is not None:
            self.bus.publish(Message(text, level=level))

    def timed(self, name: str, t: float) -> None:
        self.result.timings[name] = self.result.timings.get(name, 0.0) + time.monotonic() - t

    def barrier(self) -> None:
        """Wait until the server thread has published everything it handled."""
        self.rs.thread.call(lambda: None)

    def sh(self, script: str) -> str:
        return self.g.debug("sh", [script])

    def sh_bytes(self, script: str) -> bytes:
        """Run ``script`` and return its stdout as bytes (paths need not be UTF-8)."""
        out = self.sh(f"{{ {script} ; }} > /tmp/dw.out 2>&1; wc -c < /tmp/dw.out")
        size = int(out.strip() or 0)
        data = bytearray()
        chunk = 3 << 20  # a multiple of 3: base64 pieces concatenate
        for i in range((size + chunk - 1) // chunk):
            data += base64.b64decode(
                self.sh(f"dd if=/tmp/dw.out bs={chunk} skip={i} count=1 status=none | base64 -w0")
            )
        return bytes(data)

    def upload(self, data: bytes, name: str) -> str:
        local = os.path.join(self.work, name)
        with open(local, "wb") as f:
            f.write(data)
        # Not chrooted: the name is a path in the appliance itself.
        self.g.debug_upload(local, "/tmp/" + name, 0o644)
        return "/tmp/" + name

    # --- phases ----------------------------------------------------------

    def run(self) -> GenerateResult:
        guestfs = _import_guestfs()
        res = self.result
        t = time.monotonic()
        res.accel, why = choose_accel(self.accel)
        self.timed("probe", t)
        self.say(f"bmap: libguestfs with {why}")
        self.work = tempfile.mkdtemp(prefix="diskwatch-bmap-")
        try:
            t = time.monotonic()
            try:
                marker_img, tags = marker_image(self.work)
            except MarkerError as e:
                raise GenerateError(str(e)) from None
            self.marker_size = os.path.getsize(marker_img)
            self.timed("markers", t)
            self.collector = _Collector(tags, self.progress.marker)
            from ..server import serve_in_thread
            from ..sources.file import FileSource

            private = Bus()
            private.on_requests(self.collector)
            markers = FileSource(marker_img, readonly=True)
            src = self.source if not self.source.can_write else ReadOnly(self.source)
            # No memory budget and no handshake timeout here: with the
            # server's defaults the appliance's mount of the marker disk
            # failed now and then (cause not found yet, see issue 9's notes);
            # the only client is our own appliance.
            self.rs = serve_in_thread({"": src, "marker": markers}, private,
                                      conn_budget=None, total_budget=None,
                                      handshake_timeout=None)
            try:
                self.g = guestfs.GuestFS(python_return_dict=True)
                try:
                    self.launch(guestfs)
                    self.walk()
                finally:
                    t = time.monotonic()
                    try:
                        self.g.shutdown()
                    except Exception:  # noqa: BLE001 - best effort at the end
                        pass
                    self.g.close()
                    self.timed("shutdown", t)
            finally:
                self.rs.stop()
                markers.close()
            t = time.monotonic()
            res.entries = len(self.entries)
            if self.out_path:
                self.progress.publish(phase="write", force=True)
                # Written whole, then renamed: a map under the real name is never
                # half-written (diskwatch --bmap would take it as complete), and
                # never written through a link someone planted (files.py).
                with replace_atomically(self.out_path) as f:
                    write_bmap(f, self.entries, header=watch_header(res))
            self.timed("write", t)
        finally:
            shutil.rmtree(self.work, ignore_errors=True)
        res.elapsed = time.monotonic() - self.t0
        for s in res.skipped:
            self.say(f"bmap: skipped {s.kind} {s.device} {s.path}: {s.reason}", "warning")
        self.say("bmap: " + res.summary())
        self.progress.publish(res.objects, phase="done", force=True, summary=res.summary())
        return res

    def launch(self, guestfs) -> None:
        g = self.g
        t = time.monotonic()
        self.progress.publish(0, "appliance", phase="launch", force=True)
        if self.result.accel == "tcg":
            g.set_backend("direct")
            g.set_backend_settings(["force_tcg"])
        else:
            settings = [s for s in g.get_backend_settings() if s != "force_tcg"]
            g.set_backend_settings(settings)
        for name, size in (("", self.source.size), ("marker", None)):
            overlay = os.path.join(self.work, f"overlay{len(name)}.qcow2")
            size = size if size is not None else self.marker_size
            proc = subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", self.rs.uri_for(name),
                 "-F", "raw", overlay, str(size)], capture_output=True, text=True,
            )  # fmt: skip
            if proc.returncode != 0:
                raise GenerateError(
                    f"qemu-img create failed: {proc.stderr.strip()} (apt-get install qemu-utils)"
                )
            # The label names the drive in the appliance (/dev/disk/guestfs/LABEL):
            # the kernel's sdX order need not be the order libguestfs's API uses.
            g.add_drive_opts(overlay, format="qcow2", readonly=False, cachemode="unsafe",
                             label=DRIVE_LABELS[name])
        try:
            g.launch()
        except RuntimeError as e:
            raise GenerateError(
                f"libguestfs could not launch its appliance: {e} (try `libguestfs-test-tool`)"
            ) from None
        self.timed("launch", t)

    def walk(self) -> None:
        g, res = self.g, self.result
        t = time.monotonic()
        self.progress.publish(0, "", phase="devices", force=True)
        devices = g.list_devices()
        disk, marker_dev = devices[0], devices[-1]
        self.learn_kernel_names(disk, marker_dev)
        self.marker_dev = self.kdev(marker_dev)
        self.sh(
            f"mkdir -p {MARKER_MOUNT} && mount -o ro {self.marker_dev} {MARKER_MOUNT}"
            " && for f in /sys/block/*/queue/read_ahead_kb; do echo 0 > $f; done"
        )
        size = g.blockdev_getsize64(disk)
        if self.only is None:
            self.entries.append(BmapEntry(1, 0, size, "v", disk))
            res.devices = 1
        self.translate[disk] = [(0, 0, size)]
        parts = [p for p in g.list_partitions() if g.part_to_dev(p) == disk]
        lvs = g.lvs()
        for dev in parts + lvs:
            if self.only is not None and dev not in self.only:
                continue
            kind = "l" if dev in lvs else "p"
            try:
                ranges = self.map_device(dev, kind)
            except RuntimeError as e:
                res.skipped.append(Skipped("device", dev, "", str(e)))
                continue
            if self.only is None:
                self.entries += [BmapEntry(1, s, e, kind, dev) for s, e in ranges]
            if kind == "l":
                res.lvs += 1
            else:
                res.partitions += 1
        self.timed("devices", t)
        t = time.monotonic()
        filesystems = g.list_filesystems()
        self.timed("filesystems", t)
        for fs in sorted(filesystems):
            fstype = filesystems[fs]
            if fs.startswith(marker_dev) or fstype in _NOT_FILESYSTEMS:
                continue
            if self.only is not None and fs not in self.only:
                continue
            if fstype == "ntfs":
                res.skipped.append(Skipped("filesystem", fs, "", NTFS_REFUSED))
                continue
            try:
                g.mount_ro(fs, "/")
            except RuntimeError as e:
                res.skipped.append(Skipped("filesystem", fs, "", f"cannot mount {fstype}: {e}"))
                continue
            try:
                res.filesystems += 1
                self.map_filesystem(fs)
            finally:
                g.umount_all()

    def learn_kernel_names(self, disk: str, marker: str) -> None:
        """Which sdX the appliance's kernel gave our two drives. libguestfs's
        API translates its names (/dev/sda is the first drive added), but
        shell commands see the kernel's, and under load the kernel can name
        the appliance's own root disk sda (seen: "/dev/sdb already mounted
        on /")."""
        out = self.sh("readlink -f " + " ".join(
            f"/dev/disk/guestfs/{DRIVE_LABELS[n]}" for n in ("", "marker")))
        kdisk, kmarker = out.split()
        self.kernel_names = {disk: kdisk, marker: kmarker}

    def kdev(self, dev: str) -> str:
        """The kernel's name for a device libguestfs names ``dev`` (a disk or
        one of its partitions; LVs and others are unchanged)."""
        m = _SD_NAME.fullmatch(dev)
        if m and m.group(1) in self.kernel_names:
            return self.kernel_names[m.group(1)] + m.group(2)
        return dev

    def map_device(self, dev: str, kind: str) -> list[tuple[int, int]]:
        """Byte ranges of a partition or LV: probe each linear segment's ends.
        Linear segments are also kept in ``self.translate`` (device offset ->
        disk offset, for files' extents)."""
        size = self.g.blockdev_getsize64(dev)
        segments = [(0, size)]
        if kind == "l":
            table = self.sh(f"dmsetup table {shlex.quote(dev)}")
            segments = []
            for line in table.splitlines():
                f = line.split()
                if len(f) >= 3 and f[2] == "linear":
                    segments.append((int(f[0]) * 512, int(f[1]) * 512))
                elif f:
                    segments = []
                    break
        dd = "dd of=/dev/null bs=512 count=1 iflag=direct status=none"
        qdev = shlex.quote(self.kdev(dev))
        if segments:
            probes = []
            for start, length in segments:
                probes += [
                    f"{dd} if={qdev} skip={start // 512}",
                    f"{dd} if={qdev} skip={(start + length) // 512 - 1}",
                ]
            reads = self.watch(" && ".join(probes))
            if len(reads) == 2 * len(segments):
                pieces = [
                    (start, reads[2 * i][1], length) for i, (start, length) in enumerate(segments)
                ]
                if all(
                    reads[2 * i + 1][1] + reads[2 * i + 1][2] == disk + length
                    for i, (_, disk, length) in enumerate(pieces)
                ):
                    self.translate[dev] = pieces
                return merge_ranges(
                    [
                        (reads[2 * i][1], reads[2 * i + 1][1] + reads[2 * i + 1][2])
                        for i in range(len(segments))
                    ]
                )
        # Not linear, or the probes did not come back one read each: read it all.
        reads = self.watch(f"dd if={qdev} of=/dev/null bs=4M iflag=direct status=none")
        return merge_ranges([(o, o + n) for _, o, n in reads])

    def watch(self, script: str) -> list[tuple[int, int, int]]:
        """Run ``script``; return the disk reads it caused."""
        self.barrier()
        self.collector.reset("", 0)
        self.sh(script)
        self.barrier()
        return self.collector.reset("")

    def map_filesystem(self, fs: str) -> None:
        res = self.result
        # 1. Metadata: stat everything (dentries and inodes stay cached from
        # here on: drop_caches=1 only drops pages).
        t = time.monotonic()
        self.progress.publish(phase="filesystems", current=fs, force=True)
        listing = self.sh_bytes(
            f"echo 3 > /proc/sys/vm/drop_caches; cd {MOUNT} && find . -xdev -printf '%y %s %p\\0'"
        )
        self.barrier()
        meta = [(o, o + n) for _, o, n in self.collector.reset("")]
        self.timed("metadata", t)
        dirs: list[str] = []
        files: list[str] = []
        for rec in listing.split(b"\0"):
            if not rec:
                continue
            y, _, rest = rec.partition(b" ")
            _, _, p = rest.partition(b" ")
            path = p[1:].decode("utf-8", "surrogateescape") or "/"
            if y == b"d":
                dirs.append(path)
            elif y == b"f":
                files.append(path)
        self.progress.total += len(dirs) + len(files)

        # 2. Directories: their blocks come through the disk's page cache, so
        # drop it first and turn readahead off (it would read neighbours).
        t = time.monotonic()
        self.progress.publish(phase="directories", current=fs, force=True)
        self.sh(
            "for f in /sys/block/*/queue/read_ahead_kb; do echo 0 > $f; done; "
            f"echo 1 > /proc/sys/vm/drop_caches; blockdev --flushbufs {shlex.quote(self.kdev(fs))}"
        )
        self.markers_used.clear()
        self.walk_objects(fs, "d", dirs, DIR_POOL, "ls -f --")
        self.timed("directories", t)

        # 3. Extent maps / allocation chains of every file (filefrag), so a
        # file's window holds its data only (nothing is dropped after this),
        # and so the reads of many files in one window can be told apart.
        t = time.monotonic()
        self.progress.publish(phase="files", current=fs, force=True)
        paths = [(MOUNT + p).encode("utf-8", "surrogateescape") for p in files]
        remote = self.upload(b"".join(p + b"\0" for p in paths), "dw.files")
        self.barrier()
        self.collector.reset("")
        frag = self.sh_bytes(f"xargs -0 -r -a {remote} filefrag -v -b512 -- 2> /dev/null; true")
        self.barrier()
        meta += [(o, o + n) for _, o, n in self.collector.reset("")]
        segments = self.translate.get(fs)
        by_extents: list[tuple[str, list[tuple[int, int]]]] = []
        alone: list[str] = []
        for p, ext in zip(files, parse_filefrag(frag, paths), strict=True):
            disk = to_disk(ext, segments) if ext is not None and segments else None
            if disk is None:
                alone.append(p)
            else:
                by_extents.append((p, disk))
        self.timed("metadata", t)

        # 4. Files: their pages come through their own mapping, where
        # readahead stays inside the file: let it make big requests. Files
        # whose extents are known are read many to a window, several at once;
        # the others each in a window of its own.
        t = time.monotonic()
        self.sh(
            "for f in /sys/block/*/queue/read_ahead_kb; do echo 4096 > $f; done; "
            f"echo 0 > /sys/block/{os.path.basename(self.marker_dev)}/queue/read_ahead_kb"
        )
        merged_meta = merge_ranges(meta)
        self.walk_files_by_extents(fs, by_extents, merged_meta)
        if alone:
            self.walk_objects(fs, "f", alone, FILE_POOL, "cat --", merged_meta)
        self.timed("files", t)
        res.directories += len(dirs) - sum(
            1 for s in res.skipped if s.kind == "directory" and s.device == fs
        )
        res.files += len(files) - sum(1 for s in res.skipped if s.kind == "file" and s.device == fs)

    def fresh_markers(self, tag: str) -> None:
        """Make the ``tag`` markers readable from the disk again: each is used
        once per mount (a remount forgets the marker filesystem's pages without
        touching the disk's)."""
        if tag in self.markers_used:
            self.sh(f"umount {MARKER_MOUNT} && mount -o ro {self.marker_dev} {MARKER_MOUNT}")
            self.markers_used.clear()
        self.markers_used.add(tag)

    def walk_files_by_extents(
        self, fs: str, files: list[tuple[str, list[tuple[int, int]]]], meta: list[tuple[int, int]]
    ) -> None:
        """Read ``files`` (path, disk extents) FILES_PER_WINDOW to a marker
        window, FILE_READERS at once; a read in a window belongs to the files
        of that window whose extents it touches, cut to those extents. Only
        reads the server saw are kept; bytes matching no file are counted."""
        res = self.result
        per_window = FILES_PER_WINDOW
        windows = [files[i : i + per_window] for i in range(0, len(files), per_window)]
        for r in range(0, len(windows), FILE_POOL):
            rnd = windows[r : r + FILE_POOL]
            lst = bytearray()
            marks = []
            done = 0
            script = ["rm -f /tmp/dwb.*"]
            for k, w in enumerate(rnd):
                for p, _ in w:
                    lst += (MOUNT + p).encode("utf-8", "surrogateescape") + b"\0"
                marks.append((done + 1, w[0][0]))
                done += len(w)
                script.append(
                    f"cat {MARKER_MOUNT}/f{k:05d} > /dev/null; xargs -0 -r -n {FILES_PER_READER}"
                    f" -P {FILE_READERS} -a /tmp/dwb.{k:05d} cat -- > /dev/null"
                )
            remote = self.upload(bytes(lst), "dw.batch")
            script.insert(1, f"split -t '\\0' -l {per_window} -a 5 -d {remote} /tmp/dwb.")
            self.progress.marks = marks
            self.progress.base = self.progress.done
            self.fresh_markers("F")
            self.barrier()
            self.collector.reset("F")
            errors = self.sh_bytes("LC_ALL=C; export LC_ALL; " + "\n".join(script) + "\ntrue")
            self.barrier()
            seen = self.collector.seen
            reads = self.collector.reset("")
            res.missed_markers += len(rnd) - seen
            bad = self._errors(errors, "f")
            if self.verbose:
                self.say(f"bmap: {fs}: {done} files in {len(rnd)} windows: {len(reads)} reads")
            in_window: dict[int, list[tuple[int, int]]] = {}
            for obj, o, n in reads:
                if 0 <= obj < len(rnd):
                    in_window.setdefault(obj, []).append((o, n))
                else:
                    res.unattributed_bytes += n
            for k, w in enumerate(rnd):
                extents = sorted((s, e, i) for i, (_, ext) in enumerate(w) for s, e in ext)
                per, unmatched = attribute(in_window.get(k, []), extents)
                res.unmatched_bytes += unmatched
                for i, (p, ext) in enumerate(w):
                    if p in bad:
                        res.skipped.append(Skipped("file", fs, p, bad[p]))
                        continue
                    ranges = merge_ranges(per.get(i, []))
                    if not ranges and ext:
                        ranges = self.read_file_alone(fs, p, ext)
                        if ranges is None:
                            continue
                    self.add_file(fs, p, ext, ranges, meta)
            res.files_by_extents += done
            self.progress.publish(self.progress.base + done, force=True)

    def read_file_alone(
        self, fs: str, path: str, extents: list[tuple[int, int]]
    ) -> list[tuple[int, int]] | None:
        """Drop ``path``'s cached pages and read it under a window of its own;
        its reads cut to its extents, or None (skipped) if it cannot be read."""
        q = shlex.quote(MOUNT + path)
        try:
            reads = self.watch(
                f"LC_ALL=C dd if={q} iflag=nocache count=0 status=none && cat -- {q} > /dev/null"
            )
        except RuntimeError as e:
            self.result.skipped.append(Skipped("file", fs, path, str(e).strip()[-200:]))
            return None
        self.result.files_alone += 1
        per, unmatched = attribute([(o, n) for _, o, n in reads], [(s, e, 0) for s, e in extents])
        self.result.unmatched_bytes += unmatched
        return merge_ranges(per.get(0, []))

    def add_file(
        self,
        fs: str,
        path: str,
        extents: list[tuple[int, int]],
        ranges: list[tuple[int, int]],
        meta: list[tuple[int, int]],
    ) -> None:
        res = self.result
        for s, e in ranges:
            if meta and _inside(meta, s, e):
                res.metadata_reread_bytes += e - s
        res.unseen_bytes += sum(e - s for s, e in extents) - sum(e - s for s, e in ranges)
        self.entries += [BmapEntry(1, s, e, "f", fs, path) for s, e in ranges]

    def walk_objects(
        self,
        fs: str,
        kind: str,
        paths: list[str],
        pool: int,
        tool: str,
        meta: list[tuple[int, int]] | None = None,
    ) -> None:
        """Read ``paths`` with ``tool`` in rounds of ``pool``, a marker before each."""
        res = self.result
        tag = "F" if kind == "f" else "D"
        for b in range(0, len(paths), pool):
            batch = paths[b : b + pool]
            lst = bytearray()
            for k, p in enumerate(batch):
                marker = f"{MARKER_MOUNT}/{kind}{k:05d}"
                lst += (
                    marker.encode() + b"\0" + (MOUNT + p).encode("utf-8", "surrogateescape") + b"\0"
                )
            remote = self.upload(bytes(lst), "dw.batch")
            self.progress.marks = [(k + 1, p) for k, p in enumerate(batch)]
            self.progress.base = self.progress.done
            self.fresh_markers(tag)
            self.barrier()
            self.collector.reset(tag)
            errors = self.sh_bytes(f"LC_ALL=C xargs -0 -a {remote} {tool} 2>&1 > /dev/null ; true")
            self.barrier()
            seen = self.collector.seen
            reads = self.collector.reset("")
            res.missed_markers += len(batch) - seen
            bad = self._errors(errors, kind)
            if self.verbose:
                self.say(f"bmap: {fs}: {len(batch)} {kind}: {seen} markers, {len(reads)} reads")
            per: dict[int, list[tuple[int, int]]] = {}
            for obj, o, n in reads:
                if obj < 0:
                    res.unattributed_bytes += n
                    continue
                if meta and _inside(meta, o, o + n):
                    res.metadata_reread_bytes += n
                per.setdefault(obj, []).append((o, o + n))
            for k, p in enumerate(batch):
                if p in bad:
                    res.skipped.append(
                        Skipped("file" if kind == "f" else "directory", fs, p, bad[p])
                    )
                    continue
                ranges = merge_ranges(per.get(k, []))
                if not ranges and kind == "d":
                    # Its blocks shared a page with a directory read before
                    # it (filesystem blocks < 4 KiB): read it on its own, after
                    # BLKFLSBUF (which, unlike drop_caches, also drains the
                    # per-CPU page lists that keep fresh pages in the cache).
                    reads = self.watch(
                        f"blockdev --flushbufs {shlex.quote(self.kdev(fs))}; ls -f -- "
                        + shlex.quote(MOUNT + p)
                        + " > /dev/null"
                    )
                    ranges = merge_ranges([(o, o + n) for _, o, n in reads])
                    res.directories_alone += 1
                self.entries += [BmapEntry(1, s, e, kind, fs, p) for s, e in ranges]
            self.progress.publish(self.progress.base + len(batch), force=True)

    @staticmethod
    def _errors(output: bytes, kind: str) -> dict[str, str]:
        """Parse `cat: /sysroot/PATH: REASON` lines into path -> reason."""
        bad = {}
        prefix = ("cat: " if kind == "f" else "ls: ").encode()
        for line in output.splitlines():
            if not line.startswith(prefix):
                continue
            line = line[len(prefix) :]
            if kind == "d" and line.startswith(b"cannot open directory "):
                line = line[len(b"cannot open directory ") :].replace(b"'", b"")
            path, _, reason = line.rpartition(b": ")
            path = path.decode("utf-8", "surrogateescape")
            if path.startswith(MOUNT):
                bad[path[len(MOUNT) :] or "/"] = reason.decode("utf-8", "replace")
        return bad


def generate_bmap(
    source: Source,
    out_path: str | os.PathLike[str],
    *,
    bus: Bus | None = None,
    accel: str = "auto",
    verbose: bool = False,
) -> GenerateResult:
    """Map ``source`` (a whole disk) and write the block map to ``out_path``.

    Publishes ``Progress`` (at most 20 a second) and ``Message`` events on
    ``bus``. ``accel``: "auto" (probe KVM with a timeout, else TCG), "kvm" or
    "tcg". Raises ``GenerateError`` with a one-line message when it cannot
    run at all; unmountable filesystems and unreadable files are skipped and
    listed in the result."""
    out_path = os.fspath(out_path)
    check_output_path(out_path)  # said now, not after minutes of mapping
    return _Generator(source, out_path, bus, accel, verbose).run()


def watch_header(res: GenerateResult, only: set[str] | None = None) -> list[str]:
    """The map's header comment: which method mapped what."""
    what = "the filesystems " + ", ".join(sorted(only)) if only else "every filesystem"
    lines = [f"diskwatch block map: {what} mapped by the watch method (a libguestfs "
             f"appliance's reads, {res.accel})"]
    lines += [f"skipped {s.kind} {s.device} {s.path}: {s.reason}".replace("\n", " ")
              for s in res.skipped]
    return lines


def watch_entries(
    source: Source,
    filesystems: set[str],
    *,
    bus: Bus | None = None,
    accel: str = "auto",
    verbose: bool = False,
) -> tuple[list[BmapEntry], GenerateResult]:
    """The watch method for the named filesystems only (devices as libguestfs
    names them: /dev/sda3, /dev/vg0/lv): their directories and files, no
    device entries. Writes nothing."""
    gen = _Generator(source, "", bus, accel, verbose, only=set(filesystems))
    res = gen.run()
    return gen.entries, res
