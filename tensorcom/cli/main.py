"""The ``tensorcom`` command: ``demo``, ``serve`` and ``keygen``."""

from __future__ import annotations

import os
import select
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
    version_option,
)
from tensorcom.errors import ConfigError, TensorcomError

__all__ = ["main"]


@click.group(cls=TensorcomGroup)
@version_option("tensorcom")
def main() -> None:
    """tensorcom: deterministic, disaggregated data loading over ZeroMQ."""


DEMO_READY_TIMEOUT = 30.0
"""Seconds ``tensorcom demo`` waits for its server's ready line."""
_DEMO_SCHEMES = ("zpush", "zpub", "zrpush", "zrpub")


def _demo_server_url(context: click.Context, parameter: click.Parameter, url: str | None) -> str | None:
    """``--url``: the URL if the demo's synthetic server can send on it, else a click error saying what is
    expected (checked before the server starts)."""
    if url is None:
        return None
    from tensorcom.errors import URLError
    from tensorcom.urls import PEER_SCHEMES, expand_urls, parse_url

    expected = (
        "the server's URL: one stream URL it sends on (zpub://, zpush://, zrpush:// or zrpub://, over tcp or ipc), "
        "e.g. zpub://127.0.0.1:7880"
    )
    try:
        expanded = expand_urls(url)
        if len(expanded) != 1:
            raise click.BadParameter(f"expected {expected}. Found {len(expanded)} URLs: {url!r}")
        parsed = parse_url(expanded[0])
    except URLError as error:
        raise click.BadParameter(f"{error}. Expected {expected}") from None
    if parsed.scheme not in _DEMO_SCHEMES:
        what = {"ROUTER": "a request server's URL", "DEALER": "a request client's URL"}.get(
            parsed.socket_type, f"a client's URL (its server side is {PEER_SCHEMES[parsed.scheme]}://)"
        )
        raise click.BadParameter(f"expected {expected}. Found {what}: {url!r}")
    if parsed.transport == "inproc":
        raise click.BadParameter(
            f"expected {expected}. Found inproc, which cannot reach another process: {url!r}"
        )
    return expanded[0]


def _read_ready_line(server: subprocess.Popen[bytes], timeout: float) -> str | None:
    """The server's ``ready URL...`` line; "" when its stdout ends first, None when none comes within ``timeout``."""
    stream = server.stdout
    if stream is None:
        raise ValueError("the server's stdout must be a pipe")
    deadline = time.monotonic() + timeout
    received = b""
    while True:
        lines = received.split(b"\n")
        for line in lines[:-1]:
            if line.startswith(b"ready "):
                return line.decode(errors="replace").strip()
        received = lines[-1]
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        readable, _, _ = select.select([stream], [], [], left)
        if readable:
            chunk = os.read(stream.fileno(), 65536)
            if not chunk:
                return ""
            received += chunk


def _server_failure(
    server: subprocess.Popen[bytes], errors: Any, timeout: float, ended: bool
) -> click.ClickException:
    """The error for a demo server that never said it was ready (``ended``: its stdout closed): its exit code or
    the wait, and its stderr."""
    try:
        code = server.wait(timeout=10) if ended else server.poll()
    except subprocess.TimeoutExpired:
        code = None
    if code is not None:
        why = f"exited with code {code}"
    elif ended:
        why = "closed its stdout"
    else:
        why = f"printed no 'ready URL' line within {timeout:g} s"
    errors.flush()
    errors.seek(0)
    text = errors.read().decode(errors="replace").strip()
    shown = f"; its stderr:\n{text}" if text else " and wrote nothing to stderr"
    return click.ClickException(
        f"the demo server {why}; expected it to print 'ready URL' once listening{shown}"
    )


