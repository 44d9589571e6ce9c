"""The client a training rank holds: receives batches from servers and yields them as arrays or tensors.

Stream mode (``zpull``, ``zsub``, ``zrpull``, ``zrsub``) receives whatever the servers send, as fast as the bounded
queues allow; it reads tensorcom 0.1 servers as well as ours. Every URL gets its own socket, all of them are
polled, and ready sockets are read in turn so no server starves another.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq

from tensorcom import codec
from tensorcom.convert import ConverterSpec, make_converters
from tensorcom.errors import ConfigError, DecodeError, Timeout
from tensorcom.transport import Endpoint, open_endpoint, parse_endpoints
from tensorcom.urls import expand_urls

__all__ = ["BatchInfo", "Connection"]

log = logging.getLogger(__name__)

_RECEIVING = {"PULL", "SUB"}


@dataclass
class BatchInfo:
    """What is known about the last batch received, besides its arrays.

    ``endpoint`` is the socket address (stream mode) or the server's name (zreq); ``step``, ``epoch`` and
    ``indices`` (the dataset indices of its samples) are known for zreq batches only.
    """

    endpoint: str = ""
    nbytes: int = 0
    infos: list[str] = field(default_factory=list)
    count: int = 0
    step: int | None = None
    epoch: int | None = None
    indices: list[int] = field(default_factory=list)


class Connection:
    """Receive batches from one or more servers.

    Given ``zreq://`` URLs, ``Connection(urls, seed=..., rank=..., world_size=..., state=...)`` returns a
    :class:`tensorcom.request_client.RequestConnection`: the deterministic, resumable request protocol.

    Args:
        urls: one URL, a whitespace-separated string of URLs, or a list; braces expand (``zsub://h:788{0..3}``).
        converters: "numpy" (default), "torch", a callable applied to each array, or one per array position.
        timeout: seconds to wait for a batch before raising :class:`tensorcom.Timeout` (None waits forever).
        epoch: if set, each ``iter(connection)`` yields this many batches, then stops; the next ``iter`` goes on.
        total: if set, the connection yields at most this many batches in all, then every iteration ends.
        queue: batches each socket may hold before the server is slowed down (the receive high-water mark).
        on_malformed: "raise" (default) raises :class:`tensorcom.DecodeError` naming the server; "log" logs it,
            counts it in ``malformed`` and goes on to the next batch.
    """

    def __new__(cls, urls: str | Sequence[str] = (), *args: Any, **options: Any) -> Connection:
        if cls is Connection and any(url.startswith("zreq") for url in expand_urls(urls)):
            from tensorcom.request_client import RequestConnection

            return super().__new__(RequestConnection)
        return super().__new__(cls)

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        converters: ConverterSpec = None,
        timeout: float | None = 60.0,
        epoch: int | None = None,
        total: int | None = None,
        queue: int = 2,
        on_malformed: str = "raise",
    ) -> None:
        for name, value in (("epoch", epoch), ("total", total)):
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1 batch or None. Found: {value}")
        if timeout is not None and timeout <= 0:
            raise ConfigError(f"timeout must be > 0 seconds or None. Found: {timeout}")
        if on_malformed not in ("raise", "log"):
            raise ConfigError(f"on_malformed must be 'raise' or 'log'. Found: {on_malformed!r}")
        parsed = parse_endpoints(urls, _RECEIVING, "Connection")
        self.timeout = timeout
        self.epoch = epoch
        self.total = total
        self.on_malformed = on_malformed
        self.convert = make_converters(converters)
        self.count = 0
        self.malformed = 0
        self.last = BatchInfo()
        self._context: zmq.Context[Any] = zmq.Context()
        self._endpoints: list[Endpoint] = []
        try:
            for url in parsed:
                self._endpoints.append(open_endpoint(self._context, url, queue=queue))
        except BaseException:
            self.close()
            raise
        self._poller = zmq.Poller()
        for endpoint in self._endpoints:
            self._poller.register(endpoint.socket, zmq.POLLIN)
        self._turn = 0

    @property
    def endpoints(self) -> list[str]:
        """The addresses this connection receives from (bound addresses are read back, so port 0 shows its port)."""
        return [endpoint.address for endpoint in self._endpoints]

    def _next_ready(self) -> Endpoint:
        if self._context.closed:
            raise ConfigError("this Connection is closed")
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            events = dict(self._poller.poll(None if remaining is None else int(remaining * 1000)))
            count = len(self._endpoints)
            for offset in range(count):  # round robin over the ready sockets, so no server starves another
                endpoint = self._endpoints[(self._turn + offset) % count]
                if endpoint.socket in events:
                    self._turn = (self._turn + offset + 1) % count
                    return endpoint
            if deadline is not None and time.monotonic() >= deadline:
                raise Timeout(f"no batch within {self.timeout} s from {', '.join(self.endpoints)}")

    def recv(self) -> list[Any]:
        """Receive the next batch (a list of arrays or converted values); details of it go to ``self.last``."""
        while True:
            endpoint = self._next_ready()
            frames = endpoint.socket.recv_multipart(copy=False)
            if endpoint.url.topic:
                frames = frames[1:]
            try:
                if len(frames) == 1:  # tensorcom 0.1's single-buffer mode: one frame holding a .ten buffer
                    arrays, infos = codec.decode_buffer(frames[0], infos=True)
                else:
                    arrays, infos = codec.decode(frames, infos=True)
            except DecodeError as error:
                message = f"malformed batch from {endpoint}: {error}"
                if self.on_malformed == "raise":
                    raise DecodeError(message) from error
                self.malformed += 1
                log.warning("%s (skipped; %d so far)", message, self.malformed)
                continue
            self.count += 1
            self.last = BatchInfo(endpoint.address, sum(a.nbytes for a in arrays), infos, self.count)
            return self.convert(arrays)

    def __iter__(self) -> Iterator[list[Any]]:
        produced = 0
        while self.epoch is None or produced < self.epoch:
            if self.total is not None and self.count >= self.total:
                return
            yield self.recv()
            produced += 1

    def __len__(self) -> int:
        """The number of batches an iteration yields (``epoch``), for frameworks that ask for a length."""
        if self.epoch is None:
            raise TypeError(
                "this Connection has no length; pass epoch=N (batches per iteration) to give it one"
            )
        return self.epoch

    def close(self) -> None:
        """Close every socket at once (nothing is waiting to be sent from a receiving client)."""
        for endpoint in self._endpoints:
            endpoint.close()
        self._endpoints = []
        if not self._context.closed:
            self._context.term()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        context = getattr(self, "_context", None)
        if context is not None and not context.closed:
            self.close()
