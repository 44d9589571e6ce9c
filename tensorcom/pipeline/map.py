"""``Map`` (in process) and ``DistributedBatchedMap`` (worker processes, results in input order).

Both apply ``fn`` to every item. When ``fn`` declares a parameter named ``rng`` it also receives a
``numpy.random.Generator`` keyed by (seed, epoch, sample indices), so an augmentation draws the same numbers for the
same sample whichever process computes it. The seed is the stage's ``seed`` if given, else the source's (the
``Permutation`` seed; 0 for ``Range``). Both stages have the same fingerprint for the same ``fn`` and seed: a state
saved with one loads into the other.

``DistributedBatchedMap`` keeps up to ``buffer_size`` items in flight (default ``4 * n_workers``) and delivers them
in input order. Its state is the stream state as of the last item *delivered*, not prefetched, so neither
``n_workers`` nor ``buffer_size`` changes anything that can be saved or resumed. ``fn`` must be picklable (a
module-level function or a ``functools.partial`` of one).
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from tensorcom.errors import ConfigError, PipelineError, WorkerError
from tensorcom.pipeline._base import Record, Transform
from tensorcom.pipeline._worker import RemoteFailure, WorkerDied, WorkerPool
from tensorcom.pipeline.rng import sample_key, sample_rng, validate_seed, wants_rng

logger = logging.getLogger(__name__)

__all__ = ["DistributedBatchedMap", "Map"]

_name_counter = itertools.count()


def _function_name(fn: Callable[..., Any]) -> str:
    """``module.qualname`` of a map function, for fingerprints: the same in every process (a script's functions are
    in ``__main__`` there and in ``__mp_main__`` in the processes multiprocessing spawns)."""
    inner = getattr(fn, "func", fn)
    module = getattr(inner, "__module__", None) or type(inner).__module__
    qualname = getattr(inner, "__qualname__", None) or type(inner).__qualname__
    return f"{'__main__' if module == '__mp_main__' else module}.{qualname}"


def _describe(record: Record) -> str:
    indices = list(record.indices)
    shown = indices if len(indices) <= 8 else [*indices[:8], "..."]
    return f"sample index {shown[0] if len(indices) == 1 else shown} of epoch {record.epoch}"


class _MapBase(Transform):
    def __init__(self, fn: Callable[..., Any], seed: int | None, name: str | None) -> None:
        if not callable(fn):
            raise ConfigError(f"fn must be callable. Found: {fn!r}")
        self._fn = fn
        self._wants_rng = wants_rng(fn)
        self._seed = None if seed is None else validate_seed(seed)
        self._name = name or f"{type(self).__name__}({_function_name(fn)})"

    @property
    def stage_name(self) -> str:
        return self._name

    def _key(self, record: Record) -> int | None:
        if not self._wants_rng:
            return None
        salt = record.salt if self._seed is None else self._seed
        return sample_key(salt, record.epoch, record.indices)

    def _own_config(self) -> dict[str, Any]:
        return {"kind": "Map", "fn": _function_name(self._fn), "seed": self._seed, "rng": self._wants_rng}


class Map(_MapBase):
    """Apply ``fn`` to every item in the calling thread.

    An exception from ``fn`` propagates unchanged with a note naming the stage and the sample; the stream then
    continues after that item.
    """

    def __init__(self, fn: Callable[..., Any], seed: int | None = None, name: str | None = None) -> None:
        super().__init__(fn, seed, name)

    def _pull(self) -> Record:
        record = self.upstream._pull()
        key = self._key(record)
        try:
            value = self._fn(record.value) if key is None else self._fn(record.value, rng=sample_rng(key))
        except StopIteration as exc:
            raise PipelineError(
                f"stage {self.stage_name!r} raised StopIteration on {_describe(record)}"
            ) from exc
        except Exception as exc:
            exc.add_note(f"in stage {self.stage_name!r} on {_describe(record)}")
            raise
        return record.with_value(value)

    def _skip(self, n: int) -> None:
        self.upstream._skip(n)

    def _remaining(self) -> float | None:
        return self.upstream._remaining()


@dataclass
class _InFlight:
    seq: int
    record: Record
    state_before: dict[str, Any]


class DistributedBatchedMap(_MapBase):
    """Apply ``fn`` in ``n_workers`` worker processes and deliver the results in input order.

    A failure in ``fn`` raises :class:`~tensorcom.errors.WorkerError` in the caller naming the stage and the input
    (the remote traceback is attached as a note; the original exception is the ``__cause__`` when it pickles). A
    worker that dies, or no result within ``timeout`` seconds, raises :class:`~tensorcom.errors.WorkerError` too,
    after the items before the lost one have been delivered, and stops every worker (the next pull starts new
    ones). In every case the stream then continues after the failed item; to retry it instead, ``load_state`` a
    state saved before it. ``close()`` (also at garbage collection and interpreter exit) stops every worker.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        n_workers: int,
        buffer_size: int | None = None,
        timeout: float | None = 300.0,
        seed: int | None = None,
        start_method: str | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(fn, seed, name)
        if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers <= 0:
            raise ConfigError(f"n_workers must be an int > 0. Found: {n_workers!r}")
        if buffer_size is None:
            buffer_size = 4 * n_workers
        if isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size <= 0:
            raise ConfigError(f"buffer_size must be an int > 0. Found: {buffer_size!r}")
        if timeout is not None and not timeout > 0:
            raise ConfigError(f"timeout must be > 0 seconds or None. Found: {timeout!r}")
        self.n_workers = n_workers
        self.buffer_size = buffer_size
        self.timeout = timeout
        self._start_method = start_method
        self._pool: WorkerPool | None = None
        self._inflight: collections.deque[_InFlight] = collections.deque()
        self._results: dict[int, tuple[bool, Any]] = {}
        self._abandoned: set[int] = set()
        self._lost: dict[int, WorkerDied] = {}
        self._seq = 0
        self._exhausted = False
        self._pending_error: tuple[BaseException, dict[str, Any]] | None = None

    # -- prefetching ---------------------------------------------------------------------------------------------

    def _fill(self) -> None:
        upstream = self.upstream
        if self._pool is not None and self._pool.alive < self.n_workers and not self._inflight:
            self._close()
        while (
            len(self._inflight) < self.buffer_size
            and not self._exhausted
            and self._pending_error is None
            and not self._lost
            and (self._pool is None or self._pool.alive == self.n_workers)
        ):
            state_before = upstream._get_state()
            try:
                record = upstream._pull()
            except StopIteration:
                self._exhausted = True
                break
            except Exception as exc:
                if not self._inflight:
                    raise
                self._pending_error = (exc, state_before)
                break
            if self._pool is None:
                self._pool = WorkerPool(self._fn, self.n_workers, self.stage_name, self._start_method)
            seq = self._seq
            self._seq += 1
            self._pool.submit(seq, record.value, self._key(record))
            self._inflight.append(_InFlight(seq, record.with_value(None), state_before))

    def _pull(self) -> Record:
        self._fill()
        if not self._inflight:
            if self._pending_error is not None:
                exc, _ = self._pending_error
                self._pending_error = None
                raise exc
            raise StopIteration
        head = self._inflight[0]
        ok, payload = self._await(head)
        self._inflight.popleft()
        if ok:
            return head.record.with_value(payload)
        failure: RemoteFailure = payload
        error = WorkerError(
            f"stage {self.stage_name!r} failed on input #{head.seq} ({_describe(head.record)}): "
            f"{failure.type_name}: {failure.message}"
        )
        error.add_note(f"remote traceback:\n{failure.traceback}")
        raise error from failure.exception()

    def _await(self, head: _InFlight) -> tuple[bool, Any]:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        pool = self._pool
        if pool is None:
            raise PipelineError(f"stage {self.stage_name!r}: items in flight but no workers")
        while head.seq not in self._results:
            if head.seq in self._lost:
                died = self._lost[head.seq]
                self._fail(head, f"worker process {died.worker} died (exit code {died.exitcode})")
            if pool.alive == 0:
                self._fail(head, "every worker process died")
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                self._fail(head, f"no result within timeout={self.timeout} s")
            messages, deaths = pool.wait(left)
            for died in deaths:
                if not died.pending:
                    logger.warning(
                        "%s: idle worker %d died (exit code %s)", self.stage_name, died.worker, died.exitcode
                    )
                for seq in died.pending:
                    self._lost[seq] = died
            for seq, ok, payload in messages:
                if seq in self._abandoned:
                    self._abandoned.discard(seq)
                else:
                    self._results[seq] = (ok, payload)
        return self._results.pop(head.seq)

    def _fail(self, head: _InFlight, why: str) -> NoReturn:
        """Stop the workers, move past the lost item (as for any failed item), and raise WorkerError."""
        state = head.state_before
        self._reset()
        self.upstream._set_state(state)
        self.upstream._skip(1)
        raise WorkerError(
            f"stage {self.stage_name!r}: {why} while computing input #{head.seq} ({_describe(head.record)})"
        )

    # -- state ---------------------------------------------------------------------------------------------------

    def _abandon_all(self) -> None:
        for item in self._inflight:
            if item.seq in self._results:
                del self._results[item.seq]
            else:
                self._abandoned.add(item.seq)
        self._inflight.clear()
        self._exhausted = False
        self._pending_error = None

    def _reset(self) -> None:
        self._abandon_all()
        self._close()

    def _get_state(self) -> dict[str, Any]:
        if self._inflight:
            return self._inflight[0].state_before
        if self._pending_error is not None:
            return self._pending_error[1]
        return self.upstream._get_state()

    def _set_state(self, state: Any) -> None:
        self._abandon_all()
        self.upstream._set_state(state)

    def _set_epoch(self, epoch: int) -> None:
        self._abandon_all()
        self.upstream._set_epoch(epoch)

    def _skip(self, n: int) -> None:
        while n > 0 and self._inflight:
            item = self._inflight.popleft()
            if self._results.pop(item.seq, None) is None:
                self._abandoned.add(item.seq)
            n -= 1
        if n > 0:
            if self._pending_error is not None:
                self.upstream._set_state(self._pending_error[1])
                self._pending_error = None
            self._exhausted = False
            self.upstream._skip(n)

    def _remaining(self) -> float | None:
        upstream = self.upstream._remaining()
        return None if upstream is None else upstream + len(self._inflight)

    def _close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        self._abandoned.clear()
        self._lost.clear()
        self._results.clear()
        if self._inflight:
            state = self._inflight[0].state_before
            self._inflight.clear()
            self.upstream._set_state(state)
        self._exhausted = False
