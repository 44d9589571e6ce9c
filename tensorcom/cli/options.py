"""Click glue shared by tensorcom's programs: errors as one clean line, ``--version``, logging, the CURVE key
options, output paths checked before any work, the ready line.

Nothing here loads zmq: a program's ``--help`` and ``--version`` stay fast (the server and client load inside the
functions that run one).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

import tensorcom
from tensorcom.errors import ConfigError, TensorcomError
from tensorcom.server.signals import stop_on_sigterm

if TYPE_CHECKING:
    from tensorcom.server import Server

__all__ = [
    "TensorcomCommand",
    "TensorcomGroup",
    "check_output_path",
    "client_key_options",
    "echo_ready",
    "echo_ready_urls",
    "server_key_options",
    "setup_logging",
    "stop_on_sigterm",
    "version_option",
]

Function = TypeVar("Function", bound=Callable[..., Any])


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


def version_option(program: str) -> Callable[[Function], Function]:
    """Add ``--version`` to a program: it prints ``PROGRAM VERSION`` (tensorcom's version) and exits."""
    return click.version_option(
        tensorcom.__version__,
        "--version",
        prog_name=program,
        message="%(prog)s %(version)s",
        help="Show the version.",
    )


def check_output_path(path: str, option: str) -> None:
    """Refuse an output file that cannot be written (its folder is missing or read-only, or it is a folder), before
    any work starts: a ConfigError naming ``option`` and what was expected."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConfigError(f"{option} {path!r} is a folder; expected a file name")
    if not os.path.isdir(folder):
        what = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise ConfigError(
            f"{option} {path!r}: folder {folder!r} {what}; expected a file in an existing folder"
        )
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"{option} {path!r}: folder {folder!r} is not writable")


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    """Log to stderr: warnings when quiet, info by default, debug with -v."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(
        level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s", stream=sys.stderr
    )


def server_key_options(function: Function) -> Function:
    """Add ``--server-key FILE`` and ``--client-keys DIR`` (CURVE) to a server command.

    The command receives ``server_key`` and ``client_keys`` (None when not given, so $TENSORCOM_SERVER_KEY and
    $TENSORCOM_CLIENT_KEYS apply) and passes them on: ``Server(..., server_key=server_key, client_keys=client_keys)``.
    """
    function = click.option(
        "--client-keys",
        type=click.Path(exists=True),
        default=None,
        help="CURVE: folder of allowed client public keys (NAME.key) [default: $TENSORCOM_CLIENT_KEYS].",
    )(function)
    return click.option(
        "--server-key",
        type=click.Path(exists=True, dir_okay=False),
        default=None,
        help="CURVE: this server's secret key file (.key_secret) [default: $TENSORCOM_SERVER_KEY].",
    )(function)


def client_key_options(function: Function) -> Function:
    """Add ``--client-key FILE`` and ``--server-public-key FILE`` (CURVE) to a client command.

    The command receives ``client_key`` and ``server_public_key`` (None when not given, so $TENSORCOM_CLIENT_KEY and
    $TENSORCOM_SERVER_PUBLIC_KEY apply) and passes them to ``Connection(...)``.
    """
    function = click.option(
        "--server-public-key",
        type=click.Path(exists=True, dir_okay=False),
        default=None,
        help="CURVE: the server's public key file (.key) [default: $TENSORCOM_SERVER_PUBLIC_KEY].",
    )(function)
    return click.option(
        "--client-key",
        type=click.Path(exists=True, dir_okay=False),
        default=None,
        help="CURVE: this client's secret key file (.key_secret) [default: $TENSORCOM_CLIENT_KEY].",
    )(function)


def echo_ready(server: Server) -> None:
    """Print the ready line (``ready URL...``, the URLs a client connects with) and flush it at once."""
    echo_ready_urls(server.client_urls)


def echo_ready_urls(urls: list[str]) -> None:
    """Print the ready line of a program that serves from several processes (the client URLs of all of them)."""
    click.echo("ready " + " ".join(urls))
    sys.stdout.flush()
