"""Issue 20, item 4: attach to a running guest whose disk is a qcow2 over a
raw backing file (what libvirt and virt-manager make).

One guest for the module (a boot costs 10-20 s under TCG): the demo guest's
image as the raw backing file, a qcow2 over it (qemu-img create -f qcow2 -b
base.raw -F raw), booted under plain QEMU with libvirt's layout of named
-blockdev nodes (file, raw, file, qcow2), the loop init and its burst
writer (see test_attach.py). Beside it: a qcow2 with extended L2 entries
and one whose header is made absurd on disk after QEMU opened it, for the
refusals. In file order: refusals (nothing moved), attach (the map made
from the guest's view; the loop's log writes named through the qcow2
tables, its data files' reads through the backing export; a file the guest
creates is allocated and the tables followed; detach puts both file
children back on their -blockdev nodes), the live remap (a file the guest
creates is named at the host offsets qemu-img map and debugfs give), kill
-9 (the watchdog puts them back), and last the guest stops: qemu-img check
of the qcow2 is clean, and e2fsck of the guest's filesystem (the image
converted) too.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import struct
import subprocess
import time

import pytest
from test_attach import (
    MAX_STALL,
    booted,
    diskwatch,
    one_line_error,
    start_attach,
    wait_back,
)
from test_attach_disks import check_data_disk, make_data_disk

from diskwatch.attach.qcow2map import read_file_layout
from diskwatch.attach.qmp import block_children

pytestmark = pytest.mark.slow


def blockdevs(work, base, top, data) -> list[str]:
    """libvirt's layout: named file and format nodes, a virtio disk on the
    qcow2; beside it a raw data disk (the guest's /dev/vdb: its loop reads
    and writes it) and the disks of the refusals."""
    xl2 = work / "xl2.qcow2"
    fuzzed = work / "fuzzed.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on",
                    str(xl2), "16M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(fuzzed), "16M"], check=True)
    words = [
        "-blockdev", f"driver=file,filename={base},node-name=base-file,read-only=on",
        "-blockdev", "driver=raw,file=base-file,node-name=base-fmt,read-only=on",
        "-blockdev", f"driver=file,filename={top},node-name=top-file",
        "-blockdev", "driver=qcow2,file=top-file,backing=base-fmt,node-name=top-fmt",
        "-device", "virtio-blk-pci,drive=top-fmt,id=virtio0",
        "-blockdev", f"driver=file,filename={data},node-name=data-file",
        "-blockdev", "driver=raw,file=data-file,node-name=data-fmt",
        "-device", "virtio-blk-pci,drive=data-fmt,id=data",
    ]
    named = work / "named.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(named), "16M"], check=True)
    # -drive with a node-name: the qcow2 node can be reopened, its file node is QEMU's own
    words += ["-drive", f"file={named},format=qcow2,if=virtio,id=named,node-name=named-fmt"]
    for name, path in (("xl2", xl2), ("fuzzed", fuzzed)):
        words += ["-blockdev", f"driver=file,filename={path},node-name={name}-file",
                  "-blockdev", f"driver=qcow2,file={name}-file,node-name={name}-fmt",
                  "-device", f"virtio-blk-pci,drive={name}-fmt,id={name}"]
    return words


@pytest.fixture(scope="module")
def qcow2_guest(guest_image, tmp_path_factory):
    work = tmp_path_factory.mktemp("attach-qcow2")
    base = work / "base.raw"
    shutil.copyfile(guest_image.path, base)
    top = work / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw",
                    str(top)], check=True)
    data = make_data_disk(work)
    with booted(top, guest_image, work, blockdev=blockdevs(work, base, top, data),
                ready=r"diskwatch-loop: data disk /dev/vdb1") as guest:
        guest.base = base
        guest.work = work
        guest.data = data
        yield guest


def wait_for_trace(proc, err: list[str], trace, found, timeout: float = 60) -> str:
    """The trace's text once ``found(text)`` holds (diskwatch still running)."""
    deadline = time.monotonic() + timeout
    while not found(text := trace.read_text()):
        assert time.monotonic() < deadline and proc.poll() is None, "".join(err) + text[-3000:]
        time.sleep(0.2)
    return text


