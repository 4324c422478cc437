"""Issue 9, item 6: TLS, as nbdkit and qemu-nbd do it.

Certificates are made here with certtool (gnutls-bin), keys with psktool;
the clients are libnbd's nbdinfo/nbdcopy and Python ``nbd``, and qemu-img
with ``--object tls-creds-x509``. Plain clients against ``--tls=require``
get nothing but refusals (checked byte by byte with a raw socket).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import ssl
import struct
import subprocess
from pathlib import Path

import pytest
from fixtures_server import SUBPROCESS_ENV, recv_exact, recv_until_closed, run_diskwatch

from diskwatch.server import protocol as P
from diskwatch.server import serve_in_thread
from diskwatch.server.tls import TLSError, make_tls
from diskwatch.sources.file import FileSource

MiB = 1 << 20


def _certtool(*args: str, cwd: Path) -> None:
    subprocess.run(["certtool", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="session")
def tls_dir(tmp_path_factory) -> Path:
    """A CA, a server certificate for localhost/127.0.0.1 and a client
    certificate (nbdkit's and qemu's file names), and a psktool key file."""
    if shutil.which("certtool") is None or shutil.which("psktool") is None:
        pytest.fail("certtool/psktool missing: apt-get install gnutls-bin (make setup does)")
    d = tmp_path_factory.mktemp("tls")
    templates = {
        "ca.info": "cn = diskwatch test CA\nca\ncert_signing_key\nexpiration_days = 3\n",
        "server.info": "organization = diskwatch\ncn = localhost\ndns_name = localhost\n"
                       "ip_address = 127.0.0.1\ntls_www_server\nencryption_key\nsigning_key\n"
                       "expiration_days = 3\n",
        "client.info": "organization = diskwatch\ncn = client\ntls_www_client\n"
                       "encryption_key\nsigning_key\nexpiration_days = 3\n",
    }
    for name, text in templates.items():
        (d / name).write_text(text)
    for key in ("ca-key.pem", "server-key.pem", "client-key.pem"):
        _certtool("--generate-privkey", "--outfile", key, cwd=d)
    _certtool("--generate-self-signed", "--load-privkey", "ca-key.pem", "--template", "ca.info",
              "--outfile", "ca-cert.pem", cwd=d)
    for who in ("server", "client"):
        _certtool("--generate-certificate", "--load-ca-certificate", "ca-cert.pem",
                  "--load-ca-privkey", "ca-key.pem", "--load-privkey", f"{who}-key.pem",
                  "--template", f"{who}.info", "--outfile", f"{who}-cert.pem", cwd=d)
    subprocess.run(["psktool", "-u", "alice", "-p", "keys.psk"], cwd=d, check=True,
                   capture_output=True)
    # A client that trusts the CA but has no certificate of its own.
    (d / "nocert").mkdir()
    shutil.copy(d / "ca-cert.pem", d / "nocert" / "ca-cert.pem")
    return d


@pytest.fixture(scope="session")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tls-image") / "disk.img"
    path.write_bytes(os.urandom(16 * MiB))
    os.chmod(path, 0o444)
    return path


@pytest.fixture
def tls_server(image, tls_dir):
    running = []

    def start(mode="require", *, readonly=True, path=None, tcp=False, **kw):
        tls = make_tls(mode, **kw)
        rs = serve_in_thread({"": FileSource(str(path or image), readonly=readonly)}, tls=tls,
                             tcp_port=0 if tcp else None)
        running.append(rs)
        return rs

    yield start
    for rs in running:
        rs.stop()


def run(cmd: list, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, timeout=60,
                          env=SUBPROCESS_ENV, **kw)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# --- the protocol (sans-IO) --------------------------------------------------------

def options_of(conn: P.ServerConnection, *options: tuple[int, bytes]) -> list[tuple]:
    """Feed a fixed newstyle client's flags and options; the replies as
    (option, type, data)."""
    conn.data_to_send()  # the greeting
    conn.receive_data(struct.pack(">I", P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES))
    return options_of_more(conn, *options)


EXPORTS = {"": P.Export(name="", size=MiB)}
GO_DEFAULT = struct.pack(">IH", 0, 0)


def test_require_refuses_every_option_but_starttls_and_abort():
    conn = P.ServerConnection(EXPORTS, tls="require")
    asked = [P.OPT_LIST, P.OPT_STRUCTURED_REPLY, P.OPT_INFO, P.OPT_GO,
             P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT, 9, 99]
    replies = options_of(conn, *[(o, GO_DEFAULT if o in (P.OPT_INFO, P.OPT_GO) else b"")
                                 for o in asked])
    assert [(o, t) for o, t, _ in replies] == [(o, P.REP_ERR_TLS_REQD) for o in asked]
    assert conn.phase == P.OPTIONS and not conn.structured
    assert options_of(P.ServerConnection(EXPORTS, tls="require"),
                      (P.OPT_ABORT, b""))[0][:2] == (P.OPT_ABORT, P.REP_ACK)


def test_require_ends_the_session_on_export_name_and_non_fixed_clients():
    conn = P.ServerConnection(EXPORTS, tls="require")
    assert options_of(conn, (P.OPT_EXPORT_NAME, b"")) == []
    assert conn.phase == P.CLOSED and "TLS is required" in conn.close_reason
    conn = P.ServerConnection(EXPORTS, tls="require")
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", 0))  # no NBD_FLAG_C_FIXED_NEWSTYLE
    assert conn.phase == P.CLOSED and conn.data_to_send() == b""


def test_starttls_ack_then_nothing_is_parsed_until_the_switch():
    conn = P.ServerConnection(EXPORTS, tls="on")
    after = b"\x16\x03\x01 the client hello, pipelined"
    replies = options_of(conn, (P.OPT_STRUCTURED_REPLY, b""), (P.OPT_STARTTLS, b""))
    assert [(o, t) for o, t, _ in replies] == [(P.OPT_STRUCTURED_REPLY, P.REP_ACK),
                                              (P.OPT_STARTTLS, P.REP_ACK)]
    assert conn.starttls and conn.structured
    conn.receive_data(after)
    assert conn.data_to_send() == b""  # not taken for options
    assert conn.start_tls() == after
    # nothing negotiated in the clear survives the upgrade
    assert conn.tls_active and not conn.starttls and not conn.structured
    replies = options_of_more(conn, (P.OPT_STARTTLS, b""), (P.OPT_GO, GO_DEFAULT))
    assert replies[0][:2] == (P.OPT_STARTTLS, P.REP_ERR_INVALID)
    assert replies[-1][:2] == (P.OPT_GO, P.REP_ACK) and conn.phase == P.TRANSMISSION


def options_of_more(conn: P.ServerConnection, *options) -> list[tuple]:
    """Feed more options (the flags were sent); the replies as (option,
    type, data)."""
    for opt, data in options:
        conn.receive_data(struct.pack(">QII", P.IHAVEOPT, opt, len(data)) + data)
    out = conn.data_to_send()
    replies = []
    while out:
        _, opt, rtype, n = struct.unpack_from(">QIII", out)
        replies.append((opt, rtype, out[20:20 + n]))
        out = out[20 + n:]
    return replies


def test_starttls_when_off_or_with_data():
    assert options_of(P.ServerConnection(EXPORTS), (P.OPT_STARTTLS, b""))[0][1] == \
        P.REP_ERR_POLICY
    conn = P.ServerConnection(EXPORTS, tls="on")
    assert options_of(conn, (P.OPT_STARTTLS, b"x"))[0][1] == P.REP_ERR_INVALID
    assert not conn.starttls


# --- real clients ------------------------------------------------------------------------

@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_libnbd_reads_everything_over_tls_with_certificates(tls_server, tls_dir, image, tcp):
    rs = tls_server("require", certificates=str(tls_dir), tcp=tcp)
    assert rs.uri.startswith("nbds://127.0.0.1:" if tcp else "nbds+unix:///?socket=")
    uri = f"{rs.uri}{'?' if tcp else '&'}tls-certificates={tls_dir}"
    p = run(["nbdcopy", "--connections=4", "--requests=16", uri, "-"])
    assert p.returncode == 0, p.stderr
    assert md5(p.stdout) == md5(image.read_bytes())


def test_writes_over_tls_land_on_disk(tls_server, tls_dir, image, tmp_path):
    """Writes of every size, including one larger than the receive buffer (it
    fills while TLS still holds records: the buffered path)."""
    import nbd
    target = tmp_path / "rw.img"
    target.write_bytes(bytes(16 * MiB))
    rs = tls_server("require", certificates=str(tls_dir), readonly=False, path=target)
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(str(tls_dir))
    h.connect_uri(rs.uri)
    data = image.read_bytes()
    h.pwrite(data[:12 * MiB], 0)  # one 12 MiB request
    for off in range(12 * MiB, 16 * MiB, 65536):
        h.aio_pwrite(data[off:off + 65536], off)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    h.flush()
    assert h.pread(4096, 5 * MiB) == data[5 * MiB:5 * MiB + 4096]
    h.shutdown()
    assert md5(target.read_bytes()) == md5(data)


def test_plain_client_against_require_gets_only_refusals(tls_server, tls_dir):
    rs = tls_server("require", certificates=str(tls_dir))
    p = run(["nbdinfo", "--size", rs.uri.replace("nbds+unix", "nbd+unix")])
    assert p.returncode != 0 and b"requires TLS" in p.stderr
    # Byte by byte: every option is refused, EXPORT_NAME gets the door.
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(rs.socket_path)
        recv_exact(s, 18)
        s.sendall(struct.pack(">I", P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES))
        for opt, data in ((P.OPT_LIST, b""), (P.OPT_GO, GO_DEFAULT), (P.OPT_INFO, GO_DEFAULT),
                          (P.OPT_STRUCTURED_REPLY, b"")):
            s.sendall(struct.pack(">QII", P.IHAVEOPT, opt, len(data)) + data)
            magic, ropt, rtype, n = struct.unpack(">QIII", recv_exact(s, 20))
            assert (ropt, rtype) == (opt, P.REP_ERR_TLS_REQD)
            assert b"TLS is required" in recv_exact(s, n)
        s.sendall(struct.pack(">QII", P.IHAVEOPT, P.OPT_EXPORT_NAME, 0))
        assert recv_until_closed(s) == b""  # no size, no flags, no data


def test_tls_on_serves_plain_and_tls_clients(tls_server, tls_dir, image):
    rs = tls_server("on", certificates=str(tls_dir))
    size = str(image.stat().st_size).encode()
    plain = run(["nbdinfo", "--size", rs.uri.replace("nbds+unix", "nbd+unix")])
    secure = run(["nbdinfo", "--size", f"{rs.uri}&tls-certificates={tls_dir}"])
    assert plain.stdout.strip() == size and secure.stdout.strip() == size, (plain, secure)


def qemu_img_convert(sock: str, creds: Path, out: Path) -> subprocess.CompletedProcess:
    return run(["qemu-img", "convert", "--object",
                f"tls-creds-x509,id=tls0,endpoint=client,dir={creds}", "--image-opts",
                f"driver=nbd,server.type=unix,server.path={sock},tls-creds=tls0,"
                "tls-hostname=localhost", "-O", "raw", out])


def test_qemu_img_over_tls_and_verify_peer(tls_server, tls_dir, image, tmp_path):
    rs = tls_server("require", certificates=str(tls_dir), verify_peer=True)
    out = tmp_path / "copy.raw"
    p = qemu_img_convert(rs.socket_path, tls_dir, out)
    assert p.returncode == 0, p.stderr
    assert md5(out.read_bytes()) == md5(image.read_bytes())
    # Without a client certificate the handshake fails: no data.
    p = qemu_img_convert(rs.socket_path, tls_dir / "nocert", tmp_path / "nothing.raw")
    assert p.returncode != 0 and not (tmp_path / "nothing.raw").exists()
    p = run(["nbdinfo", "--size", f"{rs.uri}&tls-certificates={tls_dir / 'nocert'}"])
    assert p.returncode != 0 and p.stdout == b""
    p = run(["nbdinfo", "--size", f"{rs.uri}&tls-certificates={tls_dir}"])
    assert p.stdout.strip() == str(image.stat().st_size).encode(), p.stderr


def test_psk(tls_server, tls_dir, image, tmp_path):
    rs = tls_server("require", psk=str(tls_dir / "keys.psk"))
    uri = rs.uri.replace("nbds+unix://", "nbds+unix://alice@")
    p = run(["nbdcopy", f"{uri}&tls-psk-file={tls_dir / 'keys.psk'}", "-"])
    assert p.returncode == 0, p.stderr
    assert md5(p.stdout) == md5(image.read_bytes())
    wrong = tmp_path / "wrong.psk"
    wrong.write_text("alice:" + "00" * 32 + "\n")
    p = run(["nbdinfo", "--size", f"{uri}&tls-psk-file={wrong}"])
    assert p.returncode != 0 and p.stdout == b""
    other = tmp_path / "other.psk"
    other.write_text("mallory:" + "11" * 32 + "\n")
    p = run(["nbdinfo", "--size",
             f"{rs.uri.replace('nbds+unix://', 'nbds+unix://mallory@')}&tls-psk-file={other}"])
    assert p.returncode != 0 and p.stdout == b""


# --- the command line ----------------------------------------------------------------------

PRINT_URI = 'printf "%s\\n" "uri=$uri" "nbd=$nbd"'


def test_captive_uri_under_tls_is_nbds_like_nbdkit(image, tls_dir):
    ours = run_diskwatch([image, "-r", "--tls=require", "--tls-certificates", tls_dir,
                          "--headless", "--no-trace", "--run",
                          PRINT_URI + f' && nbdinfo --size "$uri&tls-certificates={tls_dir}"'])
    assert ours.returncode == 0, ours.stderr
    theirs = subprocess.run(["nbdkit", "-U", "-", "--tls=require",
                             f"--tls-certificates={tls_dir}", "memory", "1M", "--run",
                             PRINT_URI], capture_output=True, text=True, timeout=30,
                            env=SUBPROCESS_ENV)
    for out in (ours.stdout, theirs.stdout):
        lines = dict(ln.split("=", 1) for ln in out.splitlines() if "=" in ln)
        assert lines["uri"].startswith("nbds+unix://") and lines["nbd"] == lines["uri"]
    assert str(image.stat().st_size) in ours.stdout.splitlines()


@pytest.mark.parametrize("args,message", [
    (["--tls=on"], "--tls=on needs --tls-certificates DIR or --tls-psk FILE (one of them)"),
    (["--tls-certificates", "/nonexistent"],
     "--tls-certificates, --tls-psk and --tls-verify-peer need --tls=on or --tls=require"),
    (["--tls=require", "--tls-certificates", "/nonexistent"],
     "--tls-certificates /nonexistent: no server-cert.pem there (nbdkit's and qemu's layout: "
     "ca-cert.pem, server-cert.pem, server-key.pem)"),
    (["--tls=require", "--tls-psk", "/nonexistent"],
     "--tls-psk /nonexistent: No such file or directory"),
])
def test_bad_tls_settings_are_one_line(image, args, message):
    p = run_diskwatch([image, "-r", *args, "--headless", "--run", "true"])
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [f"diskwatch: {message}"]


def test_psk_file_format_is_checked(tmp_path):
    bad = tmp_path / "bad.psk"
    bad.write_text("alice:abc\n")  # odd number of hex digits
    with pytest.raises(TLSError, match=r"bad.psk:1: not 'username:hexkey'"):
        make_tls("on", psk=str(bad))
    empty = tmp_path / "empty.psk"
    empty.write_text("\n")
    with pytest.raises(TLSError, match="no keys in it"):
        make_tls("on", psk=str(empty))
    binary = tmp_path / "binary.psk"
    binary.write_bytes(b"\xff\xfe:abcd\n")
    with pytest.raises(TLSError, match=r"binary.psk: not text"):
        make_tls("on", psk=str(binary))


# --- by hand: a pipelined ClientHello, STARTTLS twice, garbage instead of TLS ----------

def _tls_client(tls_dir: Path):
    ctx = ssl.create_default_context(cafile=str(tls_dir / "ca-cert.pem"))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    return ctx.wrap_bio(incoming, outgoing, server_hostname="localhost"), incoming, outgoing


def _option_header(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", P.IHAVEOPT, opt, len(data)) + data


def test_pipelined_client_hello_and_a_second_starttls(tls_server, tls_dir, image):
    """The ClientHello sent with STARTTLS, before its ACK (the bytes past the
    option start the TLS stream); over TLS, STARTTLS again is INVALID and GO
    works; reads return the image's bytes."""
    rs = tls_server("require", certificates=str(tls_dir))
    obj, incoming, outgoing = _tls_client(tls_dir)
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(rs.socket_path)
        recv_exact(s, 18)
        with pytest.raises(ssl.SSLWantReadError):
            obj.do_handshake()
        hello = outgoing.read()
        s.sendall(struct.pack(">I", P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES)
                  + _option_header(P.OPT_STARTTLS) + hello)
        _, opt, rtype, n = struct.unpack(">QIII", recv_exact(s, 20))
        assert (opt, rtype, n) == (P.OPT_STARTTLS, P.REP_ACK, 0)

        def pump_until(done):
            while True:
                try:
                    return done()
                except ssl.SSLWantReadError:
                    s.sendall(outgoing.read())
                    data = s.recv(65536)
                    assert data, "the server closed the connection"
                    incoming.write(data)

        pump_until(obj.do_handshake)
        s.sendall(outgoing.read())

        def send(data: bytes) -> None:
            obj.write(data)
            s.sendall(outgoing.read())

        def recv(n: int) -> bytes:
            out = b""
            while len(out) < n:
                want = n - len(out)
                out += pump_until(lambda want=want: obj.read(want))
            return out

        send(_option_header(P.OPT_STARTTLS))
        _, opt, rtype, n = struct.unpack(">QIII", recv(20))
        assert (opt, rtype) == (P.OPT_STARTTLS, P.REP_ERR_INVALID)
        recv(n)
        send(_option_header(P.OPT_GO, GO_DEFAULT))
        while True:
            _, opt, rtype, n = struct.unpack(">QIII", recv(20))
            recv(n)
            if rtype == P.REP_ACK:
                break
            assert rtype == P.REP_INFO
        send(struct.pack(">IHHQQI", P.REQUEST_MAGIC, 0, P.CMD_READ, 7, MiB, 65536))
        magic, err, handle = struct.unpack(">IIQ", recv(16))
        assert (magic, err, handle) == (P.SIMPLE_REPLY_MAGIC, 0, 7)
        with open(image, "rb") as f:
            f.seek(MiB)
            assert recv(65536) == f.read(65536)


