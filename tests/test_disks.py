"""Several disks in one session (issue 20 item 1): ``diskwatch A B ...``.

Each source is its own export (the first the default one, the others
``sdb``, ``sdc``... unless ``export=`` names them), the captive command gets
``$nbd1``... ``$nbdN``, one ``--bmap`` file maps them all with virt-bmap's
disk index in its first column, and each request is named in its own
disk's map: /dev/sda... for the first, /dev/sdb1... for the second. The map
is checked against debugfs on each image; the peers are nbdcopy, qemu-io
and qemu-img.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess

import pytest
from fixtures_server import run_diskwatch
from groundtruth import ext4_file_ranges

from diskwatch.runner import UsageError, export_names, parse_disk

pytestmark = pytest.mark.skipif(shutil.which("mke2fs") is None or shutil.which("nbdcopy") is None,
                                reason="needs e2fsprogs and libnbd's nbdcopy")

MiB = 1024 * 1024
PART = MiB  # the second disk's partition starts at 1 MiB


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def two_disks(tmp_path_factory):
    """A raw ext4 disk (no partition table: /dev/sda) and a qcow2 disk with
    an MBR and one ext4 partition (/dev/sdb1), both filled by mke2fs -d."""
    d = tmp_path_factory.mktemp("two-disks")
    (d / "r1/etc").mkdir(parents=True)
    (d / "r1/etc/motd").write_text("hello from disk 1\n")
    (d / "r2/data").mkdir(parents=True)
    for i in range(20):
        (d / f"r2/data/f{i}").write_bytes(bytes([i + 1]) * 20000)
    a = d / "a.img"
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-d", d / "r1", a, "16M"], check=True)
    raw = d / "b.raw"
    with open(raw, "wb") as f:
        f.truncate(17 * MiB)
    subprocess.run(["sfdisk", "-q", raw], input=b"start=2048, type=83\n", check=True)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-E", f"offset={PART}", "-d", d / "r2",
                    raw, "15M"], check=True)
    qcow = d / "b.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow], check=True)
    bmap = d / "vm.bmap"
    done = run_diskwatch([a, f"file={qcow},snapshot=on", "--bmap", bmap, "--headless",
                          "--no-trace", "--run", "true"], timeout=120)
    assert done.returncode == 0, done.stderr
    return {"a": a, "raw": raw, "qcow": qcow, "bmap": bmap, "dir": d}


def test_disk_options_and_export_names():
    assert parse_disk("win.iso", 2).options == {}
    d = parse_disk("file=/x/a,,b.iso,readonly=on,format=raw,export=cd", 2)
    assert (d.spec, d.options, d.export) == ("/x/a,b.iso", {"readonly": True, "format": "raw"},
                                             "cd")
    assert parse_disk("file=b.qcow2,snapshot", 3).options == {"snapshot": True}
    for word, needle in (("file=a,colour=red", "unknown option 'colour'"),
                         ("file=,readonly=on", "file= is empty"),
                         ("file=a,readonly=maybe", "use on or off"),
                         ("file=a,format=", "format= needs a value")):
        with pytest.raises(UsageError, match=needle):
            parse_disk(word, 2)
    more = [parse_disk("b", 2), parse_disk("file=c,export=data", 3)]
    assert export_names("", more) == ["", "sdb", "data"]
    with pytest.raises(UsageError, match="disks 2 and 3 have the same export name 'sdb'"):
        export_names("", [parse_disk("b", 2), parse_disk("file=c,export=sdb", 3)])


def test_one_map_names_both_disks_as_debugfs_does(two_disks):
    """The map file's lines of disk 1 and disk 2 against debugfs on each
    image (the qcow2's raw twin for disk 2)."""
    lines = [ln.split(None, 5) for ln in open(two_disks["bmap"]) if not ln.startswith("#")]
    by = {}
    for disk, start, end, _type, device, *path in lines:
        if path:
            by.setdefault((int(disk), device, path[0].rstrip("\n")), []).append(
                (int(start, 16), int(end, 16)))
    for path, ranges in ext4_file_ranges(two_disks["a"], 0, ["/etc/motd"]).items():
        assert by[(1, "/dev/sda", path)] == ranges
    truth = ext4_file_ranges(two_disks["raw"], PART, [f"/data/f{i}" for i in range(20)])
    for path, ranges in truth.items():
        assert by[(2, "/dev/sdb1", path)] == ranges, path
    assert not any(d == 2 and dev.startswith("/dev/sda") for d, dev, _ in by)
    assert "# disk 2 /dev/sdb: qcow2" in open(two_disks["bmap"]).read()


def test_each_disk_is_its_own_export_and_named_in_its_own_map(two_disks):
    """nbdcopy reads each disk through its own variable; qemu-io writes a
    file of disk 2 (under snapshot=on: the qcow2 stays as it was). Every
    request is named on its own disk: the reads of disk 2's files on
    /dev/sdb1, the write too, and nothing of disk 2 on /dev/sda."""
    d = two_disks["dir"]
    before = _sha(two_disks["qcow"])
    f3 = ext4_file_ranges(two_disks["raw"], PART, ["/data/f3"])["/data/f3"][0][0]
    script = ("echo \"$nbd1|$nbd2|$exportname1|$exportname2|$nbd\"; "
              f"nbdcopy \"$nbd1\" {d}/out1.raw && nbdcopy \"$nbd2\" {d}/out2.raw && "
              f"qemu-io -f raw -c 'write -P 0x55 {f3} 4096' \"$nbd2\" >/dev/null")
    rec = d / "two.rec"
    done = run_diskwatch([two_disks["a"], f"file={two_disks['qcow']},snapshot=on",
                          "--bmap", two_disks["bmap"], "--headless", "--remap", "off",
                          "--record", rec, "--run", script], timeout=120)
    assert done.returncode == 0, done.stderr
    nbd1, nbd2, name1, name2, nbd = done.stdout.splitlines()[0].split("|")
    assert nbd == nbd1 and nbd1.startswith("nbd+unix:///?socket=")
    assert nbd2.startswith("nbd+unix:///sdb?socket=") and (name1, name2) == ("", "sdb")
    assert _sha(d / "out1.raw") == _sha(two_disks["a"])
    assert _sha(d / "out2.raw") == _sha(two_disks["raw"])
    assert _sha(two_disks["qcow"]) == before  # snapshot=on: disk 2 unchanged
    trace = done.stdout
    assert "read f /dev/sda /etc/motd" in trace
    assert "read f /dev/sdb1 /data/f7" in trace
    assert "write f /dev/sdb1 /data/f3" in trace
    assert "/dev/sda /data/" not in trace and "/dev/sda1" not in trace
    # The recording keeps each disk apart: its replay and its report name
    # them as live did.
    replayed = run_diskwatch(["replay", rec, "--headless"], timeout=60)
    assert replayed.returncode == 0, replayed.stderr
    for line in ("read f /dev/sda /etc/motd", "read f /dev/sdb1 /data/f7",
                 "write f /dev/sdb1 /data/f3"):
        assert line in replayed.stdout, line
    assert "/dev/sda /data/" not in replayed.stdout
    report = run_diskwatch(["report", rec, "--json"], timeout=60)
    assert report.returncode == 0, report.stderr
    objects = {o["name"]: o for o in json.loads(report.stdout)["objects"]}
    assert objects["f /dev/sdb1 /data/f3"]["write_bytes"] == 4096
    lat = objects["f /dev/sdb1 /data/f3"]["latency"]  # nbdcopy's read of it, qemu-io's write
    assert lat["requests"] >= 2 and 0 < lat["p50"] <= lat["p99"] < 60
    assert objects["f /dev/sdb1 /data/f7"]["read_bytes"] == 20000 // 1024 * 1024 + 1024
    assert not [n for n in objects if n.startswith("f /dev/sda /data")]
    # The picture of one disk at a time: --disk 2 draws the second's requests
    # over its own partitions, and says which disk it is.
    picture = run_diskwatch(["report", rec, "--svg", d / "two.svg", "--disk", "2"], timeout=60)
    assert picture.returncode == 0, picture.stderr
    svg = (d / "two.svg").read_text()
    assert "disk 2 of 2 (/dev/sdb)" in svg and "/dev/sdb1" in svg and "/dev/sda1" not in svg
    bad = run_diskwatch(["report", rec, "--svg", d / "three.svg", "--disk", "3"], timeout=60)
    assert bad.returncode != 0 and "--disk 3: the recording has 2 disks" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (d / "three.svg").exists()


@pytest.mark.parametrize("args, needle", [
    (["file=X,export=", "--run", "true"], "disks 1 and 2 have the same export name ''"),
    (["file=X,colour=red"], "disk 2: unknown option 'colour'"),
    (["/nonexistent/b.img"], "/nonexistent/b.img"),
])
def test_bad_disks_are_one_line(two_disks, args, needle):
    args = [str(two_disks["qcow"]) if a == "X" else a.replace("X", str(two_disks["qcow"]))
            for a in args]
    done = run_diskwatch([two_disks["a"], *args, "--headless"], timeout=60)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], done.stderr


