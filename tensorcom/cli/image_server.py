"""``serve-imagenet-dir`` and ``serve-imagenet-shards``: serve an image dataset's pipeline
(:mod:`tensorcom.datasets.imagenet`) over zreq or stream URLs, through the run loop every server program shares
(:func:`tensorcom.server.run.run_server`): index the data (errors before any socket opens), print "ready URL...",
serve, drain on SIGTERM.
"""

from __future__ import annotations

import functools
import itertools
import logging
import secrets
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import click

from tensorcom.cli.options import (
    TensorcomCommand,
    echo_ready,
    echo_ready_urls,
    server_key_options,
    setup_logging,
    stop_on_sigterm,
    version_option,
)
from tensorcom.datasets.imagenet import (
    ImageDataset,
    ImageDirectory,
    ImageShards,
    ImageTransform,
    image_pipeline,
)
from tensorcom.errors import ConfigError
from tensorcom.urls import expand_urls, parse_url

if TYPE_CHECKING:
    from tensorcom._net.security import KeyPath
    from tensorcom.server import Server

__all__ = [
    "REQUEST_REPLY_QUEUE",
    "build_image_server",
    "image_server_options",
    "run_image_server",
    "serve_imagenet_dir",
    "serve_imagenet_shards",
]

log = logging.getLogger(__name__)

Function = TypeVar("Function", bound=Callable[..., Any])

REQUEST_REPLY_QUEUE = 16
"""The least replies a zrep image server queues per client. Above the zreq clients' default prefetch (4): a client
that stops reading with its requests answered must not fill its queue, which would block the server's sends."""


DEFAULT_URL = "zpub://127.0.0.1:7880"
"""Where the image servers publish when no URL is given (tensorcom 0.1's default)."""


def _refuse_report_batches(context: click.Context, parameter: click.Parameter, value: int | None) -> None:
    if value is not None:
        click.echo("Error: -r N (a report every N batches, tensorcom 0.1) is --report SECONDS here", err=True)
        context.exit(2)


def parallel_option(short: str) -> Callable[[Function], Function]:
    """tensorcom 0.1's ``-P``/``-p N``: N publisher processes on one connecting URL."""
    return click.option(
        short,
        "--parallel",
        type=click.IntRange(min=0),
        default=0,
        help="Stream mode (tensorcom 0.1): N publisher processes on one zpush:// or zrpub:// URL, each a distinct "
        "share (for URLs that bind, write N URLs with braces instead: zpub://HOST:788{0..3}).",
    )


