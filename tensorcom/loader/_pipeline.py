"""What a SwiftLoader consumer's server computes: a tensorcom pipeline over a map-style dataset.

::

    Range(n) | Permutation(n, seed) | NearbyPermutation(n, window, seed)     the order of one epoch
      → Partition(consumer, nb_consumer, drop_last)                         this consumer's share
      → Map(DatasetGetItem(dataset_class, dataset_kwargs), seed=seed)       dataset[index] (+ per-sample rng)
      → Collate(batch_size, return_partial_batch=not drop_last)             stacked, or boxed for a collate_fn
      → Map(BatchPacker(collate_fn, batch_encoder))                         flat arrays for the .ten codec

:func:`swift_pipeline` is the factory a :class:`~tensorcom.server.request.RequestServer` calls in each worker
process, as ``functools.partial(swift_pipeline, spec=spec)``: the spec holds the dataset *class* and its keyword
arguments, never a dataset object, and every worker process constructs the dataset once, on first use.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

from tensorcom.errors import ConfigError, PipelineError, StateError
from tensorcom.loader._tree import pack_tree
from tensorcom.pipeline import Collate, Conveyer, Map, Partition, Permutation, Range
from tensorcom.pipeline.rng import derive_words, validate_seed
from tensorcom.pipeline.sources import _EpochSource
from tensorcom.pipeline.state import require_keys

__all__ = ["NearbyPermutation", "PipelineSpec", "forget_dataset", "swift_pipeline"]


def _module_of(obj: Any) -> str:
    """``obj.__module__``, the same in every process: a spawned child runs the parent's main script as
    ``__mp_main__``, and fingerprints must not change with that."""
    module = getattr(obj, "__module__", None) or "?"
    return "__main__" if module == "__mp_main__" else module


def _qualified_name(obj: Any) -> str:
    return f"{_module_of(obj)}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def kwargs_digest(kwargs: dict[str, Any]) -> str:
    """A short digest of the dataset's keyword arguments (their repr where they are not JSON)."""
    text = json.dumps(kwargs, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=6).hexdigest()


@dataclass(frozen=True)
class PipelineSpec:
    """Everything a worker needs to build a consumer's pipeline (picklable: classes and functions by name)."""

    dataset_class: Any
    dataset_kwargs: dict[str, Any]
    n: int
    batch_size: int
    shuffle: bool
    nearby_shuffle: int
    collate_fn: Any = None
    batch_encoder: Any = None
    benchmark: bool = False
    getitem_wants_rng: bool = False
    drop_last: bool = False


# -- the order of an epoch --------------------------------------------------------------------------------------


class NearbyPermutation(_EpochSource):
    """A shuffle that only reorders samples within windows of ``window`` consecutive indices.

    The indices ``[0, n)`` are cut into windows ``[k * window, (k + 1) * window)``; an epoch visits the full windows
    in a shuffled order (the short remainder window, if any, comes last) and the samples of each window in a
    shuffled order, so ``window`` consecutive positions always read one window of the dataset, which keeps reads
    local for datasets backed by large files. Both orders are :class:`~tensorcom.pipeline.Permutation` lookups keyed
    by ``(seed, epoch)`` (and the window number), so any position maps to its index in O(1) time and memory.
    """

    def __init__(self, n: int, window: int, seed: int = 0, repeating: bool = False, epoch: int = 0) -> None:
        super().__init__(n, repeating, epoch)
        if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
            raise ConfigError(f"window must be an int > 0. Found: {window!r}")
        self._window = window
        self._seed = validate_seed(seed)
        self._salt = self._seed
        self._full = n // window
        order_seed = derive_words(b"tc-nearby-order", [self._seed], 1)[0]
        self._order = Permutation(self._full, seed=order_seed) if self._full > 1 else None
        self._within: tuple[int, Permutation] | None = None

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def window(self) -> int:
        return self._window

    def _window_order(self, window: int, size: int) -> Permutation:
        if self._within is None or self._within[0] != window:
            seed = derive_words(b"tc-nearby-window", [self._seed, window], 1)[0]
            self._within = (window, Permutation(size, seed=seed))
        return self._within[1]

    def _index(self, epoch: int, position: int) -> int:
        block, offset = divmod(position, self._window)
        if block < self._full:
            window = block if self._order is None else self._order.index_at(block, epoch)
            size = self._window
        else:
            window, size = block, self._n - block * self._window
        if size == 1:
            return window * self._window
        return window * self._window + self._window_order(window, size).index_at(offset, epoch)

    def _config(self) -> dict[str, Any]:
        return {
            "kind": "NearbyPermutation",
            "n": self._n,
            "window": self._window,
            "seed": self._seed,
            "repeating": self._repeating,
        }

    def _get_state(self) -> dict[str, Any]:
        return {"seed": self._seed, "epoch": self._epoch, "position": self._position}

    def _set_state(self, state: Any) -> None:
        state = require_keys(state, ("seed", "epoch", "position"), "NearbyPermutation")
        if state["seed"] != self._seed:
            raise StateError(
                f"NearbyPermutation: state was saved with seed {state['seed']!r}, this one has {self._seed}"
            )
        super()._set_state(state)


