"""``PipelineBuilder``: an SPDL-style pipeline run by an asyncio event loop in a background thread.

::

    pipeline = (
        PipelineBuilder()
        .add_source(range(1000))                  # sequence, iterable, async iterable or tensorcom pipeline
        .pipe(load, concurrency=8)                # sync ops run in a thread pool, async ops on the loop
        .aggregate(32)                            # lists of 32 items (the last one shorter unless drop_last)
        .pipe(collate)
        .add_sink(4)                              # at most 4 finished items wait for the consumer
        .build()
    )
    for batch in pipeline: ...

Threads: one runs the event loop (async ops and the bookkeeping); synchronous ops run on ``num_threads`` op threads
that hand results back in batches; a source that may block (a dataset, a plain iterable, a tensorcom pipeline) is
read ahead by a thread of its own, while ranges, lists, tuples, ``Range`` and ``Permutation`` are read on the loop.
The consumer takes finished items from a thread-safe queue, touching the loop only when the loop waits for room.

The loop starts on the first ``next`` and stops on ``close()``, on leaving a ``with`` block, when a ``for`` loop over
the pipeline ends or breaks, and at garbage collection. ``concurrency=N`` bounds the calls of an op running at once,
whatever stands before it. An exception in an op reaches the consumer as :class:`~tensorcom.errors.PipelineError`
naming the stage and input (the op's exception is its ``__cause__``), in the failed item's place: the pipeline goes
on, and the next ``next`` returns the item after it (under ``aggregate``, the failed item's whole group is
skipped), whatever the source. An exception out of a ``for`` loop leaves the pipeline running for the next loop.

SPDL's face on the same object: ``start()`` / ``stop()``, ``with pipeline.auto_stop():``, ``get_item(timeout=)``
and ``get_iterator(timeout=)`` (``TimeoutError`` when no item comes in time, ``EOFError`` / the iterator's end at
the end); iterating without ``start()`` starts the pipeline (SPDL 0.4 and later). ``stop()`` is final: afterwards
the pipeline yields nothing more (``close()``, tensorcom's own, pauses instead: the next ``next`` continues).
``pipe(max_failures=)`` / ``build(max_failures=)`` drop and log failed items as SPDL does; without them a failure
is raised, as described above. An argument of SPDL's that has no meaning here is a :class:`ConfigError` saying
why, and an unknown one a :class:`ConfigError` naming the known ones.

An op with a parameter named ``rng`` gets a ``numpy.random.Generator`` keyed by (seed, epoch, sample indices), as
``Map`` gives it: the same numbers for the same sample whatever the thread count, concurrency or resume.

State and resume: every source item is numbered as it is read and every message carries the numbers (and the
source state after each) of the items it stands for; the consumer records them, so the state is the source's state
after the last item before which everything was delivered, plus, with ``output_order="completion"``, the few
items delivered beyond it (a resumed run passes over those without computing them). Sequences and tensorcom
pipelines resume and ``skip`` in O(1) (arithmetic); re-iterables and re-iterable async iterables by replay from
their start. One-shot sources (iterators, generators, async generators) are read once: a state loads into a
pipeline over a *fresh* one (the items before it are read and dropped); ``close()`` closes them (a generator's
``finally`` runs) and reading on afterwards, or going back, raises :class:`StateError` saying why.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import difflib
import functools
import inspect
import logging
import math
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal, Protocol

from tensorcom.errors import ConfigError, PipelineError, StateError, Timeout
from tensorcom.pipeline._base import Pipeline, Record
from tensorcom.pipeline.collate import merge_records
from tensorcom.pipeline.map import _function_name
from tensorcom.pipeline.rng import sample_key, sample_rng, validate_seed, wants_rng
from tensorcom.pipeline.sources import IterableSource, Permutation, Range, SequenceSource, as_stage
from tensorcom.pipeline.state import require_int, require_keys

logger = logging.getLogger(__name__)

__all__ = ["BuiltPipeline", "PipelineBuilder"]

_QUEUE_SIZE = 2
_RATE_PROBATION = 100  # calls before a max_failures rate is enforced, as in SPDL
_JOIN_S = 5.0
_POLL_S = 0.5  # how often a blocked thread looks whether the pipeline stopped
_WINDOW_PER_CALL = 4  # completion order: how far (in inputs per concurrent call) an item may overtake another
_MAX_DELIVERED = 1 << 20  # a loaded delivered record larger than this is refused (a real one is far smaller)


# SPDL arguments with no meaning here, and why (an argument in neither list is refused as unknown)
_UNSUPPORTED = {
    "continuous": "a source is read once per built pipeline here; for many epochs add_source(Permutation(n, "
    "repeating=True)) and aggregate per epoch, or build one pipeline per epoch",
    "hooks": "tensorcom has no task hooks; wrap the op instead",
    "kwargs": "bind extra arguments with functools.partial",
    "queue_class": "the queues between stages are tensorcom's own",
    "task_hook_factory": "tensorcom has no task hooks; wrap the op instead",
}
# SPDL arguments accepted for compatibility that change nothing here
_IGNORED = ("report_stats_interval", "stage_id", "use_thread_output_queue")


def _refuse_unknown(where: str, unknown: dict[str, Any], known: Sequence[str]) -> None:
    """Raise a one-line ConfigError for the first argument of ``unknown`` (nothing when it is empty)."""
    if not unknown:
        return
    name = next(iter(unknown))
    if name in _UNSUPPORTED:
        raise ConfigError(f"{where}: {name}= (an SPDL argument) is not supported: {_UNSUPPORTED[name]}")
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"{where} got an unknown argument {name!r}.{hint} Known: {', '.join(known)}")


def _check_max_failures(value: Any) -> int | Fraction | None:
    if value is None or isinstance(value, Fraction) and 0 < value <= 1:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ConfigError(
        f"max_failures must be an int (< 0: no limit) or a Fraction in (0, 1]. Found: {value!r}"
    )


def _check_timeout(value: Any, what: str = "timeout") -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ConfigError(f"{what} must be seconds >= 0 or None. Found: {value!r}")
    return float(value)


def _as_op(op: Any) -> Callable[..., Any]:
    """A callable as it is; a container (dict, list, tuple) stands for its ``__getitem__``, as in SPDL."""
    if not callable(op) and hasattr(op, "__getitem__"):
        return op.__getitem__
    return op


@dataclass(frozen=True)
class _PipeConfig:
    op: Callable[..., Any]
    concurrency: int
    output_order: str
    name: str
    executor: concurrent.futures.Executor | None = None
    max_failures: int | Fraction | None = None
    seed: int | None = None
    wants_rng: bool = field(init=False)

    def __post_init__(self) -> None:
        if not callable(self.op):
            raise ConfigError(f"op must be callable (or a container). Found: {self.op!r}")
        object.__setattr__(self, "wants_rng", wants_rng(self.op))
        if self.seed is not None:
            validate_seed(self.seed)
            if not self.wants_rng:
                raise ConfigError(
                    f"seed= is for ops that take a per-sample generator (a parameter named rng); {self.name} has none"
                )
        if (
            isinstance(self.concurrency, bool)
            or not isinstance(self.concurrency, int)
            or self.concurrency <= 0
        ):
            raise ConfigError(f"concurrency must be an int > 0. Found: {self.concurrency!r}")
        if self.output_order not in ("input", "completion"):
            raise ConfigError(f"output_order must be 'input' or 'completion'. Found: {self.output_order!r}")
        if self.executor is not None:
            if not isinstance(self.executor, concurrent.futures.Executor):
                raise ConfigError(f"executor must be a concurrent.futures.Executor. Found: {self.executor!r}")
            if self.is_async:
                raise ConfigError(f"executor= is for synchronous ops; {self.name} is async")
        _check_max_failures(self.max_failures)

    @property
    def is_async(self) -> bool:
        op = self.op
        if inspect.iscoroutinefunction(op):
            return True
        return not inspect.isroutine(op) and inspect.iscoroutinefunction(type(op).__call__)

    @property
    def on_op_threads(self) -> bool:
        """Whether the op runs on the pipeline's own op threads (synchronous, no executor of its own)."""
        return not self.is_async and self.executor is None


