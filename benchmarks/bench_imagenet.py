"""Images per second of serve-imagenet-dir against the standard torchvision pipeline and against torch DataLoader
running our own transform, on the same JPEG files, output size and number of worker processes.

All three read the same generated folder of ImageNet-like JPEGs (500 x 375, quality 90, by default), make
224 x 224 images with a random resized crop (area 8-100 %, aspect ratio 3/4-4/3) and a horizontal flip, and deliver
batches of torch tensors to the training process (this one):

- ours: ``serve-imagenet-dir -w N`` in a child process bound to ``zrep+ipc://`` (same host: the shared-memory
  fast path where it applies), read by a zreq ``ConnectionDataset`` (numpy frames to tensors without copying);
- torchvision: the standard pipeline, ``ImageFolder`` + ``Compose([RandomResizedCrop(224), RandomHorizontalFlip(),
  PILToTensor()])`` + ``DataLoader(batch_size=B, num_workers=N, shuffle=True)`` with the default collate. The
  torchvision wheel does not import beside the torch installed here, so :class:`StandardImageFolder` makes the very
  calls those classes make (Pillow open and ``convert("RGB")`` at full size, torchvision's crop sampling with torch's
  generator, ``crop`` then ``resize(BILINEAR)``, ``transpose``, ``np.array`` to a CHW view); shuffling is one long
  epoch (``RandomSampler(num_samples=...)``), so that no epoch boundary restarts the workers;
- DataLoader: the same DataLoader over a map-style dataset calling our ``ImageTransform`` with a per-sample
  generator (what serve-imagenet-dir decodes, without the server).

The transport share is the time one batch of that shape costs to move (encode, send, receive, decode) over zreq,
measured with a server that has nothing to compute, as a fraction of one batch's time from the image server.
Timing starts after the first batches and a second of reading, so process start-up is excluded. The three take
turns, ``--repeat`` rounds; figures are medians and each ratio the median of the ratios within a round.
``--profile`` adds a per-image breakdown (cProfile, one process) of both decodes: where the time goes and what
limits the ratio. Run::

    python benchmarks/bench_imagenet.py               # about 40 s on 2 quiet cores
    python benchmarks/bench_imagenet.py --quick       # about 15 s
    python benchmarks/bench_imagenet.py --profile --repeat 1
"""

from __future__ import annotations

import argparse
import cProfile
import json
import math
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tensorcom.datasets.imagenet import ImageDirectory, ImageTransform, image_pipeline
from tensorcom.datasets.sample_images import make_sample_images
from tensorcom.pipeline import Conveyer, Map, Range
from tensorcom.pipeline.rng import sample_key, sample_rng

HERE = os.path.dirname(os.path.abspath(__file__))
LONG_EPOCH = 10**7  # samples drawn by the DataLoaders' RandomSampler: one epoch for the whole run


def make_images(folder: str, per_class: int, width: int, height: int) -> str:
    """A folder of 10 classes x ``per_class`` JPEGs of ``width`` x ``height`` at quality 90 (made once)."""
    side = max(width, height)
    squares = make_sample_images(f"{folder}-square", per_class=per_class, size=side)
    from PIL import Image

    for current, _, names in os.walk(squares):
        for name in names:
            target = os.path.join(folder, os.path.relpath(os.path.join(current, name), squares))
            if os.path.exists(target):
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with Image.open(os.path.join(current, name)) as image:
                left, top = (side - width) // 2, (side - height) // 2
                image.crop((left, top, left + width, top + height)).save(target + ".tmp", "JPEG", quality=90)
            os.replace(target + ".tmp", target)
    return folder


# the standard torchvision pipeline, as the Pillow and torch calls it makes


