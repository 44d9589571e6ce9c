"""``serve-synthetic``: send synthetic image-like batches (uint8 NHWC images and int64 labels) on stream URLs;
the server ``tensorcom demo`` starts."""

from __future__ import annotations

import itertools
import sys

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
from tensorcom.datasets.synthetic import synthetic_batches
from tensorcom.urls import expand_urls

__all__ = ["serve_synthetic"]


@click.command(cls=TensorcomCommand)
@version_option("serve-synthetic")
@click.argument("urls", nargs=-1, required=True)
@click.option("-b", "--batch-size", default=64, show_default=True, help="Images per batch.")
@click.option("--size", default=224, show_default=True, help="Image height and width.")
@click.option("-n", "--count", type=int, default=None, help="Stop after this many batches (default: never).")
@click.option("--seed", default=0, show_default=True, help="Seed of the random image pool.")
@click.option(
    "--queue", default=2, show_default=True, help="Batches queued per client before sending blocks."
)
@click.option("--report", default=10.0, show_default=True, help="Seconds between rate reports.")
@server_key_options
@click.option("-q", "--quiet", is_flag=True, help="Only log warnings.")
@click.option("-v", "--verbose", count=True, help="Log debug messages.")
def serve_synthetic(
    urls: tuple[str, ...],
    batch_size: int,
    size: int,
    count: int | None,
    seed: int,
    queue: int,
    report: float,
    server_key: str | None,
    client_keys: str | None,
    quiet: bool,
    verbose: int,
) -> None:
    """Send synthetic batches on URLS (e.g. zpub://0.0.0.0:7880 or zrpush+ipc:///tmp/s).

    Batch i holds labels (i*B + 0..B-1) mod 1000, so a client can check order and completeness. Several URLS
    (e.g. zpub://127.0.0.1:788{0..3}) are several publishers, one process each: publisher k of N sends batches k,
    k+N, k+2N, ... (of the first COUNT). Prints "ready URL..." (the URLs a client connects with) once the sockets
    are open; SIGTERM or SIGINT stops it.
    """
    from tensorcom.server.run import run_publishers, run_server  # zmq loads only when serving
    from tensorcom.server.stream import StreamServer

    setup_logging(verbose, quiet)
    stop_on_sigterm()
    expanded = expand_urls(list(urls))

    def build(k: int, publishers: int = len(expanded)) -> StreamServer:
        batches = synthetic_batches(batch_size, size, count=count, seed=seed)
        return StreamServer(
            itertools.islice(batches, k, None, publishers),
            expanded[k : k + 1] if publishers > 1 else expanded,
            queue=queue,
            report_interval=report,
            server_key=server_key,
            client_keys=client_keys,
        )

    if len(expanded) == 1:
        run_server(build(0), announce=echo_ready)
        return

    if run_publishers(build, len(expanded), announce=echo_ready_urls):
        sys.exit(1)


if __name__ == "__main__":
    serve_synthetic()
