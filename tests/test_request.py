"""The deterministic request protocol end to end: real `tensorcom serve` processes and zreq Connections."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from typing import Any

import factories
import msgpack
import pytest
import zmq
from helpers import MakeSocket, StartServer, assert_same_batches, children_of, rss_kib, wait_until_gone
from reliability import reference

from tensorcom import ConfigError, Connection, ProtocolError, RemoteError, Server, StateError, Timeout
from tensorcom.client import RequestConnection, StreamConnection
from tensorcom.protocol import Command, Message
from tensorcom.server.request import RequestServer


def urls_of(*servers: tuple[subprocess.Popen[bytes], str]) -> list[str]:
    return [url for _, url in servers]


@pytest.mark.parametrize(
    "servers, workers", [(1, 1), (2, 2), (3, 1), (1, 0)], ids=["1x1", "2x2", "3x1", "1-inline"]
)
def test_stream_is_bit_identical_to_the_in_process_pipeline(
    request_server: StartServer, servers: int, workers: int
) -> None:
    """Whatever the number of servers and workers, a rank receives exactly the batches of its pipeline, in order."""
    started = [request_server("factories:small", workers=workers) for _ in range(servers)]
    expected = reference(factories.small, seed=7, rank=1, world_size=2)
    with Connection(urls_of(*started), seed=7, rank=1, world_size=2, timeout=30, prefetch=4) as connection:
        assert isinstance(connection, RequestConnection)
        received = list(connection)
        steps = connection.last.step
    assert_same_batches(received, expected)
    assert len(received) == 8 and steps == 7  # 60 samples, 2 ranks, batches of 4: 7 full and one of 2


def test_each_batch_carries_its_metadata(request_server: StartServer) -> None:
    """connection.last gives the step, epoch and dataset indices of the batch just received."""
    _, url = request_server("factories:small")
    with Connection(url, seed=1, rank=0, world_size=1, timeout=30) as connection:
        images, labels = connection.recv()
        assert connection.last.step == 0 and connection.last.epoch == 0
        assert connection.last.indices == labels.tolist()
        connection.recv()
        assert connection.last.step == 1


def test_epochs_end_and_the_next_iteration_starts_the_next_epoch(request_server: StartServer) -> None:
    """A finite epoch ends iteration; iterating again yields the next epoch's new order."""
    _, url = request_server("factories:small")
    with Connection(url, seed=5, rank=0, world_size=1, timeout=30) as connection:
        first = [labels.tolist() for _, labels in connection]
        second = [labels.tolist() for _, labels in connection]
        assert connection.last.epoch == 1
    assert sorted(sum(first, [])) == sorted(sum(second, [])) == list(range(60))
    assert first != second


@pytest.mark.parametrize("stop_at", [0, 3, 7], ids=["start", "middle", "last"])
def test_resume_from_state_on_new_servers_continues_exactly(
    request_server: StartServer, stop_at: int
) -> None:
    """Save at step k, stop every server and the client, start new ones from the state: the continuation matches."""
    expected = reference(factories.small, seed=3, rank=0, world_size=2)
    first = request_server("factories:small")
    with Connection(urls_of(first), seed=3, rank=0, world_size=2, timeout=30) as connection:
        before = [connection.recv() for _ in range(stop_at)]
        state = connection.state()
    first[0].send_signal(signal.SIGTERM)
    assert first[0].wait(timeout=20) == 0
    assert msgpack.unpackb(msgpack.packb(state)) == state  # plain data
    new = [request_server("factories:small", workers=2) for _ in range(2)]
    with Connection(urls_of(*new), seed=3, rank=0, world_size=2, timeout=30, state=state) as connection:
        after = list(connection)
    assert_same_batches(before + after, expected)


def test_elastic_resume_with_another_world_size_sees_every_sample_once(request_server: StartServer) -> None:
    """A state saved by 2 ranks, resumed by 3, covers the rest of the epoch exactly once across ranks."""
    _, url = request_server("factories:small", "n=120", workers=2)
    seen: list[int] = []
    states = []
    for rank in range(2):
        with Connection(url, seed=9, rank=rank, world_size=2, timeout=30) as connection:
            for _ in range(5):
                seen += connection.recv()[1].tolist()
            states.append(connection.state())
    assert states[0] == states[1]  # the same state on every rank of a synchronous job
    for rank in range(3):
        with Connection(url, seed=9, rank=rank, world_size=3, timeout=30, state=states[0]) as connection:
            seen += [label for _, labels in connection for label in labels.tolist()]
    assert sorted(seen) == list(range(120))


