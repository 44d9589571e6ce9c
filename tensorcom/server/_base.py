"""What every tensorcom server is: the base class of the stream and request servers.

``Server(source, urls, ...)`` returns a :class:`~tensorcom.server.stream.StreamServer` for push/pub URLs and a
:class:`~tensorcom.server.request.RequestServer` for ``zrep://`` URLs; both are :class:`Server` s with one
lifecycle::

    server = Server(source, urls, ...)    sockets bound, nothing sent yet; server.client_urls says where to connect
    server.run(count=None, duration=None) serve until the source ends, count batches, duration seconds or stop()
    server.stop(drain=None)               from another thread or a signal handler: run() returns, first finishing
                                          what it holds for at most ``drain`` seconds
    server.close(linger=None)             (run() closes on its way out; close() is for servers never run)

Each server kind registers the socket types it serves (``class StreamServer(Server, sockets=("PUSH", "PUB"))``),
so this module imports neither of them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, ClassVar, Self

from tensorcom.errors import ConfigError, URLError
from tensorcom.urls import ParsedURL, expand_urls, parse_url, peer_url

__all__ = ["Server"]

log = logging.getLogger(__name__)


class _Lifecycle:
    """What every server does the same way: run/stop/close, where clients connect, rate reports.

    :class:`Server` adds the choice of kind by URL; this class holds ``__init__`` apart from it so that type
    checkers read ``Server(...)`` by its ``__new__`` and ``StreamServer(...)`` by its own ``__init__``.
    """

    served: int
    """Batches sent so far."""
    nbytes: int
    """Bytes of the batches sent so far (array data, as encoded)."""
    report_interval: float
    report_samples: tuple[int, str] | None = None
    """(samples per batch, what a sample is): rate reports then also give e.g. ``2435 images/s``."""

    def __init__(self, report_interval: float) -> None:
        if report_interval <= 0:
            raise ConfigError(f"report_interval must be > 0 seconds. Found: {report_interval}")
        self.report_interval = report_interval
        self.served = 0
        self.nbytes = 0
        self._stop_requested = False
        self._drain: float | None = None
        self._started = time.monotonic()
        self._last_report = (self._started, 0, 0)

    @property
    def endpoints(self) -> list[str]:
        """The zmq addresses the server's sockets bound or connected to (port 0 shows its real port)."""
        return [address for _, address in self._addresses()]

    @property
    def client_urls(self) -> list[str]:
        """The URLs a client uses to reach this server, as they are: ``Connection(" ".join(server.client_urls))``.

        ``zrep://0.0.0.0:0`` gives ``zreq://HOST:PORT`` with the real port; a wildcard host becomes this
        machine's name.
        """
        return [peer_url(url, address) for url, address in self._addresses()]

    def _addresses(self) -> list[tuple[ParsedURL, str]]:
        raise NotImplementedError

    def run(self, count: int | None = None, duration: float | None = None) -> int:
        """Serve until the source ends, ``count`` batches have been sent, ``duration`` seconds have passed, or
        :meth:`stop` is called; then close. Returns the number of batches sent. KeyboardInterrupt closes at once."""
        raise NotImplementedError

    def _check_run_limits(self, count: int | None, duration: float | None) -> None:
        if count is not None and count < 0:
            raise ConfigError(f"count must be >= 0 or None. Found: {count}")
        if duration is not None and duration < 0:
            raise ConfigError(f"duration must be >= 0 seconds or None. Found: {duration}")

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stop_requested

    def stop(self, drain: float | None = None) -> None:
        """Ask :meth:`run` (in another thread, or from a signal handler) to return and close the server.

        With ``drain`` (seconds), it first finishes what it holds for at most that long: a request server answers
        the requests it has received, a stream server lets the batches it has queued leave.
        """
        if drain is not None and drain < 0:
            raise ConfigError(f"drain must be >= 0 seconds or None. Found: {drain}")
        self._drain = drain
        self._stop_requested = True

    def close(self, linger: float | None = None) -> None:
        """Close every socket, giving what is queued up to ``linger`` seconds to leave."""
        raise NotImplementedError

    def _maybe_report(self) -> None:
        """Log the rates since the last report, once every ``report_interval`` seconds."""
        now = time.monotonic()
        then, served, nbytes = self._last_report
        if now - then < self.report_interval:
            return
        self._last_report = (now, self.served, self.nbytes)
        if self.served == served:
            return
        seconds = now - then
        samples = ""
        if self.report_samples is not None:
            size, name = self.report_samples
            samples = f", {(self.served - served) * size / seconds:.0f} {name}/s"
        log.info(
            "served %d batches: %.1f batches/s%s, %.1f MB/s on %s",
            self.served,
            (self.served - served) / seconds,
            samples,
            (self.nbytes - nbytes) / seconds / 1e6,
            ", ".join(self.endpoints),
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Server(_Lifecycle):
    """A tensorcom server; ``Server(source, urls, **options)`` builds the kind its URLs ask for.

    Stream URLs (``zpush``, ``zpub``, ``zrpush``, ``zrpub``): a :class:`~tensorcom.server.stream.StreamServer`
    sends every batch of ``source`` as fast as clients take them. ``zrep://`` URLs: a
    :class:`~tensorcom.server.request.RequestServer` answers numbered requests from ``source``, a pipeline factory.
    See each class for its options. The two kinds cannot be mixed in one server.
    """

    _kinds: ClassVar[dict[str, type[Server]]] = {}

    def __init_subclass__(cls, sockets: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for socket_type in sockets:
            Server._kinds[socket_type] = cls

    def __new__(
        cls, source: Any = None, urls: str | Sequence[str] = "zpub://127.0.0.1:7880", **options: Any
    ) -> Server:
        return super().__new__(_kind_of(urls) if cls is Server else cls)


def _kind_of(urls: str | Sequence[str]) -> type[Server]:
    """The server class that serves ``urls``, which must all ask for the same kind."""
    expanded = expand_urls(urls)
    kinds: set[type[Server]] = set()
    for url in expanded:
        parsed = parse_url(url)
        kind = Server._kinds.get(parsed.socket_type)
        if kind is None:
            raise URLError(
                f"a Server cannot use a {parsed.scheme} URL ({url!r}); it takes zpush, zpub, zrpush, zrpub "
                "(stream) or zrep (request) URLs"
            )
        kinds.add(kind)
    if len(kinds) > 1:
        raise URLError(f"serve zrep:// URLs or stream URLs, not both at once. Found: {' '.join(expanded)}")
    return kinds.pop()
