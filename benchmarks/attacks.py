"""Attacks on tensorcom's servers and clients, measured: the rows of issue 21's table, one real target each.

For every row this starts a real target on this host (a ``tensorcom serve`` request server, a stream ``Server``
process, a client process, ``tensorcom keygen``), attacks it from this process with raw pyzmq sockets over
127.0.0.1 or ipc only (never any other address), and reports:

- what is sent, and how many bytes (ZMTP framing included, what this process handed to its sockets);
- the target's resident memory (VmRSS from /proc) before the attack, its peak during it (sampled every 20 ms in a
  thread) and after the attacker left (once it has settled, at most 10 s);
- the effect on a good client running beside it in a process of its own: its rate before and during the attack,
  its longest wait for a batch, and whether its stream is exact (zreq streams are deterministic, stream batches
  carry their step: every batch is compared with a reference computed here). The request servers' good client
  takes what one worker computes (10 ms a batch); a stream server's takes at most 1,000 batches/s, a training
  loop's pace, so that on a small machine the attack, not the client, has the spare CPU;
- the outcome: refused (with which error), bounded, a hang or a timeout.

Rows about configuration (a bad CURVE key, keygen's file modes, a too-large frame, the default bind address) report
their outcome instead of memory. A row is **bounded** when the target's RSS grows by at most 200 MB at its peak and
after the attacker left, and the good client stays exact and keeps at least 25 % of its rate (issue 21's bar).
Memory still growing with the volume sent (the second half of an attack adds more than half what the first added,
past 20 MB) is not bounded either, whatever the total: the bar holds "whatever volume is sent".

Attackers adapt to the limits the code has: where a cap was added since the issue (msgpack containers, header
bytes, frames per message), they send the largest message the cap still lets through, not only the issue's.

Each row runs in a child process with a time limit (``--time-limit``): a hang is reported as a hang and its
processes are killed, so one row never blocks the run. An attack that makes its target grow past ``--rss-cap`` MB
stops there and is reported as not bounded. ``--scale`` multiplies what is sent (messages, frames, connections);
below 1 it also shortens the waits that rows need (the stall and request deadlines), so tests can run rows fast.
The stuck-worker row sets the request and worker deadlines to 5 s (their defaults, 300 s, would not fit a run).
Two rows go beyond the issue's table, for attackers that adapt to the fixes: many subscriptions of the longest size
a zpub server now accepts, and a subscriber that reads a batch just often enough not to count as stalled. The run
exits 0 whatever it measures; the rows that miss the bar are listed on stderr.

Usage: ``python benchmarks/attacks.py [--only NAME ...] [--scale S] [--json FILE] [--markdown] [--list]``
(``make attacks``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

HERE = Path(__file__).resolve().parent
RSS_BOUND_MB = 200.0
"""Issue 21's bar: the most a target's resident memory may grow under an attack, at its peak and afterwards."""
RATE_SHARE = 0.25
"""Issue 21's bar: the least share of its rate a good client keeps during an attack."""
SEED = 7
SAMPLE_BYTES = 16 * 1024  # per sample; batches are 2 samples and their labels
SAMPLE_DELAY = 0.005  # seconds per sample on the request servers: the good client's rate is the server's work
HANG_VARIABLE = "TENSORCOM_ATTACKS_HANG"
READY_SECONDS = 60.0
BASELINE_SECONDS = 2.5
STREAM_PACE = 1000.0  # batches/s a good stream client takes (a training loop's pace; the servers send faster)
SETTLE_SECONDS = 10.0
MB = 1 << 20

# -- factories the target servers serve (``tensorcom serve attacks:blobs`` with this folder on PYTHONPATH) ---------


class _Blob:
    """A sample of ``nbytes`` bytes, all its index mod 251, after ``delay`` seconds; it never returns in a process
    whose environment has TENSORCOM_ATTACKS_HANG=1 (a read from a dead NFS mount), so servers that differ only by
    that serve the same pipeline."""

    __name__ = "blob"

    def __init__(self, nbytes: int, delay: float) -> None:
        self.nbytes = nbytes
        self.delay = delay

    def __call__(self, index: int) -> tuple[np.ndarray, int]:
        if os.environ.get(HANG_VARIABLE) == "1":
            time.sleep(600)
        if self.delay:
            time.sleep(self.delay)
        return np.full(self.nbytes, index % 251, np.uint8), index


def blobs(*, seed: int, rank: int, world_size: int, nbytes: int = SAMPLE_BYTES, delay: float = 0.0) -> Any:
    """Endless batches of 2 samples of ``nbytes`` (see _Blob) in a seeded order: every batch is a pure function of
    (seed, step)."""
    from tensorcom.pipeline import Collate, Conveyer, Map, Partition, Permutation

    return Conveyer(
        [
            Permutation(1000, seed=seed, repeating=True),
            Partition(rank, world_size),
            Map(_Blob(nbytes, delay)),
            Collate(2),
        ]
    )


def digest(batch: Any) -> str:
    """A short fingerprint of a batch's arrays (dtype, shape and bytes), to compare a stream with its reference."""
    hashed = hashlib.blake2b(digest_size=12)
    for array in batch if isinstance(batch, tuple | list) else [batch]:
        contiguous = np.ascontiguousarray(array)
        hashed.update(f"{contiguous.dtype.str}{contiguous.shape}".encode())
        hashed.update(contiguous.data)
    return hashed.hexdigest()


def reference(count: int, nbytes: int = SAMPLE_BYTES) -> list[str]:
    """The digests of the first ``count`` batches of ``blobs`` with the harness's seed, computed here."""
    found: list[str] = []
    with blobs(seed=SEED, rank=0, world_size=1, nbytes=nbytes) as pipeline:
        for batch in pipeline:
            if len(found) >= count:
                break
            found.append(digest(batch))
    return found


# -- target processes (``attacks.py --target KIND ...``; not in --help) ----------------------------------------------


class _Stopped(Exception):
    """Raised by the SIGTERM handler of a target process, so that it writes what it saw and exits."""


def _raise_stopped(*_: Any) -> None:
    raise _Stopped


def target_stream_server(argv: Sequence[str]) -> None:
    """A stream ``Server`` of ``blobs`` on one URL (and a control URL): prints ``ready URL [CONTROL]``."""
    parser = argparse.ArgumentParser(prog="attacks.py --target stream-server")
    parser.add_argument("--url", required=True)
    parser.add_argument("--control")
    parser.add_argument("--nbytes", type=int, default=SAMPLE_BYTES)
    parser.add_argument("--stall-timeout", type=float, default=None)
    args = parser.parse_args(argv)
    import logging

    from tensorcom.server.stream import StreamServer

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    options: dict[str, Any] = {} if args.stall_timeout is None else {"stall_timeout": args.stall_timeout}
    server = StreamServer(
        functools.partial(blobs, nbytes=args.nbytes),
        args.url,
        seed=SEED,
        control=args.control,
        report_interval=3600.0,
        linger=0.0,
        **options,
    )
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    words = [*server.client_urls, *([server.control_endpoint] if server.control_endpoint else [])]
    print("ready", *[word for word in words if word], flush=True)
    server.run()