def test_killing_a_server_loses_and_repeats_nothing(request_server: StartServer) -> None:
    """kill -9 of one of two servers mid-epoch: every batch arrives once, in order, bit-identical."""
    expected = reference(factories.big, count=40, seed=2, rank=0, world_size=1, nbytes=4096, delay=0.01)
    victim = request_server("factories:big", "nbytes=4096", "delay=0.01")
    survivor = request_server("factories:big", "nbytes=4096", "delay=0.01")
    received = []
    with Connection(urls_of(victim, survivor), seed=2, timeout=30, prefetch=6, heartbeat=0.2) as connection:
        for step in range(40):
            received.append(connection.recv())
            if step == 10:
                victim[0].kill()
        servers = {s.address: s.alive for s in connection._servers if s.parent is None}  # not their workers
    assert_same_batches(received, expected)
    assert list(servers.values()).count(False) == 1


def test_no_server_times_out_then_the_stream_continues_when_one_is_back(request_server: StartServer) -> None:
    """With every server gone, recv raises Timeout naming the endpoint; a server restarted there resumes the stream."""
    process, url = request_server("factories:small", "repeating=true")
    port = int(url.rsplit(":", 1)[1])
    with Connection(url, seed=4, timeout=30, heartbeat=0.2) as connection:
        received = [connection.recv() for _ in range(4)]  # the server and its worker are up: not timed
        process.kill()
        process.wait(timeout=10)
        connection.timeout = 2
        started = time.monotonic()
        with pytest.raises(Timeout, match=f"127.0.0.1:{port}"):
            for _ in range(100):  # batches already prefetched may still arrive first
                received.append(connection.recv())
        assert time.monotonic() - started < 20  # the 2 s timeout, not the 30 s one the connection opened with
        request_server("factories:small", "repeating=true", port=port)
        connection.timeout = 30
        for _ in range(8):  # however many came before the Timeout (workers answer until they see the kill)
            received.append(connection.recv())
    expected = reference(factories.small, seed=4, rank=0, world_size=1, repeating=True, count=len(received))
    assert_same_batches(received, expected)


def test_pipeline_error_reaches_the_client_with_step_and_message(request_server: StartServer) -> None:
    """A batch whose pipeline fails raises RemoteError naming the step and the cause; the next batches still come."""
    _, url = request_server("factories:failing")
    with Connection(url, timeout=30) as connection:
        labels = [connection.recv()["label"].tolist() for _ in range(3)]
        with pytest.raises(RemoteError, match="step 3: .*sample 13 is corrupt"):
            connection.recv()
        labels.append(connection.recv()["label"].tolist())
    assert labels == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [16, 17, 18, 19]]


def test_several_clients_are_served_at_once(request_server: StartServer) -> None:
    """Two clients with different seeds, interleaved on one server, each get their own exact stream."""
    _, url = request_server("factories:small", workers=2)
    with (
        Connection(url, seed=1, timeout=30) as one,
        Connection(url, seed=2, timeout=30) as two,
    ):
        got = [[], []]
        for _ in range(8):
            got[0].append(one.recv())
            got[1].append(two.recv())
    assert_same_batches(got[0], reference(factories.small, count=8, seed=1, rank=0, world_size=1))
    assert_same_batches(got[1], reference(factories.small, count=8, seed=2, rank=0, world_size=1))


def test_state_from_another_pipeline_is_refused(request_server: StartServer) -> None:
    """A state saved from a differently configured pipeline raises StateError naming both fingerprints."""
    _, url = request_server("factories:small")
    with Connection(url, seed=1, timeout=30) as connection:
        connection.recv()
        state = connection.state()
    _, other = request_server("factories:small", "batch_size=8")
    with pytest.raises(StateError, match=state["fingerprint"]):
        Connection(other, seed=1, timeout=30, state=state)
    with pytest.raises(StateError, match="seed 1; this connection has seed 2"):
        Connection(url, seed=2, timeout=30, state=state)


