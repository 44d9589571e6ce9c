"""Options every monitoring tool shares (URLs, --timeout, the zreq position) and opening their Connection."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from tensorcom.connection import Connection
from tensorcom.errors import ConfigError
from tensorcom.urls import expand_urls, parse_url

Function = TypeVar("Function", bound=Callable[..., Any])


def connection_options(function: Function) -> Function:
    """Add the URLS argument, --timeout, and --seed/--rank/--world-size (for zreq:// URLs) to a command."""
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
    ]
    for decorator in reversed(decorators):
        function = decorator(function)
    return function


def open_connection(urls: tuple[str, ...], timeout: float, **request: int | None) -> Connection:
    """A Connection to the URLs (brace expansion applies). The request options (seed, rank, world_size) are passed
    on only when given, and only to zreq:// URLs, whose stream they choose."""
    given: dict[str, Any] = {name: value for name, value in request.items() if value is not None}
    if given:
        parsed = [parse_url(url) for url in expand_urls(urls)]
        if not all(url.is_request for url in parsed):
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise ConfigError(f"{flags}: only for zreq:// URLs. Found: {' '.join(urls)}")
    return Connection(list(urls), timeout=timeout, **given)