def test_garbage_instead_of_a_handshake_closes_only_that_connection(tls_server, tls_dir, image):
    rs = tls_server("require", certificates=str(tls_dir))
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(rs.socket_path)
        recv_exact(s, 18)
        s.sendall(struct.pack(">I", P.FLAG_C_FIXED_NEWSTYLE) + _option_header(P.OPT_STARTTLS))
        assert struct.unpack(">QIII", recv_exact(s, 20))[2] == P.REP_ACK
        s.sendall(b"GET / HTTP/1.0\r\n\r\n" * 100)
        recv_until_closed(s)  # whatever alert TLS sends, then the end
    p = run(["nbdinfo", "--size", f"{rs.uri}&tls-certificates={tls_dir}"])
    assert p.stdout.strip() == str(image.stat().st_size).encode(), p.stderr


# --- big replies encrypted off the loop's thread (issue 19, item 1) ---------------------

def _tls_handle(rs, tls_dir: Path):
    import nbd
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(str(tls_dir))
    h.connect_uri(rs.uri)
    return h


@pytest.mark.usefixtures("no_loop_errors")
def test_big_replies_are_encrypted_off_the_loop_and_small_ones_on_it(tls_server, tls_dir,
                                                                     image):
    rs = tls_server("require", certificates=str(tls_dir))
    encryptor = rs.server._encryptor
    data = image.read_bytes()
    handles = [_tls_handle(rs, tls_dir) for _ in range(3)]
    for h in handles:  # 4 KiB reads, one at a time: every reply encrypted on the loop
        assert h.pread(4096, 3 * MiB) == data[3 * MiB:3 * MiB + 4096]
    assert encryptor.jobs == 0
    # Three connections, big reads in flight on each: the encryptor's threads.
    offsets = list(range(0, 16 * MiB, MiB))
    bufs = {}
    import nbd
    for i, off in enumerate(offsets):
        h = handles[i % 3]
        buf = nbd.Buffer(MiB)
        h.aio_pread(buf, off)
        bufs[off] = buf
    for h in handles:
        while h.aio_in_flight() > 0:
            h.poll(-1)
    for off, buf in bufs.items():
        assert buf.to_bytearray() == data[off:off + MiB], off
    assert encryptor.jobs >= 16 * MiB // (256 * 1024)
    assert all(h.pread(65536, 5 * MiB) == data[5 * MiB:5 * MiB + 65536] for h in handles)
    for h in handles:
        h.shutdown()


