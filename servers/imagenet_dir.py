"""serve-imagenet-dir: decode, augment and serve an ImageNet-style folder of images (zreq or stream mode)."""

from __future__ import annotations

import functools
from typing import Any

import click

from tensorcom.cli import TensorcomCommand
from tensorcom.cli.image_server import image_server_options, run_image_server
from tensorcom.datasets.imagenet import ImageDirectory


@click.command(cls=TensorcomCommand)
@click.option(
    "-d",
    "--directory",
    required=True,
    help="Folder holding train/CLASS/*.JPEG (or CLASS/* directly); classes sorted, labels from 0.",
)
@image_server_options
def main(directory: str, urls: tuple[str, ...], **options: Any) -> None:
    """Serve the images of DIRECTORY on URLS: zrep://HOST:PORT for deterministic zreq clients (the default for
    training), or stream URLs (zpub://, zpush://, zrpush://, zrpub://).

    Batches are (images, labels): uint8 (B, SIZE, SIZE, 3) or float32 with --normalize, and int64 labels. An
    unreadable image is logged and replaced by the next readable one in index order. Prints "ready URL..." once
    listening; logs batches/s and images/s every --report seconds. SIGTERM lets a zrep server finish the requests
    it has received (for at most --drain seconds), then it exits 0; a second SIGTERM or SIGINT stops at once. With
    --server-key and --client-keys (or $TENSORCOM_SERVER_KEY and $TENSORCOM_CLIENT_KEYS), only clients whose
    public key is in the folder can connect, and traffic is encrypted (see `tensorcom keygen`).
    """
    run_image_server(functools.partial(ImageDirectory, directory), urls, **options)


if __name__ == "__main__":
    main()