def image_server_options(function: Function) -> Function:
    """Add the URLS argument and the options of the image servers (batch shape, workers, stream-mode settings,
    --drain, CURVE keys, logging); :func:`run_image_server` takes them all as keyword arguments."""
    options = [
        click.argument("urls", nargs=-1),
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
            type=int,
            default=None,
            help="Stream mode: the pipeline seed (default: drawn at random and logged, so that servers started "
            "separately send different streams; zreq clients choose their own).",
        ),
        click.option("--size", default=224, show_default=True, help="Output height and width in pixels."),
        click.option(
            "-n",
            "--normalize",
            is_flag=True,
            help="Send float32 normalised with the ImageNet mean/std (default uint8).",
        ),
        click.option(
            "--exact-decode",
            is_flag=True,
            help="Decode JPEGs at full size with libjpeg's exact settings, as torchvision does (default: at 1/2, "
            "1/4 or 1/8 size when the crop allows, with fast chroma upsampling; about 5 % less CPU per image, "
            "0.2 levels of 255 apart on average).",
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
            help="Stream mode: append step metadata to each batch (in a frame that tensorcom 0.1 clients ignore).",
        ),
        click.option(
            "-B",
            "--benchmark",
            is_flag=True,
            help="Stream mode (tensorcom 0.1's -B): make one batch, then send it again and again (no decoding cost).",
        ),
        click.option(
            "-r",
            "report_batches",
            type=int,
            default=None,
            expose_value=False,
            callback=_refuse_report_batches,
            help="tensorcom 0.1's report every N batches: refused; reports come every --report SECONDS here.",
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
            help="On SIGTERM, seconds to finish what the server holds (zrep: requests received; stream: batches "
            "queued) before exiting.",
        ),
        server_key_options,
        click.option("-q", "--quiet", is_flag=True, help="Only log warnings."),
        click.option("-v", "--verbose", count=True, help="Log debug messages."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def build_image_server(
    dataset: ImageDataset,
    urls: Sequence[str],
    *,
    batch_size: int = 64,
    size: int = 224,
    normalize: bool = False,
    augment: bool = True,
    shuffle: bool = True,
    exact_decode: bool = False,
    benchmark: bool = False,
    workers: int = 2,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    report_interval: float = 10.0,
    queue: int = 2,
    control: str | None = None,
    metadata: bool | None = None,
    server_key: KeyPath | None = None,
    client_keys: KeyPath | None = None,
) -> Server:
    """A server of ``dataset``'s image pipeline: a request server for ``zrep://`` URLs, a stream server otherwise.

    With zrep URLs each client chooses seed, rank and world size, and ``workers`` server processes compute
    batches; in stream mode this server's ``seed``, ``rank`` and ``world_size`` fix the stream and ``workers``
    decode in a :class:`~tensorcom.pipeline.DistributedBatchedMap`. ``queue`` is the batches queued per client
    before sending blocks; with zrep URLs at least :data:`REQUEST_REPLY_QUEUE`, so that a zreq client's prefetch
    window always fits. Rates (batches/s, images/s) are logged every ``report_interval`` seconds.
    ``server_key`` and ``client_keys`` turn on CURVE (else $TENSORCOM_SERVER_KEY and $TENSORCOM_CLIENT_KEYS apply).
    """
    from tensorcom.server import Server  # zmq loads only in a program that serves

    expanded = expand_urls(list(urls))
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch size must be an int >= 1. Found: {batch_size!r}")
    options: dict[str, Any] = {
        "batch_size": batch_size,
        "size": size,
        "normalize": normalize,
        "augment": augment,
        "shuffle": shuffle,
        "draft": not exact_decode,
    }
    ImageTransform(dataset, size, normalize=normalize, augment=augment)  # validate before opening sockets
    keys = {"server_key": server_key, "client_keys": client_keys, "report_interval": report_interval}
    server: Server
    if all(parse_url(url).is_request for url in expanded):
        if control is not None:
            raise ConfigError("control= is for stream URLs; zreq clients send their state with each request")
        factory = functools.partial(image_pipeline, dataset=dataset, **options)
        server = Server(factory, expanded, workers=workers, queue=max(queue, REQUEST_REPLY_QUEUE), **keys)
    else:
        pipeline = image_pipeline(
            dataset=dataset, seed=seed, rank=rank, world_size=world_size, workers=workers, **options
        )
        try:
            if benchmark:  # one batch, sent again and again: what the transport and the clients can take
                if control is not None:
                    raise ConfigError(
                        "benchmark mode sends one batch again and again: it has no control socket"
                    )
                first = next(pipeline)
                pipeline.close()
                server = Server(itertools.repeat(first), expanded, queue=queue, **keys)
            else:
                server = Server(
                    pipeline, expanded, queue=queue, control=control, metadata=metadata, seed=seed, **keys
                )
        except BaseException:
            pipeline.close()
            raise
    server.report_samples = (batch_size, "images")
    log.info("serving %r on %s", dataset, ", ".join(server.endpoints))
    return server


def run_image_server(dataset_of: Callable[[], ImageDataset], urls: tuple[str, ...], **options: Any) -> None:
    """Index the data (errors before any socket opens), print "ready URL...", serve until SIGINT or SIGTERM (which
    lets the server finish what it holds for at most --drain seconds; a second one stops at once).

    Several stream URLs (braces, or --parallel N) are several publishers, each in a process of its own serving a
    distinct share (rank ``rank * N + k`` of ``world_size * N``) of the stream of one seed.
    """
    from tensorcom.server.run import run_publishers, run_server

    setup_logging(options.pop("verbose"), options.pop("quiet"))
    stop_on_sigterm()
    report = options.pop("report")
    drain = options.pop("drain")
    parallel = options.pop("parallel", 0)
    expanded = expand_urls(list(urls or (DEFAULT_URL,)))
    stream = not all(parse_url(url).is_request for url in expanded)
    publishers = _publisher_urls(expanded, parallel) if stream else [expanded]
    if not stream:
        if options["seed"] is not None:
            log.info("--seed is ignored for zrep:// URLs: each zreq client sends its own seed")
        options["seed"] = 0
    elif options["seed"] is None:
        options["seed"] = secrets.randbelow(1 << 31)
        log.info(
            "stream seed %d, drawn at random (pass --seed %d to send this stream again)",
            options["seed"],
            options["seed"],
        )
    dataset = dataset_of()
    if len(publishers) == 1:
        server = build_image_server(dataset, publishers[0], report_interval=report, **options)
        run_server(server, drain=drain, announce=echo_ready)
        return
    count, rank, world_size = len(publishers), options.pop("rank"), options.pop("world_size")

    def build(k: int) -> Server:
        return build_image_server(
            dataset,
            publishers[k],
            report_interval=report,
            rank=rank * count + k,
            world_size=world_size * count,
            **options,
        )

    if run_publishers(build, count, drain=drain, announce=echo_ready_urls):
        sys.exit(1)


def _publisher_urls(urls: list[str], parallel: int) -> list[list[str]]:
    """The URLs of each publisher: one URL each, or ``parallel`` publishers on one connecting URL."""
    if parallel <= 1:
        return [[url] for url in urls]
    url = parse_url(urls[0])
    if len(urls) != 1 or url.bind:
        raise ConfigError(
            f"--parallel {parallel} needs one URL that connects (zpush://, zrpub://); several processes cannot bind "
            f"one address, so write one URL per publisher with braces instead, e.g. zpub://127.0.0.1:788{{0..{parallel - 1}}}"
        )
    return [[urls[0]] for _ in range(parallel)]


@click.command(cls=TensorcomCommand)
@version_option("serve-imagenet-dir")
@click.option(
    "-d",
    "--directory",
    "--dir",
    "directory",
    default="./imagenet",
    show_default=True,
    help="Folder holding train/CLASS/*.JPEG (or CLASS/* directly); classes sorted, labels from 0.",
)
@click.option(
    "--shuffle/--no-shuffle",
    " /-S",
    default=True,
    show_default=True,
    help="Visit the images in a seeded random order each epoch, or (-S, as in tensorcom 0.1) in folder order.",
)
@parallel_option("-P")
@image_server_options
def serve_imagenet_dir(directory: str, urls: tuple[str, ...], **options: Any) -> None:
    """Serve the images of DIRECTORY on URLS: zrep://HOST:PORT for deterministic zreq clients (the default for
    training), or stream URLs (zpub://, zpush://, zrpush://, zrpub://; none given: zpub://127.0.0.1:7880, as
    tensorcom 0.1). Several stream URLs, e.g. zpub://127.0.0.1:788{0..3}, are several publishers: one process each,
    each sending a distinct share of the stream, so a client of zsub://127.0.0.1:788{0..3} gets every batch once.
    Without --seed a stream server draws its seed at random and logs it.

    Batches are (images, labels): uint8 (B, SIZE, SIZE, 3) or float32 with --normalize, and int64 labels. An
    unreadable image is logged and replaced by the next readable one in index order. Prints "ready URL..." (the
    URLs a client connects with) once listening; logs batches/s and images/s every --report seconds. SIGTERM lets
    the server finish what it holds (for at most --drain seconds), then it exits 0; a second SIGTERM or SIGINT
    stops at once. With --server-key and --client-keys (or $TENSORCOM_SERVER_KEY and $TENSORCOM_CLIENT_KEYS), only
    clients whose public key is in the folder can connect, and traffic is encrypted (see `tensorcom keygen`).
    """
    run_image_server(functools.partial(ImageDirectory, directory), urls, **options)


@click.command(cls=TensorcomCommand)
@version_option("serve-imagenet-shards")
@click.option(
    "-s",
    "--shards",
    "-u",
    "--url",
    "shards",
    required=True,
    help="Local tar shards with braces, e.g. '/data/train-{000000..000146}.tar' (SAMPLE.jpg + SAMPLE.cls); -u/--url "
    "is tensorcom 0.1's name (local files only here).",
)
@click.option(
    "-S",
    "--shuffle/--no-shuffle",
    default=True,
    show_default=True,
    help="Visit the samples in a seeded random order each epoch (tensorcom 0.1's -S; the default here), or in "
    "shard order.",
)
@parallel_option("-p")
@click.option(
    "-N",
    "--num-workers",
    type=int,
    default=None,
    help="tensorcom 0.1's name for -w/--workers.",
)
@image_server_options
def serve_imagenet_shards(shards: str, urls: tuple[str, ...], **options: Any) -> None:
    """Serve the images of SHARDS on URLS (zrep:// for zreq clients, or stream URLs), exactly as
    serve-imagenet-dir does for a folder, SIGTERM drain and CURVE keys included.

    Samples are numbered in shard order (as the braces expand), then tar order, so the same shards give the same
    stream everywhere; .cls holds the 0-based label.
    """
    num_workers = options.pop("num_workers")
    if num_workers is not None:
        options["workers"] = num_workers
    run_image_server(functools.partial(ImageShards, shards), urls, **options)


if __name__ == "__main__":
    serve_imagenet_dir()
