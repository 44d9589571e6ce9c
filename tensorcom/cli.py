"""Click glue shared by tensorcom's programs, and the ``tensorcom`` command itself."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, NoReturn

import click

from tensorcom.errors import TensorcomError

__all__ = ["TensorcomCommand", "TensorcomGroup", "main", "setup_logging", "stop_on_sigterm"]


def _fail(error: TensorcomError) -> NoReturn:
    click.echo(f"Error: {error}", err=True)
    sys.exit(error.exit_code)


class TensorcomCommand(click.Command):
    """A click command that turns tensorcom errors into one clean line and the error's exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TensorcomError as error:
            _fail(error)


class TensorcomGroup(click.Group):
    """A click group whose commands report tensorcom errors as one line (see :class:`TensorcomCommand`)."""

    command_class = TensorcomCommand

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TensorcomError as error:
            _fail(error)


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    """Log to stderr: warnings when quiet, info by default, debug with -v."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(
        level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s", stream=sys.stderr
    )


def stop_on_sigterm() -> None:
    """Make SIGTERM behave like Ctrl-C, so servers leave through their normal clean-up path."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


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
    from tensorcom.connection import Connection

    with tempfile.TemporaryDirectory(prefix="tensorcom-demo-") as folder:
        server_url = url or f"zrpush+ipc://{os.path.join(folder, 'demo.sock')}"
        client_url = server_url.replace("zrpush", "zrpull", 1) if url is None else server_url
        command = [
            sys.executable,
            "-m",
            "tensorcom_servers.synthetic",
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
@click.option("-q", "--quiet", is_flag=True, help="Only log warnings.")
@click.option("-v", "--verbose", count=True, help="Log debug messages.")
def serve(
    factory: str,
    urls: tuple[str, ...],
    workers: int,
    options: tuple[str, ...],
    report: float,
    quiet: bool,
    verbose: int,
) -> None:
    """Serve the deterministic pipeline FACTORY (MODULE:FUNCTION) over the zreq/zrep protocol.

    FACTORY is called as FUNCTION(seed=S, rank=R, world_size=W, **options) for each client configuration and must
    return a tensorcom pipeline whose items are batches. Clients connect with
    Connection("zreq://HOST:PORT", seed=S, rank=R, world_size=W). Once listening, prints "ready URL...".
    Stops cleanly on SIGINT or SIGTERM.
    """
    import functools

    from tensorcom.request_server import RequestServer, load_factory

    setup_logging(verbose, quiet)
    stop_on_sigterm()
    target = load_factory(factory)
    extra = _factory_options(options)
    server = RequestServer(
        functools.partial(target, **extra) if extra else factory,
        list(urls),
        workers=workers,
        report_interval=report,
    )
    click.echo("ready " + " ".join(server.endpoints), nl=True)
    sys.stdout.flush()
    try:
        server.run()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
