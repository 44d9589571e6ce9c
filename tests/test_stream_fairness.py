"""A zpub stream stays fair: a subscriber that reads too slowly, or floods the publisher with subscriptions and
connections, is cut, and a good subscriber keeps every batch, in order (issue 21, item 4)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import zmq
import zmq.utils.monitor
from helpers import READY_SECONDS

from tensorcom import ConfigError, Connection, Server, Timeout

SEND_SECONDS = 45.0  # what a test's batches may take at most: seconds when bounded, far longer when not


def raw_subscriber(address: str, topic: bytes = b"") -> zmq.Socket[Any]:
    """A plain zmq SUB with small buffers, which stays away once cut (no reconnection within a test)."""
    subscriber = zmq.Context.instance().socket(zmq.SUB)
    for option, value in ((zmq.RCVHWM, 1), (zmq.RCVBUF, 4096), (zmq.LINGER, 0), (zmq.RECONNECT_IVL, 600_000)):
        subscriber.setsockopt(option, value)
    subscriber.setsockopt(zmq.SUBSCRIBE, topic)
    subscriber.connect(address)
    return subscriber


def zsub(address: str) -> str:
    return address.replace("tcp://", "zsub://").replace("ipc://", "zsub+ipc://")


def publish(publisher: Server, count: int, size: int, first: int = 0) -> None:
    """Send batches ``first .. first + count - 1`` (arrays full of their number), failing if they take far longer
    than a bounded stream ever needs."""
    deadline = time.monotonic() + SEND_SECONDS
    for index in range(first, first + count):
        if time.monotonic() > deadline:
            pytest.fail(
                f"only {index - first} of {count} batches sent in {SEND_SECONDS:.0f} s: the stream is held"
            )
        publisher.send([np.full(size, index, np.int64)])


def warm_up(publisher: Server, size: int, *ready: Callable[[], bool]) -> None:
    """Send marker batches (-1) until every ``ready()`` says its subscriber has one."""
    done = [False] * len(ready)
    deadline = time.monotonic() + READY_SECONDS
    while not all(done):
        if time.monotonic() > deadline:
            pytest.fail(f"subscribers not receiving after {READY_SECONDS:.0f} s: {done}")
        publisher.send([np.full(size, -1, np.int64)])
        done = [flag or check() for flag, check in zip(done, ready, strict=True)]


class Reader(threading.Thread):
    """Reads a Connection's batches into ``received`` (markers -1 left out) until ``count`` have arrived, after
    ``pause`` seconds per batch."""

    def __init__(self, connection: Connection, count: int, pause: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.connection = connection
        self.count = count
        self.pause = pause
        self.received: list[int] = []

    def run(self) -> None:
        while len(self.received) < self.count:
            value = int(self.connection.recv()[0][0])
            if value >= 0:
                self.received.append(value)
            time.sleep(self.pause)


def got_one(connection: Connection) -> Callable[[], bool]:
    def check() -> bool:
        try:
            connection.recv()
        except Timeout:
            return False
        return True

    return check


def got_raw(subscriber: zmq.Socket[Any]) -> Callable[[], bool]:
    def check() -> bool:
        if subscriber.poll(0):
            subscriber.recv_multipart()
            return True
        return False

    return check


@pytest.fixture
def transport_address(request: pytest.FixtureRequest, ipc_url: Callable[..., str]) -> Iterator[str]:
    yield "zpub://127.0.0.1:0" if request.param == "tcp" else ipc_url("zpub")


@pytest.mark.parametrize("transport_address", ["tcp", "ipc"], indirect=True)
def test_a_subscriber_that_reads_too_slowly_is_cut_and_the_others_keep_every_batch(
    transport_address: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A subscriber that takes a batch every 0.8 stall_timeout never stalls a send for a whole stall_timeout, yet
    XPUB_NODROP would hold the stream to its pace: once it has held the stream more than half the time while
    the good subscriber waited, for about stall_timeout, it is cut (one log line), and the good one gets every
    batch in order."""
    stall = 1.0
    publisher = Server(
        None, transport_address, queue=2, send_timeout=SEND_SECONDS, stall_timeout=stall, linger=0
    )
    address = publisher.endpoints[0]
    slow = raw_subscriber(address)
    count, size = 300, 1 << 13
    stop = threading.Event()
    slow_reads = [0]

    def read_slowly() -> None:
        while not stop.wait(0.8 * stall):
            if slow.poll(0):
                slow.recv_multipart()
                slow_reads[0] += 1

    with Connection(zsub(address), timeout=1) as good:
        warm_up(publisher, size, got_raw(slow), got_one(good))
        good.timeout = SEND_SECONDS
        slow_reader = threading.Thread(target=read_slowly, daemon=True)
        slow_reader.start()
        reader = Reader(good, count)
        reader.start()
        with caplog.at_level("WARNING", logger="tensorcom.server.stream"):
            publish(publisher, count, size)
        reader.join(SEND_SECONDS)
        stop.set()
        slow_reader.join(READY_SECONDS)
    slow.close()
    publisher.close()
    assert reader.received == list(range(count))
    assert publisher.cut_subscribers == 1
    cuts = [record.getMessage() for record in caplog.records if "cut 1 subscriber" in record.getMessage()]
    assert len(cuts) == 1 and "held the stream" in cuts[0], cuts


