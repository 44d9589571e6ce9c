"""ZeroMQ glue shared by the client and the server: opening sockets from URLs, sending multipart messages safely.

Every socket gets explicit high-water marks counted in messages (one message is one whole batch), never ZMQ's
default of 1000, and every transport error names its endpoint.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from tensorcom.errors import ConfigError, Timeout, URLError
from tensorcom.urls import ParsedURL, expand_urls, parse_url

__all__ = ["Endpoint", "open_endpoint", "parse_endpoints", "send_frames"]

log = logging.getLogger(__name__)

_SOCKET_TYPES = {
    "PUSH": zmq.PUSH,
    "PULL": zmq.PULL,
    "PUB": zmq.PUB,
    "SUB": zmq.SUB,
    "ROUTER": zmq.ROUTER,
    "DEALER": zmq.DEALER,
}
_POLL_STEP = 0.05


@dataclass
class Endpoint:
    """An open socket with the URL it came from and the address it actually bound or connected to."""

    url: ParsedURL
    socket: zmq.Socket[Any]
    address: str
    monitor: zmq.Socket[Any] | None = None
    peers: int = 0
    disconnects: int = 0

    def __str__(self) -> str:
        return self.address

    def count_peers(self) -> int:
        """Update ``peers`` (connections currently open) from the socket's monitor events, without blocking."""
        if self.monitor is not None:
            while self.monitor.poll(0, zmq.POLLIN):
                event = parse_monitor_message(self.monitor.recv_multipart())["event"]
                if event in (zmq.EVENT_ACCEPTED, zmq.EVENT_CONNECTED):
                    self.peers += 1
                elif event == zmq.EVENT_DISCONNECTED:
                    self.peers = max(0, self.peers - 1)
                    self.disconnects += 1
        return self.peers

    def close(self, linger: float = 0.0) -> None:
        """Close the socket (and its monitor), letting queued messages leave for up to ``linger`` seconds."""
        if self.monitor is not None:
            self.socket.disable_monitor()
            self.monitor.close(linger=0)
            self.monitor = None
        self.socket.close(linger=int(linger * 1000))


def parse_endpoints(urls: str | Sequence[str], allowed: set[str], role: str) -> list[ParsedURL]:
    """Expand and parse ``urls``; every one must have a socket type in ``allowed`` (e.g. {"PULL", "SUB"})."""
    parsed = [parse_url(url) for url in expand_urls(urls)]
    for item in parsed:
        if item.socket_type not in allowed:
            raise URLError(
                f"{item.url!r}: a {role} cannot use a {item.scheme} ({item.socket_type}) socket; "
                f"expected one of {', '.join(sorted(allowed))} socket types"
            )
    return parsed


def open_endpoint(
    context: zmq.Context[Any], url: ParsedURL, *, queue: int, xpub: bool = False, monitor: bool = False
) -> Endpoint:
    """Create, configure and bind or connect a socket for ``url``.

    ``queue`` bounds both directions' high-water marks in whole messages. With ``xpub`` a PUB URL opens an XPUB
    socket with XPUB_NODROP, so a slow subscriber slows the publisher instead of losing batches. With ``monitor``
    the endpoint counts its open connections (see :meth:`Endpoint.count_peers`).
    """
    if queue < 1:
        raise ConfigError(f"queue must be >= 1 (batches). Found: {queue}")
    kind = zmq.XPUB if (xpub and url.socket_type == "PUB") else _SOCKET_TYPES[url.socket_type]
    socket = context.socket(kind)
    socket.setsockopt(zmq.SNDHWM, queue)
    socket.setsockopt(zmq.RCVHWM, queue)
    socket.setsockopt(zmq.LINGER, 0)
    if kind == zmq.XPUB:
        socket.setsockopt(zmq.XPUB_NODROP, 1)
    if url.socket_type == "SUB":
        socket.setsockopt(zmq.SUBSCRIBE, url.topic)
    events = zmq.EVENT_ACCEPTED | zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED
    monitor_socket = socket.get_monitor_socket(events) if monitor else None
    try:
        if url.bind:
            socket.bind(url.address)
            address = socket.getsockopt_string(zmq.LAST_ENDPOINT)
        else:
            socket.connect(url.address)
            address = url.address
    except zmq.ZMQError as error:
        Endpoint(url, socket, url.address, monitor_socket).close()
        verb = "bind" if url.bind else "connect"
        raise URLError(f"cannot {verb} {url.url!r} (zmq address {url.address}): {error}") from error
    log.debug("%s %s socket on %s", "bound" if url.bind else "connected", url.socket_type, address)
    return Endpoint(url, socket, address, monitor_socket)


def send_frames(
    endpoint: Endpoint, frames: Sequence[Any], *, timeout: float | None, what: str = "batch"
) -> None:
    """Send one multipart message without copying large frames.

    Back-pressure (a full high-water mark, no peer yet) can only refuse the first frame; once it is accepted the
    rest of the message is sent frame by frame, each retried on ``zmq.Again`` rather than restarting the message
    from frame 0, which would corrupt the stream. Raises :class:`Timeout` naming the endpoint when the first frame
    cannot be queued within ``timeout`` seconds (None waits forever).
    """
    socket = endpoint.socket
    last = len(frames) - 1
    deadline = None if timeout is None else time.monotonic() + timeout
    for index, frame in enumerate(frames):
        flags = zmq.NOBLOCK | (zmq.SNDMORE if index < last else 0)
        while True:
            try:
                socket.send(frame, flags=flags, copy=False)
                break
            except zmq.Again:
                if index == 0 and deadline is not None and time.monotonic() > deadline:
                    raise Timeout(
                        f"could not send a {what} on {endpoint} within {timeout} s (no peer took it)"
                    ) from None
                if socket.type == zmq.XPUB:
                    time.sleep(0.0002)  # XPUB reports POLLOUT even while XPUB_NODROP refuses: back off briefly
                else:
                    socket.poll(int(_POLL_STEP * 1000), zmq.POLLOUT)