def detach(proc, err: list[str]) -> str:
    """SIGTERM (diskwatch puts the disks back and exits 0); its stderr."""
    proc.send_signal(signal.SIGTERM)
    status = proc.wait(60)
    stderr = "".join(err)
    assert status == 0, stderr
    return stderr


def graph(g) -> dict[tuple[str, str], str]:
    with g.qmp() as q:
        return block_children(q)


def nbd_nodes(g) -> list[str]:
    with g.qmp() as q:
        return [n["node-name"] for n in q.execute("query-named-block-nodes") if n["drv"] == "nbd"]


# --- refusals: one line each, nothing moved --------------------------------------------------


def test_refusals_of_qcow2_images_move_nothing(qcow2_guest):
    g = qcow2_guest
    before = graph(g)
    since = time.monotonic()
    # Extended L2 entries (subclusters): QEMU reads them, attach refuses.
    line = one_line_error(diskwatch("attach", g.qmp_path, "--device", "xl2"))
    assert "extended L2 entries" in line and "nothing was moved" in line
    # A header made absurd on disk after QEMU opened the image (QEMU keeps
    # its own copy): cluster_bits 40, an L1 table of 2^32 - 1 entries.
    fuzzed = g.work / "fuzzed.qcow2"
    original = fuzzed.read_bytes()[:512]
    try:
        for offset, fmt, value, says in [(20, ">I", 40, "cluster_bits 40"),
                                         (36, ">I", 0xFFFFFFFF, "L1 table of 4294967295"),
                                         (48, ">Q", 1 << 60, "refcount table")]:
            with open(fuzzed, "r+b") as f:
                f.write(original)
                f.seek(offset)
                f.write(struct.pack(fmt, value))
            line = one_line_error(diskwatch("attach", g.qmp_path, "--device", "fuzzed"))
            assert line.startswith("diskwatch: qcow2 image: ") and says in line, line
    finally:
        with open(fuzzed, "r+b") as f:
            f.write(original)
    assert graph(g) == before and nbd_nodes(g) == []
    g.wait_ticks(1)
    assert g.max_stall(since) < MAX_STALL


# --- a -drive qcow2 with a node-name: its file node is QEMU's, gone after the move -----------


def test_a_drive_qcow2_comes_back_on_a_new_file_node_and_restore_is_idempotent(qcow2_guest):
    from diskwatch.attach import AttachedGuest, monitor_opener, prepare
    from diskwatch.attach.pivot import restore
    from diskwatch.events import Bus
    from diskwatch.server import serve_in_thread
    g = qcow2_guest
    connect = monitor_opener(g.qmp_path)
    with connect() as monitor:
        target = prepare(monitor, "named")
    assert target.qcow2.file_node.startswith("#") and target.qcow2.backing_node == ""
    source = target.view.open_source()
    running = serve_in_thread({"": source}, Bus())
    said: list[str] = []
    attached = AttachedGuest(connect, target, running.socket_path, say=said.append)
    try:
        attached.start()
        plan = attached.plan
        assert graph(g)[("named-fmt", "file")] == plan.nbd_node
        attached.stop()
    finally:
        if attached.running:
            attached.stop()
        running.stop()
        source.close()
    assert "detached: named is back on" in said[-1], said
    assert graph(g)[("named-fmt", "file")] == plan.back_file_node
    with g.qmp() as q:
        nodes = {n["node-name"]: n for n in q.execute("query-named-block-nodes")}
        assert nodes[plan.back_file_node]["file"] == str(g.work / "named.qcow2")
        assert nodes[plan.back_file_node]["drv"] == "file"
        # The watchdog may run restore after diskwatch did: nothing more happens.
        before = block_children(q)
        assert restore(q, plan) is False
    assert graph(g) == before and nbd_nodes(g) == []


# --- attach, watch, follow allocations, detach ------------------------------------------


