"""Transport: how fast batches move from a sender process to a receiver process, side by side in one run.

Cases, for a 64x3x224x224 uint8 + int64 labels batch (9.6 MB) and a 64 KB batch, over ipc and tcp:

- raw pyzmq PUSH/PULL, zero copy (the ceiling);
- tensorcom stream mode (Server -> Connection);
- tensorcom zreq with credit windows 1, 2 and 4 (request server computing inline), and with one worker process;
- tensorcom 0.1.0 (its own Connection on both sides), when its interpreter is given (``TENSORCOM_01_PYTHON`` or
  ``.venv-tc01``, which ``make interop`` creates);
- torch DataLoader with 2 workers yielding the same pre-made batch (its shared-memory path; transport-independent).

Every case runs in fresh sender and receiver processes; the receiver reports batches/s, its CPU seconds per GB
received and its peak RSS; the sender its peak RSS. Repeats alternate between cases so drift hits all alike, and
the medians are reported. ``python benchmarks/bench_transport.py [--quick]`` prints the table; the suite
(``benchmarks/suite.py``) calls :func:`measure`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

SHAPES = {"9.6MB": (64, 3, 224, 224), "64KB": (64, 32, 32)}
TC01_SCRIPT = Path(__file__).with_name("tc01_transport.py")


def make_batch(size: str) -> tuple[np.ndarray, np.ndarray]:
    images = np.random.default_rng(0).integers(0, 256, SHAPES[size], dtype=np.uint8)
    return images, np.arange(64, dtype=np.int64)


def peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    return 0.0


def _url(scheme: str, address: str) -> str:
    if address.startswith("ipc://"):
        return f"{scheme}+{address}"
    return address.replace("tcp://", f"{scheme}://")


class _SameBatch:
    """Map function of the zreq factory: every item is the same pre-made batch (the pipeline costs nothing)."""

    __name__ = "same_batch"

    def __init__(self, size: str) -> None:
        self.size = size
        self.batch: tuple[np.ndarray, np.ndarray] | None = None

    def __call__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if self.batch is None:
            self.batch = make_batch(self.size)
        return self.batch


def same_batches(*, seed: int, rank: int, world_size: int, size: str = "9.6MB") -> Any:
    """The zreq factory of this benchmark."""
    from tensorcom.pipeline import Conveyer, Map, Range

    return Conveyer([Range(1 << 40, repeating=True), Map(_SameBatch(size))])


# senders (run in their own process; they put their peak RSS on `report`)


def send_raw(address: str, count: int, size: str, report: Any) -> None:
    from tensorcom import codec

    context = zmq.Context()
    socket = context.socket(zmq.PUSH)
    socket.setsockopt(zmq.SNDHWM, 2)
    socket.bind(address)
    frames = codec.encode(make_batch(size))
    for _ in range(count):
        socket.send_multipart(frames, copy=False)
    socket.close(linger=30_000)
    context.term()
    report.put(peak_rss_mb())


def send_stream(address: str, count: int, size: str, report: Any) -> None:
    from tensorcom import Server

    batch = make_batch(size)
    Server((batch for _ in range(count)), _url("zrpush", address)).run()
    report.put(peak_rss_mb())


def send_zreq(address: str, count: int, size: str, report: Any, workers: int = 0) -> None:
    import functools

    from tensorcom.request_server import RequestServer

    server = RequestServer(functools.partial(same_batches, size=size), _url("zrep", address), workers=workers)
    try:
        server.run(duration=300)
    except KeyboardInterrupt:
        pass
    report.put(peak_rss_mb())


# receivers (run in their own process; they put (seconds, cpu seconds, peak RSS MB) on `result`)


def _timed(receive_one: Any, count: int, result: Any) -> None:
    receive_one()
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(count - 1):
        receive_one()
    result.put((time.perf_counter() - start, time.process_time() - cpu, peak_rss_mb()))


def receive_raw(address: str, count: int, result: Any, **_: Any) -> None:
    from tensorcom import codec

    context = zmq.Context()
    socket = context.socket(zmq.PULL)
    socket.setsockopt(zmq.RCVHWM, 2)
    socket.connect(address)
    _timed(lambda: codec.decode(socket.recv_multipart(copy=False)), count, result)
    socket.close(linger=0)
    context.term()


def receive_stream(address: str, count: int, result: Any, **_: Any) -> None:
    from tensorcom import Connection

    with Connection(_url("zrpull", address), timeout=60) as connection:
        _timed(connection.recv, count, result)


def receive_zreq(address: str, count: int, result: Any, prefetch: int = 4, **_: Any) -> None:
    from tensorcom import Connection

    with Connection(_url("zreq", address), timeout=60, prefetch=prefetch) as connection:
        _timed(connection.recv, count, result)


class _PremadeBatches:
    """A map-style dataset whose every item is the same pre-made batch, for torch DataLoader."""

    def __init__(self, size: str, count: int) -> None:
        self.batch = make_batch(size)
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        import torch

        return torch.from_numpy(self.batch[0]), torch.from_numpy(self.batch[1])


def receive_dataloader(address: str, count: int, result: Any, size: str = "9.6MB", **_: Any) -> None:
    import torch

    torch.set_num_threads(1)
    loader = torch.utils.data.DataLoader(
        _PremadeBatches(size, count),
        batch_size=None,
        num_workers=2,
        prefetch_factor=2,
        persistent_workers=False,
    )
    iterator = iter(loader)
    _timed(lambda: next(iterator), count, result)


CASES: dict[str, tuple[Any, Any, dict[str, Any]]] = {
    "raw pyzmq": (send_raw, receive_raw, {}),
    "stream": (send_stream, receive_stream, {}),
    "zreq credit 1": (send_zreq, receive_zreq, {"prefetch": 1}),
    "zreq credit 2": (send_zreq, receive_zreq, {"prefetch": 2}),
    "zreq credit 4": (send_zreq, receive_zreq, {"prefetch": 4}),
    "zreq 1 worker": (send_zreq, receive_zreq, {"prefetch": 4, "workers": 1}),
}


def tc01_python() -> str | None:
    candidate = os.environ.get("TENSORCOM_01_PYTHON") or str(
        Path(__file__).parents[1] / ".venv-tc01/bin/python"
    )
    return candidate if Path(candidate).exists() else None


def run_tc01(python: str, address: str, count: int, size: str) -> tuple[float, float, float]:
    """tensorcom 0.1.0 sending and receiving with its own Connection, in its own interpreter."""
    shape = ",".join(str(d) for d in SHAPES[size])
    receiver = subprocess.Popen(
        [python, str(TC01_SCRIPT), "receive", address, str(count), shape], stdout=subprocess.PIPE, text=True
    )
    sender = subprocess.Popen([python, str(TC01_SCRIPT), "send", address, str(count + 20), shape])
    output, _ = receiver.communicate(timeout=300)
    sender.kill()
    sender.wait(timeout=30)
    seconds, cpu, rss = json.loads(output.strip().splitlines()[-1])
    return seconds, cpu, rss


def measure_once(case: str, transport: str, size: str, count: int, folder: str) -> dict[str, float]:
    address = f"ipc://{folder}/bench-{time.monotonic_ns()}" if transport == "ipc" else "tcp://127.0.0.1:47391"
    nbytes = sum(a.nbytes for a in make_batch(size))
    if case == "tensorcom 0.1":
        python = tc01_python()
        if python is None:
            raise RuntimeError("no tensorcom 0.1 interpreter")
        seconds, cpu, rss = run_tc01(python, address.replace("ipc://", "ipc://"), count, size)
        return _row(count, nbytes, seconds, cpu, rss, 0.0)
    context = multiprocessing.get_context("spawn")
    results, reports = context.Queue(), context.Queue()
    if case == "DataLoader 2 workers":
        receiver = context.Process(
            target=receive_dataloader, args=(address, count, results), kwargs={"size": size}
        )
        receiver.start()
        seconds, cpu, rss = results.get(timeout=300)
        receiver.join(timeout=60)
        return _row(count, nbytes, seconds, cpu, rss, 0.0)
    send, receive, options = CASES[case]
    sender_options = {"workers": options["workers"]} if "workers" in options else {}
    sender = context.Process(target=send, args=(address, count, size, reports), kwargs=sender_options)
    sender.start()
    receiver = context.Process(target=receive, args=(address, count, results), kwargs=options)
    receiver.start()
    seconds, cpu, rss = results.get(timeout=300)
    receiver.join(timeout=60)
    if case.startswith("zreq"):
        os.kill(sender.pid or 0, 2)  # SIGINT: the request server stops and reports
    sender_rss = reports.get(timeout=60)
    sender.join(timeout=60)
    return _row(count, nbytes, seconds, cpu, rss, sender_rss)


def _row(
    count: int, nbytes: int, seconds: float, cpu: float, rss: float, sender_rss: float
) -> dict[str, float]:
    gigabytes = (count - 1) * nbytes / 1e9
    return {
        "batches_per_s": (count - 1) / seconds,
        "gb_per_s": gigabytes / seconds,
        "client_cpu_s_per_gb": cpu / gigabytes,
        "client_peak_rss_mb": rss,
        "server_peak_rss_mb": sender_rss,
    }


def measure(quick: bool = False, repeat: int | None = None) -> list[dict[str, Any]]:
    """Rows of the transport table: medians over alternating repeats, with ratios to raw pyzmq."""
    repeat = repeat or (1 if quick else 3)
    cases = list(CASES) + (["tensorcom 0.1"] if tc01_python() else []) + ["DataLoader 2 workers"]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder:
        for size in SHAPES:
            count = {"9.6MB": 60 if quick else 300, "64KB": 500 if quick else 3000}[size]
            for transport in ("ipc", "tcp"):
                samples: dict[str, list[dict[str, float]]] = {case: [] for case in cases}
                for _ in range(repeat):
                    for case in cases:
                        if case == "DataLoader 2 workers" and transport == "tcp":
                            continue
                        samples[case].append(measure_once(case, transport, size, count, folder))
                raw = statistics.median(s["batches_per_s"] for s in samples["raw pyzmq"])
                for case, values in samples.items():
                    if not values:
                        continue
                    row: dict[str, Any] = {
                        "group": "transport",
                        "size": size,
                        "transport": transport,
                        "case": case,
                    }
                    for key in values[0]:
                        row[key] = statistics.median(v[key] for v in values)
                    row["vs_raw"] = row["batches_per_s"] / raw
                    rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| batch | transport | case | batches/s | GB/s | vs raw pyzmq | client CPU s/GB | client RSS MB | server RSS MB |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        transport = "shm" if r["case"].startswith("DataLoader") else r["transport"]
        lines.append(
            f"| {r['size']} | {transport} | {r['case']} | {r['batches_per_s']:.0f} | {r['gb_per_s']:.2f} | "
            f"{r['vs_raw']:.2f} | {r['client_cpu_s_per_gb']:.3f} | {r['client_peak_rss_mb']:.0f} | "
            f"{r['server_peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer batches, one repeat")
    parser.add_argument(
        "--repeat", type=int, default=None, help="alternating repeats per case (median shown)"
    )
    args = parser.parse_args()
    print(format_table(measure(args.quick, args.repeat)))


if __name__ == "__main__":
    sys.exit(main())