def target_client(argv: Sequence[str]) -> None:
    """A client of any kind: receives until SIGTERM (or a fatal error), recording each batch's time, step and
    digest; then writes them to ``--out`` as JSON. Prints ``ready ENDPOINT`` once open (or ``error ...``)."""
    parser = argparse.ArgumentParser(prog="attacks.py --target client")
    parser.add_argument("--url", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--options", default="{}", help="Connection keyword arguments as JSON")
    parser.add_argument("--echo", action="store_true", help="print 'batch N' after each batch")
    parser.add_argument("--pace", type=float, default=None, help="take at most this many batches per second")
    args = parser.parse_args(argv)
    from tensorcom import Connection, DecodeError, ProtocolError, TensorcomError

    signal.signal(signal.SIGTERM, _raise_stopped)
    result: dict[str, Any] = {"records": [], "malformed": [], "error": None}
    opened = time.monotonic()
    connection: Any = None
    try:
        try:
            urls = args.url.split()
            connection = Connection(urls if len(urls) > 1 else urls[0], **json.loads(args.options))
        except Exception as error:  # reported: what a user of this entry point would see
            result["error"] = _describe(error)
            result["error_seconds"] = time.monotonic() - opened
            print("error", _describe(error), flush=True)
            return
        print("ready", *connection.endpoints, flush=True)
        records = result["records"]
        started = slot = time.monotonic()
        with connection:
            while True:
                if args.pace:  # a training loop's pace: at most --pace batches a second, no catching up
                    now = time.monotonic()
                    if slot > now:
                        time.sleep(slot - now)
                    slot = max(slot, now) + 1 / args.pace
                try:
                    batch = connection.recv()
                except (DecodeError, ProtocolError) as error:  # a hostile message: the stream goes on
                    result["malformed"].append([time.monotonic(), _describe(error)])
                    continue
                except TensorcomError as error:
                    result["error"] = _describe(error)
                    result["error_seconds"] = time.monotonic() - started
                    break
                records.append([time.monotonic(), connection.last.step, digest(batch)])
                if args.echo:
                    print("batch", len(records), flush=True)
                elif len(records) == 1:
                    print("first", flush=True)
    except _Stopped:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if connection is not None:
            result["skipped"] = connection.malformed
        Path(args.out).write_text(json.dumps(result))


def target_defaults(argv: Sequence[str]) -> None:
    """Print the addresses ``Server(factory)`` and ``RequestServer(factory)`` bind when given no URL."""
    from tensorcom import Server
    from tensorcom.server.request import RequestServer

    factory = functools.partial(blobs, nbytes=16)
    for name, make in (
        ("Server(pipeline)", lambda: Server(factory(seed=0, rank=0, world_size=1))),
        ("RequestServer(factory)", lambda: RequestServer("attacks:blobs", workers=0)),
    ):
        try:
            server = make()
        except Exception as error:  # e.g. the port is taken: said as it is
            print(name, "error", _describe(error), flush=True)
            continue
        try:
            print(name, *server.endpoints, flush=True)
        finally:
            server.close()


TARGETS: dict[str, Callable[[Sequence[str]], None]] = {
    "stream-server": target_stream_server,
    "client": target_client,
    "defaults": target_defaults,
}


def plain(text: str) -> str:
    """``text`` without what changes from run to run: ports, a server's HOST:PID name."""
    text = re.sub(r"(tcp://127\.0\.0\.1):\d+", r"\1:PORT", text)
    return re.sub(r"server \S+:\d+ ", "server HOST:PID ", text)


def _describe(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}"


# -- measuring -----------------------------------------------------------------------------------------------------


def rss_kib(pid: int) -> int | None:
    """A process's resident memory (VmRSS) in KiB, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            return [int(child) for child in children.read().split()]
    except FileNotFoundError:
        return []


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            return stat_file.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


class RssSampler(threading.Thread):
    """Samples a process's VmRSS every 20 ms in a thread: :meth:`now`, :meth:`peak` since a time, :meth:`settle`."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        super().__init__(daemon=True, name=f"rss-{pid}")
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self.start()

    def run(self) -> None:
        while not self._stop_event.is_set():
            kib = rss_kib(self.pid)
            if kib is None:
                return
            with self._lock:
                self.samples.append((time.monotonic(), kib))
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)

    def now_mb(self) -> float:
        kib = rss_kib(self.pid)
        if kib is None:
            with self._lock:
                kib = self.samples[-1][1] if self.samples else 0
        return kib / 1024

    def peak_mb(self, since: float) -> float:
        with self._lock:
            values = [kib for when, kib in self.samples if when >= since]
        return max(values, default=0) / 1024

    def settle(self, seconds: float = SETTLE_SECONDS) -> float:
        """The RSS once it has stopped falling (no drop of 1 MB over a second), waiting at most ``seconds``."""
        deadline = time.monotonic() + seconds
        last = self.now_mb()
        while time.monotonic() < deadline:
            time.sleep(1.0)
            current = self.now_mb()
            if current > last - 1.0:
                return current
            last = current
        return self.now_mb()


def wire_bytes(frames: Sequence[bytes]) -> int:
    """What a multipart message costs on the wire: each frame's bytes and its ZMTP header (2 or 9 bytes)."""
    return sum(len(frame) + (2 if len(frame) < 256 else 9) for frame in frames)


@dataclass
class GoodClient:
    """What a good client saw: its rate before and during the attack, its longest wait, and exactness."""

    batches: int = 0
    rate_before: float | None = None
    rate_during: float | None = None
    share: float | None = None
    longest_gap: float | None = None
    exact: bool | None = None
    error: str | None = None
    malformed: int = 0
    note: str = ""

    @property
    def ok(self) -> bool:
        share_ok = self.share is None or self.share >= RATE_SHARE
        return bool(self.exact) and share_ok and self.error is None

    def text(self) -> str:
        parts = [f"{self.batches} batches"]
        if self.rate_before is not None and self.rate_during is not None:
            parts.append(
                f"{self.rate_before:.0f} → {self.rate_during:.0f} batches/s ({100 * (self.share or 0):.0f} %)"
            )
        if self.longest_gap is not None:
            parts.append(f"longest wait {self.longest_gap:.2f} s")
        parts.append("exact" if self.exact else "NOT exact")
        if self.error:
            parts.append(self.error)
        if self.note:
            parts.append(self.note)
        return ", ".join(parts)


@dataclass
class Outcome:
    """One row's result."""

    name: str
    attack: str = ""
    sent_bytes: int | None = None
    rss_before_mb: float | None = None
    rss_peak_mb: float | None = None
    rss_after_mb: float | None = None
    good: GoodClient | None = None
    outcome: str = ""
    verdict: str = ""
    ok: bool = False
    seconds: float = 0.0
    growing: str = ""
    notes: list[str] = field(default_factory=list)

    def rss_growth(self) -> tuple[float, float] | None:
        if self.rss_before_mb is None or self.rss_peak_mb is None or self.rss_after_mb is None:
            return None
        return self.rss_peak_mb - self.rss_before_mb, self.rss_after_mb - self.rss_before_mb

    def judge(self, refused: bool | None = None) -> None:
        """Set ``verdict`` and ``ok`` from the memory figures and the good client (a row about configuration sets
        ``refused`` instead)."""
        problems = []
        growth = self.rss_growth()
        if growth is not None:
            peak, after = growth
            if peak > RSS_BOUND_MB:
                problems.append(f"RSS +{peak:.0f} MB at peak")
            if after > RSS_BOUND_MB:
                problems.append(f"RSS +{after:.0f} MB after")
        if self.good is not None and not self.good.ok:
            if not self.good.exact:
                problems.append("good client not exact")
            if self.good.share is not None and self.good.share < RATE_SHARE:
                problems.append(f"good client at {100 * self.good.share:.0f} % of its rate")
            if self.good.error:
                problems.append(f"good client: {self.good.error.split(':')[0]}")
        if self.growing:
            problems.append(self.growing)
        if refused is False:
            problems.append("not refused")
        self.ok = not problems
        self.verdict = "bounded" if self.ok else "NOT bounded: " + "; ".join(problems)
        if self.ok and refused:
            self.verdict = "refused"


# -- one row's processes and sockets --------------------------------------------------------------------------------