@main.command()
@click.option(
    "--seconds",
    type=click.FloatRange(min=0, min_open=True),
    default=5.0,
    show_default=True,
    help="How long to receive batches (at least one batch is received).",
)
@click.option(
    "-b", "--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Images per batch."
)
@click.option(
    "--size", type=click.IntRange(min=1), default=224, show_default=True, help="Image height and width."
)
@click.option(
    "--url",
    default=None,
    metavar="URL",
    callback=_demo_server_url,
    help="The server's URL, a stream URL it sends on (e.g. zpub://127.0.0.1:7880); the client connects to the URL "
    "the server prints. Default: zrpush over an ipc socket in a temporary folder.",
)
def demo(seconds: float, batch_size: int, size: int, url: str | None) -> None:
    """Start a synthetic image server in a child process, receive from it, and print the throughput.

    The server sends uint8 NHWC image batches plus int64 labels; the client connects to the URL on the server's
    ready line and checks that the labels arrive in order.
    """
    from tensorcom.client import Connection

    with tempfile.TemporaryDirectory(prefix="tensorcom-demo-") as folder:
        server_url = url or f"zrpush+ipc://{os.path.join(folder, 'demo.sock')}"
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
        click.echo(f"server: serve-synthetic {' '.join(command[3:])}")
        with open(os.path.join(folder, "server.stderr"), "w+b") as errors:
            server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors)
            try:
                ready = _read_ready_line(server, DEMO_READY_TIMEOUT)
                if not ready:
                    raise _server_failure(server, errors, DEMO_READY_TIMEOUT, ended=ready == "")
                client_url = ready.split()[1]
                with Connection(client_url, timeout=DEMO_READY_TIMEOUT) as connection:
                    click.echo(f"client: Connection({client_url!r}) for {seconds:g} s")
                    count, nbytes, shape, elapsed = _receive(connection, seconds, batch_size)
            finally:
                server.terminate()
                try:
                    server.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait(timeout=30)
                if server.stdout is not None:
                    server.stdout.close()
    click.echo(
        f"received {count} batch{'es' if count != 1 else ''} of {shape} uint8 + labels in {elapsed:.1f} s: "
        f"{count / elapsed:.1f} batches/s, {nbytes / elapsed / 1e9:.2f} GB/s"
    )


def _receive(connection: Any, seconds: float, batch_size: int) -> tuple[int, int, tuple[int, ...], float]:
    """Receive for ``seconds`` (at least one batch), checking that labels follow on from batch to batch; return
    (batches, bytes, image batch shape, seconds taken)."""
    start = time.monotonic()
    count = nbytes = 0
    expected: int | None = None  # a subscriber may join a stream after its first batches
    while True:
        images, labels = connection.recv()
        first = int(labels[0])
        if expected is not None and first != expected:
            raise click.ClickException(f"batch out of order: its first label is {first}; expected {expected}")
        expected = (first + batch_size) % 1000
        count += 1
        nbytes += images.nbytes + labels.nbytes
        elapsed = time.monotonic() - start
        if elapsed >= seconds:
            return count, nbytes, tuple(images.shape), max(elapsed, 1e-9)


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
    default=["zrep://127.0.0.1:7880"],
    show_default=True,
    help="zrep:// URL to listen on (repeatable; braces expand; port 0 picks a free port). The default listens on "
    "this host only; write zrep://0.0.0.0:PORT to serve other hosts (with CURVE keys: see `tensorcom keygen`).",
)
@click.option(
    "-w", "--workers", default=2, show_default=True, help="Worker processes computing batches (0: inline)."
)
@click.option(
    "--worker-deadline",
    type=click.FloatRange(min=0, min_open=True),
    default=300.0,
    show_default=True,
    help="Seconds a worker may stay silent (stuck in the pipeline) before it is killed and replaced.",
)
@click.option(
    "--max-clients",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    help="Clients the server keeps requests for at once; a new client beyond them is refused (it asks another "
    "server, or this one again after a wait). With the per-client budgets this bounds the server's memory (see RequestServer).",
)
@click.option(
    "--direct/--no-direct",
    default=True,
    show_default=True,
    help="Workers listen on ports of their own and reply to clients directly; --no-direct keeps every request "
    "and reply on the --bind port (e.g. behind a Kubernetes Service that exposes one port).",
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
    worker_deadline: float,
    max_clients: int,
    direct: bool,
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
    _try_factory(factory, target, extra)
    server = RequestServer(
        functools.partial(target, **extra) if extra else factory,
        list(urls),
        workers=workers,
        worker_deadline=worker_deadline,
        max_clients=max_clients,
        direct=direct,
        report_interval=report,
        server_key=server_key,
        client_keys=client_keys,
    )
    run_server(server, drain=drain, announce=echo_ready)


def _try_factory(name: str, target: Any, options: dict[str, Any]) -> None:
    """Build the pipeline once (seed 0, rank 0 of 1) before listening, so that a bad -o option (an unknown keyword,
    batch_size=0, a missing folder) is a one-line error now rather than an error reply to every client later."""
    shown = " ".join(f"-o {key}={value!r}" for key, value in options.items()) or "no -o options"
    try:
        pipeline = target(seed=0, rank=0, world_size=1, **options)
    except TensorcomError:
        raise
    except TypeError as error:
        raise ConfigError(f"factory {name} does not take these options ({shown}): {error}") from None
    except Exception as error:
        raise ConfigError(f"factory {name} with {shown} failed: {type(error).__name__}: {error}") from None
    close = getattr(pipeline, "close", None)
    if callable(close):
        close()


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
