"""The same-host fast path: batches in shared memory, descriptors over ZeroMQ (tensorcom._net.shm and its users)."""

from __future__ import annotations

import functools
import gc
import hashlib
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import factories
import msgpack
import numpy as np
import pytest
import torch
from helpers import assert_same_batch, assert_same_batches, children_of, environment, wait_ready
from reliability import reference

from tensorcom import Connection, DecodeError, Server, Timeout, codec
from tensorcom._net import shm
from tensorcom.server.request import RequestServer

BIG = functools.partial(factories.big, nbytes=1 << 19)  # 1 MB batches: above shm.MIN_BYTES


def batch(fill: int = 1, side: int = 64) -> list[np.ndarray]:
    return [np.full((8, 3, side, side), fill, np.uint8), np.arange(8, dtype=np.int64) * fill]


def digests(batches: Any) -> list[bytes]:
    """Digest each batch as it comes and keep nothing of it (so that no slot stays held)."""
    return [hashlib.sha256(b"".join(np.asarray(a).tobytes() for a in item)).digest() for item in batches]


def slot_files(arena: shm.Arena | None = None) -> set[str]:
    names = {name for name in os.listdir(shm.FOLDER) if name.startswith(shm.PREFIX)}
    if arena is None:
        return names
    return names & {os.path.basename(path) for path in arena.paths}


def slot_files_of(pids: set[int]) -> set[str]:
    """The slot files that these processes made (named ``tensorcom-<pid>-...``)."""
    return {name for name in slot_files() if name.split("-")[1] in {str(pid) for pid in pids}}


@pytest.fixture
def arena() -> Iterator[shm.Arena]:
    made = shm.Arena(slots=2, wait=0.01, min_bytes=1)
    yield made
    made.close()
    assert not slot_files(made), "closing an arena deletes its files"


def test_a_batch_arrives_intact_as_views_of_shared_memory(arena: shm.Arena) -> None:
    """What the consumer reads is bit-identical to what was put, and is a view of the slot, not a copy."""
    reader = shm.Reader()
    sent = batch(7)
    descriptor = arena.put(codec.encode(sent, ["images", "labels"]))
    assert descriptor is not None and len(descriptor) < 200
    arrays, infos = reader.read(descriptor, "test")
    assert infos == ["images", "labels"]
    assert_same_batch(list(arrays), sent)
    mapping = next(iter(reader._mappings.values()))
    start = mapping.address
    assert start <= arrays[0].ctypes.data < start + mapping.size, "the array lives in the mapping"
    assert all(a.ctypes.data % 64 == 0 for a in arrays), "payloads are 64-byte aligned"


def test_the_slot_is_free_again_once_the_last_view_is_dropped(arena: shm.Arena) -> None:
    """A slot stays held while any array or tensor made from the batch is alive, and no longer."""
    reader = shm.Reader()
    arrays, _ = reader.read(arena.put(codec.encode(batch())), "test")
    images = arrays[0]
    tensor = torch.from_numpy(images[2:4])
    del arrays, images
    gc.collect()
    assert reader.collect() == 0 and arena.free_slots == 0, "the tensor still holds the batch"
    del tensor
    assert arena.free_slots == 0, "released by the reader's next collect (or read), not from a gc callback"
    assert reader.collect() == 1 and arena.free_slots == 1


def test_a_consumer_holding_every_slot_makes_put_fall_back_not_block(arena: shm.Arena) -> None:
    """Back-pressure by slot count: with both slots held, put gives up after its short wait (the caller then sends
    through the socket), and works again as soon as a slot is dropped."""
    reader = shm.Reader()
    held = [reader.read(arena.put(codec.encode(batch(i))), "test") for i in (1, 2)]
    started = time.monotonic()
    assert arena.put(codec.encode(batch(3))) is None
    assert time.monotonic() - started < 2
    assert arena.fallbacks == 1
    held.pop()
    reader.collect()
    assert arena.put(codec.encode(batch(4))) is not None


def test_small_batches_go_through_the_socket() -> None:
    """Below min_bytes a descriptor saves less than it costs: put declines."""
    small = shm.Arena(min_bytes=shm.MIN_BYTES)
    try:
        assert small.put(codec.encode([np.zeros(1000, np.uint8)])) is None
        assert small.paths == []
    finally:
        small.close()