@pytest.mark.parametrize("transport_address", ["tcp", "ipc"], indirect=True)
def test_a_slow_subscriber_nobody_waits_for_is_never_cut(
    transport_address: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A subscriber slower than the server is no one's fault when no other subscriber waits for it: it holds every
    send for many stall_timeouts' worth of budget and keeps its stream; over TCP also beside a connection that
    receives nothing (another topic; ipc has no byte counters to tell such a connection from a waiting one)."""
    stall = 0.5
    publisher = Server(
        None,
        transport_address + "?topic=train",
        queue=2,
        send_timeout=SEND_SECONDS,
        stall_timeout=stall,
        linger=0,
    )
    address = publisher.endpoints[0]
    idle = raw_subscriber(address, b"val") if address.startswith("tcp://") else None
    count, size, pause = 200, 1 << 14, 0.02  # 4 s of reading, 8 stall_timeouts; 26 MB: buffers fill
    with Connection(zsub(address) + "?topic=train", timeout=1) as paced:
        warm_up(publisher, size, got_one(paced))
        paced.timeout = SEND_SECONDS
        reader = Reader(paced, count, pause)
        reader.start()
        with caplog.at_level("WARNING", logger="tensorcom.server.stream"):
            publish(publisher, count, size)
        reader.join(SEND_SECONDS)
    if idle is not None:
        assert not idle.poll(0)
        idle.close()
    publisher.close()
    assert reader.received == list(range(count))
    assert publisher.cut_subscribers == 0, [record.getMessage() for record in caplog.records]


_SHORT_FLOOD = r"""
import sys, zmq
address, connections, per_connection = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
context, cut, index = zmq.Context(), 0, 0
for number in range(connections):
    socket = context.socket(zmq.XSUB)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SNDHWM, 100_000)
    monitor = socket.get_monitor_socket(zmq.EVENT_DISCONNECTED, addr=f"inproc://monitor-{number}")
    socket.connect(address)
    for _ in range(per_connection):  # distinct, 255 bytes: the longest a zpub socket takes
        socket.send(b"\x01" + index.to_bytes(8, "big") * 31 + b"\x00" * 6)
        index += 1
    cut += bool(monitor.poll(5_000))  # a patient attacker: waits until all is sent (cut within ms here)
    monitor.close()
    socket.close()
