"""Items per second of DistributedBatchedMap and PipelineBuilder against torch DataLoader running the same function.

All three run ``work(index)`` over indices ``0..n-1`` with 1 and 2 workers and deliver single items (no batching)
in order: DistributedBatchedMap and DataLoader in worker processes, PipelineBuilder in a thread pool of that size
(``pipe(work, concurrency=N)``, ``build(num_threads=N)``). Timing starts after the first item, so start-up is
excluded. The three take turns, ``--repeat`` rounds; the figures are medians, and each ratio is the median of the
ratios within a round (absolute figures drift on shared machines). Run::

    python benchmarks/bench_pipeline.py            # about a minute and a half
    python benchmarks/bench_pipeline.py --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tensorcom.pipeline import Conveyer, DistributedBatchedMap, PipelineBuilder, Range


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
STAGES = ("DistributedBatchedMap", "PipelineBuilder")


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


def distributed_map(fn: Callable[[int], Any], n: int, workers: int) -> float:
    with Conveyer([Range(n), DistributedBatchedMap(fn, n_workers=workers)]) as pipeline:
        return rate(iter(pipeline), n)


def builder(fn: Callable[[int], Any], n: int, workers: int) -> float:
    built = (
        PipelineBuilder()
        .add_source(range(n))
        .pipe(fn, concurrency=workers)
        .add_sink(2 * workers + 2)
        .build(num_threads=workers)
    )
    with built as pipeline:
        return rate(iter(pipeline), n)


def torch_loader(fn: Callable[[int], Any], n: int, workers: int) -> float:
    from torch.utils.data import DataLoader

    dataset: Any = Dataset(fn, n)
    loader: Any = DataLoader(dataset, batch_size=None, num_workers=workers, shuffle=False)
    iterator = iter(loader)
    try:
        return rate(iterator, n)
    finally:
        del iterator


RUNNERS: dict[str, Callable[[Callable[[int], Any], int, int], float]] = {
    "DistributedBatchedMap": distributed_map,
    "PipelineBuilder": builder,
    "DataLoader": torch_loader,
}


def measure(quick: bool = False, repeat: int | None = None) -> list[dict[str, Any]]:
    """One row per (stage, workload, workers): items/s, DataLoader's items/s, their ratio, every sample."""
    repeat = repeat or (1 if quick else 3)
    sizes = {"light": 2000, "heavy": 300} if quick else {"light": 20000, "heavy": 3000}
    rows = []
    for name, fn in WORKLOADS.items():
        for workers in (1, 2):
            samples: dict[str, list[float]] = {runner: [] for runner in RUNNERS}
            for round_number in range(repeat):
                print(f"pipeline {name} {workers} workers round {round_number + 1}/{repeat}", file=sys.stderr)
                for runner, run in RUNNERS.items():
                    samples[runner].append(run(fn, sizes[name], workers))
            theirs = samples["DataLoader"]
            for stage in STAGES:
                unit = "threads" if stage == "PipelineBuilder" else "workers"
                rows.append(
                    {
                        "group": "pipeline",
                        "case": f"{stage}, {name} work, {workers} {unit}",
                        "stage": stage,
                        "workload": name,
                        "workers": workers,
                        "items": sizes[name],
                        "items_per_s": statistics.median(samples[stage]),
                        "dataloader_items_per_s": statistics.median(theirs),
                        "vs_dataloader": statistics.median(
                            a / b for a, b in zip(samples[stage], theirs, strict=True)
                        ),
                        "samples": samples[stage],
                        "dataloader_samples": theirs,
                    }
                )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| stage | work | workers | items/s | DataLoader items/s | vs DataLoader |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in sorted(rows, key=lambda r: (STAGES.index(r["stage"]), r["workload"] != "light", r["workers"])):
        lines.append(
            f"| {r['stage']} | {r['workload']} | {r['workers']} | {r['items_per_s']:.0f} | "
            f"{r['dataloader_items_per_s']:.0f} | {r['vs_dataloader']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few items, one round: a few seconds")
    parser.add_argument("--repeat", type=int, default=None, help="rounds (default 3, quick 1)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows to FILE as JSON")
    args = parser.parse_args()
    rows = measure(args.quick, args.repeat)
    if args.json:
        Path(args.json).write_text(json.dumps(rows))
    print(format_table(rows))
    print("PipelineBuilder runs the function in threads (workers = threads); the others in processes")


if __name__ == "__main__":
    main()