def test_attach_names_the_qcow2_guests_files_and_detach_puts_it_back(qcow2_guest, tmp_path):
    g = qcow2_guest
    before = graph(g)
    assert before[("top-fmt", "file")] == "top-file"
    trace = tmp_path / "attach.trace"
    live_map = tmp_path / "live.bmap"  # made from the guest's view of the qcow2
    since = time.monotonic()
    proc, err = start_attach(g, "--bmap", str(live_map), "--log", str(trace))
    try:
        now = graph(g)
        assert now[("top-fmt", "file")].startswith("diskwatch-"), now
        assert now[("base-fmt", "file")].endswith("-nbd-backing"), now
        assert now[("top-fmt", "backing")] == "base-fmt"
        # A second diskwatch on the same disk: one line, the first one untouched.
        line = one_line_error(diskwatch("attach", g.qmp_path, "--device", "virtio0"))
        assert "already on diskwatch" in line
        g.wait_ticks(3)
        # The guest makes a file: new clusters in the qcow2, its tables written;
        # the translation follows (the writes are named late, once read again).
        after = len(g.lines)
        g.console.sendall(b"create\n")
        g.wait_line(r"diskwatch-loop: created /var/log/created-\d+\.log", 30, after)
        wait_for_trace(proc, err, trace,
                       lambda text: "qcow2 tables read again" in text or "named late" in text)
        g.wait_ticks(2)
    finally:
        stderr = detach(proc, err)
    assert "qcow2: QEMU's qcow2 node reads and writes its image file through diskwatch" in stderr
    assert "the backing file's reads too" in stderr
    assert "generating it first" in stderr and live_map.exists(), stderr
    assert "detached: virtio0 is back on" in stderr, stderr
    moved = re.search(r"attached: .*?\(moved in (\d+) ms\)", stderr).group(1)
    back = re.search(r"detached: .*?\(moved in (\d+) ms\)", stderr).group(1)
    print(f"qcow2 attach moved the file children in {moved} ms, detach moved them back in "
          f"{back} ms")
    # Both file children are back on their own -blockdev nodes; no nbd node is left.
    assert graph(g) == before
    assert nbd_nodes(g) == []
    text = trace.read_text()
    # The loop's log: written in clusters the qcow2 holds, named through its tables.
    assert "write f /dev/sda1 /var/log/demo.log" in text, text[-3000:]
    # The data files: never written, read from the backing file (its export).
    for path in g.guest.reads[3:]:
        assert f"read f /dev/sda1 {path}" in text, f"{path} not in the trace:\n{text[-3000:]}"
    # The qcow2's own structures are named (the guest's syncs rewrite refcounts and L2).
    assert re.search(r"f /dev/sda /\$qcow2-(L2|refcounts|L1|header)", text), text[-3000:]
    # Allocations followed: the writes to clusters allocated while attached were named.
    assert "named late: write" in text, text[-3000:]
    g.wait_ticks(2)
    stall = g.max_stall(since)
    print(f"qcow2 attach, watch, detach: longest stall of the guest's loop {stall:.1f} s")
    assert stall < MAX_STALL, g.tail()


def guest_file_at_host(g, path: str, work) -> list[int]:
    """Ground truth, from other tools: the host offsets in the qcow2 of each
    4 KiB block of the guest's file ``path`` (qemu-img convert and map with
    -U while QEMU holds the image; the copy's journal replayed by e2fsck,
    its extents read by debugfs)."""
    from groundtruth import ext4_file_ranges
    raw = work / "now.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(g.image),
                    str(raw)], check=True)
    part = g.guest.partition_offset
    fs = work / "now.ext4"  # the partition alone: e2fsck reopens it after the replay
    with open(raw, "rb") as src, open(fs, "wb") as dst:
        src.seek(part)
        shutil.copyfileobj(src, dst)
    r = subprocess.run(["e2fsck", "-E", "journal_only", "-y", str(fs)], capture_output=True,
                       text=True)
    assert r.returncode in (0, 1), r.stdout + r.stderr
    ranges = [(s + part, e + part) for s, e in ext4_file_ranges(fs, 0, [path])[path]]
    mapped = json.loads(subprocess.run(
        ["qemu-img", "map", "-U", "--output=json", str(g.image)], capture_output=True,
        text=True, check=True).stdout)
    hosts = []
    for start, end in ranges:
        for guest in range(start, end, 4096):
            (e,) = [e for e in mapped if e["start"] <= guest < e["start"] + e["length"]]
            assert e["depth"] == 0 and e["data"], (path, guest, e)  # written in the qcow2
            hosts.append(e["offset"] + guest - e["start"])
    return hosts


