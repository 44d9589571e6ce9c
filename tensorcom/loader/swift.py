"""``SwiftLoader``: a local multi-process loader for map-style datasets, on tensorcom's request protocol.

Each consumer (one per GPU or rank) runs a :class:`~tensorcom.server.request.RequestServer` in a child process,
bound to an ``ipc://`` socket in a private temporary folder, with ``worker_per_consumer`` worker processes that
each construct the dataset from ``dataset_class(**dataset_kwargs)``. The consumer reads from it through a ``zreq``
:class:`~tensorcom.Connection` with ``rank=consumer_index`` and ``world_size=nb_consumer``. Every batch is a pure
function of (seed, epoch, consumer, step), so it does not depend on the number of workers, and the connection's
state resumes an epoch exactly. See ``docs/swiftloader.md``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import itertools
import json
import logging
import multiprocessing
import multiprocessing.util
import os
import queue
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

from tensorcom.client import BatchInfo
from tensorcom.errors import ConfigError, PipelineError, RemoteError, StateError, TensorcomError, Timeout
from tensorcom.loader._pipeline import PipelineSpec, dataset_of, forget_dataset, swift_pipeline
from tensorcom.loader._server import LOADER_ID_VARIABLE, LogSpec, make_log_handlers, serve_consumer
from tensorcom.loader._tree import unpack_tree
from tensorcom.loader._warm import WarmStart
from tensorcom.pipeline.rng import wants_rng

__all__ = [
    "DEFAULT_SEED",
    "LOADER_ID_VARIABLE",
    "SEED_ALIASES",
    "STATE_KIND",
    "SwiftLoader",
    "SwiftLoaderOptions",
]

log = logging.getLogger(__name__)

STATE_KIND = "tensorcom.swiftloader"
DEFAULT_SEED = 0
SEED_ALIASES = ("seed_numer", "seed_number")  # the original README's spelling, and tensorcom 0.2's
STATE_FORMAT = 1
_POLL_SECONDS = 0.25
_STOP_SECONDS = 10.0
_ids = itertools.count()


def _check_size(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}. Found: {value!r}")


def _check_importable(name: str, value: Any) -> None:
    """Worker processes import functions and classes by name: lambdas and local definitions cannot work."""
    if value is None:
        return
    if not callable(value):
        raise ConfigError(f"{name} must be callable. Found: {value!r}")
    target = getattr(value, "func", value)  # functools.partial
    qualname = getattr(target, "__qualname__", "")
    if "<lambda>" in qualname or "<locals>" in qualname:
        raise ConfigError(
            f"{name} must be defined at module level (a function or class worker processes can import). "
            f"Found: {getattr(target, '__module__', '?')}.{qualname}"
        )


@dataclasses.dataclass(frozen=True)
class SwiftLoaderOptions:
    """The keyword options of :class:`SwiftLoader`, checked on construction.

    Attributes:
        seed: the seed of every shuffle and per-sample generator (also spelt ``seed_numer``, as the original's
            README does, or ``seed_number``; give one of the three). Default :data:`DEFAULT_SEED` (0), the same in
            every consumer's process, as the consumers' shares of an epoch must be (the original's default, the
            time in ms, differs between processes); pass another to draw other orders.
        data_queue_size: batches requested ahead of the consumer (computed by the workers, then waiting in the
            consumer's connection).
        message_queue_size: room for control messages (hello, heartbeats) beside the batches in the server's queues.
        collate_fn: makes a batch from a list of samples (module level, it runs in the workers); default: the
            pipeline's ``collate`` (nested tuples, lists and dicts of numbers, arrays and tensors).
        logger: a file prefix (``{prefix}_consumer{i}.log``), or a dict with ``path`` (that prefix), ``stdout``
            (bool) and ``level`` (name or number); the consumer's server process logs there too.
        batch_encoder, batch_decoder: a pair: ``batch_encoder(batch)`` runs in the workers and returns bytes or
            arrays (nested as a batch may be), ``batch_decoder`` gets that back in the consumer. Default: batches
            travel as ``.ten`` arrays; nothing is pickled.
        nearby_shuffle: with ``shuffle``, samples are shuffled within windows of this many consecutive indices (and
            the windows' order is shuffled); default ``5 * batch_size``. ``>= len(dataset)`` is a full shuffle.
        benchmark: time loading, batching, encoding (in the workers), waiting, decoding and device transfer (in the
            consumer); the figures are logged at the end of every epoch and at ``close()``.
        benchmark_file: also append them to this file, one JSON object per line.
        validate: construct the dataset and compute consumer 0's first batch in this process before any worker
            starts (with ``warm_start``, that batch is the first one consumer 0 gets: it is not computed twice).
        warm_start: while the consumer's server process and its workers start, compute the batches in this
            process (the same batches, by the same pipeline), so the first one comes as fast as DataLoader's; the
            workers take over, exactly where this process stopped, once they are ready. This constructs the dataset
            in this process (as ``validate`` does); False waits for the workers instead.
        drop_last: as DataLoader's: no short batch. Every consumer gets the same number of full batches,
            ``len(dataset) // nb_consumer // batch_size``; the rest of the epoch's order is not read.
        multithread: receive, decode and move batches to the device in a background thread, ahead of the
            consumer (default True, as the original's README says; False does it in the consumer's thread).
        max_nb_batch_on_device: host-to-device copies in flight at most (CUDA).
        max_buffer_size: with ``multithread``, batches decoded ahead and waiting for the consumer; default
            ``max(2, data_queue_size // worker_per_consumer)``.
        timeout: seconds to wait for a batch (or for the server to start) before :class:`tensorcom.Timeout`.
    """

    seed: int | None = None
    data_queue_size: int = 10
    message_queue_size: int = 10
    collate_fn: Callable[[list[Any]], Any] | None = None
    logger: str | dict[str, Any] | None = None
    batch_encoder: Callable[[Any], Any] | None = None
    batch_decoder: Callable[[Any], Any] | None = None
    nearby_shuffle: int | None = None
    benchmark: bool = True
    benchmark_file: str | None = None
    validate: bool = True
    warm_start: bool = True
    drop_last: bool = False
    multithread: bool = True
    max_nb_batch_on_device: int = 1
    max_buffer_size: int | None = None
    timeout: float | None = 300.0

    def __post_init__(self) -> None:
        _check_seed("seed", self.seed)
        for name in ("data_queue_size", "message_queue_size", "max_nb_batch_on_device"):
            _check_size(name, getattr(self, name))
        for name in ("nearby_shuffle", "max_buffer_size"):
            if getattr(self, name) is not None:
                _check_size(name, getattr(self, name))
        for name in ("collate_fn", "batch_encoder"):
            _check_importable(name, getattr(self, name))
        if self.batch_decoder is not None and not callable(self.batch_decoder):
            raise ConfigError(f"batch_decoder must be callable. Found: {self.batch_decoder!r}")
        if (self.batch_encoder is None) != (self.batch_decoder is None):
            raise ConfigError(
                "batch_encoder and batch_decoder go together: give both or neither. "
                f"Found: batch_encoder={self.batch_encoder!r}, batch_decoder={self.batch_decoder!r}"
            )
        if self.benchmark_file is not None and not isinstance(self.benchmark_file, str | os.PathLike):
            raise ConfigError(f"benchmark_file must be a path. Found: {self.benchmark_file!r}")
        if self.timeout is not None and not (isinstance(self.timeout, int | float) and self.timeout > 0):
            raise ConfigError(f"timeout must be > 0 seconds or None. Found: {self.timeout!r}")
        LogSpec.parse(self.logger, 0)

    @classmethod
    def from_keywords(cls, options: dict[str, Any]) -> SwiftLoaderOptions:
        """Build from ``**options``; an unknown name is a ConfigError that lists the known ones."""
        known = [field.name for field in dataclasses.fields(cls)] + list(SEED_ALIASES)
        seeds = [name for name in ("seed", *SEED_ALIASES) if name in options]
        if len(seeds) > 1:
            raise ConfigError(
                f"{' and '.join(seeds)} are one option (the seed): give one. "
                f"Found: {', '.join(f'{name}={options[name]!r}' for name in seeds)}"
            )
        options = dict(options)
        for alias in SEED_ALIASES:
            if alias in options:
                _check_seed(alias, options[alias])
                options["seed"] = options.pop(alias)
        for name in options:
            if name not in known:
                close = [k for k in known if k.startswith(name)] or difflib.get_close_matches(
                    name, known, n=1
                )
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ConfigError(
                    f"unknown SwiftLoader option {name!r}.{hint} Known options: {', '.join(sorted(known))}"
                )
        return cls(**options)


def _check_seed(name: str, value: Any) -> None:
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 64
    ):
        raise ConfigError(f"{name} must be an int in [0, 2**64) or None. Found: {value!r}")


def _batches_per_epoch(
    n: int, consumer: int, nb_consumer: int, batch_size: int, drop_last: bool = False
) -> int:
    if drop_last:
        return n // nb_consumer // batch_size
    share = max(0, -(-(n - consumer) // nb_consumer))
    return -(-share // batch_size)


class _Benchmark:
    """Seconds spent per stage, summed over an epoch, reported as a log line and a JSON line."""

    _FIELDS = ("waiting", "decoding", "transfer", "loading", "batching", "encoding")

    def __init__(self, consumer: int, file: str | None, logger: logging.Logger) -> None:
        self.consumer = consumer
        self.file = file
        self.logger = logger
        self.lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self.batches = 0
        self.samples = 0
        self.seconds = dict.fromkeys(self._FIELDS, 0.0)
        self.started: float | None = None

    def add(self, samples: int, **seconds: float) -> None:
        with self.lock:
            if self.started is None:
                self.started = time.perf_counter() - seconds.get("waiting", 0.0)
            self.batches += 1
            self.samples += samples
            for name, value in seconds.items():
                self.seconds[name] += value

    def report(self, epoch: int | None, complete: bool) -> None:
        with self.lock:
            if self.batches == 0:
                return
            elapsed = time.perf_counter() - (self.started or time.perf_counter())
            record = {
                "consumer": self.consumer,
                "epoch": epoch,
                "complete": complete,
                "batches": self.batches,
                "samples": self.samples,
                "elapsed_s": round(elapsed, 6),
                "samples_per_s": round(self.samples / elapsed, 3) if elapsed > 0 else None,
                **{f"{name}_s": round(value, 6) for name, value in self.seconds.items()},
            }
            self._reset()
        self.logger.info(
            "benchmark consumer %d epoch %s: %d batches, %.1f samples/s; seconds: %s",
            self.consumer,
            epoch,
            record["batches"],
            record["samples_per_s"] or 0.0,
            ", ".join(f"{name} {record[name + '_s']:.3f}" for name in self._FIELDS),
        )
        if self.file is not None:
            with open(self.file, "a", encoding="utf-8") as stream:
                stream.write(json.dumps(record) + "\n")


@dataclasses.dataclass
class _Delivered:
    """One item for the consumer: a batch, the end of the epoch, or an error; with the state after it."""

    kind: str  # "batch", "end", "error"
    state: dict[str, Any] | None
    batch: Any = None
    info: BatchInfo | None = None
    error: BaseException | None = None
    seconds: dict[str, float] | None = None  # for the benchmark, counted when the batch is delivered


class _Consumer:
    """What a started consumer holds: the server process, the connection, the device transfer, the receiver."""

    def __init__(self, index: int, logger: logging.Logger, handlers: list[logging.Handler]) -> None:
        self.index = index
        self.logger = logger
        self.handlers = handlers
        self.folder: str | None = None
        self.address = ""
        self.process: Any = None
        self.connection: Any = None
        self.transfer: Any = None
        self.decoder: Callable[[Any], Any] | None = None
        self.benchmark: _Benchmark | None = None
        self.timeout: float | None = None
        self.queue: queue.Queue[_Delivered] | None = None
        self.stop_receiving = threading.Event()
        self.receiver: threading.Thread | None = None
        # warm start (see tensorcom.loader._warm): batches computed here until the server process is ready
        self.warm: WarmStart | None = None
        self.readiness: Any = None  # the pipe on which the server process says it is ready
        self.ready_by: float | None = None  # time.monotonic() deadline for that
        self.connect: Callable[[dict[str, Any] | None], Any] | None = None  # opens the connection at a state
        self.forget: Callable[[], None] | None = None  # drops this process's dataset once the warm start ends
        self.failed: BaseException | None = None

    # warm start

    def end_warm(self) -> None:
        """Stop computing batches here: close the warm pipeline and the readiness pipe, drop the dataset."""
        if self.warm is not None:
            self.warm.close()
            self.warm = None
            if self.forget is not None:
                self.forget()
        if self.readiness is not None:
            self.readiness.close()
            self.readiness = None

    def take_over(self) -> None:
        """While warm: once the server process is ready, open the connection exactly where the warm start stands.
        Raises if the server process failed, exited, or is late."""
        pipe, warm = self.readiness, self.warm
        if pipe is None or warm is None or self.connect is None:
            return
        if pipe.poll(0):
            message = _readiness_message(pipe, self.index)
            if "error" in message:
                raise PipelineError(
                    f"SwiftLoader consumer {self.index}: the server process failed to start: {message['error']}"
                )
            self.connection = self.connect(warm.handover_state())
            self.connection.count = warm.count
            self.logger.info(
                "SwiftLoader consumer %d: the workers take over after %d batches computed in process",
                self.index,
                warm.count,
            )
            self.end_warm()
        elif not self.process.is_alive():
            raise PipelineError(
                f"SwiftLoader consumer {self.index}: the server process exited "
                f"(exit code {self.process.exitcode}) before it was ready"
            )
        elif self.ready_by is not None and time.monotonic() > self.ready_by:
            raise Timeout(f"SwiftLoader consumer {self.index}: the server process did not start in time")

    # receiving (in the calling thread, or in the receiver thread)

    def state(self) -> dict[str, Any]:
        return self.warm.state() if self.warm is not None else self.connection.state()

    def fetch(self) -> _Delivered:
        """Receive, decode and move the next batch (or learn that the epoch ended, or that the step failed)."""
        if self.failed is not None:
            return _Delivered("error", None, error=self.failed)
        try:
            self.take_over()
        except TensorcomError as exc:
            self.failed = exc
            return _Delivered("error", None, error=exc)
        started = time.perf_counter()
        warm_info: BatchInfo | None = None
        try:
            if self.warm is not None:
                raw, warm_info = self.warm.next()
            else:
                raw = self.connection.recv()
        except StopIteration:
            return _Delivered("end", self.state())
        except RemoteError as exc:
            exc.add_note(f"in SwiftLoader consumer {self.index}")
            return _Delivered("error", self.state(), error=exc)
        source: Any = self.warm if self.warm is not None else self.connection
        received = time.perf_counter()
        try:
            batch, timing = unpack_tree(raw)
            if self.decoder is not None:
                batch = self.decoder(batch)
            decoded = time.perf_counter()
            if self.transfer is not None:
                batch = self.transfer(batch)
        except Exception as exc:  # like a failed step: reported, and the stream goes on after this batch
            step = warm_info.step if warm_info is not None else self.connection.last.step
            exc.add_note(f"in SwiftLoader consumer {self.index}, decoding step {step}")
            return _Delivered("error", source.state(), error=exc)
        moved = time.perf_counter()
        last = warm_info if warm_info is not None else self.connection.last
        info = dataclasses.replace(last, indices=list(last.indices))
        seconds = None
        if self.benchmark is not None:
            server = [float(x) for x in timing] if timing is not None else [0.0, 0.0, 0.0]
            seconds = {
                "waiting": received - started if self.queue is None else 0.0,
                "decoding": decoded - received,
                "transfer": moved - decoded,
                "loading": server[0],
                "batching": server[1],
                "encoding": server[2],
            }
        return _Delivered("batch", source.state(), batch=batch, info=info, seconds=seconds)

    def receive_loop(self) -> None:
        """The receiver thread: fetch items ahead into the bounded queue until told to stop."""
        waited = 0.0
        while not self.stop_receiving.is_set():
            try:
                item = self.fetch()
                waited = 0.0
            except Timeout:
                waited += _POLL_SECONDS
                if self.timeout is None or waited < self.timeout:
                    continue
                item = _Delivered(
                    "error",
                    None,
                    error=Timeout(
                        f"SwiftLoader consumer {self.index}: no batch within {self.timeout} s "
                        f"from {', '.join(self.connection.endpoints)}"
                    ),
                )
            except BaseException as exc:  # delivered to the consumer, which raises it
                item = _Delivered("error", None, error=exc)
            while not self.stop_receiving.is_set():
                try:
                    self.queue.put(item, timeout=_POLL_SECONDS)  # type: ignore[union-attr]
                    break
                except queue.Full:
                    continue
            if item.kind == "error" and item.state is None:
                return

    def start_receiver(self) -> None:
        self.stop_receiving.clear()
        self.receiver = threading.Thread(
            target=self.receive_loop, name=f"swiftloader-receiver-{self.index}", daemon=True
        )
        self.receiver.start()

    def stop_receiver(self) -> None:
        if self.receiver is None:
            return
        self.stop_receiving.set()
        self.receiver.join(timeout=_STOP_SECONDS + 2 * _POLL_SECONDS)
        if self.receiver.is_alive():
            log.warning("consumer %d: the receiver thread did not stop in time", self.index)
        self.receiver = None
        if self.queue is not None:
            while True:
                try:
                    self.queue.get_nowait()
                except queue.Empty:
                    break


def _call_to_device(to_device: Callable[[Any, Any], Any], device: Any, batch: Any) -> Any:
    return to_device(batch, device)


def _release(consumer: _Consumer) -> None:
    """Stop a consumer's receiver, connection, server process (and so its workers), files and log handlers."""
    consumer.stop_receiver()
    consumer.end_warm()
    if consumer.connection is not None:
        consumer.connection.close()
        consumer.connection = None
    process = consumer.process
    if process is not None:
        if process.is_alive():
            process.terminate()  # SIGTERM: the server stops its workers, then exits
            process.join(timeout=_STOP_SECONDS)
        if process.is_alive():
            log.warning(
                "consumer %d: server process %d did not stop; killing it", consumer.index, process.pid
            )
            process.kill()
            process.join(timeout=_STOP_SECONDS)
        if not process.is_alive():
            process.close()
        consumer.process = None
    if consumer.folder is not None:
        shutil.rmtree(consumer.folder, ignore_errors=True)
        consumer.folder = None
    for handler in consumer.handlers:
        consumer.logger.removeHandler(handler)
        handler.close()
    consumer.handlers = []


def _readiness_message(
    pipe: Any, index: int, process: Any = None, limit: float | None = None
) -> dict[str, Any]:
    """The server process's one JSON message (``ready`` and ``n``, or ``error``); with ``process``, wait for it
    (at least 30 s, or ``limit``) while that process lives."""
    if process is not None:
        deadline = None if limit is None else time.monotonic() + max(limit, 30.0)
        while not pipe.poll(_POLL_SECONDS):
            if not process.is_alive():
                raise PipelineError(
                    f"SwiftLoader consumer {index}: the server process exited "
                    f"(exit code {process.exitcode}) before it was ready"
                )
            if deadline is not None and time.monotonic() > deadline:
                raise Timeout(f"SwiftLoader consumer {index}: the server process did not start in time")
    try:
        message = json.loads(pipe.recv_bytes().decode("utf-8"))
    except (EOFError, OSError, ValueError) as exc:
        raise PipelineError(
            f"SwiftLoader consumer {index}: no readiness message from the server process: {exc!r}"
        ) from exc
    if not isinstance(message, dict):
        raise PipelineError(f"SwiftLoader consumer {index}: bad readiness message {message!r}")
    return message


class SwiftLoader:
    """Batches of a map-style dataset for one consumer of ``nb_consumer``, loaded by worker processes.

    ::

        loader = SwiftLoader(dataset_class=Dataset, dataset_kwargs=kwargs, batch_size=32,
                             nb_consumer=4, worker_per_consumer=4, shuffle=True, seed=1234)
        loader.start(consumer_index, device="cuda:0")
        for epoch in range(epochs):
            for batch in loader:        # len(loader) batches: this consumer's share of one epoch
                ...

    Each ``iter(loader)`` runs to the end of the current epoch; the next one starts the next epoch, in a new order.
    ``state_dict()`` / ``load_state_dict()`` (aliases ``state()`` / ``load_state()``) save and restore the position
    within an epoch exactly. ``close()`` (or leaving a ``with`` block, garbage collection, interpreter exit) stops
    every process the loader started.

    Args:
        dataset_class: a class defined at module level; ``dataset_class(**dataset_kwargs)`` must have
            ``__len__`` and ``__getitem__(index)`` (or ``__getitem__(index, rng)`` to receive a generator keyed by
            seed, epoch and index). Each worker process constructs its own instance; none is ever pickled.
        dataset_kwargs: keyword arguments for the dataset (picklable).
        batch_size: samples per batch; the last batch of an epoch may be smaller.
        nb_consumer: consumers sharing every epoch (one per GPU or rank).
        worker_per_consumer: worker processes loading and batching for this consumer.
        shuffle: shuffle every epoch (within ``nearby_shuffle`` windows); False reads indices in order.
        **options: see :class:`SwiftLoaderOptions`; an unknown name raises :class:`tensorcom.ConfigError`.
    """

    def __init__(
        self,
        dataset_class: type[Any],
        dataset_kwargs: dict[str, Any] | None = None,
        batch_size: int = 32,
        nb_consumer: int = 1,
        worker_per_consumer: int = 4,
        shuffle: bool = True,
        **options: Any,
    ) -> None:
        self.options = SwiftLoaderOptions.from_keywords(options)
        _check_importable("dataset_class", dataset_class)
        dataset_kwargs = {} if dataset_kwargs is None else dataset_kwargs
        if not isinstance(dataset_kwargs, dict) or not all(isinstance(k, str) for k in dataset_kwargs):
            raise ConfigError(f"dataset_kwargs must be a dict with string keys. Found: {dataset_kwargs!r}")
        _check_size("batch_size", batch_size)
        _check_size("nb_consumer", nb_consumer)
        _check_size("worker_per_consumer", worker_per_consumer)
        self.dataset_class = dataset_class
        self.dataset_kwargs = dataset_kwargs
        self.batch_size = batch_size
        self.nb_consumer = nb_consumer
        self.worker_per_consumer = worker_per_consumer
        self.shuffle = bool(shuffle)
        self.seed: int = DEFAULT_SEED if self.options.seed is None else self.options.seed
        if self.options.seed is None:
            log.info("SwiftLoader: seed=%d, the default (pass seed= for other orders)", self.seed)
        self.id = f"{os.getpid()}-{next(_ids)}-{uuid.uuid4().hex[:8]}"
        self._spec = PipelineSpec(
            dataset_class=dataset_class,
            dataset_kwargs=dataset_kwargs,
            n=0,
            batch_size=batch_size,
            shuffle=self.shuffle,
            nearby_shuffle=self.options.nearby_shuffle or 5 * batch_size,
            collate_fn=self.options.collate_fn,
            batch_encoder=self.options.batch_encoder,
            benchmark=self.options.benchmark,
            getitem_wants_rng=hasattr(dataset_class, "__getitem__") and wants_rng(dataset_class.__getitem__),
            drop_last=self.options.drop_last,
        )
        self._consumer: _Consumer | None = None
        self._finalizer: Any = None
        self._pending_state: dict[str, Any] | None = None
        self._delivered_state: dict[str, Any] | None = None
        self._closed = False
        self._epoch_batches: Iterator[Any] | None = None
        self._validated: tuple[Any, tuple[Any, dict[str, Any]]] | None = None
        self.last = BatchInfo()
        if self.options.validate:
            self._spec = dataclasses.replace(self._spec, n=self._validate())

    # -- configuration -------------------------------------------------------------------------------------------

    def _dataset_length(self) -> int:
        """Construct the dataset in this process (kept for later use here) and return its length."""
        spec = self._spec
        name = f"{spec.dataset_class.__module__}.{spec.dataset_class.__qualname__}"
        dataset = dataset_of(spec.dataset_class, spec.dataset_kwargs)
        try:
            n = len(dataset)
        except Exception as exc:
            raise PipelineError(f"len() of {name} raised {type(exc).__name__}: {exc}") from exc
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise PipelineError(f"the dataset must have a length > 0. Found: len() = {n!r}")
        return n

    def _validate(self) -> int:
        """Construct the dataset and compute consumer 0's first batch here; return the dataset's length. With
        ``warm_start``, the pipeline and that batch are kept: consumer 0 starts from them."""
        spec = self._spec
        name = f"{spec.dataset_class.__module__}.{spec.dataset_class.__qualname__}"
        kept = False
        try:
            n = self._dataset_length()
            pipeline = swift_pipeline(
                seed=self.seed,
                rank=0,
                world_size=self.nb_consumer,
                spec=dataclasses.replace(spec, n=n),
            )
            try:
                try:
                    packed, meta = pipeline.next_with_meta()
                except StopIteration:
                    raise PipelineError(f"consumer 0 gets no batch from a dataset of {n} samples") from None
                batch, _ = unpack_tree(packed)
                if self.options.batch_decoder is not None:
                    self.options.batch_decoder(batch)
                if self.options.warm_start:
                    self._validated = (pipeline, (packed, meta))
                    kept = True
            finally:
                if not kept:
                    pipeline.close()
        except Exception as exc:
            error = PipelineError(f"SwiftLoader validation failed ({name}): {exc}")
            for note in getattr(exc, "__notes__", []):
                error.add_note(note)
            raise error from exc
        finally:
            if not kept:
                forget_dataset(spec.dataset_class, spec.dataset_kwargs)
        return n

    @property
    def seed_number(self) -> int:
        """The seed (tensorcom 0.2's name for :attr:`seed`)."""
        return self.seed

    @property
    def dataset_length(self) -> int | None:
        """``len(dataset)``, once known (after validation, or once started)."""
        return self._spec.n or None

    @property
    def consumer_index(self) -> int | None:
        return None if self._consumer is None else self._consumer.index

    def __len__(self) -> int:
        """Batches this consumer gets per epoch (consumer 0's before ``start``)."""
        if not self._spec.n:
            raise ConfigError(
                "the dataset's length is not known yet: call start() first (or keep validate=True)"
            )
        index = 0 if self._consumer is None else self._consumer.index
        return _batches_per_epoch(
            self._spec.n, index, self.nb_consumer, self.batch_size, self.options.drop_last
        )

    def __repr__(self) -> str:
        where = (
            "closed"
            if self._closed
            else f"consumer {self.consumer_index}"
            if self._consumer
            else "not started"
        )
        return (
            f"SwiftLoader({self.dataset_class.__qualname__}, batch_size={self.batch_size}, "
            f"nb_consumer={self.nb_consumer}, worker_per_consumer={self.worker_per_consumer}, "
            f"seed={self.seed}, {where})"
        )

    # -- life cycle ----------------------------------------------------------------------------------------------

    def start(
        self, consumer_index: int, device: Any = None, to_device: Callable[[Any, Any], Any] | None = None
    ) -> None:
        """Start this process's consumer: its server process and workers, and the connection to them.

        Args:
            consumer_index: which share of every epoch this process reads, in ``[0, nb_consumer)``.
            device: move every array and tensor of a batch to this torch device (numpy arrays become tensors).
            to_device: with ``device``, ``to_device(batch, device)`` is called with each whole batch (as decoded:
                numpy arrays, or tensors where the samples held tensors) instead of the built-in move, and returns
                the batch to deliver: the original SwiftLoader's call. Without ``device`` it is not called (as in
                the original); a warning says so.
        """
        if self._closed:
            raise ConfigError("this SwiftLoader is closed")
        if self._consumer is not None:
            raise ConfigError(f"this SwiftLoader already started consumer {self._consumer.index}")
        if isinstance(consumer_index, bool) or not isinstance(consumer_index, int):
            raise ConfigError(f"consumer_index must be an int. Found: {consumer_index!r}")
        if to_device is not None and not callable(to_device):
            raise ConfigError(f"to_device must be callable as to_device(batch, device). Found: {to_device!r}")
        if not 0 <= consumer_index < self.nb_consumer:
            raise ConfigError(f"consumer_index must be in [0, {self.nb_consumer}). Found: {consumer_index}")
        options = self.options
        log_spec = LogSpec.parse(options.logger, consumer_index)
        if log_spec is None:
            logger, handlers = log, []
        else:
            logger = logging.getLogger(f"{__name__}.{self.id}")
            logger.propagate = False
            logger.setLevel(log_spec.level)
            handlers = make_log_handlers(log_spec)
            for handler in handlers:
                logger.addHandler(handler)
        consumer = _Consumer(consumer_index, logger, handlers)
        self._finalizer = multiprocessing.util.Finalize(self, _release, args=(consumer,), exitpriority=50)
        self._consumer = consumer
        try:
            self._start(consumer, device, to_device)
        except BaseException:
            self.close()
            raise

    def _start(self, consumer: _Consumer, device: Any, to_device: Callable[[Any, Any], Any] | None) -> None:
        options = self.options
        name = f"consumer{consumer.index}"
        if options.warm_start and not self._spec.n:  # before any process starts: a broken dataset fails here
            self._spec = dataclasses.replace(self._spec, n=self._dataset_length())
        consumer.folder = tempfile.mkdtemp(prefix="tensorcom-loader-")
        consumer.address = f"ipc://{consumer.folder}/{name}"
        context = multiprocessing.get_context("spawn")
        receiving, sending = context.Pipe(duplex=False)
        consumer.process = context.Process(
            target=serve_consumer,
            args=(
                self._spec,
                f"zrep+{consumer.address}",
                self.worker_per_consumer,
                options.data_queue_size + options.message_queue_size,
                os.getpid(),
                sending,
                LogSpec.parse(options.logger, consumer.index),
                self.id,
                f"swiftloader-{self.id}-{name}",
            ),
            name=f"tensorcom-swiftloader-{name}",
        )
        consumer.process.start()
        sending.close()
        consumer.timeout = options.timeout
        consumer.connect = functools.partial(self._connect, consumer)
        if options.warm_start:
            consumer.readiness = receiving
            limit = options.timeout
            consumer.ready_by = None if limit is None else time.monotonic() + max(limit, 30.0)
            validated, self._validated = self._validated, None
            pipeline, first = None, None
            if validated is not None and consumer.index == 0 and self._pending_state is None:
                pipeline, first = validated
            elif validated is not None:
                validated[0].close()
            spec = self._spec
            consumer.forget = functools.partial(forget_dataset, spec.dataset_class, spec.dataset_kwargs)
            consumer.warm = WarmStart(
                spec,
                seed=self.seed,
                rank=consumer.index,
                world_size=self.nb_consumer,
                state=self._pending_state,
                pipeline=pipeline,
                first=first,
            )
        else:
            try:
                reply = _readiness_message(receiving, consumer.index, consumer.process, options.timeout)
            finally:
                receiving.close()
            if "error" in reply:
                raise PipelineError(
                    f"SwiftLoader consumer {consumer.index}: the server process failed to start: {reply['error']}"
                )
            if not self._spec.n:
                self._spec = dataclasses.replace(self._spec, n=int(reply["n"]))
            consumer.connection = self._connect(consumer, self._pending_state)
        self._pending_state = None
        consumer.logger.info(
            "SwiftLoader %s: consumer %d of %d, seed=%d, %d samples, batch_size=%d, %d batches per epoch, "
            "%d workers, server pid %d%s",
            self.dataset_class.__qualname__,
            consumer.index,
            self.nb_consumer,
            self.seed,
            self._spec.n,
            self.batch_size,
            len(self),
            self.worker_per_consumer,
            consumer.process.pid,
            ", batches computed here until the workers are ready" if consumer.warm is not None else "",
        )
        consumer.decoder = options.batch_decoder
        if device is not None and to_device is not None:
            consumer.transfer = functools.partial(_call_to_device, to_device, device)
        elif device is not None:
            from tensorcom.adapters.device import DeviceTransfer

            consumer.transfer = DeviceTransfer(
                device=device, max_batches_on_device=options.max_nb_batch_on_device
            )
        elif to_device is not None:
            consumer.logger.warning(
                "SwiftLoader consumer %d: to_device is only called with a device (to_device(batch, device)), "
                "as in the original SwiftLoader; no device was given, so batches stay where they are",
                consumer.index,
            )
        if options.benchmark:
            file = None if options.benchmark_file is None else os.fspath(options.benchmark_file)
            consumer.benchmark = _Benchmark(consumer.index, file, consumer.logger)
        self._delivered_state = consumer.state()
        if options.multithread:
            size = options.max_buffer_size or max(2, options.data_queue_size // self.worker_per_consumer)
            consumer.queue = queue.Queue(maxsize=size)
            consumer.start_receiver()

    def _connect(self, consumer: _Consumer, state: dict[str, Any] | None) -> Any:
        """The consumer's zreq connection to its server, continuing from ``state`` (a connection state)."""
        from tensorcom.client import RequestConnection

        options = self.options
        connection = RequestConnection(
            f"zreq+{consumer.address}",
            seed=self.seed,
            rank=consumer.index,
            world_size=self.nb_consumer,
            prefetch=options.data_queue_size,
            timeout=options.timeout,
            dead_after=30.0,
            state=state,
        )
        if options.multithread:
            connection.timeout = _POLL_SECONDS  # the receiver thread polls, and counts the time itself
        return connection

    def close(self) -> None:
        """Stop the receiver, the connection, the server process and its workers; remove the socket folder."""
        if self._consumer is not None and self._consumer.benchmark is not None and not self._closed:
            self._consumer.benchmark.report(self.last.epoch, complete=False)
        self._closed = True
        if self._validated is not None:
            self._validated[0].close()
            self._validated = None
            forget_dataset(self.dataset_class, self.dataset_kwargs)
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None

    def __enter__(self) -> SwiftLoader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- batches -------------------------------------------------------------------------------------------------

    def _started(self) -> _Consumer:
        if self._closed:
            raise ConfigError("this SwiftLoader is closed")
        if self._consumer is None or (self._consumer.connection is None and self._consumer.warm is None):
            raise ConfigError("call loader.start(consumer_index) before reading batches")
        return self._consumer

    def _next(self, consumer: _Consumer) -> _Delivered:
        if consumer.queue is None:
            return consumer.fetch()
        started = time.perf_counter()
        while True:
            try:
                item = consumer.queue.get(timeout=_POLL_SECONDS)
                break
            except queue.Empty:
                if consumer.receiver is None or not consumer.receiver.is_alive():
                    raise TensorcomError(
                        f"SwiftLoader consumer {consumer.index}: the receiver thread stopped"
                    ) from None
        if consumer.benchmark is not None and item.kind == "batch":
            with consumer.benchmark.lock:
                consumer.benchmark.seconds["waiting"] += time.perf_counter() - started
        return item

    def __next__(self) -> Any:
        """The next batch of the current epoch, as the original allowed; ``StopIteration`` at the epoch's end,
        after which the next call starts the next epoch."""
        if self._epoch_batches is None:
            self._epoch_batches = iter(self)
        try:
            return next(self._epoch_batches)
        except StopIteration:
            self._epoch_batches = None
            raise

    def __iter__(self) -> Iterator[Any]:
        """Yield the rest of the current epoch's batches for this consumer."""
        return self._epoch()

    def _epoch(self) -> Iterator[Any]:
        consumer = self._started()
        while True:
            item = self._next(consumer)
            if item.state is not None:
                self._delivered_state = item.state
            if item.kind == "end":
                if consumer.benchmark is not None:
                    consumer.benchmark.report(self.last.epoch, complete=True)
                return
            if item.kind == "error":
                if item.error is None:
                    raise TensorcomError("SwiftLoader: an error without an exception")
                raise item.error
            if item.info is not None:
                self.last = item.info
            if consumer.benchmark is not None and item.seconds is not None and item.info is not None:
                consumer.benchmark.add(len(item.info.indices), **item.seconds)
            yield item.batch

    # -- state ---------------------------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Where this consumer stands (after the last batch delivered): plain data for :meth:`load_state`.

        The state is the same on every consumer of a synchronous job (each has taken the same number of batches).
        """
        if self._pending_state is not None:
            connection_state = self._pending_state
        elif self._consumer is not None and self._delivered_state is not None:
            connection_state = self._delivered_state
        else:
            raise StateError("no state yet: start the loader (or load a state) first")
        return {
            "kind": STATE_KIND,
            "format": STATE_FORMAT,
            "seed_number": self.seed,
            "connection": connection_state,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the next batch is the one after the batch the state was taken at."""
        if not isinstance(state, dict) or state.get("kind") != STATE_KIND:
            raise StateError(f"not a SwiftLoader state (kind {STATE_KIND!r}). Found: {str(state)[:200]}")
        if state.get("format") != STATE_FORMAT:
            raise StateError(
                f"SwiftLoader state format must be {STATE_FORMAT}. Found: {state.get('format')!r}"
            )
        if state.get("seed_number") != self.seed:
            raise StateError(
                f"the state was saved with seed {state.get('seed_number')!r}; this loader has seed {self.seed}"
            )
        connection_state = state.get("connection")
        if not isinstance(connection_state, dict):
            raise StateError(f"SwiftLoader state lacks its connection state. Found: {connection_state!r}")
        consumer = self._consumer
        if consumer is None or (consumer.connection is None and consumer.warm is None):
            if self._closed:
                raise ConfigError("this SwiftLoader is closed")
            self._pending_state = connection_state
            return
        threaded = consumer.receiver is not None
        consumer.stop_receiver()
        try:
            if consumer.warm is not None:
                consumer.warm.load_state(connection_state)
            else:
                consumer.connection.load_state(connection_state)
        finally:
            self._delivered_state = consumer.state()
            if threaded:
                consumer.start_receiver()

    set_state = load_state

    def state_dict(self) -> dict[str, Any]:
        """The same as :meth:`state`: the checkpoint name every face of tensorcom answers to."""
        return self.state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The same as :meth:`load_state`."""
        self.load_state(state)

    @staticmethod
    def batches_per_epoch(
        n: int, consumer_index: int, nb_consumer: int, batch_size: int, drop_last: bool = False
    ) -> int:
        """Batches consumer ``consumer_index`` of ``nb_consumer`` gets from ``n`` samples per epoch."""
        return _batches_per_epoch(n, consumer_index, nb_consumer, batch_size, drop_last)
