"""Many servers into one rank (issue 20, item 3): a Connection's ZeroMQ I/O threads (``io_threads=``, with a default
from its number of sockets) and striping one server over several sockets (``stripes=``), over real sockets."""

from __future__ import annotations

import functools
import os
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import factories
import numpy as np
import pytest
import zmq
from helpers import assert_same_batches, wait_until

from tensorcom import ConfigError, Connection, Server, Timeout
from tensorcom.client import request as request_client
from tensorcom.client._base import MAX_DEFAULT_IO_THREADS, default_io_threads
from tensorcom.client.request import EXPECTED_WORKERS


def reference(count: int, seed: int, factory: Any = factories.small) -> list[Any]:
    """The first ``count`` batches of the pipeline for ``seed`` (rank 0 of 1)."""
    with factory(seed=seed, rank=0, world_size=1) as pipeline:
        return [next(pipeline) for _ in range(count)]


ENDLESS = functools.partial(factories.small, n=400, repeating=True)


def io_threads_of(connection: Any) -> int:
    return int(connection._context.get(zmq.IO_THREADS))


# io_threads


@pytest.mark.parametrize(
    "sockets, expected",
    [(1, 1), (2, 1), (3, 2), (4, 2), (8, 4), (100, MAX_DEFAULT_IO_THREADS)],
    ids=["1", "2", "3", "4", "8", "100"],
)
def test_default_io_threads_grow_with_the_sockets(sockets: int, expected: int) -> None:
    """One I/O thread for one or two sockets, one more per two further sockets, capped."""
    assert default_io_threads(sockets) == expected


def test_stream_connection_honours_io_threads() -> None:
    """io_threads=3 is the context's IO_THREADS; the default for four bound URLs is two threads."""
    with Connection("zpull://127.0.0.1:0", io_threads=3, timeout=5) as connection:
        assert connection.io_threads == 3 and io_threads_of(connection) == 3
    with Connection(["zpull://127.0.0.1:0"] * 4, timeout=5) as connection:
        assert connection.io_threads == 2 and io_threads_of(connection) == 2
    with Connection("zrpull://127.0.0.1:1", stripes=4, timeout=5) as connection:  # four sockets to one server
        assert len(connection.endpoints) == 4 and io_threads_of(connection) == 2


@pytest.mark.parametrize("cpus", [1, 2, 16])
def test_request_connection_honours_io_threads(
    serving: Any, monkeypatch: pytest.MonkeyPatch, cpus: int
) -> None:
    """A zreq connection's context has the threads asked for; by default one per worker connection it expects
    (two per server), at most MAX_DEFAULT_IO_THREADS and at most the CPUs it may run on."""
    monkeypatch.setattr(request_client, "usable_cpus", lambda: cpus)
    server = serving(workers=0)
    with Connection(server.client_urls[0], io_threads=3, timeout=60) as connection:
        assert io_threads_of(connection) == 3
        connection.recv()
    assert EXPECTED_WORKERS == 2 and MAX_DEFAULT_IO_THREADS == 4
    with Connection(server.client_urls[0], timeout=60) as connection:
        assert connection.io_threads == io_threads_of(connection) == min(2, cpus)
    with Connection([server.client_urls[0]] * 3, timeout=60) as connection:
        assert io_threads_of(connection) == min(4, cpus)


def test_usable_cpus_is_this_process_s_affinity() -> None:
    """The CPU cap is the affinity mask's size (what taskset or a container's cpuset allows)."""
    assert request_client.usable_cpus() == len(os.sched_getaffinity(0)) >= 1


@pytest.mark.parametrize(
    "options, message",
    [
        ({"io_threads": 0}, "io_threads must be an int >= 1 or None. Found: 0"),
        ({"io_threads": True}, "io_threads must be an int >= 1 or None. Found: True"),
        ({"io_threads": 1.5}, "io_threads must be an int >= 1 or None. Found: 1.5"),
        ({"stripes": 0}, "stripes must be an int >= 1. Found: 0"),
        ({"stripes": -2}, "stripes must be an int >= 1. Found: -2"),
        ({"stripes": "2"}, "stripes must be an int >= 1. Found: '2'"),
    ],
    ids=["threads-0", "threads-bool", "threads-float", "stripes-0", "stripes-negative", "stripes-str"],
)
@pytest.mark.parametrize("url", ["zrpull://127.0.0.1:1", "zreq://127.0.0.1:1"], ids=["stream", "zreq"])
def test_bad_fan_in_options_are_config_errors(url: str, options: dict[str, Any], message: str) -> None:
    """A bad io_threads or stripes fails before any socket opens, with a one-line ConfigError."""
    with pytest.raises(ConfigError) as raised:
        Connection(url, timeout=1, **options)
    assert str(raised.value) == message


def test_stripes_refuse_zsub() -> None:
    """Striped SUB sockets would each get every batch: refused, naming the URL; stripes=1 is fine."""
    with pytest.raises(ConfigError, match=r"stripes=2 cannot apply to 'zsub://127.0.0.1:1'.*zrpull"):
        Connection(["zrpull://127.0.0.1:2", "zsub://127.0.0.1:1"], stripes=2, timeout=1)
    Connection("zsub://127.0.0.1:1", stripes=1, timeout=1).close()


