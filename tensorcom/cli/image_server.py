"""The command-line face of :func:`tensorcom.datasets.imagenet.serve_images`, shared by serve-imagenet-dir and
serve-imagenet-shards: one option block, and one way to run (index, print "ready URL...", serve, stop on signals).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from tensorcom.cli import server_key_options, setup_logging, stop_on_sigterm
from tensorcom.datasets.imagenet import ImageDataset, serve_images

__all__ = ["image_server_options", "run_image_server"]

log = logging.getLogger(__name__)

Function = TypeVar("Function", bound=Callable[..., Any])


def image_server_options(function: Function) -> Function:
    """Add the URLS argument and the options of the image servers (batch shape, workers, stream-mode settings,
    --drain, CURVE keys, logging); :func:`run_image_server` takes them all as keyword arguments."""
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
            "--queue",
            default=2,
            show_default=True,
            help="Batches queued per client before sending blocks (zrep: at least 16).",
        ),
        click.option("--report", default=10.0, show_default=True, help="Seconds between rate reports."),
        click.option(
            "--drain",
            type=click.FloatRange(min=0),
            default=10.0,
            show_default=True,
            help="zrep:// URLs: on SIGTERM, seconds to finish the requests already received before exiting.",
        ),
        server_key_options,
        click.option("-q", "--quiet", is_flag=True, help="Only log warnings."),
        click.option("-v", "--verbose", count=True, help="Log debug messages."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def run_image_server(dataset_of: Callable[[], ImageDataset], urls: tuple[str, ...], **options: Any) -> None:
    """Index the data (errors before any socket opens), print "ready URL...", serve until SIGINT or SIGTERM (which
    drains zrep servers for at most --drain seconds; a second one stops at once)."""
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
