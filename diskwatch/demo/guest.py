"""Build the demo guest: a small bootable Linux disk image, and boot it.

The image is made without root mounts or loop devices: sfdisk writes the
partition table into a plain file and ``mkfs.ext4 -d TREE -E offset=N`` builds
the root filesystem from a directory tree straight into the partition. The
root holds busybox-static (with applet symlinks) and an ``/sbin/init`` shell
script (``init.sh`` beside this module) that reads a few files, writes records
into a log file with ``sync`` after each, prints a marker line and powers off.
Debian's kernel and initrd from /boot boot it.
"""

from __future__ import annotations

import json
import os
import random
import select
import shlex
import shutil
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..errors import DiskwatchError

__all__ = [
    "GuestImage",
    "MissingToolError",
    "LOOP_INIT",
    "Partition",
    "build_guest_image",
    "find_kernel",
    "make_partition_table",
    "mkfs_ext4_at",
    "probe_kvm",
    "require_tool",
]

SECTOR = 512
MiB = 1024 * 1024
#: Printed on the guest console just before it powers off.
MARKER = "DISKWATCH-DEMO-DONE"
#: The init of the guest that never stops by itself (``init-loop.sh``): every
#: second it reads the data files, writes a record into /var/log/demo.log,
#: syncs and prints ``diskwatch-loop: tick N``; a line ``stop`` on its console
#: ends it. Boot with ``qemu_command(init=LOOP_INIT)``.
LOOP_INIT = "/sbin/init-loop"
#: the churn guest's scanned tree: SCAN_DIRS directories of SCAN_FILES_PER_DIR files
SCAN_ROOT = "/opt/av-test"
SCAN_DIRS = 12
SCAN_FILES_PER_DIR = 30
#: The log the churn guest's init creates at boot (2,000,000 bytes, more
#: than the 1 MiB of unnamed writes that start an automatic remap) and
#: appends a record to every other churn pass.
CREATED_LOG = "/var/log/updates.log"
#: The churn guest's temporary file: made after the scan (64 KiB), kept 3 s,
#: deleted: no map made before boot or after has it, a live remap in between does.
TEMP_FILE = "/var/log/av/quarantine.tmp"
#: The root partition starts 1 MiB in, as every modern partitioner aligns it.
PARTITION_START = 1 * MiB

# tool -> Debian package that provides it
TOOL_PACKAGES = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "sfdisk": "fdisk",
    "mkfs.ext4": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "mkfs.vfat": "dosfstools",
    "mcopy": "mtools",
    "mmd": "mtools",
    "busybox": "busybox-static",
}

_SBIN = ("/usr/sbin", "/sbin")


class MissingToolError(DiskwatchError, RuntimeError):
    """A program or file the guest needs is missing; the message names the Debian package."""


def require_tool(name: str) -> str:
    """Return the path of ``name``, or raise MissingToolError naming its Debian package."""
    path = shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SBIN))
    if path is None:
        package = TOOL_PACKAGES.get(name, name)
        raise MissingToolError(f"{name} not found: install it with `apt-get install {package}`")
    return path


