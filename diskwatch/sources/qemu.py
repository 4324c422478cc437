"""Disk image formats through qemu's own block layer (qcow2, vmdk, vhdx, vdi,
vpc, qed...): no parser of ours.

    diskwatch --NBD/libnbd--> private qemu-storage-daemon --> guest.qcow2 -> base.img
              (unix socket in a 0700 directory, made by us and passed as an fd)

Which format, and why we never guess a raw image into another one
-----------------------------------------------------------------
A raw disk's first bytes are whatever its guest wrote there. A guest that
writes a qcow2 header with a backing file of /etc/shadow into its raw disk
would, if the image were then probed as qcow2, read the host's files (the
reason libvirt stopped probing and qemu restricts writes to sector 0 of a
probed raw image). So the rule is:

- ``--format FMT`` is obeyed, nothing is probed (``raw`` is served by
  diskwatch itself, anything else by qemu with that driver).
- Otherwise qemu probes the file (``qemu-img info``), and the name must agree:
  a non-raw format is used only when the file's extension names it
  (``.qcow2``, ``.vmdk``, ``.vhdx``, ``.vdi``, ``.vhd``/``.vpc``, ``.qed``,
  ``.qcow``). A file that looks like qcow2 inside but is called ``disk.img``
  is served as raw bytes, with a warning saying how to read it as qcow2;
  a file called ``x.qcow2`` whose content probes as raw is refused (its
  content may come from a guest) until ``--format raw`` says so.
- The daemon always gets an explicit driver (JSON ``--blockdev``): qemu
  never probes the top image. Backing files are opened as the qcow2 header
  says, as qemu does (``qemu-img info --backing-chain`` shows the chain).

The helper process is supervised: it gets SIGKILL when diskwatch dies
(PR_SET_PDEATHSIG, set in the child before exec), its stderr is logged line
by line, and if it exits while serving, requests fail with EIO and one
message gives its status and last words. It is stopped with SIGTERM (qemu
then flushes and closes the image cleanly) when the source closes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import urllib.parse
from collections import deque
from collections.abc import Callable

from .base import SourceError
from .hostmap import HostMapper
from .nbd import NbdAio, NbdSource
from .qemuimg import qemu_img_info

log = logging.getLogger("diskwatch.sources.qemu")

#: formats qemu reads that an extension names (the rule above)
EXTENSIONS = {
    ".qcow2": "qcow2", ".qcow": "qcow", ".vmdk": "vmdk", ".vhdx": "vhdx", ".vdi": "vdi",
    ".vhd": "vpc", ".vpc": "vpc", ".qed": "qed",
}
#: what --format accepts (raw is served by diskwatch itself)
FORMATS = ("raw", "qcow2", "qcow", "vmdk", "vhdx", "vdi", "vpc", "qed", "parallels", "bochs",
           "cloop", "dmg")
STOP_TIMEOUT = 10.0
STDERR_LINES = 20  # the daemon's last lines kept for the error message

PR_SET_PDEATHSIG = 1


def format_from_name(path: str) -> str | None:
    """The format a file's extension names, or None (raw, or no claim)."""
    return EXTENSIONS.get(os.path.splitext(path)[1].lower())


def choose_format(path: str, fmt: str | None) -> tuple[str, str | None]:
    """(format, warning) for a local file, by the rule in the docstring.
    ``fmt`` is the user's --format (None: probe)."""
    if fmt:
        return fmt, None
    named = format_from_name(path)
    if shutil.which("qemu-img") is None:
        if named:
            qemu_img_info(path)  # raises: qemu-img is needed for this file
        return "raw", None
    probed = qemu_img_info(path)["format"]
    if named is None:
        if probed == "raw":
            return "raw", None
        return "raw", (f"{path} looks like a {probed} image inside, but its name does not "
                       f"say so: serving its raw bytes (a raw disk's guest may have written "
                       f"that header); use --format {probed} to read it as {probed}")
    if probed == named:
        return named, None
    if probed == "raw":
        raise SourceError(errno.EINVAL, f"{path} is named like a {named} image but qemu finds "
                          f"no {named} header in it: use --format raw to serve its bytes "
                          f"as they are, or --format {named} to insist")
    raise SourceError(errno.EINVAL, f"{path} is named like a {named} image but qemu finds "
                      f"{probed} in it: say which with --format {probed} or --format {named}")


