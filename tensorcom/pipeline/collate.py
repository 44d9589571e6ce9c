"""``Collate``: group ``batch_size`` items into a batch, stacking arrays along a new first dimension.

Items may be arrays, numbers, torch tensors, or tuples, lists and dicts of those (nested). Numbers and arrays
stack into numpy arrays; torch tensors stack with ``torch.stack`` (torch is imported only when an item is a tensor).
Strings, bytes and other objects are gathered into a list. A batch's metadata holds the dataset indices of all its
samples and the epoch of its first sample.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tensorcom.errors import ConfigError, PipelineError
from tensorcom.pipeline._base import Record, Transform

__all__ = ["Collate", "collate"]


def _is_tensor(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def collate(items: Sequence[Any]) -> Any:
    """Stack a sequence of like-structured items into one batch (see the module docstring)."""
    if len(items) == 0:
        raise PipelineError("collate: cannot make a batch of 0 items")
    first = items[0]
    if isinstance(first, Mapping):
        keys = list(first)
        for item in items:
            if not isinstance(item, Mapping) or list(item) != keys:
                raise PipelineError(
                    f"collate: items must all be dicts with keys {keys}. Found: {_shape(item)}"
                )
        return {key: collate([item[key] for item in items]) for key in keys}
    if isinstance(first, tuple | list):
        for item in items:
            if type(item) is not type(first) or len(item) != len(first):
                raise PipelineError(
                    f"collate: items must all be {type(first).__name__}s of length {len(first)}. Found: {_shape(item)}"
                )
        columns = [collate([item[i] for item in items]) for i in range(len(first))]
        return columns if isinstance(first, list) else tuple(columns)
    if _is_tensor(first):
        import torch

        try:
            return torch.stack(list(items))
        except (RuntimeError, TypeError) as exc:
            raise PipelineError(f"collate: cannot stack tensors: {exc}") from exc
    if isinstance(first, np.ndarray | np.generic | int | float | complex | bool):
        try:
            return np.stack([np.asarray(item) for item in items])
        except ValueError as exc:
            raise PipelineError(f"collate: cannot stack arrays: {exc}") from exc
    return list(items)


def _shape(item: Any) -> str:
    if isinstance(item, Mapping):
        return f"dict with keys {list(item)}"
    if isinstance(item, tuple | list):
        return f"{type(item).__name__} of length {len(item)}"
    return type(item).__name__


def merge_records(records: Sequence[Record], value: Any) -> Record:
    """One record for a batch: every sample's indices (and sources), the first sample's epoch and salt."""
    first = records[0]
    indices = tuple(i for r in records for i in r.indices)
    sources = tuple(s for r in records for s in r.sources)
    return Record(value, first.epoch, indices, first.salt, sources)


class Collate(Transform):
    """Batches of ``batch_size`` items; at the end of a finite stream a last, smaller batch unless told not to.

    On a repeating source, batches run across epoch boundaries (a batch's ``epoch`` is its first sample's). When an
    upstream stage fails on one of a batch's items, the whole batch is skipped and the error raised, so the batches
    after it are the same as in a run without the failure.
    """

    def __init__(self, batch_size: int, return_partial_batch: bool = True) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ConfigError(f"batch_size must be an int > 0. Found: {batch_size!r}")
        self.batch_size = batch_size
        self.return_partial_batch = bool(return_partial_batch)

    def _pull(self) -> Record:
        upstream = self.upstream
        records: list[Record] = []
        state_before = upstream._get_state()
        try:
            while len(records) < self.batch_size:
                records.append(upstream._pull())
        except StopIteration:
            if not records or not self.return_partial_batch:
                raise
        except Exception as exc:
            upstream._set_state(state_before)
            upstream._skip(self.batch_size)
            exc.add_note(
                f"in Collate({self.batch_size}): the whole batch was skipped, so later batches keep their places"
            )
            raise
        return merge_records(records, collate([r.value for r in records]))

    def _skip(self, n: int) -> None:
        self.upstream._skip(n * self.batch_size)

    def _remaining(self) -> float | None:
        remaining = self.upstream._remaining()
        if remaining is None or math.isinf(remaining):
            return remaining
        whole, rest = divmod(int(remaining), self.batch_size)
        return float(whole + (1 if rest and self.return_partial_batch else 0))

    def _own_config(self) -> dict[str, Any]:
        return {"kind": "Collate", "batch_size": self.batch_size, "partial": self.return_partial_batch}
