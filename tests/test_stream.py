"""Stream mode end to end: real server processes feeding a Connection over tcp and ipc."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zmq
from helpers import READY_SECONDS, MakeSocket, StartProcess, wait_until

from tensorcom import Connection, DecodeError, Server, Timeout, URLError, codec, serve


def labels_of(batches: list[list[np.ndarray]]) -> list[int]:
    return [int(label) for batch in batches for label in batch[1]]


def tcp_pair(client_scheme: str, server_scheme: str) -> tuple[Connection, str]:
    """A client that binds port 0 on loopback, and the URL a server uses to reach it."""
    connection = Connection(f"{client_scheme}://127.0.0.1:0", timeout=20)
    return connection, connection.endpoints[0].replace("tcp://", f"{server_scheme}://")


@pytest.mark.parametrize(
    "client_scheme, server_scheme",
    [("zpull", "zpush"), ("zrsub", "zrpub")],
    ids=["push-pull", "pub-sub"],
)
def test_server_process_feeds_connection_over_tcp(
    synthetic_server: StartProcess, client_scheme: str, server_scheme: str
) -> None:
    """A serve-synthetic process delivers every batch, in order, to a Connection over tcp."""
    connection, server_url = tcp_pair(client_scheme, server_scheme)
    with connection:
        process = synthetic_server(server_url, count=30)
        batches = [connection.recv() for _ in range(30)]
    assert labels_of(batches) == [i % 1000 for i in range(30 * 4)]
    assert all(b[0].shape == (4, 8, 8, 3) and b[0].dtype == np.uint8 for b in batches)
    assert process.wait(timeout=20) == 0


@pytest.mark.parametrize(
    "server_scheme, client_scheme", [("zrpush", "zrpull"), ("zpub", "zsub")], ids=["push-pull", "pub-sub"]
)
def test_server_process_feeds_connection_over_ipc(
    synthetic_server: StartProcess,
    ipc_url: Callable[..., str],
    tmp_path: Path,
    server_scheme: str,
    client_scheme: str,
) -> None:
    """Over ipc, with the server binding, a late-connecting client still gets every batch from the first."""
    process = synthetic_server(ipc_url(server_scheme), count=25)
    assert wait_until(lambda: (tmp_path / "socket").exists(), READY_SECONDS), "the server never bound"
    with Connection(ipc_url(client_scheme), timeout=20) as connection:
        batches = [connection.recv() for _ in range(25)]
    assert labels_of(batches) == list(range(100))
    assert process.wait(timeout=20) == 0


def test_every_url_is_used(synthetic_server: StartProcess, ipc_url: Callable[..., str]) -> None:
    """A Connection given several URLs (brace-expanded) receives from all its servers, not just the last."""
    first = synthetic_server(ipc_url("zrpush", "s0"), count=10)
    second = synthetic_server(ipc_url("zrpush", "s1"), count=10, batch_size=3)
    client_url = ipc_url("zrpull", "s{0,1}")
    with Connection(client_url, timeout=20) as connection:
        assert len(connection.endpoints) == 2
        sizes = []
        sources = set()
        for _ in range(20):
            batch = connection.recv()
            sizes.append(len(batch[1]))
            sources.add(connection.last.endpoint)
        assert sources == set(connection.endpoints)
    assert sorted(sizes) == [3] * 10 + [4] * 10
    assert first.wait(timeout=20) == 0 and second.wait(timeout=20) == 0


def test_server_returns_only_after_every_batch_left(
    synthetic_server: StartProcess, ipc_url: Callable[..., str]
) -> None:
    """A server that runs out of batches stays up until a slow client has taken them all and gone, then exits."""
    process = synthetic_server(ipc_url("zrpush"), count=40)
    with Connection(ipc_url("zrpull"), timeout=20) as connection:
        batches = []
        for _ in range(40):
            batches.append(connection.recv())
            time.sleep(0.005)
        assert process.poll() is None  # still connected: the server waits for this client
        connection.timeout = 0.3
        with pytest.raises(Timeout):
            connection.recv()
    assert labels_of(batches) == list(range(160))
    assert process.wait(timeout=20) == 0


def test_torch_conversion_shares_memory_with_the_frame(ipc_url: Callable[..., str]) -> None:
    """converters='torch' yields tensors whose storage is the received frame's buffer (no copy)."""
    torch = pytest.importorskip("torch")
    with Connection(ipc_url("zpull"), converters="torch", timeout=20) as connection:
        server = Server(None, ipc_url("zpush"), linger=5)
        images = np.arange(64 * 3 * 32 * 32, dtype=np.uint8).reshape(64, 3, 32, 32)
        server.send([images, np.arange(64, dtype=np.int64)])
        tensor, labels = connection.recv()
        server.close()
    assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.uint8
    assert torch.equal(tensor, torch.from_numpy(images))
    assert labels.dtype == torch.int64
    # the tensor is a view: writing through it changes the numpy view of the same received buffer
    shared = tensor.numpy()
    tensor[0, 0, 0, 0] = 200
    assert shared[0, 0, 0, 0] == 200