@pytest.mark.usefixtures("no_loop_errors")
def test_a_tls_client_that_leaves_mid_reply_or_never_reads_costs_only_itself(tls_server,
                                                                             tls_dir, image):
    """Big replies encrypting while the client goes away, or while it does
    not read: that connection alone ends or waits (bounded), the others are
    served, and the one that waited gets every byte once it reads."""
    import nbd
    rs = tls_server("require", certificates=str(tls_dir))
    data = image.read_bytes()
    for _ in range(5):
        h = _tls_handle(rs, tls_dir)
        for off in range(0, 8 * MiB, 2 * MiB):
            h.aio_pread(nbd.Buffer(2 * MiB), off)
        h.poll(0)
        # gone, its replies half encrypted and half sent
        with socket.socket(fileno=os.dup(h.aio_get_fd())) as s:
            s.shutdown(socket.SHUT_RDWR)
        del h
    slow = _tls_handle(rs, tls_dir)
    bufs = [(off, nbd.Buffer(2 * MiB)) for off in range(0, 16 * MiB, 2 * MiB)] * 4
    cookies = [slow.aio_pread(buf, off) for off, buf in bufs]
    bystander = _tls_handle(rs, tls_dir)
    assert bystander.pread(MiB, 9 * MiB) == data[9 * MiB:10 * MiB]
    server = rs.server
    assert server.peak_bytes <= 2 * (32 * MiB + 64 * MiB)  # its budget, not all it asked
    while slow.aio_in_flight() > 0:
        slow.poll(-1)
    assert all(slow.aio_command_completed(c) for c in cookies)
    for off, buf in bufs[:8]:
        assert buf.to_bytearray() == data[off:off + 2 * MiB]
    slow.shutdown()
    bystander.shutdown()
    assert rs.server._encryptor.jobs > 0


