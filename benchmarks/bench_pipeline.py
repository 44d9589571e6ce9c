"""Items per second of DistributedBatchedMap and PipelineBuilder against torch DataLoader running the same function.

All three run ``work(index)`` over indices ``0..n-1`` with 1 and 2 workers and deliver single items (no batching)
in order: DistributedBatchedMap and DataLoader in worker processes, PipelineBuilder in a thread pool of that size
(``pipe(work, concurrency=N)``, ``build(num_threads=N)``). Timing starts after the first item, so start-up is
excluded. The three take turns, ``--repeat`` rounds; the figures are medians, and each ratio is the median of the
ratios within a round (absolute figures drift on shared machines).

Then ``Join`` at corpus scale: three ``Permutation`` sources of 10**6 to 10**8 samples in all (70/25/5), weighted by
their sizes (the Conveyer README's advice, one block = the whole corpus). Reported: the memory it allocates
(tracemalloc peak while building it, reading 10,000 items and skipping to the middle of the epoch), the time to
build it and to its first item, microseconds per item, and the skip. For comparison, the same arrangement as a
per-sample table (what Join did before: a shuffled source number per position and each source's positions) is
built at the sizes where it fits. Run::

    python benchmarks/bench_pipeline.py            # about a minute and a half
    python benchmarks/bench_pipeline.py --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tensorcom.pipeline import Conveyer, DistributedBatchedMap, Join, Permutation, PipelineBuilder, Range


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


# -- Join at corpus scale ------------------------------------------------------------------------------------------

JOIN_SHARES = (0.70, 0.25, 0.05)
JOIN_READ = 10_000


def join_sizes(total: int) -> list[int]:
    """Source sizes for ``total`` samples in JOIN_SHARES, nudged so that no common divisor shrinks the block."""
    sizes = [max(1, int(total * share)) for share in JOIN_SHARES]
    sizes[0] += total - sum(sizes) + 1
    return sizes


def _exercise_join(sizes: list[int], stamps: list[float]) -> Join:
    """Build a Join of ``sizes``, read JOIN_READ items, skip to the middle of the epoch, read one more; the time
    after each step is appended to ``stamps``."""
    stamps.append(time.perf_counter())
    join = Join([(Permutation(n, seed=i), n) for i, n in enumerate(sizes)], seed=1)
    stamps.append(time.perf_counter())
    next(join)
    stamps.append(time.perf_counter())
    for _ in range(JOIN_READ - 1):
        next(join)
    stamps.append(time.perf_counter())
    join.skip(sum(sizes) // 2)
    next(join)
    stamps.append(time.perf_counter())
    return join


def join_figures(total: int) -> dict[str, float]:
    """Memory (tracemalloc, one pass) and times (another pass, untraced) of a Join whose weights are the sizes of
    sources of ``total`` samples in all."""
    sizes = join_sizes(total)
    _exercise_join(join_sizes(10**5), [])  # one-time allocations (imports, caches) are not the Join's
    tracemalloc.start()
    try:
        join = _exercise_join(sizes, [])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    if sum(join.units) != sum(sizes):
        raise SystemExit(f"Join block {sum(join.units)} is not the corpus {sum(sizes)}")
    stamps: list[float] = []
    _exercise_join(sizes, stamps)
    started, built, first, read, skipped = stamps
    return {
        "peak_bytes": peak,
        "build_s": built - started,
        "first_item_s": first - built,
        "item_us": (read - first) / (JOIN_READ - 1) * 1e6,
        "skip_half_ms": (skipped - read) * 1e3,
    }


def table_figures(total: int) -> dict[str, float]:
    """The same weights as a per-sample table: a seeded shuffle of every position's source number, plus each source's
    positions (for counting), as Join kept them before; its peak memory and build time."""
    sizes = join_sizes(total)
    tracemalloc.start()
    try:
        started = time.perf_counter()
        rng = np.random.Generator(np.random.Philox(key=1))
        pattern = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
        slots = [np.flatnonzero(pattern == s) for s in range(len(sizes))]
        built = time.perf_counter()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del pattern, slots
    return {"table_peak_bytes": peak, "table_build_s": built - started}


def measure_join(quick: bool = False, repeat: int | None = None) -> list[dict[str, Any]]:
    """One row per corpus size: the Join's figures (medians over the rounds) and, where it fits, the table's."""
    repeat = repeat or (1 if quick else 3)
    totals = (10**6, 10**7, 10**8)
    table_totals = (10**6,) if quick else (10**6, 10**7)
    rows = []
    for total in totals:
        print(f"join {total} samples", file=sys.stderr)
        runs = [join_figures(total) for _ in range(repeat)]
        row: dict[str, Any] = {
            "group": "join",
            "case": f"Join, weights = sizes, {total:.0e} samples",
            "samples": total,
            "sources": len(JOIN_SHARES),
            **{key: statistics.median(run[key] for run in runs) for key in runs[0]},
            "bytes_per_sample": statistics.median(run["peak_bytes"] for run in runs) / total,
            "runs": runs,
        }
        if total in table_totals:
            tables = [table_figures(total) for _ in range(repeat)]
            row.update({key: statistics.median(t[key] for t in tables) for key in tables[0]})
            row["table_bytes_per_sample"] = row["table_peak_bytes"] / total
        rows.append(row)
    return rows


def format_join_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| samples (3 sources) | Join peak memory | per sample | build | first item | per item | skip half "
        "| per-sample table | table build |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        table = (
            f"{r['table_peak_bytes'] / 1e6:.0f} MB ({r['table_bytes_per_sample']:.1f} B/sample) | "
            f"{r['table_build_s']:.2f} s"
            if "table_peak_bytes" in r
            else "— | —"
        )
        lines.append(
            f"| {r['samples']:.0e} | {r['peak_bytes'] / 1e3:.0f} KB | {r['bytes_per_sample']:.4f} B | "
            f"{r['build_s'] * 1e3:.2f} ms | {r['first_item_s'] * 1e3:.1f} ms | {r['item_us']:.1f} µs | "
            f"{r['skip_half_ms']:.1f} ms | {table} |"
        )
    return "\n".join(lines)


def format_table(rows: list[dict[str, Any]]) -> str:
    joins = [r for r in rows if r.get("group") == "join"]
    rows = [r for r in rows if r.get("group", "pipeline") == "pipeline"]
    lines = [
        "| stage | work | workers | items/s | DataLoader items/s | vs DataLoader |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in sorted(rows, key=lambda r: (STAGES.index(r["stage"]), r["workload"] != "light", r["workers"])):
        lines.append(
            f"| {r['stage']} | {r['workload']} | {r['workers']} | {r['items_per_s']:.0f} | "
            f"{r['dataloader_items_per_s']:.0f} | {r['vs_dataloader']:.2f} |"
        )
    if joins:
        lines += [
            "",
            "Join with weights equal to the sources' sizes (70/25/5 %): memory it allocates (tracemalloc peak: "
            f"build, {JOIN_READ} items, skip to mid-epoch), times; against a per-sample table of the same weights.",
            "",
            format_join_table(joins),
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few items, one round: a few seconds")
    parser.add_argument("--repeat", type=int, default=None, help="rounds (default 3, quick 1)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows to FILE as JSON")
    args = parser.parse_args()
    rows = measure(args.quick, args.repeat) + measure_join(args.quick, args.repeat)
    if args.json:
        Path(args.json).write_text(json.dumps(rows))
    print(format_table(rows))
    print("PipelineBuilder runs the function in threads (workers = threads); the others in processes")


if __name__ == "__main__":
    main()
