"""Keras 3 adapter: a tensorcom Connection as a ``keras.utils.PyDataset`` for ``model.fit``.

::

    os.environ["KERAS_BACKEND"] = "torch"                 # before keras is imported
    data = ConnectionPyDataset("zreq://data1:7880", seed=17)
    backup = ConnectionCheckpoint(data, "backup/")         # weights, optimizer, epoch and data position
    model.fit(data, epochs=3, steps_per_epoch=500, shuffle=False, callbacks=[backup])
    checkpoint["data"] = data.state_dict()                 # or by hand: data.load_state_dict(checkpoint["data"])

Batches are yielded in stream order, whatever index Keras asks for: Keras' ``shuffle`` reorders indices of an
in-memory sequence, but the order of a tensorcom stream is already the seeded, deterministic order of the servers'
pipeline, and asking for it out of order would break resuming. A ``PyDataset`` normally lets Keras read it from
worker threads or processes; a connection is read by one thread and the servers do the work, so the PyDataset
arguments ``workers``, ``use_multiprocessing`` and ``max_queue_size`` are refused with a
:class:`tensorcom.ConfigError` (the connection's own ``prefetch=`` keeps batches coming). Pass ``shuffle=False`` to
``fit`` (Keras warns that it cannot shuffle an infinite dataset otherwise). When a pipeline that ends its epochs
(``repeating=False``) ends one, the next batch is the first of its next epoch: Keras' epochs are ``batches`` (or
``steps_per_epoch``) batches of the stream.

Before its first epoch, Keras reads one batch to build its metrics and loss, then starts again from index 0. So
that this batch is not lost, the first batch is handed out again when the second request is also for index 0 (not
when ``batches=1``, where index 0 is every epoch's only batch). ``count`` and :meth:`state_dict` then match the
batches trained on.

:class:`ConnectionCheckpoint` is ``keras.callbacks.BackupAndRestore`` with the data position: at the end of every
epoch it saves the model's weights (with the optimizer's), the epoch and ``data.state_dict()`` together; a ``fit``
started again with it (in a new process, after a crash or an interruption) restores all three, so it trains on
exactly the batches an uninterrupted run would have trained on from that epoch on. Keras restarts an interrupted
epoch from its first step, so backups are taken at epoch ends only.

keras is imported when this module is imported; tensorcom itself never imports it.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras

from tensorcom.client._base import adapter_source
from tensorcom.errors import ConfigError, StateError
from tensorcom.urls import parse_url

__all__ = ["ConnectionCheckpoint", "ConnectionPyDataset"]

_REFUSED = {
    "workers": "Keras' worker threads or processes would read one connection at once; a connection is read by "
    "one thread, and the servers do the loading (add servers or server workers instead)",
    "use_multiprocessing": "each Keras worker process would open its own connection and receive the same stream",
    "max_queue_size": "it sizes the queue of Keras' workers, which this dataset does not use; the connection's "
    "prefetch= sets how many batches are requested ahead",
}


class ConnectionPyDataset(keras.utils.PyDataset):
    """Feed ``model.fit`` from a tensorcom connection.

    Args:
        source: URLs (the connection opens on the first batch) or an open ``Connection``.
        batches: batches per Keras epoch (``len(dataset)``); None makes the dataset infinite, so pass
            ``steps_per_epoch`` to ``fit``.
        transform: applied to each batch before Keras sees it, e.g. to turn a dict batch into ``(inputs,
            targets)``. Batches of ``(images, labels)`` need none.
        connection_options: passed to ``Connection`` (seed, rank, world_size, state, prefetch, timeout, ...). The
            arguments of ``PyDataset`` itself (``workers``, ``use_multiprocessing``, ``max_queue_size``) raise
            :class:`tensorcom.ConfigError`: see the module docstring.
    """

    def __init__(
        self,
        source: Any,
        *,
        batches: int | None = None,
        transform: Callable[[Any], Any] | None = None,
        **connection_options: Any,
    ) -> None:
        _refuse_py_dataset_arguments(connection_options)
        super().__init__(workers=1, use_multiprocessing=False)
        self.urls: list[str] | None
        self.connection: Any
        self.urls, self.connection = adapter_source(source, batches, connection_options)
        self.batches = batches
        self.transform = transform
        self.connection_options = connection_options
        self.count = 0
        self._first: tuple[int, Any] | None = None
        self._last: Any = None

    @property
    def num_batches(self) -> int | None:
        return self.batches

    def _connect(self) -> Any:
        if self.connection is None:
            from tensorcom.client import Connection

            self.connection = Connection(self.urls or [], **self.connection_options)
        return self.connection

    def __getitem__(self, index: int) -> Any:
        """The next batch of the stream (``index`` is not used: see the module docstring)."""
        if self.workers != 1 or self.use_multiprocessing:
            raise ConfigError("a ConnectionPyDataset is read by one thread: workers must stay 1")
        if self._first is not None:
            first_index, first_batch = self._first
            self._first = None
            if index == first_index == 0 and self.batches != 1:
                return first_batch  # Keras peeked at this batch to build its metrics; now it trains on it
        connection = self._connect()
        try:
            batch = connection.recv()
        except StopIteration:  # the pipeline ended an epoch; the connection goes on with the next one
            batch = connection.recv()
        self._last = connection.last
        self.count += 1
        if self.transform is not None:
            batch = self.transform(batch)
        elif isinstance(batch, list):
            batch = tuple(batch)
        if self.count == 1:
            self._first = (index, batch)
        return batch

    @property
    def last(self) -> Any:
        """``connection.last`` of the last batch (step, epoch, sample indices for zreq); None before any."""
        return self._last

    def state_dict(self) -> dict[str, Any]:
        """The connection's state after the last batch handed to Keras: plain data for a checkpoint."""
        if self.connection is None and self.urls is not None and "state" in self.connection_options:
            return dict(self.connection_options["state"])
        return dict(self._connect().state_dict())

    state = state_dict

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the batch ``state`` was taken at; ``count`` starts again from 0."""
        if not isinstance(state, dict):
            raise StateError(f"a ConnectionPyDataset state must be a dict. Found: {str(state)[:200]}")
        if self.connection is None and all(parse_url(url).scheme == "zreq" for url in self.urls or []):
            self.connection_options["state"] = state  # the connection opens there
        else:
            self._connect().load_state_dict(state)
        self._first = None
        self.count = 0

    load_state = set_state = load_state_dict

    def close(self) -> None:
        """Close the connection."""
        if self.connection is not None:
            self.connection.close()
            if self.urls is not None:
                self.connection = None


def _refuse_py_dataset_arguments(options: dict[str, Any]) -> None:
    """Raise a ConfigError naming the first ``PyDataset`` argument in ``options``, and why it cannot work here."""
    accepted = inspect.signature(keras.utils.PyDataset.__init__).parameters
    for name in [*_REFUSED, *(name for name in accepted if name != "self" and name not in _REFUSED)]:
        if name in options:
            why = _REFUSED.get(name, "ConnectionPyDataset feeds Keras from one connection, in stream order")
            raise ConfigError(
                f"ConnectionPyDataset does not take {name}= ({why}). Found: {name}={options[name]!r}"
            )


class ConnectionCheckpoint(keras.callbacks.Callback):
    """Back up the model, the epoch and the data position at each epoch end; restore them when ``fit`` starts again.

    Like ``keras.callbacks.BackupAndRestore(backup_dir)``, for a model fed by a :class:`ConnectionPyDataset` (or
    anything with ``state_dict``/``load_state_dict``): after an interruption, ``model.fit(data, ...,
    callbacks=[ConnectionCheckpoint(data, path)])`` with a new model, dataset and callback continues at the epoch
    after the last one completed, with that epoch's weights and optimizer state, on the batches that followed it.

    Args:
        data: the dataset ``fit`` reads.
        path: a folder for the backup, used by nothing else; created when first needed.
        delete_checkpoint: remove the backup when ``fit`` completes (as ``BackupAndRestore`` does).
    """

    def __init__(self, data: Any, path: str | os.PathLike[str], *, delete_checkpoint: bool = True) -> None:
        super().__init__()
        if not (hasattr(data, "state_dict") and hasattr(data, "load_state_dict")):
            raise ConfigError(
                f"data must have state_dict() and load_state_dict(). Found: {type(data).__name__}"
            )
        self.data = data
        self.path = Path(path)
        self.delete_checkpoint = delete_checkpoint
        self.restored_epoch: int | None = None
        """The epoch ``fit`` continued from when it started from a backup, else None."""

    @property
    def _record(self) -> Path:
        return self.path / "backup.json"

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        if not self._record.exists():
            return
        try:
            record = json.loads(self._record.read_text())
            epoch, weights, data = record["epoch"], record["weights"], record["data"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise StateError(f"unreadable backup {self._record}: {error}") from error
        model = self.model
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)  # so that its variables load too
        model.load_weights(self.path / weights)
        model._initial_epoch = epoch  # what BackupAndRestore sets: fit's first epoch
        self.data.load_state_dict(data)
        self.restored_epoch = epoch

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        weights = f"epoch-{epoch + 1}.weights.h5"
        self.model.save_weights(self.path / weights, overwrite=True)
        record = {"epoch": epoch + 1, "weights": weights, "data": self.data.state_dict()}
        partial = self._record.with_suffix(".json.partial")
        partial.write_text(json.dumps(record))
        partial.replace(self._record)  # the backup changes here, all at once
        for old in self.path.glob("epoch-*.weights.h5"):
            if old.name != weights:
                old.unlink()

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self.model._initial_epoch = None
        if self.delete_checkpoint:
            for name in [self._record, *self.path.glob("epoch-*.weights.h5")]:
                with contextlib.suppress(FileNotFoundError):
                    name.unlink()
            with contextlib.suppress(OSError):
                self.path.rmdir()
