"""serve-imagenet-dir: decode, augment and serve an ImageNet-style folder of images (zreq or stream mode)."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from tensorcom.cli import TensorcomCommand, setup_logging, stop_on_sigterm
from tensorcom.imagenet import ImageDataset, ImageDirectory, serve_images

log = logging.getLogger("tensorcom_servers.imagenet")


def serving_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """The options serve-imagenet-dir and serve-imagenet-shards share."""
    options = [
        click.argument("urls", nargs=-1, required=True),
        click.option("-b", "--batch-size", default=64, show_default=True, help="Images per batch."),
        click.option(
            "-w",
            "--workers",
            default=2,
            show_default=True,
            help="Processes decoding images (zrep: server workers; stream: pipeline workers; 0: inline).",
        ),
        click.option(
            "--seed",
            default=0,
            show_default=True,
            help="Stream mode: the pipeline seed (zreq clients choose).",
        ),
        click.option("--size", default=224, show_default=True, help="Output height and width in pixels."),
        click.option(
            "--normalize",
            is_flag=True,
            help="Send float32 normalised with the ImageNet mean/std (default uint8).",
        ),
        click.option(
            "--augment/--no-augment",
            default=True,
            show_default=True,
            help="Random resized crop and flip, or a central crop.",
        ),
        click.option(
            "--rank", default=0, show_default=True, help="Stream mode: this server's share of the epoch."
        ),
        click.option("--world-size", default=1, show_default=True, help="Stream mode: how many shares."),
        click.option(
            "--control",
            default=None,
            help="Stream mode: zrep:// URL where clients send SEEK (resume) messages.",
        ),
        click.option(
            "--metadata/--no-metadata",
            default=True,
            show_default=True,
            help="Stream mode: append step metadata to each batch (off for tensorcom 0.1 clients).",
        ),
        click.option(
            "--queue", default=2, show_default=True, help="Batches queued per client before sending blocks."
        ),
        click.option("--report", default=10.0, show_default=True, help="Seconds between rate reports."),
        click.option("-q", "--quiet", is_flag=True, help="Only log warnings."),
        click.option("-v", "--verbose", count=True, help="Log debug messages."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def run(dataset_of: Callable[[], ImageDataset], urls: tuple[str, ...], **options: Any) -> None:
    """Index the data (errors before any socket opens), print "ready URL...", serve until SIGINT or SIGTERM."""
    setup_logging(options.pop("verbose"), options.pop("quiet"))
    stop_on_sigterm()
    dataset = dataset_of()
    report = options.pop("report")
    if any(url.startswith("zrep") for url in urls) and options["seed"] != 0:
        log.info("--seed is ignored for zrep:// URLs: each zreq client sends its own seed")

    def ready(endpoints: list[str]) -> None:
        click.echo("ready " + " ".join(endpoints))
        sys.stdout.flush()

    try:
        serve_images(dataset, urls, report_interval=report, on_ready=ready, **options)
    except KeyboardInterrupt:
        pass


@click.command(cls=TensorcomCommand)
@click.option(
    "-d",
    "--directory",
    required=True,
    help="Folder holding train/CLASS/*.JPEG (or CLASS/* directly); classes sorted, labels from 0.",
)
@serving_options
def main(directory: str, urls: tuple[str, ...], **options: Any) -> None:
    """Serve the images of DIRECTORY on URLS: zrep://HOST:PORT for deterministic zreq clients (the default for
    training), or stream URLs (zpub://, zpush://, zrpush://, zrpub://).

    Batches are (images, labels): uint8 (B, SIZE, SIZE, 3) or float32 with --normalize, and int64 labels. An
    unreadable image is logged and replaced by the next readable one in index order. Prints "ready URL..." once
    listening; logs batches/s and images/s every --report seconds; stops cleanly on SIGINT or SIGTERM.
    """
    run(functools.partial(ImageDirectory, directory), urls, **options)


if __name__ == "__main__":
    main()