@dataclass(frozen=True)
class _AggregateConfig:
    size: int
    drop_last: bool
    name: str

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size <= 0:
            raise ConfigError(f"aggregate size must be an int > 0. Found: {self.size!r}")


@dataclass(frozen=True)
class _SinkConfig:
    buffer_size: int

    def __post_init__(self) -> None:
        if (
            isinstance(self.buffer_size, bool)
            or not isinstance(self.buffer_size, int)
            or self.buffer_size < 0
        ):
            raise ConfigError(f"buffer_size must be an int >= 0 (0: unbounded). Found: {self.buffer_size!r}")


class PipelineBuilder:
    """Configure a pipeline step by step; ``build()`` returns a :class:`BuiltPipeline`.

    The methods take SPDL's arguments (``add_source(source)``, ``pipe(op, concurrency=, name=, output_order=,
    executor=, max_failures=)``, ``aggregate(n, drop_last=)``, ``add_sink(buffer_size)``, ``build(num_threads=,
    max_failures=)``); the differences are listed in ``tensorcom/pipeline/README.md``.
    """

    def __init__(self) -> None:
        self._source: Any = None
        self._has_source = False
        self._stages: list[_PipeConfig | _AggregateConfig] = []
        self._sink: _SinkConfig | None = None

    def add_source(self, source: Any, **options: Any) -> PipelineBuilder:
        """Items come from ``source``: a sequence, an iterable, an async iterable or a tensorcom pipeline."""
        _refuse_unknown("add_source", options, ["source"])
        if self._has_source:
            raise ConfigError("add_source was already called; a pipeline has one source")
        self._source, self._has_source = source, True
        return self

    def pipe(
        self,
        op: Callable[..., Any],
        concurrency: int = 1,
        output_order: Literal["input", "completion"] = "input",
        name: str | None = None,
        *,
        executor: concurrent.futures.Executor | None = None,
        max_failures: int | Fraction | None = None,
        seed: int | None = None,
        **options: Any,
    ) -> PipelineBuilder:
        """Apply ``op`` (sync or ``async``; a container means its ``__getitem__``) to every item, at most
        ``concurrency`` calls at a time. ``executor`` runs a synchronous op there instead of on the pipeline's op
        threads; ``max_failures`` (an int, negative for no limit, or a Fraction of the calls, enforced from the
        100th call) lets failed items be logged and dropped instead of raised, up to that many (SPDL's meaning).
        An op with a parameter named ``rng`` gets a generator keyed by (seed, epoch, sample indices): ``seed`` if
        given, else the source's (the ``Permutation`` seed; 0 otherwise), as ``Map`` does."""
        _refuse_unknown(
            "pipe", options, ["op", "concurrency", "output_order", "name", "executor", "max_failures", "seed"]
        )
        self._check_open("pipe")
        op = _as_op(op)
        label = name or f"pipe({_function_name(op) if callable(op) else repr(op)})"
        self._stages.append(
            _PipeConfig(
                op,
                concurrency,
                output_order,
                f"{len(self._stages) + 1}:{label}",
                executor,
                _check_max_failures(max_failures),
                seed,
            )
        )
        return self

    def aggregate(self, num_items: int, drop_last: bool = False, **options: Any) -> PipelineBuilder:
        """Group items into lists of ``num_items`` (the last one shorter unless ``drop_last``)."""
        _refuse_unknown("aggregate", options, ["num_items", "drop_last"])
        self._check_open("aggregate")
        self._stages.append(
            _AggregateConfig(num_items, drop_last, f"{len(self._stages) + 1}:aggregate({num_items})")
        )
        return self

    def add_sink(self, buffer_size: int = 3, **options: Any) -> PipelineBuilder:
        """Hold at most ``buffer_size`` finished items for the consumer (0: no limit, as in SPDL)."""
        _refuse_unknown("add_sink", options, ["buffer_size"])
        self._check_open("add_sink")
        self._sink = _SinkConfig(buffer_size)
        return self

    def _check_open(self, what: str) -> None:
        if not self._has_source:
            raise ConfigError(f"{what} needs a source first; call add_source")
        if self._sink is not None:
            raise ConfigError(f"{what} after add_sink; the sink is the last step")

    def build(
        self, num_threads: int | None = None, *, max_failures: int | Fraction | None = None, **options: Any
    ) -> BuiltPipeline:
        """Return the runnable pipeline (nothing starts until ``start()`` or the first item is requested).

        ``max_failures`` applies to every ``pipe`` that does not set its own. SPDL's ``report_stats_interval``,
        ``stage_id`` and ``use_thread_output_queue`` are accepted and change nothing.
        """
        ignored = {name: options.pop(name) for name in _IGNORED if name in options}
        _refuse_unknown("build", options, ["num_threads", "max_failures", *_IGNORED])
        if ignored:
            logger.debug("build: ignoring SPDL options %s", ", ".join(sorted(ignored)))
        if not self._has_source:
            raise ConfigError("build needs a source; call add_source")
        if num_threads is not None and (
            isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads <= 0
        ):
            raise ConfigError(f"num_threads must be an int > 0. Found: {num_threads!r}")
        default_failures = _check_max_failures(max_failures)
        stages = [
            _with_failures(stage, default_failures) if isinstance(stage, _PipeConfig) else stage
            for stage in self._stages
        ]
        sink = self._sink or _SinkConfig(3)
        return BuiltPipeline(self._source, stages, sink, num_threads)