def _set_pdeathsig() -> None:
    """In the child, before exec: die with the parent (SIGKILL when the
    thread that forked us exits; diskwatch opens sources on its main thread)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _without_our_arguments(line: str) -> str:
    """qemu repeats the option that failed ('qemu-storage-daemon: --blockdev
    {...}: Could not open backing file...'): the JSON is ours, the reason is
    what the person needs."""
    head, sep, rest = line.partition(": --blockdev {")
    if sep and "}: " in rest:
        return f"{head}: {rest.split('}: ', 1)[1]}"
    return line


class QemuDaemon:
    """A private qemu-storage-daemon exporting one image over NBD on a unix
    socket in a 0700 directory. We bind and listen ourselves and pass the
    socket as an fd, so there is no wait for it to appear and no window in
    which another process could take the path."""

    def __init__(self, path: str, fmt: str, readonly: bool):
        exe = shutil.which("qemu-storage-daemon")
        if exe is None:
            raise SourceError(errno.ENOENT, "qemu-storage-daemon is missing: apt-get install "
                              "qemu-system-common (qemu reads the disk image formats)")
        self.path = path
        self.fmt = fmt
        self.dir = tempfile.mkdtemp(prefix="diskwatch-qemu-")
        os.chmod(self.dir, 0o700)
        self.socket_path = os.path.join(self.dir, "qemu.sock")
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_LINES)
        self.stopping = False
        self.serving = False  # set once connected: a death after that is news
        self.exit_status: int | None = None
        self._death_told = False
        self._death_lock = threading.Lock()
        #: called (from a helper thread) once the daemon has exited
        self.on_exit: Callable[[], None] = lambda: None
        node = {"driver": fmt, "node-name": "disk", "read-only": readonly,
                "discard": "unmap",
                "file": {"driver": "file", "filename": os.path.abspath(path),
                         "read-only": readonly}}
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.socket_path)
            listener.listen(16)
            fd = listener.fileno()
            cmd = [exe, "--blockdev", json.dumps(node),
                   "--nbd-server", f"addr.type=fd,addr.str={fd},max-connections=0",
                   "--export", f"type=nbd,id=diskwatch,node-name=disk,name=disk,"
                               f"writable={'off' if readonly else 'on'}"]
            log.debug("starting %s", " ".join(cmd))
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, pass_fds=(fd,), preexec_fn=_set_pdeathsig,
                # Its own process group: the terminal's Ctrl-C is ours to
                # handle, then we stop it. Not its own session: with the
                # kernel's autogroup scheduling a new session is a new
                # group, and on a busy machine that halved the IOPS
                # (bench_formats: 5.1k vs 10.8k under load 11).
                process_group=0)
        except BaseException:
            listener.close()
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        finally:
            listener.close()  # the daemon has its own copy
        self._reader = threading.Thread(target=self._read_stderr, daemon=True,
                                        name="qemu-storage-daemon-stderr")
        self._reader.start()

    @property
    def uri(self) -> str:
        return f"nbd+unix:///disk?socket={urllib.parse.quote(self.socket_path)}"

    def _read_stderr(self) -> None:
        from ..text import safe_text
        for raw in self.proc.stderr:
            line = safe_text(raw.decode(errors="replace").rstrip())
            if line:
                line = _without_our_arguments(line)
                self.stderr_tail.append(line)
                # qemu names itself. Before it serves, its last line is part
                # of our one-line error; while we stop it, its complaints
                # about the connections we close are expected.
                quiet = self.stopping or not self.serving
                log.log(logging.DEBUG if quiet else logging.WARNING, "%s", line)
        status = self.proc.wait()
        self.exit_status = status
        self.on_exit()
        if self.serving and not self.stopping:
            self._tell_death()

    def _tell_death(self) -> None:
        """The one error line of a death we did not cause (from the reader
        thread, or from stop() when the death came just before it)."""
        with self._death_lock:
            if self._death_told:
                return
            self._death_told = True
        log.error("%s", self.died_message())

    def _status(self) -> int | None:
        """Its exit status as Popen spells it (-N for signal N), None while
        it runs; read without reaping (see alive)."""
        if self.proc.returncode is not None:
            return self.proc.returncode
        try:
            info = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return self.proc.returncode
        if info is None:
            return None
        if info.si_code in (os.CLD_KILLED, os.CLD_DUMPED):
            return -info.si_status
        return info.si_status

    def died_message(self) -> str:
        status = self._status()
        how = (f"was killed by signal {-status}" if status is not None and status < 0
               else f"exited with status {status}")
        last = f": {self.stderr_tail[-1]}" if self.stderr_tail else ""
        return f"qemu-storage-daemon serving {self.path} {how}{last}"

    @property
    def alive(self) -> bool:
        # Asked without reaping: Popen.poll() answers None while the reader
        # thread waits on the process, so a daemon killed a moment ago
        # would still look alive and its death be told as a lost connection.
        return self._status() is None

    def open_files(self) -> set[tuple[int, int]]:
        """(st_dev, st_ino) of the regular files the daemon has open (the
        image and its backing files, whatever their paths name now)."""
        out = set()
        fds = f"/proc/{self.proc.pid}/fd"
        for name in os.listdir(fds):
            try:
                st = os.stat(os.path.join(fds, name))
            except OSError:
                continue  # closed meanwhile
            if stat.S_ISREG(st.st_mode):
                out.add((st.st_dev, st.st_ino))
        return out

    def stop(self) -> None:
        dead_before = not self.alive
        self.stopping = True
        if not dead_before:
            self.proc.terminate()  # qemu flushes and closes the image
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=2)
        if dead_before and self.serving:
            # It died before we stopped it, and the reader thread had not
            # told it yet: a death reported late is still reported.
            self.proc.wait()
            self._tell_death()
        shutil.rmtree(self.dir, ignore_errors=True)


class _QemuAio(NbdAio):
    """The loop's way in: a write, zero or trim marks its range as changed
    before it is sent, so no later read takes it from the map."""

    def pwrite(self, offset: int, data, fua: bool, done) -> None:
        self.source._changing(offset, len(data))
        super().pwrite(offset, data, fua, done)

    def trim(self, offset: int, length: int, fua: bool, done) -> None:
        self.source._changing(offset, length)
        super().trim(offset, length, fua, done)

    def zero(self, offset, length, may_trim, fua, fast, done) -> None:
        self.source._changing(offset, length)
        super().zero(offset, length, may_trim, fua, fast, done)


class QemuSource(NbdSource):
    """An image in a format qemu reads, served by a private daemon."""

    aio_class = _QemuAio

    def __init__(self, path: str, fmt: str, *, readonly: bool = False):
        if not os.path.exists(path):
            raise SourceError(errno.ENOENT, f"{path}: no such file")
        info = qemu_img_info(path, fmt)  # a clear error before any daemon starts
        self.path = path
        self.hostmap: HostMapper | None = None
        self.format = fmt
        self.daemon = QemuDaemon(path, fmt, readonly)
        backing = info.get("backing-filename")
        what = f"{fmt} {path}" + (f" (backing {backing})" if backing else "")
        try:
            super().__init__(self.daemon.uri, description=what, readonly=readonly)
        except SourceError as e:
            self.daemon.stop()
            if not self.daemon.alive and self.daemon.stderr_tail:
                raise SourceError(e.errno, f"{path}: qemu cannot serve it as {fmt}: "
                                  f"{self.daemon.stderr_tail[-1]}") from None
            raise
        except BaseException:
            self.daemon.stop()
            raise
        self.daemon.serving = True
        # Reads of plain data clusters go straight to the files (hostmap.py);
        # writes, zeroes and trims mark their ranges first (below).
        self.hostmap = HostMapper(path, fmt, self.size, info, self.daemon.open_files,
                                  writable=not readonly)
        self.daemon.on_exit = self.hostmap.stop_serving

    def view_for(self, offset: int, length: int):
        m = self.hostmap.map  # the mapper exists once the source is open
        return m.view_for(offset, length) if m is not None else None

    def pread(self, offset: int, length: int) -> bytes:
        m = self.hostmap.map
        if m is not None and 0 <= offset and offset + length <= self.size:
            data = m.pread(offset, length)
            if data is not None:
                return data
        return super().pread(offset, length)

    def pwrite(self, offset: int, data, fua: bool = False) -> None:
        self._changing(offset, len(data))
        super().pwrite(offset, data, fua)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._changing(offset, length)
        super().trim(offset, length, fua)

    def zero(self, offset, length, may_trim=False, fua=False, fast=False) -> None:
        self._changing(offset, length)
        super().zero(offset, length, may_trim, fua, fast)

    def _changing(self, offset: int, length: int) -> None:
        self.hostmap.changed(offset, length)

    def _open_handle(self, h) -> None:
        h.set_export_name("disk")
        h.connect_unix(self.daemon.socket_path)

    def may_reconnect(self) -> bool:
        return not self._closed and self.daemon.alive

    def explain_loss(self, reason: str) -> str:
        return reason if self.daemon.alive else self.daemon.died_message()

    def reconnect(self, structured: bool = True):
        if not self.daemon.alive:
            raise SourceError(errno.EIO, self.daemon.died_message())
        return super().reconnect(structured)

    def close(self) -> None:
        self.daemon.stopping = True
        if self.hostmap is not None:
            self.hostmap.close()
        try:
            super().close()
        finally:
            self.daemon.stop()


__all__ = ["QemuSource", "QemuDaemon", "choose_format", "qemu_img_info", "FORMATS",
           "EXTENSIONS", "format_from_name"]
