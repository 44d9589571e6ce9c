"""The zrep request server keeps bounded memory whatever its clients send (issue 21, items 1-2, server side): a flood
of requests from many connections, a client that never reads its replies, a message of many frames, more clients
than ``max_clients``, a client whose replies stall. Attackers are raw zmq DEALERs; good clients are zreq
Connections that must still get their exact stream.

Run as a script (``python tests/test_peer_bounds.py [CHECKOUT]``) it measures the attacks of RELIABILITY.md's table
against ``tensorcom serve`` from CHECKOUT (default: this one) and prints what was sent and how the server's RSS grew.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import factories
import pytest
import zmq
from helpers import (
    StartProcess,
    TrackedContext,
    assert_same_batches,
    environment,
    rss_kib,
    serve,
    serve_args,
    stop,
    wait_ready,
    wait_until,
)
from reliability import record, reference

from tensorcom import Connection
from tensorcom.protocol import Command, Error, ErrorKind, Message, Ping, Pong, decode
from tensorcom.server.request import RequestServer

BUSY_SEED = 666
"""Requests with this seed take ``delay`` seconds a sample: they keep the workers busy while the attack lasts."""
FACTORY = "test_peer_bounds:busy_or_fast"


def busy_or_fast(*, seed: int, rank: int, world_size: int, nbytes: int = 1024, delay: float = 0.5) -> Any:
    """Batches of two ``nbytes`` samples; slow (``delay`` seconds a sample) for seed ``BUSY_SEED`` only."""
    return factories.big(
        seed=seed, rank=rank, world_size=world_size, nbytes=nbytes, delay=delay if seed == BUSY_SEED else 0.0
    )


# -- raw clients -----------------------------------------------------------------------------------------------------


def request(seed: int, step: int, state: Any = None, count: int = 1) -> bytes:
    """A REQUEST header as a raw client writes it."""
    fields = {"seed": seed, "rank": 0, "world_size": 1, "gen": 0, "step": step, "base": {"state": state}}
    if count > 1:
        fields["count"] = count
    return Message(Command.REQUEST, fields).encode()


def deaf(context: zmq.Context[Any], tcp: str) -> zmq.Socket[Any]:
    """A DEALER that will never read: its receive queue and kernel buffer are as small as they go, so what the
    server sends it piles up on the server's side."""
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.RCVHWM, 1)
    dealer.setsockopt(zmq.RCVBUF, 4096)
    dealer.setsockopt(zmq.SNDTIMEO, 20_000)  # a send that cannot leave fails the test instead of hanging it
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(tcp)
    return dealer


def reader(context: zmq.Context[Any], tcp: str) -> zmq.Socket[Any]:
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.SNDTIMEO, 20_000)
    dealer.connect(tcp)
    return dealer


def reply_of(dealer: zmq.Socket[Any], what: str, seconds: float = 30.0) -> Any:
    """The decoded header of the next reply on ``dealer``; fails naming ``what`` after ``seconds``."""
    if not dealer.poll(int(seconds * 1000)):
        raise AssertionError(f"no reply to {what} from {dealer.getsockopt_string(zmq.LAST_ENDPOINT)}")
    return decode(dealer.recv_multipart()[0], "server")


def keep_busy(context: zmq.Context[Any], tcp: str, requests: int = 5) -> zmq.Socket[Any]:
    """A client whose slow requests occupy the server's worker (1 s a batch) while an attack lasts."""
    dealer = reader(context, tcp)
    for step in range(requests):
        dealer.send(request(BUSY_SEED, step))
    return dealer


def send_many_frames(dealer: zmq.Socket[Any], frames: int) -> None:
    for _ in range(frames - 1):
        dealer.send(b"", zmq.SNDMORE)
    dealer.send(b"")


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of process ``pid`` (its threads included)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_idle(pid: int, seconds: float = 120.0) -> None:
    """Wait until process ``pid`` has used less than 20 ms of CPU in 0.3 s: it has read what it was sent."""
    deadline = time.monotonic() + seconds
    last = cpu_seconds(pid)
    while True:
        time.sleep(0.3)
        now = cpu_seconds(pid)
        if now - last < 0.02:
            return
        last = now
        assert time.monotonic() < deadline, f"process {pid} still busy after {seconds:g} s"


