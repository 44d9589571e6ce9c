"""The ``tensorcom`` command: ``demo``, ``serve`` and ``keygen``."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import click

from tensorcom.cli.options import (
    TensorcomGroup,
    echo_ready,
    server_key_options,
    setup_logging,
    stop_on_sigterm,
)

__all__ = ["main"]


@click.group(cls=TensorcomGroup)
def main() -> None:
    """tensorcom: deterministic, disaggregated data loading over ZeroMQ."""


@main.command()
@click.option("--seconds", default=5.0, show_default=True, help="How long to receive batches.")
@click.option("-b", "--batch-size", default=64, show_default=True, help="Images per batch.")
@click.option("--size", default=224, show_default=True, help="Image height and width.")
@click.option("--url", default=None, help="Server URL to use (default: an ipc socket in a temporary folder).")
def demo(seconds: float, batch_size: int, size: int, url: str | None) -> None:
    """Start a synthetic image server in a child process, receive from it, and print the throughput.

    The server sends uint8 NHWC image batches plus int64 labels; the client checks that the labels arrive in order.
    """
    from tensorcom.client import Connection

    with tempfile.TemporaryDirectory(prefix="tensorcom-demo-") as folder:
        server_url = url or f"zrpush+ipc://{os.path.join(folder, 'demo.sock')}"
        client_url = server_url.replace("zrpush", "zrpull", 1) if url is None else server_url
        command = [
            sys.executable,
            "-m",
            "tensorcom.cli.synthetic_server",
            "-b",
            str(batch_size),
            "--size",
            str(size),
            "--quiet",
            server_url,
        ]
        click.echo(f"server: {' '.join(command[2:])}")
        server = subprocess.Popen(command)
        try:
            with Connection(client_url, timeout=30.0) as connection:
                click.echo(f"client: Connection({client_url!r}) for {seconds:g} s")
                start = time.monotonic()
                count = nbytes = 0
                expected = 0
                while time.monotonic() - start < seconds:
                    images, labels = connection.recv()
                    if int(labels[0]) != expected % 1000:
                        raise click.ClickException(
                            f"batch out of order: label {int(labels[0])}, expected {expected}"
                        )
                    expected += batch_size
                    count += 1
                    nbytes += images.nbytes + labels.nbytes
                elapsed = time.monotonic() - start
        finally:
            server.terminate()
            server.wait(timeout=30)
    click.echo(
        f"received {count} batches of {tuple(images.shape)} uint8 + labels in {elapsed:.1f} s: "
        f"{count / elapsed:.1f} batches/s, {nbytes / elapsed / 1e9:.2f} GB/s"
    )


def _factory_options(options: tuple[str, ...]) -> dict[str, Any]:
    """Parse KEY=VALUE pairs; values are JSON where they parse as JSON (numbers, true/false, lists), else strings."""
    import json

    parsed: dict[str, Any] = {}
    for option in options:
        key, equals, value = option.partition("=")
        if not equals or not key.isidentifier():
            raise click.BadParameter(f"expected KEY=VALUE with KEY a Python name. Found: {option!r}")
        try:
            parsed[key] = json.loads(value)
        except ValueError:
            parsed[key] = value
    return parsed


@main.command()
@click.argument("factory")
@click.option(
    "--bind",
    "urls",
    multiple=True,
    default=["zrep://0.0.0.0:7880"],
    show_default=True,
    help="zrep:// URL to listen on (repeatable; braces expand; port 0 picks a free port).",
)
@click.option(
    "-w", "--workers", default=2, show_default=True, help="Worker processes computing batches (0: inline)."
)
@click.option(
    "-o",
    "--option",
    "options",
    multiple=True,
    metavar="KEY=VALUE",
    help="Extra keyword argument for the factory, e.g. -o batch_size=64 (JSON values; repeatable).",
)
@click.option("--report", default=10.0, show_default=True, help="Seconds between rate reports.")
@click.option(
    "--drain",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    help="On SIGTERM, seconds to finish the requests already received before exiting.",
)
@server_key_options
@click.option("-q", "--quiet", is_flag=True, help="Only log warnings.")
@click.option("-v", "--verbose", count=True, help="Log debug messages.")
def serve(
    factory: str,
    urls: tuple[str, ...],
    workers: int,
    options: tuple[str, ...],
    report: float,
    drain: float,
    server_key: str | None,
    client_keys: str | None,
    quiet: bool,
    verbose: int,
) -> None:
    """Serve the deterministic pipeline FACTORY (MODULE:FUNCTION) over the zreq/zrep protocol.

    FACTORY is called as FUNCTION(seed=S, rank=R, world_size=W, **options) for each client configuration and must
    return a tensorcom pipeline whose items are batches. Clients connect with
    Connection("zreq://HOST:PORT", seed=S, rank=R, world_size=W). Once listening, prints "ready URL...".
    SIGTERM finishes the requests already received (for at most --drain seconds), then exits 0; a second SIGTERM
    or SIGINT stops at once. With --server-key and --client-keys, only clients whose public key is in the folder
    can connect, and traffic is encrypted (see `tensorcom keygen`).
    """
    import functools

    from tensorcom.server.request import RequestServer
    from tensorcom.server.run import run_server
    from tensorcom.server.worker import load_factory

    setup_logging(verbose, quiet)
    stop_on_sigterm()
    target = load_factory(factory)
    extra = _factory_options(options)
    server = RequestServer(
        functools.partial(target, **extra) if extra else factory,
        list(urls),
        workers=workers,
        report_interval=report,
        server_key=server_key,
        client_keys=client_keys,
    )
    run_server(server, drain=drain, announce=echo_ready)


@main.command()
@click.argument("folder", type=click.Path(file_okay=False))
@click.option(
    "--client",
    "clients",
    multiple=True,
    default=["client"],
    show_default=True,
    help="Name of a client key pair to create (repeatable).",
)
@click.option("--server/--no-server", default=True, show_default=True, help="Create the server's key pair.")
def keygen(folder: str, clients: tuple[str, ...], server: bool) -> None:
    """Write CURVE key pairs into FOLDER: the server's, and one per client (its public key in FOLDER/clients).

    Never overwrites a key. Add a client later with --no-server --client NAME. Prints the environment variables
    that point servers and clients at the files.
    """
    from tensorcom._net.security import (
        CLIENT_KEY_ENV,
        CLIENT_KEYS_ENV,
        SERVER_KEY_ENV,
        SERVER_PUBLIC_KEY_ENV,
        generate_keys,
    )

    for path in generate_keys(folder, clients, server=server):
        click.echo(f"wrote {path}")
    root = os.path.abspath(folder)
    click.echo("servers:")
    click.echo(f"  export {SERVER_KEY_ENV}={os.path.join(root, 'server.key_secret')}")
    click.echo(f"  export {CLIENT_KEYS_ENV}={os.path.join(root, 'clients')}")
    click.echo("clients:")
    click.echo(f"  export {CLIENT_KEY_ENV}={os.path.join(root, clients[0] + '.key_secret')}")
    click.echo(f"  export {SERVER_PUBLIC_KEY_ENV}={os.path.join(root, 'server.key')}")


if __name__ == "__main__":
    main()
