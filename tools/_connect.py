"""Options every monitoring tool shares (URLs, --timeout, the zreq position, CURVE keys) and opening their Connection."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from tensorcom.cli import client_key_options
from tensorcom.errors import ConfigError
from tensorcom.urls import expand_urls, parse_url

if TYPE_CHECKING:
    from tensorcom.client import Connection

Function = TypeVar("Function", bound=Callable[..., Any])

_KEYS = "tensorcom.client_keys"


def connection_options(function: Function) -> Function:
    """Add the URLS argument, --timeout, --seed/--rank/--world-size (for zreq:// URLs) and --client-key/
    --server-public-key (CURVE) to a command.

    The key options do not reach the command's function: :func:`open_connection` picks them up from the click
    context, so every tool gets them without a change to its signature.
    """

    @functools.wraps(function)
    def keep_keys(*args: Any, client_key: str | None, server_public_key: str | None, **kwargs: Any) -> Any:
        click.get_current_context().meta[_KEYS] = {
            "client_key": client_key,
            "server_public_key": server_public_key,
        }
        return function(*args, **kwargs)

    decorators = [
        click.argument("urls", nargs=-1, required=True),
        click.option(
            "--timeout",
            type=click.FloatRange(min=0, min_open=True),
            default=30.0,
            show_default=True,
            help="Seconds to wait for a batch before giving up.",
        ),
        click.option(
            "--seed", type=int, default=None, help="zreq:// only: the seed of the requested stream."
        ),
        click.option("--rank", type=int, default=None, help="zreq:// only: the rank to request batches as."),
        click.option("--world-size", type=int, default=None, help="zreq:// only: the job's number of ranks."),
        client_key_options,
    ]
    wrapped: Any = keep_keys
    for decorator in reversed(decorators):
        wrapped = decorator(wrapped)
    return wrapped


def open_connection(urls: tuple[str, ...], timeout: float, **request: int | None) -> Connection:
    """A Connection to the URLs (brace expansion applies). The request options (seed, rank, world_size) are passed
    on only when given, and only to zreq:// URLs, whose stream they choose. CURVE keys come from the command's
    --client-key/--server-public-key, else from $TENSORCOM_CLIENT_KEY/$TENSORCOM_SERVER_PUBLIC_KEY."""
    from tensorcom.client import Connection  # zmq loads when a tool connects, not for --help

    given: dict[str, Any] = {name: value for name, value in request.items() if value is not None}
    if given:
        parsed = [parse_url(url) for url in expand_urls(urls)]
        if not all(url.is_request for url in parsed):
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise ConfigError(f"{flags}: only for zreq:// URLs. Found: {' '.join(urls)}")
    context = click.get_current_context(silent=True)
    keys: dict[str, Any] = context.meta.get(_KEYS, {}) if context is not None else {}
    return Connection(list(urls), timeout=timeout, **given, **keys)
