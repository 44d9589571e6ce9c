"""serve-imagenet-shards: decode, augment and serve images from local WebDataset tar shards."""

from __future__ import annotations

import functools
from typing import Any

import click

from tensorcom.cli import TensorcomCommand
from tensorcom.cli.image_server import image_server_options, run_image_server
from tensorcom.datasets.imagenet import ImageShards


@click.command(cls=TensorcomCommand)
@click.option(
    "-s",
    "--shards",
    required=True,
    help="Local tar shards with braces, e.g. '/data/train-{000000..000146}.tar' (SAMPLE.jpg + SAMPLE.cls).",
)
@image_server_options
def main(shards: str, urls: tuple[str, ...], **options: Any) -> None:
    """Serve the images of SHARDS on URLS (zrep:// for zreq clients, or stream URLs), exactly as
    serve-imagenet-dir does for a folder, SIGTERM drain and CURVE keys included.

    Samples are numbered in shard order (as the braces expand), then tar order, so the same shards give the same
    stream everywhere; .cls holds the 0-based label.
    """
    run_image_server(functools.partial(ImageShards, shards), urls, **options)


if __name__ == "__main__":
    main()
