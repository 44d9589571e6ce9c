"""Stream servers running a pipeline: metadata on every batch, and SEEK control so a restarted server resumes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import factories
import numpy as np
import pytest
from helpers import assert_same_batches

from tensorcom import ConfigError, Connection, ProtocolError, Server, StateError, Timeout
from tensorcom.server.stream import StreamServer


def reference(count: int, **config: Any) -> list[Any]:
    with factories.small(**config) as pipeline:
        return [next(pipeline) for _ in range(count)]


def serve_in_thread(server: Server, count: int | None = None) -> threading.Thread:
    """Run the server in a thread; an endless one ends by send timeout once the test stops reading (the timeout
    is long enough that a loaded machine pausing the reader does not end it early)."""

    def run() -> None:
        try:
            server.run(count)
        except Timeout:
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_pipeline_batches_carry_step_metadata(ipc_url: Callable[..., str]) -> None:
    """A stream server running a pipeline sends its batches intact, with step, epoch and indices for our client."""
    with Connection(ipc_url("zpull"), timeout=20) as connection:
        server = Server(factories.small, ipc_url("zpush"), seed=5, linger=5)
        thread = serve_in_thread(server, count=6)
        received = [connection.recv() for _ in range(6)]
        assert [connection.last.step, connection.last.epoch] == [5, 0]
        assert connection.last.indices == received[-1][1].tolist()
        assert isinstance(received[0], tuple)
        assert connection.state()["pipeline"]["step"] == 6
    thread.join(timeout=20)
    assert_same_batches(received, reference(6, seed=5, rank=0, world_size=1))


def test_metadata_can_be_turned_off_for_tensorcom_0_1_clients(ipc_url: Callable[..., str]) -> None:
    """With metadata=False a pipeline server sends plain .ten batches: exactly the arrays, nothing appended."""
    with Connection(ipc_url("zpull"), timeout=20) as connection:
        thread = serve_in_thread(Server(factories.small, ipc_url("zpush"), metadata=False, linger=5), count=2)
        batch = connection.recv()
        assert isinstance(batch, list) and len(batch) == 2 and connection.last.step is None
        connection.recv()
    thread.join(timeout=20)


def test_restarted_server_resumes_from_the_clients_state(ipc_url: Callable[..., str]) -> None:
    """Read 3 batches, lose the server, start a new one, seek it to the client's state: the stream continues exactly."""
    expected = reference(8, seed=2, rank=0, world_size=1)
    with Connection(ipc_url("zpull"), timeout=20) as connection:
        first = Server(factories.small, ipc_url("zpush"), seed=2, linger=0)
        thread = serve_in_thread(first, count=4)
        received = [connection.recv() for _ in range(3)]
        state = connection.state()
        thread.join(timeout=20)  # the first server is gone; its 4th batch may or may not have arrived
        second = (
            Server(  # endless: a server that had sent all its batches before the SEEK came could not obey it
                factories.small, ipc_url("zpush"), seed=2, control=ipc_url("zrep", "control"), send_timeout=8
            )
        )
        thread = serve_in_thread(second)
        connection.seek(ipc_url("zreq", "control"), state)
        received += [connection.recv() for _ in range(5)]
    thread.join(timeout=20)
    assert_same_batches(received, expected)


def test_seek_rewinds_a_running_server_to_an_epoch(ipc_url: Callable[..., str]) -> None:
    """SEEK to an epoch restarts that epoch: the next batch is the epoch's first, whatever was in flight.

    (Step numbers keep counting the batches the server has produced.)
    """
    expected = reference(3, seed=8, rank=0, world_size=1)
    with Connection(ipc_url("zpull"), timeout=20) as connection:
        server = Server(
            factories.small, ipc_url("zpush"), seed=8, control=ipc_url("zrep", "control"), send_timeout=8
        )
        thread = serve_in_thread(server)
        for _ in range(5):
            connection.recv()
        connection.seek(ipc_url("zreq", "control"), epoch=0)
        received = [connection.recv() for _ in range(3)]
        assert connection.last.epoch == 0 and connection.last.step is not None
    thread.join(timeout=20)
    assert_same_batches(received, expected)


