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
        validate: construct the dataset and compute one batch in this process before any worker starts.
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


def _batches_per_epoch(n: int, consumer: int, nb_consumer: int, batch_size: int) -> int:
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


class _Consumer:
    """What a started consumer holds: the server process, the connection, the device transfer, the receiver."""

    def __init__(self, index: int, logger: logging.Logger, handlers: list[logging.Handler]) -> None:
        self.index = index
        self.logger = logger
        self.handlers = handlers
        self.folder: str | None = None
        self.process: Any = None
        self.connection: Any = None
        self.transfer: Any = None
        self.decoder: Callable[[Any], Any] | None = None
        self.benchmark: _Benchmark | None = None
        self.timeout: float | None = None
        self.queue: queue.Queue[_Delivered] | None = None
        self.stop_receiving = threading.Event()
        self.receiver: threading.Thread | None = None
        self.last_epoch: int | None = None

    # receiving (in the calling thread, or in the receiver thread)

    def fetch(self) -> _Delivered:
        """Receive, decode and move the next batch (or learn that the epoch ended, or that the step failed)."""
        connection = self.connection
        started = time.perf_counter()
        try:
            raw = connection.recv()
        except StopIteration:
            if self.benchmark is not None:
                self.benchmark.report(self.last_epoch, complete=True)
            return _Delivered("end", connection.state())
        except RemoteError as exc:
            exc.add_note(f"in SwiftLoader consumer {self.index}")
            return _Delivered("error", connection.state(), error=exc)
        received = time.perf_counter()
        try:
            batch, timing = unpack_tree(raw)
            if self.decoder is not None:
                batch = self.decoder(batch)
            decoded = time.perf_counter()
            if self.transfer is not None:
                batch = self.transfer(batch)
        except Exception as exc:  # like a failed step: reported, and the stream goes on after this batch
            exc.add_note(f"in SwiftLoader consumer {self.index}, decoding step {connection.last.step}")
            return _Delivered("error", connection.state(), error=exc)
        moved = time.perf_counter()
        info = dataclasses.replace(connection.last, indices=list(connection.last.indices))
        self.last_epoch = info.epoch
        if self.benchmark is not None:
            server = [float(x) for x in timing] if timing is not None else [0.0, 0.0, 0.0]
            self.benchmark.add(
                len(info.indices),
                waiting=received - started if self.queue is None else 0.0,
                decoding=decoded - received,
                transfer=moved - decoded,
                loading=server[0],
                batching=server[1],
                encoding=server[2],
            )
        return _Delivered("batch", connection.state(), batch=batch, info=info)

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
        )
        self._consumer: _Consumer | None = None
        self._finalizer: Any = None
        self._pending_state: dict[str, Any] | None = None
        self._delivered_state: dict[str, Any] | None = None
        self._closed = False
        self._epoch_batches: Iterator[Any] | None = None
        self.last = BatchInfo()
        if self.options.validate:
            self._spec = dataclasses.replace(self._spec, n=self._validate())

    # -- configuration -------------------------------------------------------------------------------------------

    def _validate(self) -> int:
        """Construct the dataset and compute consumer 0's first batch here; return the dataset's length."""
        spec = self._spec
        name = f"{spec.dataset_class.__module__}.{spec.dataset_class.__qualname__}"
        try:
            dataset = dataset_of(spec.dataset_class, spec.dataset_kwargs)
            try:
                n = len(dataset)
            except Exception as exc:
                raise PipelineError(f"len() of {name} raised {type(exc).__name__}: {exc}") from exc
            if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
                raise PipelineError(f"the dataset must have a length > 0. Found: len() = {n!r}")
            pipeline = swift_pipeline(
                seed=self.seed,
                rank=0,
                world_size=self.nb_consumer,
                spec=dataclasses.replace(spec, n=n),
            )
            try:
                packed = next(pipeline)
            except StopIteration:
                raise PipelineError(f"consumer 0 gets no batch from a dataset of {n} samples") from None
            finally:
                pipeline.close()
            batch, _ = unpack_tree(packed)
            if self.options.batch_decoder is not None:
                self.options.batch_decoder(batch)
        except Exception as exc:
            error = PipelineError(f"SwiftLoader validation failed ({name}): {exc}")
            for note in getattr(exc, "__notes__", []):
                error.add_note(note)
            raise error from exc
        finally:
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
        return _batches_per_epoch(self._spec.n, index, self.nb_consumer, self.batch_size)

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
        from tensorcom.client import RequestConnection

        options = self.options
        name = f"consumer{consumer.index}"
        consumer.folder = tempfile.mkdtemp(prefix="tensorcom-loader-")
        address = f"ipc://{consumer.folder}/{name}"
        context = multiprocessing.get_context("spawn")
        receiving, sending = context.Pipe(duplex=False)
        consumer.process = context.Process(
            target=serve_consumer,
            args=(
                self._spec,
                f"zrep+{address}",
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
        try:
            reply = self._await_server(consumer, receiving)
        finally:
            receiving.close()
        if "error" in reply:
            raise PipelineError(
                f"SwiftLoader consumer {consumer.index}: the server process failed to start: {reply['error']}"
            )
        if not self._spec.n:
            self._spec = dataclasses.replace(self._spec, n=int(reply["n"]))
        consumer.logger.info(
            "SwiftLoader %s: consumer %d of %d, seed=%d, %d samples, batch_size=%d, %d batches per epoch, "
            "%d workers, server pid %d",
            self.dataset_class.__qualname__,
            consumer.index,
            self.nb_consumer,
            self.seed,
            self._spec.n,
            self.batch_size,
            len(self),
            self.worker_per_consumer,
            consumer.process.pid,
        )
        consumer.timeout = options.timeout
        consumer.connection = RequestConnection(
            f"zreq+{address}",
            seed=self.seed,
            rank=consumer.index,
            world_size=self.nb_consumer,
            prefetch=options.data_queue_size,
            timeout=options.timeout,
            dead_after=30.0,
            state=self._pending_state,
        )
        self._pending_state = None
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
        self._delivered_state = consumer.connection.state()
        if options.multithread:
            consumer.connection.timeout = _POLL_SECONDS
            size = options.max_buffer_size or max(2, options.data_queue_size // self.worker_per_consumer)
            consumer.queue = queue.Queue(maxsize=size)
            consumer.start_receiver()

    def _await_server(self, consumer: _Consumer, pipe: Any) -> dict[str, Any]:
        limit = self.options.timeout
        deadline = None if limit is None else time.monotonic() + max(limit, 30.0)
        while not pipe.poll(_POLL_SECONDS):
            if not consumer.process.is_alive():
                raise PipelineError(
                    f"SwiftLoader consumer {consumer.index}: the server process exited "
                    f"(exit code {consumer.process.exitcode}) before it was ready"
                )
            if deadline is not None and time.monotonic() > deadline:
                raise Timeout(
                    f"SwiftLoader consumer {consumer.index}: the server process did not start in time"
                )
        try:
            message = json.loads(pipe.recv_bytes().decode("utf-8"))
        except (EOFError, ValueError) as exc:
            raise PipelineError(
                f"SwiftLoader consumer {consumer.index}: no readiness message from the server process: {exc}"
            ) from exc
        if not isinstance(message, dict):
            raise PipelineError(f"SwiftLoader consumer {consumer.index}: bad readiness message {message!r}")
        return message

    def close(self) -> None:
        """Stop the receiver, the connection, the server process and its workers; remove the socket folder."""
        if self._consumer is not None and self._consumer.benchmark is not None and not self._closed:
            self._consumer.benchmark.report(self._consumer.last_epoch, complete=False)
        self._closed = True
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
        if self._consumer is None or self._consumer.connection is None:
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
                return
            if item.kind == "error":
                if item.error is None:
                    raise TensorcomError("SwiftLoader: an error without an exception")
                raise item.error
            if item.info is not None:
                self.last = item.info
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
        if self._consumer is None or self._consumer.connection is None:
            if self._closed:
                raise ConfigError("this SwiftLoader is closed")
            self._pending_state = connection_state
            return
        consumer = self._consumer
        threaded = consumer.receiver is not None
        consumer.stop_receiver()
        try:
            consumer.connection.load_state(connection_state)
        finally:
            self._delivered_state = consumer.connection.state()
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
    def batches_per_epoch(n: int, consumer_index: int, nb_consumer: int, batch_size: int) -> int:
        """Batches consumer ``consumer_index`` of ``nb_consumer`` gets from ``n`` samples per epoch."""
        return _batches_per_epoch(n, consumer_index, nb_consumer, batch_size)
