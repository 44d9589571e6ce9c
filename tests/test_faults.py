"""Faults: kill -9 of servers and workers at seeded random points, restarts on the same address, SIGTERM drains,
and clients that vanish mid-request. The zreq stream stays complete, in order and bit-identical throughout.

Every loop is bounded in steps and time; the `slow` variants run many more faults (`make test-slow`).
"""

from __future__ import annotations

import functools
import random
import signal
import subprocess
import threading
import time
from typing import Any

import factories
import pytest
import zmq
from helpers import (
    MakeSocket,
    StartProcess,
    assert_same_batches,
    children_of,
    rss_kib,
    same_batches,
    serve,
    wait_until,
    wait_until_gone,
)
from reliability import record, reference

from tensorcom import Connection, Timeout, protocol
from tensorcom.client import RequestConnection
from tensorcom.protocol import Command, Message, Ping, Pong
from tensorcom.server.request import RequestServer

BIG = ("-o", "nbytes=4096", "-o", "delay=0.002")


def workers_of(pid: int) -> list[int]:
    """The worker processes of a `tensorcom serve` process (not multiprocessing's resource tracker)."""
    found = []
    for child in children_of(pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as cmdline:
                if b"spawn_main" in cmdline.read():
                    found.append(child)
        except FileNotFoundError:
            pass
    return found


def server_pid(name: str) -> int:
    """A request server's name is HOST:PID."""
    return int(name.rsplit(":", 1)[1])


def run_random_kills(start_process: StartProcess, steps: int, kills: int, seed: int) -> dict[str, int]:
    """Three servers of one worker each; at `kills` seeded random steps, kill -9 a random server (and restart it on
    its port) or a random server's worker. Returns the faults survived; asserts the stream is exact."""
    rng = random.Random(seed)
    servers = [serve(start_process, "factories:big", *BIG, workers=1) for _ in range(3)]
    ports = [int(url.rsplit(":", 1)[1]) for _, url in servers]
    expected = reference(
        factories.big, count=steps, seed=seed, rank=0, world_size=1, nbytes=4096, delay=0.002
    )
    schedule = dict(
        zip(
            sorted(rng.sample(range(3, steps - 40), kills)),
            [rng.random() < 0.5 for _ in range(kills)],
            strict=True,
        )
    )
    faults = {"server_kills": 0, "worker_kills": 0, "restarts_used": 0}
    restarted: dict[int, int] = {}  # new server pid -> the step from which it should be used
    served_by: list[int] = []
    received: list[Any] = []
    with Connection(
        [url for _, url in servers], seed=seed, timeout=60, prefetch=6, heartbeat=0.2
    ) as connection:
        while len(received) < steps:
            step = len(received)
            received.append(connection.recv())
            served_by.append(server_pid(connection.last.endpoint))
            if step not in schedule:
                continue
            index = rng.randrange(3)
            process = servers[index][0]
            workers = workers_of(process.pid)
            if schedule[step] or not workers:
                process.kill()
                process.wait(timeout=20)
                servers[index] = serve(start_process, "factories:big", *BIG, workers=1, port=ports[index])
                restarted[servers[index][0].pid] = step
                faults["server_kills"] += 1
            else:
                subprocess.run(["kill", "-9", str(rng.choice(workers))], check=True)
                faults["worker_kills"] += 1
    assert same_batches(received, expected), "the stream lost, repeated or reordered a batch"
    faults["restarts_used"] = sum(1 for pid in restarted if pid in served_by)
    return faults


def test_random_kills_during_a_zreq_epoch_lose_nothing(start_process: StartProcess) -> None:
    """kill -9 of servers and workers at 6 seeded random steps of 120: every batch arrives once, in order,
    bit-identical, and restarted servers serve again."""
    faults = run_random_kills(start_process, steps=120, kills=6, seed=11)
    assert faults["server_kills"] + faults["worker_kills"] == 6
    assert faults["restarts_used"] >= 1 or faults["server_kills"] == 0
    record("random-kills", batches=120, lost=0, **faults)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_random_kills_during_a_zreq_epoch_lose_nothing_long(start_process: StartProcess) -> None:
    """The same with 40 faults over 800 steps."""
    faults = run_random_kills(start_process, steps=800, kills=40, seed=12)
    record("random-kills-long", batches=800, lost=0, **faults)


def test_a_server_restarted_on_its_address_is_picked_up(start_process: StartProcess) -> None:
    """Kill server A and restart it on its port, then kill B for good: the stream goes on through the new A."""
    first, second = (serve(start_process, "factories:big", *BIG) for _ in range(2))
    port = int(first[1].rsplit(":", 1)[1])
    expected = reference(factories.big, count=40, seed=3, rank=0, world_size=1, nbytes=4096, delay=0.002)
    received = []
    with Connection([first[1], second[1]], seed=3, timeout=30, prefetch=4, heartbeat=0.2) as connection:
        for step in range(40):
            received.append(connection.recv())
            if step == 5:
                first[0].kill()
                first[0].wait(timeout=20)
                replacement = serve(start_process, "factories:big", *BIG, port=port)
            if step == 15:
                second[0].kill()
        last = server_pid(connection.last.endpoint)
    assert_same_batches(received, expected)
    assert last == replacement[0].pid


class PingCounter:
    """Counts the PINGs a RequestConnection sends and the PONGs it gets back. A server reads each client's messages
    in order and answers a PING at once, so when every PING has its PONG, the server has read all that was sent
    before the last one."""

    def __init__(self, connection: RequestConnection) -> None:
        self.connection = connection
        self.pings = self.pongs = 0
        send, on_message = connection._send, connection._on_message

        def counting_send(server: Any, message: Any) -> bool:
            sent = send(server, message)
            self.pings += bool(sent and isinstance(message, Ping))
            return sent

        def counting_on_message(server: Any, frames: list[Any]) -> None:
            self.pongs += isinstance(protocol.decode(frames[0]), Pong)
            on_message(server, frames)

        connection._send = counting_send  # type: ignore[method-assign]
        connection._on_message = counting_on_message  # type: ignore[method-assign]

    def wait_until_read(self, seconds: float = 60) -> None:
        """Ping every server, and return once each PING sent has its PONG (replies meanwhile are kept as usual)."""
        connection = self.connection
        for server in connection._servers:
            assert connection._send(server, Ping()), f"could not ping {server.address}"
        deadline = time.monotonic() + seconds
        while self.pongs < self.pings:
            assert time.monotonic() < deadline, (
                f"{self.pings - self.pongs} PINGs unanswered after {seconds} s"
            )
            connection._poll_once(0.05)


def test_sigterm_drains_in_flight_requests_and_exits(start_process: StartProcess) -> None:
    """SIGTERM with requests in flight: they are all answered, later ones are refused, and the server exits 0
    soon after (bounded by --drain)."""
    process, url = serve(
        start_process, "factories:big", "-o", "nbytes=4096", "-o", "delay=0.05", "--drain", "10"
    )
    expected = reference(factories.big, count=24, seed=1, rank=0, world_size=1, nbytes=4096, delay=0.05)
    with Connection(url, seed=1, timeout=60, prefetch=4, heartbeat=0.2) as connection:
        assert isinstance(connection, RequestConnection)
        pings = PingCounter(connection)
        received = [connection.recv() for _ in range(2)]
        pings.wait_until_read()  # the window's requests have reached the server (not a guess of how long it takes)
        in_flight = sorted(
            {*(step for s in connection._servers for step in s.outstanding), *connection._replies}
        )
        # batches this small are asked for 4 steps a request, so the window of 4 requests holds 12 to 16 steps
        assert 12 <= len(in_flight) <= 16
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        for _ in in_flight:
            received.append(connection.recv())
        assert process.wait(timeout=20) == 0
        exited = time.monotonic() - started
        with pytest.raises(Timeout):
            connection.timeout = 1
            connection.recv()
    assert_same_batches(received, expected[: len(received)])
    assert len(received) == 2 + len(in_flight)
    assert exited < 10
    record("sigterm-drain", in_flight=len(in_flight), delivered=len(in_flight), exit_seconds=round(exited, 2))


def test_sigterm_exits_within_the_drain_bound_when_work_is_slow(start_process: StartProcess) -> None:
    """With batches slower than --drain, the server still exits (code 0) within the drain time plus the workers'
    stop time."""
    process, url = serve(start_process, "factories:big", "-o", "nbytes=64", "-o", "delay=1.0", "--drain", "1")
    with Connection(url, seed=1, timeout=30, prefetch=4, heartbeat=0.2) as connection:
        connection.recv()
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    assert time.monotonic() - started < 10


def test_sigterm_of_one_server_loses_nothing(start_process: StartProcess) -> None:
    """SIGTERM one of two servers mid-epoch: the client moves to the other at once; the stream is exact."""
    leaving, staying = (serve(start_process, "factories:big", *BIG) for _ in range(2))
    expected = reference(factories.big, count=40, seed=8, rank=0, world_size=1, nbytes=4096, delay=0.002)
    received = []
    with Connection([leaving[1], staying[1]], seed=8, timeout=30, prefetch=6, heartbeat=0.2) as connection:
        for step in range(40):
            received.append(connection.recv())
            if step == 10:
                leaving[0].send_signal(signal.SIGTERM)
    assert leaving[0].wait(timeout=20) == 0
    assert_same_batches(received, expected)


# clients that vanish


def abandon(socket: MakeSocket, url: str, clients: int, requests: int) -> None:
    """Clients that ask for batches and disappear without reading the replies: zreq Connections closed after one
    batch (their prefetch window abandoned) and raw DEALERs (made by ``socket``) that send a burst of REQUESTs and
    close."""
    for index in range(clients):
        with Connection(url, seed=index, timeout=30, prefetch=8) as connection:
            connection.recv()
    tcp = url.replace("zreq://", "tcp://")
    for index in range(clients):
        dealer = socket(zmq.DEALER)
        dealer.connect(tcp)
        for step in range(requests):
            fields = {"seed": index, "rank": 0, "world_size": 1, "gen": 1, "step": step, "base": {}}
            dealer.send(Message(Command.REQUEST, fields).encode())
        time.sleep(0.01)
        dealer.close(linger=0)


def test_vanished_clients_leave_no_state_on_the_server(socket: MakeSocket) -> None:
    """After clients vanish mid-request, the server's per-client queues and workers' outstanding requests drain to
    empty: nothing is kept for clients that are gone."""
    server = RequestServer(
        functools.partial(factories.big, nbytes=65536), "zrep://127.0.0.1:0", workers=1, report_interval=60
    )
    url = server.endpoints[0].replace("tcp://", "zreq://")
    thread = threading.Thread(target=server.run, kwargs={"duration": 100}, daemon=True)
    thread.start()
    try:
        for _ in range(2):
            abandon(socket, url, clients=10, requests=20)
            deadline = time.monotonic() + 30
            while (server.in_flight or server._pending) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert server.in_flight == 0 and not server._pending
        with Connection(url, seed=1, timeout=30) as connection:
            connection.recv()
    finally:
        server.stop()
        thread.join(timeout=30)


def test_vanished_clients_do_not_grow_server_memory(start_process: StartProcess, socket: MakeSocket) -> None:
    """Rounds of clients that abandon requests for 512 KB batches: the server's RSS settles instead of growing
    round after round."""
    process, url = serve(start_process, "factories:big", "-o", "nbytes=262144", workers=1)
    sizes = []
    for _ in range(4):
        abandon(socket, url, clients=12, requests=16)
        time.sleep(1.0)
        sizes.append(rss_kib(process.pid))
    growth = sizes[-1] - sizes[0]
    assert growth < 40_000, f"server RSS grew {sizes} KiB over rounds of vanishing clients"
    assert process.poll() is None
    record(
        "vanishing-clients", rounds=4, abandoned_requests=4 * 12 * (16 + 7), rss_kib=sizes, growth_kib=growth
    )


def test_a_finished_stream_server_still_answers_a_seek(ipc_url: Any) -> None:
    """A stream server whose pipeline has ended keeps answering SEEK while its client is connected, and sends again
    from the state it is given (so a client's seek cannot race the end of the epoch)."""
    from tensorcom import Server

    expected = reference(factories.small, seed=6, rank=0, world_size=1)
    with Connection(ipc_url("zpull"), timeout=20) as connection:
        server = Server(factories.small, ipc_url("zpush"), seed=6, control=ipc_url("zrep", "c"), linger=20)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        first = [connection.recv() for _ in range(len(expected))]
        # the pipeline has ended; the server waits for its client to go (and for a SEEK) until its linger time ends
        assert wait_until(lambda: server._linger_ends is not None), "the server did not reach the end"
        connection.seek(ipc_url("zreq", "c"), epoch=0)
        again = [connection.recv() for _ in range(len(expected))]
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert_same_batches(first, expected)
    assert_same_batches(again, expected)


def test_workers_stuck_in_the_dataset_die_with_their_front_end(start_process: StartProcess) -> None:
    """Workers blocked inside a pipeline call that never returns (here a 10-minute sleep, as on a dead NFS mount)
    die within seconds of a SIGKILL of their front end: the kernel kills them (PR_SET_PDEATHSIG)."""
    process, url = serve(start_process, "factories:big", "-o", "nbytes=64", "-o", "delay=600", workers=2)
    wait_until(lambda: len(workers_of(process.pid)) == 2)  # they start once the server runs
    workers = workers_of(process.pid)
    with Connection(url, timeout=3, heartbeat=0.2) as connection:
        with pytest.raises(Timeout):
            connection.recv()  # the workers are now inside the sleep
    process.kill()
    process.wait(timeout=10)
    assert wait_until_gone(workers, seconds=20) == []


def test_a_server_stuck_in_the_dataset_is_passed_by_after_the_request_deadline(
    start_process: StartProcess,
) -> None:
    """Two servers, one whose worker hangs in the pipeline (its front end still answers pings): past
    request_deadline its steps are asked of the other server, the stream stays exact, and the stuck one is shown
    "stalled"."""
    _, stuck = serve(start_process, "factories:hanging", env={"TENSORCOM_TEST_HANG": "1"})
    _, good = serve(start_process, "factories:hanging")
    expected = reference(factories.hanging, count=12, seed=3, rank=0, world_size=1)
    with Connection([stuck, good], seed=3, timeout=60, heartbeat=0.2, request_deadline=2) as connection:
        received = [connection.recv() for _ in range(12)]
        assert "(stalled)" in connection._describe_servers()
    assert_same_batches(received, expected)


def test_a_worker_stuck_in_the_dataset_is_replaced_after_the_worker_deadline(
    start_process: StartProcess,
) -> None:
    """A worker silent for longer than --worker-deadline (stuck in the pipeline) is killed and a new one started."""
    process, url = serve(
        start_process, "factories:hanging", "--worker-deadline", "2", env={"TENSORCOM_TEST_HANG": "1"}
    )
    wait_until(lambda: len(workers_of(process.pid)) == 1)
    first = workers_of(process.pid)
    with Connection(url, seed=3, timeout=2, heartbeat=0.2) as connection:
        with pytest.raises(Timeout):
            connection.recv()  # the worker is now stuck
    wait_until(lambda: len(workers_of(process.pid)) == 1 and workers_of(process.pid) != first, seconds=60)
