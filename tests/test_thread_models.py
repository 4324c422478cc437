"""Issue 19, item 2: an explicit stack, and the thread model the server applies.

Each layer names its ``next``; ``stack(top)`` lists them down to the source;
every member declares one of nbdkit's four thread models and the stack's is
the most serialised. The server applies it per request, proved here with a
real client (libnbd) and a source that holds every call until the test lets
it go, counting how many are inside at once: nothing is timed, each step
waits for the state it needs (calls inside the source, requests parsed and
waiting their turn in the server).
"""

from __future__ import annotations

import threading

import pytest
from fixtures_server import nbd_handle, wait_until

from diskwatch.server import serve_in_thread
from diskwatch.sources import SourceOptions, open_source
from diskwatch.sources.base import (
    PARALLEL,
    SERIALIZE_ALL_REQUESTS,
    SERIALIZE_CONNECTIONS,
    SERIALIZE_REQUESTS,
    Layer,
    ReadOnly,
    Source,
    stack,
    stack_thread_model,
)
from diskwatch.sources.snapshot import Snapshot
from diskwatch.sources.watch import Watch

nbd = pytest.importorskip("nbd")

KiB = 1024
#: connection A reads below SPLIT, connection B above: the source tells them apart
SPLIT = 64 * KiB
WAIT = 30.0  # bound on every wait: a failure guard, never a pause


class Gate(Source):
    """A blocking source (its calls run in the server's worker threads) that
    holds each read until ``let_go`` and records the offsets inside."""

    blocking = True
    size = 2 * SPLIT
    description = "gate"

    def __init__(self, model: str = PARALLEL):
        self.thread_model = model
        self.cond = threading.Condition()
        self.inside: list[int] = []
        self.most = 0
        self.permits = 0
        self.done = 0

    def pread(self, offset, length):
        with self.cond:
            self.inside.append(offset)
            self.most = max(self.most, len(self.inside))
            self.cond.notify_all()
            if not self.cond.wait_for(lambda: self.permits > 0, WAIT):
                raise OSError(5, "the test never let this read go")
            self.permits -= 1
            self.inside.remove(offset)
            self.done += 1
            self.cond.notify_all()
        return bytes(length)

    def let_go(self, n: int) -> None:
        with self.cond:
            self.permits += n
            self.cond.notify_all()

    def wait_inside(self, n: int, done: int = 0) -> list[int]:
        """Once ``n`` reads are inside and ``done`` have finished: the offsets inside."""
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.inside) == n and self.done == done,
                                      WAIT), (self.inside, self.done)
            return sorted(self.inside)


class Declares(Layer):
    """A layer that changes nothing but declares a thread model."""

    def __init__(self, next: Source, model: str):
        super().__init__(next)
        self.thread_model = model


@pytest.fixture
def serve():
    started = []

    def start(source: Source):
        running = serve_in_thread({"": source})
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


def waiting_turns(running) -> int:
    """Requests the server has parsed that wait for their turn."""
    return running.thread.call(
        lambda: sum(len(c.waiting) for c in running.server._conns.values()))


def send_reads(h, offsets: list[int]) -> list:
    return [h.aio_pread(nbd.Buffer(4 * KiB), off) for off in offsets]


def two_clients(serve, model: str, reads: int) -> tuple:
    """A Gate under a layer declaring ``model``, served; two connections
    that each send ``reads`` reads (a below SPLIT, b above) without waiting."""
    gate = Gate()
    running = serve(Declares(gate, model))
    a, b = nbd_handle(running.uri), nbd_handle(running.uri)
    send_reads(a, [i * 4 * KiB for i in range(reads)])
    send_reads(b, [SPLIT + i * 4 * KiB for i in range(reads)])
    return gate, running, a, b


def finish(*handles) -> None:
    for h in handles:
        while h.aio_in_flight():
            h.poll(-1)
        h.shutdown()


def test_serialize_all_requests_runs_one_request_at_a_time_across_connections(serve):
    gate, running, a, b = two_clients(serve, SERIALIZE_ALL_REQUESTS, 2)
    gate.wait_inside(1)
    # The three others reached the server, and wait there, not in the source.
    wait_until(lambda: waiting_turns(running) == 3, WAIT, "three requests waiting their turn")
    assert len(gate.inside) == 1
    for done in range(1, 4):
        gate.let_go(1)
        gate.wait_inside(1, done)
    gate.let_go(1)
    finish(a, b)
    assert gate.most == 1 and gate.done == 4


def test_serialize_requests_runs_connections_side_by_side_but_each_one_in_turn(serve):
    gate, running, a, b = two_clients(serve, SERIALIZE_REQUESTS, 3)
    inside = gate.wait_inside(2)  # one of each connection at once
    assert inside[0] < SPLIT <= inside[1], inside
    wait_until(lambda: waiting_turns(running) == 4, WAIT, "four requests waiting their turn")
    assert len(gate.inside) == 2
    gate.let_go(2)
    inside = gate.wait_inside(2, done=2)  # the next one of each
    assert inside[0] < SPLIT <= inside[1], inside
    gate.let_go(4)
    finish(a, b)
    assert gate.most == 2 and gate.done == 6