def test_factory_that_returns_no_pipeline_is_reported(request_server: StartServer) -> None:
    """A factory returning something else than a pipeline is an error reply the client raises, not a crash."""
    process, url = request_server("factories:not_a_pipeline")
    with pytest.raises(RemoteError, match="refused this connection: .*must return a tensorcom pipeline"):
        Connection(url, timeout=30)
    assert process.poll() is None


def test_malformed_requests_get_error_replies_and_the_server_survives(
    request_server: StartServer, socket: MakeSocket
) -> None:
    """Garbage, an unknown version and a bad field each get an ERROR reply; the server then serves normally."""
    process, url = request_server("factories:small")
    dealer = socket(zmq.DEALER)
    dealer.connect(url.replace("zreq://", "tcp://"))
    bad = [
        b"\xc1not msgpack",
        msgpack.packb({"v": 99, "cmd": 3}),
        msgpack.packb({"v": 1, "cmd": 3, "seed": -1, "rank": 0, "world_size": 1, "step": 0}),
        msgpack.packb({"v": 1, "cmd": 77}),
        msgpack.packb({"v": 1, "cmd": [3]}),  # unhashable: must not reach a dict lookup
        msgpack.packb({"v": 1, "cmd": 3.0}),
        Message(Command.BATCH, {}).encode(),
    ]
    for frame in bad:
        dealer.send(frame)
        assert dealer.poll(20_000), "no reply to a malformed request"
        reply = Message.decode(dealer.recv_multipart()[0])
        assert reply.command == Command.ERROR and reply.fields["error"] in ("protocol", "pipeline")
    assert process.poll() is None
    with Connection(url, timeout=30) as connection:
        assert_same_batches(
            [connection.recv()], reference(factories.small, count=1, seed=0, rank=0, world_size=1)
        )


def test_slow_consumer_keeps_server_memory_bounded(request_server: StartServer) -> None:
    """A client that stops reading holds the server to its credit window: RSS stays flat while it waits."""
    process, url = request_server("factories:big", "nbytes=4000000")
    with Connection(url, timeout=30, prefetch=3) as connection:
        connection.recv()
        time.sleep(1.0)
        before = rss_kib(process.pid)
        time.sleep(3.0)  # an unbounded server would compute and queue ~8 MB batches all this time
        after = rss_kib(process.pid)
        for _ in range(5):
            connection.recv()
    assert after - before < 40_000, f"server RSS grew from {before} KiB to {after} KiB"