def test_decoded_arrays_are_views_of_received_frames(ipc_url: Callable[..., str], socket: MakeSocket) -> None:
    """A received 64x3x224x224 batch is not copied: the array's memory lies inside the zmq frame."""
    pull = socket(zmq.PULL)
    pull.bind(ipc_url("raw").split("+", 1)[1])
    push = socket(zmq.PUSH)
    push.connect(ipc_url("raw").split("+", 1)[1])
    images = np.zeros((64, 3, 224, 224), np.uint8)
    push.send_multipart(codec.encode([images, np.arange(64)]), copy=False)
    frames = pull.recv_multipart(copy=False)
    decoded = codec.decode(frames)
    assert np.shares_memory(decoded[0], np.frombuffer(frames[1].buffer, np.uint8))


def test_epoch_and_total_limit_iteration(ipc_url: Callable[..., str]) -> None:
    """epoch= ends each iteration after that many batches; total= ends all iteration for good."""
    with Connection(ipc_url("zpull"), epoch=3, total=7, timeout=20) as connection:
        thread = threading.Thread(
            target=serve, args=(([np.array([i])] for i in range(7)), ipc_url("zpush")), kwargs={"linger": 10}
        )
        thread.start()
        assert len(connection) == 3
        runs = [[int(b[0][0]) for b in connection] for _ in range(4)]
    thread.join(timeout=20)
    assert not thread.is_alive()
    assert runs == [[0, 1, 2], [3, 4, 5], [6], []]


def test_timeout_names_the_endpoints() -> None:
    """With no server, recv raises Timeout (a TimeoutError) naming every endpoint it waited on."""
    with Connection(["zpull://127.0.0.1:0", "zrsub://127.0.0.1:0"], timeout=0.2) as connection:
        started = time.monotonic()
        with pytest.raises(Timeout) as raised:
            connection.recv()
        assert time.monotonic() - started < 5
        for endpoint in connection.endpoints:
            assert endpoint in str(raised.value)
    assert isinstance(raised.value, TimeoutError)


@pytest.mark.parametrize(
    "frames, message",
    [([b"garbage"], "malformed batch from"), ([b"x" * 24, b"y"], "unknown dtype code")],
    ids=["one-frame", "bad-header"],
)
def test_malformed_message_is_reported_with_its_source(
    ipc_url: Callable[..., str], socket: MakeSocket, frames: list[bytes], message: str
) -> None:
    """A malformed message raises DecodeError naming the endpoint; on_malformed='log' skips it and goes on."""
    push = socket(zmq.PUSH)
    with Connection(ipc_url("zpull"), timeout=20) as connection:
        push.connect(connection.endpoints[0])
        push.send_multipart(frames)
        with pytest.raises(DecodeError, match=message) as raised:
            connection.recv()
        assert connection.endpoints[0] in str(raised.value)
    with Connection(ipc_url("zpull", "second"), timeout=20, on_malformed="log") as connection:
        push.close(linger=0)
        push = socket(zmq.PUSH)
        push.connect(connection.endpoints[0])
        push.send_multipart(frames)
        push.send_multipart(codec.encode([np.array([42])]))
        (value,) = connection.recv()
        assert int(value[0]) == 42 and connection.malformed == 1


def test_single_buffer_messages_from_tensorcom_0_1_are_read(
    ipc_url: Callable[..., str], socket: MakeSocket
) -> None:
    """tensorcom 0.1's non-multipart mode (one frame holding a .ten buffer) decodes too."""
    push = socket(zmq.PUSH)
    with Connection(ipc_url("zpull"), timeout=20) as connection:
        push.connect(connection.endpoints[0])
        push.send(bytes(codec.encode_buffer([np.arange(3, dtype=np.int16)], aligned=False)))
        (value,) = connection.recv()
        assert value.tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    "factory, url, message",
    [
        (Connection, "zpush://127.0.0.1:5", "cannot use a zpush"),
        (Connection, "zpub://127.0.0.1:5", "cannot use a zpub"),
        (lambda url: Server(None, url), "zpull://127.0.0.1:0", "cannot use a zpull"),
        (Connection, "zpull://nonsense", "needs HOST:PORT"),
    ],
    ids=["client-push", "client-pub", "server-pull", "malformed"],
)
def test_wrong_direction_urls_are_refused(factory: Callable[[str], object], url: str, message: str) -> None:
    """A client given a sending scheme (or a server a receiving one) fails at once with URLError."""
    with pytest.raises(URLError, match=message):
        factory(url)


