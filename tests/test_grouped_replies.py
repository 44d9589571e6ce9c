"""Grouped replies (issue 20): a REQUEST for several steps of small batches is answered by one BATCHES message that
the client splits into its batches; a failing step is still an ERROR of its own, a worker killed in the middle of
groups loses and repeats nothing, and a state taken after any batch of a group resumes exactly."""

from __future__ import annotations

import functools
import os
import signal
from collections.abc import Iterator
from typing import Any

import factories
import pytest
import zmq
from helpers import assert_same_batch, assert_same_batches, wait_until

from tensorcom import Connection, codec, protocol
from tensorcom.protocol import Base, Batch, Batches, Error, ErrorKind, Hello, Request, Welcome, rebuild_batch

RECEIVE_MS = 30_000
ENDLESS = functools.partial(factories.small, n=400, repeating=True)
SLOW = functools.partial(factories.big, nbytes=1 << 10, delay=0.02)  # 40 ms a batch of 2 samples: 1 kB each


def reference(factory: Any, count: int, seed: int) -> tuple[list[Any], list[Any]]:
    """The first ``count`` batches of the pipeline (rank 0 of 1) and its state after each."""
    with factory(seed=seed, rank=0, world_size=1) as pipeline:
        batches, states = [], []
        for _ in range(count):
            batches.append(next(pipeline))
            states.append(pipeline.state())
        return batches, states


@pytest.fixture
def dealer() -> Iterator[Any]:
    """``dealer(address) -> socket``: a DEALER connected to ``address``, closed at teardown."""
    context = zmq.Context()
    sockets: list[zmq.Socket[Any]] = []

    def connect(address: str) -> zmq.Socket[Any]:
        socket = context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(address)
        sockets.append(socket)
        return socket

    yield connect
    for socket in sockets:
        socket.close(linger=0)
    context.term()


def receive(socket: zmq.Socket[Any], address: str) -> list[bytes]:
    if not socket.poll(RECEIVE_MS):
        raise TimeoutError(f"no reply from {address} within {RECEIVE_MS / 1000:.0f} s")
    return socket.recv_multipart()


def ask(socket: zmq.Socket[Any], address: str, request: Request) -> list[tuple[Any, list[bytes]]]:
    """Send ``request`` and return the messages (header, tensor frames) that answer its steps."""
    socket.send(request.encode())
    replies: list[tuple[Any, list[bytes]]] = []
    answered = 0
    while answered < request.count:
        frames = receive(socket, address)
        message = protocol.decode(frames[0], address)
        replies.append((message, frames[1:]))
        answered += message.count if isinstance(message, Batches) else 1
    return replies


def greeted(socket: zmq.Socket[Any], address: str, seed: int) -> None:
    socket.send(Hello(seed=seed, rank=0, world_size=1).encode())
    assert isinstance(protocol.decode(receive(socket, address)[0], address), Welcome)


def split(message: Batches, frames: list[bytes]) -> list[Any]:
    """The batches of a BATCHES message (its header, then one data frame), rebuilt from views of the data frame."""
    assert len(frames) == 1, f"a BATCHES message has one data frame; this one had {len(frames)}"
    data = memoryview(frames[0])
    places = message.layout([codec.data_size(header) for header in message.tensors])
    assert places[-1][0] + places[-1][1] == len(data)
    batches = []
    for index in range(message.count):
        pairs = []
        for array in range(index * message.arrays, (index + 1) * message.arrays):
            offset, size = places[array]
            pairs += [message.tensors[array], data[offset : offset + size]]
        batches.append(rebuild_batch(codec.decode(pairs), message.kind, message.keys))
    return batches


def request(seed: int, step: int, count: int) -> Request:
    return Request(seed=seed, rank=0, world_size=1, base=Base(), step=step, count=count)