def test_seek_with_a_foreign_state_is_refused(ipc_url: Callable[..., str]) -> None:
    """A state from another pipeline configuration is refused by the server with StateError."""
    with Connection(ipc_url("zpull"), timeout=20) as connection:
        server = Server(
            factories.small, ipc_url("zpush"), seed=1, control=ipc_url("zrep", "control"), send_timeout=8
        )
        thread = serve_in_thread(server)
        connection.recv()
        state = connection.state()
        state["pipeline"]["fingerprint"] = "0" * 32
        with pytest.raises(StateError, match="refused to seek"):
            connection.seek(ipc_url("zreq", "control"), state)
    thread.join(timeout=20)


class HeldUpServer(StreamServer):
    """A stream server whose thread stops for a second after each batch it sends, as a busy machine may stop it."""

    def send(self, batch: Any, meta: dict[str, Any] | None = None) -> None:
        super().send(batch, meta)
        time.sleep(1.0)


@pytest.mark.parametrize("kind", [StreamServer, HeldUpServer], ids=["server", "held-up-after-its-last-batch"])
def test_seek_after_the_last_batch_is_refused_at_once(
    ipc_url: Callable[..., str], kind: type[Server]
) -> None:
    """A server that has sent its count of batches answers a SEEK with an error while it lingers, not silence;
    also a SEEK that arrives before its thread has gone on from the last send (it used to be obeyed, then never
    acted on: the client waited out its timeout)."""
    with Connection(ipc_url("zpull"), timeout=20) as connection:
        server = kind(
            factories.small, ipc_url("zpush"), seed=3, control=ipc_url("zrep", "control"), linger=10
        )
        thread = serve_in_thread(server, count=2)
        connection.recv()
        connection.recv()
        state = connection.state()
        started = time.monotonic()
        with pytest.raises(
            ProtocolError, match=r"refused to seek: the server has finished \(2 batches sent\)"
        ):
            connection.seek(ipc_url("zreq", "control"), state)
        assert time.monotonic() - started < 10  # an answer, not the connection's 20 s timeout
    thread.join(timeout=20)
    assert not thread.is_alive()


def test_control_needs_a_pipeline_source(ipc_url: Callable[..., str]) -> None:
    """A plain iterable cannot seek, so control= with one is a ConfigError."""
    with pytest.raises(ConfigError, match="control= needs a tensorcom pipeline"):
        Server([[np.zeros(1)]], ipc_url("zpush"), control=ipc_url("zrep", "control"))


@pytest.mark.parametrize("same_seed", [True, False], ids=["same-seed", "distinct-seeds"])
def test_a_client_of_two_servers_sending_one_stream_says_so(
    ipc_url: Callable[..., str], caplog: pytest.LogCaptureFixture, same_seed: bool
) -> None:
    """Two servers started alike (same seed, rank and world size) feed one client the same batches: it logs one
    warning naming both; servers with distinct seeds do not set it off."""
    with Connection([ipc_url("zpull", "a"), ipc_url("zpull", "b")], timeout=20) as connection:
        threads = [
            serve_in_thread(Server(factories.small, ipc_url("zpush", name), seed=seed, linger=5), count=4)
            for name, seed in (("a", 3), ("b", 3 if same_seed else 4))
        ]
        with caplog.at_level("WARNING", logger="tensorcom.client.stream"):
            for _ in range(8):
                connection.recv()
    for thread in threads:
        thread.join(timeout=20)
    warnings = [r.getMessage() for r in caplog.records if "send the same stream" in r.getMessage()]
    if same_seed:
        assert len(warnings) == 1 and "/a" in warnings[0] and "/b" in warnings[0], warnings
    else:
        assert warnings == []
