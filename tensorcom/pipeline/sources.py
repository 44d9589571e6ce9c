"""Sources: ``Range`` and ``Permutation`` (random access, epochs) and wrappers for plain sequences and iterables.

A source's state is ``{"epoch": e, "position": p}``: the next item is position ``p`` of epoch ``e``. With
``repeating=False`` the source yields one epoch (the one it starts in, 0 unless given ``epoch=`` or
``set_epoch``) and then stops; with ``repeating=True`` it goes on, epoch after epoch, and a ``Permutation`` draws a
fresh order for every epoch from ``(seed, epoch)``. ``skip(k)`` is arithmetic.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from tensorcom.errors import ConfigError, StateError
from tensorcom.pipeline._base import Pipeline, Record, check_count
from tensorcom.pipeline._feistel import FeistelPermutation
from tensorcom.pipeline.rng import derive_words, validate_seed
from tensorcom.pipeline.state import require_int, require_keys

logger = logging.getLogger(__name__)

__all__ = ["IterableSource", "Permutation", "Range", "SequenceSource", "as_stage"]


class _EpochSource(Pipeline):
    """Shared cursor logic of sources that know their epoch length and map positions to indices directly."""

    _salt = 0

    def __init__(self, n: int, repeating: bool, epoch: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ConfigError(f"n must be an int > 0. Found: {n!r}")
        self._n = n
        self._repeating = bool(repeating)
        self._epoch = check_count(epoch, "epoch")
        self._position = 0

    def _index(self, epoch: int, position: int) -> int:
        raise NotImplementedError

    def _value(self, index: int) -> Any:
        return index

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, position: int) -> int:
        """Dataset index at ``position`` of the current epoch."""
        return self.index_at(position, self._epoch)

    def index_at(self, position: int, epoch: int | None = None) -> int:
        """Dataset index at ``position`` of ``epoch`` (the current epoch by default); O(1)."""
        if isinstance(position, bool) or not isinstance(position, int):
            raise TypeError(f"position must be an int. Found: {position!r}")
        if not 0 <= position < self._n:
            raise IndexError(f"position must be in [0, {self._n}). Found: {position}")
        return self._index(self._epoch if epoch is None else check_count(epoch, "epoch"), position)

    @property
    def epoch(self) -> int:
        """Epoch of the next item."""
        return self._epoch

    @property
    def position(self) -> int:
        """Position of the next item within its epoch."""
        return self._position

    def _pull(self) -> Record:
        if self._position >= self._n:
            raise StopIteration
        epoch, index = self._epoch, self._index(self._epoch, self._position)
        self._skip(1)
        return Record(self._value(index), epoch, (index,), self._salt)

    def _skip(self, n: int) -> None:
        position = self._position + n
        if self._repeating:
            self._epoch += position // self._n
            self._position = position % self._n
        else:
            self._position = min(position, self._n)

    def _remaining(self) -> float | None:
        return math.inf if self._repeating else float(self._n - self._position)

    def _get_state(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "position": self._position}

    def _set_state(self, state: Any) -> None:
        where = self.stage_name
        state = require_keys(state, ("epoch", "position"), where)
        epoch = require_int(state, "epoch", where)
        position = require_int(state, "position", where, 0, self._n)
        self._epoch, self._position = epoch, 0
        self._skip(position)

    def _set_epoch(self, epoch: int) -> None:
        self._epoch, self._position = epoch, 0


class Range(_EpochSource):
    """The indices ``0, 1, ..., n-1`` in order, once or (``repeating=True``) epoch after epoch."""

    def __init__(self, n: int, repeating: bool = False, epoch: int = 0) -> None:
        super().__init__(n, repeating, epoch)

    def _index(self, epoch: int, position: int) -> int:
        return position

    def _config(self) -> dict[str, Any]:
        return {"kind": "Range", "n": self._n, "repeating": self._repeating}


class Permutation(_EpochSource):
    """A keyed pseudo-random order of ``[0, n)``, new every epoch, with O(1) memory and O(1) time per position.

    The order of epoch ``e`` is a Feistel-network bijection keyed by ``(seed, e)``; ``p[i]`` (or
    ``p.index_at(i, epoch)``) gives the index at position ``i`` without generating the others, so ``n = 10**9``
    costs nothing up front. The seed also keys the per-sample generators of downstream map functions.
    """

    def __init__(self, n: int, seed: int = 0, repeating: bool = False, epoch: int = 0) -> None:
        super().__init__(n, repeating, epoch)
        self._seed = validate_seed(seed)
        self._salt = self._seed
        self._cached_epoch = -1
        self._cached: FeistelPermutation | None = None

    @property
    def seed(self) -> int:
        return self._seed

    def _bijection(self, epoch: int) -> FeistelPermutation:
        if self._cached is None or self._cached_epoch != epoch:
            self._cached = FeistelPermutation(
                self._n, derive_words(b"tc-permutation", [self._seed, epoch], 6)
            )
            self._cached_epoch = epoch
        return self._cached

    def _index(self, epoch: int, position: int) -> int:
        return self._bijection(epoch)(position)

    def _config(self) -> dict[str, Any]:
        return {"kind": "Permutation", "n": self._n, "seed": self._seed, "repeating": self._repeating}

    def _get_state(self) -> dict[str, Any]:
        return {"seed": self._seed, "epoch": self._epoch, "position": self._position}

    def _set_state(self, state: Any) -> None:
        state = require_keys(state, ("seed", "epoch", "position"), "Permutation")
        if state["seed"] != self._seed:
            raise StateError(
                f"Permutation: state was saved with seed {state['seed']!r}, this one has {self._seed}"
            )
        super()._set_state(state)


class SequenceSource(_EpochSource):
    """The items of a sequence (anything with ``len`` and integer indexing) in order; O(1) skip and resume."""

    def __init__(self, items: Sequence[Any], repeating: bool = False, epoch: int = 0) -> None:
        super().__init__(len(items), repeating, epoch)
        self._items = items

    def _index(self, epoch: int, position: int) -> int:
        return position

    def _value(self, index: int) -> Any:
        return self._items[index]

    def _config(self) -> dict[str, Any]:
        return {"kind": "Sequence", "type": type(self._items).__qualname__, "n": self._n}


class IterableSource(Pipeline):
    """The items of a plain iterable, in order; an item's dataset index is its position in the iterable.

    Resume and skip replay the iterable. A re-iterable (an object whose ``__iter__`` starts over) goes back by
    starting a new iterator and reading up to the position (O(position)). A one-shot iterator (a generator, a file,
    ``iter(x)``) only goes forward: loading a state reads and discards the items before it, so a *fresh* iterator
    over the same items resumes any saved state, while going back on one already read, or reading one after
    ``close()`` closed it, raises :class:`~tensorcom.errors.StateError` naming the reason. ``close()`` closes the
    iterator (a generator's ``finally`` runs). An exception from the iterator counts as an item: the position moves
    past it, as every stage moves past a failed item.
    """

    def __init__(self, items: Iterable[Any]) -> None:
        self._items = items
        self._one_shot = isinstance(items, Iterator)
        self._iterator: Iterator[Any] | None = None
        self._read = 0  # items taken from the current iterator (for a one-shot iterator: ever)
        self._position = 0  # position of the next item; above ``_read`` until the iterator has caught up
        self._closed = False

    @property
    def one_shot(self) -> bool:
        """Whether the iterable is a one-shot iterator (it cannot be read again from its start)."""
        return self._one_shot

    def _check_readable(self) -> None:
        """Raise :class:`StateError` if the iterator was closed and cannot be read again."""
        if self._closed:
            raise StateError(
                f"IterableSource: the one-shot iterator ({type(self._items).__name__}) was closed by close() after "
                f"{self._read} items and cannot be read again; to resume, build the pipeline over a fresh iterator "
                "and load the saved state, or pass a re-iterable (a list, or an object with __iter__)"
            )

    def _open(self) -> Iterator[Any]:
        self._check_readable()
        if self._iterator is None:
            self._iterator = self._items if self._one_shot else iter(self._items)  # type: ignore[assignment]
            if not self._one_shot:
                self._read = 0
        return self._iterator  # type: ignore[return-value]

    def _catch_up(self, iterator: Iterator[Any]) -> bool:
        """Read and discard items up to the position; False when the iterable ended first."""
        while self._read < self._position:
            try:
                next(iterator)
            except StopIteration:
                self._position = self._read
                return False
            except Exception as exc:  # a failed item counts, as it did when it was first read
                logger.debug("IterableSource: item %d failed again while replaying: %r", self._read, exc)
            self._read += 1
        return True

    def _pull(self) -> Record:
        iterator = self._open()
        if not self._catch_up(iterator):
            raise StopIteration
        position = self._position
        try:
            value = next(iterator)
        except StopIteration:
            raise
        except Exception:
            self._read, self._position = self._read + 1, position + 1
            raise
        self._read, self._position = self._read + 1, position + 1
        return Record(value, 0, (position,))

    def _skip(self, n: int) -> None:
        if n > 0:
            self._position += n
            self._catch_up(self._open())

    def _get_state(self) -> dict[str, Any]:
        return {"position": self._position}

    def _set_state(self, state: Any) -> None:
        state = require_keys(state, ("position",), "IterableSource")
        target = require_int(state, "position", "IterableSource")
        if target < self._read:
            if self._one_shot:
                raise StateError(
                    f"IterableSource: cannot go back to position {target}: {self._read} items were already read "
                    f"from the one-shot iterator ({type(self._items).__name__}); to resume, build the pipeline over "
                    "a fresh iterator and load the state there, or pass a re-iterable (a list, or an object with "
                    "__iter__)"
                )
            self._drop_iterator()
        self._position = target  # the items before it are read (replayed) on the next pull

    def _drop_iterator(self) -> None:
        iterator, self._iterator = self._iterator, None
        if not self._one_shot:
            self._read = 0
        close = getattr(iterator, "close", None)
        if callable(close):
            try:
                close()
            except Exception:
                logger.warning("IterableSource: closing the iterator failed", exc_info=True)

    def _config(self) -> dict[str, Any]:
        return {"kind": "Iterable", "type": type(self._items).__qualname__}

    def _close(self) -> None:
        if self._one_shot:
            if self._closed:
                return
            self._iterator = self._items  # type: ignore[assignment]
            self._closed = True
        self._drop_iterator()


def as_stage(source: Any) -> Pipeline:
    """Wrap a source for a pipeline: pipelines pass through, sequences get random access, iterables replay."""
    if isinstance(source, Pipeline):
        return source
    if isinstance(source, str | bytes | Mapping):
        raise ConfigError(
            f"a source must be a pipeline, a sequence or an iterable of items. Found: {source!r}"
        )
    if isinstance(source, Sequence) or (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
        return SequenceSource(source)
    if isinstance(source, Iterable):
        return IterableSource(source)
    raise ConfigError(
        f"a source must be a pipeline, a sequence or an iterable. Found: {type(source).__name__}"
    )