def test_parallel_stays_parallel(serve):
    gate, running, a, b = two_clients(serve, PARALLEL, 3)
    gate.wait_inside(6)  # every request of both connections in the source at once
    assert waiting_turns(running) == 0
    gate.let_go(6)
    finish(a, b)
    assert gate.most == 6


def test_serialize_connections_serves_a_second_client_once_the_first_has_gone(serve):
    gate = Gate(SERIALIZE_CONNECTIONS)  # the source itself declares it
    running = serve(gate)
    a = nbd_handle(running.uri)
    b = nbd_handle(running.uri)  # accepted: its handshake is done, then it waits
    send_reads(b, [SPLIT])
    send_reads(a, [0, 4 * KiB])
    assert gate.wait_inside(1) == [0]
    gate.let_go(1)
    assert gate.wait_inside(1, done=1) == [4 * KiB]  # a's next, not b's
    gate.let_go(1)
    while a.aio_in_flight():
        a.poll(-1)
    benched = running.thread.call(
        lambda: sorted(c.benched for c in running.server._conns.values()))
    assert benched == [False, True] and not gate.inside
    a.shutdown()
    assert gate.wait_inside(1, done=2) == [SPLIT]  # b is served once a has gone
    gate.let_go(1)
    finish(b)
    assert gate.most == 1


def test_a_serializing_inline_source_is_not_offloaded(serve, tmp_path):
    """A source that does not block is served on the loop's one thread; a
    big zero of a serialising stack stays there too, never beside it."""
    class Zeroes(Source):
        size = 64 * 1024 * 1024
        can_write = can_zero = True
        thread_model = SERIALIZE_REQUESTS

        def __init__(self):
            self.threads = set()

        def pwrite(self, offset, data, fua=False):
            self.threads.add(threading.current_thread().name)

        def zero(self, offset, length, may_trim=False, fua=False, fast=False):
            self.threads.add(threading.current_thread().name)

    src = Zeroes()
    running = serve(src)
    h = nbd_handle(running.uri)
    h.zero(32 * 1024 * 1024, 0)  # over INLINE_MAX: a worker's, were the stack parallel
    h.pwrite(b"x" * 4096, 0)
    h.shutdown()
    assert src.threads == {"diskwatch-server"}


# --- the stack, as a unit -------------------------------------------------


def test_a_stacks_model_is_the_most_serialised_of_its_members():
    src = Source()
    assert stack_thread_model(src) == PARALLEL
    assert stack_thread_model(ReadOnly(Declares(src, SERIALIZE_REQUESTS))) == SERIALIZE_REQUESTS
    top = Declares(Declares(Declares(src, SERIALIZE_REQUESTS), SERIALIZE_ALL_REQUESTS),
                   SERIALIZE_REQUESTS)
    assert stack_thread_model(top) == SERIALIZE_ALL_REQUESTS
    src.thread_model = SERIALIZE_CONNECTIONS
    assert stack_thread_model(top) == SERIALIZE_CONNECTIONS
    # A layer declares its own model: it does not take its next's.
    assert Declares(src, PARALLEL).thread_model == PARALLEL
    # The old name still means serialize_all_requests; others are refused.
    assert stack_thread_model(Declares(Source(), "serialize_all")) == SERIALIZE_ALL_REQUESTS
    with pytest.raises(ValueError, match="Declares: thread model must be one of"):
        stack_thread_model(Declares(Source(), "serial"))


def test_the_stack_is_listed_through_next_and_only_the_interface_passes_through(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1024 * 1024))
    top = open_source(str(image), SourceOptions(filters=["watch:image"], snapshot=True))
    try:
        snapshot, watch, file = stack(top)
        assert isinstance(snapshot, Snapshot) and isinstance(watch, Watch)
        assert snapshot.next is watch and watch.next is file and file.next is None
        assert snapshot.inner is watch  # the older name
        assert top.size == file.size  # the interface passes through...
        with pytest.raises(AttributeError):
            top.take_events  # noqa: B018 - ...a layer's own names do not
    finally:
        top.close()


def test_a_source_plugins_model_is_declared_in_its_stack():
    from diskwatch.sources.registry import SourcePlugin

    plugin = SourcePlugin(name="t-serial", summary="t", open=lambda spec, options: Gate(),
                          thread_model="serialize_all")
    assert plugin.thread_model == SERIALIZE_ALL_REQUESTS
    assert stack_thread_model(plugin.open_source("x", SourceOptions())) == SERIALIZE_ALL_REQUESTS
    with pytest.raises(ValueError, match="source plugin t-bad: thread model"):
        SourcePlugin(name="t-bad", summary="t", open=lambda spec, options: Gate(),
                     thread_model="threads")