def _with_failures(stage: _PipeConfig, default: int | Fraction | None) -> _PipeConfig:
    if stage.max_failures is not None or default is None:
        return stage
    return dataclasses.replace(stage, max_failures=default)


# -- messages between the stages ---------------------------------------------------------------------------------
#
# Every source item gets a sequence number, counted from where the run started; a message carries the marks
# ``(number, source state after that item)`` of the source items it stands for. The consumer records the marks of
# every message it takes, so the state it reports is the source state after the last item before which everything
# was delivered, plus (for completion order) the items delivered beyond it.

_Mark = tuple[int, dict[str, Any]]


class _End:
    pass


_END = _End()


@dataclass(frozen=True, slots=True)
class _Item:
    record: Record
    marks: tuple[_Mark, ...]


@dataclass(frozen=True, slots=True)
class _Failure:
    """An output item that failed: it takes the item's place, so the items after it keep their places."""

    error: BaseException
    marks: tuple[_Mark, ...]


@dataclass(frozen=True, slots=True)
class _Skipped:
    """Source items that make no output (dropped within ``max_failures``, left over by ``drop_last``, or delivered
    before the state this run resumed from): the consumer records them as done and yields nothing."""

    marks: tuple[_Mark, ...]


_Message = _Item | _End | _Failure | _Skipped


class _Outlet(Protocol):
    """Where a stage puts its output: the next stage's asyncio queue, or the sink."""

    async def put(self, message: _Message, /) -> None: ...


def _source_failure(exc: Exception, marks: tuple[_Mark, ...]) -> _Failure:
    error = PipelineError(f"stage 'source' failed: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return _Failure(error, marks)


def _read(source: Pipeline, seq: int, delivered: bool) -> _Message:
    """Source item ``seq``: the item with its mark; its failure (the source has moved past it); the end; or, for an
    item ``delivered`` before the run started, the mark alone (the item is passed over, not computed)."""
    if delivered:
        source._skip(1)
        return _Skipped(((seq, source._get_state()),))
    try:
        record = source._pull()
    except StopIteration:
        return _END
    except Exception as exc:
        return _source_failure(exc, ((seq, source._get_state()),))
    return _Item(record, ((seq, source._get_state()),))


def _last(message: _Message) -> bool:
    """Whether a source message is its last: the end, or a failure saying the source cannot be read at all."""
    return isinstance(message, _End) or (
        isinstance(message, _Failure) and isinstance(message.error.__cause__, StateError)
    )


def _arithmetic(source: Pipeline) -> bool:
    """Whether pulling ``source`` only computes indices (never blocks), so the event loop may pull it itself."""
    if isinstance(source, SequenceSource):
        return type(source._items) in (range, list, tuple)
    return type(source) in (Range, Permutation)


def _call_with_rng(op: Callable[..., Any], key: int, value: Any) -> Any:
    return op(value, rng=sample_rng(key))


def _runs(offsets: Sequence[int]) -> list[list[int]]:
    """Sorted distinct offsets as ``[first, count]`` runs: the delivered record stays small."""
    runs: list[list[int]] = []
    for offset in offsets:
        if runs and runs[-1][0] + runs[-1][1] == offset:
            runs[-1][1] += 1
        else:
            runs.append([offset, 1])
    return runs


def _offsets(runs: Any, where: str) -> set[int]:
    if not isinstance(runs, list):
        raise StateError(f"{where}: delivered must be a list of [first, count] runs. Found: {runs!r}")
    offsets: set[int] = set()
    for run in runs:
        if (
            not isinstance(run, list | tuple)
            or len(run) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) for v in run)
            or run[0] < 1
            or run[1] < 1
        ):
            raise StateError(f"{where}: each delivered run must be [first >= 1, count >= 1]. Found: {run!r}")
        if run[1] > _MAX_DELIVERED:
            raise StateError(f"{where}: a delivered run of {run[1]} items is more than a state records")
        offsets.update(range(run[0], run[0] + run[1]))
    if len(offsets) > _MAX_DELIVERED:
        raise StateError(f"{where}: {len(offsets)} delivered items is more than a state records")
    return offsets


