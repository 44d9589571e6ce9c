"""Synthetic image-like batches: known content at a known cost, for demos, benchmarks and tests."""

from __future__ import annotations

from collections.abc import Iterator

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