@pytest.mark.parametrize(
    "workers, direct", [(1, True), (1, False), (0, False)], ids=["direct worker", "via front end", "inline"]
)
def test_a_group_of_four_arrives_as_one_message_and_splits_into_the_exact_batches(
    serving: Any, dealer: Any, workers: int, direct: bool
) -> None:
    """A REQUEST for steps 5..8 of small batches is answered by exactly one message, a BATCHES of 4 whose split
    batches and rebuilt states are the pipeline's own, byte for byte: from a worker to its direct client, from a
    worker through the front end, and from a server without workers."""
    server = serving(factory=ENDLESS, workers=workers, direct=direct)
    front = server.client_urls[0].replace("zreq://", "tcp://")
    if direct:
        assert wait_until(lambda: server._worker_addresses(0), seconds=60), "the worker never became ready"
        address = "tcp://127.0.0.1:" + server._worker_addresses(0)[0].rsplit(":", 1)[1]
    else:
        address = front
    socket = dealer(address)
    if not direct:
        greeted(socket, address, seed=3)
    replies = ask(socket, address, request(seed=3, step=5, count=4))
    assert len(replies) == 1, [type(message).__name__ for message, _ in replies]
    message, frames = replies[0]
    assert isinstance(message, Batches) and (message.step, message.count) == (5, 4)
    expected, states = reference(ENDLESS, 9, seed=3)
    for index, batch in enumerate(split(message, frames)):
        assert_same_batch(batch, expected[5 + index], where=f"step {5 + index}")
        assert message.state_at(index) == states[5 + index]
        assert message.batch(index).state == states[5 + index]
    assert message.changes is not None, "the states after the first are sent as their changes"


def test_a_failing_step_inside_a_group_is_an_error_of_its_own(serving: Any, dealer: Any) -> None:
    """Steps 2..5 where step 3 fails: step 2 comes as a BATCH, step 3 as a pipeline ERROR for that step only, and
    steps 4 and 5 together as a BATCHES of 2; their batches are the pipeline's."""
    server = serving(factory=factories.failing, workers=0)
    address = server.client_urls[0].replace("zreq://", "tcp://")
    socket = dealer(address)
    greeted(socket, address, seed=0)
    replies = ask(socket, address, request(seed=0, step=2, count=4))
    kinds = [(type(message).__name__, message.step) for message, _ in replies]
    assert kinds == [("Batch", 2), ("Error", 3), ("Batches", 4)], kinds
    error = replies[1][0]
    assert isinstance(error, Error) and error.error is ErrorKind.PIPELINE and "sample 13" in error.message
    group, frames = replies[2]
    assert isinstance(group, Batches) and group.count == 2
    labels = [batch["label"].tolist() for batch in split(group, frames)]
    assert labels == [[16, 17, 18, 19], [20, 21, 22, 23]]
    single, frames = replies[0]
    assert isinstance(single, Batch) and codec.decode(frames)[1].tolist() == [8, 9, 10, 11]


def test_state_after_every_batch_of_a_group_resumes_exactly(serving: Any) -> None:
    """state() taken after each of 16 batches, those in the middle of a group included, makes a new connection
    continue with exactly the batches that followed."""
    server = serving(factory=ENDLESS, workers=1)
    url = server.client_urls[0]
    expected, _ = reference(ENDLESS, 20, seed=5)
    states, places = [], []
    with Connection(url, seed=5, timeout=60, heartbeat=0.2) as connection:
        for step in range(16):
            assert_same_batch(connection.recv(), expected[step], where=f"step {step}")
            places.append(None if connection._state_in is None else connection._state_in[1])
            states.append(connection.state())
    assert any(place for place in places), f"no batch came from the middle of a group: {places}"
    for step, state in enumerate(states):
        with Connection(url, seed=5, timeout=60, heartbeat=0.2, state=state) as resumed:
            got = [resumed.recv() for _ in range(3)]
            assert resumed.last is not None and resumed.last.step == step + 3
        assert_same_batches(got, expected[step + 1 : step + 4])


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "via front end"])
def test_a_worker_killed_in_the_middle_of_groups_loses_and_repeats_nothing(
    serving: Any, direct: bool
) -> None:
    """SIGKILL the only worker while it computes a group (40 ms a batch, 16 steps asked at once): the steps it
    owed are asked again (by the client, or given to the restarted worker by the front end) and the stream is
    exactly the pipeline's, each batch once and in order."""
    server = serving(factory=SLOW, workers=1, direct=direct)
    count = 40
    expected, _ = reference(SLOW, count, seed=9)
    with Connection(server.client_urls[0], seed=9, timeout=60, heartbeat=0.2) as connection:
        received = [connection.recv() for _ in range(6)]
        assert connection._state_in is not None, "the batches do not come in groups"
        victim = server._processes[0].process.pid
        os.kill(victim, signal.SIGKILL)
        received += [connection.recv() for _ in range(count - 6)]
        steps = connection.last.step if connection.last is not None else None
    assert steps == count - 1
    assert_same_batches(received, expected)
    assert wait_until(lambda: server._processes[0].process.pid != victim, seconds=60)