class _AsyncReplaySource:
    """An async iterable read from its start; ``position`` items are passed over by reading them.

    A one-shot async iterator (an async generator) is read once: it is closed when the run that read it stops, so
    it can start at any position (passing over the items before it) but not continue after a stop."""

    def __init__(self, source: AsyncIterable[Any]) -> None:
        self.source = source
        self.position = 0
        self.one_shot = isinstance(source, AsyncIterator)
        self.started = False

    def check_readable(self) -> None:
        if self.one_shot and self.started:
            raise StateError(
                f"BuiltPipeline: the async source ({type(self.source).__name__}) is a one-shot async iterator, "
                "closed when the pipeline stopped (close(), a break, leaving a with block, load_state or skip after "
                "reading); it cannot be read again. To resume, build the pipeline over a fresh one and load the "
                "saved state, or pass an object whose __aiter__ starts over"
            )

    def set_position(self, position: int) -> None:
        self.check_readable()
        self.position = position

    def config(self) -> dict[str, Any]:
        return {"kind": "AsyncIterable", "type": type(self.source).__qualname__}


class _Doorbell:
    """How the event loop waits for another thread to change a thread-safe queue, without a wake-up per item.

    The loop says it is waiting and only then looks at the queue again, so a change made in between is seen; the
    other thread rings (a loop wake-up) only while the loop says it waits."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._event = asyncio.Event()
        self._waiting = False

    async def wait_while(self, blocked: Callable[[], bool]) -> None:
        """On the loop: wait for a ring if ``blocked()`` still holds once the wait is announced."""
        self._event.clear()
        self._waiting = True
        if blocked():
            await self._event.wait()

    def ring(self) -> None:
        """From another thread: wake the loop if it waits (nothing to do once the loop has closed)."""
        if self._waiting:
            self._waiting = False
            try:
                self._loop.call_soon_threadsafe(self._event.set)
            except RuntimeError:
                pass


class _ToConsumer:
    """The sink: a bounded queue from the event loop to the consumer's thread. The consumer takes items without a
    round trip through the loop, waking the loop only when it waits for room."""

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int) -> None:
        self._queue: queue.Queue[_Message] = queue.Queue(size)
        self._room = _Doorbell(loop)

    async def put(self, message: _Message) -> None:
        while True:
            try:
                self._queue.put_nowait(message)
                return
            except queue.Full:
                await self._room.wait_while(self._queue.full)

    def get(self, timeout: float) -> _Message:
        """The next message; raises ``queue.Empty`` after ``timeout`` seconds without one."""
        message = self._queue.get(timeout=timeout)
        self._room.ring()
        return message


class _FromSource:
    """A thread pulling the (synchronous) source ahead into a bounded queue that the event loop reads.

    The thread wakes the loop only when the loop waits for an item; a source that blocks (a remote or multi-process
    stage) blocks this thread, not the loop."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, source: Pipeline, size: int, delivered: frozenset[int]
    ) -> None:
        self._source = source
        self._delivered = delivered
        self._queue: queue.Queue[_Message] = queue.Queue(size)
        self._ready = _Doorbell(loop)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._pull_all, name="tc-builder-source", daemon=True)
        self._thread.start()

    def _pull_all(self) -> None:
        seq = 0
        while not self._stopped.is_set():
            message = _read(self._source, seq, seq in self._delivered)
            seq += 1
            if not self._offer(message) or isinstance(message, _End):
                return
            if _last(message):
                self._offer(_END)
                return

    def _offer(self, message: _Message) -> bool:
        """Queue a message for the loop, waiting for room; False if the pipeline stopped first."""
        while not self._stopped.is_set():
            try:
                self._queue.put(message, timeout=_POLL_S)
            except queue.Full:
                continue
            self._ready.ring()
            return True
        return False

    async def get(self) -> _Message:
        while True:
            try:
                return self._queue.get_nowait()
            except queue.Empty:
                await self._ready.wait_while(self._queue.empty)

    def stop(self) -> None:
        """Stop pulling; return once the thread no longer touches the source (after the pull in progress)."""
        self._stopped.set()
        self._thread.join(_JOIN_S)
        if self._thread.is_alive():
            logger.warning(
                "the builder's source is still in a read after %.1f s; waiting for it to return", _JOIN_S
            )
            self._thread.join()


@dataclass(slots=True)
class _Job:
    stage: str
    limit: int
    future: asyncio.Future[Any]
    op: Callable[[Any], Any]
    value: Any


class _OpThreads:
    """Threads running synchronous ops, with results handed back to the event loop in batches.

    A thread takes the oldest job whose stage runs fewer calls than its ``concurrency``, so the bound holds here,
    where the calls run, while the loop may queue a few jobs ahead: a thread that finishes one starts the next
    without waiting for the loop. Each result goes into a list; the loop is woken once per batch of results (not
    per result, as with ``run_in_executor``), so cheap ops do not pay a loop round trip each."""

    def __init__(self, loop: asyncio.AbstractEventLoop, count: int) -> None:
        self._loop = loop
        self._jobs: deque[_Job] = deque()
        self._running: dict[str, int] = {}
        self._stopping = False
        self._ready = threading.Condition(threading.Lock())
        self._done: deque[tuple[asyncio.Future[Any], Any, BaseException | None]] = deque()
        self._scheduled = False
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._work, name=f"tc-builder-op-{i}", daemon=True) for i in range(count)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, stage: str, limit: int, op: Callable[[Any], Any], value: Any) -> asyncio.Future[Any]:
        future = self._loop.create_future()
        with self._ready:
            self._jobs.append(_Job(stage, limit, future, op, value))
            self._ready.notify()
        return future

    def _take(self) -> _Job | None:
        """The oldest job that may start now (the lock held), or None when the thread should end."""
        while not self._stopping:
            for i, job in enumerate(self._jobs):
                if job.future.cancelled():
                    del self._jobs[i]
                    break
                if self._running.get(job.stage, 0) < job.limit:
                    del self._jobs[i]
                    self._running[job.stage] = self._running.get(job.stage, 0) + 1
                    return job
            else:
                self._ready.wait()
        return None

    def _work(self) -> None:
        finished: str | None = None  # the stage of the job this thread just ran
        while True:
            with self._ready:
                if (
                    finished is not None
                ):  # the slot it frees goes to the oldest job that may start: no wake-up
                    self._running[finished] -= 1
                job = self._take()
            if job is None:
                return
            finished = job.stage
            result: Any = None
            error: BaseException | None = None
            try:
                result = job.op(job.value)
            except StopIteration as exc:  # a future cannot hold StopIteration, as a generator cannot raise it
                error = RuntimeError(f"op raised StopIteration: {exc!r}")
            except BaseException as exc:
                error = exc
            with self._lock:
                self._done.append((job.future, result, error))
                schedule, self._scheduled = not self._scheduled, True
            del job, result, error  # nothing of this item stays alive while the thread waits
            if schedule:
                try:
                    self._loop.call_soon_threadsafe(self._deliver)
                except RuntimeError:  # the loop has closed: the pipeline stopped
                    return

    def _deliver(self) -> None:
        with self._lock:
            done, self._done = self._done, deque()
            self._scheduled = False
        for future, result, error in done:
            if future.cancelled():
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

    def stop(self) -> None:
        """Let the threads end after the op each is running (they are not waited for)."""
        with self._ready:
            self._stopping = True
            self._jobs.clear()
            self._ready.notify_all()


