"""ZeroMQ glue shared by the client and the server: opening sockets from URLs, sending multipart messages safely.

Every socket gets explicit high-water marks counted in messages (one message is one whole batch), never ZMQ's
default of 1000, and a maximum frame size (``zmq.MAXMSGSIZE``: a peer that sends a larger frame is disconnected
before the frame is buffered). Every transport error names its endpoint. Sockets take CURVE keys
(:mod:`tensorcom._net.security`); a monitored socket watches its handshakes, so a client refused by its server finds
out at once, and a server logs the clients it refuses.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket as pysocket
import struct
import termios
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import zmq
from zmq.utils.monitor import parse_monitor_message

from tensorcom import codec
from tensorcom._net.security import (
    HANDSHAKE_EVENTS,
    ClientKeys,
    ServerKeys,
    describe_handshake_failure,
    handshake_error,
    is_loopback,
    refusals,
)
from tensorcom.errors import ConfigError, DecodeError, SecurityError, TensorcomError, Timeout, URLError
from tensorcom.protocol import MAX_HEADER_BYTES
from tensorcom.urls import ParsedURL, expand_urls, parse_url

__all__ = [
    "MAX_BATCH_FRAME",
    "MAX_CONTROL_MESSAGE",
    "ConnectionScan",
    "Endpoint",
    "SendCancelled",
    "open_endpoint",
    "parse_endpoints",
    "receive",
    "receive_small",
    "send_frames",
    "send_parts",
]

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

MAX_CONTROL_MESSAGE = MAX_HEADER_BYTES + 4096
"""Largest frame a socket that receives only protocol headers, control messages or subscriptions accepts."""

MAX_SUBSCRIPTION_SLACK = 2048
"""Bytes an XPUB socket accepts in one message beyond its topic: a subscription longer than the topic cannot match
it, but the limit also applies to the handshake (a CURVE INITIATE is about 300 bytes). A peer that sends a longer
one is disconnected by libzmq before it is buffered."""

XPUB_RECEIVE_BUFFER = 2048
"""Kernel receive buffer (SO_RCVBUF, which Linux doubles) of an XPUB socket's connections: their peers only send a
handshake and a subscription, so little needs to be in flight, and a peer that sends much more cannot have it
queued in the kernel ahead of the checks on what it sent."""

COPY_BELOW = 128 * 1024
"""A received data frame smaller than this is read straight into a buffer of the size its header announces (see
:func:`receive`); larger ones stay zmq.Frame objects."""

SEND_COPY_BELOW = 512 * 1024
"""Frames smaller than this are copied into the message when sent; larger ones are sent in place. Zero-copy sends
pay a release callback through pyzmq's garbage-collection thread per frame (a second Python thread that wants the
GIL), which costs more than copying a frame of up to a few hundred kB: measured ≈ 20 % of a server's time at 64 kB,
and with the 256 kB data frames of grouped 64 kB replies, 12.8-13.8k batches/s sent in place against 14.2-15.9k
copied (zreq over tcp, inline and one worker)."""

MAX_BATCH_FRAME = 1 << 30
"""Largest frame (one array) a socket that receives batches accepts by default: 1 GiB, about 7 times a batch of 256
float32 images of 3×224×224 (154 MB). Clients change it with ``max_message_size=``."""


@dataclass
class Endpoint:
    """An open socket with the URL it came from and the address it actually bound or connected to."""

    url: ParsedURL
    socket: zmq.Socket[Any]
    address: str
    monitor: zmq.Socket[Any] | None = None
    peers: int = 0
    disconnects: int = 0
    curve: str | None = None
    handshake_failures: list[tuple[int, int]] = field(default_factory=list)
    refused: int = 0
    timed_sends: bool = False  # send_frames has set SNDTIMEO
    fds: set[int] = field(default_factory=set)  # file descriptors of the open connections (monitored sockets)

    def __str__(self) -> str:
        return self.address

    def count_peers(self) -> int:
        """Read the socket's monitor events without blocking and return ``peers`` (connections currently open).

        Also follows handshakes. On a bound socket anyone may knock, so failed handshakes are logged (rate-limited)
        and counted in ``refused``; on a connecting socket the peer is the one we chose, so they are kept for
        :meth:`check_handshakes`, which turns them into an error.
        """
        if self.monitor is not None:
            while self.monitor.poll(0, zmq.POLLIN):
                message = parse_monitor_message(self.monitor.recv_multipart())
                event, value = message["event"], message["value"]
                if event in (zmq.EVENT_ACCEPTED, zmq.EVENT_CONNECTED):
                    self.peers += 1
                    self.fds.add(int(value))
                elif event == zmq.EVENT_DISCONNECTED:
                    self.peers = max(0, self.peers - 1)
                    self.disconnects += 1
                    self.fds.discard(int(value))
                elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self.handshake_failures.clear()
                elif event & HANDSHAKE_EVENTS:
                    self._handshake_failed(int(event), int(value))
        return self.peers

    def _handshake_failed(self, event: int, value: int) -> None:
        if not self.url.bind:
            self.handshake_failures.append((event, value))
            return
        self.refused += 1
        if not (event == zmq.EVENT_HANDSHAKE_FAILED_AUTH and self.curve == "server"):  # ZAP logs refused keys
            refusals.note(self.address, describe_handshake_failure(event, value, self.curve is not None))

    def stalled_peers(self, pause: float = 0.25) -> list[int]:
        """The connections whose peer has stopped reading: bytes wait in the kernel's send queue and their number has
        not fallen over ``pause`` seconds (a peer that reads, however slowly, empties it while a send waits)."""
        self.count_peers()
        before = {fd: _unsent(fd) for fd in self.fds}
        time.sleep(pause)
        self.count_peers()
        return [fd for fd in self.fds if before.get(fd, 0) > 0 and _unsent(fd) >= before[fd]]

    def queued(self) -> dict[int, int]:
        """Bytes waiting in each open connection's kernel send queue (by file descriptor): data its peer has not yet
        taken (TCP: not yet acknowledged; ipc: not yet read by the peer process)."""
        self.count_peers()
        return {fd: _unsent(fd) for fd in self.fds}

    def delivered(self, fd: int) -> int | None:
        """Bytes a TCP connection's peer has acknowledged (taken from us) so far; None for other transports."""
        return _tcp_counter(fd, _TCP_INFO_BYTES_ACKED)

    def cut(self, fd: int) -> None:
        """Shut one connection down (libzmq then closes it and drops what was queued for it; a connecting peer may
        come back later and starts afresh)."""
        shut_down(fd, self.address)

    def check_handshakes(self) -> None:
        """Raise :class:`tensorcom.SecurityError` if the handshakes with the peer this socket connects to conclusively
        fail (a refused key, CURVE against plain); on a bound socket, only report refused peers."""
        self.count_peers()
        error: SecurityError | None = handshake_error(
            self.address, self.handshake_failures, self.curve is not None, self.curve == "server"
        )
        if error is not None:
            raise error

    def close(self, linger: float = 0.0) -> None:
        """Close the socket (and its monitor), letting queued messages leave for up to ``linger`` seconds."""
        if self.monitor is not None:
            self.socket.disable_monitor()
            self.monitor.close(linger=0)
            self.monitor = None
        self.socket.close(linger=int(linger * 1000))


