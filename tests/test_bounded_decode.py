"""What a peer sends is bounded before and while it is decoded (issue 21, items 1 and 4): msgpack bombs in headers,
metadata and control messages, messages of many frames, and floods of subscriptions to a publisher."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import Callable

import factories
import msgpack
import numpy as np
import pytest
import zmq
from helpers import READY_SECONDS, StartProcess, serve

from tensorcom import Connection, ProtocolError, RemoteError, Server, Timeout, codec, protocol
from tensorcom.protocol import MAX_CONTAINERS, Request, Seek, stream_meta_frame


def peak_while(work: Callable[[], object]) -> int:
    """Bytes Python allocated at the peak of ``work()`` (which must raise ProtocolError)."""
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError):
            work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    "bomb",
    [
        {"v": 1, "cmd": 3, "x": [{}] * 500_000},  # flat: half a million empty maps
        {"v": 1, "cmd": 7, "x": [[[] for _ in range(500)]] * 1000},  # nested: no array longer than 1000
    ],
    ids=["flat", "nested"],
)
def test_a_header_of_many_empty_containers_is_refused_before_it_is_built(bomb: dict[str, object]) -> None:
    """Decoding stops at MAX_CONTAINERS maps and arrays: Python allocates far less than the dicts and lists of the
    whole message (≈ 30-60 MB for these ≤ 1 MB headers)."""
    data = msgpack.packb(bomb)
    assert len(data) <= protocol.MAX_HEADER_BYTES
    peak = peak_while(lambda: protocol.decode(data, "a test peer"))
    assert peak < 8 << 20, peak
    with pytest.raises(ProtocolError, match=f"more than {MAX_CONTAINERS} maps and arrays"):
        protocol.decode(data, "a test peer")


def test_legitimate_headers_decode_within_the_bounds() -> None:
    """A request carrying a large pipeline state (thousands of nested maps) and a batch of 100 000 indices pass."""
    state = {"sources": [{"position": i, "epoch": 1, "rng": [i, i + 1]} for i in range(5000)]}
    request = Request(seed=3, rank=1, world_size=4, step=7, base=protocol.Base(state=state))
    decoded = protocol.decode(request.encode(), "a test peer")
    assert decoded == request
    batch = protocol.Batch(step=1, indices=list(range(100_000)), kind="tuple")
    assert protocol.decode(batch.encode(), "a test peer") == batch


def test_ext_types_and_non_string_keys_are_refused() -> None:
    with pytest.raises(ProtocolError):
        protocol.decode(msgpack.packb({"v": 1, "cmd": 7, "x": msgpack.ExtType(5, b"x" * 100)}))
    with pytest.raises(ProtocolError):
        protocol.decode(msgpack.packb({"v": 1, "cmd": 7, 5: 1}))


def test_malformed_metadata_is_skipped_with_on_malformed_log(
    ipc_url: Callable[..., str], caplog: pytest.LogCaptureFixture
) -> None:
    """Metadata over the header limit, or full of empty lists, is a malformed batch: logged and skipped with
    on_malformed="log" (the next batch arrives), a ProtocolError with the default."""
    frames = codec.encode([np.arange(4)])
    good_meta = stream_meta_frame({"v": 1, "cmd": 4, "step": 0, "kind": "single", "indices": [0]})
    oversized = b"~TcMeta~" + msgpack.packb([[]] * (2 << 20))
    bomb = b"~TcMeta~" + msgpack.packb([[[] for _ in range(1000)]] * 500)
    context = zmq.Context.instance()
    for on_malformed in ("log", "raise"):
        url = ipc_url("zpull", on_malformed)
        with Connection(url, timeout=20, on_malformed=on_malformed) as client:
            sender = context.socket(zmq.PUSH)
            sender.connect(client.endpoints[0])
            for meta in (oversized, bomb, good_meta):
                sender.send_multipart([*frames, meta])
            if on_malformed == "log":
                with caplog.at_level(logging.WARNING):
                    batch = client.recv()
                assert list(batch) == [0, 1, 2, 3]
                assert client.malformed == 2
                assert "at most" in caplog.text and f"more than {MAX_CONTAINERS}" in caplog.text
            else:
                with pytest.raises(ProtocolError, match="at most"):
                    client.recv()
            sender.close(linger=0)


def test_control_bombs_are_answered_with_errors_and_seek_still_works(ipc_url: Callable[..., str]) -> None:
    """A SEEK control socket answers a message of 200 000 frames and a msgpack bomb with protocol ERRORs, and then
    obeys a real SEEK."""
    with Connection(ipc_url("zpull"), timeout=20) as connection:
        server = Server(
            factories.small, ipc_url("zpush"), control=ipc_url("zrep", "control"), send_timeout=20
        )
        thread = threading.Thread(target=lambda: _run_quietly(server), daemon=True)
        thread.start()
        connection.recv()
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(server.control_endpoint or "")
        dealer.send_multipart([b""] * 200_000)
        bomb = msgpack.packb({"v": 1, "cmd": 9, "state": [{}] * 300_000})
        dealer.send(bomb)
        replies = []
        for _ in range(2):
            assert dealer.poll(READY_SECONDS * 1000), "no answer from the control socket"
            replies.append(protocol.decode(dealer.recv_multipart()[-1]))
        assert [type(r).__name__ for r in replies] == ["Error", "Error"]
        assert "200000 frames" in replies[0].message or "200001" in replies[0].message
        assert f"more than {MAX_CONTAINERS}" in replies[1].message
        dealer.send(Seek(epoch=0).encode())
        assert dealer.poll(READY_SECONDS * 1000)
        assert type(protocol.decode(dealer.recv_multipart()[-1])).__name__ == "Sought"
        dealer.close()
    thread.join(timeout=30)


def _run_quietly(server: Server) -> None:
    try:
        server.run()
    except Timeout:
        pass


_FLOOD = r"""
import os, sys, time, zmq
address, total = sys.argv[1], int(sys.argv[2])
context, sent = zmq.Context(), 0
while sent < total:
    socket = context.socket(zmq.XSUB)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SNDHWM, 100_000)
    socket.connect(address)
    try:
        for _ in range(4000):
            socket.send(b"\x01" + os.urandom(250), zmq.NOBLOCK)
            sent += 251
    except zmq.Again:
        pass
    time.sleep(0.05)
    socket.close()
