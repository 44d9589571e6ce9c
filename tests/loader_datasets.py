"""Map-style datasets for the SwiftLoader tests (module level, so the loader's worker processes can import them)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np


class Labelled:
    """Sample ``i`` is ``{"x": a small float32 array filled with i, "label": i}``."""

    def __init__(self, n: int = 40, size: int = 3) -> None:
        self.n = n
        self.size = size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"x": np.full(self.size, index, np.float32), "label": index}


class Noisy:
    """Sample ``i`` draws from the per-sample generator the loader passes in: (noise, i)."""

    def __init__(self, n: int = 40) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        return rng.standard_normal(4).astype(np.float32), index


class Mixed:
    """Tensors, strings and nested lists in one sample, to check that batches keep their structure."""

    def __init__(self, n: int = 12) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        return {
            "image": torch.full((2, 2), float(index)),
            "name": f"sample-{index}",
            "pair": [np.int64(index), np.array([index, -index], np.int16)],
        }


class Faulty:
    """Raises for the indices in ``raise_at``; kills its worker process (os._exit) for those in ``exit_at``."""

    def __init__(self, n: int = 40, raise_at: tuple[int, ...] = (), exit_at: tuple[int, ...] = ()) -> None:
        self.n = n
        self.raise_at = set(raise_at)
        self.exit_at = set(exit_at)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index in self.exit_at:
            os._exit(7)
        if index in self.raise_at:
            raise ValueError(f"record {index} is corrupt")
        return {"x": np.full(2, index, np.int32), "label": index}


class BrokenConstructor:
    """A dataset whose constructor fails (a missing file, say)."""

    def __init__(self, path: str = "/nonexistent/data.bin") -> None:
        raise FileNotFoundError(path)


def stack_labels(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """A custom collate_fn: labels as a list of Python ints, x summed."""
    return {"labels": [int(s["label"]) for s in samples], "total": np.sum([s["x"] for s in samples], axis=0)}


def to_bytes(batch: dict[str, Any]) -> bytes:
    """A batch_encoder: the labels as int64 bytes."""
    return np.asarray(batch["label"], dtype=np.int64).tobytes()


def from_bytes(data: bytes) -> list[int]:
    """The matching batch_decoder; it refuses a batch holding label 7, as a decoder meeting bad bytes would."""
    labels: list[int] = np.frombuffer(data, dtype=np.int64).tolist()
    if 7 in labels:
        raise ValueError("cannot decode a batch with label 7")
    return labels