class Run:
    """What one row starts: target processes (stopped on close, killed if need be), zmq sockets (closed with
    linger 0), a temporary folder. ``scale`` multiplies what the row sends; ``rss_cap`` (MB) stops an attack."""

    def __init__(self, scale: float, rss_cap: float, folder: Path) -> None:
        self.scale = scale
        self.rss_cap = rss_cap
        self.folder = folder
        self.context: zmq.Context[Any] = zmq.Context()
        self.processes: list[subprocess.Popen[bytes]] = []
        self.sockets: list[zmq.Socket[Any]] = []
        self.samplers: list[RssSampler] = []
        self.sent = 0
        self.notes: list[str] = []
        self.marks: list[float] = []  # the target's RSS halfway through sending and at the end (see mark)

    def count(self, base: float, least: int = 1) -> int:
        """``base`` scaled, at least ``least``."""
        return max(least, round(base * self.scale))

    def wait(self, base: float, least: float) -> float:
        """A waiting time: ``base`` seconds at scale 1 or more, shorter below (at least ``least``)."""
        return base if self.scale >= 1 else max(least, base * self.scale)

    # processes

    def environment(self, **extra: str) -> dict[str, str]:
        env = {**os.environ, **extra}
        env["PYTHONPATH"] = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
        for name in (
            "TENSORCOM_SERVER_KEY",
            "TENSORCOM_CLIENT_KEYS",
            "TENSORCOM_CLIENT_KEY",
            "TENSORCOM_SERVER_PUBLIC_KEY",
        ):
            env.pop(name, None)
        return env

    def start(
        self, args: Sequence[str], env: dict[str, str] | None = None, label: str = ""
    ) -> subprocess.Popen[bytes]:
        log = self.folder / f"{len(self.processes)}-{label or 'process'}.stderr"
        with open(log, "wb") as stream:
            process = subprocess.Popen(
                list(args), stdout=subprocess.PIPE, stderr=stream, env=env or self.environment()
            )
        process.log = log  # type: ignore[attr-defined]
        self.processes.append(process)
        return process

    def line(self, process: subprocess.Popen[bytes], timeout: float = READY_SECONDS) -> list[str]:
        """The words of the next line ``process`` prints; raises naming its stderr if none comes in time."""
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(process.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(timeout)
        if not got or not got[0]:
            why = (
                f"no line within {timeout:g} s"
                if not got
                else f"its output ended (exit code {process.poll()})"
            )
            command = (
                " ".join(map(str, process.args)) if isinstance(process.args, list) else str(process.args)
            )
            raise RuntimeError(f"{command[:160]}: {why}; stderr: {self.stderr(process)}")
        return got[0].decode().split()

    def ready(self, process: subprocess.Popen[bytes], timeout: float = READY_SECONDS) -> list[str]:
        words = self.line(process, timeout)
        if words[:1] != ["ready"]:
            raise RuntimeError(f"target did not start: {' '.join(words)}; stderr: {self.stderr(process)}")
        return words[1:]

    @staticmethod
    def stderr(process: subprocess.Popen[bytes], tail: int = 600) -> str:
        log: Path = process.log  # type: ignore[attr-defined]
        text = log.read_text(errors="replace") if log.exists() else ""
        return text[-tail:].strip()

    def serve(
        self, *options: str, workers: int = 1, env: dict[str, str] | None = None, args: Sequence[str] = ()
    ) -> tuple[subprocess.Popen[bytes], str]:
        """``tensorcom serve attacks:blobs`` on 127.0.0.1 with ``-o`` options; returns it and its zreq URL."""
        command = [
            sys.executable,
            "-m",
            "tensorcom.cli",
            "serve",
            "attacks:blobs",
            "--bind",
            "zrep://127.0.0.1:0",
        ]
        command += ["-w", str(workers), "--report", "3600", *args]
        for option in options:
            command += ["-o", option]
        process = self.start(command, env, "serve")
        return process, self.ready(process)[0]

    def stream_server(
        self, url: str, *, control: bool = False, stall_timeout: float | None = None
    ) -> tuple[subprocess.Popen[bytes], list[str]]:
        command = [sys.executable, str(Path(__file__).resolve()), "--target", "stream-server", "--url", url]
        if control:
            command += ["--control", "zrep://127.0.0.1:0"]
        if stall_timeout is not None:
            command += ["--stall-timeout", str(stall_timeout)]
        process = self.start(command, label="stream-server")
        return process, self.ready(process)

    def client(
        self,
        url: str,
        *,
        echo: bool = False,
        pace: float | None = None,
        opened: float = READY_SECONDS,
        **options: Any,
    ) -> Client:
        """A client process (``--target client``) of ``url`` (URLs separated by spaces) with Connection
        ``options``, once it has opened (or failed to: see :attr:`Client.opened`); ``pace``: at most that many
        batches a second."""
        out = self.folder / f"client-{len(self.processes)}.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--target", "client", "--url", url]
        command += ["--out", str(out), "--options", json.dumps(options), *(["--echo"] if echo else [])]
        command += ["--pace", str(pace)] if pace else []
        process = self.start(command, label="client")
        return Client(self, process, out, opened)

    def sampler(self, pid: int) -> RssSampler:
        sampler = RssSampler(pid)
        self.samplers.append(sampler)
        return sampler

    # sockets

    def socket(self, kind: int, address: str, **options: int) -> zmq.Socket[Any]:
        """A raw pyzmq socket connected to ``address`` (127.0.0.1 or ipc only), with LINGER 0 and ``options``
        (zmq option names)."""
        if not address.startswith(("tcp://127.0.0.1:", "ipc://")):
            raise ValueError(f"attacks go to 127.0.0.1 or ipc only. Found: {address}")
        made = self.context.socket(kind)
        self.sockets.append(made)
        made.setsockopt(zmq.LINGER, 0)
        for name, value in options.items():
            made.setsockopt(getattr(zmq, name), value)
        made.connect(address)
        return made

    def send(self, socket: zmq.Socket[Any], frames: Sequence[bytes], deadline: float) -> bool:
        """Send one message, waiting for room until ``deadline``; count its bytes. False when it did not go."""
        while True:
            try:
                socket.send_multipart(frames, flags=zmq.NOBLOCK)
            except zmq.Again:
                if time.monotonic() >= deadline:
                    return False
                socket.poll(50, zmq.POLLOUT)
                continue
            self.sent += wire_bytes(frames)
            return True

    def mark(self, sampler: RssSampler) -> None:
        """Note the target's RSS now: a row marks it halfway through what it sends and at the end, so that memory
        still growing with the volume sent shows even when the total stays under the bound."""
        self.marks.append(sampler.now_mb())

    def over_cap(self, sampler: RssSampler, before: float) -> bool:
        """True (and noted once) when the target grew past the RSS cap: the attack stops there."""
        grown = sampler.now_mb() - before
        if grown > self.rss_cap:
            note = f"attack stopped: target grew by {grown:.0f} MB (cap {self.rss_cap:.0f} MB)"
            if note not in self.notes:
                self.notes.append(note)
            return True
        return False

    def close(self) -> None:
        for made in self.sockets:
            made.close(linger=0)
        for sampler in self.samplers:
            sampler.stop()
        for process in self.processes:
            stop(process)
        self.context.term()


def stop(process: subprocess.Popen[bytes], seconds: float = 10.0) -> None:
    """Terminate a process and join it (then kill it)."""
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=seconds)
    if process.stdout is not None:
        process.stdout.close()


class Client:
    """A client process started by :meth:`Run.client`."""

    def __init__(self, run: Run, process: subprocess.Popen[bytes], out: Path, timeout: float) -> None:
        self.run = run
        self.process = process
        self.out = out
        self.opened = run.line(process, timeout)

    @property
    def endpoint(self) -> str:
        if self.opened[:1] != ["ready"]:
            raise RuntimeError(f"the client did not open: {' '.join(self.opened)}")
        return self.opened[1]

    def first(self, timeout: float = READY_SECONDS) -> None:
        words = self.run.line(self.process, timeout)
        if words[:1] != ["first"]:
            raise RuntimeError(f"the good client got no batch: {' '.join(words)}")

    def result(self, timeout: float = 30.0) -> dict[str, Any]:
        """Stop the client (SIGTERM) and return what it recorded."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        if not self.out.exists():
            return {
                "records": [],
                "malformed": [],
                "error": f"the client wrote nothing (exit {self.process.returncode})",
            }
        found: dict[str, Any] = json.loads(self.out.read_text())
        return found


def judge_client(result: dict[str, Any], start: float, end: float, nbytes: int = SAMPLE_BYTES) -> GoodClient:
    """A good client's figures: its rate before ``start`` (from its first batch) and in [start, end], its longest
    wait in that window, and whether its batches are exact: each the reference's batch for its step (zreq and
    pipeline stream batches carry their step), the steps consecutive (nothing lost or repeated)."""
    records = result["records"]
    good = GoodClient(
        batches=len(records), error=result.get("error"), malformed=len(result.get("malformed", []))
    )
    if not records:
        good.exact = False
        return good
    times = [record[0] for record in records]
    first = times[0]
    before = [t for t in times if first < t < start]
    during = [t for t in times if start <= t <= end]
    if start - first > 0.5 and before:
        good.rate_before = len(before) / (start - first)
    good.rate_during = len(during) / max(end - start, 1e-6)
    if good.rate_before:
        good.share = good.rate_during / good.rate_before
    window = [start, *during, end]
    good.longest_gap = max((b - a for a, b in zip(window, window[1:], strict=False)), default=end - start)
    steps = [record[1] for record in records]
    if any(step is None for step in steps):
        good.exact = False
        good.note = "batches without a step"
        return good
    wanted = reference(max(steps) + 1, nbytes)
    good.exact = all(wanted[step] == record[2] for step, record in zip(steps, records, strict=True))
    if good.exact and any(b != a + 1 for a, b in zip(steps, steps[1:], strict=False)):
        good.exact = False
        good.note = "steps missing or repeated"
    return good


# -- the rows -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    name: str
    attack: str
    before: str
    measure: Callable[[Run], Outcome]


def _limit(name: str, default: int) -> int:
    """A cap from tensorcom if it has one (an attacker sends what the receiver still accepts), else ``default``."""
    from tensorcom import protocol

    found = getattr(protocol, name, None)
    return int(found) if isinstance(found, int) else default


def _zmq_address(url: str) -> str:
    """The tcp:// or ipc:// address of a tensorcom URL (``zreq://127.0.0.1:7880`` → ``tcp://127.0.0.1:7880``)."""
    scheme, _, rest = url.partition("://")
    transport = scheme.split("+", 1)[1] if "+" in scheme else "tcp"
    return f"{transport}://{rest}"


