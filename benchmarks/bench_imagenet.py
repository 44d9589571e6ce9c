"""Images per second of serve-imagenet-dir against torch DataLoader doing the same decode and augmentation.

Both read the same generated JPEG folder (ImageNet-like sizes) and run the same ``ImageTransform`` (Pillow decode
with JPEG draft mode, random resized crop, flip, 224 x 224 uint8) with N worker processes, and deliver batches of
torch tensors to the training process:

- ours: ``serve-imagenet-dir -w N`` in a child process, a zreq ``ConnectionDataset`` (numpy frames to tensors
  without copying) in this one;
- torch: ``DataLoader(dataset, batch_size=B, num_workers=N, shuffle=True)`` over a map-style dataset calling the
  transform with a per-sample generator.

The transport share is the time one batch of that shape costs to move (encode, send, receive, decode) over zreq,
measured with a server that has nothing to compute, as a fraction of one batch's time from the image server.
Timing starts after the first batches, so process start-up is excluded. Ratios come from one run, side by side.
Run::

    python benchmarks/bench_imagenet.py            # about a minute
    python benchmarks/bench_imagenet.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from tensorcom.imagenet import ImageDirectory, ImageTransform
from tensorcom.pipeline import Conveyer, Map, Range
from tensorcom.pipeline.rng import sample_key, sample_rng
from tensorcom.sample_images import make_sample_images

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
    return process, line[1].replace("tcp://", "zreq://")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(timeout=30)


def ours(folder: str, workers: int, batch_size: int, size: int, count: int, warmup: int) -> float:
    from torch.utils.data import DataLoader

    from tensorcom.torch_data import ConnectionDataset

    server, url = start(
        ["-m", "tensorcom_servers.imagenet_dir", "-d", folder, "-b", str(batch_size), "--size", str(size)]
        + ["-w", str(workers), "-q", "zrep://127.0.0.1:0"]
    )
    try:
        with ConnectionDataset(url, device="cpu", prefetch=2 * workers + 2, timeout=120) as dataset:
            return rate(iter(DataLoader(dataset, batch_size=None)), count, warmup, batch_size)
    finally:
        stop(server)


def torch_loader(folder: str, workers: int, batch_size: int, size: int, count: int, warmup: int) -> float:
    from torch.utils.data import DataLoader

    dataset: Any = TransformDataset(ImageTransform(ImageDirectory(folder), size))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=True, drop_last=True)

    def forever() -> Iterator[Any]:
        while True:
            yield from loader

    return rate(forever(), count, warmup, batch_size)


def transport_seconds(batch_size: int, size: int, count: int) -> float:
    """Seconds per batch moved over zreq from a server that computes nothing (workers=0: no extra hop)."""
    from torch.utils.data import DataLoader

    from tensorcom.torch_data import ConnectionDataset

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}
    server, url = start(
        ["-m", "tensorcom.cli", "serve", "bench_imagenet:constant_batches", "-q", "-w", "0"]
        + ["--bind", "zrep://127.0.0.1:0", "-o", f"batch_size={batch_size}", "-o", f"size={size}"],
        env,
    )
    try:
        with ConnectionDataset(url, device="cpu", prefetch=4, timeout=60) as dataset:
            return batch_size / rate(iter(DataLoader(dataset, batch_size=None)), count * 4, 5, batch_size)
    finally:
        stop(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few batches, for a smoke run")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to compare")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=40, help="images per class (10 classes)")
    parser.add_argument("--source-size", type=int, default=400, help="side of the generated JPEGs")
    args = parser.parse_args()
    count, warmup = (4, 2) if args.quick else (20, 4)
    folder = os.path.join(tempfile.gettempdir(), f"tensorcom-bench-images-{args.source_size}")
    make_sample_images(folder, per_class=args.images, size=args.source_size)

    rows = []
    for workers in args.workers:
        mine = ours(folder, workers, args.batch_size, args.size, count, warmup)
        theirs = torch_loader(folder, workers, args.batch_size, args.size, count, warmup)
        rows.append((workers, mine, theirs))
    moving = transport_seconds(args.batch_size, args.size, count)

    print(
        f"{args.images * 10} JPEGs of {args.source_size}x{args.source_size}, batches of {args.batch_size} x {args.size}x{args.size}x3 uint8"
    )
    print(
        f"{'workers':>7} {'serve-imagenet-dir img/s':>25} {'DataLoader img/s':>17} {'ratio':>6} {'transport':>10}"
    )
    for workers, mine, theirs in rows:
        batch_seconds = args.batch_size / mine
        print(
            f"{workers:>7} {mine:>25.0f} {theirs:>17.0f} {mine / theirs:>6.2f} {100 * moving / batch_seconds:>9.1f}%"
        )
    print(
        "ratio = serve-imagenet-dir (zreq, ConnectionDataset) / torch DataLoader (same transform, same workers)"
    )
    print(
        f"transport = {1e3 * moving:.2f} ms to move one batch over zreq, as a share of one batch's time from the server"
    )


if __name__ == "__main__":
    main()