class ConnectionScan:
    """The connections accepted on one bound TCP or ipc address, found among this process's file descriptors with
    plain system calls: another thread may use it while the zmq socket's own thread is busy inside libzmq (which
    reads what peers send, and applies their subscriptions, without returning to Python in between).

    :meth:`scan` lists them in the order first seen (newest last); :meth:`received` and :meth:`cut` act on one.
    A descriptor is matched by its local address (the bound port, or the ipc path), so sockets that this process
    connects to the address itself never count."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._port: int | None = None
        self._path: str | None = None
        if address.startswith("tcp://"):
            self._port = int(address.rsplit(":", 1)[1])
        elif address.startswith("ipc://"):
            path = address[len("ipc://") :]
            self._path = "\0" + path[1:] if path.startswith("@") else path
        self._known: dict[tuple[int, str], bool] = {}  # (fd, its socket's inode) -> accepted on our address
        self._order: dict[tuple[int, str], int] = {}
        self._cut: set[tuple[int, str]] = set()
        self._current: dict[int, tuple[int, str]] = {}
        self._seen = 0
        self.new = 0  # connections the last scan found for the first time

    def scan(self, hint: Iterable[int] = (), everything: bool = True) -> list[int]:
        """The file descriptors of the connections open now, oldest first (those cut until libzmq closes them).

        ``everything`` looks at every descriptor of the process (a millisecond or so per 200); otherwise only at
        ``hint`` (e.g. the connections a socket monitor reported) and the connections found before."""
        if self._port is None and self._path is None:
            return []
        if everything:
            try:
                fds: Iterable[int] = [int(name) for name in os.listdir("/proc/self/fd")]
            except OSError:
                return []
        else:
            fds = {*hint, *(fd for (fd, _), accepted in self._known.items() if accepted)}
        found: list[tuple[int, int]] = []
        current: dict[int, tuple[int, str]] = {}
        self.new = 0
        for fd in fds:
            try:
                link = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if not link.startswith("socket:"):
                continue
            key = current[fd] = (fd, link)
            if key not in self._known:
                self._known[key] = self._accepted_here(fd)
                self._order[key] = self._seen
                self._seen += 1
                self.new += self._known[key]
            if self._known[key]:
                found.append((self._order[key], fd))
        examined = set(fds)
        for key in [key for key in self._known if current.get(key[0]) != key]:
            if everything or key[0] in examined:  # closed, or its number now used by another socket
                del self._known[key]
                self._order.pop(key, None)
                self._cut.discard(key)
        if everything:
            self._current = current
        else:
            self._current.update(current)
        return [fd for _, fd in sorted(found)]

    def _accepted_here(self, fd: int) -> bool:
        try:
            with pysocket.socket(fileno=os.dup(fd)) as connection:
                if connection.type != pysocket.SOCK_STREAM:
                    return False
                local = connection.getsockname()
                connection.getpeername()  # a listening socket has no peer
        except OSError:
            return False
        if self._port is not None:
            return isinstance(local, tuple) and len(local) >= 2 and local[1] == self._port
        if isinstance(local, bytes):
            local = local.decode(errors="replace")
        return bool(local) and local == self._path

    def is_cut(self, fd: int) -> bool:
        """Whether :meth:`cut` shut this connection down already (it stays open until libzmq notices)."""
        return fd in self._current and self._current[fd] in self._cut

    def received(self, fd: int) -> int | None:
        """Bytes the connection's peer has sent (TCP), or None (ipc keeps no count)."""
        return _tcp_counter(fd, _TCP_INFO_BYTES_RECEIVED)

    def cut(self, fd: int) -> None:
        """Shut the connection down (libzmq then closes it); see :meth:`Endpoint.cut`."""
        shut_down(fd, self.address)
        if fd in self._current:
            self._cut.add(self._current[fd])


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
    context: zmq.Context[Any],
    url: ParsedURL,
    *,
    queue: int,
    xpub: bool = False,
    monitor: bool = False,
    keys: ServerKeys | ClientKeys | None = None,
    max_message_size: int = MAX_CONTROL_MESSAGE,
    immediate: bool = False,
    connect: bool = True,
) -> Endpoint:
    """Create, configure and bind or connect a socket for ``url`` (with ``connect=False`` a connecting socket is
    left unconnected: its owner connects it later).

    ``queue`` bounds both directions' high-water marks in whole messages. With ``xpub`` a PUB URL opens an XPUB
    socket with XPUB_NODROP, so a slow subscriber slows the publisher instead of losing batches. With ``monitor``
    the endpoint counts its open connections and follows its handshakes (see :meth:`Endpoint.count_peers`).
    ``keys`` make it a CURVE server (:class:`ServerKeys`) or client (:class:`ClientKeys`). With ``immediate``, a
    connecting socket queues messages only to completed connections (handshake done), so a send waits, and
    :func:`send_frames` reports a refused handshake, instead of queueing toward a peer that will never take them.
    Frames larger than ``max_message_size`` bytes make libzmq drop the connection.
    A socket bound to a non-loopback address without keys logs a warning: anyone who reaches it can connect.
    """
    if queue < 1:
        raise ConfigError(f"queue must be >= 1 (batches). Found: {queue}")
    if max_message_size < 1:
        raise ConfigError(f"max_message_size must be >= 1 byte. Found: {max_message_size}")
    kind = zmq.XPUB if (xpub and url.socket_type == "PUB") else _SOCKET_TYPES[url.socket_type]
    socket = context.socket(kind)
    socket.setsockopt(
        zmq.LINGER, 0
    )  # first: a socket closed after a failed option below does not hold term()
    try:
        socket.setsockopt(zmq.SNDHWM, queue)
        socket.setsockopt(zmq.RCVHWM, queue)
        socket.setsockopt(zmq.MAXMSGSIZE, max_message_size)
        if immediate and not url.bind:
            socket.setsockopt(zmq.IMMEDIATE, 1)
        if keys is not None:
            keys.apply(socket)
        if kind == zmq.XPUB:
            socket.setsockopt(zmq.XPUB_NODROP, 1)
            # Subscriptions are applied by the owner (XPUB_MANUAL), and only those that match its topic: libzmq
            # would otherwise keep every distinct subscription a peer sends in a trie, and a long one is disconnected.
            socket.setsockopt(zmq.XPUB_MANUAL, 1)
            socket.setsockopt(zmq.RCVBUF, XPUB_RECEIVE_BUFFER)  # peers only send subscriptions
            socket.setsockopt(
                zmq.MAXMSGSIZE, min(max_message_size, 1 + len(url.topic) + MAX_SUBSCRIPTION_SLACK)
            )
        if url.socket_type == "SUB":
            socket.setsockopt(zmq.SUBSCRIBE, url.topic)
        events = zmq.EVENT_ACCEPTED | zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | HANDSHAKE_EVENTS
        monitor_socket = socket.get_monitor_socket(events) if monitor else None
    except zmq.ZMQError as error:
        socket.close(linger=0)
        raise ConfigError(f"cannot configure a socket for {url.url!r}: {error}") from error
    except BaseException:
        socket.close(linger=0)
        raise
    try:
        if url.bind:
            socket.bind(url.address)
            address = socket.getsockopt_string(zmq.LAST_ENDPOINT)
        else:
            if connect:
                socket.connect(url.address)
            address = url.address
    except zmq.ZMQError as error:
        Endpoint(url, socket, url.address, monitor_socket).close()
        verb = "bind" if url.bind else "connect"
        raise URLError(f"cannot {verb} {url.url!r} (zmq address {url.address}): {error}") from error
    log.debug("%s %s socket on %s", "bound" if url.bind else "connected", url.socket_type, address)
    if url.bind and keys is None and not is_loopback(address):
        log.warning(
            "%s listens on %s without CURVE keys: anyone who can reach this address can connect and read or "
            "send batches (see `tensorcom keygen` and RELIABILITY.md)",
            url.url,
            address,
        )
    curve = None if keys is None else "server" if isinstance(keys, ServerKeys) else "client"
    return Endpoint(url, socket, address, monitor_socket, curve=curve)