def _run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run a build step; a failure raises with the tool's own one-line complaint."""
    proc = subprocess.run(argv, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip().splitlines()
        detail = err[-1] if err else f"exit status {proc.returncode}"
        raise RuntimeError(f"{Path(argv[0]).name} failed: {detail}")
    return proc


# --------------------------------------------------------------------------
# Disk building blocks (also used by the test fixtures)


@dataclass(frozen=True)
class Partition:
    """One partition as libguestfs would name it, with its place on the disk in bytes."""

    device: str  # e.g. /dev/sda1 (libguestfs names the first disk /dev/sda)
    offset: int
    length: int
    fstype: str  # ext4, vfat, LVM2_member, ...


def make_partition_table(
    path: str | os.PathLike[str], label: str, sizes: list[tuple[int | None, str]]
) -> list[tuple[int, int]]:
    """Write a partition table with sfdisk; return (offset, length) in bytes of each partition.

    ``label`` is ``dos`` or ``gpt``; ``sizes`` lists (size in bytes or None for
    "the rest", sfdisk type). Partitions are 1 MiB aligned, as sfdisk does.
    """
    sfdisk = require_tool("sfdisk")
    lines = [f"label: {label}", ""]
    for i, (size, ptype) in enumerate(sizes):
        spec = [f"type={ptype}"]
        if i == 0:
            spec.insert(0, f"start={PARTITION_START // SECTOR}")
        if size is not None:
            spec.append(f"size={size // SECTOR}")
        if label == "dos" and i == 0:
            spec.append("bootable")
        lines.append(", ".join(spec))
    _run(
        [sfdisk, "--quiet", "--no-reread", "--no-tell-kernel", "--wipe", "never", os.fspath(path)],
        input="\n".join(lines) + "\n",
    )
    table = json.loads(_run([sfdisk, "--json", os.fspath(path)]).stdout)["partitiontable"]
    sector = table.get("sectorsize", SECTOR)
    return [(p["start"] * sector, p["size"] * sector) for p in table["partitions"]]


def mkfs_ext4_at(
    image: str | os.PathLike[str],
    offset: int,
    length: int,
    tree: str | os.PathLike[str] | None,
    *,
    block_size: int = 4096,
    label: str = "",
    extra: list[str] | None = None,
) -> None:
    """Make an ext4 filesystem filling ``length`` bytes at ``offset`` of ``image``, from ``tree``."""
    mkfs = require_tool("mkfs.ext4")
    argv = [mkfs, "-q", "-F", "-b", str(block_size), "-E", f"offset={offset},nodiscard"]
    if label:
        argv += ["-L", label]
    if tree is not None:
        argv += ["-d", os.fspath(tree)]
    argv += list(extra or [])
    argv += [os.fspath(image), str(length // block_size)]
    # A fixed time keeps the image reproducible; mke2fs reads it from the environment.
    _run(argv, env={**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000"})


# --------------------------------------------------------------------------
# Kernel


def find_kernel(boot: str | os.PathLike[str] = "/boot") -> tuple[Path, Path]:
    """Return (vmlinuz, initrd) of the newest kernel in ``boot`` that has both."""
    boot = Path(boot)
    pairs = []
    for kernel in boot.glob("vmlinuz-*"):
        version = kernel.name.removeprefix("vmlinuz-")
        initrd = boot / f"initrd.img-{version}"
        if initrd.exists() and os.access(kernel, os.R_OK) and os.access(initrd, os.R_OK):
            pairs.append((_version_key(version), kernel, initrd))
    if not pairs:
        raise MissingToolError(
            f"no readable vmlinuz-*/initrd.img-* pair in {boot}: "
            "install one with `apt-get install linux-image-amd64`"
        )
    _, kernel, initrd = max(pairs)
    return kernel, initrd


def _version_key(version: str) -> tuple[object, ...]:
    parts: list[object] = []
    for chunk in version.replace("-", ".").split("."):
        parts.append((0, int(chunk), "") if chunk.isdigit() else (1, 0, chunk))
    return tuple(parts)


# Modules a virtio disk with ext4 (metadata_csum needs crc32c) needs, with their
# dependencies from modules.dep; the minimal initramfs loads them in this order.
_MINIMAL_MODULES = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4")


def build_minimal_initrd(kernel: Path, out: Path, modules_root: str = "/lib/modules") -> Path:
    """Write a small uncompressed initramfs for ``kernel``: busybox, a few modules, /init.

    Debian's own initrd works too but costs most of the boot time under TCG.
    """
    version = kernel.name.removeprefix("vmlinuz-")
    moddir = Path(modules_root) / version
    depfile = moddir / "modules.dep"
    if not depfile.exists():
        raise MissingToolError(
            f"{depfile} missing: install the kernel's modules with `apt-get install linux-image-{version}`"
        )
    deps: dict[str, list[str]] = {}
    for line in depfile.read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[Path(mod).name.split(".ko")[0]] = [mod, *rest.split()]
    by_path = {v[0]: k for k, v in deps.items()}
    order: list[str] = []

    def visit(name: str) -> None:
        if name not in deps:
            return  # built into the kernel
        for dep in deps[name][1:]:
            visit(by_path[dep])
        if deps[name][0] not in order:
            order.append(deps[name][0])

    for name in _MINIMAL_MODULES:
        visit(name)
    if any(m.endswith((".xz", ".zst", ".gz")) for m in order):
        raise RuntimeError(f"compressed kernel modules in {moddir}: use initrd='debian'")

    busybox = require_tool("busybox")
    init = resources.files("diskwatch.demo").joinpath("initramfs-init.sh").read_bytes()
    entries: list[tuple[str, int, bytes, int]] = []  # name, mode, data, rdev (major, minor)
    for d in ("bin", "dev", "proc", "sys", "root", "lib", "lib/modules"):
        entries.append((d, 0o040755, b"", 0))
    entries.append(("dev/console", 0o020600, b"", (5 << 8) | 1))
    entries.append(("bin/busybox", 0o100755, Path(busybox).read_bytes(), 0))
    entries.append(("bin/sh", 0o120777, b"busybox", 0))
    entries.append(("init", 0o100755, init, 0))
    names = []
    for mod in order:
        name = Path(mod).name
        names.append(name)
        entries.append((f"lib/modules/{name}", 0o100644, (moddir / mod).read_bytes(), 0))
    entries.append(("modules.order", 0o100644, ("\n".join(names) + "\n").encode(), 0))

    def pad(n: int) -> bytes:
        return b"\0" * (-n % 4)

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:
        for ino, (name, mode, data, rdev) in enumerate([*entries, ("TRAILER!!!", 0, b"", 0)], 1):
            raw = name.encode() + b"\0"
            fields = [ino, mode, 0, 0, 1, 1700000000, len(data), 0, 0, rdev >> 8, rdev & 0xFF,
                      len(raw), 0]  # fmt: skip
            header = b"070701" + b"".join(b"%08X" % v for v in fields)
            f.write(header + raw + pad(len(header) + len(raw)) + data + pad(len(data)))
    return out


# --------------------------------------------------------------------------
# The guest image


@dataclass
class GuestImage:
    """A built demo guest and what its init script does to its disk.

    Paths in ``reads``, ``writes`` and ``files`` are inside the root
    filesystem, which libguestfs names ``device`` (``/dev/sda1``).
    """

    path: Path
    size: int
    partition_offset: int
    partition_length: int
    kernel: Path
    initrd: Path
    churn: bool
    #: files the guest reads while booting (init script, busybox, data files)
    reads: list[str]
    #: files the guest writes into (in place, with sync after each write)
    writes: list[str]
    #: the large file the churn loop re-reads with O_DIRECT (None without churn)
    big_file: str | None
    #: how many writes go to each file in ``writes`` (per file)
    write_counts: dict[str, int]
    #: every regular file in the root filesystem -> size in bytes
    files: dict[str, int]
    #: every directory (``/`` excluded, ``/lost+found`` included)
    dirs: list[str] = field(default_factory=list)
    #: files the init creates while it runs (absent from the image, so from
    #: any map made before boot): only a live remap names them
    created: list[str] = field(default_factory=list)
    #: files the init creates and deletes while it runs (seconds apart)
    temporary: list[str] = field(default_factory=list)
    #: every symlink (busybox applets) -> its target
    symlinks: dict[str, str] = field(default_factory=dict)
    #: the churn guest's "antivirus" reads every file of this tree, directory
    #: by directory, once at boot (None without churn)
    scan_root: str | None = None
    #: the files of that tree
    scan_files: list[str] = field(default_factory=list)
    marker: str = MARKER
    device: str = "/dev/sda1"
    fstype: str = "ext4"
    partitions: list[Partition] = field(default_factory=list)

    def qemu_command(
        self,
        drive: str | os.PathLike[str] | None = None,
        accel: str = "tcg",
        *,
        memory_mb: int = 512,
        console: str = "stdio",
        extra: list[str] | None = None,
        init: str | None = None,
        initrd: str | os.PathLike[str] | None = None,
    ) -> list[str]:
        """The qemu argv that boots this guest from ``drive`` (default: the image file).

        ``drive`` is anything qemu's ``-drive file=`` takes: a path, an NBD URI,
        or a shell variable such as ``$nbd`` (see ``qemu_shell_command``).
        ``accel`` is ``tcg`` or ``kvm`` (see ``probe_kvm``). ``console`` is the
        qemu chardev of the guest's serial console: ``stdio`` (qemu's stdout),
        or ``file:PATH`` when a full-screen UI owns the terminal (qemu puts a
        terminal on stdin into raw mode). ``init`` replaces /sbin/init (e.g.
        ``LOOP_INIT``); ``initrd`` replaces the image's initrd (e.g. one from
        ``build_minimal_initrd``).
        """
        qemu = require_tool("qemu-system-x86_64")
        target = os.fspath(drive) if drive is not None else os.fspath(self.path)
        argv = [
            qemu,
            "-accel", accel,
            # Debian's initrd unpacks to ~150 MB: 256 MB runs out of memory.
            "-m", str(memory_mb),
            # No floppy, NIC or VGA to probe; the console is the serial port on stdout.
            "-nodefaults", "-display", "none", "-serial", console, "-monitor", "none",
            "-no-reboot",
            "-kernel", os.fspath(self.kernel),
            "-initrd", os.fspath(initrd or self.initrd),
            "-append", "root=/dev/vda1 rootfstype=ext4 rw console=ttyS0 panic=-1 loglevel=6"
            + (f" init={init}" if init else ""),
            "-drive", f"file={target.replace(',', ',,')},format=raw,if=virtio",
        ]  # fmt: skip
        return argv + list(extra or [])

    def qemu_shell_command(
        self,
        drive: str = "$nbd",
        accel: str = "tcg",
        *,
        memory_mb: int = 512,
        console: str = "stdio",
    ) -> str:
        """``qemu_command`` as one shell string, for ``--run``; ``$nbd`` stays expandable."""
        words = []
        for arg in self.qemu_command(drive, accel, memory_mb=memory_mb, console=console):
            if "$" in drive and arg.startswith("file=") and drive in arg:
                words.append('"' + arg.replace('"', '\\"') + '"')  # let the shell expand $nbd
            else:
                words.append(shlex.quote(arg))
        return " ".join(words)


def _filler(seed: int, size: int, kind: str = "text") -> bytes:
    """Deterministic content: readable lines, or incompressible bytes for the big file."""
    rng = random.Random(seed)
    if kind == "binary":
        return rng.randbytes(size)
    words = "disk block inode extent sector read write sync guest kernel busybox demo".split()
    out = bytearray()
    n = 0
    while len(out) < size:
        n += 1
        out += (f"{n:05d} " + " ".join(rng.choice(words) for _ in range(9)) + "\n").encode()
    return bytes(out[:size])


def _log_padding(size: int, title: str) -> bytes:
    line = f"# {title}: record slots, one every 4 KiB, written in place by the demo guest"
    body = (line[:63].ljust(63) + "\n").encode()
    return (body * (size // 64 + 1))[:size]


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():
        path.unlink()  # never write through a link (an applet link may point at busybox)
    path.write_bytes(data)
    path.chmod(mode)


def build_guest_image(
    path: str | os.PathLike[str],
    *,
    churn: bool = False,
    size_mb: int = 48,
    writes: int = 5,
    churn_iterations: int = 30,
    big_file_mb: int = 4,
    boot: str | os.PathLike[str] = "/boot",
    initrd: str = "debian",
) -> GuestImage:
    """Build the demo guest's bootable disk image at ``path``; no root mounts needed.

    With ``churn`` the guest also rewrites three log files and re-reads a
    ``big_file_mb`` MiB file (O_DIRECT) ``churn_iterations`` times before it
    powers off, like the antivirus in the original bmaplogger trace.

    ``initrd`` is ``debian`` (the initrd beside the kernel in /boot) or
    ``minimal`` (a small initramfs made from the same kernel's modules, written
    next to the image as ``PATH.initrd``; the guest boots in about half the time).
    """
    path = Path(path)
    if not 1 <= writes <= 15:
        raise ValueError("writes must be 1..15: /var/log/demo.log has 15 record slots")
    if initrd not in ("debian", "minimal"):
        raise ValueError(f"initrd must be 'debian' or 'minimal', not {initrd!r}")
    busybox = require_tool("busybox")
    if not _is_static_elf(busybox):
        raise MissingToolError(
            f"{busybox} is dynamically linked: install `apt-get install busybox-static`"
        )
    kernel, initrd_path = find_kernel(boot)
    if initrd == "minimal":
        initrd_path = build_minimal_initrd(kernel, path.with_name(path.name + ".initrd"))
    require_tool("sfdisk")
    require_tool("mkfs.ext4")

    with tempfile.TemporaryDirectory(prefix="diskwatch-guest-") as tmp:
        tree = Path(tmp) / "root"
        for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "dev", "proc", "sys", "run",
                  "tmp", "root", "mnt", "var/log", "var/tmp"):  # fmt: skip
            (tree / d).mkdir(parents=True, exist_ok=True)
        (tree / "tmp").chmod(0o1777)
        shutil.copy2(busybox, tree / "bin/busybox")
        applets = subprocess.run(
            [busybox, "--list-full"], capture_output=True, text=True, check=True
        ).stdout.split()
        for applet in applets:
            link = tree / applet
            if applet == "sbin/init" or link.name == "busybox" or link.is_symlink():
                continue  # /sbin/init is our script
            link.parent.mkdir(parents=True, exist_ok=True)
            # Relative links: resolved on the build host they stay inside the tree.
            link.symlink_to(os.path.relpath(tree / "bin/busybox", link.parent))

        _write(tree / "etc/motd", b"Welcome to the diskwatch demo guest.\n"
               b"Every block this guest reads or writes passes through diskwatch.\n")  # fmt: skip
        _write(tree / "etc/hostname", b"diskwatch-demo\n")
        _write(tree / "etc/demo/settings.conf", _filler(1, 1500))
        _write(tree / "usr/share/demo/readme.txt", _filler(2, 3 * 1024))
        _write(tree / "usr/share/demo/data/table.csv", _filler(3, 20 * 1024))
        _write(tree / "usr/share/demo/My Documents/letter to a friend.txt", _filler(4, 6000))
        _write(tree / "usr/share/demo/unread/never-read.txt", _filler(5, 8 * 1024))
        _write(tree / "var/log/demo.log", _log_padding(64 * 1024, "demo.log"))
        reads = [
            "/etc/demo/settings.conf",
            "/usr/share/demo/readme.txt",
            "/usr/share/demo/data/table.csv",
            "/usr/share/demo/My Documents/letter to a friend.txt",
        ]
        write_counts = {"/var/log/demo.log": writes}
        big_file: str | None = None
        churn_logs: list[str] = []
        if churn:
            big_file = "/usr/share/demo/definitions.dat"
            _write(tree / big_file.lstrip("/"), _filler(6, big_file_mb * MiB, "binary"))
            for name in ("scan.log", "events.log", "quarantine.log"):
                log = f"/var/log/av/{name}"
                churn_logs.append(log)
                _write(tree / log.lstrip("/"), _log_padding(64 * 1024, name))
                # scan.log: a record after each directory the scan reads too
                write_counts[log] = churn_iterations + (SCAN_DIRS if name == "scan.log" else 0)

        scan_files: list[str] = []
        if churn:
            for d in range(SCAN_DIRS):
                for k in range(SCAN_FILES_PER_DIR):
                    name = f"{SCAN_ROOT}/dir{d:02d}/file{k:03d}.dat"
                    _write(tree / name.lstrip("/"), _filler(100 + d * 97 + k,
                                                            1024 + (d * 31 + k * 17) % 5000))
                    scan_files.append(name)
        script = resources.files("diskwatch.demo").joinpath("init.sh").read_text()
        for key, value in {
            "CHURN_ITERATIONS": str(churn_iterations if churn else 0),
            "WRITES": str(writes),
            "READ_FILES": " ".join(shlex.quote(f) for f in reads),
            "CHURN_LOGS": " ".join(churn_logs) or "/dev/null",
            "CHURN_BIG": big_file or "/dev/null",
            "CREATED_LOG": CREATED_LOG,
            "TEMP_FILE": TEMP_FILE,
            "SCAN_ROOT": SCAN_ROOT if churn else "/nonexistent",
            "MARKER": MARKER,
        }.items():
            script = script.replace(f"@{key}@", value)
        _write(tree / "sbin/init", script.encode(), 0o755)
        # The same guest as one that keeps running (boot it with init=LOOP_INIT):
        # for diskwatch attach, which watches a guest already at work.
        loop_script = resources.files("diskwatch.demo").joinpath("init-loop.sh").read_text()
        loop_script = loop_script.replace("@READ_FILES@", " ".join(shlex.quote(f) for f in reads))
        _write(tree / LOOP_INIT.lstrip("/"), loop_script.encode(), 0o755)

        files = {
            "/" + os.fspath(p.relative_to(tree)): p.stat().st_size
            for p in sorted(tree.rglob("*"))
            if p.is_file() and not p.is_symlink()
        }
        dirs = sorted(
            ["/" + os.fspath(p.relative_to(tree)) for p in tree.rglob("*") if p.is_dir()]
            + ["/lost+found"]
        )
        symlinks = {
            "/" + os.fspath(p.relative_to(tree)): os.readlink(p)
            for p in sorted(tree.rglob("*"))
            if p.is_symlink()
        }

        size = size_mb * MiB
        path.unlink(missing_ok=True)
        with open(path, "wb") as f:
            f.truncate(size)
        ((offset, length),) = make_partition_table(path, "dos", [(None, "83")])
        mkfs_ext4_at(path, offset, length, tree, label="diskwatch-demo")

    return GuestImage(
        path=path,
        size=size,
        partition_offset=offset,
        partition_length=length,
        kernel=kernel,
        initrd=initrd_path,
        churn=churn,
        reads=["/sbin/init", "/bin/busybox", "/etc/motd", *reads]
        + ([big_file] if big_file else []),
        writes=list(write_counts),
        big_file=big_file,
        write_counts=write_counts,
        files=files,
        dirs=dirs,
        created=[CREATED_LOG] if churn else [],
        temporary=[TEMP_FILE] if churn else [],
        symlinks=symlinks,
        scan_root=SCAN_ROOT if churn else None,
        scan_files=scan_files,
        partitions=[Partition("/dev/sda1", offset, length, "ext4")],
    )


def _is_static_elf(path: str) -> bool:
    """True if the ELF file has no program interpreter (PT_INTERP), i.e. is statically linked."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:  # only 64-bit little-endian matters here
            return False
        (phoff,) = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))


# --------------------------------------------------------------------------
# KVM probe


def _probe_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "diskwatch" / "kvm-probe"


def _probe_key(qemu: str, kernel: Path) -> str:
    """What the answer depends on: this boot of the host, this qemu, this kernel."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = "?"
    st = os.stat(qemu)
    return f"{boot_id} {qemu}:{st.st_mtime_ns} {kernel}"


def probe_kvm(timeout: float = 10.0, boot: str | os.PathLike[str] = "/boot",
              *, use_cache: bool = True) -> bool:
    """True if a KVM guest really runs here, decided within ``timeout`` seconds.

    /dev/kvm existing is not enough, nor is a guest that runs BIOS code: on
    some machines the firmware and a boot sector run under KVM but the Linux
    kernel hangs as it enters long mode. So this boots the same kernel the
    demo uses (no initrd, no disk) and waits for the kernel's first line,
    ``Linux version``, on the serial port. It never hangs: the qemu it started
    is killed by pid at the deadline. Without a kernel it answers False (TCG
    always works).
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return False
    try:
        kernel, _ = find_kernel(boot)
    except MissingToolError:
        return False
    argv = [
        qemu, "-accel", "kvm", "-m", "128", "-nodefaults", "-display", "none",
        "-monitor", "none", "-serial", "stdio", "-no-reboot", "-kernel", os.fspath(kernel),
        "-append", "console=ttyS0 earlyprintk=serial,ttyS0 panic=-1",
    ]  # fmt: skip
    # The answer holds until the host reboots or qemu changes: a machine
    # where KVM hangs pays the timeout once, not at every map and demo.
    key = _probe_key(qemu, kernel)
    cache = _probe_cache_path()
    if use_cache:
        try:
            cached_key, _, answer = cache.read_text().rpartition("\t")
            if cached_key == key:
                return answer.strip() == "1"
        except OSError:
            pass
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
    except OSError:
        return False
    try:
        works = _wait_for(proc, b"Linux version", timeout)
    finally:
        proc.kill()
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass  # stuck in the host kernel; it has been killed, do not wait on it
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(f"{key}\t{int(works)}\n")
    except OSError:
        pass  # no cache: probe again next time
    return works


def _wait_for(proc: subprocess.Popen[bytes], needle: bytes, timeout: float) -> bool:
    """Read proc's stdout until ``needle`` appears, EOF, or ``timeout`` seconds."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    seen = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            return False
        chunk = os.read(fd, 4096)
        if not chunk:
            return False
        seen = (seen + chunk)[-4096:]
        if needle in seen:
            return True
