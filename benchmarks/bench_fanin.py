"""Fan-in: N sender processes into one receiving client over loopback tcp, side by side in one run.

For N = 1, 2 and 4 senders of the transport part's 9.6 MB batch (64x3x224x224 uint8 + 64 int64 labels):

- raw pyzmq: N PUSH sockets (one per process, each binding) into one PULL socket connected to all N, zero copy
  both ways (the ceiling, and the baseline of every ratio with the same N);
- stream: N ``Server`` processes (``zrpush``) into one ``Connection`` of N ``zrpull`` URLs;
- zreq 1 worker: N ``RequestServer`` processes with one worker process each (``tensorcom serve -w 1``; the worker
  answers the client directly) into one ``Connection`` of N ``zreq`` URLs (the default ``prefetch``, 4).

``--sweep`` adds, for measuring the defaults: the stream and zreq clients with ``io_threads`` 1 and 4 (the default is
in the row), the stream client with ``stripes=2`` (two sockets to each server), and zreq with ``prefetch`` 8 and 16.

The receiver treats each batch as a training loop would (views of the arrays, one byte of every 4 KB page touched,
as in bench_transport.py). It starts once every sender is listening, takes ``4 N`` batches to warm up (every
connection made, the zreq workers found), then times the next ``count``. Reported for each case and N:

- batches/s and GB/s received, and the ratio to raw pyzmq with the same N (median of the per-round ratios);
- the client's CPU seconds per GB (its own process time, all its threads), that cost over the same case's at N = 1,
  and the share of it spent in ZeroMQ's I/O threads (from /proc: one I/O thread busy all the time carries
  1 / that GB/s);
- the client's minor page faults per batch (of the 2,352 pages a batch fills: memory the allocator gave back to
  the kernel and took again);
- how many 100 GbE servers (12.5 GB/s each) one client core could absorb at the measured CPU per GB.

On a 2-core machine the N senders share the cores with the receiver, so GB/s falls with N for every case alike; the
ratios and the client's CPU per GB are what this part is for.
``python benchmarks/bench_fanin.py [--quick] [--repeat R] [--count B] [--sweep] [--senders N ...] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import resource
import signal
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import zmq
from bench_transport import make_batch, peak_rss_mb, same_batches, touch

SIZE = "9.6MB"
SENDERS = (1, 2, 4)
LINK_GB_PER_S = 12.5  # 100 GbE
CASES = ("raw pyzmq", "stream", "zreq 1 worker")
SWEEP = (
    "stream io_threads 1",
    "stream io_threads 4",
    "stream stripes 2",
    "zreq io_threads 1",
    "zreq io_threads 4",
    "zreq prefetch 8",
    "zreq prefetch 16",
)
START_S = 120.0


def free_ports(count: int) -> list[int]:
    """``count`` tcp ports on loopback that nothing listens on now."""
    holders = []
    for _ in range(count):
        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        holders.append(holder)
    ports = [holder.getsockname()[1] for holder in holders]
    for holder in holders:
        holder.close()
    return ports


# senders (each in its own process; each puts its pid on `ready` once it listens)


def send_raw(address: str, ready: Any) -> None:
    from tensorcom import codec

    context = zmq.Context()
    pusher = context.socket(zmq.PUSH)
    pusher.setsockopt(zmq.SNDHWM, 2)
    pusher.setsockopt(zmq.LINGER, 0)
    pusher.bind(address)
    frames = codec.encode(make_batch(SIZE))
    ready.put(os.getpid())
    try:
        while True:
            pusher.send_multipart(frames, copy=False)
    except KeyboardInterrupt:
        pass


def send_stream(address: str, ready: Any) -> None:
    import itertools

    from tensorcom import Server

    batch = make_batch(SIZE)
    server = Server(itertools.repeat(batch), address.replace("tcp://", "zrpush://"), queue=2)
    ready.put(os.getpid())
    try:
        server.run()
    except KeyboardInterrupt:
        pass


def send_zreq(address: str, ready: Any) -> None:
    from tensorcom.server.request import RequestServer

    server = RequestServer(
        functools.partial(same_batches, size=SIZE), address.replace("tcp://", "zrep://"), workers=1
    )
    ready.put(os.getpid())
    try:
        server.run(duration=600)
    except KeyboardInterrupt:
        pass


# the receiver (its own process; puts (seconds, cpu seconds, peak RSS MB, io threads) on `result`)


def receive(case: str, addresses: list[str], count: int, result: Any, senders_gone: Any) -> None:
    """Time ``count`` batches from ``addresses``; close only once the senders have stopped (``senders_gone``), so
    that no sender is cut off in the middle of a message (libzmq 4.3.5 can abort a PUSH sender then)."""
    senders = len(addresses)
    if case == "raw pyzmq":
        from tensorcom import codec

        context = zmq.Context()
        puller = context.socket(zmq.PULL)
        puller.setsockopt(zmq.RCVHWM, 2)
        for address in addresses:
            puller.connect(address)
        _timed(lambda: codec.decode(puller.recv_multipart(copy=False)), senders, count, 1, result)
        senders_gone.wait(START_S)
        puller.close(linger=0)
        context.term()
        return
    from tensorcom import Connection

    options: dict[str, Any] = {"timeout": START_S}
    words = case.split()
    if "io_threads" in words:
        options["io_threads"] = int(words[-1])
    if "stripes" in words:
        options["stripes"] = int(words[-1])
    if case.startswith("zreq"):
        urls = [address.replace("tcp://", "zreq://") for address in addresses]
        if "prefetch" in words:
            options["prefetch"] = int(words[-1])
    else:
        urls = [address.replace("tcp://", "zrpull://") for address in addresses]
    with Connection(urls, **options) as connection:
        _timed(connection.recv, senders, count, connection.io_threads, result)
        senders_gone.wait(START_S)


def io_thread_seconds() -> float:
    """CPU seconds used so far by this process's ZeroMQ I/O threads (named ZMQbg/IO/k), from /proc."""
    total = 0
    for task in Path("/proc/self/task").iterdir():
        try:
            if not (task / "comm").read_text().startswith("ZMQbg/IO"):
                continue
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


