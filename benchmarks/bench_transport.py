"""Transport: how fast batches move from a sender process to a receiver process, side by side in one run.

Cases, for a 64x3x224x224 uint8 + int64 labels batch (9.6 MB) and a 64 KB batch, over ipc and tcp:

- raw pyzmq PUSH/PULL, zero copy (the socket ceiling);
- a shared-memory ring (ipc only; the same-host ceiling): the sender copies each batch into one of
  ``RING_SLOTS`` slots of a file in /dev/shm, and slot numbers go back and forth as 4-byte zmq messages;
- tensorcom stream mode (Server -> Connection), and for 64 KB batches also with ``queue=32`` on both sides
  ("stream queue 32"; the default queue of 2 batches suits large batches);
- tensorcom zreq with credit windows 1, 2 and 4 (request server computing inline), with one and two worker
  processes (their replies go straight to the client: the default), and with one worker whose replies pass
  through the server's front end ("via front end", ``direct=False``: how every worker reply travelled before);
- over ipc, each tensorcom case twice: as configured by default (the same-host shared-memory fast path where it
  applies) and with ``TENSORCOM_SHM=0`` in the environment of the sender, its workers and the receiver
  ("... (no shm)"); over tcp, "zreq 1 worker (no shm)" too (workers hand batches to the front end via shared
  memory);
- tensorcom 0.1.0 (its own Connection on both sides), when its interpreter is given (``TENSORCOM_01_PYTHON`` or
  ``.venv-tc01``, which ``make interop`` creates);
- torch DataLoader with 2 workers yielding the same pre-made batch (its shared-memory path; transport-independent).

Every receiver treats a batch as a training loop would: it gets views of the arrays and touches one byte of every
4 KB page (so a path that maps memory without reading it is not free). Every case runs in fresh sender and
receiver processes; the receiver reports batches/s, its CPU seconds per GB received (all its threads), its peak
RSS and whether it had a /dev/shm (or memfd) file mapped at the end; the sender its peak RSS. Repeats alternate
between cases so drift hits all alike; medians are reported, and ratios to raw pyzmq are medians of the ratios
within each round. ``python benchmarks/bench_transport.py [--quick] [--json FILE]`` prints the table; the suite
(``benchmarks/suite.py``) runs it with ``--json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zmq

SHAPES = {"9.6MB": (64, 3, 224, 224), "64KB": (64, 32, 32)}
TC01_SCRIPT = Path(__file__).with_name("tc01_transport.py")
PAGE = 4096
RING_SLOTS = 4
NO_SHM = " (no shm)"
SHM_VARIABLE = "TENSORCOM_SHM"
SHM_ROOT = Path("/dev/shm")


def make_batch(size: str) -> tuple[np.ndarray, np.ndarray]:
    return batch_of_shape(SHAPES[size])


def batch_of_shape(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 images of ``shape`` and 64 int64 labels (the benchmarks' batch)."""
    images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    return images, np.arange(64, dtype=np.int64)


def peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    return 0.0


def shared_mappings() -> int:
    """How many /dev/shm or memfd files this process has mapped (POSIX semaphores left out)."""
    paths = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            path = fields[5].strip() if len(fields) == 6 else ""
            if (path.startswith("/dev/shm/") and not path.startswith("/dev/shm/sem.")) or path.startswith(
                "/memfd:"
            ):
                paths.add(path)
    return len(paths)