SHRUNK_CLIENT = """
import os, sys, nbd
h = nbd.NBD()
h.set_tls(nbd.TLS_REQUIRE)
h.set_tls_certificates(sys.argv[2])
h.connect_uri(os.environ["uri"])
before = h.pread(4096, 12 * 2**20)
os.truncate(sys.argv[1], 4 * 2**20)  # the image shrinks under the server
for offset in (12 * 2**20, 0):
    try:
        print(offset, "read", len(h.pread(4096, offset)))
    except nbd.Error as e:
        print(offset, "error", e.errno)
h.shutdown()
"""


def test_an_image_shrunk_under_a_tls_client_fails_that_read_not_the_server(tls_dir, tmp_path):
    """TLS encrypts in user space: a reply read from the mmap'd file past its
    new end would be a SIGBUS for the whole server (a plain send gets EFAULT
    from the kernel). Under TLS the bytes are read with pread: that read
    fails, alone, and the server goes on."""
    img = tmp_path / "shrinks.img"
    img.write_bytes(os.urandom(16 * MiB))
    script = tmp_path / "client.py"
    script.write_text(SHRUNK_CLIENT)
    r = run_diskwatch([img, "-r", "--tls=require", "--tls-certificates", tls_dir, "--headless",
                       "--no-trace", "--run", f"/usr/bin/python3 {script} {img} {tls_dir}"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == [f"{12 * MiB} error EIO", "0 read 4096"], r.stdout + r.stderr