def _timed(receive_one: Any, senders: int, count: int, io_threads: int, result: Any) -> None:
    for _ in range(4 * senders):
        touch(receive_one())
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start, cpu, io_cpu = time.perf_counter(), time.process_time(), io_thread_seconds()
    for _ in range(count):
        touch(receive_one())
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    result.put((seconds, cpu, io_thread_seconds() - io_cpu, faults / count, peak_rss_mb(), io_threads))


SEND = {"raw": send_raw, "stream": send_stream, "zreq": send_zreq}


def _stop(processes: list[Any]) -> None:
    """SIGINT each live process (a request server stops its worker and goes), then join it (kill if it lingers)."""
    for process in processes:
        if process.is_alive() and process.pid is not None:
            os.kill(process.pid, signal.SIGINT)
    for process in processes:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
            process.join(timeout=30)


def measure_once(case: str, senders: int, count: int) -> dict[str, float]:
    context = multiprocessing.get_context("spawn")
    ready, results, senders_gone = context.Queue(), context.Queue(), context.Event()
    addresses = [f"tcp://127.0.0.1:{port}" for port in free_ports(senders)]
    send = SEND[case.split()[0]]
    processes = [context.Process(target=send, args=(address, ready)) for address in addresses]
    receiver = context.Process(target=receive, args=(case, addresses, count, results, senders_gone))
    try:
        for process in processes:
            process.start()
        for _ in processes:
            ready.get(timeout=START_S)
        receiver.start()
        seconds, cpu, io_cpu, faults, rss, io_threads = results.get(timeout=START_S + 300)
    finally:
        _stop(processes)  # senders first: none is cut off in the middle of a message
        senders_gone.set()
        if receiver.pid is not None:
            receiver.join(timeout=60)  # it closes and ends on its own once told
            _stop([receiver])
    gigabytes = count * sum(a.nbytes for a in make_batch(SIZE)) / 1e9
    return {
        "batches_per_s": count / seconds,
        "gb_per_s": gigabytes / seconds,
        "client_cpu_s_per_gb": cpu / gigabytes,
        "io_thread_cpu_s_per_gb": io_cpu / gigabytes,
        "client_page_faults_per_batch": faults,
        "client_peak_rss_mb": rss,
        "io_threads": io_threads,
    }