@pytest.mark.slow
def test_a_guest_with_a_root_disk_and_a_qcow2_data_disk_boots_under_one_diskwatch(
        guest_image, two_disks, tmp_path):
    """The demo guest boots from its raw root disk ($nbd1, /dev/vda in the
    guest) with the qcow2 data disk ($nbd2, /dev/vdb): it reads the data
    disk's files and writes one in place. One map made at start names
    both: the root disk's files on /dev/sda1, the data disk's on /dev/sdb1,
    and the guest's write to /data/f3 on /dev/sdb1 (snapshot=on: both images
    are unchanged afterwards)."""
    guest = guest_image.guest
    bmap = tmp_path / "vm.bmap"
    before = (_sha(guest_image.path), _sha(two_disks["qcow"]))
    command = (guest.qemu_shell_command("$nbd1", "tcg")
               + ' -drive "file=$nbd2,format=raw,if=virtio"')
    rec = tmp_path / "vm.dwrec"
    done = run_diskwatch([guest_image.path, f"file={two_disks['qcow']},snapshot=on", "--snapshot",
                          "--bmap", bmap, "--headless", "--record", rec, "--run", command],
                         timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "diskwatch-demo: data disk read and written" in done.stdout, done.stdout[-3000:]
    trace = done.stdout
    for path in guest.reads:
        assert f"read f /dev/sda1 {path}" in trace, path
    for i in (0, 7, 19):
        assert f"read f /dev/sdb1 /data/f{i} " in trace, i
    assert "write f /dev/sdb1 /data/f3 " in trace
    assert "write f /dev/sda1 /var/log/demo.log " in trace
    assert not re.search(r"\] \w+ [fd] /dev/sda1 /data/", trace)
    # The file it made: named on the data disk by that disk's live remap.
    assert re.search(r"remap \(auto\): \+\d+ objects.*/new\.log", done.stderr) and \
        "/dev/sdb: remap" in done.stderr, done.stderr[-3000:]
    assert "f /dev/sdb1 /new.log" in trace, trace[-3000:]
    assert "/dev/sda1 /new.log" not in trace
    assert (_sha(guest_image.path), _sha(two_disks["qcow"])) == before
    # The recording keeps the data disk's remapped map (a DMAP frame): its
    # replay names the new file on /dev/sdb1 where live did, and the report
    # gives it its 2,000,000 bytes (written before the remap: named late).
    from diskwatch.recording.reader import open_recording
    recording = open_recording(str(rec))
    assert recording.disk_maps and {m.export for m in recording.disk_maps} == {"sdb"}
    replayed = run_diskwatch(["replay", rec, "--headless"], timeout=120)
    assert replayed.returncode == 0, replayed.stderr
    assert "f /dev/sdb1 /new.log" in replayed.stdout
    live_lines = [ln for ln in trace.splitlines() if "/new.log" in ln]
    assert [ln for ln in replayed.stdout.splitlines() if "/new.log" in ln] == live_lines
    report = run_diskwatch(["report", rec, "--json"], timeout=120)
    assert report.returncode == 0, report.stderr
    objects = {o["name"]: o for o in json.loads(report.stdout)["objects"]}
    assert objects["f /dev/sdb1 /new.log"]["write_bytes"] >= 2_000_000
    print("\n" + "\n".join(ln for ln in (done.stderr + trace).splitlines()
                           if "remap" in ln or "new.log" in ln or "/dev/sdb1 /data/f3" in ln))


def test_the_trace_says_the_disk_where_the_object_does_not():
    """A run is one disk's: the same LV's blocks on two disks make two lines,
    each saying its disk (the LV's name does not); a partition's line needs
    no word more; flushes and unnamed ranges say their disk too."""
    import io

    from diskwatch.bmap.index import BmapObject
    from diskwatch.events import Request
    from diskwatch.sinks.text_trace import TextTrace
    from diskwatch.wire import Command

    lv = BmapObject("f", "/dev/vg/var", "/log/syslog")
    part = BmapObject("f", "/dev/sdb1", "/data/f3")
    reqs = [Request(1, "", Command.WRITE, 4096, 4096, 0, 1.0, 0.001, 0),
            Request(2, "sdb", Command.WRITE, 8192, 4096, 0, 1.001, 0.001, 0),
            Request(2, "sdb", Command.WRITE, 65536, 4096, 0, 1.002, 0.001, 0),
            Request(2, "sdb", Command.FLUSH, 0, 0, 0, 1.003, 0.001, 0),
            Request(1, "", Command.FLUSH, 0, 0, 0, 1.004, 0.001, 0),
            Request(1, "", Command.READ, 1 << 20, 512, 0, 1.005, 0.001, 0)]
    pieces = [[(4096, 8192, lv)], [(8192, 12288, lv)], [(65536, 69632, part)], [], [],
              [(1 << 20, (1 << 20) + 512, None)]]
    out = io.StringIO()
    trace = TextTrace(out, blockmap=object(), disks={"": "/dev/sda", "sdb": "/dev/sdb"})
    trace.feed(reqs, pieces)
    trace.close()
    lines = [ln.split("] ", 1)[1] for ln in out.getvalue().splitlines()]
    assert lines == [
        "write f /dev/vg/var /log/syslog on /dev/sda  [0x1000-0x2000] 4 KiB",
        "write f /dev/vg/var /log/syslog on /dev/sdb  [0x2000-0x3000] 4 KiB",
        "write f /dev/sdb1 /data/f3  [0x10000-0x11000] 4 KiB",
        "flush on /dev/sdb",
        "flush on /dev/sda",
        "read - (no object: metadata or free space) on /dev/sda  [0x100000-0x100200] 512 B",
    ], lines
    one = io.StringIO()  # one disk: no word more
    trace = TextTrace(one, blockmap=object())
    trace.feed(reqs[:1], pieces[:1])
    trace.close()
    assert "write f /dev/vg/var /log/syslog  [0x1000-0x2000]" in one.getvalue()


def test_the_ui_trace_says_the_disk_where_the_object_does_not():
    """The UI's trace folds one disk's requests into a line, and says the
    disk where the object's name does not (the same rule as the text trace)."""
    from diskwatch.bmap.index import BmapObject
    from diskwatch.events import Request
    from diskwatch.ui.trace import TraceModel, render_trace_line
    from diskwatch.wire import Command

    lv = BmapObject("f", "/dev/vg/var", "/log/syslog")
    part = BmapObject("f", "/dev/sdb1", "/data/f3")
    model = TraceModel(disks={"": "/dev/sda", "sdb": "/dev/sdb"})
    model.add([(Request(1, "", Command.WRITE, 4096, 4096, 0, 1.0, 0.001, 0),
                [(4096, 8192, lv)]),
               (Request(2, "sdb", Command.WRITE, 8192, 4096, 0, 1.001, 0.001, 0),
                [(8192, 12288, lv)]),
               (Request(2, "sdb", Command.WRITE, 65536, 4096, 0, 1.002, 0.001, 0),
                [(65536, 69632, part)])])
    shown = ["".join(s.text for s in render_trace_line(ln, 100)) for ln in model.lines]
    assert [ln.disk for ln in model.lines] == ["/dev/sda", "/dev/sdb", ""]
    assert "/log/syslog on /dev/sda" in shown[0] and "/log/syslog on /dev/sdb" in shown[1]
    assert " on " not in shown[2] and "/data/f3" in shown[2]
    model.add([(Request(2, "sdb", Command.FLUSH, 0, 0, 0, 1.003, 0.001, 0), None)])
    flush = "".join(s.text for s in render_trace_line(model.lines[-1], 100))
    assert "flush on /dev/sdb " in flush, flush