def _copies(frame: Any) -> bool:
    return memoryview(frame).nbytes < SEND_COPY_BELOW


_SNDMORE = int(zmq.SNDMORE)  # plain ints: combining zmq's enum flags costs microseconds per frame
_NOBLOCK = int(zmq.NOBLOCK)
_RCVMORE = int(zmq.RCVMORE)


def send_parts(socket: zmq.Socket[Any], frames: Sequence[Any], flags: int = 0) -> None:
    """Send a multipart message, copying small frames and sending large ones in place (see :data:`SEND_COPY_BELOW`).
    With ``zmq.NOBLOCK``, only the first frame can be refused; a ROUTER or DEALER then takes the whole message."""
    last = len(frames) - 1
    flags = int(flags)
    for index, frame in enumerate(frames):
        socket.send(frame, flags=flags | _SNDMORE if index < last else flags, copy=_copies(frame))


class SendCancelled(TensorcomError):
    """A send waiting for room gave up because its ``waiting`` callback said so (a server asked to stop)."""


def send_frames(
    endpoint: Endpoint,
    frames: Sequence[Any],
    *,
    timeout: float | None,
    what: str = "batch",
    waiting: Callable[[], bool] | None = None,
) -> None:
    """Send one multipart message without copying large frames.

    Back-pressure (a full high-water mark, no peer yet) can only refuse the first frame: the send waits for room in
    steps of ``_POLL_STEP`` seconds (a blocking send with a send timeout, which sleeps in libzmq), checking the
    peer's handshake between steps. Once the first frame is accepted the rest of the message is sent frame by
    frame, each retried on ``zmq.Again`` rather than restarting the message from frame 0, which would corrupt the
    stream. Raises :class:`Timeout` naming the endpoint when the first frame cannot be queued within ``timeout``
    seconds (None waits forever). While it waits for that, ``waiting()`` is called every step; when it returns
    True the send gives up with :class:`SendCancelled`.
    """
    socket = endpoint.socket
    last = len(frames) - 1
    xpub = socket.type == zmq.XPUB  # XPUB_NODROP refuses at once however a send waits: poll and back off
    if not xpub and not endpoint.timed_sends:
        socket.setsockopt(zmq.SNDTIMEO, int(_POLL_STEP * 1000))
        endpoint.timed_sends = True
    deadline = None if timeout is None else time.monotonic() + timeout
    for index, frame in enumerate(frames):
        flags = _SNDMORE if index < last else 0
        if index or xpub:
            flags |= _NOBLOCK
        while True:
            try:
                socket.send(frame, flags=flags, copy=_copies(frame))
                break
            except zmq.Again:
                if index == 0 and deadline is not None and time.monotonic() > deadline:
                    raise Timeout(
                        f"could not send a {what} on {endpoint} within {timeout} s (no peer took it)"
                    ) from None
                if index == 0 and waiting is not None and waiting():
                    raise SendCancelled(
                        f"gave up sending a {what} on {endpoint}: the server is stopping"
                    ) from None
                if index == 0 and endpoint.monitor is not None:
                    endpoint.check_handshakes()  # a refused peer is an error, not a silent wait
                if xpub:
                    time.sleep(0.0002)
                elif index:
                    socket.poll(int(_POLL_STEP * 1000), zmq.POLLOUT)