class _Runner:
    """One run of the pipeline: a thread with an event loop, and the consumer-side handle on its sink.

    ``delivered`` holds the numbers of source items (counted from the source's position when the run starts) that
    were delivered before: they are passed over, not computed (completion order resumes this way)."""

    def __init__(
        self,
        source: Pipeline | _AsyncReplaySource,
        stages: list[_PipeConfig | _AggregateConfig],
        sink: _SinkConfig,
        num_threads: int,
        delivered: frozenset[int],
    ) -> None:
        self._source = source
        self._stages = stages
        self._delivered = delivered
        self._loop = asyncio.new_event_loop()
        # a source that may block (I/O, workers, a dataset's __getitem__) is pulled by its own thread; indices are
        # computed on the loop
        self._pulling = (
            _FromSource(self._loop, source, _QUEUE_SIZE, delivered)
            if isinstance(source, Pipeline) and not _arithmetic(source)
            else None
        )
        self._ops = (
            _OpThreads(self._loop, num_threads)
            if any(isinstance(s, _PipeConfig) and s.on_op_threads for s in stages)
            else None
        )
        self._sink = _ToConsumer(self._loop, sink.buffer_size)
        self._peeked: _Message | None = None
        self._calls: dict[str, int] = {}
        self._failures: dict[str, int] = {}
        self._main: asyncio.Task[None] | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._thread_main, name="tc-builder-loop", daemon=True)
        self._thread.start()
        self._started.wait()

    def _thread_main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._main = self._loop.create_task(self._run())
        self._started.set()
        try:
            self._loop.run_forever()
        finally:
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    async def _run(self) -> None:
        queues: list[asyncio.Queue[_Message]] = [asyncio.Queue(_QUEUE_SIZE) for _ in self._stages]
        outputs: list[_Outlet] = [*queues[1:], self._sink] if queues else []
        tasks = [asyncio.ensure_future(self._produce(queues[0] if queues else self._sink))]
        for stage, inq, outq in zip(self._stages, queues, outputs, strict=True):
            if isinstance(stage, _AggregateConfig):
                tasks.append(asyncio.ensure_future(self._aggregate(stage, inq, outq)))
            elif stage.output_order == "input":
                tasks.append(asyncio.ensure_future(self._pipe_ordered(stage, inq, outq)))
            else:
                tasks.append(asyncio.ensure_future(self._pipe_unordered(stage, inq, outq)))
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _produce(self, out: _Outlet) -> None:
        source = self._source
        if isinstance(source, _AsyncReplaySource):
            await self._produce_async(source, out)
            return
        seq = 0
        while True:
            if self._pulling is not None:
                message = await self._pulling.get()
            else:
                message = _read(source, seq, seq in self._delivered)
                seq += 1
            await out.put(message)
            if isinstance(message, _End):
                return
            if _last(message) and self._pulling is None:
                await out.put(_END)
                return

    async def _produce_async(self, source: _AsyncReplaySource, out: _Outlet) -> None:
        start = source.position
        try:
            iterator = source.source.__aiter__()
        except Exception as exc:
            await out.put(_source_failure(exc, ()))
            await out.put(_END)
            return
        source.started = True
        for read in range(start):  # replay: read from the start up to the position; a failed item counts
            try:
                await iterator.__anext__()
            except StopAsyncIteration:
                await out.put(_END)
                return
            except Exception as exc:
                logger.debug("async source: item %d failed again while replaying: %r", read, exc)
        seq = 0
        while True:
            mark = (seq, {"position": start + seq + 1})
            try:
                value = await iterator.__anext__()
            except StopAsyncIteration:
                break
            except Exception as exc:  # an async generator that raised is finished: the next read ends it
                failure: _Message = _source_failure(exc, (mark,))
                message = _Skipped((mark,)) if seq in self._delivered else failure
            else:
                if seq in self._delivered:
                    message = _Skipped((mark,))
                else:
                    message = _Item(Record(value, 0, (start + seq,)), (mark,))
            seq += 1
            await out.put(message)
        await out.put(_END)

    def _start(self, stage: _PipeConfig, item: _Item) -> asyncio.Future[Any]:
        """Start ``stage.op`` on an item: a task on the loop for async ops, a job for the op threads otherwise."""
        record = item.record
        op: Callable[[Any], Any] = stage.op
        if stage.wants_rng:
            salt = record.salt if stage.seed is None else stage.seed
            op = functools.partial(_call_with_rng, stage.op, sample_key(salt, record.epoch, record.indices))
        if stage.is_async:
            return asyncio.ensure_future(op(record.value))
        if stage.executor is not None:
            return asyncio.wrap_future(stage.executor.submit(op, record.value), loop=self._loop)
        if self._ops is None:  # _Runner starts them whenever a stage has a synchronous op
            raise RuntimeError("no op threads for a synchronous op")
        return self._ops.submit(stage.name, stage.concurrency, op, record.value)

    async def _finish(
        self, stage: _PipeConfig, item: _Item, running: asyncio.Future[Any]
    ) -> _Item | _Failure | _Skipped:
        """The output message of a started op: the new item, a failure naming the stage and input, or (within
        the stage's ``max_failures``) the input's marks alone."""
        self._calls[stage.name] = self._calls.get(stage.name, 0) + 1
        try:
            value = await running
        except Exception as exc:
            index = list(item.record.indices)
            where = index[0] if len(index) == 1 else index
            message = f"stage {stage.name!r} failed on input {where}: {type(exc).__name__}: {exc}"
            if self._tolerated(stage):
                logger.warning("%s (dropped; max_failures=%s)", message, stage.max_failures)
                return _Skipped(item.marks)
            error = PipelineError(message)
            if stage.max_failures is not None:
                error.add_note(f"the stage's max_failures={stage.max_failures} was exceeded")
            error.__cause__ = exc
            return _Failure(error, item.marks)
        return _Item(item.record.with_value(value), item.marks)

    def _tolerated(self, stage: _PipeConfig) -> bool:
        """Count a failure of ``stage``; whether it stays within the stage's ``max_failures``."""
        failures = self._failures[stage.name] = self._failures.get(stage.name, 0) + 1
        limit = stage.max_failures
        if limit is None:
            return False
        if isinstance(limit, Fraction):  # a rate, judged once there are enough calls (SPDL: 100)
            calls = self._calls[stage.name]
            return calls < _RATE_PROBATION or Fraction(failures, calls) <= limit
        return limit < 0 or failures <= limit

    async def _pipe_ordered(self, stage: _PipeConfig, inq: asyncio.Queue[_Message], out: _Outlet) -> None:
        # Started ops wait here in input order (at most ``concurrency`` entries; no task per item). The bound on
        # calls running at once: on the op threads, kept where the calls run (jobs may queue ahead); on the loop or
        # an executor, a call starts only with one of ``concurrency`` slots, given back when it finishes.
        slots = None if stage.on_op_threads else asyncio.Semaphore(stage.concurrency)
        pending: asyncio.Queue[tuple[_Item, asyncio.Future[Any]] | _Message] = asyncio.Queue(
            stage.concurrency
        )

        def give_back(_: asyncio.Future[Any]) -> None:
            if slots is not None:
                slots.release()

        async def feed() -> None:
            while True:
                message = await inq.get()
                if isinstance(message, _Item):
                    if slots is not None:
                        await slots.acquire()
                    running = self._start(stage, message)
                    if slots is not None:
                        running.add_done_callback(give_back)
                    try:
                        await pending.put((message, running))
                    except asyncio.CancelledError:
                        _discard(running)  # nobody will await it
                        raise
                else:
                    await pending.put(message)
                    if isinstance(message, _End):
                        return

        feeder = asyncio.ensure_future(feed())
        try:
            while True:
                entry = await pending.get()
                result = await self._finish(stage, *entry) if isinstance(entry, tuple) else entry
                await out.put(result)
                if isinstance(result, _End):
                    return
        finally:
            feeder.cancel()
            while not pending.empty():
                entry = pending.get_nowait()
                if isinstance(entry, tuple):
                    _discard(entry[1])

    async def _pipe_unordered(self, stage: _PipeConfig, inq: asyncio.Queue[_Message], out: _Outlet) -> None:
        # At most ``concurrency`` calls at once (on the op threads, jobs may queue ahead: the threads keep the
        # bound), and no input starts while one ``window`` inputs before it is still unfinished: an item overtakes
        # a bounded number of others, so the record of what was delivered ahead of the first undelivered item
        # stays bounded.
        slots = asyncio.Semaphore(stage.concurrency * (2 if stage.on_op_threads else 1))
        window = _WINDOW_PER_CALL * stage.concurrency
        running: set[asyncio.Future[None]] = set()
        started: deque[int] = deque()  # numbers of the inputs started and maybe unfinished, in order
        finished: set[int] = set()
        progress = asyncio.Event()
        count = 0

        def first_unfinished() -> int:
            while started and started[0] in finished:
                finished.discard(started.popleft())
            return started[0] if started else count

        async def one(number: int, item: _Item) -> None:
            try:
                await out.put(await self._finish(stage, item, self._start(stage, item)))
            finally:
                slots.release()
                finished.add(number)
                progress.set()

        try:
            while True:
                message = await inq.get()
                if not isinstance(message, _Item):
                    if isinstance(message, _End):
                        await asyncio.gather(*list(running))
                        await out.put(message)
                        return
                    await out.put(message)
                    continue
                while count >= first_unfinished() + window:
                    progress.clear()
                    await progress.wait()
                await slots.acquire()
                started.append(count)
                task = asyncio.ensure_future(one(count, message))
                count += 1
                running.add(task)
                task.add_done_callback(running.discard)
        finally:
            for leftover in list(running):
                leftover.cancel()

    async def _aggregate(self, stage: _AggregateConfig, inq: asyncio.Queue[_Message], out: _Outlet) -> None:
        # A group holds ``size`` places; a failed input holds its place, and the group it falls in fails as a whole
        # once its places are filled, so the groups after it are those of a run without the failure.
        records: list[Record] = []
        marks: list[_Mark] = []
        filled = 0
        error: BaseException | None = None
        while True:
            message = await inq.get()
            if isinstance(message, _Skipped):
                if filled:
                    marks.extend(message.marks)  # kept in the group so that marks reach the consumer in order
                else:
                    await out.put(message)
                continue
            if isinstance(message, _Item | _Failure):
                filled += 1
                marks.extend(message.marks)
                if isinstance(message, _Item):
                    records.append(message.record)
                elif error is None:
                    error = message.error
                if filled < stage.size:
                    continue
                await out.put(_group(records, marks, error))
            else:
                if filled:
                    last: _Message = _group(records, marks, error)
                    await out.put(
                        _Skipped(last.marks) if stage.drop_last and isinstance(last, _Item) else last
                    )
                await out.put(message)
                return
            records, marks, filled, error = [], [], 0, None

    def get(self, on_skipped: Callable[[_Skipped], None]) -> _Item | _Failure | _End:
        """Wait for the next item, failure or end from the sink (the consumer side)."""
        self.wait(None, on_skipped)
        message, self._peeked = self._peeked, None
        if message is None or isinstance(message, _Skipped):
            raise PipelineError("no message after waiting for one")
        return message

    def wait(self, timeout: float | None, on_skipped: Callable[[_Skipped], None]) -> None:
        """Wait until the next item, failure or end is here (it is kept for :meth:`get`), handing the passed-over
        source items to ``on_skipped`` on the way; :class:`Timeout` after ``timeout`` seconds without one (the
        pipeline goes on)."""
        if self._peeked is not None:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = _POLL_S if deadline is None else min(_POLL_S, max(0.0, deadline - time.monotonic()))
            try:
                message = self._sink.get(timeout=left)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise PipelineError("the pipeline's event loop stopped unexpectedly") from None
                if deadline is not None and time.monotonic() >= deadline:
                    raise Timeout(f"the pipeline gave no item within {timeout} s") from None
                continue
            if isinstance(message, _Skipped):
                on_skipped(message)
                continue
            self._peeked = message
            return

    def stop(self) -> None:
        """Stop the event loop (cancelling its tasks and closing async generators), then the source thread (after
        the read in progress), then the op threads (after the op each runs)."""
        if self._thread.is_alive():
            try:
                self._loop.call_soon_threadsafe(self._loop.stop)
            except RuntimeError:
                logger.debug("builder loop already closed")
            self._thread.join(_JOIN_S)
            if self._thread.is_alive():
                logger.warning("builder loop thread did not stop within %.1f s", _JOIN_S)
        if self._pulling is not None:
            self._pulling.stop()
        if self._ops is not None:
            self._ops.stop()


