"""An example pipeline factory for the recipes in docs/deploy.md: ``tensorcom serve data:make``.

Replace :func:`load` with your dataset's decoding and augmentation; keep every random choice on the ``rng`` it is
given (keyed by seed, epoch and sample index), so any server computes the same batch for the same step.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from tensorcom.pipeline import Collate, Conveyer, Map, Partition, Permutation


def load(index: int, rng: np.random.Generator, *, size: int) -> tuple[np.ndarray, int]:
    """A stand-in sample: a random uint8 image and a label derived from the index."""
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8), index % 1000


def make(
    *, seed: int, rank: int, world_size: int, n: int = 1_281_167, batch_size: int = 64, size: int = 224
) -> Any:
    """Shuffle n samples per epoch, give this rank its share, load and batch them."""
    return Conveyer(
        [
            Permutation(n, seed=seed, repeating=True),
            Partition(rank, world_size),
            Map(functools.partial(load, size=size)),
            Collate(batch_size),
        ]
    )
