"""Calls per batch: the Python calls and system calls each process of a transfer makes per batch received.

What it counts, per process (the client, and the sender: raw pyzmq's PUSH process, or a zreq server's front end
and its worker), for 64 KB and 9.6 MB batches over tcp and ipc (as configured by default: over ipc a zreq worker
hands 9.6 MB batches over in shared memory):

- system calls: ``perf stat -e raw_syscalls:sys_enter --per-thread`` attached to every process at once, enabled
  for one window of steady traffic; "ZeroMQ threads" are the threads other than a process's main thread (its
  ZeroMQ I/O and reaper threads);
- Python calls: a ``sys.setprofile`` counter inside each process, of Python function calls (generator resumes
  included) and calls of C functions, as cProfile counts them. The counter is installed by this benchmark's own
  launchers (client, sender, front end, and the factory that each worker calls) when ``TENSORCOM_BENCH_CALLS``
  names a folder; SIGUSR1 starts it and SIGUSR2 stops it and writes the count to that folder. The profiler slows
  every process down, so it runs in a window of its own, after the system-call window.

Both windows are divided by the batches the client received in them, so a sender's count is per batch delivered.
The client's own loop (it views the arrays and touches one byte per 4 KB page, like every receiver in these
benchmarks) is in both cases alike. The counts are nearly deterministic: one window of a few hundred batches is
enough, and the part stays under 30 s. Run::

    python benchmarks/bench_calls.py                  # the table
    python benchmarks/bench_calls.py --cases "zreq 1 worker" "zreq 1 worker via front end" --sizes 64KB
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import multiprocessing
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import zmq

sys.path.insert(0, str(Path(__file__).parent))

import bench_transport  # noqa: E402

ENVIRONMENT = "TENSORCOM_BENCH_CALLS"
SIZES = ("64KB", "9.6MB")
TRANSPORTS = ("tcp", "ipc")
WARMUP = {"64KB": 200, "9.6MB": 20}  # batches the client receives before it says it is ready
READY_TIMEOUT_S = 60.0
ALL = "all processes"


# the counter, inside each process


class CallCounter:
    """Counts the Python function calls and C function calls of this process between :meth:`start` and
    :meth:`stop`; :meth:`stop` writes them to ``folder/ROLE-PID.json``."""

    def __init__(self, role: str, folder: Path) -> None:
        self.role = role
        self.folder = folder
        self.python_calls = 0
        self.c_calls = 0

    def _profile(self, frame: FrameType, event: str, arg: Any) -> None:
        if event == "call":
            self.python_calls += 1
        elif event == "c_call":
            self.c_calls += 1

    def _set(self, function: Any) -> None:
        every_thread = getattr(threading, "setprofile_all_threads", None)  # Python 3.12+
        if every_thread is not None:
            every_thread(function)
        else:
            threading.setprofile(function)  # threads started from now on; the main thread below
            sys.setprofile(function)

    def start(self, *_: Any) -> None:
        self.python_calls = self.c_calls = 0
        self._set(self._profile)

    def stop(self, *_: Any) -> None:
        self._set(None)
        _write_json(
            self.folder / f"{self.role}-{os.getpid()}.json",
            {
                "role": self.role,
                "pid": os.getpid(),
                "python_calls": self.python_calls,
                "c_calls": self.c_calls,
            },
        )


_installed: list[CallCounter] = []


def install_counter(role: str) -> None:
    """Where ``TENSORCOM_BENCH_CALLS`` names a folder: a counter for this process (the first role given wins),
    started by SIGUSR1 and stopped by SIGUSR2, and ``folder/ROLE-PID.ready`` to say so. Else nothing."""
    folder = os.environ.get(ENVIRONMENT)
    if not folder or _installed:
        return
    counter = CallCounter(role, Path(folder))
    _installed.append(counter)
    signal.signal(signal.SIGUSR1, counter.start)
    signal.signal(signal.SIGUSR2, counter.stop)
    _write_json(Path(folder) / f"{role}-{os.getpid()}.ready", {"role": role, "pid": os.getpid()})


def _write_json(path: Path, value: dict[str, Any]) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value))
    os.replace(partial, path)


# the processes of a transfer


def counted_batches(*, seed: int, rank: int, world_size: int, size: str) -> Any:
    """The zreq factory: bench_transport's pre-made batches, with a counter in the process that computes them."""
    install_counter("worker")
    return bench_transport.same_batches(seed=seed, rank=rank, world_size=world_size, size=size)


