"""Pipeline factories that test servers serve (imported by `tensorcom serve factories:NAME` via PYTHONPATH)."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from tensorcom.pipeline import Collate, Conveyer, Map, Partition, Permutation


def sample(index: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """A small image drawn from the per-sample generator, and the sample's index as its label."""
    return rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), index


def small(
    *, seed: int, rank: int, world_size: int, n: int = 60, batch_size: int = 4, repeating: bool = False
) -> Any:
    """Permutation → Partition → Map(sample) → Collate: labels are the dataset indices."""
    return Conveyer(
        [
            Permutation(n, seed=seed, repeating=repeating),
            Partition(rank, world_size),
            Map(sample),
            Collate(batch_size),
        ]
    )


def fail_on_13(index: int) -> dict[str, Any]:
    """Raise for sample 13, as a corrupt record would."""
    if index == 13:
        raise ValueError("sample 13 is corrupt")
    return {"x": np.full(2, index, np.int32), "label": index}


def failing(*, seed: int, rank: int, world_size: int) -> Any:
    """A pipeline of dict batches in index order whose batch holding sample 13 fails."""
    from tensorcom.pipeline import Range

    return Conveyer([Range(40), Partition(rank, world_size), Map(fail_on_13), Collate(4)])


class _Big:
    __name__ = "big_sample"

    def __init__(self, nbytes: int, delay: float) -> None:
        self.nbytes = nbytes
        self.delay = delay

    def __call__(self, index: int) -> tuple[np.ndarray, int]:
        if self.delay:
            time.sleep(self.delay)
        return np.full(self.nbytes, index % 251, np.uint8), index


def big(*, seed: int, rank: int, world_size: int, nbytes: int = 1 << 20, delay: float = 0.0) -> Any:
    """Endless 1 MB samples in batches of 2 (for memory and failover tests); ``delay`` seconds per sample."""
    return Conveyer(
        [
            Permutation(1000, seed=seed, repeating=True),
            Partition(rank, world_size),
            Map(_Big(nbytes, delay)),
            Collate(2),
        ]
    )


def not_a_pipeline(*, seed: int, rank: int, world_size: int) -> Any:
    """A factory that returns something that is not a pipeline."""
    return [1, 2, 3]


def pid(**_: Any) -> int:
    return os.getpid()


class _HangIf:
    """A map function that never returns (a 10-minute sleep, like a read from a dead NFS mount) in a process whose
    environment has TENSORCOM_TEST_HANG=1, and returns the sample elsewhere: servers that differ only by it serve
    the same pipeline (the same fingerprint)."""

    __name__ = "hang_if"

    def __call__(self, index: int) -> tuple[np.ndarray, int]:
        if os.environ.get("TENSORCOM_TEST_HANG") == "1":
            time.sleep(600)
        return np.full(8, index % 251, np.uint8), index


def hanging(*, seed: int, rank: int, world_size: int) -> Any:
    """Endless small batches of 2 that hang where TENSORCOM_TEST_HANG=1 (see _HangIf)."""
    return Conveyer(
        [
            Permutation(1000, seed=seed, repeating=True),
            Partition(rank, world_size),
            Map(_HangIf()),
            Collate(2),
        ]
    )
