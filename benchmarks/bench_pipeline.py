"""Items per second of DistributedBatchedMap against torch DataLoader running the same function.

Both run ``work(index)`` over a map-style dataset with 1 and 2 worker processes and deliver single items (no
batching) in order. Timing starts after the first item, so process start-up is excluded from both. Ratios are taken
side by side in one run (absolute figures drift on shared machines). Run::

    python benchmarks/bench_pipeline.py            # about 30-60 s
    python benchmarks/bench_pipeline.py --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from tensorcom.pipeline import Conveyer, DistributedBatchedMap, Range


def light(index: int) -> int:
    """Almost no work: measures the per-item cost of the machinery."""
    return index * 2


def heavy(index: int) -> float:
    """About a millisecond of single-threaded numpy work, like decoding and augmenting a small image."""
    values = np.random.default_rng(index).random(2_000)
    for _ in range(40):
        values = np.sin(values * 1.01)
    return float(values.sum())


WORKLOADS: dict[str, Callable[[int], Any]] = {"light": light, "heavy": heavy}


class Dataset:
    """Map-style dataset for torch: item ``i`` is ``fn(i)``."""

    def __init__(self, fn: Callable[[int], Any], n: int) -> None:
        self.fn, self.n = fn, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Any:
        return self.fn(index)


def rate(iterator: Iterator[Any], n: int) -> float:
    next(iterator)
    start = time.perf_counter()
    for _ in range(n - 1):
        next(iterator)
    return (n - 1) / (time.perf_counter() - start)


def ours(fn: Callable[[int], Any], n: int, workers: int) -> float:
    with Conveyer([Range(n), DistributedBatchedMap(fn, n_workers=workers)]) as pipeline:
        return rate(pipeline, n)


def torch_loader(fn: Callable[[int], Any], n: int, workers: int) -> float:
    from torch.utils.data import DataLoader

    dataset: Any = Dataset(fn, n)
    loader: Any = DataLoader(dataset, batch_size=None, num_workers=workers, shuffle=False)
    iterator = iter(loader)
    try:
        return rate(iterator, n)
    finally:
        del iterator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few items, for a smoke run")
    args = parser.parse_args()
    sizes = {"light": 2000, "heavy": 300} if args.quick else {"light": 20000, "heavy": 4000}

    rows = []
    for name, fn in WORKLOADS.items():
        for workers in (1, 2):
            mine = ours(fn, sizes[name], workers)
            theirs = torch_loader(fn, sizes[name], workers)
            rows.append((name, workers, sizes[name], mine, theirs))

    print(
        f"{'workload':<8} {'workers':>7} {'items':>6} {'DBM items/s':>12} {'DataLoader items/s':>19} {'ratio':>6}"
    )
    for name, workers, n, mine, theirs in rows:
        print(f"{name:<8} {workers:>7} {n:>6} {mine:>12.0f} {theirs:>19.0f} {mine / theirs:>6.2f}")
    print("ratio = DistributedBatchedMap / torch DataLoader (same function, same worker count, one run)")


if __name__ == "__main__":
    main()
