"""tensorcom.server: one Server base for both kinds, one lifecycle, the URLs clients use, and the shared run loop."""

from __future__ import annotations

import inspect
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zmq
from helpers import TESTS, MakeSocket, StartProcess, read_line, wait_ready

from tensorcom import ConfigError, Connection, RequestServer, Server, StreamServer, URLError
from tensorcom.pipeline import Collate, Conveyer, Map, Range
from tensorcom.protocol import Command, Message
from tensorcom.server.run import ready_line

THREAD_SECONDS = 60.0


def numbers(seed: int = 0, rank: int = 0, world_size: int = 1) -> Conveyer:
    """A tiny deterministic pipeline factory: batches of 2 int64 numbers (module level, so workers import it)."""
    return Conveyer([Range(40), Map(lambda index: np.array(index, np.int64)), Collate(2)])


def arrays(count: int) -> list[list[np.ndarray]]:
    return [[np.full(3, i, np.int32)] for i in range(count)]


def in_thread(function: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """Run ``function`` in a daemon thread; its return value (or exception) lands in the returned list."""
    result: list[object] = []

    def target() -> None:
        try:
            result.append(function())
        except BaseException as error:  # handed to the test, which raises it
            result.append(error)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


@pytest.mark.parametrize(
    "source, url, kind",
    [(arrays(1), "zpub://127.0.0.1:0", StreamServer), (numbers, "zrep://127.0.0.1:0", RequestServer)],
    ids=["stream", "request"],
)
def test_server_builds_the_kind_its_urls_ask_for(source: object, url: str, kind: type) -> None:
    """Server(source, url) returns a StreamServer or RequestServer, and either is a Server."""
    server = Server(source, url, **({"workers": 0} if kind is RequestServer else {}))
    try:
        assert type(server) is kind and isinstance(server, Server)
    finally:
        server.close(linger=0)


def test_both_kinds_share_one_lifecycle_signature() -> None:
    """run, stop and close take the same parameters on both kinds (run returns the number of batches sent)."""
    for method in ("run", "stop", "close"):
        stream = inspect.signature(getattr(StreamServer, method))
        request = inspect.signature(getattr(RequestServer, method))
        assert stream == request, method
    assert inspect.signature(StreamServer.run).parameters.keys() == {"self", "count", "duration"}


@pytest.mark.parametrize(
    "urls, message",
    [
        ("zrep://127.0.0.1:0 zpub://127.0.0.1:0", "not both"),
        ("zpull://127.0.0.1:0", "cannot use a zpull URL .* zrep"),
        ("zreq://127.0.0.1:5", "cannot use a zreq URL"),
    ],
    ids=["mixed", "receiving", "client-scheme"],
)
def test_urls_no_server_serves_are_refused_by_name(urls: str, message: str) -> None:
    """A URL no server kind takes, or a mix of both kinds, is a URLError naming it."""
    with pytest.raises(URLError, match=message):
        Server(arrays(1), urls)


def test_stream_client_urls_reach_the_server_as_they_are(ipc_url: Callable[..., str]) -> None:
    """client_urls of a zrpush+ipc and a zpub tcp server (port 0) are URLs a Connection takes unchanged."""
    for url in (ipc_url("zrpush"), "zrpush://127.0.0.1:0"):
        server = StreamServer(arrays(3), url, linger=5)
        (client_url,) = server.client_urls
        assert client_url.startswith("zrpull+ipc://" if "ipc" in url else "zrpull://127.0.0.1:")
        assert not client_url.endswith(":0")
        with Connection(client_url, timeout=THREAD_SECONDS) as connection:
            thread, result = in_thread(server.run)
            received = [int(connection.recv()[0][0]) for _ in range(3)]
        thread.join(THREAD_SECONDS)
        assert received == [0, 1, 2] and result == [3]


def test_request_client_urls_reach_the_server_as_they_are(tmp_path: Path) -> None:
    """client_urls of zrep servers over tcp (port 0) and ipc are zreq URLs a Connection takes unchanged."""
    urls = f"zrep://127.0.0.1:0 zrep+ipc://{tmp_path}/request"
    server = Server(numbers, urls, workers=0)
    tcp, ipc = server.client_urls
    assert tcp.startswith("zreq://127.0.0.1:") and not tcp.endswith(":0")
    assert ipc == f"zreq+ipc://{tmp_path}/request"
    assert ready_line(server) == f"ready {tcp} {ipc}"
    thread, result = in_thread(server.run)
    try:
        for url in (tcp, ipc):
            with Connection(url, seed=1, timeout=THREAD_SECONDS) as connection:
                assert connection.recv().tolist() == [0, 1]
    finally:
        server.stop()
        thread.join(THREAD_SECONDS)
    assert not thread.is_alive() and result == [server.served] and server.served >= 2


def test_a_wildcard_host_becomes_a_host_a_client_can_name() -> None:
    """A server bound to 0.0.0.0 names this machine (never 0.0.0.0, which nothing can connect to)."""
    server = Server(arrays(1), "zpub://0.0.0.0:0", linger=0)
    try:
        (url,) = server.client_urls
    finally:
        server.close(linger=0)
    host = url.removeprefix("zsub://").rpartition(":")[0]
    assert host and host not in ("0.0.0.0", "*")


def test_run_stops_after_count_batches_of_a_stream_server(ipc_url: Callable[..., str]) -> None:
    """A stream server's run(count=4) returns once 4 batches are sent, with their number."""
    server = Server(arrays(10), ipc_url("zrpush"), linger=10)
    (url,) = server.client_urls
    thread, result = in_thread(lambda: server.run(count=4))
    with Connection(url, timeout=THREAD_SECONDS) as connection:
        received = [connection.recv() for _ in range(4)]
    thread.join(THREAD_SECONDS)  # after its client has gone: a finished server waits for that (up to linger)
    assert len(received) == 4 and result == [4]


def test_run_stops_after_count_batches_and_answers_the_requests_it_holds(
    ipc_url: Callable[..., str], socket: MakeSocket
) -> None:
    """A request server's run(count=4) holding a request for steps 0 to 5 answers all six, then returns 6.

    The client is a plain DEALER: a zreq Connection's sockets drop the replies they have not read yet when the server
    closes (see test_request.py, test_replies_that_arrived_before_the_server_closed_are_read), so with one the test
    would depend on the client reading faster than the server closes."""
    server = Server(numbers, ipc_url("zrep"), workers=0)
    (url,) = server.client_urls
    dealer = socket(zmq.DEALER)
    dealer.connect(url.replace("zreq+", ""))
    fields = {"seed": 3, "rank": 0, "world_size": 1, "base": {"state": None, "epoch": None}, "gen": 0}
    dealer.send(Message(Command.REQUEST, {**fields, "step": 0, "count": 6}).encode())
    thread, result = in_thread(lambda: server.run(count=4))
    thread.join(THREAD_SECONDS)
    assert result == [6]
    steps: list[int] = []
    while len(steps) < 6:  # small batches: several steps may come in one BATCHES message (grouped replies)
        assert dealer.poll(THREAD_SECONDS * 1000), f"replies for steps {steps} only"
        header, *frames = dealer.recv_multipart()
        message = Message.decode(header)
        assert message.command in (Command.BATCH, Command.BATCHES) and frames, message
        count = len(message.fields["epochs"]) if message.command == Command.BATCHES else 1
        steps += range(message.fields["step"], message.fields["step"] + count)
    assert steps == list(range(6))
    assert not dealer.poll(100), "a reply beyond the six steps asked for"


@pytest.mark.parametrize("kind", ["stream", "request"])
def test_stop_from_another_thread_ends_run_while_it_waits(kind: str, ipc_url: Callable[..., str]) -> None:
    """stop() ends run() on both kinds even while no client takes anything (a stream send waiting for room)."""
    if kind == "stream":
        endless = ([np.zeros(4, np.uint8)] for _ in iter(int, 1))
        server: Server = Server(endless, ipc_url("zrpush"), queue=1)
    else:
        server = Server(numbers, ipc_url("zrep"), workers=0)
    thread, result = in_thread(server.run)
    thread.join(0.5)  # let it start waiting; the test does not depend on how far it got
    server.stop()
    thread.join(THREAD_SECONDS)
    assert not thread.is_alive() and result == [server.served]


def test_run_server_drains_on_sigterm_and_announces_once_ready(
    tmp_path: Path, start_process: StartProcess
) -> None:
    """The shared run loop: announce() sees a ready server, SIGTERM makes run return and the program exit 0."""
    script = tmp_path / "program.py"
    script.write_text(
        "import sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from test_server import numbers\n"
        "from tensorcom import Server\n"
        "from tensorcom.server.run import ready_line, run_server\n"
        "server = Server(numbers, 'zrep+ipc://' + sys.argv[2], workers=0)\n"
        "served = run_server(server, drain=5, announce=lambda s: print(ready_line(s), flush=True))\n"
        "print('served', served, flush=True)\n"
    )
    process = start_process(str(script), str(TESTS), str(tmp_path / "socket"), stdout=subprocess.PIPE)
    url = wait_ready(process)
    assert url == f"zreq+ipc://{tmp_path / 'socket'}"
    with Connection(url, seed=2, timeout=THREAD_SECONDS) as connection:
        assert connection.recv().tolist() == [0, 1]
    os.kill(process.pid, signal.SIGTERM)
    assert read_line(process).split()[0] == "served"
    assert process.wait(timeout=THREAD_SECONDS) == 0


def test_stop_refuses_a_negative_drain() -> None:
    """stop(drain=-1) is a ConfigError naming the value (both kinds share the check)."""
    server = Server(arrays(1), "zpub://127.0.0.1:0", linger=0)
    try:
        with pytest.raises(ConfigError, match="drain must be >= 0 seconds or None. Found: -1"):
            server.stop(drain=-1)
    finally:
        server.close(linger=0)


def test_a_worker_killed_between_two_requests_costs_no_batch(ipc_url: Callable[..., str]) -> None:
    """kill -9 of the only worker while a client streams: the front end restarts it and the client gets every step
    once, in order."""
    server = Server(numbers, ipc_url("zrep"), workers=1)
    (url,) = server.client_urls
    thread, result = in_thread(server.run)
    try:
        with Connection(url, seed=1, prefetch=1, timeout=THREAD_SECONDS) as connection:
            first = connection.recv().tolist()
            os.kill(server._processes[0].process.pid, signal.SIGKILL)
            rest = [connection.recv().tolist() for _ in range(4)]
    finally:
        server.stop()
        thread.join(THREAD_SECONDS)
    assert [first, *rest] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert not thread.is_alive() and result == [server.served]