def test_a_bigger_batch_replaces_a_free_slot_that_is_too_small(arena: shm.Arena) -> None:
    """Slots grow with the batches; the old file is deleted."""
    reader = shm.Reader()
    for size in (1 << 10, 1 << 21, 1 << 23):  # three sizes through two slots
        arrays, _ = reader.read(arena.put(codec.encode([np.full(size, 5, np.uint8)])), "test")
        assert arrays[0].size == size and int(arrays[0][-1]) == 5
        del arrays
    assert len(arena.paths) <= 2 and len(slot_files(arena)) == len(arena.paths)


def test_a_reused_or_deleted_slot_is_a_stale_batch_not_wrong_data(arena: shm.Arena) -> None:
    """A descriptor whose slot now holds another batch, or whose file is gone, raises StaleBatch."""
    first = arena.put(codec.encode(batch(1)))
    assert first is not None
    fields = msgpack.unpackb(first[len(shm.DESCRIPTOR_MAGIC) :])
    forged = shm.DESCRIPTOR_MAGIC + msgpack.packb({**fields, "seq": fields["seq"] + 5})
    with pytest.raises(shm.StaleBatch, match="overwritten"):
        shm.Reader().read(forged, "test")
    gone = shm.DESCRIPTOR_MAGIC + msgpack.packb({**fields, "path": "tensorcom-1-abc-99"})
    with pytest.raises(shm.StaleBatch, match="cannot open"):
        shm.Reader().read(gone, "test")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"path": "../../etc/passwd", "seq": 1, "size": 10}, "names no slot file"),
        ({"path": "/dev/shm/tensorcom-1-ab-0", "seq": 1, "size": 10}, "names no slot file"),
        ({"path": "tensorcom-1-ab-0", "seq": "1", "size": 10}, "malformed"),
        ({"path": "tensorcom-1-ab-0", "seq": 1, "size": -5}, "malformed"),
        ({"path": "tensorcom-1-ab-0"}, "malformed"),
    ],
    ids=["traversal", "absolute", "seq-type", "negative-size", "missing"],
)
def test_hostile_descriptors_are_decode_errors(fields: dict[str, Any], message: str) -> None:
    """Only /dev/shm/tensorcom-* files are ever opened, and a descriptor must be well formed."""
    with pytest.raises(DecodeError, match=message):
        shm.Reader().read(shm.DESCRIPTOR_MAGIC + msgpack.packb(fields), "test")


def test_a_descriptor_larger_than_its_slot_is_refused(arena: shm.Arena) -> None:
    """A size beyond the file is refused before any view is made (nothing reads out of bounds)."""
    descriptor = arena.put(codec.encode(batch()))
    assert descriptor is not None
    fields = msgpack.unpackb(descriptor[len(shm.DESCRIPTOR_MAGIC) :])
    lying = shm.DESCRIPTOR_MAGIC + msgpack.packb({**fields, "size": 1 << 40})
    with pytest.raises(DecodeError, match="claims"):
        shm.Reader().read(lying, "test")


def test_an_unread_batch_expires_and_its_slot_comes_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A descriptor lost with a vanished peer does not hold its slot for ever; reading it late is a StaleBatch."""
    monkeypatch.setattr(shm, "_EXPIRY_MARGIN", 0.0)
    arena = shm.Arena(slots=1, wait=0.5, min_bytes=1, expire=0.2)
    try:
        lost = arena.put(codec.encode(batch(1)))
        assert lost is not None
        time.sleep(0.3)
        assert arena.put(codec.encode(batch(2))) is not None, "the expired slot was taken back"
        with pytest.raises(shm.StaleBatch):
            shm.Reader().read(lost, "test")
    finally:
        arena.close()


def _produce_and_wait(connection: Any) -> None:
    arena = shm.Arena(min_bytes=1)
    connection.send([arena.put(codec.encode(batch(9))), arena.paths])
    time.sleep(60)


def _consume_and_wait(descriptor: bytes, connection: Any) -> None:
    arrays, _ = shm.Reader().read(descriptor, "parent")
    connection.send(int(arrays[0][0, 0, 0, 0]))
    time.sleep(60)


def test_files_of_a_killed_producer_are_swept_but_a_live_ones_are_not() -> None:
    """kill -9 leaves slot files behind; sweep() deletes them (their lock is gone) and keeps a live arena's."""
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    child = context.Process(target=_produce_and_wait, args=(theirs,), daemon=True)
    child.start()
    try:
        assert ours.poll(60)
        descriptor, paths = ours.recv()
        arrays, _ = shm.Reader().read(descriptor, "child")  # mapped before the producer dies
        live = shm.Arena(min_bytes=1)
        live.put(codec.encode(batch()))
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        assert all(os.path.exists(path) for path in paths)
        assert shm.sweep() >= 1
        assert not any(os.path.exists(path) for path in paths)
        assert all(os.path.exists(path) for path in live.paths), "a live producer's files stay"
        assert int(arrays[0][0, 0, 0, 0]) == 9, "what was mapped stays readable"
        live.close()
    finally:
        if child.is_alive():
            child.kill()


