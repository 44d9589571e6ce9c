"""A zrep server's workers answer clients directly (issue 20): the front end keeps HELLO, PING and supervision, and
names its workers' addresses in WELCOME and PONG; replies come straight from the workers, exactly once and in
order, through a worker's death, over tcp and ipc, with CURVE."""

from __future__ import annotations

import functools
import os
import signal
import time
from pathlib import Path
from typing import Any

import factories
import late_worker
import pytest
from helpers import assert_same_batches, wait_until

from tensorcom import Connection


def reference(count: int, seed: int, factory: Any = factories.small) -> list[Any]:
    """The first ``count`` batches of the pipeline for ``seed`` (rank 0 of 1)."""
    with factory(seed=seed, rank=0, world_size=1) as pipeline:
        return [next(pipeline) for _ in range(count)]


def workers_used(connection: Any) -> list[Any]:
    return [server for server in connection._servers if server.parent is not None]


ENDLESS = functools.partial(factories.small, n=400, repeating=True)


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_replies_come_straight_from_the_workers(serving: Any, tmp_path: Path, transport: str) -> None:
    """Both workers become known to the client (WELCOME, then PONG) and answer it, batches are exactly the
    pipeline's, and the front end passes on only the replies made before the workers were connected."""
    url = "zrep://127.0.0.1:0" if transport == "tcp" else f"zrep+ipc://{tmp_path}/s"
    server = serving(url, factory=ENDLESS, workers=2, direct=True)
    with Connection(server.client_urls[0], seed=4, timeout=60, heartbeat=0.2) as connection:
        received = [connection.recv() for _ in range(30)]
        while len(received) < 3000 and not (
            len(workers_used(connection)) == 2 and all(worker.answered for worker in workers_used(connection))
        ):
            received.append(connection.recv())
        assert len(workers_used(connection)) == 2
        through_workers = len(received) - server.served
    assert_same_batches(received, reference(len(received), 4, ENDLESS))
    assert through_workers > len(received) // 2, (through_workers, len(received))


def test_a_worker_that_becomes_ready_late_is_announced_to_clients_at_once(
    serving: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that becomes ready after a client's HELLO is named to that client in an unasked PONG, not at its
    next PING (here an hour away): the client then sends it requests, and the stream is exactly the pipeline's."""
    monkeypatch.setenv("TENSORCOM_TEST_LATE_WORKER", str(tmp_path))
    server = serving("zrep://127.0.0.1:0", factory=late_worker.endless, workers=2, direct=True)
    with Connection(server.client_urls[0], seed=5, timeout=60, heartbeat=3600) as connection:
        received = [connection.recv() for _ in range(10)]
        assert len(workers_used(connection)) == 1  # the second still waits at its import
        assert not server._processes[0].ready or not server._processes[1].ready
        (tmp_path / "gate").touch()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (
            len(workers_used(connection)) == 2 and all(worker.answered for worker in workers_used(connection))
        ):
            received.append(connection.recv())
            time.sleep(0.01)
        assert len(workers_used(connection)) == 2
        assert all(worker.answered for worker in workers_used(connection))
    assert_same_batches(received, reference(len(received), 5, late_worker.endless))


def test_a_worker_killed_mid_stream_is_replaced_and_nothing_is_lost(serving: Any) -> None:
    """SIGKILL one worker while the client reads: its steps are asked again (of the other worker or the front end),
    the front end restarts it on the same port, and the stream is exactly the pipeline's."""
    server = serving("zrep://127.0.0.1:0", workers=2, direct=True)
    expected = reference(15, 7)
    with Connection(server.client_urls[0], seed=7, timeout=60, heartbeat=0.2, epoch=15) as connection:
        received = [connection.recv() for _ in range(5)]
        wait_until(lambda: len(workers_used(connection)) == 2, seconds=60)
        victim = server._processes[0].process.pid
        os.kill(victim, signal.SIGKILL)
        received += [connection.recv() for _ in range(10)]
    assert_same_batches(received, expected)
    wait_until(lambda: server._processes[0].process.pid != victim and server._processes[0].ready, seconds=60)


def test_direct_workers_use_curve_keys(serving: Any, tmp_path: Path) -> None:
    """With CURVE keys the workers' own sockets accept only allowed clients, and the stream is intact."""
    from tensorcom._net.security import generate_keys

    generate_keys(tmp_path / "keys", clients=["trainer"])
    keys = tmp_path / "keys"
    server = serving(
        "zrep://127.0.0.1:0",
        workers=1,
        direct=True,
        server_key=keys / "server.key_secret",
        client_keys=keys / "clients",
    )
    with Connection(
        server.client_urls[0],
        seed=2,
        timeout=60,
        heartbeat=0.2,
        epoch=10,
        client_key=keys / "trainer.key_secret",
        server_public_key=keys / "server.key",
    ) as connection:
        received = list(connection)
        assert workers_used(connection) and workers_used(connection)[0].answered
    assert_same_batches(received, reference(10, 2))