def counts(quick: bool) -> int:
    """Batches timed per measurement."""
    return 100 if quick else 600


def measure(
    quick: bool = False,
    repeat: int | None = None,
    sweep: bool = False,
    senders_list: tuple[int, ...] = SENDERS,
    count: int | None = None,
) -> list[dict[str, Any]]:
    """Rows of the fan-in table: medians over alternating rounds, ratios to raw pyzmq with the same N."""
    repeat = repeat or (1 if quick else 3)
    count = count or counts(quick)
    cases = [*CASES, *(SWEEP if sweep else ())]
    samples: dict[tuple[str, int], list[dict[str, float]]] = {}
    for round_number in range(repeat):
        for senders in senders_list:
            print(f"fan-in N={senders} round {round_number + 1}/{repeat}", file=sys.stderr)
            for case in cases:
                samples.setdefault((case, senders), []).append(measure_once(case, senders, count))
    rows: list[dict[str, Any]] = []
    for (case, senders), values in samples.items():
        raw = samples[("raw pyzmq", senders)]
        row: dict[str, Any] = {"group": "fanin", "size": SIZE, "transport": "tcp", "case": case}
        row.update({"senders": senders, "count": count})
        for key in values[0]:
            row[key] = statistics.median(v[key] for v in values)
        row["vs_raw"] = statistics.median(
            v["batches_per_s"] / r["batches_per_s"] for v, r in zip(values, raw, strict=True)
        )
        row["samples"] = values
        rows.append(row)
    for row in rows:
        first = next(r for r in rows if r["case"] == row["case"] and r["senders"] == senders_list[0])
        row["cpu_vs_one_sender"] = row["client_cpu_s_per_gb"] / first["client_cpu_s_per_gb"]
    rows.sort(key=lambda r: (r["senders"], cases.index(r["case"])))
    return rows


def links_per_core(row: dict[str, Any]) -> float:
    """On paper: how many servers sending ``LINK_GB_PER_S`` (100 GbE) each one client core could absorb, from the
    measured client CPU seconds per GB (receiving only; the training step's own use of the data is not counted)."""
    cost = row["client_cpu_s_per_gb"]
    return float("inf") if cost <= 0 else 1.0 / (cost * LINK_GB_PER_S)


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| senders | case | client I/O threads | batches/s | GB/s | vs raw pyzmq (same N) | client CPU s/GB | "
        "of which I/O threads | CPU/GB vs N=1 | client page faults per batch | 100 GbE servers per client core |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['senders']} | {r['case']} | {r['io_threads']:.0f} | {r['batches_per_s']:.0f} | "
            f"{r['gb_per_s']:.2f} | {r['vs_raw']:.2f} | {r['client_cpu_s_per_gb']:.3f} | "
            f"{r.get('io_thread_cpu_s_per_gb', float('nan')):.3f} | {r['cpu_vs_one_sender']:.2f} | "
            f"{r.get('client_page_faults_per_batch', float('nan')):.0f} | {links_per_core(r):.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer batches, one round")
    parser.add_argument("--repeat", type=int, default=None, help="alternating rounds (median shown)")
    parser.add_argument("--sweep", action="store_true", help="also io_threads 1 and 4, and stripes 2")
    parser.add_argument("--senders", type=int, nargs="+", default=list(SENDERS), help="values of N")
    parser.add_argument("--count", type=int, default=None, help="batches timed per measurement")
    parser.add_argument("--json", metavar="FILE", help="also write the rows to FILE as JSON")
    args = parser.parse_args()
    rows = measure(args.quick, args.repeat, args.sweep, tuple(args.senders), args.count)
    if args.json:
        Path(args.json).write_text(json.dumps(rows))
    print(format_table(rows))


if __name__ == "__main__":
    main()