def create_and_see_it_named(g, proc, err: list[str], trace, device: str):
    """The guest makes a file (its loop's ``create``) while diskwatch is
    attached; returns once the trace names a write of it on ``device``:
    (its path, the pattern of those lines, whose group 1 is their ranges)."""
    g.wait_ticks(2)
    after = len(g.lines)
    g.console.sendall(b"create\n")
    line = g.wait_line(r"diskwatch-loop: created /var/log/created-\d+\.log", 30, after)
    path = re.search(r"/var/log/created-\d+\.log", line).group(0)
    named = re.compile(f"write f {device} " + re.escape(path) + r"  \[([^\]]+)\]")
    wait_for_trace(proc, err, trace, named.search, 90)
    g.wait_ticks(1)
    return path, named


def assert_named_where_it_lies(g, path: str, named, text: str, work) -> list[int]:
    """Every host offset of ``path`` (qemu-img map and debugfs) lies in a
    range of a trace line that names it."""
    shown = [tuple(int(x, 16) for x in r.split("-")) for m in named.finditer(text)
             for r in m.group(1).split(", ") if not r.startswith("+")]
    hosts = guest_file_at_host(g, path, work)
    assert hosts
    for h in hosts:
        assert any(s <= h < e for s, e in shown), (path, hex(h), shown, text[-3000:])
    return hosts


def test_a_file_the_guest_creates_is_named_by_the_live_remap(qcow2_guest, tmp_path):
    """The map follows the guest's files on a qcow2 disk too: the remapper
    reads the guest's view and is told the guest's writes in guest offsets;
    its map, translated through the tables, names the new file's writes at
    the host offsets qemu-img map and debugfs give."""
    g = qcow2_guest
    trace = tmp_path / "remap.trace"
    since = time.monotonic()
    proc, err = start_attach(g, "--bmap", str(tmp_path / "live.bmap"), "--log", str(trace))
    try:
        path, named = create_and_see_it_named(g, proc, err, trace, "/dev/sda1")
    finally:
        stderr = detach(proc, err)
    assert "not remapped" not in stderr
    assert re.search(r"remap \(auto\): \+\d+ objects", stderr), stderr
    hosts = assert_named_where_it_lies(g, path, named, trace.read_text(), tmp_path)
    went_on(g, since, f"qcow2 live remap: {path} named at host "
                      f"{', '.join(hex(h) for h in hosts)}")


def test_kill_9_the_watchdog_puts_the_qcow2_file_back(qcow2_guest):
    g = qcow2_guest
    before = graph(g)
    since = time.monotonic()
    proc, err = start_attach(g, "--no-trace")
    assert graph(g)[("top-fmt", "file")].startswith("diskwatch-")
    g.wait_ticks(1)
    proc.kill()
    proc.wait()
    back = wait_until_back(g, before, err, ("virtio0",))
    went_on(g, since, f"qcow2 kill -9: the file children were back {back:.1f} s later")


# --- a raw disk and the qcow2 in one attach ------------------------------------------------


def data_node(g) -> str:
    """The node the raw data disk's device sits on."""
    with g.qmp() as q:
        (dev,) = [d for d in q.execute("query-block") if "/data/" in d.get("qdev", "")]
    return dev["inserted"]["node-name"]


def wait_until_back(g, before: dict, err: list[str], disks: tuple[str, ...]) -> float:
    """After kill -9: seconds until the watchdog put every disk back as it was."""
    back = wait_back(err, disks, lambda: (graph(g), data_node(g)), (before, "data-fmt"))
    assert nbd_nodes(g) == []
    return back


