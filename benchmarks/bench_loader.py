"""Samples per second of SwiftLoader against torch DataLoader on the same map-style dataset.

Both load ``ImageLike(n, work)`` (a 3x64x64 uint8 image and a label per sample, plus ``work`` rounds of numpy
arithmetic standing in for decoding and augmentation), shuffled, in batches of 32, with ``num_workers`` /
``worker_per_consumer`` equal to 1 and 2. Each run reads one epoch; the rate counts the batches after the first, so
process start-up is reported separately and excluded from both. The two loaders take turns, ``--repeat`` times
(best rate of each kept), so ratios are measured side by side in one run (absolute figures drift on shared
machines). Run::

    python benchmarks/bench_loader.py            # under a minute
    python benchmarks/bench_loader.py --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable
from typing import Any

import numpy as np

from tensorcom.loader import SwiftLoader

BATCH_SIZE = 32


class ImageLike:
    """Sample ``i``: a 3x64x64 uint8 image computed from ``i`` with ``work`` rounds of arithmetic, and ``i``."""

    def __init__(self, n: int, work: int) -> None:
        self.n = n
        self.work = work

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        values = np.random.default_rng(index).random(3 * 64 * 64, dtype=np.float32)
        for _ in range(self.work):
            values = np.sin(values * 1.01)
        return (values * 255).astype(np.uint8).reshape(3, 64, 64), index


def measure(batches: Iterable[Any], started: float) -> tuple[float, float, int]:
    """(seconds to the first batch, samples/s after it, batches) for one epoch."""
    iterator = iter(batches)
    next(iterator)
    first = time.perf_counter()
    count = samples = 0
    for images, _ in iterator:
        count += 1
        samples += len(images)
    elapsed = time.perf_counter() - first
    return first - started, samples / elapsed if elapsed > 0 else float("nan"), count + 1


def torch_rate(n: int, work: int, workers: int) -> tuple[float, float, int]:
    from torch.utils.data import DataLoader

    started = time.perf_counter()
    dataset: Any = ImageLike(n, work)  # map-style: DataLoader only needs __len__ and __getitem__
    loader: Any = DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True, num_workers=workers)
    return measure(loader, started)


def swift_rate(n: int, work: int, workers: int) -> tuple[float, float, int]:
    started = time.perf_counter()
    with SwiftLoader(
        ImageLike,
        {"n": n, "work": work},
        batch_size=BATCH_SIZE,
        worker_per_consumer=workers,
        seed_number=0,
        nearby_shuffle=n,
        benchmark=False,
        validate=False,
    ) as loader:
        loader.start(0)
        return measure(loader, started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer samples, one turn each: a few seconds in all"
    )
    parser.add_argument(
        "--repeat", type=int, default=None, help="turns per configuration (default 2, quick 1)"
    )
    args = parser.parse_args()
    n = 1024 if args.quick else 6144
    repeat = args.repeat or (1 if args.quick else 2)
    workloads = {"light": 0, "heavy": 24}
    print(
        f"{n} samples per epoch, batches of {BATCH_SIZE}, 3x64x64 uint8 images; best of {repeat} epochs each"
    )
    print()
    header = (
        f"{'workload':<8} {'workers':>7} {'DataLoader/s':>13} {'SwiftLoader/s':>14} {'ratio':>6} "
        f"{'start DL s':>10} {'start SL s':>10}"
    )
    print(header)
    print("-" * len(header))
    for name, work in workloads.items():
        for workers in (1, 2):
            torch_runs, swift_runs = [], []
            for _ in range(repeat):
                torch_runs.append(torch_rate(n, work, workers))
                swift_runs.append(swift_rate(n, work, workers))
            if {run[2] for run in torch_runs} != {run[2] for run in swift_runs}:
                raise SystemExit(f"batch counts differ: DataLoader {torch_runs}, SwiftLoader {swift_runs}")
            torch_start, torch_samples, _ = max(torch_runs, key=lambda run: run[1])
            swift_start, swift_samples, _ = max(swift_runs, key=lambda run: run[1])
            print(
                f"{name:<8} {workers:>7} {torch_samples:>13.0f} {swift_samples:>14.0f} "
                f"{swift_samples / torch_samples:>6.2f} {torch_start:>10.2f} {swift_start:>10.2f}"
            )
    print()
    print(
        "ratio = SwiftLoader samples/s / DataLoader samples/s, after the first batch of each (> 1: SwiftLoader faster)"
    )


if __name__ == "__main__":
    main()
