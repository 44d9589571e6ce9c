"""What many test files need: child processes and their ready lines, bit-for-bit batch comparison, process facts
from /proc (children, liveness, resident memory), and waiting for an event (:func:`wait_until`).

Every wait here has a time limit and fails with what the process said on stderr, so a server that does not start
fails its test at once instead of hanging until pytest's timeout. Tests wait for what they need (a ready line, a
file, a log line) with generous limits, never for a guessed time: the suite runs on busy 2-core machines.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

TESTS = Path(__file__).parent
READY_SECONDS = 60.0  # a server imports numpy, zmq and maybe torch on a busy 2-core machine
STOP_SECONDS = 10.0
READ_STDERR_SECONDS = 5.0
WAIT_SECONDS = 30.0  # for a log line, a file, a process gone: at once when idle, seconds on a busy machine
TERM_SECONDS = 10.0  # a context whose sockets are all closed with linger=0 terms at once

StartProcess = Callable[..., "subprocess.Popen[bytes]"]
StartServer = Callable[..., "tuple[subprocess.Popen[bytes], str]"]  # the request_server fixture
MakeSocket = Callable[..., "zmq.Socket[Any]"]  # the socket fixture

# -- child processes and their ready lines --------------------------------------------------------------------------

_stderr_logs: weakref.WeakKeyDictionary[subprocess.Popen[Any], Path] = weakref.WeakKeyDictionary()


def note_stderr_log(process: subprocess.Popen[Any], log: Path) -> None:
    """Remember that ``process`` writes its stderr to ``log``, so that a failed wait can show it."""
    _stderr_logs[process] = log


def stop(process: subprocess.Popen[Any], seconds: float = STOP_SECONDS) -> None:
    """Terminate ``process`` and join it within ``seconds`` (then kill it and join again)."""
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=seconds)


def _call_with_time_limit(function: Callable[[], Any], seconds: float) -> tuple[bool, Any]:
    """Run ``function`` in a daemon thread: (True, its result) when it returns within ``seconds``, else (False, None);
    what it raises is raised here. A read that never returns is left to its thread: the process is stopped by then,
    or the test fails anyway."""
    outcome: list[tuple[Any, BaseException | None]] = []

    def call() -> None:
        try:
            outcome.append((function(), None))
        except BaseException as error:  # handed to the caller
            outcome.append((None, error))

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    if not outcome:
        return False, None
    result, error = outcome[0]
    if error is not None:
        raise error
    return True, result


def stderr_of(process: subprocess.Popen[Any]) -> str:
    """What ``process`` wrote to stderr: its log file's text, or (once it has ended) what its stderr pipe holds."""
    log = _stderr_logs.get(process)
    if log is not None:
        return log.read_text(errors="replace") if log.exists() else f"(no log file {log})"
    if process.stderr is None:
        return "(not captured here: inherited or discarded; pytest reports what reached the test's stderr)"
    if process.poll() is None:
        return "(a pipe, not read while the process runs)"
    stream = process.stderr
    done, text = _call_with_time_limit(stream.read, READ_STDERR_SECONDS)
    if not done:
        return "(its pipe stays open: a child process still holds it)"
    return text.decode(errors="replace") if isinstance(text, bytes) else str(text)


def read_line(
    process: subprocess.Popen[Any], timeout: float = READY_SECONDS, *, allow_end: bool = False
) -> str:
    """The next line of ``process``'s stdout (a pipe), as text. When no line comes within ``timeout`` seconds, or
    the output ends (unless ``allow_end``: then "" as ``readline`` says), stop the process and fail with its exit
    code and stderr."""
    stream = process.stdout
    if stream is None:
        raise ValueError("read_line needs a process started with stdout=subprocess.PIPE")
    done, line = _call_with_time_limit(stream.readline, timeout)
    if done and line:
        return line.decode() if isinstance(line, bytes) else str(line)
    if done and allow_end:
        return ""
    why = "its stdout ended" if done else f"no line on its stdout within {timeout:g} s"
    stop(process)
    raise AssertionError(
        f"process {process.pid} ({_command(process)}): {why}; exit code {process.returncode}; "
        f"its stderr:\n{stderr_of(process)}"
    )