def send_raw(address: str, size: str) -> None:
    """A PUSH socket sending the same batch until terminated (bench_transport's raw pyzmq sender)."""
    from tensorcom import codec

    install_counter("sender")
    context = zmq.Context()
    socket = context.socket(zmq.PUSH)
    socket.setsockopt(zmq.SNDHWM, 2)
    socket.bind(address)
    frames = codec.encode(bench_transport.make_batch(size))
    while True:
        socket.send_multipart(frames, copy=False)


def serve_zreq(address: str, size: str, workers: int, direct: bool) -> None:
    """A request server, as ``tensorcom serve -w WORKERS`` runs one, until SIGINT."""
    from tensorcom.server.request import RequestServer

    install_counter("front end")
    factory = functools.partial(counted_batches, size=size)
    server = RequestServer(factory, bench_transport._url("zrep", address), workers=workers, direct=direct)
    with contextlib.suppress(KeyboardInterrupt):
        server.run(duration=300)


def receive(raw: bool, address: str, size: str, received: Any) -> None:
    """Receive batches until terminated, counting them in ``received``; the counter is installed after the
    warm-up batches, so that its ready file says the transfer runs."""
    from tensorcom import Connection, codec

    with contextlib.ExitStack() as stack:
        if raw:
            context = zmq.Context()
            socket = context.socket(zmq.PULL)
            socket.setsockopt(zmq.RCVHWM, 2)
            socket.connect(address)

            def receive_one() -> Any:
                return codec.decode(socket.recv_multipart(copy=False))

        else:
            url = bench_transport._url("zreq", address)
            connection = stack.enter_context(Connection(url, timeout=60, prefetch=4))
            receive_one = connection.recv
        while True:
            bench_transport.touch(receive_one())
            received.value += 1
            if received.value == WARMUP[size]:
                install_counter("client")


# (sender, its options, roles besides the client); "zreq 1 worker" is what `tensorcom serve -w 1` runs
CASES: dict[str, tuple[Any, dict[str, Any], tuple[str, ...]]] = {
    "raw pyzmq": (send_raw, {}, ("sender",)),
    "zreq 1 worker": (serve_zreq, {"workers": 1, "direct": True}, ("front end", "worker")),
    "zreq 1 worker via front end": (serve_zreq, {"workers": 1, "direct": False}, ("front end", "worker")),
    "zreq inline": (serve_zreq, {"workers": 0, "direct": True}, ("front end",)),
}
DEFAULT_CASES = ("raw pyzmq", "zreq 1 worker")


# system calls: perf stat, enabled and disabled through its control fifo


def _threads(pids: list[int]) -> dict[int, int]:
    """Thread id -> process id, for every thread of ``pids``."""
    found = {}
    for pid in pids:
        for task in os.listdir(f"/proc/{pid}/task"):
            found[int(task)] = pid
    return found


def parse_perf(text: str, threads: dict[int, int]) -> dict[int, tuple[int, int]]:
    """Process id -> (system calls of its main thread, of its other threads), from ``perf stat --per-thread -x,``
    output whose lines start ``COMM-TID,COUNT,``."""
    counts: dict[int, list[int]] = {}
    for line in text.splitlines():
        fields = line.split(",")
        if len(fields) < 4 or "raw_syscalls:sys_enter" not in fields[3]:
            continue
        tid = int(fields[0].rsplit("-", 1)[1])
        if tid not in threads or not fields[1].strip().isdigit():
            continue
        pid = threads[tid]
        main, others = counts.setdefault(pid, [0, 0])
        counts[pid] = [main + int(fields[1]), others] if tid == pid else [main, others + int(fields[1])]
    return {pid: (main, others) for pid, (main, others) in counts.items()}


