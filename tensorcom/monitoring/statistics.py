"""Statistics of the arrays in a stream of batches, per position in the batch: what ``tensorstat`` reports.

:class:`ArrayStatistics` follows one position (say, the images) over many batches: dtypes and shapes seen, the
minimum, maximum, mean and standard deviation of its finite values (exactly what numpy gives on the concatenated
finite values; batches are merged with Chan et al.'s pairwise update in float64), the number of NaN and infinite
values, and, for 1-D integer arrays (labels), how often each value occurs. :class:`BatchStatistics` holds one per
position.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from tensorcom.codec import is_bfloat16
from tensorcom.errors import ConfigError

__all__ = ["ArrayStatistics", "BatchStatistics"]

_MAX_CLASSES = 65536


def _numeric(array: Any) -> np.ndarray:
    """The array as numpy in a dtype numpy can reduce (bfloat16 to float32, bool to uint8)."""
    values = np.asarray(array)
    if is_bfloat16(values.dtype):
        return values.astype(np.float32)
    if values.dtype.kind == "b":
        return values.view(np.uint8)
    if values.dtype.kind not in "iuf":
        raise ConfigError(f"statistics need numeric arrays. Found dtype {values.dtype}")
    return values


class ArrayStatistics:
    """Running statistics of the arrays found at one position of the batches.

    Args:
        sample_limit: how many finite values to keep (spread over the batches) for drawing a value histogram;
            0 keeps none.
    """

    def __init__(self, sample_limit: int = 0) -> None:
        self.batches = 0
        self.dtypes: Counter[str] = Counter()
        self.shapes: Counter[tuple[int, ...]] = Counter()
        self.elements = 0
        self.finite = 0
        self.nan = 0
        self.inf = 0
        self.minimum: float | int | None = None
        self.maximum: float | int | None = None
        self._mean = 0.0
        self._squares = 0.0  # sum of squared deviations from the mean
        self.classes: Counter[int] | None = Counter()
        self.samples: list[np.ndarray] = []
        self._sample_limit = sample_limit
        self._sampled = 0

    def update(self, array: Any) -> None:
        """Add one batch's array at this position."""
        original = np.asarray(array)
        values = _numeric(original)
        self.batches += 1
        self.dtypes[str(original.dtype)] += 1
        self.shapes[tuple(int(n) for n in original.shape)] += 1
        self.elements += values.size
        flat = values.reshape(-1)
        if values.dtype.kind == "f":
            nan = int(np.count_nonzero(np.isnan(flat)))
            inf = int(np.count_nonzero(np.isinf(flat)))
            self.nan += nan
            self.inf += inf
            if nan or inf:
                flat = flat[np.isfinite(flat)]
        self._update_moments(flat)
        self._update_classes(original, flat)
        self._keep_samples(flat)

    def _update_moments(self, flat: np.ndarray) -> None:
        count = flat.size
        if count == 0:
            return
        exact = flat.dtype.kind in "iu"
        low, high = (int(flat.min()), int(flat.max())) if exact else (float(flat.min()), float(flat.max()))
        self.minimum = low if self.minimum is None else min(self.minimum, low)
        self.maximum = high if self.maximum is None else max(self.maximum, high)
        mean = float(np.mean(flat, dtype=np.float64))
        squares = float(np.var(flat, dtype=np.float64)) * count
        total = self.finite + count
        delta = mean - self._mean
        self._mean += delta * count / total
        self._squares += squares + delta * delta * self.finite * count / total
        self.finite = total

    def _update_classes(self, original: np.ndarray, flat: np.ndarray) -> None:
        if self.classes is None:
            return
        if original.ndim != 1 or original.dtype.kind not in "iu":
            self.classes = None
            return
        values, counts = np.unique(flat, return_counts=True)
        self.classes.update(dict(zip(values.tolist(), counts.tolist(), strict=True)))
        if len(self.classes) > _MAX_CLASSES:
            self.classes = None

    def _keep_samples(self, flat: np.ndarray) -> None:
        room = self._sample_limit - self._sampled
        if room <= 0 or flat.size == 0:
            return
        # an even share of the limit per batch for the first batches, then whatever room is left
        share = min(room, max(1, self._sample_limit // 16))
        step = max(1, -(-flat.size // share))
        kept = np.array(flat[::step], dtype=np.float64)
        self.samples.append(kept)
        self._sampled += kept.size

    @property
    def mean(self) -> float | None:
        """The mean of the finite values (None if there were none)."""
        return self._mean if self.finite else None

    @property
    def std(self) -> float | None:
        """The population standard deviation (numpy's default, ddof=0) of the finite values."""
        return float(np.sqrt(self._squares / self.finite)) if self.finite else None

    @property
    def is_labels(self) -> bool:
        """True when every array here was 1-D integer, so the class histogram is meaningful."""
        return self.classes is not None and self.batches > 0

    def histogram(self, bins: int = 50) -> tuple[np.ndarray, float, float]:
        """Counts in at most ``bins`` equal bins from ``low`` to ``high`` (numpy's edges): of every label for
        label arrays, of the kept samples of finite values otherwise. Integer values get bins of a whole width (one
        value per bin when there are few), so no bin holds more distinct values than another. Returns
        (counts, low, high)."""
        if bins < 1:
            raise ConfigError(f"bins must be >= 1. Found: {bins}")
        if self.minimum is None or self.maximum is None:
            return np.zeros(0, np.int64), 0.0, 0.0
        weights = None
        if self.is_labels and self.classes is not None:
            values = np.array(list(self.classes.keys()), dtype=np.float64)
            weights = np.array(list(self.classes.values()), dtype=np.float64)
        else:
            values = np.concatenate(self.samples) if self.samples else np.zeros(0)
        low = float(self.minimum)
        if isinstance(self.minimum, int) and isinstance(self.maximum, int):
            span = self.maximum - self.minimum + 1
            width = -(-span // bins)
            bins = -(-span // width)
            high = low + bins * width
        else:
            high = float(self.maximum) if self.maximum > self.minimum else low + 1
        counts, _ = np.histogram(values, bins=bins, range=(low, high), weights=weights)
        return counts.astype(np.int64), low, high

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures; ``classes`` maps each label value (as a string) to its count, for label arrays."""
        result: dict[str, Any] = {
            "batches": self.batches,
            "dtypes": dict(self.dtypes),
            "shapes": [{"shape": list(shape), "batches": n} for shape, n in self.shapes.items()],
            "elements": self.elements,
            "min": self.minimum,
            "max": self.maximum,
            "mean": self.mean,
            "std": self.std,
            "nan": self.nan,
            "inf": self.inf,
        }
        if self.is_labels and self.classes is not None:
            result["classes"] = {str(k): v for k, v in sorted(self.classes.items())}
        return result


class BatchStatistics:
    """:class:`ArrayStatistics` for every position of the batches seen so far."""

    def __init__(self, sample_limit: int = 0) -> None:
        self.batches = 0
        self.positions: list[ArrayStatistics] = []
        self._sample_limit = sample_limit

    def update(self, batch: Sequence[Any]) -> None:
        """Add a batch (a list of arrays); a position that a batch lacks is simply not counted for it."""
        while len(self.positions) < len(batch):
            self.positions.append(ArrayStatistics(self._sample_limit))
        for statistics, array in zip(self.positions, batch, strict=False):
            statistics.update(array)
        self.batches += 1

    def to_dict(self) -> dict[str, Any]:
        """``{"batches": N, "positions": [per-position figures, ...]}``."""
        return {
            "batches": self.batches,
            "positions": [{"position": i, **s.to_dict()} for i, s in enumerate(self.positions)],
        }