def _header(fields: dict[str, Any]) -> bytes:
    return msgpack.packb({"v": 1, **fields}, use_bin_type=True)


def _empty_containers(marker: int, count: int) -> bytes:
    """msgpack of an array holding ``count`` empty maps (0x80) or empty arrays (0x90): one byte each."""
    return b"\xdd" + count.to_bytes(4, "big") + bytes([marker]) * count


def _request_with_state(state: bytes, step: int) -> bytes:
    """A REQUEST header whose base state is the msgpack ``state``, spliced in unparsed."""
    head = msgpack.packb(
        {"v": 1, "cmd": 3, "seed": SEED, "rank": 0, "world_size": 1, "gen": 0, "step": step},
        use_bin_type=True,
    )
    # a fixmap of 7 entries becomes one of 8: "base" -> {"state": <state>, "epoch": nil}
    base = msgpack.packb("base") + b"\x82" + msgpack.packb("state") + state + msgpack.packb("epoch") + b"\xc0"
    return bytes([head[0] + 1]) + head[1:] + base


def _ping_with(payload: bytes) -> bytes:
    return (
        b"\x83"
        + msgpack.packb("v")
        + b"\x01"
        + msgpack.packb("cmd")
        + b"\x07"
        + msgpack.packb("junk")
        + payload
    )


def _drain(socket: zmq.Socket[Any]) -> int:
    """Read what waits on a socket; return how many messages."""
    count = 0
    while socket.poll(0, zmq.POLLIN):
        socket.recv_multipart()
        count += 1
    return count


def _ping_time(run: Run, url: str, timeout: float = 30.0) -> float | None:
    """Seconds a PING from a fresh socket takes to be answered (None: no answer within ``timeout``)."""
    probe = run.socket(zmq.DEALER, _zmq_address(url))
    started = time.monotonic()
    probe.send(_header({"cmd": 7}))
    answered = probe.poll(int(timeout * 1000), zmq.POLLIN)
    probe.close(linger=0)
    return time.monotonic() - started if answered else None


def _memory_row(
    run: Run,
    name: str,
    target: subprocess.Popen[bytes],
    good: Client | None,
    attack: Callable[[RssSampler, float], str],
    *,
    after_attack: Callable[[], None] | None = None,
) -> Outcome:
    """The frame of a memory row: baseline, ``attack(sampler, before)`` (returns the outcome text), sockets
    closed (the attacker leaves), settle, and the good client's figures."""
    sampler = run.sampler(target.pid)
    if good is not None:
        good.first()
    time.sleep(BASELINE_SECONDS)
    before = sampler.now_mb()
    start = time.monotonic()
    outcome = attack(sampler, before)
    growing = ""
    if len(run.marks) == 2:
        first, second = run.marks[0] - before, run.marks[1] - run.marks[0]
        if first > 20 and second > first / 2:
            growing = (
                f"grows with what is sent (+{first:.0f} MB over the first half, +{second:.0f} MB the second)"
            )
    end = max(time.monotonic(), start + 2.0)
    while time.monotonic() < end:
        time.sleep(0.05)
    for made in run.sockets:
        made.close(linger=0)
    if after_attack is not None:
        after_attack()
    after = sampler.settle()
    result = Outcome(
        name=name,
        sent_bytes=run.sent,
        rss_before_mb=before,
        rss_peak_mb=max(sampler.peak_mb(start), before),
        rss_after_mb=after,
        outcome=outcome,
        growing=growing,
    )
    if good is not None:
        result.good = judge_client(good.result(), start, end)
    if target.poll() is not None:
        result.notes.append(f"the target exited with code {target.returncode}: {run.stderr(target, 300)}")
        result.outcome = (result.outcome + "; " if result.outcome else "") + "target died"
    return result


def row_request_maps(run: Run) -> Outcome:
    """REQUESTs whose base state holds as many empty maps as the server decodes, from many connections at once,
    while the worker is busy: they queue at the front end."""
    target, url = run.serve(f"nbytes={SAMPLE_BYTES}", f"delay={SAMPLE_DELAY}")
    good = run.client(url, seed=SEED, timeout=60)
    maps = min(1_000_000, _limit("MAX_CONTAINERS", 1_000_000) - 16)
    state = _empty_containers(0x80, maps)
    connections, per_connection = run.count(8), 256

    def attack(sampler: RssSampler, before: float) -> str:
        sockets = [run.socket(zmq.DEALER, _zmq_address(url), SNDHWM=4) for _ in range(connections)]
        deadline = time.monotonic() + 60
        replies = sent = 0
        for step in range(per_connection):
            if step == per_connection // 2:
                run.mark(sampler)
            for made in sockets:
                if run.over_cap(sampler, before) or not run.send(
                    made, [_request_with_state(state, step)], deadline
                ):
                    break
                sent += 1
                replies += _drain(made)
            else:
                continue
            break
        if len(run.marks) == 1:
            run.mark(sampler)
        waited = time.monotonic() + 30
        while replies < sent and time.monotonic() < waited and not run.over_cap(sampler, before):
            for made in sockets:
                if made.poll(20, zmq.POLLIN):
                    replies += _drain(made)
        return f"{sent} requests of {maps:,} empty maps from {connections} connections: {replies} answered"

    outcome = _memory_row(run, "request-maps", target, good, attack)
    outcome.attack = f"REQUESTs with {maps:,} empty maps in the state ({len(state) // 1024} KB), {connections} × {per_connection}"
    return outcome


def row_ping_lists(run: Run) -> Outcome:
    """PINGs carrying 1 MB of empty lists, sent back to back: how long the front end spends on each."""
    target, url = run.serve(f"nbytes={SAMPLE_BYTES}", f"delay={SAMPLE_DELAY}")
    good = run.client(url, seed=SEED, timeout=60)
    lists = 1_000_000
    message = _ping_with(_empty_containers(0x90, lists))
    count = run.count(30)

    def attack(sampler: RssSampler, before: float) -> str:
        made = run.socket(zmq.DEALER, _zmq_address(url))
        started = time.monotonic()
        deadline = started + 120
        sent = sum(run.send(made, [message], deadline) for _ in range(count))
        answers: list[str] = []
        while len(answers) < sent and made.poll(
            int(max(0.0, deadline - time.monotonic()) * 1000), zmq.POLLIN
        ):
            reply = msgpack.unpackb(made.recv_multipart()[0], raw=False)
            answers.append(
                "PONG" if reply.get("cmd") == 8 else plain(str(reply.get("message", reply.get("cmd"))))[:120]
            )
        took = time.monotonic() - started
        kinds = sorted(set(answers))
        shown = "; ".join(kinds)[:160]
        per = 1000 * took / max(len(answers), 1)
        return f"{len(answers)}/{sent} answered in {took:.2f} s ({per:.1f} ms each): {shown}"

    outcome = _memory_row(run, "ping-lists", target, good, attack)
    outcome.attack = f"{count} PINGs with {lists:,} empty lists (1 MB) each, back to back"
    return outcome