class _PerfWindow:
    """``perf stat`` attached to processes, counting system calls only while enabled."""

    def __init__(self, pids: list[int], folder: Path) -> None:
        self.threads = _threads(pids)
        self.output = folder / "perf.csv"
        control, self.ack_path = folder / "perf.control", folder / "perf.ack"
        for fifo in (control, self.ack_path):
            fifo.unlink(missing_ok=True)
            os.mkfifo(fifo)
        self.ack = os.open(self.ack_path, os.O_RDONLY | os.O_NONBLOCK)
        events = ["-e", "raw_syscalls:sys_enter", "--per-thread", "-x,", "-o", str(self.output)]
        control_options = ["-D", "-1", "--control", f"fifo:{control},{self.ack_path}"]
        command = ["perf", "stat", *events, *control_options, "-p", ",".join(map(str, pids))]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while True:  # perf opens the control fifo once it is ready
            try:
                self.control = os.open(control, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.process.kill()
                    error = self.process.communicate(timeout=10)[1].decode().strip()
                    os.close(self.ack)
                    raise RuntimeError(f"perf stat did not start: {error[:300]}") from None
                time.sleep(0.01)

    def command(self, word: str) -> None:
        os.write(self.control, word.encode() + b"\n")
        readable, _, _ = select.select([self.ack], [], [], 10)
        if not readable:
            raise RuntimeError(f"perf stat did not acknowledge {word!r} on {self.ack_path}")
        os.read(self.ack, 64)

    def finish(self) -> dict[int, tuple[int, int]]:
        self.process.send_signal(signal.SIGINT)
        self.process.communicate(timeout=30)
        os.close(self.control)
        os.close(self.ack)
        counts = parse_perf(self.output.read_text(), self.threads)
        if not counts:
            raise RuntimeError(f"perf stat counted nothing: {self.output.read_text().strip()[-300:]}")
        return counts


def _count_syscalls(
    pids: list[int], folder: Path, received: Any, window_s: float
) -> tuple[dict[int, tuple[int, int]], int]:
    """System calls of each process in a window of ``window_s`` seconds, and the batches received meanwhile."""
    if shutil.which("perf") is None:
        raise RuntimeError("perf is not installed")
    perf = _PerfWindow(pids, folder)
    try:
        perf.command("enable")
        before = received.value
        time.sleep(window_s)
        batches = received.value - before
        perf.command("disable")
    finally:
        counts = perf.finish()
    return counts, batches


# one measurement


def _wait_for(folder: Path, pattern: str, count: int, what: str) -> list[Path]:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while len(found := sorted(folder.glob(pattern))) < count:
        if time.monotonic() > deadline:
            names = [p.name for p in found]
            raise TimeoutError(f"{what}: {count} files {pattern} in {folder} wanted, found {names}")
        time.sleep(0.02)
    return found


@contextlib.contextmanager
def _environment(folder: Path) -> Iterator[None]:
    before = os.environ.get(ENVIRONMENT)
    os.environ[ENVIRONMENT] = str(folder)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENVIRONMENT, None)
        else:
            os.environ[ENVIRONMENT] = before


def measure_once(case: str, size: str, transport: str, window_s: float) -> list[dict[str, Any]]:
    """One transfer: a row per process and one for all of them, with calls per batch in each window."""
    send, options, roles = CASES[case]
    context = multiprocessing.get_context("spawn")
    received = context.RawValue("q", 0)
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        address = f"ipc://{folder}/calls" if transport == "ipc" else "tcp://127.0.0.1:47393"
        where = f"{case}, {size} over {transport} ({address})"
        with _environment(folder):  # spawned processes (and the request server's workers) inherit it
            sender = context.Process(target=send, args=(address, size), kwargs=options)
            sender.start()
            client = context.Process(target=receive, args=(case == "raw pyzmq", address, size, received))
            client.start()
        try:
            ready = _wait_for(folder, "*.ready", len(roles) + 1, where)
            role_of = {json.loads(p.read_text())["pid"]: json.loads(p.read_text())["role"] for p in ready}
            pids = list(role_of)
            syscalls: dict[int, tuple[int, int]] | None = None
            syscall_batches = 0
            try:
                syscalls, syscall_batches = _count_syscalls(pids, folder, received, window_s)
            except (OSError, RuntimeError) as error:  # no perf, or not allowed to attach: Python calls only
                print(f"calls: no system-call counts for {where}: {error}", file=sys.stderr)
            for pid in pids:
                os.kill(pid, signal.SIGUSR1)
            before = received.value
            time.sleep(window_s)
            python_batches = received.value - before
            for pid in pids:
                os.kill(pid, signal.SIGUSR2)
            counted = _wait_for(folder, "*.json", len(pids), where)
            calls = {json.loads(p.read_text())["pid"]: json.loads(p.read_text()) for p in counted}
        finally:
            client.terminate()
            client.join(timeout=30)
            if case != "raw pyzmq" and sender.pid is not None and sender.is_alive():
                os.kill(sender.pid, signal.SIGINT)  # the request server stops its workers
                sender.join(timeout=30)
            for process in (client, sender):
                if process.is_alive():
                    process.terminate()
                    process.join(timeout=10)
                if process.is_alive():
                    process.kill()
                    process.join(timeout=30)
    if (syscalls is not None and syscall_batches <= 0) or python_batches <= 0:
        raise RuntimeError(f"{where}: no batch received in a window of {window_s} s")
    order = ["client", *roles]
    rows = []
    for pid in sorted(pids, key=lambda p: order.index(role_of[p])):
        main, others = syscalls.get(pid, (0, 0)) if syscalls is not None else (None, None)
        rows.append(
            _calls_row(
                case,
                size,
                transport,
                role_of[pid],
                calls[pid]["python_calls"],
                calls[pid]["c_calls"],
                python_batches,
                main,
                others,
                syscall_batches,
            )
        )
    totals = [sum(r[key] for r in rows) if rows[0][key] is not None else None for key in _COUNTED]
    rows.append({**rows[0], "process": ALL, **dict(zip(_COUNTED, totals, strict=True))})
    return rows


