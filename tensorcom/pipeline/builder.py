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
the pipeline ends or breaks, and at garbage collection. An exception in an op stops the pipeline and reaches the
consumer as :class:`~tensorcom.errors.PipelineError` naming the stage and input (the op's exception is its
``__cause__``), after the items that came before it; the next ``next`` starts the pipeline again after the
failed output item (load a saved state to retry it instead).

SPDL's face on the same object: ``start()`` / ``stop()``, ``with pipeline.auto_stop():``, ``get_item(timeout=)``
and ``get_iterator(timeout=)`` (``TimeoutError`` when no item comes in time, ``EOFError`` / the iterator's end at
the end); iterating without ``start()`` starts the pipeline (SPDL 0.4 and later). ``stop()`` is final: afterwards
the pipeline yields nothing more (``close()``, tensorcom's own, pauses instead: the next ``next`` continues).
``pipe(max_failures=)`` / ``build(max_failures=)`` drop and log failed items as SPDL does; without them a failure
is raised, as described above. An argument of SPDL's that has no meaning here is a :class:`ConfigError` saying
why, and an unknown one a :class:`ConfigError` naming the known ones.

State and resume: the state is the source's state as of the last item delivered to the consumer. Sequences and
tensorcom pipelines resume and ``skip`` in O(1) (arithmetic); plain iterables and async iterables resume by replay
from their start. With ``output_order="completion"`` items leave a stage out of order, so ``state()`` refuses (no
exact resume point exists); use ``"input"`` (the default) where resume matters.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import difflib
import inspect
import logging
import math
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterable, Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal, Protocol

from tensorcom.errors import ConfigError, PipelineError, StateError, Timeout
from tensorcom.pipeline._base import Pipeline, Record
from tensorcom.pipeline.collate import merge_records
from tensorcom.pipeline.map import _function_name
from tensorcom.pipeline.sources import Permutation, Range, SequenceSource, as_stage
from tensorcom.pipeline.state import require_int, require_keys

logger = logging.getLogger(__name__)

__all__ = ["BuiltPipeline", "PipelineBuilder"]

_QUEUE_SIZE = 2
_RATE_PROBATION = 100  # calls before a max_failures rate is enforced, as in SPDL
_JOIN_S = 5.0
_POLL_S = 0.5  # how often a blocked thread looks whether the pipeline stopped


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

    def __post_init__(self) -> None:
        if not callable(self.op):
            raise ConfigError(f"op must be callable (or a container). Found: {self.op!r}")
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
        **options: Any,
    ) -> PipelineBuilder:
        """Apply ``op`` (sync or ``async``; a container means its ``__getitem__``) to every item, ``concurrency``
        items at a time. ``executor`` runs a synchronous op there instead of on the pipeline's op threads;
        ``max_failures`` (an int, negative for no limit, or a Fraction of the calls, enforced from the 100th call)
        lets failed items be logged and dropped instead of raised, up to that many (SPDL's meaning)."""
        _refuse_unknown(
            "pipe", options, ["op", "concurrency", "output_order", "name", "executor", "max_failures"]
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
    return _PipeConfig(stage.op, stage.concurrency, stage.output_order, stage.name, stage.executor, default)


class _End:
    pass


_END = _End()


@dataclass(frozen=True)
class _Item:
    record: Record
    state_after: dict[str, Any]


@dataclass(frozen=True)
class _Failure:
    error: BaseException


class _Dropped:
    """What a pipe stage makes of an input whose op failed within ``max_failures``: nothing goes downstream."""


_DROPPED = _Dropped()

_Message = _Item | _End | _Failure


class _Outlet(Protocol):
    """Where a stage puts its output: the next stage's asyncio queue, or the sink."""

    async def put(self, message: _Message, /) -> None: ...


class _AsyncReplaySource:
    """An async iterable read from its start; ``position`` items are skipped by reading them."""

    def __init__(self, source: AsyncIterable[Any]) -> None:
        self.source = source
        self.position = 0
        self.started = False

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

    def __init__(self, loop: asyncio.AbstractEventLoop, source: Pipeline, size: int) -> None:
        self._source = source
        self._queue: queue.Queue[_Message] = queue.Queue(size)
        self._ready = _Doorbell(loop)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._pull_all, name="tc-builder-source", daemon=True)
        self._thread.start()

    def _pull_all(self) -> None:
        while not self._stopped.is_set():
            message = _pulled(self._source)
            while not self._stopped.is_set():
                try:
                    self._queue.put(message, timeout=_POLL_S)
                    break
                except queue.Full:
                    continue
            self._ready.ring()
            if not isinstance(message, _Item):
                return

    async def get(self) -> _Message:
        while True:
            try:
                return self._queue.get_nowait()
            except queue.Empty:
                await self._ready.wait_while(self._queue.empty)

    def stop(self) -> None:
        """Stop pulling; return once the thread no longer touches the source (after the pull in progress)."""
        self._stopped.set()
        self._thread.join()