def shut_down(fd: int, address: str, inode: int | None = None) -> bool:
    """Shut connection ``fd`` down (libzmq then closes it and frees what it queued for it); with ``inode``, only if
    the descriptor is still that connection and not a later one given the same number. Return whether it was."""
    try:
        if inode is not None and os.fstat(fd).st_ino != inode:
            return False
        with pysocket.socket(fileno=os.dup(fd)) as connection:
            connection.shutdown(pysocket.SHUT_RDWR)
    except OSError as error:  # closed meanwhile
        log.debug("could not shut down connection %d of %s: %s", fd, address, error)
        return False
    return True


def _unsent(fd: int) -> int:
    """Bytes in a connection's kernel send queue that its peer has not yet read (0 if it cannot be told)."""
    try:
        return int(struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0])
    except OSError:
        return 0


# offsets of tcpi_bytes_acked and tcpi_bytes_received (u64) in Linux's struct tcp_info
_TCP_INFO_BYTES_ACKED = 120
_TCP_INFO_BYTES_RECEIVED = 128


def _tcp_counter(fd: int, offset: int) -> int | None:
    """A u64 counter of a TCP connection's ``tcp_info`` (None for other sockets, or if it cannot be told)."""
    try:
        with pysocket.socket(fileno=os.dup(fd)) as connection:
            if connection.family not in (pysocket.AF_INET, pysocket.AF_INET6):
                return None
            info = connection.getsockopt(pysocket.IPPROTO_TCP, pysocket.TCP_INFO, 192)
    except OSError:
        return None
    if len(info) < offset + 8:
        return None
    return int(struct.unpack_from("Q", info, offset)[0])