_COUNTED = (
    "python_calls_per_batch",
    "python_function_calls_per_batch",
    "c_calls_per_batch",
    "syscalls_per_batch",
    "zmq_thread_syscalls_per_batch",
)


def _calls_row(
    case: str,
    size: str,
    transport: str,
    role: str,
    python_calls: int,
    c_calls: int,
    python_batches: int,
    main: int | None,
    others: int | None,
    syscall_batches: int,
) -> dict[str, Any]:
    syscalls = others_per_batch = None
    if main is not None and others is not None:
        syscalls, others_per_batch = (main + others) / syscall_batches, others / syscall_batches
    return {
        "group": "calls",
        "case": case,
        "size": size,
        "transport": transport,
        "process": role,
        "python_calls_per_batch": (python_calls + c_calls) / python_batches,
        "python_function_calls_per_batch": python_calls / python_batches,
        "c_calls_per_batch": c_calls / python_batches,
        "syscalls_per_batch": syscalls,
        "zmq_thread_syscalls_per_batch": others_per_batch,
        "python_window_batches": python_batches,
        "syscall_window_batches": syscall_batches,
    }


def measure(
    quick: bool = False,
    repeat: int | None = None,
    cases: tuple[str, ...] = DEFAULT_CASES,
    sizes: tuple[str, ...] = SIZES,
    transports: tuple[str, ...] = TRANSPORTS,
    window_s: float | None = None,
) -> list[dict[str, Any]]:
    """Rows of every (size, transport, case, process); medians over ``repeat`` alternating rounds."""
    repeat = repeat or 1
    window_s = window_s or (0.4 if quick else 0.6)
    samples: dict[tuple[str, str, str], list[list[dict[str, Any]]]] = {}
    for round_number in range(repeat):
        print(f"calls round {round_number + 1}/{repeat}", file=sys.stderr)
        for size in sizes:
            for transport in transports:
                for case in cases:
                    rows = measure_once(case, size, transport, window_s)
                    samples.setdefault((size, transport, case), []).append(rows)
    result = []
    for rounds in samples.values():
        for index, row in enumerate(rounds[0]):
            merged = dict(row)
            for key in _COUNTED:
                values = [r[index][key] for r in rounds]
                merged[key] = None if None in values else statistics.median(values)
            merged["rounds"] = len(rounds)
            result.append(merged)
    return result


def _count(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}" if value >= 10 else f"{value:.1f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| batch | transport | case | process | Python calls / batch | of which C functions "
        "| system calls / batch | of which ZeroMQ threads |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if r.get("group") != "calls":
            continue
        strong = "**" if r["process"] == ALL else ""
        lines.append(
            f"| {r['size']} | {r['transport']} | {r['case']} | {strong}{r['process']}{strong} | "
            f"{strong}{_count(r['python_calls_per_batch'])}{strong} | {_count(r['c_calls_per_batch'])} | "
            f"{strong}{_count(r['syscalls_per_batch'])}{strong} | {_count(r['zmq_thread_syscalls_per_batch'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="shorter windows")
    parser.add_argument(
        "--repeat", type=int, default=None, help="alternating rounds (median shown; default 1)"
    )
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(DEFAULT_CASES))
    parser.add_argument("--sizes", nargs="+", choices=SIZES, default=list(SIZES))
    parser.add_argument("--transports", nargs="+", choices=TRANSPORTS, default=list(TRANSPORTS))
    parser.add_argument("--window", type=float, default=None, help="seconds of each counting window")
    parser.add_argument("--json", metavar="FILE", help="also write the rows to FILE as JSON")
    args = parser.parse_args()
    started = time.perf_counter()
    rows = measure(
        args.quick, args.repeat, tuple(args.cases), tuple(args.sizes), tuple(args.transports), args.window
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows))
    print(format_table(rows))
    print(f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