def test_rank_and_world_size_default_to_the_environment(
    request_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without rank/world_size, a Connection takes $RANK and $WORLD_SIZE."""
    _, url = request_server("factories:small")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with Connection(url, timeout=30) as connection:
        assert (connection.rank, connection.world_size) == (2, 3)
        received = list(connection)
    assert_same_batches(received, reference(factories.small, seed=0, rank=2, world_size=3))


def served_in_a_thread(tmp_path: Any, seed: int, prefetch: int = 4, **options: Any) -> list[Any]:
    """Run ``Server(factories.small, 'zrep+ipc://...', **options)`` in a thread, read one epoch, stop the server."""
    server = Server(factories.small, f"zrep+ipc://{tmp_path}/s", **options)
    thread = threading.Thread(target=server.run, kwargs={"duration": 60})
    thread.start()
    try:
        with Connection(f"zreq+ipc://{tmp_path}/s", seed=seed, timeout=30, prefetch=prefetch) as connection:
            return list(connection)
    finally:
        server.stop()
        thread.join(timeout=40)
        assert not thread.is_alive()


def test_in_process_server_object_serves_and_stops(tmp_path: Any) -> None:
    """tensorcom.Server(factory, 'zrep://...') returns a request server that can run in a thread and stop."""
    received = served_in_a_thread(tmp_path, seed=6, workers=0)
    assert_same_batches(received, reference(factories.small, seed=6, rank=0, world_size=1))


@pytest.mark.parametrize("worker_queue", [1, 8])
def test_any_worker_queue_serves_the_same_batches(tmp_path: Any, worker_queue: int) -> None:
    """How many requests a worker holds at a time changes speed only, never which batches arrive or their order."""
    received = served_in_a_thread(tmp_path, seed=5, prefetch=8, workers=2, worker_queue=worker_queue)
    assert_same_batches(received, reference(factories.small, seed=5, rank=0, world_size=1))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"rank": 3, "world_size": 2}, "rank must be in"),
        ({"prefetch": 0}, "prefetch must be >= 1"),
        ({"heartbeat": 0}, "heartbeat must be > 0"),
        (
            {"queue": 32, "on_malformed": "log"},
            r"queue=, on_malformed= are options of zpull://.* \(stream mode\)",
        ),
    ],
    ids=["rank", "prefetch", "heartbeat", "stream-options"],
)
def test_bad_client_settings_are_refused(options: dict[str, Any], message: str) -> None:
    """Impossible client settings raise ConfigError before any socket opens."""
    with pytest.raises(ConfigError, match=message):
        Connection("zreq://127.0.0.1:1", **options)


def test_request_options_on_a_stream_url_are_refused_by_name() -> None:
    """zreq-only options given to a stream Connection raise ConfigError naming them, not a TypeError."""
    with pytest.raises(ConfigError, match=r"seed=, prefetch= are options of zreq:// URLs"):
        Connection("zpull://127.0.0.1:1", seed=3, prefetch=8)
    with Connection("zpull://127.0.0.1:1", timeout=1, queue=4) as stream:  # stream options still work
        assert type(stream) is StreamConnection and isinstance(stream, Connection)


def test_type_checkers_accept_both_kinds_of_connection(tmp_path: Any) -> None:
    """Connection("zreq://...", seed=...) and stream options type-check; an unknown option does not."""
    from mypy import api

    usage = tmp_path / "usage.py"
    usage.write_text(
        "from tensorcom import Connection\n"
        "a = Connection('zreq://h:7880', seed=17, rank=0, world_size=2, prefetch=8, state=None)\n"
        "b = Connection('zpull://h:7880', queue=32, on_malformed='log')\n"
        "c = Connection('zpull://h:7880', prefech=8)\n"
    )
    report, _, status = api.run(
        [str(usage)]
    )  # the project's mypy settings (and cache, when run from the root)
    assert status == 1
    errors = [line.split("usage.py:", 1)[-1] for line in report.splitlines() if ": error:" in line]
    assert errors == [
        '4: error: Unexpected keyword argument "prefech" for "Connection"; did you mean "prefetch"?  [call-arg]'
    ]


def test_no_server_at_start_times_out_naming_it() -> None:
    """A Connection to an address where nothing listens raises Timeout naming it."""
    started = time.monotonic()
    with pytest.raises(Timeout, match="127.0.0.1:9 \\(down\\)|127.0.0.1:9"):
        Connection("zreq://127.0.0.1:9", timeout=0.5)
    assert time.monotonic() - started < 10


def test_sigterm_stops_server_and_its_workers(request_server: StartServer) -> None:
    """SIGTERM ends `tensorcom serve` with exit code 0 and leaves no worker process behind."""
    process, url = request_server("factories:small", workers=2)
    with Connection(url, timeout=30) as connection:
        connection.recv()
    workers = children_of(process.pid)
    assert len(workers) >= 2
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) == 0
    assert wait_until_gone(workers, 20) == []


def test_protocol_error_class_is_a_value_error() -> None:
    """ProtocolError is also a ValueError, like the other bad-input errors."""
    assert issubclass(ProtocolError, ValueError)


def test_replies_a_full_client_queue_refuses_wait_and_none_is_lost(tmp_path: Any) -> None:
    """A server whose socket queue toward a client is full (queue=1, a credit window of 12, a client that sleeps)
    keeps the replies in order and sends them when the client reads again: all arrive, none twice."""
    server = RequestServer(factories.small, f"zrep+ipc://{tmp_path}/s", workers=0, queue=1)
    thread = threading.Thread(target=server.run, kwargs={"duration": 60})
    thread.start()
    try:
        with Connection(f"zreq+ipc://{tmp_path}/s", seed=2, prefetch=12, timeout=20) as connection:
            received = [connection.recv()]
            time.sleep(1.0)  # the window's requests are answered meanwhile; most replies wait in the outbox
            received += list(connection)
        assert_same_batches(received, reference(factories.small, seed=2, rank=0, world_size=1))
    finally:
        server.stop()
        thread.join(timeout=40)


def test_a_deep_window_fits_in_the_client_queue(request_server: StartServer) -> None:
    """The client's receive queue holds its whole request window (prefetch x group steps), so a server never has
    to hold replies back for a client that asked for them (a reply it holds waits for its next look, and with a
    window of 64 small batches that made a client 50 times slower). The batches are still the reference's."""
    from tensorcom.client.request import _GROUP

    _, url = request_server("factories:small")
    with Connection(url, timeout=30, prefetch=16) as connection:
        window = connection.prefetch * _GROUP
        for endpoint in connection._endpoints:
            assert endpoint.socket.getsockopt(zmq.RCVHWM) >= window
        batches = list(connection)  # one epoch: 15 batches
    assert_same_batches(batches, reference(factories.small, count=15, seed=0, rank=0, world_size=1))


def test_one_request_for_several_steps_gets_its_steps_in_one_reply(
    request_server: StartServer, socket: MakeSocket
) -> None:
    """REQUEST with count=3 of small batches is answered by one BATCHES reply for steps 2, 3 and 4 (issue 20: it
    was three BATCH replies): a header, then one frame with every array's bytes at 64-byte boundaries; they are the
    reference's batches. A count out of [1, MAX_GROUP] is a protocol ERROR."""
    from tensorcom.codec import data_size, decode
    from tensorcom.protocol import MAX_GROUP

    _, url = request_server("factories:small", workers=1)
    dealer = socket(zmq.DEALER)
    dealer.connect(url.replace("zreq://", "tcp://"))
    fields = {"seed": 5, "rank": 0, "world_size": 1, "base": {"state": None, "epoch": None}, "gen": 0}
    dealer.send(Message(Command.REQUEST, {**fields, "step": 2, "count": 3}).encode())
    assert dealer.poll(20_000), "no reply to a request for 3 steps"
    header, *frames = dealer.recv_multipart()
    message = Message.decode(header)
    assert message.command == Command.BATCHES
    assert (message.fields["step"], len(message.fields["epochs"]), message.fields["arrays"]) == (2, 3, 2)
    (data,) = frames  # every array's bytes, each from a multiple of 64 bytes
    tensors, places = message.fields["tensors"], []
    for header in tensors:
        start = -(-places[-1][1] // 64) * 64 if places else 0
        places.append((start, start + data_size(header)))
    pairs = [part for header, (a, b) in zip(tensors, places, strict=True) for part in (header, data[a:b])]
    batches = [tuple(decode(pairs[i * 4 : (i + 1) * 4])) for i in range(3)]
    expected = reference(factories.small, count=5, seed=5, rank=0, world_size=1)[2:]
    assert_same_batches(batches, expected)
    for count in (0, MAX_GROUP + 1, "3"):
        dealer.send(Message(Command.REQUEST, {**fields, "step": 0, "count": count}).encode())
        assert dealer.poll(20_000)
        reply = Message.decode(dealer.recv_multipart()[0])
        assert reply.command == Command.ERROR and reply.fields["error"] == "protocol"
    dealer.send(Message(Command.HELLO, {**fields, "count": "x"}).encode())  # count means nothing there
    assert dealer.poll(20_000)
    assert Message.decode(dealer.recv_multipart()[0]).command == Command.WELCOME


@pytest.mark.xfail(
    strict=True,
    reason="a zreq client's DEALERs use ZMQ_IMMEDIATE (tensorcom/client/request.py), and libzmq then drops what a "
    "socket has received but not read when its peer disconnects",
)
def test_replies_that_arrived_before_the_server_closed_are_read(tmp_path: Any) -> None:
    """Replies sent by the only server before it finished (its run count reached) are delivered, even when the client
    reads them after the server has closed."""
    server = RequestServer(factories.small, f"zrep+ipc://{tmp_path}/s", workers=0)
    thread = threading.Thread(target=server.run, kwargs={"count": 3})
    thread.start()
    try:
        with Connection(f"zreq+ipc://{tmp_path}/s", seed=1, prefetch=1, timeout=30) as connection:
            received = [connection.recv() for _ in range(2)]  # then it asks for steps 2 to 5 at once
            thread.join(timeout=40)  # the server answers the steps it holds, then closes
            assert not thread.is_alive() and server.served == 6
            connection.timeout = 5  # the replies are in this process already, or never come
            received += [connection.recv() for _ in range(4)]
        assert_same_batches(received, reference(factories.small, count=6, seed=1, rank=0, world_size=1))
    finally:
        server.stop()
        thread.join(timeout=40)
