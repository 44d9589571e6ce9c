"""Worker processes for ``DistributedBatchedMap``: one task queue and one result pipe per worker.

Tasks go through a ``multiprocessing.Queue`` (its feeder thread means the caller never blocks on a full pipe);
results come back on a per-worker pipe, so a worker killed mid-write cannot corrupt another worker's results. The
caller waits on the result pipes and the process sentinels together, which is how a dead worker is noticed at once.
Workers exit on a ``None`` task, or by themselves when their parent has gone.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import pickle
import queue
import sys
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from tensorcom.pipeline.rng import sample_rng

logger = logging.getLogger(__name__)

__all__ = ["RemoteFailure", "WorkerDied", "WorkerPool", "default_start_method"]

_PARENT_POLL_S = 0.5
_JOIN_S = 2.0


@dataclass(frozen=True)
class RemoteFailure:
    """What a worker reports when ``fn`` raised: enough to rebuild or describe the exception."""

    type_name: str
    message: str
    traceback: str
    pickled: bytes | None

    def exception(self) -> BaseException | None:
        if self.pickled is None:
            return None
        try:
            exc = pickle.loads(self.pickled)
        except Exception:
            return None
        return exc if isinstance(exc, BaseException) else None


class WorkerDied(Exception):
    """Internal: a worker process ended while it had work (``pending`` holds its task numbers)."""

    def __init__(self, worker: int, exitcode: int | None, pending: list[int]) -> None:
        super().__init__(worker, exitcode, pending)
        self.worker, self.exitcode, self.pending = worker, exitcode, pending


def default_start_method() -> str:
    """``forkserver`` where available (safe with threads, fast after the first start), else ``spawn``."""
    methods = multiprocessing.get_all_start_methods()
    return "forkserver" if "forkserver" in methods and sys.platform != "darwin" else "spawn"


def _worker_main(fn: Callable[..., Any], tasks: Any, results: Connection) -> None:
    parent = multiprocessing.parent_process()
    while True:
        try:
            task = tasks.get(timeout=_PARENT_POLL_S)
        except queue.Empty:
            if parent is not None and not parent.is_alive():
                return
            continue
        if task is None:
            return
        seq, value, key = task
        try:
            out = fn(value) if key is None else fn(value, rng=sample_rng(key))
            message: tuple[int, bool, Any] = (seq, True, out)
        except BaseException as exc:
            message = (seq, False, _failure(exc))
        try:
            results.send(message)
        except Exception as exc:
            results.send((seq, False, _failure(exc, "the result could not be sent back: ")))


def _failure(exc: BaseException, prefix: str = "") -> RemoteFailure:
    pickled: bytes | None = None
    try:
        data = pickle.dumps(exc)
        pickle.loads(data)
        pickled = data
    except Exception:
        logger.debug("exception %r does not survive pickling", exc, exc_info=True)
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return RemoteFailure(type(exc).__qualname__, prefix + str(exc), text, pickled)


def _stop(processes: list[BaseProcess], task_queues: list[Any], connections: list[Connection]) -> None:
    for q in task_queues:
        try:
            q.put_nowait(None)
        except Exception:
            logger.debug("could not send stop to a worker queue", exc_info=True)
    for proc in processes:
        proc.join(timeout=_JOIN_S)
        if proc.exitcode is None:
            proc.terminate()
            proc.join(timeout=_JOIN_S)
        if proc.exitcode is None:
            proc.kill()
            proc.join(timeout=_JOIN_S)
    for q in task_queues:
        q.cancel_join_thread()
        q.close()
    for conn in connections:
        conn.close()
    for proc in processes:
        if proc.exitcode is not None:
            proc.close()


class WorkerPool:
    """``n_workers`` processes running ``fn``; tasks are numbered and results come back tagged with the number."""

    def __init__(self, fn: Callable[..., Any], n_workers: int, name: str, start_method: str | None) -> None:
        ctx: Any = multiprocessing.get_context(start_method or default_start_method())
        self.name = name
        self._processes: list[BaseProcess] = []
        self._queues: list[Any] = []
        self._connections: list[Connection] = []
        self._pending: list[set[int]] = []
        self._alive: list[bool] = []
        self._finalizer = weakref.finalize(self, _stop, self._processes, self._queues, self._connections)
        for i in range(n_workers):
            tasks = ctx.Queue()
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_worker_main, args=(fn, tasks, writer), name=f"{name}-worker-{i}", daemon=True
            )
            self._queues.append(tasks)
            self._connections.append(reader)
            self._pending.append(set())
            self._alive.append(True)
            proc.start()
            writer.close()
            self._processes.append(proc)
        logger.debug("%s: started %d worker processes", name, n_workers)

    @property
    def alive(self) -> int:
        """Number of workers not known to have died."""
        return sum(self._alive)

    def submit(self, seq: int, value: Any, key: int | None) -> None:
        candidates = [i for i in range(len(self._pending)) if self._alive[i]]
        if not candidates:
            raise WorkerDied(-1, None, [seq])
        worker = min(candidates, key=lambda i: len(self._pending[i]))
        self._pending[worker].add(seq)
        self._queues[worker].put((seq, value, key))

    def wait(self, timeout: float | None) -> tuple[list[tuple[int, bool, Any]], list[WorkerDied]]:
        """Return the results that are ready (none after ``timeout``) and the workers found dead since last time."""
        live = [i for i in range(len(self._processes)) if self._alive[i]]
        sentinels = {self._processes[i].sentinel: i for i in live}
        conns = {id(self._connections[i]): i for i in live}
        ready = multiprocessing.connection.wait([*(self._connections[i] for i in live), *sentinels], timeout)
        out: list[tuple[int, bool, Any]] = []
        dead: set[int] = set()
        for obj in ready:
            if isinstance(obj, Connection):
                worker = conns[id(obj)]
                try:
                    while obj.poll():
                        out.append(self._received(worker, obj.recv()))
                except (EOFError, OSError):
                    dead.add(worker)
            elif isinstance(obj, int):
                dead.add(sentinels[obj])
        deaths = []
        for worker in sorted(dead):
            conn = self._connections[worker]
            try:
                while conn.poll():
                    out.append(self._received(worker, conn.recv()))
            except (EOFError, OSError):
                pass
            proc = self._processes[worker]
            proc.join(timeout=0.5)
            self._alive[worker] = False
            deaths.append(WorkerDied(worker, proc.exitcode, sorted(self._pending[worker])))
            logger.debug("%s: worker %d died with exit code %s", self.name, worker, proc.exitcode)
        return out, deaths

    def _received(self, worker: int, message: tuple[int, bool, Any]) -> tuple[int, bool, Any]:
        self._pending[worker].discard(message[0])
        return message

    def close(self) -> None:
        self._finalizer()
        logger.debug("%s: worker processes stopped", self.name)
