"""Options every monitoring tool shares (URLs, --timeout, the zreq position, CURVE keys), tensorcom 0.1's flags
that have no meaning here (refused with one line naming what to use instead), and opening their Connection."""

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

DEFAULT_URL = "zsub://127.0.0.1:7880"
"""Where a tool reads with no URL given: tensorcom 0.1's default (a publisher on port 7880 of this host)."""

HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}
"""Click context settings of every tool: ``-h`` as well as ``--help``, as tensorcom 0.1's tools had."""


class RefusedOption(click.ClickException):
    """A tensorcom 0.1 flag that has no meaning here: ``Error: FLAG ...`` on one line, what to use instead, exit
    code 2 (a usage error), before anything connects."""

    exit_code = 2


def refused_option(
    *declarations: str, reason: str, help: str, metavar: str | None = None
) -> Callable[[Function], Function]:
    """A tensorcom 0.1 flag kept only to refuse it: listed in ``--help`` with ``help``, and when given, the program
    ends at once with ``Error: -X/--xx: REASON``. With ``metavar`` the flag takes a value (as 0.1's did), so that
    the value is not read as a URL."""
    names = "/".join(declarations)

    def refuse(context: click.Context, parameter: click.Parameter, value: Any) -> None:
        if value is not None and value is not False:
            raise RefusedOption(f"{names}: {reason}")

    return click.option(
        *declarations,
        is_flag=metavar is None,
        default=None if metavar is not None else False,
        metavar=metavar,
        expose_value=False,
        is_eager=True,
        callback=refuse,
        help=help,
    )


def connection_options(
    default_urls: tuple[str, ...] = (DEFAULT_URL,), timeout_note: str = ""
) -> Callable[[Function], Function]:
    """Add the URLS argument (``default_urls`` when none are given), --timeout, --seed/--rank/--world-size (for
    zreq:// URLs) and --client-key/--server-public-key (CURVE) to a command.

    The key options do not reach the command's function: :func:`open_connection` picks them up from the click
    context, so every tool gets them without a change to its signature. ``timeout_note`` is added to the one-line
    error for a --timeout that is not positive (tensorshow's 0.1 --timeout took -1).
    """

    def check_timeout(context: click.Context, parameter: click.Parameter, value: float) -> float:
        if not value > 0:
            raise RefusedOption(
                f"--timeout must be > 0 (seconds to wait for a batch). Found: {value:g}{timeout_note}"
            )
        return value

    def decorate(function: Function) -> Function:
        @functools.wraps(function)
        def with_defaults(
            *args: Any,
            urls: tuple[str, ...],
            client_key: str | None,
            server_public_key: str | None,
            **kwargs: Any,
        ) -> Any:
            click.get_current_context().meta[_KEYS] = {
                "client_key": client_key,
                "server_public_key": server_public_key,
            }
            return function(*args, urls=urls or default_urls, **kwargs)

        decorators = [
            click.argument("urls", nargs=-1, required=False),
            click.option(
                "--timeout",
                type=float,
                default=30.0,
                show_default=True,
                callback=check_timeout,
                help="Seconds to wait for a batch before giving up.",
            ),
            click.option(
                "--seed", type=int, default=None, help="zreq:// only: the seed of the requested stream."
            ),
            click.option(
                "--rank", type=int, default=None, help="zreq:// only: the rank to request batches as."
            ),
            click.option(
                "--world-size", type=int, default=None, help="zreq:// only: the job's number of ranks."
            ),
            client_key_options,
        ]
        wrapped: Any = with_defaults
        for decorator in reversed(decorators):
            wrapped = decorator(wrapped)
        return wrapped

    return decorate


def open_connection(urls: tuple[str, ...], timeout: float, **request: int | None) -> Connection:
    """One Connection to all the URLs (brace expansion applies; several URLs, or a brace URL, are read together).
    The request options (seed, rank, world_size) are passed on only when given, and only to zreq:// URLs, whose
    stream they choose. CURVE keys come from the command's --client-key/--server-public-key, else from
    $TENSORCOM_CLIENT_KEY/$TENSORCOM_SERVER_PUBLIC_KEY."""
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