def random_resized_crop_params(
    width: int,
    height: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """``transforms.RandomResizedCrop.get_params``: (top, left, height, width), drawn with torch's generator; ten
    tries, then the central crop clamped to the ratio range."""
    import torch

    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()  # type: ignore[arg-type]
        crop_width = int(round(math.sqrt(target_area * aspect_ratio)))
        crop_height = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(torch.randint(0, height - crop_height + 1, size=(1,)).item())
            left = int(torch.randint(0, width - crop_width + 1, size=(1,)).item())
            return top, left, crop_height, crop_width
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        crop_width, crop_height = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_width, crop_height = int(round(height * max(ratio))), height
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


class StandardImageFolder:
    """``ImageFolder(root, transform=Compose([RandomResizedCrop(size), RandomHorizontalFlip(), PILToTensor()]))``."""

    def __init__(self, root: str, size: int = 224) -> None:
        directory = ImageDirectory(root)  # ImageFolder's order too: sorted classes, sorted files
        self.samples = [(directory.path(i), directory.label(i)) for i in range(len(directory))]
        self.size = size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        import torch
        from PIL import Image

        path, target = self.samples[index]
        image: Image.Image
        with open(path, "rb") as file:  # datasets.folder.pil_loader
            image = Image.open(file)
            image = image.convert("RGB")
        width, height = image.size  # RandomResizedCrop: get_params, then F.resized_crop = crop, then resize
        top, left, crop_height, crop_width = random_resized_crop_params(width, height)
        image = image.crop((left, top, left + crop_width, top + crop_height))
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.Resampling.BILINEAR)
        if torch.rand(1) < 0.5:  # RandomHorizontalFlip
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        tensor = torch.as_tensor(np.array(image, copy=True))  # PILToTensor
        tensor = tensor.view(image.size[1], image.size[0], 3).permute((2, 0, 1))
        return tensor, target


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
    return rate_and_cpu(batches, count, warmup, batch_size)[0]


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as file:
                children = [int(word) for word in file.read().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *_descendants(child)]
    return found