def went_on(g, since: float, said: str) -> None:
    """The guest's loop went on: no long stall since ``since``, no I/O error."""
    g.wait_ticks(3)
    stall = g.max_stall(since)
    print(f"{said}; longest stall of the guest's loop {stall:.1f} s")
    assert stall < MAX_STALL, g.tail()
    assert "I/O error" not in g.tail(200)


def attach_with_the_qcow2_second(g, tmp_path, first: str):
    """diskwatch attach --device FIRST --device virtio0, a map made at attach
    and a trace: the qcow2 root disk is /dev/sdb, its image file on the
    export sdb, its backing file on sdb-backing."""
    trace = tmp_path / "trace"
    proc, err = start_attach(g, "--bmap", str(tmp_path / "vm.bmap"), "--log", str(trace),
                             devices=(first, "virtio0"))
    return proc, err, trace


def assert_the_qcow2_is_second(g) -> dict:
    """Its file child on the nbd node of export sdb, its backing's on sdb-backing's."""
    now = graph(g)
    assert re.fullmatch(r"diskwatch-\d+-sdb-nbd", now[("top-fmt", "file")]), now
    assert re.fullmatch(r"diskwatch-\d+-sdb-nbd-backing", now[("base-fmt", "file")]), now
    return now


def test_one_attach_moves_a_raw_and_the_qcow2_disk_and_names_the_files_of_both(qcow2_guest,
                                                                              tmp_path):
    """--device data --device virtio0: the raw data disk is /dev/sda (export
    ""), the qcow2 /dev/sdb (export sdb, its backing sdb-backing); one map
    made at attach names both (the qcow2's from its guest view); the live
    remap of the qcow2 names a file the guest creates; detach puts both back."""
    g = qcow2_guest
    before = graph(g)
    assert data_node(g) == "data-fmt"
    since = time.monotonic()
    proc, err, trace = attach_with_the_qcow2_second(g, tmp_path, "data")
    try:
        assert_the_qcow2_is_second(g)
        assert re.fullmatch(r"diskwatch-\d+-nbd", data_node(g))
        path, named = create_and_see_it_named(g, proc, err, trace, "/dev/sdb1")
    finally:
        stderr = detach(proc, err)
    assert "attached: data and virtio0's I/O goes through diskwatch" in stderr, stderr
    assert "qcow2 of virtio0: QEMU's qcow2 node reads and writes" in stderr
    assert "the backing file's reads too (export sdb-backing)" in stderr
    assert re.search(r"detached: data is back on \S+data\.raw; virtio0 is back on \S+top\.qcow2",
                     stderr), stderr
    assert graph(g) == before and data_node(g) == "data-fmt" and nbd_nodes(g) == []
    text = trace.read_text()
    assert "write f /dev/sda1 /data/f3" in text and "read f /dev/sda1 /data/f0" in text, \
        text[-3000:]
    assert "write f /dev/sdb1 /var/log/demo.log" in text, text[-3000:]
    for read in g.guest.reads[3:]:  # through the backing export, named on the qcow2's disk
        assert f"read f /dev/sdb1 {read}" in text, f"{read} not in the trace:\n{text[-3000:]}"
    assert re.search(r"f /dev/sdb /\$qcow2-(L2|refcounts|L1|header)", text), text[-3000:]
    assert not re.search(r"[fd] /dev/sda1 /var/", text) and not re.search(r"[fd] /dev/sdb1 /data/",
                                                                          text)
    hosts = assert_named_where_it_lies(g, path, named, text, tmp_path)
    went_on(g, since, f"raw + qcow2: {path} on /dev/sdb named at host "
                      f"{', '.join(hex(h) for h in hosts)}")


def test_kill_9_while_attached_to_both_the_watchdog_puts_both_back(qcow2_guest):
    g = qcow2_guest
    before = graph(g)
    since = time.monotonic()
    proc, err = start_attach(g, "--no-trace", devices=("data", "virtio0"))
    assert graph(g)[("top-fmt", "file")].startswith("diskwatch-") and \
        data_node(g).startswith("diskwatch-")
    g.wait_ticks(1)
    proc.kill()
    proc.wait()
    back = wait_until_back(g, before, err, ("data", "virtio0"))
    went_on(g, since, f"raw + qcow2 kill -9: both back {back:.1f} s later")


