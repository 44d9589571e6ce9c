"""Images per second of serve-imagenet-dir against torch DataLoader doing the same decode and augmentation.

Both read the same generated JPEG folder (ImageNet-like sizes) and run the same ``ImageTransform`` (Pillow decode
with JPEG draft mode, random resized crop, flip, 224 x 224 uint8) with N worker processes, and deliver batches of
torch tensors to the training process:

- ours: ``serve-imagenet-dir -w N`` in a child process bound to ``zrep+ipc://`` (same host: the shared-memory
  fast path where it applies), a zreq ``ConnectionDataset`` (numpy frames to tensors without copying) in this one;
- torch: ``DataLoader(dataset, batch_size=B, num_workers=N, shuffle=True)`` over a map-style dataset calling the
  transform with a per-sample generator.

The transport share is the time one batch of that shape costs to move (encode, send, receive, decode) over zreq,
measured with a server that has nothing to compute, as a fraction of one batch's time from the image server.
Timing starts after the first batches, so process start-up is excluded. The two take turns, ``--repeat`` rounds;
figures are medians and each ratio the median of the ratios within a round. Run::

    python benchmarks/bench_imagenet.py            # about half a minute
    python benchmarks/bench_imagenet.py --quick    # about 10 s
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tensorcom.datasets.imagenet import ImageDirectory, ImageTransform
from tensorcom.datasets.sample_images import make_sample_images
from tensorcom.pipeline import Conveyer, Map, Range
from tensorcom.pipeline.rng import sample_key, sample_rng

HERE = os.path.dirname(os.path.abspath(__file__))


class TransformDataset:
    """Map-style dataset for torch: item ``i`` is the transform of sample ``i`` with its own generator."""

    def __init__(self, transform: ImageTransform, seed: int = 0) -> None:
        self.transform, self.seed = transform, seed

    def __len__(self) -> int:
        return len(self.transform.dataset)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.int64]:
        return self.transform(index, sample_rng(sample_key(self.seed, 0, [index])))


_CONSTANT: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}


def _constant_batch(index: int, *, batch_size: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    key = (batch_size, size)
    if key not in _CONSTANT:
        images = np.random.default_rng(0).integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
        _CONSTANT[key] = (images, np.arange(batch_size, dtype=np.int64))
    return _CONSTANT[key]


class _Constant:
    __name__ = "constant_batch"

    def __init__(self, batch_size: int, size: int) -> None:
        self.batch_size, self.size = batch_size, size

    def __call__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return _constant_batch(index, batch_size=self.batch_size, size=self.size)


def constant_batches(*, seed: int, rank: int, world_size: int, batch_size: int = 32, size: int = 224) -> Any:
    """Factory for the transport measurement: the same precomputed batch at every step, no work per step."""
    return Conveyer([Range(10**9), Map(_Constant(batch_size, size))])


def rate(batches: Iterator[Any], count: int, warmup: int, batch_size: int) -> float:
    """Images per second over ``count`` batches after ``warmup`` batches."""
    for _ in range(warmup):
        next(batches)
    started = time.perf_counter()
    for _ in range(count):
        next(batches)
    return count * batch_size / (time.perf_counter() - started)


def start(command: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    process = subprocess.Popen([sys.executable, *command], stdout=subprocess.PIPE, env=env)
    line = process.stdout.readline().decode().split() if process.stdout is not None else []
    if line[:1] != ["ready"]:
        process.kill()
        raise SystemExit(f"server did not start: {line}")
    return process, line[1]  # the ready line names the URL a client connects with


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)


def _bind(folder: str) -> str:
    return f"zrep+ipc://{folder}/images-{time.monotonic_ns()}"


def ours(
    images: str, workers: int, batch_size: int, size: int, count: int, warmup: int, folder: str
) -> float:
    from torch.utils.data import DataLoader

    from tensorcom.adapters.torch import ConnectionDataset

    server, url = start(
        ["-m", "tensorcom.cli.image_server", "-d", images, "-b", str(batch_size), "--size", str(size)]
        + ["-w", str(workers), "-q", _bind(folder)]
    )
    try:
        with ConnectionDataset(url, device="cpu", prefetch=2 * workers + 2, timeout=120) as dataset:
            return rate(iter(DataLoader(dataset, batch_size=None)), count, warmup, batch_size)
    finally:
        stop(server)


def torch_loader(images: str, workers: int, batch_size: int, size: int, count: int, warmup: int) -> float:
    from torch.utils.data import DataLoader

    dataset: Any = TransformDataset(ImageTransform(ImageDirectory(images), size))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=True, drop_last=True)

    def forever() -> Iterator[Any]:
        while True:
            yield from loader

    return rate(forever(), count, warmup, batch_size)


def transport_seconds(batch_size: int, size: int, count: int, folder: str) -> float:
    """Seconds per batch moved over zreq from a server that computes nothing (workers=0: no extra hop)."""
    from torch.utils.data import DataLoader

    from tensorcom.adapters.torch import ConnectionDataset

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}
    server, url = start(
        ["-m", "tensorcom.cli", "serve", "bench_imagenet:constant_batches", "-q", "-w", "0"]
        + ["--bind", _bind(folder), "-o", f"batch_size={batch_size}", "-o", f"size={size}"],
        env,
    )
    try:
        with ConnectionDataset(url, device="cpu", prefetch=4, timeout=60) as dataset:
            return batch_size / rate(iter(DataLoader(dataset, batch_size=None)), count * 4, 5, batch_size)
    finally:
        stop(server)


def measure(
    quick: bool = False,
    repeat: int | None = None,
    workers_list: tuple[int, ...] = (1, 2),
    batch_size: int = 32,
    size: int = 224,
    images: int = 40,
    source_size: int = 400,
) -> list[dict[str, Any]]:
    """One row per worker count: both rates (medians), their ratio, the transport share, every sample."""
    repeat = repeat or (1 if quick else 3)
    count, warmup = (8, 2) if quick else (24, 4)
    source = os.path.join(tempfile.gettempdir(), f"tensorcom-bench-images-{source_size}")
    make_sample_images(source, per_class=images, size=source_size)
    samples: dict[int, tuple[list[float], list[float]]] = {workers: ([], []) for workers in workers_list}
    with tempfile.TemporaryDirectory() as folder:
        for round_number in range(repeat):
            print(f"images round {round_number + 1}/{repeat}", file=sys.stderr)
            for workers in workers_list:
                samples[workers][0].append(ours(source, workers, batch_size, size, count, warmup, folder))
                samples[workers][1].append(torch_loader(source, workers, batch_size, size, count, warmup))
        moving = transport_seconds(batch_size, size, count, folder)
    rows = []
    for workers, (mine, theirs) in samples.items():
        images_per_s = statistics.median(mine)
        rows.append(
            {
                "group": "images",
                "case": f"serve-imagenet-dir, {workers} workers",
                "workers": workers,
                "jpegs": images * 10,
                "source_size": source_size,
                "batch_size": batch_size,
                "size": size,
                "images_per_s": images_per_s,
                "dataloader_images_per_s": statistics.median(theirs),
                "vs_dataloader": statistics.median(a / b for a, b in zip(mine, theirs, strict=True)),
                "transport_ms_per_batch": 1e3 * moving,
                "transport_share": moving / (batch_size / images_per_s),
                "samples": mine,
                "dataloader_samples": theirs,
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| workers | serve-imagenet-dir img/s | DataLoader img/s | vs DataLoader | transport share |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['workers']} | {r['images_per_s']:.0f} | {r['dataloader_images_per_s']:.0f} | "
            f"{r['vs_dataloader']:.2f} | {100 * r['transport_share']:.1f} % |"
        )
    return "\n".join(lines)


def describe(rows: list[dict[str, Any]]) -> str:
    r = rows[0]
    return (
        f"{r['jpegs']} JPEGs of {r['source_size']}x{r['source_size']}, batches of {r['batch_size']} x "
        f"{r['size']}x{r['size']}x3 uint8; transport share = {r['transport_ms_per_batch']:.2f} ms to move one "
        "batch over zreq (ipc), as a share of one batch's time from the image server"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few batches, for a smoke run")
    parser.add_argument("--repeat", type=int, default=None, help="rounds (default 3, quick 1)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to compare")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=40, help="images per class (10 classes)")
    parser.add_argument("--source-size", type=int, default=400, help="side of the generated JPEGs")
    parser.add_argument("--json", metavar="FILE", help="also write the rows to FILE as JSON")
    args = parser.parse_args()
    rows = measure(
        args.quick,
        args.repeat,
        tuple(args.workers),
        args.batch_size,
        args.size,
        args.images,
        args.source_size,
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows))
    print(describe(rows))
    print(format_table(rows))
    print(
        "vs DataLoader = serve-imagenet-dir (zreq, ConnectionDataset) / torch DataLoader (same transform, workers)"
    )


if __name__ == "__main__":
    main()