def _cpu_seconds() -> float:
    """CPU seconds used so far by this process and every live process below it (server, workers)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = time.process_time()
    for pid in _descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/stat") as file:
                fields = file.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


SETTLE_SECONDS = 1.0  # read after the first batch before timing: every worker process of every pipeline is up


def rate_and_cpu(batches: Iterator[Any], count: int, warmup: int, batch_size: int) -> tuple[float, float]:
    """Images per second over ``count`` batches after ``warmup`` batches and at least :data:`SETTLE_SECONDS`
    after the first (a server's second worker may still be starting when its first answers), and the CPU
    milliseconds per image that this process and its children (servers, workers) spent meanwhile: images per
    core, whatever else runs."""
    next(batches)
    first = time.perf_counter()
    for _ in range(warmup - 1):
        next(batches)
    while time.perf_counter() - first < SETTLE_SECONDS:
        next(batches)
    started, cpu = time.perf_counter(), _cpu_seconds()
    for _ in range(count):
        next(batches)
    elapsed, cpu = time.perf_counter() - started, _cpu_seconds() - cpu
    return count * batch_size / elapsed, 1e3 * cpu / (count * batch_size)


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
) -> tuple[float, float]:
    from torch.utils.data import DataLoader

    from tensorcom.adapters.torch import ConnectionDataset

    server, url = start(
        ["-m", "tensorcom.cli.image_server", "-d", images, "-b", str(batch_size), "--size", str(size)]
        + ["-w", str(workers), "-q", _bind(folder)]
    )
    try:
        with ConnectionDataset(url, device="cpu", prefetch=2 * workers + 2, timeout=120) as dataset:
            return rate_and_cpu(iter(DataLoader(dataset, batch_size=None)), count, warmup, batch_size)
    finally:
        stop(server)


def _loader_rate(dataset: Any, workers: int, batch_size: int, count: int, warmup: int) -> tuple[float, float]:
    from torch.utils.data import DataLoader, RandomSampler

    sampler = RandomSampler(dataset, num_samples=LONG_EPOCH)  # shuffle=True over one long epoch
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, sampler=sampler, drop_last=True)
    batches = iter(loader)
    try:
        return rate_and_cpu(batches, count, warmup, batch_size)
    finally:
        del batches  # stops the worker processes


def torchvision_loader(
    images: str, workers: int, batch_size: int, size: int, count: int, warmup: int
) -> tuple[float, float]:
    return _loader_rate(StandardImageFolder(images, size), workers, batch_size, count, warmup)


def torch_loader(
    images: str, workers: int, batch_size: int, size: int, count: int, warmup: int
) -> tuple[float, float]:
    dataset = TransformDataset(ImageTransform(ImageDirectory(images), size))
    return _loader_rate(dataset, workers, batch_size, count, warmup)


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


# where the time goes: cProfile of both decodes in this process, grouped by stage

_STAGES = [  # (stage, substrings of cProfile's function labels), first match wins
    ("open + read", ("io.open", "method 'read' of", "imagenet.py:read")),
    (
        "decode",
        (
            "imagenet.py:_decode",
            "decode_jpeg",
            "'decode' of 'ImagingDecoder'",
            "'copy' of 'ImagingCore'",
            "Jpeg",
        ),
    ),
    (
        "crop + resize",
        ("<warpAffine>", "<resize>", "'resize' of 'ImagingCore'", "'crop' of 'ImagingCore'", "_opencv_into"),
    ),
    ("flip", ("<flip>", "'transpose' of 'ImagingCore'")),
    (
        "to tensor + collate",
        (
            "torch.stack",
            "torch.tensor",
            "torch.as_tensor",
            "numpy.array",
            "ImagingEncoder",
            "tobytes",
            "collate",
        ),
    ),
    (
        "augmentation draws",
        (
            "crop_box",
            "random_resized_crop_params",
            "uniform_",
            "torch.randint",
            "torch.rand",
            "torch.log",
            "rng.py",
        ),
    ),
]


def _label(key: tuple[str, int, str]) -> str:
    filename, line, function = key
    return function if filename == "~" else f"{os.path.basename(filename)}:{function}"


def profile_breakdown(
    images: str, batch_size: int, size: int, transport_ms: float | None = None, batches: int = 8
) -> list[dict[str, Any]]:
    """Milliseconds per image by stage (cProfile own time, one process) for ours and for torchvision's calls;
    ``transport_ms`` (per image, measured apart) is added to ours."""
    import torch
    from torch.utils.data import default_collate

    torch.set_num_threads(1)
    dataset = ImageDirectory(images)
    standard = StandardImageFolder(images, size)
    pipeline = image_pipeline(dataset=dataset, batch_size=batch_size, size=size)
    order = np.random.default_rng(0).permutation(len(standard))
    rows = []
    for name, run in (
        ("serve-imagenet-dir (decode only)", lambda step: next(pipeline)),
        (
            "torchvision (decode only)",
            lambda step: default_collate(
                [standard[int(order[(step * batch_size + j) % len(order)])] for j in range(batch_size)]
            ),
        ),
    ):
        run(0)  # warm caches and imports
        profiler = cProfile.Profile()
        started = time.perf_counter()
        profiler.enable()
        for step in range(batches):
            run(step)
        profiler.disable()
        wall = time.perf_counter() - started
        stats: dict[Any, Any] = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
        per_stage = dict.fromkeys([stage for stage, _ in _STAGES] + ["other Python"], 0.0)
        for key, (_, _, own, _, _) in stats.items():
            label = _label(key)
            stage = next((s for s, parts in _STAGES if any(p in label for p in parts)), "other Python")
            per_stage[stage] += own
        total = sum(per_stage.values())
        images_done = batches * batch_size
        rows.append(
            {
                "group": "images-profile",
                "case": name,
                "ms_per_image": 1e3 * wall / images_done,
                "stages_ms_per_image": {
                    k: 1e3 * v / images_done * wall / total for k, v in per_stage.items()
                },
                "transport_ms_per_image": transport_ms if name.startswith("serve") else None,
            }
        )
    pipeline.close()
    return rows


def measure(
    quick: bool = False,
    repeat: int | None = None,
    workers_list: tuple[int, ...] = (1, 2),
    batch_size: int = 32,
    size: int = 224,
    images: int = 40,
    source_size: tuple[int, int] = (500, 375),
) -> list[dict[str, Any]]:
    """One row per worker count: the three rates (medians), the ratios, the transport share, every sample."""
    repeat = repeat or (1 if quick else 3)
    count, warmup = (8, 2) if quick else (24, 4)
    width, height = source_size
    source = make_images(
        os.path.join(tempfile.gettempdir(), f"tensorcom-bench-images-{width}x{height}"), images, width, height
    )
    names = ("ours", "torchvision", "dataloader")
    runs: dict[str, Callable[..., tuple[float, float]]] = {
        "ours": ours,
        "torchvision": torchvision_loader,
        "dataloader": torch_loader,
    }
    rates: dict[int, dict[str, list[float]]] = {w: {n: [] for n in names} for w in workers_list}
    cpu: dict[int, dict[str, list[float]]] = {w: {n: [] for n in names} for w in workers_list}
    with tempfile.TemporaryDirectory() as folder:
        for round_number in range(repeat):
            print(f"images round {round_number + 1}/{repeat}", file=sys.stderr)
            for workers in workers_list:
                for name in names:
                    extra = (folder,) if name == "ours" else ()
                    images_per_s, cpu_ms = runs[name](
                        source, workers, batch_size, size, count, warmup, *extra
                    )
                    rates[workers][name].append(images_per_s)
                    cpu[workers][name].append(cpu_ms)
        moving = transport_seconds(batch_size, size, count, folder)
    rows = []
    for workers in workers_list:
        found, spent = rates[workers], cpu[workers]
        images_per_s = statistics.median(found["ours"])
        rows.append(
            {
                "group": "images",
                "case": f"serve-imagenet-dir, {workers} workers",
                "workers": workers,
                "jpegs": images * 10,
                "source_size": f"{width}x{height}",
                "batch_size": batch_size,
                "size": size,
                "images_per_s": images_per_s,
                "torchvision_images_per_s": statistics.median(found["torchvision"]),
                "dataloader_images_per_s": statistics.median(found["dataloader"]),
                "vs_torchvision": _paired(found["ours"], found["torchvision"]),
                "vs_dataloader": _paired(found["ours"], found["dataloader"]),
                "cpu_ms_per_image": statistics.median(spent["ours"]),
                "torchvision_cpu_ms_per_image": statistics.median(spent["torchvision"]),
                "dataloader_cpu_ms_per_image": statistics.median(spent["dataloader"]),
                "per_core_vs_torchvision": _paired(spent["torchvision"], spent["ours"]),
                "transport_ms_per_batch": 1e3 * moving,
                "transport_share": moving / (batch_size / images_per_s),
                "samples": found["ours"],
                "torchvision_samples": found["torchvision"],
                "dataloader_samples": found["dataloader"],
                "cpu_samples": spent["ours"],
                "torchvision_cpu_samples": spent["torchvision"],
                "dataloader_cpu_samples": spent["dataloader"],
            }
        )
    return rows


def _paired(mine: list[float], theirs: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(mine, theirs, strict=True))


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| workers | serve-imagenet-dir img/s | torchvision img/s | vs torchvision (target 2) "
        "| CPU ms/img, ours / torchvision | per core vs torchvision "
        "| DataLoader, our transform, img/s | vs DataLoader | transport share |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if r.get("group") != "images":
            continue
        lines.append(
            f"| {r['workers']} | {r['images_per_s']:.0f} | {r['torchvision_images_per_s']:.0f} | "
            f"{r['vs_torchvision']:.2f} | {r['cpu_ms_per_image']:.2f} / {r['torchvision_cpu_ms_per_image']:.2f} | "
            f"{r['per_core_vs_torchvision']:.2f} | {r['dataloader_images_per_s']:.0f} | {r['vs_dataloader']:.2f} | "
            f"{100 * r['transport_share']:.1f} % |"
        )
    return "\n".join(lines)


def format_profile(rows: list[dict[str, Any]]) -> str:
    profiles = [r for r in rows if r.get("group") == "images-profile"]
    if not profiles:
        return ""
    stages = list(profiles[0]["stages_ms_per_image"])
    lines = [
        "| ms per image, one process | " + " | ".join(stages) + " | total | zreq transport (apart) |",
        "| --- | " + " | ".join("---:" for _ in stages) + " | ---: | ---: |",
    ]
    for r in profiles:
        cells = " | ".join(f"{r['stages_ms_per_image'][s]:.3f}" for s in stages)
        moving = r.get("transport_ms_per_image")
        transport = "-" if moving is None else f"{moving:.3f}"
        lines.append(f"| {r['case']} | {cells} | {r['ms_per_image']:.3f} | {transport} |")
    return "\n".join(lines)


def describe(rows: list[dict[str, Any]]) -> str:
    r = next(r for r in rows if r.get("group") == "images")
    return (
        f"{r['jpegs']} JPEGs of {r['source_size']}, batches of {r['batch_size']} x {r['size']}x{r['size']}x3 uint8, "
        "N worker processes each; torchvision = ImageFolder + RandomResizedCrop + RandomHorizontalFlip + "
        "PILToTensor + DataLoader (Pillow calls as torchvision makes them); DataLoader = the same DataLoader "
        f"running our ImageTransform; transport share = {r['transport_ms_per_batch']:.2f} ms to move one "
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
    parser.add_argument("--source-size", default="500x375", help="WIDTHxHEIGHT of the generated JPEGs")
    parser.add_argument(
        "--profile", action="store_true", help="also a per-image breakdown by stage (cProfile)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the rows to FILE as JSON")
    args = parser.parse_args()
    width, _, height = args.source_size.partition("x")
    source_size = (int(width), int(height or width))
    rows = measure(
        args.quick,
        args.repeat,
        tuple(args.workers),
        args.batch_size,
        args.size,
        args.images,
        source_size,
    )
    if args.profile:
        source = make_images(
            os.path.join(tempfile.gettempdir(), f"tensorcom-bench-images-{source_size[0]}x{source_size[1]}"),
            args.images,
            *source_size,
        )
        transport = rows[0]["transport_ms_per_batch"] / args.batch_size
        rows += profile_breakdown(source, args.batch_size, args.size, transport)
    if args.json:
        Path(args.json).write_text(json.dumps(rows))
    print(describe(rows))
    print(format_table(rows))
    print(
        "vs torchvision, vs DataLoader = serve-imagenet-dir (zreq, ConnectionDataset) / that pipeline, same workers"
    )
    if args.profile:
        print()
        print(format_profile(rows))


if __name__ == "__main__":
    main()
