"""SIGTERM for server programs: stop like Ctrl-C, or first drain what the server holds.

A process manager (systemd, Kubernetes, Slurm) stops a server with SIGTERM and kills it a while later. A server
given :func:`drain_on_sigterm` finishes in that time what it holds (a request server the requests it has
received, a stream server the batches it has queued) instead of dropping it; a second SIGTERM, or SIGINT, stops at once, and so does the end of the drain time plus
:data:`CLOSE_GRACE` (a server blocked in a send to a client that stopped reading never gets to drain).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Protocol

__all__ = ["CLOSE_GRACE", "Drainable", "drain_on_sigterm", "stop_on_sigterm"]

CLOSE_GRACE = 5.0
"""Seconds a draining server gets after its drain time to close (stop its workers, send the last replies)."""


class Drainable(Protocol):
    """A server that can finish the requests it holds before it stops (a :class:`~tensorcom.request_server.
    RequestServer`)."""

    @property
    def stopping(self) -> bool: ...

    def stop(self, drain: float | None = None) -> None: ...


def stop_on_sigterm() -> None:
    """Make SIGTERM behave like Ctrl-C, so servers leave through their normal clean-up path."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


@contextlib.contextmanager
def drain_on_sigterm(server: Drainable, seconds: float | None) -> Iterator[None]:
    """While in the block, SIGTERM asks ``server`` to finish what it holds (for at most ``seconds``; None: nothing)
    and stop. KeyboardInterrupt is raised by a second SIGTERM, or when the block is still running ``seconds`` +
    :data:`CLOSE_GRACE` after the first (an alarm: SIGALRM). The previous handlers are restored on leaving.

    Signal handlers belong to the main thread: call it there.
    """

    def terminate(signum: int, frame: object) -> None:
        if server.stopping:
            raise KeyboardInterrupt(f"signal {signum}")
        server.stop(drain=seconds)
        signal.setitimer(signal.ITIMER_REAL, (seconds or 0.0) + CLOSE_GRACE)

    def give_up(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"SIGTERM, and not stopped {(seconds or 0.0) + CLOSE_GRACE:g} s later")

    previous_alarm = signal.signal(signal.SIGALRM, give_up)
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGALRM, previous_alarm)