def test_bind_failure_names_the_url() -> None:
    """A port already in use gives URLError quoting the URL, not a bare zmq error."""
    with Connection("zpull://127.0.0.1:0") as first:
        url = first.endpoints[0].replace("tcp://", "zpull://")
        with pytest.raises(URLError, match="cannot bind") as raised:
            Connection(url)
        assert url in str(raised.value)


def test_send_timeout_when_no_client_takes_batches(ipc_url: Callable[..., str]) -> None:
    """A server whose clients never read raises Timeout naming its endpoint once its queue is full."""
    with Connection(ipc_url("zpull"), queue=1) as connection:
        server = Server(None, ipc_url("zpush"), queue=1, send_timeout=0.3, linger=0)
        with pytest.raises(Timeout, match="could not send") as raised:
            for _ in range(100):
                server.send([np.zeros(1 << 20, np.uint8)])
        assert connection.endpoints[0] in str(raised.value)
        assert 1 <= server.served < 100
        server.close()


def test_topic_frames_are_filtered_and_stripped(ipc_url: Callable[..., str]) -> None:
    """A subscriber to the publisher's topic gets its batches without the topic frame; another topic gets none."""
    publisher = Server(None, ipc_url("zpub") + "?topic=train", linger=0, send_timeout=20)
    with (
        Connection(ipc_url("zsub") + "?topic=train", timeout=20) as matching,
        Connection(ipc_url("zsub") + "?topic=val", timeout=0.5) as other,
    ):
        publisher.send([np.array([1])])
        publisher.send([np.array([2])])
        assert [int(matching.recv()[0][0]) for _ in range(2)] == [1, 2]
        with pytest.raises(Timeout):
            other.recv()
    publisher.close()


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_a_subscriber_that_stops_reading_is_cut_and_the_others_keep_every_batch(
    transport: str, ipc_url: Callable[..., str], caplog: pytest.LogCaptureFixture
) -> None:
    """One zsub peer that never reads would hold an XPUB_NODROP publisher still forever: past stall_timeout its
    connection is cut (one log line) and the reading subscriber gets every batch, in order."""
    publisher = Server(
        None, "zpub://127.0.0.1:0" if transport == "tcp" else ipc_url("zpub"),
        queue=2, send_timeout=120, stall_timeout=1.0, linger=0,
    )  # fmt: skip
    address = publisher.endpoints[0]
    stalled = zmq.Context.instance().socket(zmq.SUB)
    stalled.setsockopt(zmq.RCVHWM, 1)
    stalled.setsockopt(zmq.RCVBUF, 4096)
    stalled.setsockopt(zmq.SUBSCRIBE, b"")
    stalled.setsockopt(zmq.LINGER, 0)
    stalled.setsockopt(zmq.RECONNECT_IVL, 600_000)  # once cut, it stays away for this test
    stalled.connect(address)
    count, size = 200, 1 << 13  # 64 kB batches: under the shm threshold, so all go through the plain socket
    received: list[int] = []
    client_url = address.replace("tcp://", "zsub://").replace("ipc://", "zsub+ipc://")
    with Connection(client_url, timeout=1) as good:
        warm, subscribed = np.full(size, -1, np.int64), [False, False]
        while not all(subscribed):  # both have a batch before the counted ones start
            publisher.send([warm])
            if stalled.poll(0):
                stalled.recv_multipart()
                subscribed[0] = True
            with contextlib.suppress(Timeout):
                good.recv()
                subscribed[1] = True
        good.timeout = 120

        def read() -> None:
            while len(received) < count:
                value = int(good.recv()[0][0])
                if value >= 0:
                    received.append(value)

        reader = threading.Thread(target=read)
        reader.start()
        with caplog.at_level("WARNING", logger="tensorcom.server.stream"):
            for index in range(count):
                publisher.send([np.full(size, index, np.int64)])
        reader.join(READY_SECONDS * 4)
    stalled.close()
    publisher.close()
    assert received == list(range(count))
    assert publisher.cut_subscribers == 1
    assert sum("cut 1 subscriber" in record.getMessage() for record in caplog.records) == 1