def row_unread_replies(run: Run) -> Outcome:
    """A client that never reads sends messages the server answers itself (ERROR replies)."""
    target, url = run.serve(f"nbytes={SAMPLE_BYTES}", f"delay={SAMPLE_DELAY}")
    good = run.client(url, seed=SEED, timeout=60)
    count = run.count(1_000_000)
    bad = _header({"cmd": 3, "seed": "x" * 100, "rank": 0, "world_size": 1, "step": 0})

    def attack(sampler: RssSampler, before: float) -> str:
        made = run.socket(zmq.DEALER, _zmq_address(url), RCVHWM=1, RCVBUF=4096, SNDHWM=1000)
        deadline = time.monotonic() + 90
        sent = 0
        for _ in range(count):
            if sent % 1000 == 0 and run.over_cap(sampler, before):
                break
            if sent == count // 2:
                run.mark(sampler)
            if not run.send(made, [bad], deadline):
                break
            sent += 1
        if len(run.marks) == 1:
            run.mark(sampler)
        probe = _ping_time(run, url)
        answered = "not answered within 30 s" if probe is None else f"answered in {probe:.2f} s"
        return f"{sent:,} bad REQUESTs ({len(bad)} bytes) never read; a fresh PING then {answered}"

    outcome = _memory_row(run, "unread-replies", target, good, attack)
    outcome.attack = f"{count:,} malformed REQUESTs answered with ERRORs the client never reads"
    return outcome


def row_many_frames(run: Run) -> Outcome:
    """One message of a million empty frames to the request server's front end."""
    target, url = run.serve(f"nbytes={SAMPLE_BYTES}", f"delay={SAMPLE_DELAY}")
    good = run.client(url, seed=SEED, timeout=60)
    frames = run.count(1_000_000)

    def attack(sampler: RssSampler, before: float) -> str:
        made = run.socket(zmq.DEALER, _zmq_address(url))
        run.send(made, [b""] * frames, time.monotonic() + 60)
        probe = _ping_time(run, url, timeout=60)
        reply = (
            "no reply"
            if not made.poll(5000, zmq.POLLIN)
            else "an ERROR reply"
            if b"error" in made.recv()
            else "a reply"
        )
        answered = "not answered within 60 s" if probe is None else f"answered {probe:.2f} s after"
        return f"sent; a PING {answered}; the message got {reply}"

    outcome = _memory_row(run, "many-frames", target, good, attack)
    outcome.attack = f"one message of {frames:,} empty frames"
    return outcome


def row_xpub_subscriptions(run: Run) -> Outcome:
    """The issue's attack: distinct 100 kB subscriptions to a zpub server, each on a connection of its own (a cut
    XSUB sends everything it has sent again on every reconnection: one socket would make the attacker's own traffic
    grow as the square of the count)."""
    target, words = run.stream_server("zpub://127.0.0.1:0")
    good = run.client(words[0], pace=STREAM_PACE, timeout=60)
    address = _zmq_address(words[0])
    count = run.count(440)

    def attack(sampler: RssSampler, before: float) -> str:
        deadline = time.monotonic() + 60
        sent = 0
        for index in range(count):
            if index == count // 2:
                run.mark(sampler)
            made = run.socket(zmq.XSUB, address)
            if run.over_cap(sampler, before) or not run.send(
                made, [b"\x01" + index.to_bytes(8, "big") * 12_500], deadline
            ):
                break
            made.close(linger=200)  # time to send it; then gone, and never reconnecting
            sent += 1
        time.sleep(0.5)
        run.mark(sampler)
        return f"{sent} subscriptions of 100 kB, one per connection"

    outcome = _memory_row(run, "xpub-subscriptions", target, good, attack)
    outcome.attack = f"{count} distinct 100 kB subscriptions"
    return outcome


def row_xpub_short_subscriptions(run: Run) -> Outcome:
    """Many distinct subscriptions of the longest size a zpub server accepts (255 bytes), 200 to a connection
    (51 kB: under the 64 kB a subscriber could send before it was cut; it is cut past 2 kB now)."""
    target, words = run.stream_server("zpub://127.0.0.1:0")
    good = run.client(words[0], pace=STREAM_PACE, timeout=60)
    address = _zmq_address(words[0])
    count = run.count(60_000)

    def attack(sampler: RssSampler, before: float) -> str:
        deadline = time.monotonic() + 90
        sent = 0
        made = run.socket(zmq.XSUB, address)
        for index in range(count):
            if index == count // 2:
                run.mark(sampler)
            if index % 200 == 199:  # a fresh connection every 51 kB
                made.close(linger=0)
                made = run.socket(zmq.XSUB, address)
                if run.over_cap(sampler, before):
                    break
            if not run.send(made, [b"\x01" + index.to_bytes(8, "big") * 31 + b"\x00" * 7], deadline):
                break
            sent += 1
        time.sleep(1.0)
        run.mark(sampler)
        return f"{sent:,} subscriptions of 255 bytes on {(sent + 199) // 200} connections"

    outcome = _memory_row(run, "xpub-short-subscriptions", target, good, attack)
    outcome.attack = f"{count:,} distinct 255-byte subscriptions, 200 per connection"
    return outcome


def row_seek_bombs(run: Run) -> Outcome:
    """SEEKs whose state is 1 MB of empty lists, to a stream server's control socket."""
    target, words = run.stream_server("zrpush://127.0.0.1:0", control=True)
    good = run.client(words[0], pace=STREAM_PACE, timeout=60)
    control = words[1]
    count = run.count(10)
    seek = b"\x83" + msgpack.packb("v") + b"\x01" + msgpack.packb("cmd") + b"\x09" + msgpack.packb("state")
    seek += _empty_containers(0x90, 1_000_000)

    def attack(sampler: RssSampler, before: float) -> str:
        made = run.socket(zmq.DEALER, control)
        started = time.monotonic()
        deadline = started + 60
        sent = sum(run.send(made, [seek], deadline) for _ in range(count))
        answers: list[str] = []
        while len(answers) < sent and made.poll(
            int(max(0.0, deadline - time.monotonic()) * 1000), zmq.POLLIN
        ):
            reply = msgpack.unpackb(made.recv_multipart()[-1], raw=False)
            answers.append(plain(str(reply.get("message", reply.get("cmd"))))[:120])
        took = time.monotonic() - started
        return f"{len(answers)}/{sent} answered in {took:.2f} s: {'; '.join(sorted(set(answers)))[:160]}"

    outcome = _memory_row(run, "seek-bombs", target, good, attack)
    outcome.attack = f"{count} SEEKs of 1 MB of empty lists to the control socket"
    return outcome


def _marker(index: int) -> list[bytes]:
    from tensorcom import codec

    return [bytes(frame) for frame in codec.encode([np.array([index], np.int64)], ["marker"])]


def _client_row(
    run: Run, name: str, on_malformed: str, hostile: Callable[[int], list[bytes]], count: int
) -> Outcome:
    """A bound stream client (the target) fed ``count`` hostile messages, each followed by a well-formed marker
    batch: its RSS, and whether every marker arrived (the client says ``batch N`` for each)."""
    client = run.client("zpull://127.0.0.1:0", echo=True, timeout=3600, on_malformed=on_malformed, shm=False)
    sampler = run.sampler(client.process.pid)
    time.sleep(BASELINE_SECONDS)
    before = sampler.now_mb()
    push = run.socket(zmq.PUSH, client.endpoint, SNDHWM=2)
    start = time.monotonic()
    deadline = start + 120
    sent = got = 0
    for index in range(count):
        if run.over_cap(sampler, before):
            break
        if not run.send(push, hostile(index), deadline) or not run.send(push, _marker(index), deadline):
            break
        sent += 1
    with contextlib.suppress(RuntimeError):  # no line in time: counted as markers missing
        while got < sent:
            words = run.line(client.process, max(1.0, deadline - time.monotonic()))
            got = int(words[1]) if words[:1] == ["batch"] else got
    handled = time.monotonic() - start
    push.close(linger=0)
    after = sampler.settle()
    result = client.result()
    outcome = Outcome(
        name=name,
        sent_bytes=run.sent,
        rss_before_mb=before,
        rss_peak_mb=max(sampler.peak_mb(start), before),
        rss_after_mb=after,
    )
    markers = [record[2] for record in result["records"]]
    exact = markers == [digest([np.array([index], np.int64)]) for index in range(sent)]
    raised = result.get("malformed", [])
    kinds = sorted({text.split(":")[0] for _, text in raised})
    outcome.outcome = (
        f"{sent} hostile messages: {len(raised)} raised ({', '.join(kinds) or 'none'}), "
        f"{result.get('skipped', 0)} skipped; {len(markers)}/{sent} markers after them, in {handled:.1f} s"
    )
    outcome.good = GoodClient(
        batches=len(markers), exact=exact, error=result.get("error"), note="the target itself"
    )
    if raised:
        outcome.notes.append(plain(raised[0][1])[:200])
    return outcome