"""


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def test_a_flood_of_distinct_subscriptions_is_cut_and_memory_stays_bounded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """8 MB of distinct 250-byte subscriptions (libzmq's trie would hold ~45 bytes per byte of them, ≈ 360 MB):
    the peers that send them are cut, the publisher's memory stays bounded, and a subscriber gets every batch."""
    publisher = Server(None, "zpub://127.0.0.1:0", queue=2, send_timeout=120, linger=0)
    address = publisher.endpoints[0]
    received: list[int] = []
    with Connection(address.replace("tcp://", "zsub://"), timeout=60) as good:

        def read() -> None:
            while not received or received[-1] != -2:
                received.append(int(good.recv()[0][0]))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        publisher.send([np.full(4096, -1)])
        before = peak = rss_mb()
        attacker = subprocess.Popen([sys.executable, "-c", _FLOOD, address, str(8 << 20)])
        sent = 0
        with caplog.at_level(logging.WARNING, logger="tensorcom.server.stream"):
            while attacker.poll() is None or sent < 1000:  # publish all along the flood
                publisher.send([np.full(4096, sent)])
                sent += 1
                peak = max(peak, rss_mb())
            publisher.send([np.full(4096, -2)])
        reader.join(READY_SECONDS * 4)
    publisher.close()
    assert attacker.returncode == 0
    assert received == [-1, *range(sent), -2]
    assert peak - before < 100, (before, peak)
    assert "subscriptions to topics it does not publish" in caplog.text


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "through-the-front-end"])
def test_a_batch_larger_than_the_clients_frame_limit_is_an_error_not_a_retry_loop(
    start_process: StartProcess, direct: bool
) -> None:
    """A zreq client tells servers its max_message_size; a batch with a larger array comes back as an error naming
    the step, the size and the limit, instead of a frame the client's socket drops (then asks for again, forever)."""
    flag = "--direct" if direct else "--no-direct"
    _, url = serve(start_process, "factories:big", "-o", "nbytes=300000", flag, workers=1)
    with (
        Connection(url, timeout=60, max_message_size=200_000) as client,
        pytest.raises(RemoteError, match=r"step 0 holds an array of 600000 bytes.*at most 200000 bytes"),
    ):
        client.recv()


def test_a_stream_timeout_names_dropped_connections_and_the_frame_limit() -> None:
    """A stream server sending an array over the client's max_message_size loses its connection each time; the
    client's Timeout says so, with the limit, instead of a bare timeout."""
    with Connection("zpull://127.0.0.1:0", timeout=5, max_message_size=100_000) as client:
        server = Server(None, client.endpoints[0].replace("tcp://", "zpush://"), send_timeout=5, linger=0)
        sender = threading.Thread(
            target=lambda: _send_quietly(server, np.zeros(300_000, np.uint8)), daemon=True
        )
        sender.start()
        with pytest.raises(Timeout, match=r"connections dropped meanwhile.*max_message_size=100000 bytes"):
            client.recv()
        sender.join(30)
        server.close()


def _send_quietly(server: Server, array: np.ndarray) -> None:
    for _ in range(3):
        try:
            server.send([array])
        except Timeout:
            return