@overload
def receive_small(
    socket: zmq.Socket[Any], most: int, flags: int = 0, *, copy: Literal[True] = True
) -> tuple[list[bytes], int]: ...


@overload
def receive_small(
    socket: zmq.Socket[Any], most: int, flags: int = 0, *, copy: Literal[False]
) -> tuple[list[zmq.Frame], int]: ...


def receive_small(
    socket: zmq.Socket[Any], most: int, flags: int = 0, *, copy: bool = True
) -> tuple[list[Any], int]:
    """Receive one multipart message of at most ``most`` frames (control messages, requests): ``(frames, extra)``
    where ``extra`` counts the frames beyond ``most``, read one at a time and dropped (each freed at once), so a
    message of a million empty frames costs its own bytes and never a list of a million objects. The caller refuses
    it when ``extra``. ``copy=False`` gives :class:`zmq.Frame` objects (whose connection can be asked for)."""
    frames = [socket.recv(flags, copy=copy)]
    while len(frames) < most and socket.get(_RCVMORE):
        frames.append(socket.recv(flags, copy=copy))
    return frames, _drain(socket, flags)


def _drain(socket: zmq.Socket[Any], flags: int) -> int:
    """Read and drop the rest of a multipart message; return how many frames that was."""
    count = 0
    while socket.get(_RCVMORE):
        socket.recv(flags, copy=False)
        count += 1
    return count