def _discard(future: asyncio.Future[Any]) -> None:
    """Cancel a started op nobody will await; one that already failed has its exception marked as seen."""
    if future.done():
        if not future.cancelled():
            future.exception()
    else:
        future.cancel()


def _group(records: list[Record], marks: list[_Mark], error: BaseException | None) -> _Item | _Failure:
    if error is not None:
        return _Failure(error, tuple(marks))
    record = merge_records(records, [r.value for r in records])
    return _Item(record, tuple(marks))


class BuiltPipeline(Pipeline):
    """A built :class:`PipelineBuilder` pipeline: iterate it; ``state_dict``/``load_state_dict`` (aliases ``state``,
    ``load_state``), ``skip`` and ``fingerprint`` too.

    SPDL's ``Pipeline`` methods work as there: ``start(timeout=)``, ``stop(timeout=)``, ``auto_stop(timeout=)``,
    ``get_item(timeout=)``, ``get_iterator(timeout=)``. Iterating starts the pipeline if ``start()`` was not
    called; ``stop()`` is final (nothing more comes out; the state stays readable), while ``close()`` pauses.
    """

    def __init__(
        self,
        source: Any,
        stages: list[_PipeConfig | _AggregateConfig],
        sink: _SinkConfig,
        num_threads: int | None,
    ) -> None:
        if isinstance(source, AsyncIterable):
            self._source: Pipeline | _AsyncReplaySource = _AsyncReplaySource(source)
        else:
            self._source = as_stage(source)
        self._stages = stages
        self._sink_config = sink
        pipes = [s for s in stages if isinstance(s, _PipeConfig)]
        self._num_threads = num_threads or max(1, sum(s.concurrency for s in pipes if s.on_op_threads))
        self._completion = any(s.output_order == "completion" for s in pipes)
        self._runner: _Runner | None = None
        self._finalizer: weakref.finalize | None = None
        self._ended = False
        self._stopped = False
        self._spent: str | None = None  # why the source cannot go on, once it cannot
        # What the consumer took: the source state after the last item before which everything was delivered
        # (``_low``, the number of the item after it ``_next``), and the items delivered beyond it (number ->
        # state after it; None until the run that passes over it reports it).
        self._low = self._source_state()
        self._next = 0
        self._ahead: dict[int, dict[str, Any] | None] = {}
        self._items_per_output = math.prod(s.size for s in stages if isinstance(s, _AggregateConfig))

    def _source_state(self) -> dict[str, Any]:
        if isinstance(self._source, _AsyncReplaySource):
            return {"position": self._source.position}
        return self._source._get_state()

    def _running(self) -> _Runner:
        if self._runner is None:
            if self._spent is not None:
                raise StateError(self._spent)
            if isinstance(self._source, _AsyncReplaySource):
                self._source.check_readable()
            elif isinstance(self._source, IterableSource):
                self._source._check_readable()
            delivered = frozenset(seq - self._next for seq in self._ahead)
            self._ahead, self._next = dict.fromkeys(delivered), 0
            self._runner = _Runner(
                self._source, self._stages, self._sink_config, self._num_threads, delivered
            )
            self._finalizer = weakref.finalize(self, self._runner.stop)
        return self._runner

    def _record(self, marks: tuple[_Mark, ...]) -> None:
        """Note source items as delivered, and move the low-water mark over those delivered without a gap."""
        for seq, state in marks:
            self._ahead[seq] = state
        while (after := self._ahead.get(self._next)) is not None:
            del self._ahead[self._next]
            self._low, self._next = after, self._next + 1

    def _on_skipped(self, message: _Skipped) -> None:
        self._record(message.marks)

    def _pull(self) -> Record:
        if self._ended or self._stopped:
            raise StopIteration
        message = self._running().get(self._on_skipped)
        if isinstance(message, _End):
            self._stop()
            self._ended = True
            raise StopIteration
        self._record(message.marks)
        if isinstance(message, _Failure):
            raise message.error
        return message.record

    def __iter__(self) -> Iterator[Any]:
        """The rest of the items (SPDL: ``get_iterator()``). Breaking out of the loop (or closing the iterator)
        pauses the pipeline (``close()``); an exception from it (a failed item, a timeout) leaves the pipeline
        running, so the next loop goes on with the next item, whatever the source."""
        return self._iterate(None)

    def _iterate(self, timeout: float | None) -> Iterator[Any]:
        try:
            while True:
                try:
                    value = self.get_item(timeout=timeout)
                except EOFError:
                    break
                yield value
        except GeneratorExit:
            self.close()
            raise
        self.close()

    # -- SPDL's Pipeline methods ---------------------------------------------------------------------------------

    def start(self, *, timeout: float | None = None, **options: Any) -> None:
        """Start the background thread (SPDL). Optional: the first item requested starts it too.

        Raises :class:`PipelineError` (a ``RuntimeError``, as in SPDL) if it is running already or was stopped.
        """
        _refuse_unknown("start", options, ["timeout"])
        _check_timeout(timeout)
        if self._stopped:
            raise PipelineError(
                "the pipeline was stopped; a stopped pipeline does not start again (build a new one)"
            )
        if self._runner is not None:
            raise PipelineError("the pipeline was already started")
        if not self._ended:
            self._running()

    def stop(self, *, timeout: float | None = None, **options: Any) -> None:
        """Stop the background thread (SPDL); safe to call more than once. Final: no item comes out afterwards
        (``get_item`` raises ``EOFError``), while ``state_dict()`` still says where the consumer stopped."""
        _refuse_unknown("stop", options, ["timeout"])
        _check_timeout(timeout)
        self._stopped = True
        self.close()

    @contextlib.contextmanager
    def auto_stop(self, *, timeout: float | None = None, **options: Any) -> Iterator[None]:
        """``with pipeline.auto_stop(): for item in pipeline: ...``: ``start()`` on entry, ``stop()`` on exit."""
        _refuse_unknown("auto_stop", options, ["timeout"])
        self.start(timeout=timeout)
        try:
            yield
        finally:
            self.stop(timeout=timeout)

    def get_item(self, *, timeout: float | None = None, **options: Any) -> Any:
        """The next item (SPDL), starting the pipeline if needed.

        Raises:
            Timeout: (a ``TimeoutError``) no item within ``timeout`` seconds; the pipeline goes on, and the next
                call returns that item.
            EOFError: the pipeline reached its end, or was stopped.
            PipelineError: an op or the source failed on this item; the next call continues after it.
            StateError: the source cannot go on (a one-shot iterator closed by ``close()``).
        """
        _refuse_unknown("get_item", options, ["timeout"])
        limit = _check_timeout(timeout)
        if self._ended or self._stopped:
            raise EOFError("the pipeline reached its end" if self._ended else "the pipeline was stopped")
        if limit is not None:
            self._running().wait(limit, self._on_skipped)
        try:
            return next(self)
        except StopIteration:
            raise EOFError("the pipeline reached its end") from None

    def get_iterator(self, *, timeout: float | None = None, **options: Any) -> Iterator[Any]:
        """An iterator over the rest of the items (SPDL); ``timeout`` applies to each item, as in ``get_item``."""
        _refuse_unknown("get_iterator", options, ["timeout"])
        return self._iterate(_check_timeout(timeout))

    # -- state ---------------------------------------------------------------------------------------------------

    def _stop(self) -> None:
        """Stop the run, if one runs, and put the source back at the low-water mark; a source that cannot go back
        (items were read ahead from a one-shot iterator) is marked spent, with the reason."""
        if self._runner is None:
            return
        if self._finalizer is not None:
            self._finalizer()
        self._runner, self._finalizer = None, None
        try:
            self._set_source_state(self._low)
        except StateError as exc:
            self._spent = f"BuiltPipeline cannot continue after it stopped: {exc}"

    def _set_source_state(self, state: Any) -> None:
        if isinstance(self._source, _AsyncReplaySource):
            state = require_keys(state, ("position",), "BuiltPipeline")
            self._source.set_position(require_int(state, "position", "BuiltPipeline"))
        else:
            self._source._set_state(state)
        self._low = self._source_state()
        self._spent = None

    def _get_state(self) -> dict[str, Any]:
        if not self._completion:
            return dict(self._low)
        delivered = sorted(seq - self._next for seq in self._ahead)
        return {"source": dict(self._low), "delivered": _runs(delivered)}

    def _set_state(self, state: Any) -> None:
        delivered: set[int] = set()
        if self._completion:
            state = require_keys(state, ("source", "delivered"), "BuiltPipeline")
            delivered = _offsets(state["delivered"], "BuiltPipeline")
            state = state["source"]
        self._stop()
        self._ended = False
        self._set_source_state(state)
        self._next, self._ahead = 0, dict.fromkeys(delivered)

    def _skip(self, n: int) -> None:
        if n <= 0:
            return
        if self._completion or (self._runner is not None and self._one_shot()):
            self._drain(n)
            return
        self._stop()
        if self._spent is not None:
            raise StateError(self._spent)
        self._ended = False
        count = n * self._items_per_output
        if isinstance(self._source, _AsyncReplaySource):
            self._source.set_position(self._source.position + count)
        else:
            self._source._skip(count)
        self._low = self._source_state()

    def _one_shot(self) -> bool:
        source = self._source
        return source.one_shot if isinstance(source, _AsyncReplaySource | IterableSource) else False

    def _drain(self, n: int) -> None:
        """Take ``n`` output items (or failures) and drop them: items already in flight cannot be passed over
        arithmetically in completion order or from a one-shot source."""
        for _ in range(n):
            try:
                self._pull()
            except StopIteration:
                return
            except PipelineError:
                continue

    def _config(self) -> dict[str, Any]:
        source = (
            self._source.config() if isinstance(self._source, _AsyncReplaySource) else self._source._config()
        )
        stages: list[dict[str, Any]] = []
        for stage in self._stages:
            if isinstance(stage, _AggregateConfig):
                stages.append({"kind": "aggregate", "size": stage.size, "drop_last": stage.drop_last})
                continue
            config: dict[str, Any] = {"kind": "pipe", "op": _function_name(stage.op)}
            if stage.output_order == "completion":
                config["output_order"] = "completion"
            if stage.wants_rng:
                config["rng"], config["seed"] = True, stage.seed
            stages.append(config)
        return {"kind": "Builder", "source": source, "stages": stages}

    def _close(self) -> None:
        self._stop()
        if isinstance(self._source, Pipeline):
            self._source._close()
