"""Transport throughput, side by side in one run: raw pyzmq PUSH/PULL, tensorcom stream mode (Server ->
Connection), and the deterministic zreq protocol (request server -> zreq Connection, inline and with one worker).

All send the same pre-made 64x224x224x3 uint8 batches with int64 labels (9.6 MB) between processes, over ipc and
tcp. Reports batches/s, GB/s (medians of alternating repeats), and tensorcom as a ratio of raw pyzmq.

    python benchmarks/bench_stream.py [--batches 400] [--repeat 3] [--quick]
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from typing import Any

import numpy as np
import zmq

from tensorcom import Connection, Server, codec

SHAPE = (64, 224, 224, 3)


def make_batch() -> tuple[np.ndarray, np.ndarray]:
    return np.random.default_rng(0).integers(0, 256, SHAPE, dtype=np.uint8), np.arange(64, dtype=np.int64)


def raw_sender(address: str, count: int) -> None:
    context = zmq.Context()
    socket = context.socket(zmq.PUSH)
    socket.setsockopt(zmq.SNDHWM, 2)
    socket.bind(address)
    frames = codec.encode(make_batch())
    for _ in range(count):
        socket.send_multipart(frames, copy=False)
    socket.close(linger=30_000)
    context.term()


def tensorcom_sender(address: str, count: int) -> None:
    batch = make_batch()
    Server(
        (batch for _ in range(count)),
        "zrpush+" + address if address.startswith("ipc") else address.replace("tcp://", "zrpush://"),
    ).run()


class _SameBatch:
    """Map function returning the pre-made batch whatever the index: the pipeline costs nothing."""

    __name__ = "same_batch"

    def __init__(self) -> None:
        self.batch: tuple[np.ndarray, np.ndarray] | None = None

    def __call__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if self.batch is None:
            self.batch = make_batch()
        return self.batch


def same_batches(*, seed: int, rank: int, world_size: int) -> Any:
    """The zreq factory: an endless pipeline whose every item is the pre-made batch."""
    from tensorcom.pipeline import Conveyer, Map, Range

    return Conveyer([Range(1 << 40, repeating=True), Map(_SameBatch())])


def zreq_sender(address: str, count: int, workers: int) -> None:
    url = "zrep+" + address if address.startswith("ipc") else address.replace("tcp://", "zrep://")
    server = Server(same_batches, url, workers=workers)
    server.run(duration=120)


def zreq_receive(address: str, count: int) -> float:
    url = "zreq+" + address if address.startswith("ipc") else address.replace("tcp://", "zreq://")
    with Connection(url, timeout=60, prefetch=4) as connection:
        connection.recv()
        start = time.perf_counter()
        for _ in range(count - 1):
            connection.recv()
        return time.perf_counter() - start


def raw_receive(address: str, count: int) -> float:
    context = zmq.Context()
    socket = context.socket(zmq.PULL)
    socket.setsockopt(zmq.RCVHWM, 2)
    socket.connect(address)
    socket.recv_multipart(copy=False)
    start = time.perf_counter()
    for _ in range(count - 1):
        codec.decode(socket.recv_multipart(copy=False))
    elapsed = time.perf_counter() - start
    socket.close(linger=0)
    context.term()
    return elapsed


def tensorcom_receive(address: str, count: int) -> float:
    url = "zrpull+" + address if address.startswith("ipc") else address.replace("tcp://", "zrpull://")
    with Connection(url, timeout=60) as connection:
        connection.recv()
        start = time.perf_counter()
        for _ in range(count - 1):
            connection.recv()
        return time.perf_counter() - start


KINDS = {
    "raw pyzmq": (raw_sender, (), raw_receive),
    "stream": (tensorcom_sender, (), tensorcom_receive),
    "zreq inline": (zreq_sender, (0,), zreq_receive),
    "zreq 1 worker": (zreq_sender, (1,), zreq_receive),
}


def measure(kind: str, address: str, count: int) -> float:
    sender, extra, receive = KINDS[kind]
    process = multiprocessing.get_context("spawn").Process(target=sender, args=(address, count, *extra))
    process.start()
    try:
        elapsed = receive(address, count)
    finally:
        if kind.startswith("zreq"):
            process.terminate()
        process.join(timeout=60)
    return (count - 1) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, default=400, help="batches per measurement")
    parser.add_argument(
        "--repeat", type=int, default=3, help="alternating measurements per side (median shown)"
    )
    parser.add_argument("--quick", action="store_true", help="100 batches per measurement, one repeat")
    args = parser.parse_args()
    count = 100 if args.quick else args.batches
    if args.quick:
        args.repeat = 1
    nbytes = sum(a.nbytes for a in make_batch())
    with tempfile.TemporaryDirectory() as folder:
        addresses = {"ipc": f"ipc://{folder}/bench.sock", "tcp": "tcp://127.0.0.1:47311"}
        print(
            f"{count} batches of {SHAPE} uint8 + labels ({nbytes / 1e6:.1f} MB), one sender and one receiver process"
        )
        print(f"{'transport':<10} {'sender/receiver':<16} {'batches/s':>10} {'GB/s':>7} {'vs raw':>7}")
        for transport, address in addresses.items():
            samples: dict[str, list[float]] = {kind: [] for kind in KINDS}
            for _ in range(args.repeat):  # alternate, so drift on a shared machine hits both alike
                for kind, values in samples.items():
                    values.append(measure(kind, address, count))
            rates = {kind: float(np.median(values)) for kind, values in samples.items()}
            for kind, rate in rates.items():
                ratio = rate / rates["raw pyzmq"]
                print(f"{transport:<10} {kind:<16} {rate:>10.1f} {rate * nbytes / 1e9:>7.2f} {ratio:>7.2f}")


if __name__ == "__main__":
    main()