class _OpThreads:
    """Threads running synchronous ops, with results handed back to the event loop in batches.

    Each result goes into a list; the loop is woken once per batch of results (not per result, as with
    ``run_in_executor``), so cheap ops do not pay a loop round trip each."""

    def __init__(self, loop: asyncio.AbstractEventLoop, count: int) -> None:
        self._loop = loop
        self._tasks: queue.SimpleQueue[tuple[asyncio.Future[Any], Callable[[Any], Any], Any] | None] = (
            queue.SimpleQueue()
        )
        self._done: deque[tuple[asyncio.Future[Any], Any, BaseException | None]] = deque()
        self._scheduled = False
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._work, name=f"tc-builder-op-{i}", daemon=True) for i in range(count)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, op: Callable[[Any], Any], value: Any) -> asyncio.Future[Any]:
        future = self._loop.create_future()
        self._tasks.put((future, op, value))
        return future

    def _work(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            future, op, value = task
            if future.cancelled():
                continue
            result: Any = None
            error: BaseException | None = None
            try:
                result = op(value)
            except StopIteration as exc:  # a future cannot hold StopIteration, as a generator cannot raise it
                error = RuntimeError(f"op raised StopIteration: {exc!r}")
            except BaseException as exc:
                error = exc
            with self._lock:
                self._done.append((future, result, error))
                schedule, self._scheduled = not self._scheduled, True
            del task, future, value, result, error  # nothing of this item stays alive while the thread waits
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
        while True:
            try:
                self._tasks.get_nowait()
            except queue.Empty:
                break
        for _ in self._threads:
            self._tasks.put(None)


class _Runner:
    """One run of the pipeline: a thread with an event loop, and the consumer-side handle on its sink."""

    def __init__(
        self,
        source: Pipeline | _AsyncReplaySource,
        stages: list[_PipeConfig | _AggregateConfig],
        sink: _SinkConfig,
        num_threads: int,
    ) -> None:
        self._source = source
        self._stages = stages
        self._loop = asyncio.new_event_loop()
        # a source that may block (I/O, workers, a dataset's __getitem__) is pulled by its own thread; indices are
        # computed on the loop
        self._pulling = (
            _FromSource(self._loop, source, _QUEUE_SIZE)
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
        try:
            if isinstance(source, _AsyncReplaySource):
                iterator = source.source.__aiter__()
                if iterator is source.source and source.started:
                    raise StateError(
                        "an async generator (or other one-shot async iterator) cannot be replayed to resume or skip; "
                        "pass an object whose __aiter__ returns a fresh iterator"
                    )
                source.started = True
                for _ in range(source.position):
                    await iterator.__anext__()
                position = source.position
                async for value in _rest(iterator):
                    position += 1
                    await out.put(_Item(Record(value, 0, (position - 1,)), {"position": position}))
            else:
                while True:
                    message = await self._pulling.get() if self._pulling is not None else _pulled(source)
                    await out.put(message)
                    if not isinstance(message, _Item):
                        return  # the source's end, or its failure
        except StopAsyncIteration:
            pass
        except Exception as exc:
            await out.put(_source_failure(exc))
            return
        await out.put(_END)

    def _start(self, stage: _PipeConfig, item: _Item) -> asyncio.Future[Any]:
        """Start ``stage.op`` on an item: a task on the loop for async ops, a job for the op threads otherwise."""
        if stage.is_async:
            return asyncio.ensure_future(stage.op(item.record.value))
        if stage.executor is not None:
            return asyncio.wrap_future(stage.executor.submit(stage.op, item.record.value), loop=self._loop)
        if self._ops is None:  # _Runner starts them whenever a stage has a synchronous op
            raise RuntimeError("no op threads for a synchronous op")
        return self._ops.submit(stage.op, item.record.value)

    async def _finish(
        self, stage: _PipeConfig, item: _Item, running: asyncio.Future[Any]
    ) -> _Message | _Dropped:
        """The output message of a started op: the new item, a failure naming the stage and input, or (within
        the stage's ``max_failures``) nothing."""
        self._calls[stage.name] = self._calls.get(stage.name, 0) + 1
        try:
            value = await running
        except Exception as exc:
            index = list(item.record.indices)
            where = index[0] if len(index) == 1 else index
            message = f"stage {stage.name!r} failed on input {where}: {type(exc).__name__}: {exc}"
            if self._tolerated(stage):
                logger.warning("%s (dropped; max_failures=%s)", message, stage.max_failures)
                return _DROPPED
            error = PipelineError(message)
            if stage.max_failures is not None:
                error.add_note(f"the stage's max_failures={stage.max_failures} was exceeded")
            error.__cause__ = exc
            return _Failure(error)
        return _Item(item.record.with_value(value), item.state_after)

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

    async def _apply(self, stage: _PipeConfig, item: _Item) -> _Message | _Dropped:
        return await self._finish(stage, item, self._start(stage, item))

    async def _pipe_ordered(self, stage: _PipeConfig, inq: asyncio.Queue[_Message], out: _Outlet) -> None:
        # started ops in input order, at most ``concurrency`` waiting here (no task per item: the futures are awaited
        # in turn)
        pending: asyncio.Queue[tuple[_Item, asyncio.Future[Any]] | _End | _Failure] = asyncio.Queue(
            stage.concurrency
        )

        async def feed() -> None:
            while True:
                message = await inq.get()
                if isinstance(message, _Item):
                    await pending.put((message, self._start(stage, message)))
                else:
                    await pending.put(message)
                    return

        feeder = asyncio.ensure_future(feed())
        try:
            while True:
                entry = await pending.get()
                result = await self._finish(stage, *entry) if isinstance(entry, tuple) else entry
                if isinstance(result, _Dropped):
                    continue
                await out.put(result)
                if not isinstance(result, _Item):
                    return
        finally:
            feeder.cancel()
            while not pending.empty():
                entry = pending.get_nowait()
                if isinstance(entry, tuple):
                    _discard(entry[1])

    async def _pipe_unordered(self, stage: _PipeConfig, inq: asyncio.Queue[_Message], out: _Outlet) -> None:
        slots = asyncio.Semaphore(stage.concurrency)
        running: set[asyncio.Future[None]] = set()
        failed = asyncio.Event()

        async def one(item: _Item) -> None:
            try:
                result = await self._apply(stage, item)
                if isinstance(result, _Dropped):
                    return
                if isinstance(result, _Failure):
                    failed.set()
                await out.put(result)
            finally:
                slots.release()

        try:
            while not failed.is_set():
                message = await inq.get()
                if not isinstance(message, _Item):
                    await asyncio.gather(*running)
                    if not failed.is_set():
                        await out.put(message)
                    return
                await slots.acquire()
                task = asyncio.ensure_future(one(message))
                running.add(task)
                task.add_done_callback(running.discard)
        finally:
            for leftover in list(running):
                leftover.cancel()

    async def _aggregate(self, stage: _AggregateConfig, inq: asyncio.Queue[_Message], out: _Outlet) -> None:
        group: list[_Item] = []
        while True:
            message = await inq.get()
            if isinstance(message, _Item):
                group.append(message)
                if len(group) == stage.size:
                    await out.put(_group(group))
                    group = []
                continue
            if isinstance(message, _End) and group and not stage.drop_last:
                await out.put(_group(group))
            await out.put(message)
            return

    def get(self) -> _Message:
        """Wait for the next message from the sink (the consumer side)."""
        self.wait(None)
        message, self._peeked = self._peeked, None
        if message is None:
            raise PipelineError("no message after waiting for one")
        return message

    def wait(self, timeout: float | None) -> None:
        """Wait until the next message is here (it is kept for :meth:`get`); :class:`Timeout` after ``timeout``
        seconds without one (the pipeline goes on)."""
        if self._peeked is not None:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = _POLL_S if deadline is None else min(_POLL_S, max(0.0, deadline - time.monotonic()))
            try:
                self._peeked = self._sink.get(timeout=left)
                return
            except queue.Empty:
                if not self._thread.is_alive():
                    raise PipelineError("the pipeline's event loop stopped unexpectedly") from None
                if deadline is not None and time.monotonic() >= deadline:
                    raise Timeout(f"the pipeline gave no item within {timeout} s") from None

    def stop(self) -> None:
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


async def _rest(iterator: Any) -> Any:
    while True:
        try:
            value = await iterator.__anext__()
        except StopAsyncIteration:
            return
        yield value


def _pulled(source: Pipeline) -> _Message:
    """The source's next item with its state after it; its end; or its failure as a :class:`PipelineError`."""
    try:
        record = source._pull()
    except StopIteration:
        return _END
    except Exception as exc:
        return _source_failure(exc)
    return _Item(record, source._get_state())


def _source_failure(exc: Exception) -> _Failure:
    error = PipelineError(f"stage 'source' failed: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return _Failure(error)


def _arithmetic(source: Pipeline) -> bool:
    """Whether pulling ``source`` only computes indices (never blocks), so the event loop may pull it itself."""
    if isinstance(source, SequenceSource):
        return type(source._items) in (range, list, tuple)
    return type(source) in (Range, Permutation)


def _group(items: list[_Item]) -> _Item:
    record = merge_records([i.record for i in items], [i.record.value for i in items])
    return _Item(record, items[-1].state_after)


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
        self._runner: _Runner | None = None
        self._finalizer: weakref.finalize | None = None
        self._ended = False
        self._stopped = False
        self._delivered = self._source_state()
        self._items_per_output = math.prod(s.size for s in stages if isinstance(s, _AggregateConfig))

    def _source_state(self) -> dict[str, Any]:
        if isinstance(self._source, _AsyncReplaySource):
            return {"position": self._source.position}
        return self._source._get_state()

    def _running(self) -> _Runner:
        if self._runner is None:
            self._runner = _Runner(self._source, self._stages, self._sink_config, self._num_threads)
            self._finalizer = weakref.finalize(self, self._runner.stop)
        return self._runner

    def _pull(self) -> Record:
        if self._ended or self._stopped:
            raise StopIteration
        message = self._running().get()
        if isinstance(message, _Item):
            self._delivered = message.state_after
            return message.record
        self._stop()
        if isinstance(message, _Failure):
            self._rewind()
            self._advance_source(1)
            raise message.error
        self._ended = True
        raise StopIteration

    def __iter__(self) -> Iterator[Any]:
        """The rest of the items (SPDL: ``get_iterator()``); leaving the loop pauses the pipeline (``close()``)."""
        return self._iterate(None)

    def _iterate(self, timeout: float | None) -> Iterator[Any]:
        try:
            while True:
                try:
                    value = self.get_item(timeout=timeout)
                except EOFError:
                    return
                yield value
        finally:
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
        """
        _refuse_unknown("get_item", options, ["timeout"])
        limit = _check_timeout(timeout)
        if self._ended or self._stopped:
            raise EOFError("the pipeline reached its end" if self._ended else "the pipeline was stopped")
        if limit is not None:
            self._running().wait(limit)
        try:
            return next(self)
        except StopIteration:
            raise EOFError("the pipeline reached its end") from None

    def get_iterator(self, *, timeout: float | None = None, **options: Any) -> Iterator[Any]:
        """An iterator over the rest of the items (SPDL); ``timeout`` applies to each item, as in ``get_item``."""
        _refuse_unknown("get_iterator", options, ["timeout"])
        return self._iterate(_check_timeout(timeout))

    def _stop(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
        self._runner, self._finalizer = None, None

    def _rewind(self) -> None:
        """Put the source back at the last delivered item (the runner must be stopped)."""
        self._set_source_state(self._delivered)

    def _set_source_state(self, state: Any) -> None:
        if isinstance(self._source, _AsyncReplaySource):
            state = require_keys(state, ("position",), "BuiltPipeline")
            self._source.position = require_int(state, "position", "BuiltPipeline")
        else:
            self._source._set_state(state)
        self._delivered = self._source_state()

    def _get_state(self) -> dict[str, Any]:
        unordered = [
            s.name for s in self._stages if isinstance(s, _PipeConfig) and s.output_order == "completion"
        ]
        if unordered:
            raise StateError(
                f"BuiltPipeline: no exact resume point with output_order='completion' in {unordered}; use 'input'"
            )
        return dict(self._delivered)

    def _set_state(self, state: Any) -> None:
        self._stop()
        self._ended = False
        self._set_source_state(state)

    def _skip(self, n: int) -> None:
        if n <= 0:
            return
        self._stop()
        self._rewind()
        self._ended = False
        self._advance_source(n)

    def _advance_source(self, outputs: int) -> None:
        """Move the (stopped) source past ``outputs`` output items; each takes the product of the aggregate sizes."""
        count = outputs * self._items_per_output
        if isinstance(self._source, _AsyncReplaySource):
            self._source.position += count
        else:
            self._source._skip(count)
        self._delivered = self._source_state()

    def _config(self) -> dict[str, Any]:
        source = (
            self._source.config() if isinstance(self._source, _AsyncReplaySource) else self._source._config()
        )
        stages: list[dict[str, Any]] = []
        for stage in self._stages:
            if isinstance(stage, _AggregateConfig):
                stages.append({"kind": "aggregate", "size": stage.size, "drop_last": stage.drop_last})
            else:
                stages.append({"kind": "pipe", "op": _function_name(stage.op)})
        return {"kind": "Builder", "source": source, "stages": stages}

    def _close(self) -> None:
        if self._runner is not None:
            self._stop()
            self._rewind()
        if isinstance(self._source, Pipeline):
            self._source._close()