class _OversizedFrame:
    """Stands in for a data frame that was longer than its header announced (its bytes were not kept): decoding the
    message raises :class:`DecodeError` saying so."""

    def __init__(self, index: int, size: int, announced: int) -> None:
        self.reason = f"frame {index} holds {size} bytes; its header announces {announced}"

    @property
    def buffer(self) -> Any:
        raise DecodeError(self.reason)


MAX_FRAMES = 2 * 4096 + 2
"""Most frames one received message may have: 4,096 arrays (a header and a data frame each) and two more (a lead
frame, stream metadata). A longer message is read to its end, dropped, and reported as a DecodeError."""

PREALLOCATE = 8 << 20
"""Most bytes one message may have allocated ahead of their arrival (small data frames received straight into a
buffer of the size their header announces); past it, frames are received as they come, so a peer whose headers
announce more than it sends cannot make this process allocate for it."""


def receive(socket: zmq.Socket[Any], copy: bool, flags: int = 0, lead: int = 0) -> list[Any]:
    """Receive one multipart message: ``lead`` leading frames (a topic, a protocol header), then a batch's frames.

    Header frames come as bytes. A data frame under :data:`COPY_BELOW` bytes is received straight into a bytearray
    of the size its header announces (one copy, no zmq.Frame object, the cheapest way for small batches); larger
    ones come as zmq.Frame objects (no copy), or with ``copy`` as bytearrays. Arrays decoded from any of them are
    writable. ``copy`` is for sockets whose batches arrive in shared memory: what still travels on them is small,
    and a zmq.Frame's deallocation checks for signals, so it could swallow a Ctrl-C arriving just then.
    """
    frames: list[Any] = []
    announced: int | None = None
    allocated = 0
    flags = int(flags)  # an enum flag costs an enum construction per call
    while True:
        position = len(frames)
        if position >= MAX_FRAMES:
            dropped = _drain(socket, flags) + position
            raise DecodeError(f"a message of {dropped} frames (at most {MAX_FRAMES}): dropped")
        if position < lead or (position - lead) % 2 == 0:  # a leading frame or a header
            frame: Any = socket.recv(flags, copy=True)
            announced = codec.data_size(frame) if position >= lead else None
        elif announced is not None and announced < COPY_BELOW and allocated + announced <= PREALLOCATE:
            allocated += announced
            frame = bytearray(announced)
            size = socket.recv_into(frame, flags=flags)
            if size != announced:
                frame = (
                    _OversizedFrame(position, size, announced)
                    if size > announced
                    else memoryview(frame)[:size]
                )
        elif copy:
            frame = bytearray(socket.recv(flags, copy=True))
        else:
            frame = socket.recv(flags, copy=False)
        frames.append(frame)
        if not socket.get(_RCVMORE):
            break
    if len(frames) == lead + 1 and isinstance(frames[-1], bytes):
        # one frame holding a whole .ten buffer (tensorcom 0.1's single mode)
        frames[-1] = bytearray(frames[-1])
    return frames