print(cut, flush=True)
"""


def test_short_odd_subscriptions_on_many_connections_are_cut_and_the_stream_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Distinct 255-byte subscriptions, 200 to a connection (51 kB) over 20 connections: every connection that
    sends more than a subscriber's handshake and topic is cut, by a thread that does not wait for the sending
    thread's next look (libzmq applies them inside the publisher's own calls), and the good subscriber gets every
    batch in order all along."""
    publisher = Server(None, "zpub://127.0.0.1:0", queue=2, send_timeout=SEND_SECONDS, linger=0)
    address = publisher.endpoints[0]
    connections = 20
    with Connection(zsub(address), timeout=1) as good:
        warm_up(publisher, 1024, got_one(good))
        good.timeout = SEND_SECONDS
        reader = Reader(good, 10**9)
        reader.start()
        attacker = subprocess.Popen(
            [sys.executable, "-c", _SHORT_FLOOD, address, str(connections), "200"], stdout=subprocess.PIPE
        )
        sent = 0
        with caplog.at_level("WARNING", logger="tensorcom.server.stream"):
            while attacker.poll() is None or sent < 100:  # publish all along the flood
                publish(publisher, 1, 1024, sent)
                sent += 1
        output, _ = attacker.communicate(timeout=READY_SECONDS)
        reader.count = sent
        publisher.send([np.full(1024, -1, np.int64)])  # wakes the reader if it already has them all
        reader.join(SEND_SECONDS)
    publisher.close()
    assert reader.received == list(range(sent))
    assert int(output) == connections  # each saw its connection cut
    assert publisher.refused_subscribers >= connections
    assert "that sent more than" in caplog.text


@pytest.mark.parametrize("transport_address", ["tcp", "ipc"], indirect=True)
def test_connections_beyond_max_subscribers_are_refused_and_the_others_keep_every_batch(
    transport_address: str, caplog: pytest.LogCaptureFixture
) -> None:
    """With max_subscribers=2, a third connection is shut down (one log line) and the two subscribers keep every
    batch, in order."""
    publisher = Server(None, transport_address, send_timeout=SEND_SECONDS, linger=0, max_subscribers=2)
    address = publisher.endpoints[0]
    count = 50
    with Connection(zsub(address), timeout=1) as first, Connection(zsub(address), timeout=1) as second:
        warm_up(publisher, 1024, got_one(first), got_one(second))
        for connection in (first, second):
            connection.timeout = SEND_SECONDS
        readers = [Reader(first, count), Reader(second, count)]
        for reader in readers:
            reader.start()
        extra = zmq.Context.instance().socket(zmq.SUB)
        extra.setsockopt(zmq.LINGER, 0)
        extra.setsockopt(zmq.RECONNECT_IVL, 600_000)  # once refused, it stays away for this test
        extra.setsockopt(zmq.SUBSCRIBE, b"")
        monitor = extra.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        extra.connect(address)
        with caplog.at_level("WARNING", logger="tensorcom.server.stream"):
            sent, deadline = 0, time.monotonic() + SEND_SECONDS
            while not monitor.poll(0):  # the refusal is an event the third peer sees (while it reads)
                if time.monotonic() > deadline:
                    pytest.fail(f"the third connection to {address} was not refused in {SEND_SECONDS:.0f} s")
                while extra.poll(0):
                    extra.recv_multipart()
                if sent < count:
                    publish(publisher, 1, 1024, sent)
                    sent += 1
                else:
                    time.sleep(0.01)
            publish(publisher, count - sent, 1024, sent)
        for reader in readers:
            reader.join(SEND_SECONDS)
        monitor.close()
        extra.close()
    publisher.close()
    assert [reader.received for reader in readers] == [list(range(count))] * 2
    assert publisher.refused_subscribers == 1
    assert sum("refused 1 connection" in record.getMessage() for record in caplog.records) == 1


def test_max_subscribers_must_be_positive() -> None:
    """max_subscribers=0 is a configuration error naming the value."""
    with pytest.raises(ConfigError, match="max_subscribers must be >= 1. Found: 0"):
        Server(None, "zpub://127.0.0.1:0", max_subscribers=0)