def test_slots_held_by_a_killed_consumer_are_taken_back(arena: shm.Arena) -> None:
    """A consumer that dies holding a batch does not keep the slot: the producer sees its pid gone."""
    context = multiprocessing.get_context("spawn")
    held = []
    children = []
    for fill in (1, 2):
        ours, theirs = context.Pipe()
        child = context.Process(target=_consume_and_wait, args=(arena.put(codec.encode(batch(fill))), theirs))
        child.daemon = True
        child.start()
        children.append(child)
        assert ours.poll(60) and ours.recv() == fill
        held.append(child)
    assert arena.free_slots == 0
    for child in children:
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
    assert arena.put(codec.encode(batch(3))) is not None


# the users of the fast path: zreq servers and clients, stream servers and clients


@pytest.mark.parametrize("workers", [0, 1], ids=["inline", "1-worker"])
def test_zreq_over_ipc_reads_shared_memory_and_stays_bit_identical(tmp_path: Path, workers: int) -> None:
    """Over ipc a zreq client gets descriptors (its reader counts them) and exactly the reference batches."""
    server = RequestServer(BIG, f"zrep+ipc://{tmp_path}/s", workers=workers)
    thread = threading.Thread(target=server.run, kwargs={"duration": 60})
    thread.start()
    try:
        with Connection(f"zreq+ipc://{tmp_path}/s", seed=3, total=12, timeout=30) as connection:
            received = digests(connection)
            assert connection._reader.received >= 12  # and the prefetched ones beyond
        assert received == digests(reference(BIG, count=12, seed=3, rank=0, world_size=1))
    finally:
        server.stop()
        thread.join(timeout=40)
    assert not thread.is_alive()


def test_zreq_with_shm_off_and_over_tcp_gets_the_same_batches(tmp_path: Path) -> None:
    """shm=False, and a tcp client of a server whose worker hands batches over through shared memory, get the
    batches as frames: the same bytes."""
    server = RequestServer(BIG, [f"zrep+ipc://{tmp_path}/s", "zrep://127.0.0.1:0"], workers=1)
    thread = threading.Thread(target=server.run, kwargs={"duration": 60})
    thread.start()
    tcp = server.endpoints[1].replace("tcp://", "zreq://")
    expected = reference(BIG, count=8, seed=4, rank=0, world_size=1)
    try:
        for url, options in ((f"zreq+ipc://{tmp_path}/s", {"shm": False}), (tcp, {})):
            with Connection(url, seed=4, total=8, timeout=30, **options) as connection:
                received = list(connection)
                assert connection._reader.received == 0
            assert_same_batches(received, expected)
    finally:
        server.stop()
        thread.join(timeout=40)


def test_a_zreq_client_that_keeps_every_batch_still_gets_them_all(tmp_path: Path) -> None:
    """Holding 30 batches (more than any arena's slots) makes the server fall back to the socket: nothing stalls,
    nothing changes."""
    server = RequestServer(BIG, f"zrep+ipc://{tmp_path}/s", workers=1)
    thread = threading.Thread(target=server.run, kwargs={"duration": 90})
    thread.start()
    try:
        with Connection(f"zreq+ipc://{tmp_path}/s", seed=5, total=30, timeout=30) as connection:
            received = list(connection)
            assert 0 < connection._reader.received < 30
        assert_same_batches(received, reference(BIG, count=30, seed=5, rank=0, world_size=1))
    finally:
        server.stop()
        thread.join(timeout=40)


def _stream(url: str, count: int, shm_option: bool | None, linger: float = 300) -> None:
    server = Server(None, url, queue=2, linger=linger, shm=shm_option)
    for i in range(count):
        server.send(batch(i % 200, side=128))  # 393 kB: above shm.MIN_BYTES
    server.close()