def wait_ready(process: subprocess.Popen[Any], timeout: float = READY_SECONDS) -> str:
    """Wait for a server's ``ready URL...`` line and return its first URL (one a client uses as it is); fail with
    the process's stderr when the first line is something else, or does not come within ``timeout`` seconds."""
    line = read_line(process, timeout)
    words = line.split()
    if words[:1] != ["ready"] or len(words) < 2:
        stop(process)
        raise AssertionError(
            f"process {process.pid} ({_command(process)}) did not start: its first line is {line!r}; "
            f"its stderr:\n{stderr_of(process)}"
        )
    return words[1]


def _command(process: subprocess.Popen[Any]) -> str:
    args = process.args
    words = [str(arg) for arg in args] if isinstance(args, list | tuple) else [str(args)]
    text = " ".join(words)
    return text if len(text) <= 200 else text[:197] + "..."


class Processes:
    """The child processes of one test. Each starts as ``python ARGS``; its stderr goes to a log file under ``logs``
    unless the caller says where. :meth:`stop` terminates each and joins it within a time limit (then kills it)."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, stderr_log: Path | None = None, **options: Any) -> subprocess.Popen[bytes]:
        """Start ``python ARGS`` with Popen ``options``; ``stderr_log`` names the file its stderr goes to."""
        log = None
        if "stderr" not in options or stderr_log is not None:
            log = stderr_log or self.logs / f"process-{len(self.started)}.stderr"
            with open(log, "ab") as stream:
                process = subprocess.Popen([sys.executable, *args], stderr=stream, **options)
            note_stderr_log(process, log)
        else:
            process = subprocess.Popen([sys.executable, *args], **options)
        self.started.append(process)
        return process

    def stop(self) -> None:
        """Stop every process and close its pipes; write each one's stderr log to this process's stderr (pytest
        shows it when the test failed)."""
        for process in self.started:
            stop(process)
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream is not None:
                    stream.close()
            log = _stderr_logs.get(process)
            if log is not None and log.exists() and log.stat().st_size:
                sys.stderr.write(f"-- stderr of {_command(process)}:\n{log.read_text(errors='replace')}\n")


def environment(*paths: Path, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment plus ``env``, with ``paths`` (default: tests/) before PYTHONPATH, so that a
    child can import the test factories."""
    merged = {**os.environ, **(env or {})}
    merged["PYTHONPATH"] = os.pathsep.join([*map(str, paths or (TESTS,)), os.environ.get("PYTHONPATH", "")])
    return merged


def serve_args(factory: str, *args: str, bind: str = "zrep://127.0.0.1:0", workers: int = 1) -> list[str]:
    """``python`` arguments for a quiet ``tensorcom serve FACTORY`` on ``bind`` with ``workers`` workers."""
    return ["-m", "tensorcom.cli", "serve", factory, "-q", "--bind", bind, "-w", str(workers), *args]


def serve(
    start_process: StartProcess,
    factory: str,
    *args: str,
    workers: int = 1,
    port: int = 0,
    env: Mapping[str, str] | None = None,
    stderr: Any = None,
) -> tuple[subprocess.Popen[bytes], str]:
    """Start `tensorcom serve FACTORY ARGS` on 127.0.0.1 (factories from tests/) and return the process and its
    zreq URL once it is ready. ``stderr``: where its stderr goes (default: a log file shown on failure)."""
    options: dict[str, Any] = {} if stderr is None else {"stderr": stderr}
    process = start_process(
        *serve_args(factory, *args, bind=f"zrep://127.0.0.1:{port}", workers=workers),
        stdout=subprocess.PIPE,
        env=environment(env=env),
        **options,
    )
    return process, wait_ready(process)


# -- batches, bit for bit -------------------------------------------------------------------------------------------


def _is_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "dtype")


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray | np.generic) or _is_tensor(value):
        return f"{type(value).__name__} {value.dtype}{tuple(value.shape)}"
    return type(value).__name__