# -- the dataset, constructed once per worker process -----------------------------------------------------------

_DATASETS: dict[tuple[str, str], Any] = {}


def _dataset_key(dataset_class: Any, dataset_kwargs: dict[str, Any]) -> tuple[str, str]:
    return _qualified_name(dataset_class), kwargs_digest(dataset_kwargs)


def dataset_of(dataset_class: Any, dataset_kwargs: dict[str, Any]) -> Any:
    """``dataset_class(**dataset_kwargs)``, constructed once in this process and then reused."""
    key = _dataset_key(dataset_class, dataset_kwargs)
    dataset = _DATASETS.get(key)
    if dataset is None:
        try:
            dataset = dataset_class(**dataset_kwargs)
        except Exception as exc:
            raise PipelineError(
                f"{_qualified_name(dataset_class)}(**dataset_kwargs) raised {type(exc).__name__}: {exc}"
            ) from exc
        _DATASETS[key] = dataset
    return dataset


def forget_dataset(dataset_class: Any, dataset_kwargs: dict[str, Any]) -> None:
    """Drop this process's dataset instance (the parent does after validating)."""
    _DATASETS.pop(_dataset_key(dataset_class, dataset_kwargs), None)


class Timings:
    """Seconds spent by one pipeline loading samples since the last batch was packed (for ``benchmark``)."""

    def __init__(self) -> None:
        self.loading = 0.0
        self.last_sample_done = time.perf_counter()


class Sample:
    """A sample that ``Collate`` must not stack, because a user ``collate_fn`` batches it."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class DatasetGetItem:
    """``dataset[index]`` for a Map stage; errors name the dataset and the index."""

    def __init__(self, spec: PipelineSpec, timings: Timings | None) -> None:
        self._class = spec.dataset_class
        self._kwargs = spec.dataset_kwargs
        self._box = spec.collate_fn is not None
        self._timings = timings
        # Map's fingerprint names its function: make it name the dataset and its arguments.
        self.__module__ = _module_of(spec.dataset_class)
        self.__qualname__ = (
            f"{getattr(spec.dataset_class, '__qualname__', '?')}[{kwargs_digest(spec.dataset_kwargs)}]"
        )

    def _get(self, index: int, **rng: Any) -> Any:
        dataset = dataset_of(self._class, self._kwargs)
        started = time.perf_counter()
        try:
            value = dataset.__getitem__(index, **rng)
        except Exception as exc:
            raise PipelineError(
                f"dataset[{index}] ({_qualified_name(self._class)}) raised {type(exc).__name__}: {exc}"
            ) from exc
        if self._timings is not None:
            done = time.perf_counter()
            self._timings.loading += done - started
            self._timings.last_sample_done = done
        return Sample(value) if self._box else value

    def __call__(self, index: int) -> Any:
        return self._get(index)


class DatasetGetItemWithRng(DatasetGetItem):
    """``dataset.__getitem__(index, rng=...)`` for datasets that declare an ``rng`` parameter."""

    def __call__(self, index: int, rng: Any) -> Any:  # type: ignore[override]
        return self._get(index, rng=rng)


class BatchPacker:
    """The last stage: the user's ``collate_fn`` and ``batch_encoder`` (if any), then flat arrays to send."""

    def __init__(self, spec: PipelineSpec, timings: Timings | None) -> None:
        self._collate_fn = spec.collate_fn
        self._encoder = spec.batch_encoder
        self._timings = timings
        parts = [_qualified_name(f) for f in (spec.collate_fn, spec.batch_encoder) if f is not None]
        self.__qualname__ = f"BatchPacker({', '.join(parts)})"

    def __call__(self, batch: Any) -> dict[str, Any]:
        if self._collate_fn is not None:
            samples = batch if isinstance(batch, list) else [batch]
            batch = self._collate_fn([sample.value for sample in samples])
        collated = time.perf_counter()
        if self._encoder is not None:
            batch = self._encoder(batch)
        timing = None
        if self._timings is not None:
            batching = collated - self._timings.last_sample_done
            timing = [self._timings.loading, batching, time.perf_counter() - collated]
            self._timings.loading = 0.0
        return pack_tree(batch, timing)


def swift_pipeline(*, seed: int, rank: int, world_size: int, spec: PipelineSpec) -> Conveyer:
    """The pipeline of consumer ``rank`` of ``world_size``: one epoch of batches, a new order every epoch."""
    if not spec.shuffle:
        source: Any = Range(spec.n)
    elif spec.nearby_shuffle >= spec.n:
        source = Permutation(spec.n, seed=seed)
    else:
        source = NearbyPermutation(spec.n, spec.nearby_shuffle, seed=seed)
    timings = Timings() if spec.benchmark else None
    getitem = (DatasetGetItemWithRng if spec.getitem_wants_rng else DatasetGetItem)(spec, timings)
    return Conveyer(
        [
            source,
            Partition(rank, world_size, drop_last=spec.drop_last),
            Map(getitem, seed=seed),
            Collate(spec.batch_size, return_partial_batch=not spec.drop_last),
            Map(BatchPacker(spec, timings)),
        ]
    )