def row_announced_parts(run: Run) -> Outcome:
    """A bound stream client fed headers announcing ~128 kB parts with empty data frames, in messages just under
    the frame limit."""
    from tensorcom import codec

    header = bytes(codec.encode([np.zeros(130_000, np.uint8)])[0])
    try:
        from tensorcom._net.transport import MAX_FRAMES

        pairs = min(4000, (MAX_FRAMES - 2) // 2)
    except ImportError:
        pairs = 4000
    count = run.count(10)
    outcome = _client_row(run, "announced-parts", "raise", lambda _: [header, b""] * pairs, count)
    outcome.attack = f"{count} messages of {pairs:,} headers announcing 130 kB each and empty data frames"
    return outcome


def row_metadata_lists(run: Run) -> Outcome:
    """Stream batches whose metadata frame is the largest msgpack of empty lists the client accepts (5 MB before
    the header cap), to a client with ``on_malformed="log"``."""
    from tensorcom import codec
    from tensorcom.protocol import MAX_HEADER_BYTES, STREAM_META_MAGIC

    lists = min(5_000_000, MAX_HEADER_BYTES - 16)
    frames = [bytes(frame) for frame in codec.encode([np.zeros(4, np.uint8)])]
    meta = STREAM_META_MAGIC + _empty_containers(0x90, lists)
    count = run.count(10)
    outcome = _client_row(run, "metadata-lists", "log", lambda _: [*frames, meta], count)
    outcome.attack = f"{count} batches with metadata of {lists:,} empty lists ({len(meta) // 1024} KB)"
    return outcome


def _subscriber_row(run: Run, name: str, read_every: float | None) -> Outcome:
    """A SUB (zmq's defaults, small receive buffers) beside a good subscriber of a zpub server: it never reads
    (``read_every`` None), or reads one batch every ``read_every`` × stall_timeout seconds."""
    stall = run.wait(10.0, 2.0)
    target, words = run.stream_server("zpub://127.0.0.1:0", stall_timeout=stall)
    good = run.client(words[0], pace=STREAM_PACE, timeout=60)
    window = stall + max(3.0, stall)

    def attack(sampler: RssSampler, before: float) -> str:
        made = run.context.socket(zmq.SUB)
        run.sockets.append(made)
        for option, value in (("LINGER", 0), ("RCVHWM", 1), ("RCVBUF", 4096)):
            made.setsockopt(getattr(zmq, option), value)
        monitor = made.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        run.sockets.insert(0, monitor)
        made.connect(_zmq_address(words[0]))  # the server's own address: 127.0.0.1
        made.setsockopt(zmq.SUBSCRIBE, b"")
        ends = time.monotonic() + window
        read = 0
        while time.monotonic() < ends:
            time.sleep(min(stall * (read_every or 1.0), max(0.0, ends - time.monotonic())))
            if read_every is not None and made.poll(0):
                made.recv_multipart()
                read += 1
        events = {zmq.EVENT_CONNECTED: 0, zmq.EVENT_DISCONNECTED: 0}
        while monitor.poll(0):
            event = recv_monitor_message(monitor)["event"]
            events[event] = events.get(event, 0) + 1
        connected, cut = events[zmq.EVENT_CONNECTED], events[zmq.EVENT_DISCONNECTED]
        reading = "never read" if read_every is None else f"read {read} batches"
        return f"{reading} in {window:.0f} s; it connected {connected} time(s) and saw {cut} disconnection(s)"

    outcome = _memory_row(run, name, target, good, attack)
    how = "never reads" if read_every is None else f"reads one batch every {read_every * stall:g} s"
    outcome.attack = f"a SUB that subscribes and {how}; stall_timeout {stall:g} s"
    return outcome


def row_stalled_subscriber(run: Run) -> Outcome:
    """One zpub subscriber that never reads, beside a good subscriber."""
    return _subscriber_row(run, "stalled-subscriber", None)


def row_slow_subscriber(run: Run) -> Outcome:
    """One zpub subscriber that reads a batch every 0.8 stall_timeout: never stalled that long, always behind."""
    return _subscriber_row(run, "slow-subscriber", 0.8)


def row_stuck_worker(run: Run) -> Outcome:
    """Two servers, one whose worker never returns from the dataset: the client fails over within its request
    deadline, the server replaces the worker, and a SIGKILL of that server's front end takes its worker along."""
    deadline = run.wait(5.0, 2.0)
    hung, hung_url = run.serve(
        f"nbytes={SAMPLE_BYTES}",
        f"delay={SAMPLE_DELAY}",
        env=run.environment(**{HANG_VARIABLE: "1"}),
        args=["--worker-deadline", str(deadline)],
    )
    _, good_url = run.serve(
        f"nbytes={SAMPLE_BYTES}", f"delay={SAMPLE_DELAY}", args=["--worker-deadline", str(deadline)]
    )
    good = run.client(f"{hung_url} {good_url}", seed=SEED, timeout=60, request_deadline=deadline)
    good.first(timeout=60 + 4 * deadline)
    time.sleep(2 * deadline + 2)
    workers = children_of(hung.pid)
    hung.kill()
    hung.wait(timeout=10)
    killed = time.monotonic()
    left = workers
    while left and time.monotonic() < killed + 15:
        time.sleep(0.1)
        left = [pid for pid in workers if running(pid)]
    gone = time.monotonic() - killed
    replaced = len(re.findall(r"silent for", run.stderr(hung, 100_000)))
    found = good.result()
    first = found["records"][0][0] if found["records"] else killed
    result = judge_client(found, first, time.monotonic())
    result.rate_before = result.share = None
    outcome = Outcome(name="stuck-worker", rss_before_mb=None, good=result)
    outcome.attack = (
        f"one of 2 servers' worker never returns; request_deadline = worker_deadline = {deadline:g} s"
    )
    first_gap = result.longest_gap if result.longest_gap is not None else 0.0
    outcome.outcome = (
        f"longest wait for a batch {first_gap:.1f} s; stuck worker replaced {replaced} time(s); "
        + (
            f"after SIGKILL of its front end, {len(workers)} child process(es) gone in {gone:.1f} s"
            if not left
            else f"{len(left)} of {len(workers)} workers still running 15 s after SIGKILL of their front end"
        )
    )
    outcome.judge(refused=not left and first_gap < 4 * deadline + 10)
    if outcome.ok:
        outcome.verdict = "failed over"
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return outcome


def _keyset(run: Run) -> Path:
    folder = run.folder / "keys"
    subprocess.run(
        [sys.executable, "-m", "tensorcom.cli", "keygen", str(folder), "--client", "alice"],
        check=True,
        capture_output=True,
        env=run.environment(),
    )
    return folder


def _timed(run: Run, command: list[str], limit: float = 30.0) -> tuple[float, int | None, str]:
    """Run a command: (seconds, exit code or None if it hung past ``limit`` and was killed, last stderr line)."""
    started = time.monotonic()
    process = run.start(command, label="entry")
    try:
        process.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
        return time.monotonic() - started, None, ""
    lines = [line for line in run.stderr(process, 2000).splitlines() if line.strip()]
    return time.monotonic() - started, process.returncode, lines[-1] if lines else ""


def row_bad_curve_key(run: Run) -> Outcome:
    """A CURVE key of the wrong length, and one with a character outside Z85: ``tensorcom serve``, ``tensormon`` and
    a ``Connection`` each refuse at once (a hang is killed after 30 s)."""
    keys = _keyset(run)
    secret = (keys / "alice.key_secret").read_text()
    pattern = r'(secret-key = ")(.{40})"'
    bad = {
        "wrong length": re.sub(pattern, lambda m: m.group(1) + m.group(2)[:39] + '"', secret),
        "invalid Z85": re.sub(pattern, lambda m: m.group(1) + "~" + m.group(2)[1:] + '"', secret),
    }
    tensormon = str(Path(sys.executable).parent / "tensormon")
    results: list[str] = []
    notes: list[str] = []
    refused = True
    for label, text in bad.items():
        path = run.folder / f"{label.replace(' ', '-')}.key_secret"
        path.write_text(text)
        path.chmod(0o600)
        entries = {
            "tensorcom serve": [sys.executable, "-m", "tensorcom.cli", "serve", "attacks:blobs", "-w", "0"]
            + [
                "--bind",
                "zrep://127.0.0.1:0",
                "--server-key",
                str(path),
                "--client-keys",
                str(keys / "clients"),
            ],
            "tensormon": [
                tensormon,
                "zreq://127.0.0.1:9",
                "--timeout",
                "10",
                "-c",
                "1",
                "--client-key",
                str(path),
            ]
            + ["--server-public-key", str(keys / "server.key")],
        }
        for entry, command in entries.items():
            took, code, last = _timed(run, command)
            ok = code not in (None, 0) and ("ConfigError" in last or "malformed" in last)
            refused &= ok
            shown = f"exit {code} in {took:.1f} s" if code is not None else f"HANG (killed at {took:.0f} s)"
            results.append(f"{entry} ({label}): {shown}")
            notes.append(f"{entry} ({label}) said: {last.replace(str(run.folder) + '/', '')[:200]}")
        try:
            client = run.client(
                "zreq://127.0.0.1:9",
                opened=30.0,
                client_key=str(path),
                server_public_key=str(keys / "server.key"),
                timeout=10,
            )
        except RuntimeError:
            refused = False
            results.append(f"Connection ({label}): HANG (nothing within 30 s)")
            continue
        result = client.result()
        error, seconds = result.get("error") or "no error", result.get("error_seconds")
        refused &= error.startswith("ConfigError") and client.opened[:1] == ["error"]
        when = f" in {seconds:.2f} s" if seconds is not None else ""
        results.append(f"Connection ({label}): {error.split(':')[0]}{when}")
        notes.append(f"Connection ({label}) raised: {error.replace(str(run.folder) + '/', '')[:200]}")
    outcome = Outcome(name="bad-curve-key", outcome="; ".join(results), notes=notes)
    outcome.attack = "a secret key file with a 39-character key, and one with '~' (not Z85)"
    outcome.judge(refused=refused)
    return outcome


def row_keygen_modes(run: Run) -> Outcome:
    """``tensorcom keygen`` while a thread watches the folder: the mode each secret file has when first seen."""
    runs = run.count(10)
    seen: dict[str, int] = {}
    for index in range(runs):
        folder = run.folder / f"keygen-{index}"
        watching = threading.Event()
        watching.set()

        def watch(folder: Path = folder, watching: threading.Event = watching) -> None:
            while watching.is_set():
                with contextlib.suppress(FileNotFoundError):
                    for entry in os.scandir(folder):
                        if entry.name.endswith(".key_secret") and entry.path not in seen:
                            with contextlib.suppress(FileNotFoundError):
                                seen[entry.path] = stat.S_IMODE(os.stat(entry.path).st_mode)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        subprocess.run(
            [sys.executable, "-m", "tensorcom.cli", "keygen", str(folder), "--client", "a", "--client", "b"],
            check=True,
            capture_output=True,
            env=run.environment(),
        )
        watching.clear()
        watcher.join(timeout=5)
        for entry in folder.glob("*.key_secret"):
            seen.setdefault(str(entry), stat.S_IMODE(entry.stat().st_mode))
    modes = sorted({oct(mode) for mode in seen.values()})
    private = all(mode & 0o077 == 0 for mode in seen.values())
    outcome = Outcome(name="keygen-modes")
    outcome.attack = f"{runs} runs of `tensorcom keygen` (3 secret files each), the folder watched"
    outcome.outcome = f"{len(seen)} secret files, first seen with mode {', '.join(modes)}" + (
        " (private from creation)" if private else ""
    )
    outcome.judge(refused=private)
    if outcome.ok:
        outcome.verdict = "private"
    return outcome


def row_too_large_frame(run: Run) -> Outcome:
    """A zreq client whose max_message_size is smaller than the server's batches."""
    _, url = run.serve("nbytes=1048576")
    limit = 65536
    client = run.client(url, seed=SEED, timeout=20, max_message_size=limit)
    waited = time.monotonic()
    while client.process.poll() is None and time.monotonic() < waited + 40:
        time.sleep(0.2)
    result = client.result()
    error = result.get("error") or "no error"
    seconds = result.get("error_seconds")
    outcome = Outcome(name="too-large-frame")
    outcome.attack = f"2 MB batches to a client with max_message_size={limit}"
    outcome.outcome = plain(error)[:200] + (f" after {seconds:.1f} s" if seconds is not None else "")
    clear = not error.startswith("Timeout") and error != "no error" and str(limit) in error.replace(",", "")
    outcome.judge(refused=clear)
    return outcome


def row_default_bind(run: Run) -> Outcome:
    """What ``tensorcom serve``, ``Server()`` and ``RequestServer()`` bind when given no address."""
    found = []
    process = run.start(
        [sys.executable, "-m", "tensorcom.cli", "serve", "attacks:blobs", "-w", "0"], label="serve-default"
    )
    try:
        words = run.line(process, READY_SECONDS)
        found.append("tensorcom serve: " + " ".join(words[1:] if words[:1] == ["ready"] else words))
    except RuntimeError as error:
        found.append(f"tensorcom serve: {str(error)[-160:]}")
    stop(process)
    process = run.start(
        [sys.executable, str(Path(__file__).resolve()), "--target", "defaults"], label="defaults"
    )
    process.wait(timeout=60)
    found += [line.strip() for line in process.stdout.read().decode().splitlines() if line.strip()]  # type: ignore[union-attr]
    text = " | ".join(found)
    loopback = "0.0.0.0" not in text and "127.0.0.1" in text
    busy = "in use" in text.lower()
    outcome = Outcome(name="default-bind", attack="no address given", outcome=text[:400])
    outcome.judge(refused=loopback)
    if outcome.ok:
        outcome.verdict = "loopback"
    elif busy:
        outcome.verdict = "not measured: port 7880 in use"
    return outcome


ROWS: dict[str, Row] = {
    row.name: row
    for row in [
        Row(
            "request-maps",
            "REQUEST headers of empty msgpack maps, queued while workers are busy (256 per connection, many connections)",
            "45 MB sent → request server RSS +2.85 GB, still held after the attacker left",
            row_request_maps,
        ),
        Row(
            "ping-lists",
            "PINGs of 1 MB of empty lists",
            "0.8 s of the front-end thread per message; 30 of them and a good client declared the server dead",
            row_ping_lists,
        ),
        Row(
            "unread-replies",
            "a client that never reads sends messages the server answers itself (ERRORs)",
            "2 GB sent → +2 GB, linear",
            row_unread_replies,
        ),
        Row(
            "many-frames",
            "one message of 1M empty frames to a request server",
            "2 MB → +310 MB, front end blocked 9 s",
            row_many_frames,
        ),
        Row(
            "xpub-subscriptions",
            "distinct 100 kB XPUB subscriptions to a zpub server",
            "440 of them: 44 MB → +2 GB, never given back",
            row_xpub_subscriptions,
        ),
        Row(
            "xpub-short-subscriptions",
            "distinct subscriptions of the longest size a zpub server now accepts, 200 per connection (not in the issue)",
            "(not measured)",
            row_xpub_short_subscriptions,
        ),
        Row(
            "seek-bombs",
            "msgpack bombs to a stream server's SEEK control socket",
            "10 of them: the stream stops 5.5 s",
            row_seek_bombs,
        ),
        Row(
            "announced-parts",
            "a bound stream client fed headers announcing ~128 kB parts with empty data frames",
            "0.29 MB → client +1 GB",
            row_announced_parts,
        ),
        Row(
            "metadata-lists",
            "stream metadata of empty lists, client on_malformed='log'",
            "5 MB: +385 MB, 4.4 s, then ProtocolError raised anyway",
            row_metadata_lists,
        ),
        Row(
            "stalled-subscriber",
            "one zpub subscriber that never reads",
            "the good subscriber falls from 1,104 to 0.9 batches/s, then Timeout",
            row_stalled_subscriber,
        ),
        Row(
            "slow-subscriber",
            "a zpub subscriber that reads one batch every 0.8 × stall_timeout (not in the issue)",
            "(not measured)",
            row_slow_subscriber,
        ),
        Row(
            "stuck-worker",
            "a worker blocked inside the dataset on one of two servers",
            "the client times out with both servers '(up)'; after SIGKILL of a front end its stuck worker keeps running",
            row_stuck_worker,
        ),
        Row(
            "bad-curve-key",
            "a CURVE key of the wrong length or invalid Z85",
            "Connection, tensorcom serve and tensormon hang forever",
            row_bad_curve_key,
        ),
        Row(
            "keygen-modes",
            "`tensorcom keygen`, the folder watched",
            "secret key files seen at 0644 before the chmod in 3 of 10 runs",
            row_keygen_modes,
        ),
        Row(
            "too-large-frame",
            "a frame larger than the client's max message size",
            "a generic Timeout, and the zreq client asks again forever",
            row_too_large_frame,
        ),
        Row(
            "default-bind",
            "defaults",
            "tensorcom serve, Server() and RequestServer() bind 0.0.0.0:7880 in plain mode",
            row_default_bind,
        ),
    ]
}


# -- running rows, each in a child process with a time limit --------------------------------------------------------


def run_row(name: str, scale: float, rss_cap: float, result_path: Path) -> None:
    """Measure one row in this process and write its Outcome as JSON (the child side of :func:`measure`)."""
    row = ROWS[name]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"attacks-{name}-") as folder:
        run = Run(scale, rss_cap, Path(folder))
        try:
            outcome = row.measure(run)
            outcome.notes += run.notes
            if outcome.sent_bytes is None and run.sent:
                outcome.sent_bytes = run.sent
            if not outcome.verdict:
                outcome.judge()
                if run.notes and any(note.startswith("attack stopped") for note in run.notes):
                    outcome.ok = False
                    outcome.verdict = (
                        outcome.verdict
                        if outcome.verdict.startswith("NOT")
                        else "NOT bounded: reached the RSS cap"
                    )
        finally:
            run.close()
    outcome.seconds = time.monotonic() - started
    outcome.attack = outcome.attack or row.attack
    result_path.write_text(json.dumps(asdict(outcome)))