def _array_difference(left: np.ndarray, right: np.ndarray) -> str | None:
    if left.dtype != right.dtype or left.shape != right.shape:
        return f"{_describe(left)} != {_describe(right)}"
    if left.tobytes() == right.tobytes():
        return None
    left_rows, right_rows = (
        np.ascontiguousarray(a).reshape(-1).view(np.uint8).reshape(a.size, -1) for a in (left, right)
    )
    differ = np.flatnonzero((left_rows != right_rows).any(axis=1))
    first = np.unravel_index(differ[0], left.shape) if left.shape else ()
    return f"{left.dtype}{left.shape}: {differ.size} of {left.size} elements differ, first at {tuple(map(int, first))}"


def _tensor_bytes(tensor: Any) -> np.ndarray:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    import torch

    return flat.view(torch.uint8).numpy() if flat.numel() else np.zeros(0, np.uint8)


def batch_difference(left: Any, right: Any, where: str = "batch") -> str | None:
    """Where and how two batches differ, or None when they are identical bit for bit: the same structure (dicts
    with the same keys in the same order, tuples as tuples, lists as lists), and arrays, numpy scalars and tensors
    of the same type, dtype and shape with the same bytes; other leaves of the same type and equal."""
    if isinstance(left, Mapping):
        if not isinstance(right, Mapping) or list(left) != list(right):
            keys = list(right) if isinstance(right, Mapping) else _describe(right)
            return f"{where}: keys {list(left)} != {keys}"
        for key in left:
            if (found := batch_difference(left[key], right[key], f"{where}[{key!r}]")) is not None:
                return found
        return None
    if isinstance(left, tuple | list):
        if type(left) is not type(right) or len(left) != len(right):
            length = f" of {len(right)}" if isinstance(right, tuple | list) else ""
            return f"{where}: {type(left).__name__} of {len(left)} != {type(right).__name__}{length}"
        for index, (x, y) in enumerate(zip(left, right, strict=True)):
            if (found := batch_difference(x, y, f"{where}[{index}]")) is not None:
                return found
        return None
    if isinstance(left, np.ndarray | np.generic):
        if type(left) is not type(right):
            return f"{where}: {_describe(left)} != {_describe(right)}"
        found = _array_difference(np.asarray(left), np.asarray(right))
        return None if found is None else f"{where}: {found}"
    if _is_tensor(left):
        if type(left) is not type(right) or left.dtype != right.dtype or left.shape != right.shape:
            return f"{where}: {_describe(left)} != {_describe(right)}"
        if np.array_equal(_tensor_bytes(left), _tensor_bytes(right)):
            return None
        return f"{where}: tensors {left.dtype}{tuple(left.shape)} differ"
    if type(left) is not type(right) or left != right:
        return f"{where}: {left!r} != {right!r}"
    return None


def same_batch(left: Any, right: Any) -> bool:
    """Two batches identical bit for bit (see :func:`batch_difference`)."""
    return batch_difference(left, right) is None


def assert_same_batch(left: Any, right: Any, where: str = "batch") -> None:
    """Fail, saying where and how, unless two batches are identical bit for bit."""
    found = batch_difference(left, right, where)
    assert found is None, found


def _batches_difference(left: Sequence[Any], right: Sequence[Any]) -> str | None:
    left, right = list(left), list(right)
    if len(left) != len(right):
        return f"{len(left)} batches != {len(right)} batches"
    for index, (x, y) in enumerate(zip(left, right, strict=True)):
        if (found := batch_difference(x, y, f"batch {index}")) is not None:
            return found
    return None


def same_batches(left: Sequence[Any], right: Sequence[Any]) -> bool:
    """Two sequences of batches of the same length, identical bit for bit in the same order."""
    return _batches_difference(left, right) is None


def assert_same_batches(left: Sequence[Any], right: Sequence[Any]) -> None:
    """Fail, naming the first batch that differs and how, unless two sequences of batches are the same."""
    found = _batches_difference(left, right)
    assert found is None, found


# -- zmq contexts that cannot hang a test ---------------------------------------------------------------------------


