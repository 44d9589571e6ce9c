"""Options every monitoring tool shares (URLs, --timeout, the zreq position) and opening their Connection."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import click

from tensorcom.connection import Connection
from tensorcom.errors import ConfigError

Function = TypeVar("Function", bound=Callable[..., Any])

_REQUEST_OPTIONS = ("seed", "rank", "world_size")


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
    """A Connection to the URLs (brace expansion applies); request options are passed on only when given."""
    given: dict[str, Any] = {
        name: value for name, value in request.items() if name in _REQUEST_OPTIONS and value is not None
    }
    accepted = inspect.signature(Connection).parameters
    missing = [name for name in given if name not in accepted]
    if missing:
        flags = ", ".join("--" + name.replace("_", "-") for name in missing)
        raise ConfigError(
            f"{flags}: this version's Connection does not take {', '.join(missing)} (zreq only)"
        )
    return Connection(list(urls), timeout=timeout, **given)
