"""Samples per second of SwiftLoader against torch DataLoader on the same map-style dataset.

Both load ``ImageLike(n, work)`` (a 3x64x64 uint8 image and a label per sample, plus ``work`` rounds of numpy
arithmetic standing in for decoding and augmentation), shuffled, in batches of 32, with ``num_workers`` /
``worker_per_consumer`` equal to 1 and 2. Each run reads two epochs: the rate is that of the second (the steady
state; DataLoader keeps its workers, ``persistent_workers=True``), after its first batch, so start-up is reported
separately and excluded from both. Start-up is the time from constructing the loader to its
first batch: DataLoader forks its workers; SwiftLoader (default options: validation, warm start) computes its first
batches in the training process while its server and worker processes start. The two loaders take turns,
``--repeat`` times; the figures are medians and each ratio is the median of the ratios within a turn, so ratios are
measured side by side in one run (absolute figures drift on shared machines). Run::

    python benchmarks/bench_loader.py            # under a minute
    python benchmarks/bench_loader.py --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Iterable
from pathlib import Path
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


def two_epochs(loader: Iterable[Any], started: float) -> tuple[float, float, int]:
    """(seconds from ``started`` to the first batch, samples/s of the second epoch after its first batch, batches
    per epoch). The first epoch holds the start-up (SwiftLoader computes its first batches in the training process
    while its workers start, see tensorcom.loader._warm); the second is the steady state of both loaders."""
    first_epoch = iter(loader)
    next(first_epoch)
    first = time.perf_counter()
    for _ in first_epoch:
        pass
    second_epoch = iter(loader)
    next(second_epoch)
    second = time.perf_counter()
    count = 1
    samples = 0
    for images, _ in second_epoch:
        count += 1
        samples += len(images)
    elapsed = time.perf_counter() - second
    return first - started, samples / elapsed if elapsed > 0 else float("nan"), count


def torch_rate(n: int, work: int, workers: int) -> tuple[float, float, int]:
    from torch.utils.data import DataLoader

    started = time.perf_counter()
    dataset: Any = ImageLike(n, work)  # map-style: DataLoader only needs __len__ and __getitem__
    loader: Any = DataLoader(
        dataset, batch_size=BATCH_SIZE, shuffle=True, num_workers=workers, persistent_workers=workers > 0
    )
    return two_epochs(loader, started)


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
    ) as loader:
        loader.start(0)
        return two_epochs(loader, started)


WORKLOADS = {"light": 0, "heavy": 24}


def measure(quick: bool = False, repeat: int | None = None) -> list[dict[str, Any]]:
    """One row per (workload, workers): medians of both loaders' samples/s and start-up, and every sample."""
    n = 1024 if quick else 4096
    repeat = repeat or (1 if quick else 3)
    rows = []
    for name, work in WORKLOADS.items():
        for workers in (1, 2):
            torch_runs, swift_runs = [], []
            for round_number in range(repeat):
                print(f"loader {name} {workers} workers round {round_number + 1}/{repeat}", file=sys.stderr)
                torch_runs.append(torch_rate(n, work, workers))
                swift_runs.append(swift_rate(n, work, workers))
            if {run[2] for run in torch_runs} != {run[2] for run in swift_runs}:
                raise SystemExit(f"batch counts differ: DataLoader {torch_runs}, SwiftLoader {swift_runs}")
            rows.append(
                {
                    "group": "loader",
                    "case": f"SwiftLoader, {name} work, {workers} workers",
                    "workload": name,
                    "workers": workers,
                    "samples_per_epoch": n,
                    "batch_size": BATCH_SIZE,
                    "swift_samples_per_s": statistics.median(run[1] for run in swift_runs),
                    "dataloader_samples_per_s": statistics.median(run[1] for run in torch_runs),
                    "vs_dataloader": statistics.median(
                        s[1] / t[1] for s, t in zip(swift_runs, torch_runs, strict=True)
                    ),
                    "swift_start_s": statistics.median(run[0] for run in swift_runs),
                    "dataloader_start_s": statistics.median(run[0] for run in torch_runs),
                    "start_vs_dataloader": statistics.median(
                        s[0] / t[0] for s, t in zip(swift_runs, torch_runs, strict=True)
                    ),
                    "samples": {"swift": swift_runs, "dataloader": torch_runs},
                }
            )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| work | workers | SwiftLoader samples/s | DataLoader samples/s | vs DataLoader | start SwiftLoader s | "
        "start DataLoader s | start ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        ratio = r.get("start_vs_dataloader")
        lines.append(
            f"| {r['workload']} | {r['workers']} | {r['swift_samples_per_s']:.0f} | "
            f"{r['dataloader_samples_per_s']:.0f} | {r['vs_dataloader']:.2f} | {r['swift_start_s']:.3f} | "
            f"{r['dataloader_start_s']:.3f} | {'—' if ratio is None else f'{ratio:.2f}'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer samples, one turn each: a few seconds in all"
    )
    parser.add_argument(
        "--repeat", type=int, default=None, help="turns per configuration (default 3, quick 1)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the rows to FILE as JSON")
    args = parser.parse_args()
    rows = measure(args.quick, args.repeat)
    if args.json:
        Path(args.json).write_text(json.dumps(rows))
    print(
        f"{rows[0]['samples_per_epoch']} samples per epoch, batches of {BATCH_SIZE}, 3x64x64 uint8 images; "
        "medians over the turns"
    )
    print()
    print(format_table(rows))
    print()
    print(
        "vs DataLoader = SwiftLoader samples/s / DataLoader samples/s in the second epoch, after its first batch "
        "(> 1: SwiftLoader faster); start = seconds from construction to the first batch; "
        "start ratio = SwiftLoader's / DataLoader's (< 1: SwiftLoader starts faster)"
    )


if __name__ == "__main__":
    main()