@contextmanager
def peak_rss(pid: int) -> Iterator[dict[str, int]]:
    """Sample the resident memory (KiB) of process ``pid`` every 20 ms while the block runs: ``before``, ``peak``."""
    figures = {"before": rss_kib(pid, with_children=False), "peak": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            figures["peak"] = max(figures["peak"], rss_kib(pid, with_children=False))
            done.wait(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield figures
    finally:
        done.set()
        thread.join(timeout=5)
        figures["peak"] = max(figures["peak"], rss_kib(pid, with_children=False))


def good_client(url: str, seed: int = 7, count: int = 4, nbytes: int = 1024) -> None:
    """A zreq Connection gets its exact stream from the server under attack."""
    expected = reference(busy_or_fast, count=count, seed=seed, rank=0, world_size=1, nbytes=nbytes)
    with Connection(url, seed=seed, timeout=60) as connection:
        received = [connection.recv() for _ in range(count)]
    assert_same_batches(received, expected)


# -- the attacks, as the measuring script and the slow test run them ---------------------------------------------


def flood(context: zmq.Context[Any], tcp: str, connections: int, requests: int, state: Any) -> int:
    """``requests`` REQUESTs carrying ``state`` from each of ``connections`` DEALERs that never read, while the
    worker is busy; returns the bytes sent. The DEALERs stay open (the caller's context closes them)."""
    header = request(1, 0, state)
    dealers = [deaf(context, tcp) for _ in range(connections)]
    for dealer in dealers:
        for _ in range(requests):
            dealer.send(header, copy=False)
    return len(header) * requests * connections


def unread_replies(context: zmq.Context[Any], tcp: str, messages: int) -> int:
    """Messages the server answers itself (a malformed header, a PING: an ERROR or a PONG each) from a DEALER that
    never reads; returns the bytes sent."""
    dealer = deaf(context, tcp)
    junk = b"\xc1" * 64  # not msgpack
    ping = Message(Command.PING).encode()
    sent = 0
    for index in range(messages):
        message = junk if index % 2 else ping
        dealer.send(message)
        sent += len(message)
    return sent


def many_frames(context: zmq.Context[Any], tcp: str, frames: int) -> tuple[Any, float]:
    """One message of ``frames`` empty frames; returns the reply and the longest the server took to answer a PING
    from another client meanwhile (seconds)."""
    attacker = reader(context, tcp)
    pinger = reader(context, tcp)
    ping = Message(Command.PING).encode()
    pinger.send(ping)
    reply_of(pinger, "a PING")
    longest = 0.0
    stop_pinging = threading.Event()

    def ping_all_along() -> None:
        nonlocal longest
        while not stop_pinging.is_set():
            sent = time.monotonic()
            pinger.send(ping)
            if pinger.poll(60_000):
                pinger.recv_multipart()
            longest = max(longest, time.monotonic() - sent)
            stop_pinging.wait(0.01)

    thread = threading.Thread(target=ping_all_along, daemon=True)
    thread.start()
    send_many_frames(attacker, frames)
    answer = reply_of(attacker, f"a message of {frames} frames", seconds=120)
    time.sleep(0.2)
    stop_pinging.set()
    thread.join(timeout=70)
    return answer, longest


# -- tests ------------------------------------------------------------------------------------------------------


def test_request_flood_from_many_connections_keeps_server_memory_bounded(
    start_process: StartProcess, context: TrackedContext
) -> None:
    """48 connections each send 200 REQUESTs of 16 kB (150 MB) while the worker is busy: the front end keeps at most
    its budget (2 x max_clients x 32 KiB) and a zreq client still gets its exact stream."""
    process, url = serve(start_process, FACTORY, "--max-clients", "64")
    tcp = url.replace("zreq://", "tcp://")
    busy = keep_busy(context, tcp)
    with peak_rss(process.pid) as rss:
        sent = flood(context, tcp, connections=48, requests=200, state={"pad": "x" * 16000})
        wait_idle(process.pid)  # what was sent is read
    growth = (rss["peak"] - rss["before"]) / 1024
    record("peer-bounds-flood", sent_mb=round(sent / 1e6), rss_growth_mb=round(growth))
    assert growth < 60, f"front end RSS grew {growth:.0f} MB under a flood of {sent / 1e6:.0f} MB of requests"
    good_client(url)
    busy.close()
    assert process.poll() is None


def test_client_that_never_reads_cannot_grow_server_memory(
    start_process: StartProcess, context: TrackedContext
) -> None:
    """A client that never reads sends 200k PINGs and malformed headers (the server answers each itself): the
    replies its socket queue refuses are dropped, not kept, and a zreq client is served."""
    process, url = serve(start_process, FACTORY)
    tcp = url.replace("zreq://", "tcp://")
    with peak_rss(process.pid) as rss:
        sent = unread_replies(context, tcp, 200_000)
        wait_idle(process.pid)  # what was sent is read
    growth = (rss["peak"] - rss["before"]) / 1024
    record("peer-bounds-unread", sent_mb=round(sent / 1e6, 1), rss_growth_mb=round(growth))
    assert growth < 20, f"front end RSS grew {growth:.0f} MB for a client that does not read"
    good_client(url)
    assert process.poll() is None


def test_message_of_many_frames_is_refused_by_the_front_end_and_a_worker(
    start_process: StartProcess, context: TrackedContext
) -> None:
    """One message of 200k empty frames, to the front end and to a worker's own socket: each refuses it with a
    PROTOCOL error that counts its frames, without a list of them (RSS stays within what libzmq buffered), and a
    zreq client is served."""
    process, url = serve(start_process, FACTORY)
    tcp = url.replace("zreq://", "tcp://")
    probe = reader(context, tcp)
    workers: tuple[str, ...] = ()

    def worker_listens() -> bool:  # a PONG names the workers once they are ready
        nonlocal workers
        probe.send(Message(Command.PING).encode())
        pong = reply_of(probe, "a PING")
        workers = pong.workers or () if isinstance(pong, Pong) else ()
        return bool(workers)

    assert wait_until(worker_listens, 60, interval=0.2), "the worker never said where it listens"
    worker = "tcp://127.0.0.1:" + workers[0].rsplit(":", 1)[1]
    for target in (tcp, worker):
        attacker = reader(context, target)
        before = rss_kib(process.pid)
        send_many_frames(attacker, 200_000)
        answer = reply_of(attacker, f"200k frames to {target}", seconds=60)
        assert isinstance(answer, Error) and answer.error is ErrorKind.PROTOCOL, answer
        assert "200000" in answer.message, answer.message
        growth = (rss_kib(process.pid) - before) / 1024
        assert growth < 40, f"server RSS grew {growth:.0f} MB for one message of 200k frames to {target}"
    good_client(url)


def test_client_cap_refuses_one_client_too_many_and_takes_one_after_another_leaves(
    start_process: StartProcess, context: TrackedContext
) -> None:
    """With --max-clients 2 and two clients waiting for slow batches, a third gets a ``busy`` ERROR saying why and
    covering every step it asked for; once one of the two has its batch (it leaves the server's books), a new client
    is served."""
    process, url = serve(start_process, FACTORY, "--max-clients", "2", "-o", "delay=0.4")
    tcp = url.replace("zreq://", "tcp://")
    first, second = reader(context, tcp), reader(context, tcp)
    first.send(request(BUSY_SEED, 0))
    second.send(request(BUSY_SEED, 1))
    time.sleep(0.3)  # both taken before the third asks (the batches take 0.8 s each)
    third = reader(context, tcp)
    third.send(request(5, 3, count=4))
    refusal = reply_of(third, "a request beyond max_clients")
    assert isinstance(refusal, Error) and refusal.error is ErrorKind.BUSY, refusal
    assert (refusal.step, refusal.count) == (3, 4), refusal
    assert "2 clients" in refusal.message, refusal.message
    assert isinstance(reply_of(first, "the first client's request").step, int)
    latecomer = reader(context, tcp)
    latecomer.send(request(5, 0))
    batch = reply_of(latecomer, "a request after a client left")
    assert not isinstance(batch, Error), batch
    assert batch.step == 0
    assert process.poll() is None


def test_a_zreq_client_waits_out_a_full_server_instead_of_giving_it_up(
    start_process: StartProcess, context: TrackedContext, caplog: pytest.LogCaptureFixture
) -> None:
    """A server at --max-clients 1 refuses a zreq Connection's HELLO as busy while another client's slow requests
    hold its one place; the Connection leaves it aside for a while, greets it again, and once the place is free
    gets its exact stream from it (an ``unavailable`` refusal would have made it give the server up for good)."""
    process, url = serve(start_process, FACTORY, "--max-clients", "1", "-o", "delay=0.4")
    tcp = url.replace("zreq://", "tcp://")
    holder = keep_busy(context, tcp, requests=3)  # 0.8 s a batch: the place is held for about 2.4 s
    holder.send(Ping().encode())  # answered after its requests were taken: then the place is held
    assert isinstance(reply_of(holder, "a PING after the holder's requests"), Pong)
    received: list[Any] = []
    failed: list[BaseException] = []

    def consume() -> None:
        try:
            with Connection(url, seed=5, timeout=60) as connection:
                received.extend(connection.recv() for _ in range(4))
        except BaseException as error:  # reported by the assertion below
            failed.append(error)

    with caplog.at_level("WARNING", logger="tensorcom.client.request"):
        thread = threading.Thread(target=consume, daemon=True)
        thread.start()
        for step in range(3):  # the holder reads its batches, then leaves the server's books
            assert reply_of(holder, f"the holder's step {step}", seconds=60).step == step
        thread.join(timeout=90)
    assert not thread.is_alive() and not failed, failed
    assert any("is busy" in record.getMessage() for record in caplog.records), "the HELLO was never refused"
    assert_same_batches(received, reference(busy_or_fast, count=4, seed=5, rank=0, world_size=1))
    assert process.poll() is None


@pytest.fixture
def in_process() -> Iterator[Callable[..., tuple[RequestServer, str]]]:
    """Start a RequestServer in a thread of this process (its books can be read); stopped on teardown."""
    started: list[tuple[RequestServer, threading.Thread]] = []

    def start(**options: Any) -> tuple[RequestServer, str]:
        factory = functools.partial(busy_or_fast, nbytes=options.pop("nbytes", 1024))
        server = RequestServer(factory, "zrep://127.0.0.1:0", report_interval=60, **options)
        thread = threading.Thread(target=server.run, kwargs={"duration": 120}, daemon=True)
        thread.start()
        started.append((server, thread))
        return server, server.endpoints[0]

    yield start
    for server, thread in started:
        server.stop()
        thread.join(timeout=30)


def test_client_whose_replies_stall_is_dropped_and_its_memory_freed(
    in_process: Callable[..., tuple[RequestServer, str]], context: TrackedContext
) -> None:
    """A client asks for 64 batches of 512 kB and never reads: once its outbox has not moved for stall_timeout the
    server drops it (requests and replies freed, its connection shut), and its books are empty; a zreq client is
    served meanwhile and after."""
    server, tcp = in_process(workers=1, nbytes=256 * 1024, stall_timeout=1.0, direct=False)
    deaf(context, tcp).send(request(3, 0, count=64))
    assert wait_until(lambda: server._peers.sending, 30), "the client's replies never filled its queue"
    endpoint = server._frontends[0]
    shut = wait_until(lambda: endpoint.count_peers() == 0 and endpoint.disconnects >= 1, 30)
    assert shut, "the server did not shut the connection of a client that does not read"
    assert wait_until(lambda: not server._peers.peers and server._peers.pending_bytes == 0, 30)
    good_client(tcp.replace("tcp://", "zreq://"), nbytes=256 * 1024)
    assert wait_until(lambda: not server._peers.peers, 30), (
        "a client that left is still on the server's books"
    )


def test_books_are_empty_once_flooding_clients_leave(
    in_process: Callable[..., tuple[RequestServer, str]], context: TrackedContext
) -> None:
    """After 16 clients that sent 64 requests each close, the server forgets them: no peer, no pending byte."""
    server, tcp = in_process(workers=1, direct=False)
    flood(context, tcp, connections=16, requests=64, state=None)
    for socket in context.made:
        socket.close(linger=0)
    assert wait_until(lambda: not server._peers.peers and server._peers.pending_bytes == 0, 60), (
        f"{len(server._peers.peers)} clients and {server._peers.pending_bytes} bytes still held"
    )


@pytest.mark.slow
def test_attack_figures(start_process: StartProcess, context: TrackedContext) -> None:
    """The figures of RELIABILITY.md's attack table for the request server (see :func:`measure`)."""
    for row in measure(str(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))):
        record("peer-bounds-figures", **row)
        assert row["rss_growth_mb"] < 200, row


# -- measuring -------------------------------------------------------------------------------------------------------


def measure(checkout: str) -> list[dict[str, Any]]:
    """Run each attack against a fresh ``tensorcom serve`` from ``checkout`` and return the figures."""
    rows = []
    attacks: list[tuple[str, Callable[[zmq.Context[Any], str], Any]]] = [
        (
            "REQUESTs of 30k empty maps, 16 connections x 96, worker busy",
            lambda context, tcp: flood(context, tcp, 16, 96, [{}] * 30_000),
        ),
        (
            "REQUESTs of 16 kB, 48 connections x 200, worker busy",
            lambda c, t: flood(c, t, 48, 200, {"p": "x" * 16000}),
        ),
        (
            "PINGs and bad headers from a client that never reads (2M)",
            lambda c, t: unread_replies(c, t, 2_000_000),
        ),
        ("one message of 1M empty frames", lambda c, t: many_frames(c, t, 1_000_000)),
    ]
    for name, attack in attacks:
        env = environment(Path(__file__).parent, Path(checkout))
        process = subprocess.Popen(
            [sys.executable, *serve_args(FACTORY, workers=1)],
            stdout=subprocess.PIPE,
            env=env,
            cwd=Path(__file__).parent,
        )  # not from the current folder: ``python -m`` would import the tensorcom found there first
        # a TrackedContext keeps the attackers' sockets open: one collected would drop its unsent messages
        context = TrackedContext()
        try:
            url = wait_ready(process)
            tcp = url.replace("zreq://", "tcp://")
            keep_busy(context, tcp)
            started = time.monotonic()
            with peak_rss(process.pid) as rss:
                result = attack(context, tcp)
                wait_idle(process.pid, 600)
            seconds = time.monotonic() - started
            served = time.monotonic()
            good_client(url)  # raises unless the stream is exact
            served = time.monotonic() - served
            for socket in context.made:  # the attackers leave
                socket.close(linger=0)
            time.sleep(1.0)
            wait_idle(process.pid, 600)
            sent = result if isinstance(result, int) else 2 * 1_000_000
            row: dict[str, Any] = {
                "attack": name,
                "sent_mb": round(sent / 1e6, 1),
                "rss_growth_mb": round((rss["peak"] - rss["before"]) / 1024),
                "rss_after_left_mb": round(
                    (rss_kib(process.pid, with_children=False) - rss["before"]) / 1024
                ),
                "seconds": round(seconds, 1),
                "good_client_4_batches_s": round(served, 1),
            }
            if not isinstance(result, int):
                answer, longest = result
                row["answer"] = f"{type(answer).__name__}: {getattr(answer, 'message', '')}"[:80]
                row["longest_ping_s"] = round(longest, 2)
            rows.append(row)
        finally:
            context.destroy(linger=0)
            stop(process)
            if process.stdout is not None:
                process.stdout.close()
    return rows


if __name__ == "__main__":
    for figures in measure(os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else ".")):
        print(json.dumps(figures))