def test_stripes_leave_bound_urls_with_one_socket() -> None:
    """A URL the connection binds keeps one socket whatever the stripes (servers connect to it)."""
    with Connection("zpull://127.0.0.1:0", stripes=3, timeout=5) as connection:
        assert len(connection.endpoints) == 1


# stripes


def test_stream_stripes_deliver_every_batch_once() -> None:
    """One zrpush server, a zrpull connection with stripes=3: the server's batches spread over the three sockets
    (PUSH hands them out in turn) and every batch arrives exactly once."""
    count = 60
    connected = threading.Event()

    def batches() -> Iterator[list[np.ndarray]]:
        connected.wait(60)  # send once all three sockets are connected, so that every one takes its turn
        for number in range(count):
            yield [np.full((16, 16), number % 256, np.uint8), np.array([number], np.int64)]

    server = Server(batches(), "zrpush://127.0.0.1:0", queue=2)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        with Connection(server.client_urls, stripes=3, timeout=60) as connection:
            sockets = connection._endpoints
            assert len(sockets) == 3 and len(set(connection.endpoints)) == 1
            assert wait_until(lambda: all(e.count_peers() == 1 for e in sockets), seconds=60)
            connected.set()
            carried: Counter[int] = Counter()
            read = connection._read

            def counting_read(endpoint: Any, flags: int = 0) -> list[Any]:
                carried[sockets.index(endpoint)] += 1
                return read(endpoint, flags)

            connection._read = counting_read  # type: ignore[method-assign]
            numbers = [int(connection.recv()[1][0]) for _ in range(count)]
    finally:
        connected.set()
        server.stop()
        thread.join(timeout=30)
    assert sorted(numbers) == list(range(count))
    assert sorted(carried) == [0, 1, 2] and sum(carried.values()) == count, carried


@pytest.mark.parametrize("workers", [0, 1], ids=["inline", "direct-worker"])
def test_request_stripes_give_the_exact_stream(serving: Any, workers: int) -> None:
    """zreq with stripes=2 to one server: two DEALERs, both asked for steps (and, with a worker, each connected to
    it and answered by it), and the batches are exactly the pipeline's, in step order."""
    server = serving(factory=ENDLESS, workers=workers, direct=True)
    answered: Counter[int] = Counter()
    with Connection(server.client_urls[0], seed=5, stripes=2, timeout=60, heartbeat=0.2) as connection:
        stripes = [s for s in connection._servers if s.parent is None]
        assert len(stripes) == 2 and len({s.address for s in stripes}) == 1
        handle = connection._on_message

        def counting(source: Any, frames: list[Any]) -> None:
            owner = source if source.parent is None else source.parent
            answered[stripes.index(owner) * 2 + (source.parent is not None)] += 1
            handle(source, frames)

        connection._on_message = counting  # type: ignore[method-assign]
        received = [connection.recv() for _ in range(20)]
        wanted = {0, 2} if workers == 0 else {1, 3}  # each stripe's replies: from the server, or its worker
        while len(received) < 3000 and not wanted <= set(answered):
            received.append(connection.recv())
        assert connection.last.step == len(received) - 1
    assert wanted <= set(answered), answered
    assert_same_batches(received, reference(len(received), 5, ENDLESS))


def test_seek_on_a_striped_stream_drops_what_every_stripe_held(ipc_url: Any) -> None:
    """A pipeline server behind stripes=2 (ipc, shared-memory channel) is one server for seek: after SEEK to epoch 0
    the next 15 batches are that epoch's 15 batches, each once, whichever stripe carried them or what they held
    before. Stripes interleave (stream mode promises no order across sockets), so each batch is matched to the
    epoch's batch of the same samples."""
    expected = reference(15, 8)
    by_samples = {tuple(int(i) for i in batch[1]): position for position, batch in enumerate(expected)}
    assert len(by_samples) == 15
    server = Server(
        factories.small, ipc_url("zrpush"), seed=8, control=ipc_url("zrep", "control"), send_timeout=8
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        with Connection(ipc_url("zrpull"), stripes=2, timeout=30) as connection:
            assert len(connection.endpoints) == 2
            for _ in range(5):
                connection.recv()
            # the other 10 are on their way or queued in the stripes when the seek comes
            assert wait_until(lambda: server.served == 15), server.served
            connection.seek(ipc_url("zreq", "control"), epoch=0)
            received: dict[int, Any] = {}
            for _ in range(15):
                batch = connection.recv()
                assert connection.last.epoch == 0
                samples = tuple(connection.last.indices)
                assert samples in by_samples, f"samples {samples} are not one of epoch 0's batches"
                assert by_samples[samples] not in received, (
                    f"epoch 0's batch {by_samples[samples]} came twice"
                )
                received[by_samples[samples]] = batch
            connection.timeout = 5  # the epoch is complete: a batch more would be one sent before the seek
            with pytest.raises((Timeout, StopIteration)):
                connection.recv()
    finally:
        server.stop()
        thread.join(timeout=30)
    assert_same_batches([received[position] for position in range(15)], expected)
