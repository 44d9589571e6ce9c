"""Keras 3 adapter: a tensorcom Connection as a ``keras.utils.PyDataset`` for ``model.fit``.

::

    os.environ["KERAS_BACKEND"] = "torch"                 # before keras is imported
    data = ConnectionPyDataset("zreq://data1:7880", seed=17)
    model.fit(data, epochs=3, steps_per_epoch=500)
    checkpoint["data"] = data.state()                     # resume: ConnectionPyDataset(..., state=...)

Batches are yielded in stream order, whatever index Keras asks for: Keras' ``shuffle`` reorders indices of an
in-memory sequence, but the order of a tensorcom stream is already the seeded, deterministic order of the servers'
pipeline, and asking for it out of order would break resuming. A ``PyDataset`` normally lets Keras read it from
worker threads or processes; a connection is read by one thread, so ``workers`` is 1 and the servers do the work.
Pass ``shuffle=False`` to ``fit`` (Keras warns that it cannot shuffle an infinite dataset otherwise).

Before its first epoch, Keras reads one batch to build its metrics and loss, then starts again from index 0. So
that this batch is not lost, the first batch is handed out again when the second request is also for index 0 (not
when ``batches=1``, where index 0 is every epoch's only batch). ``count`` and :meth:`state` then match the batches
trained on.

keras is imported when this module is imported; tensorcom itself never imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras

from tensorcom.client._base import adapter_source
from tensorcom.errors import ConfigError

__all__ = ["ConnectionPyDataset"]


class ConnectionPyDataset(keras.utils.PyDataset):
    """Feed ``model.fit`` from a tensorcom connection.

    Args:
        source: URLs (the connection opens on the first batch) or an open ``Connection``.
        batches: batches per Keras epoch (``len(dataset)``); None makes the dataset infinite, so pass
            ``steps_per_epoch`` to ``fit``.
        transform: applied to each batch before Keras sees it, e.g. to turn a dict batch into ``(inputs,
            targets)``. Batches of ``(images, labels)`` need none.
        connection_options: passed to ``Connection`` (seed, rank, world_size, state, prefetch, timeout, ...).
    """

    def __init__(
        self,
        source: Any,
        *,
        batches: int | None = None,
        transform: Callable[[Any], Any] | None = None,
        **connection_options: Any,
    ) -> None:
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

    def state(self) -> dict[str, Any]:
        """The connection's state after the last batch handed to Keras: plain data for a checkpoint."""
        return dict(self._connect().state())

    def close(self) -> None:
        """Close the connection."""
        if self.connection is not None:
            self.connection.close()
            if self.urls is not None:
                self.connection = None