def touch(value: Any) -> int:
    """Read one byte of every 4 KB page of every array in ``value``, as a consumer of the batch would."""
    if isinstance(value, np.ndarray):
        flat = value.reshape(-1).view(np.uint8) if value.flags.c_contiguous else value.reshape(-1)
        return int(flat[:: PAGE // flat.itemsize].sum()) if flat.size else 0
    if isinstance(value, (list, tuple)):
        return sum(touch(v) for v in value)
    if isinstance(value, dict):
        return sum(touch(v) for v in value.values())
    if hasattr(value, "numpy"):  # a torch tensor
        return touch(value.numpy())
    return 0


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


# the shared-memory ring: a file in /dev/shm with RING_SLOTS slots, slot numbers sent over a zmq PAIR socket


def _ring_path(address: str) -> Path:
    return SHM_ROOT / f"tensorcom-bench-ring-{Path(address).name}"


def _slot_bytes(size: str) -> int:
    nbytes = sum(a.nbytes for a in make_batch(size))
    return -(-nbytes // PAGE) * PAGE


def _ring_views(buffer: Any, size: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(images, labels) arrays on each slot of the ring."""
    slot = _slot_bytes(size)
    images_bytes = int(np.prod(SHAPES[size]))
    views = []
    for index in range(RING_SLOTS):
        base = index * slot
        images = np.frombuffer(buffer, np.uint8, images_bytes, base).reshape(SHAPES[size])
        labels = np.frombuffer(buffer, np.int64, 64, base + images_bytes)
        views.append((images, labels))
    return views


@contextlib.contextmanager
def _mapped(path: Path, nbytes: int, create: bool) -> Iterator[mmap.mmap]:
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
    descriptor = os.open(path, flags, 0o600)
    try:
        if create:
            os.ftruncate(descriptor, nbytes)
        mapping = mmap.mmap(descriptor, nbytes)
    finally:
        os.close(descriptor)
    try:
        yield mapping
    finally:
        with contextlib.suppress(BufferError):  # numpy views still alive: the process exit unmaps it
            mapping.close()


# senders (run in their own process; they put (peak RSS, TENSORCOM_SHM as they saw it) on `report`)


def _report(report: Any) -> None:
    report.put((peak_rss_mb(), os.environ.get(SHM_VARIABLE)))


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
    _report(report)


def send_ring(address: str, count: int, size: str, report: Any) -> None:
    """Copy ``count`` batches into free ring slots; each filled slot's number goes to the receiver."""
    batch = make_batch(size)
    path = _ring_path(address)
    context = zmq.Context()
    socket = context.socket(zmq.PAIR)
    try:
        with _mapped(path, RING_SLOTS * _slot_bytes(size), create=True) as mapping:
            slots = _ring_views(mapping, size)
            socket.bind(address)
            free = deque(range(RING_SLOTS))
            for _ in range(count):
                while not free:
                    free.append(int.from_bytes(socket.recv(), "little"))
                slot = free.popleft()
                np.copyto(slots[slot][0], batch[0])
                np.copyto(slots[slot][1], batch[1])
                socket.send(slot.to_bytes(4, "little"))
            while len(free) < RING_SLOTS:  # every slot back: the receiver is done with the ring
                free.append(int.from_bytes(socket.recv(), "little"))
            del slots
    finally:
        path.unlink(missing_ok=True)
        socket.close(linger=0)
        context.term()
    _report(report)


def send_stream(address: str, count: int, size: str, report: Any, queue: int = 2) -> None:
    from tensorcom import Server

    batch = make_batch(size)
    Server((batch for _ in range(count)), _url("zrpush", address), queue=queue).run()
    _report(report)


def send_zreq(
    address: str, count: int, size: str, report: Any, workers: int = 0, direct: bool = True
) -> None:
    import functools

    from tensorcom.server.request import RequestServer

    server = RequestServer(
        functools.partial(same_batches, size=size), _url("zrep", address), workers=workers, direct=direct
    )
    try:
        server.run(duration=300)
    except KeyboardInterrupt:
        pass
    _report(report)


# receivers (run in their own process; they put a result tuple on `result`, see _timed)


def _timed(receive_one: Any, count: int, result: Any) -> None:
    """Time ``count - 1`` batches after the first; put (seconds, cpu seconds, peak RSS MB, shm maps, env)."""
    touch(receive_one())
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(count - 2):
        touch(receive_one())
    batch = receive_one()  # kept alive while the mappings are counted
    touch(batch)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    result.put((seconds, cpu, peak_rss_mb(), shared_mappings(), os.environ.get(SHM_VARIABLE)))
    del batch


def receive_raw(address: str, count: int, result: Any, **_: Any) -> None:
    from tensorcom import codec

    context = zmq.Context()
    socket = context.socket(zmq.PULL)
    socket.setsockopt(zmq.RCVHWM, 2)
    socket.connect(address)
    _timed(lambda: codec.decode(socket.recv_multipart(copy=False)), count, result)
    socket.close(linger=0)
    context.term()


def receive_ring(address: str, count: int, result: Any, size: str = "9.6MB", **_: Any) -> None:
    """Take filled slots as views; hand back the previous slot when the next arrives (one batch in use)."""
    context = zmq.Context()
    socket = context.socket(zmq.PAIR)
    socket.connect(address)
    with contextlib.ExitStack() as stack:
        slots: list[tuple[np.ndarray, np.ndarray]] = []
        held: list[bytes] = []

        def receive_one() -> tuple[np.ndarray, np.ndarray]:
            message = socket.recv()
            if not slots:  # the sender created the ring before its first message
                mapping = stack.enter_context(
                    _mapped(_ring_path(address), RING_SLOTS * _slot_bytes(size), create=False)
                )
                slots.extend(_ring_views(mapping, size))
            if held:
                socket.send(held.pop())
            held.append(message)
            return slots[int.from_bytes(message, "little")]

        _timed(receive_one, count, result)
        socket.send(held.pop())
        slots.clear()
    socket.close(linger=5_000)
    context.term()


def receive_stream(address: str, count: int, result: Any, queue: int = 2, **_: Any) -> None:
    from tensorcom import Connection

    with Connection(_url("zrpull", address), timeout=60, queue=queue) as connection:
        _timed(connection.recv, count, result)


def receive_zreq(address: str, count: int, result: Any, prefetch: int = 4, **_: Any) -> None:
    from tensorcom import Connection

    options: dict[str, Any] = {"timeout": 60, "prefetch": prefetch}  # a zreq URL makes a RequestConnection
    with Connection(_url("zreq", address), **options) as connection:
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
    dataset: Any = _PremadeBatches(size, count)  # map-style: DataLoader needs __len__ and __getitem__ only
    loader: Any = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=2,
        prefetch_factor=2,
        persistent_workers=False,
    )
    iterator = iter(loader)
    _timed(lambda: next(iterator), count, result)


CASES: dict[str, tuple[Any, Any, dict[str, Any]]] = {
    "raw pyzmq": (send_raw, receive_raw, {}),
    "shm ring": (send_ring, receive_ring, {}),
    "stream": (send_stream, receive_stream, {}),
    "stream queue 32": (send_stream, receive_stream, {"queue": 32}),
    "zreq credit 1": (send_zreq, receive_zreq, {"prefetch": 1}),
    "zreq credit 2": (send_zreq, receive_zreq, {"prefetch": 2}),
    "zreq credit 4": (send_zreq, receive_zreq, {"prefetch": 4}),
    "zreq 1 worker": (send_zreq, receive_zreq, {"prefetch": 4, "workers": 1}),
    "zreq 2 workers": (send_zreq, receive_zreq, {"prefetch": 4, "workers": 2}),
    "zreq 1 worker via front end": (send_zreq, receive_zreq, {"prefetch": 4, "workers": 1, "direct": False}),
}
TENSORCOM_CASES = (
    "stream",
    "stream queue 32",
    "zreq credit 1",
    "zreq credit 2",
    "zreq credit 4",
    "zreq 1 worker",
    "zreq 2 workers",
    "zreq 1 worker via front end",
)
SAME_HOST_ONLY = ("shm ring", "DataLoader 2 workers")  # transport-independent: measured once, under "shm"
SMALL_ONLY = ("stream queue 32",)  # 32 queued 9.6 MB batches per side would be 600 MB: small batches only


def cases_for(transport: str) -> list[str]:
    """The cases of one transport, in the order each round runs them."""
    names = ["raw pyzmq"]
    if transport == "ipc":
        names.append("shm ring")
    for case in TENSORCOM_CASES:
        names.append(case)
        if (transport == "ipc" and case not in SMALL_ONLY) or case == "zreq 1 worker":
            names.append(case + NO_SHM)
    if tc01_python():
        names.append("tensorcom 0.1")
    if transport == "ipc":
        names.append("DataLoader 2 workers")
    return names


def tc01_python() -> str | None:
    candidate = os.environ.get("TENSORCOM_01_PYTHON") or str(
        Path(__file__).parents[1] / ".venv-tc01/bin/python"
    )
    return candidate if Path(candidate).exists() else None


def run_tc01(python: str, address: str, count: int, size: str) -> tuple[float, float, float, int]:
    """tensorcom 0.1.0 sending and receiving with its own Connection, in its own interpreter."""
    shape = ",".join(str(d) for d in SHAPES[size])
    env = {
        name: value for name, value in os.environ.items() if name != "PYTHONPATH"
    }  # its own tensorcom, not ours
    receiver = subprocess.Popen(
        [python, str(TC01_SCRIPT), "receive", address, str(count), shape],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    sender = subprocess.Popen([python, str(TC01_SCRIPT), "send", address, str(count + 20), shape], env=env)
    output, _ = receiver.communicate(timeout=300)
    sender.kill()
    sender.wait(timeout=30)
    seconds, cpu, rss, *maps = json.loads(output.strip().splitlines()[-1])
    return seconds, cpu, rss, maps[0] if maps else 0


@contextlib.contextmanager
def shm_environment(enabled: bool) -> Iterator[None]:
    """Processes started inside see ``TENSORCOM_SHM=0`` (fast path off) or no such variable (the default)."""
    before = os.environ.pop(SHM_VARIABLE, None)
    if not enabled:
        os.environ[SHM_VARIABLE] = "0"
    try:
        yield
    finally:
        os.environ.pop(SHM_VARIABLE, None)
        if before is not None:
            os.environ[SHM_VARIABLE] = before


def measure_once(case: str, transport: str, size: str, count: int, folder: str) -> dict[str, float]:
    address = f"ipc://{folder}/bench-{time.monotonic_ns()}" if transport == "ipc" else "tcp://127.0.0.1:47391"
    nbytes = sum(a.nbytes for a in make_batch(size))
    if case == "tensorcom 0.1":
        python = tc01_python()
        if python is None:
            raise RuntimeError("no tensorcom 0.1 interpreter")
        seconds, cpu, rss, maps = run_tc01(python, address, count, size)
        return _row(count, nbytes, seconds, cpu, rss, 0.0, maps)
    context = multiprocessing.get_context("spawn")
    results, reports = context.Queue(), context.Queue()
    if case == "DataLoader 2 workers":
        receiver = context.Process(
            target=receive_dataloader, args=(address, count, results), kwargs={"size": size}
        )
        receiver.start()
        seconds, cpu, rss, maps, _ = results.get(timeout=300)
        receiver.join(timeout=60)
        return _row(count, nbytes, seconds, cpu, rss, 0.0, maps)
    shm = not case.endswith(NO_SHM)
    send, receive, options = CASES[case.removesuffix(NO_SHM)]
    sender_options: dict[str, Any] = {
        key: options[key] for key in ("workers", "queue", "direct") if key in options
    }
    receiver_options = {**options, "size": size}
    with shm_environment(shm):  # spawned processes (and the request server's workers) inherit it
        sender = context.Process(target=send, args=(address, count, size, reports), kwargs=sender_options)
        sender.start()
        receiver = context.Process(target=receive, args=(address, count, results), kwargs=receiver_options)
        receiver.start()
    try:
        seconds, cpu, rss, maps, receiver_env = results.get(timeout=300)
        receiver.join(timeout=60)
        if case.startswith("zreq"):
            os.kill(sender.pid or 0, 2)  # SIGINT: the request server stops and reports
        sender_rss, sender_env = reports.get(timeout=60)
        sender.join(timeout=60)
    finally:
        for process in (sender, receiver):
            if process.is_alive():
                process.kill()
        if case == "shm ring":
            _ring_path(address).unlink(missing_ok=True)
    wanted = None if shm else "0"
    if (sender_env, receiver_env) != (wanted, wanted):
        raise RuntimeError(f"{case}: {SHM_VARIABLE} was {sender_env!r} / {receiver_env!r}, wanted {wanted!r}")
    return _row(count, nbytes, seconds, cpu, rss, sender_rss, maps)


def _row(
    count: int, nbytes: int, seconds: float, cpu: float, rss: float, sender_rss: float, maps: int
) -> dict[str, float]:
    gigabytes = (count - 1) * nbytes / 1e9
    return {
        "batches_per_s": (count - 1) / seconds,
        "gb_per_s": gigabytes / seconds,
        "client_cpu_s_per_gb": cpu / gigabytes,
        "client_peak_rss_mb": rss,
        "server_peak_rss_mb": sender_rss,
        "client_shm_maps": maps,
    }


def counts(quick: bool) -> dict[str, int]:
    """Batches per measurement, by batch size."""
    return {"9.6MB": 100 if quick else 300, "64KB": 2000 if quick else 10000}


def measure(quick: bool = False, repeat: int | None = None) -> list[dict[str, Any]]:
    """Rows of the transport table: medians over alternating repeats, with ratios to raw pyzmq."""
    repeat = repeat or (1 if quick else 3)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder:
        for size in SHAPES:
            count = counts(quick)[size]
            for transport in ("ipc", "tcp"):
                cases = [c for c in cases_for(transport) if size == "64KB" or c not in SMALL_ONLY]
                samples: dict[str, list[dict[str, float]]] = {case: [] for case in cases}
                for round_number in range(repeat):
                    print(f"transport {size} {transport} round {round_number + 1}/{repeat}", file=sys.stderr)
                    for case in cases:
                        samples[case].append(measure_once(case, transport, size, count, folder))
                raw = [s["batches_per_s"] for s in samples["raw pyzmq"]]
                for case, values in samples.items():
                    row: dict[str, Any] = {
                        "group": "transport",
                        "size": size,
                        "transport": "shm" if case in SAME_HOST_ONLY else transport,
                        "case": case,
                        "shm_variable": "0" if case.endswith(NO_SHM) else None,
                        "count": count,
                    }
                    for key in values[0]:
                        row[key] = statistics.median(v[key] for v in values)
                    row["via_shm"] = any(v["client_shm_maps"] > 0 for v in values)
                    row["vs_raw"] = statistics.median(
                        v["batches_per_s"] / r for v, r in zip(values, raw, strict=True)
                    )
                    row["samples"] = values
                    rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| batch | transport | case | batches/s | GB/s | vs raw pyzmq | client CPU s/GB | 10 GB/s servers per "
        "client core | client RSS MB | server RSS MB | client maps /dev/shm |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['transport']} | {r['case']} | {r['batches_per_s']:.0f} | {r['gb_per_s']:.2f} | "
            f"{r['vs_raw']:.2f} | {r['client_cpu_s_per_gb']:.3f} | {servers_per_core(r):.1f} | "
            f"{r['client_peak_rss_mb']:.0f} | {r['server_peak_rss_mb']:.0f} | {'yes' if r.get('via_shm') else 'no'} |"
        )
    return "\n".join(lines)


def servers_per_core(row: dict[str, Any], server_gb_per_s: float = 10.0) -> float:
    """On paper: how many servers sending 10 GB/s each one client core could absorb, from the measured client CPU
    seconds per GB (receiving only; the training step's own use of the data is not counted)."""
    cost = row["client_cpu_s_per_gb"]
    return float("inf") if cost <= 0 else 1.0 / (cost * server_gb_per_s)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer batches, one repeat")
    parser.add_argument(
        "--repeat", type=int, default=None, help="alternating repeats per case (median shown)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the rows to FILE as JSON")
    args = parser.parse_args()
    rows = measure(args.quick, args.repeat)
    if args.json:
        Path(args.json).write_text(json.dumps(rows))
    print(format_table(rows))


if __name__ == "__main__":
    main()
