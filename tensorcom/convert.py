"""Converters applied to decoded arrays: to numpy (identity) or to torch tensors sharing the same memory."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tensorcom.codec import is_bfloat16
from tensorcom.errors import ConfigError

__all__ = ["Converter", "ConverterSpec", "make_converters", "to_numpy", "to_torch"]

Converter = Callable[[np.ndarray], Any]
ConverterSpec = str | Converter | None | Sequence[str | Converter | None]


def to_numpy(array: np.ndarray) -> np.ndarray:
    """Return the array unchanged."""
    return array


def to_torch(array: np.ndarray) -> Any:
    """Wrap the array as a torch tensor without copying (bfloat16 included)."""
    import torch

    if is_bfloat16(array.dtype):
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


_NAMED: dict[str, Converter] = {"numpy": to_numpy, "torch": to_torch}


def _one(spec: str | Converter | None) -> Converter:
    if spec is None:
        return to_numpy
    if isinstance(spec, str):
        if spec not in _NAMED:
            raise ConfigError(f"converter must be one of {', '.join(_NAMED)} or a callable. Found: {spec!r}")
        return _NAMED[spec]
    if not callable(spec):
        raise ConfigError(f"converter must be a name or a callable. Found: {spec!r}")
    return spec


def make_converters(spec: ConverterSpec) -> Callable[[list[np.ndarray]], list[Any]]:
    """Build the function that converts a decoded batch.

    ``spec`` is None or "numpy" (arrays as they are), "torch", a callable applied to every array, or a sequence with
    one of those per position in the batch.
    """
    if spec is None or isinstance(spec, str) or callable(spec):
        convert = _one(spec)
        if convert is to_numpy:
            return lambda arrays: arrays
        return lambda arrays: [convert(a) for a in arrays]
    converters = [_one(item) for item in spec]

    def convert_each(arrays: list[np.ndarray]) -> list[Any]:
        if len(arrays) != len(converters):
            raise ConfigError(f"{len(converters)} converters were given for a batch of {len(arrays)} arrays")
        return [convert(a) for convert, a in zip(converters, arrays, strict=True)]

    return convert_each