@pytest.mark.parametrize("server_binds", [False, True], ids=["zpush", "zrpush"])
@pytest.mark.parametrize("server_first", [False, True], ids=["client-first", "server-first"])
def test_stream_push_over_ipc_sends_descriptors(
    tmp_path: Path, server_binds: bool, server_first: bool
) -> None:
    """An ipc push server puts batches into shared memory on the channel beside the URL; the client finds it,
    whichever side binds and whichever starts first, and gets every batch in order, intact."""
    url = f"ipc://{tmp_path}/s"
    server_url, client_url = (
        (f"zrpush+{url}", f"zrpull+{url}") if server_binds else (f"zpush+{url}", f"zpull+{url}")
    )
    thread = threading.Thread(target=_stream, args=(server_url, 40, None))
    if server_first:
        thread.start()
    with Connection(client_url, timeout=30) as connection:
        if not server_first:
            thread.start()
        received = digests(connection.recv() for _ in range(40))
        assert connection._reader.received == 40
    thread.join(timeout=30)
    assert received == digests(batch(i, side=128) for i in range(40))


@pytest.mark.parametrize("server_binds", [False, True], ids=["zpush", "zrpush"])
def test_a_client_that_refuses_shared_memory_gets_plain_batches(tmp_path: Path, server_binds: bool) -> None:
    """Connection(shm=False), like a tensorcom 0.1 client, reads the URL's own socket: plain batches, in order."""
    url = f"ipc://{tmp_path}/s"
    server_url, client_url = (
        (f"zrpush+{url}", f"zrpull+{url}") if server_binds else (f"zpush+{url}", f"zpull+{url}")
    )
    thread = threading.Thread(target=_stream, args=(server_url, 10, None))
    thread.start()
    with Connection(client_url, timeout=30, shm=False) as connection:
        received = digests(connection.recv() for _ in range(10))
        assert connection._reader.received == 0
    thread.join(timeout=30)
    assert received == digests(batch(i, side=128) for i in range(10))


def test_a_bound_server_feeds_shm_and_plain_clients_at_once(tmp_path: Path) -> None:
    """A zrpush+ipc server with one client on its shm channel and one on its plain socket: each batch reaches one of
    them, both get batches, and the shm client's come through shared memory."""
    url = f"ipc://{tmp_path}/s"
    # the server waits (linger) until both clients have gone: what it queued is not dropped while they read
    thread = threading.Thread(target=_stream, args=(f"zrpush+{url}", 40, None))
    thread.start()
    fast = Connection(f"zrpull+{url}", timeout=0.5, queue=1)
    plain = Connection(f"zrpull+{url}", timeout=0.5, queue=1, shm=False)
    try:
        got: dict[str, list[str]] = {"fast": [], "plain": []}
        deadline = time.monotonic() + 120
        # in turn with short waits, so that each keeps taking while the other has nothing queued
        while len(got["fast"]) + len(got["plain"]) < 40 and time.monotonic() < deadline:
            for name, connection in (("fast", fast), ("plain", plain)):
                if len(got["fast"]) + len(got["plain"]) < 40:
                    try:
                        got[name] += digests([connection.recv()])
                    except Timeout:
                        pass
        assert got["fast"] and got["plain"]
        assert fast._reader.received == len(got["fast"]) and plain._reader.received == 0
    finally:
        fast.close()
        plain.close()
    thread.join(timeout=30)
    assert sorted(got["fast"] + got["plain"]) == sorted(digests(batch(i, side=128) for i in range(40)))


def test_nothing_is_left_in_dev_shm_after_a_served_zreq_run(tmp_path: Path) -> None:
    """A `tensorcom serve` process stopped by SIGTERM leaves no slot files of its own or of its workers (other
    programs on the machine, other test runs among them, may have slot files of their own meanwhile)."""
    url = f"zrep+ipc://{tmp_path}/s"
    process = subprocess.Popen(
        [sys.executable, "-m", "tensorcom.cli", "serve", "factories:big", "-q", "--bind", url, "-w", "2"],
        stdout=subprocess.PIPE,
        env=environment(),
    )
    serving: set[int] = set()
    try:
        wait_ready(process)
        with Connection(f"zreq+ipc://{tmp_path}/s", total=20, timeout=30) as connection:
            assert len(list(connection)) == 20
            assert connection._reader.received > 0
            serving = {process.pid, *children_of(process.pid)}
            assert slot_files_of(serving), "the workers' slots exist while they serve"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
    assert not slot_files_of(serving)
