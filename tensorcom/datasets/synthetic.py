"""Synthetic image-like batches: known content at a known cost, for demos, benchmarks and tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from tensorcom.errors import ConfigError

__all__ = ["synthetic_batches"]


def synthetic_batches(
    batch_size: int = 64,
    size: int = 224,
    *,
    count: int | None = None,
    classes: int = 1000,
    seed: int = 0,
    pool: int = 4,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(images, labels)``: uint8 NHWC images of ``size``×``size``×3 and int64 labels.

    Images are drawn once into a pool of ``pool`` batches and reused in turn, so producing a batch costs nothing
    and a benchmark measures the transport. Batch ``i`` has image pool entry ``i % pool`` and the labels
    ``(i * batch_size + arange(batch_size)) % classes``, which lets a receiver check order and completeness.
    """
    for name, value in (("batch_size", batch_size), ("size", size), ("classes", classes), ("pool", pool)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1. Found: {value}")
    if count is not None and count < 0:
        raise ConfigError(f"count must be >= 0 or None. Found: {count}")
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8) for _ in range(pool)]
    step = 0
    while count is None or step < count:
        labels = (step * batch_size + np.arange(batch_size, dtype=np.int64)) % classes
        yield images[step % pool], labels
        step += 1


def _synthetic_sample(
    index: int, rng: np.random.Generator, *, size: int, classes: int
) -> tuple[np.ndarray, int]:
    """One image whose pixels depend on (seed, epoch, index) only, and its label ``index % classes``."""
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    return image, index % classes


class _SampleMaker:
    """Picklable map function for :func:`synthetic_pipeline` (module-level, so worker processes import it)."""

    def __init__(self, size: int, classes: int) -> None:
        self.size = size
        self.classes = classes
        self.__name__ = f"synthetic_sample_{size}_{classes}"

    def __call__(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        return _synthetic_sample(index, rng, size=self.size, classes=self.classes)


def synthetic_pipeline(
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    n: int = 10_000,
    batch_size: int = 16,
    size: int = 32,
    classes: int = 1000,
    repeating: bool = True,
) -> Any:
    """A deterministic pipeline of random images: Permutation → Partition → Map(per-sample rng) → Collate.

    The factory of ``tensorcom serve tensorcom.datasets.synthetic:synthetic_pipeline``; batches are ``(images, labels)``
    with uint8 NHWC images and int64 labels equal to each sample's dataset index modulo ``classes``.
    """
    from tensorcom.pipeline import Collate, Conveyer, Map, Partition, Permutation

    return Conveyer(
        [
            Permutation(n, seed=seed, repeating=repeating),
            Partition(rank, world_size),
            Map(_SampleMaker(size, classes)),
            Collate(batch_size),
        ]
    )