class TrackedContext(zmq.Context):
    """A zmq context that keeps every socket it makes, so that teardown can close what a test left open."""

    made: list[zmq.Socket[Any]]

    def __init__(self) -> None:
        super().__init__()
        self.made = []

    def socket(self, socket_type: int, *args: Any, **kwargs: Any) -> zmq.Socket[Any]:
        socket: zmq.Socket[Any] = super().socket(socket_type, *args, **kwargs)
        self.made.append(socket)
        return socket


def describe_socket(socket: zmq.Socket[Any]) -> str:
    """A socket's type and the endpoint it last bound or connected to, e.g. ``PUSH ipc:///tmp/x``."""
    try:
        endpoint = bytes(socket.getsockopt(zmq.LAST_ENDPOINT)).decode() or "(no endpoint)"
        return f"{zmq.SocketType(int(socket.getsockopt(zmq.TYPE))).name} {endpoint}"
    except zmq.ZMQError as error:
        return f"a socket ({error})"


def open_sockets(context: zmq.Context[Any]) -> list[zmq.Socket[Any]]:
    """The sockets of ``context`` not closed yet: those it made (if it tracks them), and any other pyzmq knows of."""
    known = {id(s): s for s in [*getattr(context, "made", ()), *list(getattr(context, "_sockets", ()))]}
    return [s for s in known.values() if not s.closed]


def term_within(context: zmq.Context[Any], seconds: float = TERM_SECONDS) -> None:
    """``term()`` the context within ``seconds``, or fail naming the sockets still open (which keep it waiting)."""
    done, _ = _call_with_time_limit(context.term, seconds)
    if not done:
        still = ", ".join(map(describe_socket, open_sockets(context))) or "none that the context knows of"
        pytest.fail(
            f"context.term() did not return within {seconds:g} s; sockets still open: {still}", pytrace=False
        )


def close_and_term(context: TrackedContext, seconds: float = TERM_SECONDS) -> None:
    """Close the sockets that a test left open, with linger=0, then :func:`term_within`: a socket made after this
    closing pass (by a thread still running) or behind the context's back fails the test instead of hanging it."""
    for socket in open_sockets(context):
        socket.close(linger=0)
    term_within(context, seconds)


# -- processes seen through /proc -----------------------------------------------------------------------------------


def children_of(pid: int) -> list[int]:
    """The direct children of a process (none when it is gone)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            return [int(child) for child in children.read().split()]
    except FileNotFoundError:
        return []


def rss_kib(pid: int, with_children: bool = True) -> int:
    """Resident memory of a process (and its direct children) in KiB."""
    total = 0
    for candidate in [pid, *(children_of(pid) if with_children else [])]:
        try:
            with open(f"/proc/{candidate}/status") as status:
                total += next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))
        except (FileNotFoundError, StopIteration):
            pass
    return total


def process_state(pid: int) -> str | None:
    """The process state letter from /proc (R, S, Z, ...), or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as stream:
            return stream.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def running(pid: int) -> bool:
    """The process exists and is not a zombie."""
    state = process_state(pid)
    return state is not None and state != "Z"


def wait_until_gone(pids: Sequence[int], seconds: float = WAIT_SECONDS, *, reaped: bool = False) -> list[int]:
    """Wait up to ``seconds`` for the processes to stop running (with ``reaped``: to leave the process table,
    zombies included); return those still there."""
    there = (lambda pid: process_state(pid) is not None) if reaped else running
    wait_until(lambda: not [pid for pid in pids if there(pid)], seconds)
    return [pid for pid in pids if there(pid)]


# -- waiting for an event -------------------------------------------------------------------------------------------


def wait_until(
    condition: Callable[[], object], seconds: float = WAIT_SECONDS, interval: float = 0.05
) -> bool:
    """Check ``condition`` every ``interval`` seconds until it is true or ``seconds`` have passed; return whether it
    became true. Tests wait on what they need this way instead of sleeping for a guessed time."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() >= deadline:
            return bool(condition())
        time.sleep(interval)
    return True