def measure(name: str, scale: float, rss_cap: float, time_limit: float) -> Outcome:
    """Run one row in a child process of its own session; past ``time_limit`` seconds kill the whole session (the
    targets with it) and report a hang."""
    with tempfile.TemporaryDirectory(prefix="attacks-") as folder:
        result = Path(folder) / "result.json"
        log = Path(folder) / "row.log"
        started = time.monotonic()
        with open(log, "wb") as output:
            child = subprocess.Popen(
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--row",
                    name,
                    "--scale",
                    str(scale),
                    "--rss-cap",
                    str(rss_cap),
                    "--result",
                    str(result),
                ],
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            child.wait(timeout=time_limit)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait(timeout=30)
            return Outcome(
                name=name,
                attack=ROWS[name].attack,
                outcome=f"HANG: no result within {time_limit:g} s (killed)",
                verdict="hang",
                seconds=time.monotonic() - started,
            )
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)  # whatever the row left behind
        if not result.exists():
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            return Outcome(
                name=name,
                attack=ROWS[name].attack,
                outcome=f"the row failed (exit {child.returncode}): {' / '.join(tail)[-400:]}",
                verdict="failed",
                seconds=time.monotonic() - started,
            )
        data = json.loads(result.read_text())
    good = data.pop("good")
    outcome = Outcome(**data)
    outcome.good = GoodClient(**good) if good else None
    return outcome


