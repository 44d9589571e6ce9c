"""The run loop of every server program (``tensorcom serve``, ``serve-imagenet-dir``, ``serve-imagenet-shards``,
``serve-synthetic``, the SwiftLoader's consumer servers): signals, readiness, run.

::

    server = Server(...)                      sockets bound; errors so far are configuration errors
    run_server(server, drain=10, announce=f)  SIGTERM handler in place, then f(server) (e.g. print the ready line),
                                              then server.run(): rate reports every report_interval seconds
    SIGTERM                                   server.stop(drain): finish what it holds for at most `drain` s, exit
    second SIGTERM, SIGINT, or drain + grace  KeyboardInterrupt: close at once

A program prints :func:`ready_line` so that whoever started it (a test, a supervisor, a demo) can wait for it and
connect with the URLs it names as they are.
"""

from __future__ import annotations

from collections.abc import Callable

from tensorcom.server._base import Server
from tensorcom.server.signals import drain_on_sigterm

__all__ = ["ready_line", "run_server"]


def ready_line(server: Server) -> str:
    """``ready URL...``: the line a server program prints once clients may connect, with the URLs they use."""
    return "ready " + " ".join(server.client_urls)


def run_server(
    server: Server, *, drain: float | None = None, announce: Callable[[Server], None] | None = None
) -> int:
    """Run ``server`` until its source ends, SIGINT or SIGTERM, and return the number of batches it sent.

    The first SIGTERM stops it after finishing what it holds for at most ``drain`` seconds (None: at once); a second
    SIGTERM or SIGINT stops it at once. ``announce(server)`` is called once the signal handler is in place, so
    that a SIGTERM sent as soon as the server says it is ready already drains. Call it on the main thread.
    """
    with drain_on_sigterm(server, drain):
        if announce is not None:
            announce(server)
        try:
            return server.run()
        except KeyboardInterrupt:
            return server.served