def test_two_qcow2_disks_in_one_attach_each_on_its_exports(qcow2_guest, tmp_path):
    """--device named --device virtio0: two qcow2 disks, the first without a
    backing file (export ""), the second with one (exports sdb and
    sdb-backing); detach puts both back (named, a -drive, on a new file
    node), and so does the watchdog after kill -9."""
    g = qcow2_guest
    since = time.monotonic()
    proc, err, trace = attach_with_the_qcow2_second(g, tmp_path, "named")
    try:
        now = assert_the_qcow2_is_second(g)
        assert re.fullmatch(r"diskwatch-\d+-nbd", now[("named-fmt", "file")]), now
        text = wait_for_trace(proc, err, trace, lambda text: "write f /dev/sdb1 /var/log/demo.log"
                              in text and "read f /dev/sdb1 " + g.guest.reads[-1] in text)
    finally:
        stderr = detach(proc, err)
    assert "qcow2 of named:" in stderr and "qcow2 of virtio0:" in stderr, stderr
    assert "(export sdb-backing)" in stderr and "backing file's reads too (export backing)" \
        not in stderr
    assert not re.search(r"[fd] /dev/sda1 ", text)  # named holds no filesystem
    before = graph(g)
    assert before[("top-fmt", "file")] == "top-file" and before[("base-fmt", "file")] == "base-file"
    assert not before[("named-fmt", "file")].endswith("-nbd") and nbd_nodes(g) == []
    proc, err = start_attach(g, "--no-trace", devices=("named", "virtio0"))
    assert graph(g)[("named-fmt", "file")].endswith("-nbd")
    g.wait_ticks(1)
    proc.kill()
    proc.wait()
    back = wait_until_back(g, before, err, ("named", "virtio0"))
    went_on(g, since, f"two qcow2 disks, kill -9: both back {back:.1f} s later")


# --- last: the guest stops, the qcow2 and its filesystem are clean ------------------------


def test_the_qcow2_is_clean_and_so_is_the_guests_filesystem(qcow2_guest, tmp_path):
    g = qcow2_guest
    assert g.stop() == 0
    g.wait_line(r"diskwatch-loop: stopped", 5)
    console = "\n".join(line for _, line in g.lines)
    assert "I/O error" not in console
    assert "MISMATCH" not in console
    r = subprocess.run(["qemu-img", "check", "--output=json", str(g.image)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    check = json.loads(r.stdout)
    assert check.get("corruptions", 0) == 0 and check.get("leaks", 0) == 0, check
    # The translation still agrees with qemu-img map after all those allocations.
    lay = read_file_layout(str(g.image))
    mapped = json.loads(subprocess.run(["qemu-img", "map", "--output=json", str(g.image)],
                                       capture_output=True, text=True, check=True).stdout)
    cs = lay.cluster_size
    truth = {e["offset"] + k: e["start"] + k for e in mapped if e["depth"] == 0 and e["data"]
             for k in range(0, e["length"], cs)}
    assert {h + k: gg + k for h, gg, n in lay.runs for k in range(0, n, cs)} == truth
    raw = tmp_path / "guest.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(g.image), str(raw)], check=True)
    spec = f"{raw}?offset={g.guest.partition_offset}"
    r = subprocess.run(["e2fsck", "-f", "-n", spec], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    check_data_disk(g, g.data)  # the raw disk attached beside it
    r = subprocess.run(["debugfs", "-R", "cat /var/log/demo.log", spec], capture_output=True)
    log = r.stdout.decode()
    slots = [log[i * 4096:i * 4096 + 64] for i in range(16)]
    assert re.match(r"burst (\d+) ", slots[0]), slots[0]
    last = [n for _, n in g.ticks][-15:]
    for n in last:
        assert slots[n % 15 + 1].startswith(f"loop {n} "), (n, slots)