# -- reports -------------------------------------------------------------------------------------------------------


def _mb(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}"


def _bytes(value: int | None) -> str:
    if value is None:
        return "—"
    return f"{value / MB:.2f} MB" if value >= 10_000 else f"{value} B"


def rss_text(outcome: Outcome) -> str:
    growth = outcome.rss_growth()
    if growth is None:
        return "—"
    peak, after = growth
    return f"{_mb(outcome.rss_before_mb)} → {_mb(outcome.rss_peak_mb)} → {_mb(outcome.rss_after_mb)} MB (+{peak:.0f} / +{after:.0f})"


def text_report(outcomes: Sequence[Outcome]) -> str:
    lines = []
    for outcome in outcomes:
        lines.append(f"{outcome.name}: {outcome.verdict} ({outcome.seconds:.0f} s)")
        lines.append(f"  sent:    {outcome.attack}; {_bytes(outcome.sent_bytes)}")
        lines.append(f"  RSS:     {rss_text(outcome)} (before → peak → after)")
        if outcome.good is not None:
            lines.append(f"  good:    {outcome.good.text()}")
        lines.append(f"  outcome: {outcome.outcome}")
        for note in outcome.notes:
            lines.append(f"  note:    {note}")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_report(outcomes: Sequence[Outcome]) -> str:
    lines = [
        "| attack | what is sent | bytes sent | target RSS before → peak → after | good client | before (issue 21) | after | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for outcome in outcomes:
        row = ROWS.get(outcome.name)
        good = outcome.good.text() if outcome.good is not None else "—"
        cells = [
            f"`{outcome.name}`",
            outcome.attack,
            _bytes(outcome.sent_bytes),
            rss_text(outcome),
            good,
            row.before if row else "",
            outcome.outcome,
            f"**{outcome.verdict}**" if outcome.ok else outcome.verdict,
        ]
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--target"]:
        if len(argv) < 2 or argv[1] not in TARGETS:
            raise SystemExit(f"--target takes one of {', '.join(TARGETS)}")
        TARGETS[argv[1]](argv[2:])
        return 0
    parser = argparse.ArgumentParser(
        prog="attacks.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="run only this row (repeatable, or a comma-separated list); see --list",
    )
    parser.add_argument("--list", action="store_true", help="list the rows and exit")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="multiply what each attack sends (default 1)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results to FILE as JSON")
    parser.add_argument(
        "--markdown", action="store_true", help="print a Markdown table (RELIABILITY.md's) instead of text"
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=180.0,
        help="seconds a row may take before it is a hang (default 180)",
    )
    parser.add_argument(
        "--rss-cap",
        type=float,
        default=1000.0,
        help="MB a target may grow by before its attack stops (default 1000)",
    )
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.scale <= 0:
        parser.error(f"--scale must be > 0. Found: {args.scale}")
    if args.row:
        run_row(args.row, args.scale, args.rss_cap, Path(args.result))
        return 0
    if args.list:
        for row in ROWS.values():
            print(f"{row.name:34} {row.attack}")
        return 0
    names = [name for option in args.only or [] for name in option.split(",") if name] or list(ROWS)
    unknown = [name for name in names if name not in ROWS]
    if unknown:
        parser.error(f"unknown row {unknown[0]!r}; the rows are: {', '.join(ROWS)}")
    outcomes = []
    for name in names:
        print(f"{name} ...", end=" ", file=sys.stderr, flush=True)
        outcome = measure(name, args.scale, args.rss_cap, args.time_limit)
        print(f"{outcome.verdict} ({outcome.seconds:.0f} s)", file=sys.stderr, flush=True)
        outcomes.append(outcome)
    print(markdown_report(outcomes) if args.markdown else text_report(outcomes))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "scale": args.scale,
                    "load_average": os.getloadavg(),
                    "rows": [asdict(outcome) for outcome in outcomes],
                },
                indent=1,
            )
        )
    unbounded = [outcome.name for outcome in outcomes if not outcome.ok]
    if unbounded:
        print(f"not bounded: {', '.join(unbounded)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
