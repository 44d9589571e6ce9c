"""tensorcom.zcom: tensorcom 0.1's Connection over our client and server, on real sockets and processes."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import READY_SECONDS, StartProcess, environment, stop, wait_ready, wait_until

import tensorcom
from tensorcom import ConfigError, DecodeError, Timeout, URLError, tenbin, zcom

ORIGINAL = os.environ.get("TENSORCOM_01_PYTHON")
needs_original = pytest.mark.skipif(
    not ORIGINAL, reason="set TENSORCOM_01_PYTHON to run against tensorcom 0.1"
)

# Our stream server in a process of its own: python -c SERVER URL COUNT SIZE MODE
SERVER = """
import sys
import numpy as np
from tensorcom.server.stream import StreamServer
url, count, size, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if mode == "pipeline":
    from factories import small
    source = small(seed=3, rank=0, world_size=1, n=4 * count, batch_size=4)
else:
    source = (
        [np.full((4, size, size, 3), i % 251, np.uint8), np.arange(4, dtype=np.int32) + 4 * i] for i in range(count)
    )
server = StreamServer(source, url, linger=60)
print("ready", *server.client_urls, flush=True)
server.run()
"""


def start_server(
    start_process: StartProcess, url: str, count: int, size: int = 8, mode: str = "plain"
) -> Any:
    """Our StreamServer sending ``count`` batches on ``url`` in a process of its own; returns (process, its client
    URL). Plain batch i: images filled with i % 251 and labels 4i..4i+3."""
    process = start_process(
        "-c", SERVER, url, str(count), str(size), mode, stdout=subprocess.PIPE, env=environment()
    )
    return process, wait_ready(process)


def plain_batch(i: int, size: int = 8) -> list[np.ndarray]:
    return [np.full((4, size, size, 3), i % 251, np.uint8), np.arange(4, dtype=np.int32) + 4 * i]


def check_plain(batch: Any, i: int, size: int = 8) -> None:
    assert isinstance(batch, list) and len(batch) == 2, batch
    images, labels = batch
    assert images.shape == (4, size, size, 3) and images.dtype == np.uint8
    assert (images == i % 251).all(), f"batch {i} holds images of batch {images.flat[0]}"
    assert labels.tolist() == list(range(4 * i, 4 * i + 4))


@pytest.fixture
def quick_log(monkeypatch: pytest.MonkeyPatch) -> None:
    """A waiting recv() logs every half second instead of every ten."""
    monkeypatch.setattr(zcom, "WAIT_LOG_SECONDS", 0.5)


_SENDING: list[threading.Thread] = []


def send_in_thread(connection: zcom.Connection, batches: list[list[Any]]) -> threading.Thread:
    """Send ``batches`` from a thread (see :func:`join_senders`)."""
    thread = threading.Thread(target=lambda: [connection.send(batch) for batch in batches], daemon=True)
    thread.start()
    _SENDING.append(thread)
    return thread


def join_senders() -> None:
    """Wait for the sending threads to finish, so that no socket is closed while a thread uses it."""
    while _SENDING:
        thread = _SENDING.pop()
        thread.join(timeout=60)
        assert not thread.is_alive(), "a sending thread is stuck"


# -- receiving from our stream server ---------------------------------------------------------------------------------

RECEIVING = {
    "zsub-tcp": ("zpub://127.0.0.1:0", None),
    "zrpull-tcp": ("zrpush://127.0.0.1:0", None),
    "zpull-tcp": (None, "zpull://127.0.0.1:0"),
    "zsub-ipc": ("zpub+ipc://{dir}/s", None),
    "zrpull-ipc": ("zrpush+ipc://{dir}/s", None),
    "zpull-ipc": (None, "zpull+ipc://{dir}/s"),
}


@pytest.mark.parametrize("server_url, client_url", list(RECEIVING.values()), ids=list(RECEIVING))
def test_receives_every_batch_from_our_stream_server(
    start_process: StartProcess, tmp_path: Path, server_url: str | None, client_url: str | None
) -> None:
    """A zcom.Connection receives every batch of our StreamServer in order, over tcp and ipc, binding or not."""
    if client_url is not None:  # the client binds; the server connects to where it bound
        connection = zcom.Connection(client_url.format(dir=tmp_path))
        address = connection.endpoints[0]
        scheme = "zpush" if address.startswith("tcp://") else "zpush+ipc"
        process, _ = start_server(start_process, f"{scheme}://{address.partition('://')[2]}", 20)
    else:
        process, url = start_server(start_process, str(server_url).format(dir=tmp_path), 20)
        connection = zcom.Connection(url)
    with connection:
        for i in range(20):
            check_plain(connection.recv(), i)
        assert connection.stats.count == 20 and connection.count == 80
    assert process.wait(timeout=READY_SECONDS) == 0


def test_large_batches_over_ipc_come_through_shared_memory(
    start_process: StartProcess, tmp_path: Path
) -> None:
    """Batches of 800 kB over ipc travel in shared memory (the server's slot files exist) and arrive intact."""
    process, url = start_server(start_process, f"zrpush+ipc://{tmp_path}/big", 12, size=256)
    with zcom.Connection(url) as connection:
        first = connection.recv()
        check_plain(first, 0, size=256)
        assert [name for name in os.listdir("/dev/shm") if name.startswith(f"tensorcom-{process.pid}-")]
        for i in range(1, 12):
            check_plain(connection.recv(), i, size=256)
        del first
    assert process.wait(timeout=READY_SECONDS) == 0


def test_pipeline_batches_arrive_without_their_metadata(start_process: StartProcess) -> None:
    """A pipeline server's batches reach a zcom client as a list of just their arrays, metadata left out."""
    process, url = start_server(start_process, "zrpush://127.0.0.1:0", 10, mode="pipeline")
    labels = []
    with zcom.Connection(url) as connection:
        for _ in range(10):
            batch = connection.recv()
            assert isinstance(batch, list) and len(batch) == 2
            images, batch_labels = batch
            assert images.shape == (4, 4, 4, 3) and images.dtype == np.uint8 and batch_labels.shape == (4,)
            labels += batch_labels.tolist()
    assert sorted(labels) == list(range(40))
    assert process.wait(timeout=READY_SECONDS) == 0


# -- sending from a zcom.Connection ------------------------------------------------------------------------------------


@pytest.mark.parametrize("multipart", [True, False], ids=["multipart", "single"])
@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_sends_to_our_connection(tmp_path: Path, multipart: bool, transport: str) -> None:
    """Batches sent by a zcom.Connection (multipart or one frame each) arrive intact in our Connection."""
    where = "127.0.0.1:0" if transport == "tcp" else f"{tmp_path}/s"
    prefix = "" if transport == "tcp" else "+ipc"
    with tensorcom.Connection(f"zpull{prefix}://{where}", timeout=60) as receiver:
        address = receiver.endpoints[0].partition("://")[2]
        sender = zcom.Connection(f"zpush{prefix}://{address}", multipart=multipart, linger=0)
        send_in_thread(sender, [plain_batch(i) for i in range(8)])
        for i in range(8):
            check_plain(receiver.recv(), i)
        join_senders()
    sender.close()
    assert sender.stats.count == 8 and sender.stats.total == 8 * (4 * 8 * 8 * 3 + 16)


@pytest.mark.parametrize("multipart", [True, False], ids=["multipart", "single"])
def test_sends_to_a_zcom_connection(tmp_path: Path, multipart: bool) -> None:
    """One zcom.Connection feeds another over ipc, batches as lists of arrays, with their infos checked."""
    receiver = zcom.Connection(f"zrpull+ipc://{tmp_path}/s", infos=["img", "lbl"], timeout=60)
    sender = zcom.Connection(
        f"zrpush+ipc://{tmp_path}/s", multipart=multipart, infos=["img", "lbl"], linger=0
    )
    assert sender.endpoints
    send_in_thread(sender, [plain_batch(i) for i in range(6)])
    with receiver:
        for i in range(6):
            check_plain(receiver.recv(), i)
    join_senders()
    sender.close()


def test_publisher_reaches_every_subscriber_from_the_first_batch() -> None:
    """A zcom publisher waits for a subscriber, so none of its batches is dropped; each zpub URL gets them all."""
    first = zcom.Connection("zrsub://127.0.0.1:0", timeout=60)
    second = zcom.Connection("zrsub://127.0.0.1:0", timeout=60)
    urls = [f"zrpub://{c.endpoints[0].partition('://')[2]}" for c in (first, second)]
    sender = zcom.Connection(urls, linger=0)
    send_in_thread(sender, [plain_batch(i) for i in range(5)])
    with first, second:
        for i in range(5):
            check_plain(first.recv(), i)
            check_plain(second.recv(), i)
    join_senders()
    sender.close()


def test_several_push_urls_get_batches_in_turn() -> None:
    """Given several zpush URLs, a sender hands each batch to one of them in turn, as 0.1's one PUSH socket did."""
    receivers = [zcom.Connection("zpull://127.0.0.1:0", timeout=60) for _ in range(2)]
    ports = [r.endpoints[0].rsplit(":", 1)[1] for r in receivers]
    sender = zcom.Connection(f"zpush://127.0.0.1:{{{ports[0]},{ports[1]}}}", linger=0)
    assert len(sender.endpoints) == 2
    send_in_thread(sender, [plain_batch(i) for i in range(6)])
    for i in range(3):
        check_plain(receivers[0].recv(), 2 * i)
        check_plain(receivers[1].recv(), 2 * i + 1)
    join_senders()
    for receiver in receivers:
        receiver.close()
    sender.close()


def test_serve_sends_a_whole_source(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """serve() sends every batch of an iterator and logs its rate report every ``report`` samples."""
    receiver = zcom.Connection(f"zrpull+ipc://{tmp_path}/s", timeout=60)
    sender = zcom.Connection(f"zrpush+ipc://{tmp_path}/s", linger=0)
    assert sender.endpoints
    thread = threading.Thread(
        target=sender.serve, args=((plain_batch(i) for i in range(5)),), kwargs={"report": 8}, daemon=True
    )
    with caplog.at_level(logging.INFO, logger="tensorcom.zcom"), receiver:
        thread.start()
        for i in range(5):
            check_plain(receiver.recv(), i)
        thread.join(timeout=60)
    assert not thread.is_alive()
    sender.close()
    reports = [r.getMessage() for r in caplog.records if r.getMessage().startswith("count ")]
    assert [report.split()[1] for report in reports] == ["0", "8", "16"]


# -- what a 0.1 training loop relies on -----------------------------------------------------------------------------------


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Callable[..., tuple[zcom.Connection, zcom.Connection]]]:
    """Make a receiving zcom.Connection (with the given options) fed over ipc by a sending one."""
    made: list[zcom.Connection] = []

    def make(sender_options: Any = None, **options: Any) -> tuple[zcom.Connection, zcom.Connection]:
        url = f"{tmp_path}/s{len(made)}"
        sender = zcom.Connection(f"zrpush+ipc://{url}", linger=0, **(sender_options or {}))
        assert sender.endpoints
        receiver = zcom.Connection(f"zrpull+ipc://{url}", timeout=60, **options)
        made.extend([receiver, sender])
        return receiver, sender

    yield make
    join_senders()
    for connection in made:
        connection.close()


def test_iteration_does_not_stop_at_epoch(pair: Callable[..., Any]) -> None:
    """len() is epoch, but iterating goes on past it (0.1's semantics), through __iter__ and items() alike."""
    receiver, sender = pair(epoch=3)
    assert len(receiver) == 3
    send_in_thread(sender, [plain_batch(i) for i in range(16)])
    for i, batch in enumerate(receiver):
        check_plain(batch, i)
        if i == 7:
            break
    for i, batch in enumerate(receiver.items(), start=8):
        check_plain(batch, i)
        if i == 15:
            break


def test_total_stops_iteration_after_that_many_samples(pair: Callable[..., Any]) -> None:
    """total= ends iteration once that many samples (first-array lengths) have been received."""
    receiver, sender = pair(total=12)
    send_in_thread(sender, [plain_batch(i) for i in range(4)])
    assert len(list(receiver)) == 3 and receiver.count == 12


def test_batch_transforms_then_torch_converters(pair: Callable[..., Any]) -> None:
    """batch_transforms apply first, then converters="torch" (0.1's totorch): channels first, ints to int64."""
    torch = pytest.importorskip("torch")
    receiver, sender = pair(batch_transforms=[lambda images: images[:, :4], None], converters="torch")
    send_in_thread(sender, [plain_batch(5)])
    images, labels = receiver.recv()
    assert (
        isinstance(images, torch.Tensor)
        and tuple(images.shape) == (4, 3, 4, 8)
        and images.dtype == torch.uint8
    )
    assert labels.dtype == torch.int64 and labels.tolist() == [20, 21, 22, 23]
    assert bool((images == 5).all())


def test_converters_apply_by_position_wrapping_around(pair: Callable[..., Any]) -> None:
    """A list of converters applies one per array position, wrapping around as 0.1's transform_with did."""
    receiver, sender = pair(converters=[None, lambda labels: labels.sum()])
    send_in_thread(
        sender,
        [[np.ones(2, np.uint8), np.arange(3, dtype=np.int32), np.ones(2, np.uint8), np.ones(4, np.int16)]],
    )
    first, second, third, fourth = receiver.recv()
    assert first.tolist() == [1, 1] and second == 3 and third.tolist() == [1, 1] and fourth == 4


def test_statistics_count_received_batches(pair: Callable[..., Any]) -> None:
    """stats counts received batches and bytes; its rates work (0.1's rate() raised NameError)."""
    receiver, sender = pair()
    send_in_thread(sender, [plain_batch(i) for i in range(4)])
    for i in range(4):
        check_plain(receiver.recv(), i)
    stats = receiver.stats
    assert stats.count == 4 and stats.total == 4 * (4 * 8 * 8 * 3 + 16)
    assert stats.rate() >= 0 and stats.throughput() >= 0 and stats.recent_rate() >= 0
    assert stats.summary().startswith("rate ") and "bytes/s" in stats.summary()
    assert receiver.batchsize(plain_batch(0)) == 4


def test_connect_after_construction_and_again(tmp_path: Path) -> None:
    """connect() adds URLs as in 0.1 (tensormon's way); a second connect reopens with both, and both are read."""
    senders = [zcom.Connection(f"zrpush+ipc://{tmp_path}/s{k}", linger=0) for k in range(2)]
    for sender in senders:
        assert sender.endpoints
    receiver = zcom.Connection(timeout=60)
    receiver.connect(f"zrpull+ipc://{tmp_path}/s0")
    receiver.connect([f"zrpull+ipc://{tmp_path}/s1"])
    assert len(receiver.endpoints) == 2
    send_in_thread(senders[0], [plain_batch(i) for i in range(3)])
    send_in_thread(senders[1], [plain_batch(i) for i in range(10, 13)])
    seen = sorted(int(receiver.recv()[1][0]) // 4 for _ in range(6))
    assert seen == [0, 1, 2, 10, 11, 12]
    join_senders()
    receiver.close()
    for sender in senders:
        sender.close()


def test_braces_expand_to_every_server(tmp_path: Path) -> None:
    """A brace URL receives from every expanded endpoint."""
    senders = [zcom.Connection(f"zrpush+ipc://{tmp_path}/s{k}", linger=0) for k in range(3)]
    for k, sender in enumerate(senders):
        assert sender.endpoints
        send_in_thread(sender, [plain_batch(k)])
    with zcom.Connection(f"zrpull+ipc://{tmp_path}/s{{0..2}}", timeout=60) as receiver:
        assert len(receiver.endpoints) == 3
        assert sorted(int(receiver.recv()[0].flat[0]) for _ in range(3)) == [0, 1, 2]
    join_senders()
    for sender in senders:
        sender.close()


# -- waiting, timeouts and errors -------------------------------------------------------------------------------------


def test_a_waiting_recv_logs_and_times_out(quick_log: None, caplog: pytest.LogCaptureFixture) -> None:
    """recv() logs while it waits, naming the endpoint; with timeout= it raises tensorcom.Timeout."""
    connection = zcom.Connection("zpull://127.0.0.1:0", timeout=5)
    address = connection.endpoints[0]
    with caplog.at_level(logging.WARNING, logger="tensorcom.zcom"), pytest.raises(Timeout, match=address):
        connection.recv()
    assert any(address in r.getMessage() and "waiting" in r.getMessage() for r in caplog.records)
    connection.close()


def test_recv_without_timeout_waits_until_a_batch_comes(
    quick_log: None, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """By default recv() waits as long as it takes (0.1's behaviour), logging meanwhile."""
    receiver = zcom.Connection(f"zpull+ipc://{tmp_path}/s")
    assert receiver.endpoints
    with caplog.at_level(logging.WARNING, logger="tensorcom.zcom"):
        result: list[Any] = []
        thread = threading.Thread(target=lambda: result.append(receiver.recv()), daemon=True)
        thread.start()
        assert wait_until(lambda: any("waiting" in r.getMessage() for r in caplog.records))
        sender = zcom.Connection(f"zpush+ipc://{tmp_path}/s", linger=0)
        sender.write(plain_batch(2))
        thread.join(timeout=60)
    check_plain(result[0], 2)
    receiver.close()
    sender.close()


def test_64_bit_arrays_need_allow64(pair: Callable[..., Any]) -> None:
    """int64 arrays are refused on send unless allow64 (on send or, unlike 0.1, in the constructor)."""
    receiver, sender = pair()
    wide = [np.arange(3, dtype=np.int64)]
    with pytest.raises(tenbin.TenbinConfigError, match="allow64") as caught:
        sender.send(wide)
    assert isinstance(caught.value, AssertionError)
    sender.send(wide, allow64=True)
    sender.allow64 = True
    sender.send(wide)
    assert receiver.recv()[0].tolist() == [0, 1, 2] and receiver.recv()[0].dtype == np.int64


def test_infos_that_do_not_match_are_refused(pair: Callable[..., Any]) -> None:
    """A receiver given infos refuses a batch whose arrays carry other labels."""
    receiver, sender = pair(infos=["img", "lbl"], sender_options={"infos": ["img", "cls"]})
    sender.send(plain_batch(0))
    with pytest.raises(DecodeError, match="'cls'"):
        receiver.recv()


@pytest.mark.parametrize(
    "make, error, words",
    [
        (lambda: zcom.Connection("zreq://127.0.0.1:7880"), ConfigError, "tensorcom.Connection"),
        (
            lambda: zcom.Connection(["zpull://127.0.0.1:0", "zpush://127.0.0.1:9"]),
            ConfigError,
            "sends or receives",
        ),
        (lambda: zcom.Connection("zsub://127.0.0.1"), URLError, "HOST:PORT"),
        (lambda: zcom.Connection("zsub://h:788{0..3}", noexpand=True), URLError, "braces"),
        (lambda: zcom.Connection(converters="tensorflow"), ConfigError, "converters"),
        (lambda: zcom.Connection(infos="img"), ConfigError, "infos"),
        (lambda: zcom.Connection(timeout=0), ConfigError, "timeout"),
        (lambda: zcom.Connection().recv(), ConfigError, "no URL"),
        (lambda: zcom.Connection("zpub://127.0.0.1:0").recv(), ConfigError, "cannot receive from"),
        (
            lambda: zcom.Connection("zsub://127.0.0.1:9").send([np.zeros(1, np.float32)]),
            ConfigError,
            "cannot send on",
        ),
    ],
    ids=[
        "zreq",
        "both-ways",
        "bad-url",
        "noexpand",
        "converter",
        "infos",
        "timeout",
        "no-url",
        "recv-on-pub",
        "send-on-sub",
    ],
)
def test_misuse_raises_clear_errors(make: Callable[[], Any], error: type[Exception], words: str) -> None:
    """Each misuse raises our error type with a message saying what is wrong."""
    with pytest.raises(error, match=words):
        make()


def test_a_closed_connection_refuses_use() -> None:
    """After close(), recv, send and connect raise ConfigError (0.1 failed with AttributeError)."""
    connection = zcom.Connection("zpull://127.0.0.1:0")
    connection.close()
    for use in (connection.recv, lambda: connection.connect("zpull://127.0.0.1:0")):
        with pytest.raises(ConfigError, match="closed"):
            use()


# -- the helpers 0.1 exported ----------------------------------------------------------------------------------------


def test_schemes_table_is_0_1s() -> None:
    """schemes maps each 0.1 scheme to its ZMQ socket type and whether it binds."""
    import zmq

    assert zcom.schemes["zpush"] == (zmq.PUSH, False) and zcom.schemes["zrsub"] == (zmq.SUB, True)
    assert sorted(zcom.schemes) == sorted(
        ["zpush", "zpull", "zpub", "zsub", "zrpush", "zrpull", "zrpub", "zrsub"]
    )


def test_statistics_rates_over_all_and_recent() -> None:
    """Statistics counts values and computes rates as 0.1 meant to (its rate() raised NameError)."""
    stats = zcom.Statistics(horizon=2)
    assert stats.rate() == 0 and stats.recent_rate() == 0 and stats.throughput() == 0
    for value in (10, 20, 30):
        stats.add(value)
    assert stats.count == 3 and stats.total == 60 and len(stats.recent) == 2
    stats.start, stats.last = stats.last - 2.0, stats.last
    assert stats.rate() == pytest.approx(1.5) and stats.throughput() == pytest.approx(30)
    stats.reset()
    assert stats.count == 0 and stats.total == 0


def test_transform_with_listify_and_numpy_converter() -> None:
    """transform_with wraps transformers around and skips None; listify as 0.1; tonumpy leaves numpy alone."""
    assert zcom.transform_with([1, 2, 3], [lambda x: x * 10, None]) == [10, 2, 30]
    assert zcom.transform_with((1, 2), None) == (1, 2)
    with pytest.raises(ConfigError, match="transformers"):
        zcom.transform_with([1], [None, None])
    assert zcom.listify(None) is None and zcom.listify("a") == ["a"] and zcom.listify((1,)) == (1,)
    array = np.zeros((2, 2))
    assert zcom.tonumpy()(array) is array and zcom.tonumpy(dtype="float32")(array).dtype == np.float32
    assert set(zcom.converter_table) == {"torch", "torch_cuda", "numpy"}


def test_torch_converters_transpose_images_both_ways() -> None:
    """totorch moves images to channels-first (floats to float32); tonumpy moves 3-d and 4-d tensors back."""
    torch = pytest.importorskip("torch")
    images = np.random.default_rng(0).random((2, 5, 6, 3))
    tensor = zcom.totorch()(images)
    assert tuple(tensor.shape) == (2, 3, 5, 6) and tensor.dtype == torch.float32
    back = zcom.tonumpy()(tensor)
    assert back.shape == (2, 5, 6, 3) and np.allclose(back, images.astype(np.float32))
    assert zcom.tonumpy()(tensor[0]).shape == (5, 6, 3)
    assert tuple(zcom.totorch(transpose=False, dtype="float64")(images).shape) == (2, 5, 6, 3)


def test_import_tensorcom_does_not_load_zcom_or_tenbin() -> None:
    """zcom and tenbin are explicit submodules: import tensorcom loads neither (nor zmq)."""
    code = "import sys, tensorcom; print(sorted(m for m in ('tensorcom.zcom', 'tensorcom.tenbin', 'zmq') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr


# -- against tensorcom 0.1 itself ------------------------------------------------------------------------------------

ORIGINAL_PEER = """
import sys
import numpy as np
from tensorcom.zcom import Connection
command, url, count, size, multipart = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
connection = Connection(url, multipart=multipart)
if command == "send":
    for i in range(count):
        connection.send([np.full((4, size, size, 3), i % 251, np.uint8), np.arange(4, dtype=np.int32) + 4 * i])
    print("sent", flush=True)
    sys.stdin.read()  # until the test has received everything (0.1 drops what is queued when it exits)
else:
    for i in range(count):
        images, labels = connection.recv()
        assert images.shape == (4, size, size, 3) and (images == i % 251).all(), (i, images.flat[0])
        assert labels.tolist() == list(range(4 * i, 4 * i + 4)), labels
    print("ok")
"""


@pytest.fixture
def original() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start ORIGINAL_PEER with tensorcom 0.1's interpreter (outside this checkout, without PYTHONPATH, so that it
    imports 0.1); on teardown stop each process within a time limit."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str, **options: Any) -> subprocess.Popen[bytes]:
        env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
        started.append(
            subprocess.Popen([str(ORIGINAL), "-c", ORIGINAL_PEER, *args], env=env, cwd="/", **options)
        )
        return started[-1]

    yield start
    for process in started:
        stop(process)


@needs_original
@pytest.mark.parametrize("multipart", [True, False], ids=["multipart", "single"])
def test_original_sender_feeds_a_zcom_connection(multipart: bool, original: Callable[..., Any]) -> None:
    """tensorcom 0.1's Connection, multipart or not, sends to our zcom.Connection, batches intact."""
    with zcom.Connection("zpull://127.0.0.1:0", multipart=multipart, timeout=60) as receiver:
        port = receiver.endpoints[0].rsplit(":", 1)[1]
        process = original(
            "send", f"zpush://127.0.0.1:{port}", "5", "8", str(int(multipart)), stdin=subprocess.PIPE
        )
        try:
            for i in range(5):
                check_plain(receiver.recv(), i)
        finally:
            assert process.stdin is not None
            process.stdin.close()
            assert process.wait(timeout=60) == 0


@needs_original
@pytest.mark.parametrize(
    "scheme, multipart, size",
    [("zrpush", True, 8), ("zrpush", False, 8), ("zrpush+ipc", True, 256), ("zpub", True, 8)],
    ids=["tcp-multipart", "tcp-single", "ipc-large", "pub"],
)
def test_zcom_sender_feeds_the_original_connection(
    original: Callable[..., Any], tmp_path: Path, scheme: str, multipart: bool, size: int
) -> None:
    """tensorcom 0.1's Connection receives exactly its arrays from a zcom sender: multipart, one frame, large
    batches over ipc (our shared-memory path does not reach it) and from a publisher."""
    where = f"{tmp_path}/s" if "ipc" in scheme else "127.0.0.1:0"
    sender = zcom.Connection(f"{scheme}://{where}", multipart=multipart, linger=10)
    address = sender.endpoints[0].partition("://")[2]
    peer = {"zrpush": "zrpull", "zrpush+ipc": "zrpull+ipc", "zpub": "zsub"}[scheme]
    process = original(
        "recv", f"{peer}://{address}", "6", str(size), str(int(multipart)), stdout=subprocess.PIPE
    )
    for i in range(6):
        sender.send(plain_batch(i, size))
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0 and out.strip() == b"ok"
    sender.close()
