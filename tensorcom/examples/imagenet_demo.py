"""The ImageNet-style demo behind ``make demo``: serve generated JPEGs, train a small CNN, checkpoint, resume.

Run ``python -m tensorcom.examples.imagenet_demo``. It makes the sample folder (:mod:`tensorcom.datasets.sample_images`) if it is
absent, starts ``serve-imagenet-dir`` on it in a child process, and trains a small PyTorch CNN through a zreq
``Connection`` (:class:`tensorcom.adapters.torch.ConnectionDataset`) with a progress bar showing the loss. Half-way it
saves a checkpoint (model, optimizer and the stream's ``state_dict()``), drops the connection as a stopped job would,
and resumes from the checkpoint in a new one, checking that the first batch after the restart holds the samples the
old connection would have delivered next. It ends with the throughput and the share of time spent waiting for data.

Needs torch (``pip install tensorcom[torch]``).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import click

from tensorcom.cli import TensorcomCommand

__all__ = ["main"]


def _start_server(
    folder: str, batch_size: int, size: int, workers: int
) -> tuple[subprocess.Popen[bytes], str]:
    command = [
        sys.executable,
        "-m",
        "tensorcom.cli.image_server",
        "-d",
        folder,
        "-b",
        str(batch_size),
        "--size",
        str(size),
        "--workers",
        str(workers),
        "--quiet",
        "zrep://127.0.0.1:0",
    ]
    click.echo("server: serve-imagenet-dir " + " ".join(command[3:]))
    server = subprocess.Popen(command, stdout=subprocess.PIPE)
    line = server.stdout.readline().decode().split() if server.stdout is not None else []
    if line[:1] != ["ready"]:
        server.kill()
        raise click.ClickException(f"the server did not start (it printed {line!r})")
    return server, line[1]


def _model(classes: int) -> Any:
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(64, 64, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(64, classes),
    )


class _Trainer:
    """Counts steps, time waiting for batches, and time computing, across both halves of the run."""

    def __init__(self, model: Any, device: str) -> None:
        import torch

        self.model = model.to(device)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        self.device = device
        self.losses: list[float] = []
        self.images = 0
        self.waiting = 0.0
        self.computing = 0.0

    def train(self, dataset: Any, steps: int, label: str) -> None:
        import torch
        from torch.utils.data import DataLoader

        from tensorcom.adapters.torch import normalize_images

        def show(_: object) -> str:
            return f"loss {self.losses[-1]:.3f}" if self.losses else ""

        batches = iter(DataLoader(dataset, batch_size=None))
        with click.progressbar(length=steps, label=label, item_show_func=show, width=30) as bar:
            for _ in range(steps):
                started = time.perf_counter()
                images, labels = next(batches)
                fetched = time.perf_counter()
                loss = torch.nn.functional.cross_entropy(self.model(normalize_images(images)), labels)
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()
                self.losses.append(float(loss.item()))
                self.images += len(labels)
                self.waiting += fetched - started
                self.computing += time.perf_counter() - fetched
                bar.update(1)


@click.command(cls=TensorcomCommand)
@click.option(
    "--data",
    default=os.path.join(tempfile.gettempdir(), "tensorcom-sample-images"),
    show_default=True,
    help="Sample image folder (made if absent).",
)
@click.option("--steps", default=300, show_default=True, help="Training steps in all (checkpoint half-way).")
@click.option("-b", "--batch-size", default=64, show_default=True, help="Images per batch.")
@click.option("--size", default=32, show_default=True, help="Image size the server crops to.")
@click.option("-w", "--workers", default=2, show_default=True, help="Server worker processes.")
@click.option("--seed", default=0, show_default=True, help="Stream seed.")
def main(data: str, steps: int, batch_size: int, size: int, workers: int, seed: int) -> None:
    """Serve a generated ImageNet-style folder, train a small CNN from it, checkpoint, resume, report the rate."""
    try:
        import torch
    except ImportError:
        raise click.ClickException("the demo needs torch: pip install 'tensorcom[torch]'") from None
    from tensorcom.adapters.torch import ConnectionDataset
    from tensorcom.datasets.imagenet import ImageDirectory
    from tensorcom.datasets.sample_images import make_sample_images

    if steps < 2:
        raise click.BadParameter(f"must be >= 2. Found: {steps}", param_hint="--steps")
    make_sample_images(data)
    folder = ImageDirectory(data)
    click.echo(f"data: {folder.root}: {len(folder)} JPEG files in {len(folder.classes)} classes")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    server, url = _start_server(data, batch_size, size, workers)
    try:
        trainer = _Trainer(_model(len(folder.classes)), device)
        half = steps // 2
        started = time.perf_counter()
        first = ConnectionDataset(url, seed=seed, device=device, timeout=60)
        trainer.train(first, half, "training ")
        checkpoint = {
            "model": copy.deepcopy(trainer.model.state_dict()),
            "optimizer": copy.deepcopy(trainer.optimizer.state_dict()),
            "data": first.state_dict(),
        }
        next(iter(first))  # what the old connection would deliver after the checkpoint
        expected = list(first.last.indices)
        first.close()
        click.echo(
            f"checkpoint at step {half}: stream state {checkpoint['data']['connection']['pipeline']['stream']}; restarting"
        )

        trainer.model.load_state_dict(checkpoint["model"])
        trainer.optimizer.load_state_dict(checkpoint["optimizer"])
        resumed = ConnectionDataset(url, seed=seed, device=device, timeout=60, state=checkpoint["data"])
        trainer.train(resumed, steps - half, "resumed  ")
        with ConnectionDataset(url, seed=seed, timeout=60, state=checkpoint["data"]) as probe:
            next(iter(probe))
            resumed_indices = list(probe.last.indices)
        resumed.close()
        elapsed = time.perf_counter() - started
    finally:
        server.terminate()
        server.wait(timeout=30)
    if resumed_indices != expected:
        raise click.ClickException(f"the resumed stream differs: {resumed_indices} != {expected}")
    click.echo(
        f"resume check: the first batch after the restart holds the same {len(expected)} samples the old "
        "connection would have delivered next"
    )
    losses = trainer.losses
    window = max(1, min(20, len(losses) // 4))
    click.echo(
        f"loss: {sum(losses[:window]) / window:.3f} (first {window} steps) -> "
        f"{sum(losses[-window:]) / window:.3f} (last {window} steps)"
    )
    click.echo(
        f"throughput: {trainer.images / elapsed:.0f} images/s, {len(losses) / elapsed:.1f} steps/s on {device} "
        f"({trainer.images} images in {elapsed:.1f} s with {workers} server workers); waiting for data "
        f"{100 * trainer.waiting / max(trainer.waiting + trainer.computing, 1e-9):.0f}% of the time"
    )


if __name__ == "__main__":
    main()
