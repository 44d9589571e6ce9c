"""What a ``zrep`` server keeps for each client, and the bounds on it (the front end and each direct worker).

A peer is one client identity on one socket. Everything queued for it is counted: the requests waiting for a
worker (by the bytes of their headers as received: they are kept encoded, so that is what they hold) and the
replies waiting for its socket queue (batches, and the ERRORs and PONGs the server writes itself). The bounds:

- a message is read one frame at a time and at most :data:`MOST_FRAMES` are kept (:func:`receive_bounded`): a
  message of a million empty frames costs what libzmq buffered for it, never a list of a million objects;
- a peer holds at most :data:`PEER_STEPS` steps and :data:`PEER_PENDING_BYTES` of requests; while the server as a
  whole holds more than ``max_clients`` × :data:`RESERVE_BYTES`, a peer may only add requests up to
  :data:`RESERVE_BYTES` of its own, so a client with little pending (a zreq client's window is a few hundred bytes)
  is always taken and requests never hold more than 2 × ``max_clients`` × :data:`RESERVE_BYTES` in all;
- a peer's outbox takes the server's own replies only while it holds fewer than :data:`OUTBOX` replies (beyond
  that the peer does not read: its messages go unanswered) and nothing more is computed for it; a BATCHES message
  counts as the replies (steps) it carries;
- a peer whose outbox makes no progress for ``stall_timeout`` seconds is dropped: its queues are freed and its
  connection shut, so libzmq frees what it queued for it too;
- at most ``max_clients`` peers: a new one beyond them is refused (ERROR ``busy``, covering every step it asked
  for: a zreq client asks another server, or this one again after a wait that doubles from 0.1 s to 2 s; a server
  that says ``unavailable`` is shutting down and is not asked again) and nothing is kept for it. A peer with nothing queued is forgotten, so the count goes down as
  clients leave, and the memory of their queues is given back (:class:`Trimmer` hands it to the kernel).
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, replace
from typing import Any

import zmq

from tensorcom import protocol
from tensorcom._net.transport import receive_small, shut_down
from tensorcom.protocol import AnyMessage, Error, ErrorKind, Hello, Request

__all__ = [
    "DECODED",
    "ENTRY_BYTES",
    "FRAME_BYTES",
    "MOST_FRAMES",
    "OUTBOX",
    "PEER_PENDING_BYTES",
    "PEER_STEPS",
    "RESERVE_BYTES",
    "TRIM_AFTER",
    "Decoder",
    "Key",
    "Peer",
    "PeerTable",
    "Queued",
    "Trimmer",
    "connection_of",
    "cut_connection",
    "receive_bounded",
]

log = logging.getLogger(__name__)

Key = tuple[int, bytes]
"""A peer: the index of the socket it reached, and its routing identity there."""

MOST_FRAMES = 4
"""Frames of one client message that are read and kept: its identity, its header, and room for two more."""
PEER_STEPS = 256
"""Most steps one peer may have waiting for a worker."""
ENTRY_BYTES = 256
"""What one queued request costs beyond its header's bytes (the record, the deque slot, the bytes object)."""
PEER_PENDING_BYTES = 2 << 20
"""Most bytes of requests one peer may have waiting (a header may be 1 MiB: one always fits)."""
RESERVE_BYTES = 32 << 10
"""Bytes of requests every peer may hold however full the server is (the server-wide budget is ``max_clients``
times this)."""
DECODED = 8
"""Decoded requests a :class:`Decoder` keeps (the last ones queued or computed)."""
OUTBOX = 4
"""Replies waiting in a peer's outbox (its socket queue being full) beyond which nothing more is computed for it
and the server's own replies to it are dropped."""

TRIM_AFTER = 8 << 20
"""Bytes freed (queues of clients that left, a huge message read and dropped) after which the process hands free
memory back to the kernel."""
FRAME_BYTES = 64
"""What libzmq holds for each frame of a message until it is read (its message structure)."""
RECEIVE_QUEUE = 2
"""Messages libzmq reads ahead from one client connection before the server takes them (the sockets' RCVHWM).
libzmq holds a message whole before any part of it can be read, with no limit on its frames, so what one
connection can make it hold is (RECEIVE_QUEUE + 1) messages: kept small, as the server reads as fast as they come."""


def receive_bounded(socket: zmq.Socket[Any], most: int = MOST_FRAMES) -> tuple[list[zmq.Frame], int]:
    """Read one whole message from ``socket`` (which has one ready), keeping at most ``most`` frames; return them
    and how many more were read and dropped one at a time (about 0.6 µs a frame; no list of them is built)."""
    return receive_small(socket, most, copy=False)


def connection_of(frame: zmq.Frame) -> tuple[int, int] | None:
    """The file descriptor of the connection a received message came on, with the inode that tells it apart from
    a later connection given the same number (None when libzmq cannot say)."""
    try:
        fd = int(frame.get(zmq.SRCFD))
        return (fd, os.fstat(fd).st_ino) if fd >= 0 else None
    except (zmq.ZMQError, OSError, ValueError, AttributeError):
        return None


def cut_connection(connection: tuple[int, int] | None, address: str = "a client") -> bool:
    """Shut a connection down if it is still the one recorded (libzmq then closes it and frees what it queued
    for it); return whether it was."""
    return connection is not None and shut_down(connection[0], address, connection[1])


@dataclass(slots=True)
class Queued:
    """Requests from one message, kept as received: ``count`` consecutive steps from ``step`` (1 for a HELLO)."""

    header: bytes
    hello: bool
    gen: int
    step: int
    count: int = 1
    attempts: int = 0
    route: bytes | None = None  # a worker's request from its front end: where the reply goes

    @classmethod
    def of(cls, message: Hello | Request, header: bytes) -> Queued:
        """The entry for a checked HELLO or REQUEST whose header frame was ``header``."""
        if isinstance(message, Hello):
            return cls(header, True, message.gen, 0)
        return cls(header, False, message.gen, message.step, message.count)

    @property
    def cost(self) -> int:
        return len(self.header) + ENTRY_BYTES

    def take(self, most: int = 1) -> Queued:
        """The first ``most`` steps as a request of their own (this one keeps the rest)."""
        if self.count <= most:
            return self
        first = Queued(self.header, self.hello, self.gen, self.step, most, self.attempts, self.route)
        self.step += most
        self.count -= most
        return first

    def error(self, kind: ErrorKind, text: str, server: str) -> Error:
        """The ERROR that answers this request's first step (a BUSY one answers all its steps: ``count``)."""
        return Error(
            gen=self.gen,
            step=0 if self.hello else self.step,
            error=kind,
            message=text,
            server=server,
            request="HELLO" if self.hello else "REQUEST",
            count=self.count if kind is ErrorKind.BUSY and not self.hello else None,
        )

    def errors(self, kind: ErrorKind, text: str, server: str) -> list[Error]:
        """One ERROR for each step of this entry."""
        return [
            replace(self.error(kind, text, server), step=step, count=None)
            for step in range(self.step, self.step + self.count)
        ]


class Decoder:
    """The message a queued entry stands for (its steps: ``step`` and ``count``), decoded when it is computed. The
    messages of the last :data:`DECODED` entries queued or computed are kept (a fixed number, whatever the clients
    send), so a request read and computed soon after, or the steps of one REQUEST for several, cost one decoding;
    nothing decoded is kept for the requests that wait beyond them."""

    def __init__(self) -> None:
        self._recent: deque[tuple[bytes, AnyMessage]] = deque(maxlen=DECODED)

    def keep(self, entry: Queued, message: AnyMessage) -> None:
        """``message`` is what ``entry`` (just queued) decodes to."""
        self._recent.append((entry.header, message))

    def message(self, entry: Queued, source: str) -> AnyMessage:
        header = entry.header
        for kept, decoded in self._recent:
            if kept is header:
                message = decoded
                break
        else:
            message = protocol.decode(header, source)
            self._recent.append((header, message))
        if isinstance(message, Request) and (message.step != entry.step or message.count != entry.count):
            message = replace(message, step=entry.step, count=entry.count)
        return message


class Peer:
    """What is kept for one client: its waiting requests and its replies waiting for its socket queue."""

    __slots__ = (
        "connection",
        "dropped",
        "key",
        "outbox",
        "outbox_bytes",
        "outbox_replies",
        "pending",
        "pending_bytes",
        "progress",
        "steps",
        "working",
    )

    def __init__(self, key: Key, connection: tuple[int, int] | None = None) -> None:
        self.key = key
        self.connection = connection
        self.pending: deque[Queued] = deque()
        self.pending_bytes = 0
        self.steps = 0
        self.outbox: deque[tuple[list[Any], int, int]] = deque()  # (parts, bytes, replies)
        self.outbox_bytes = 0
        self.outbox_replies = 0  # steps answered by what the outbox holds (a BATCHES message answers several)
        self.progress = 0.0  # when its outbox last moved (or filled from empty)
        self.working = 0  # requests a worker is computing for it
        self.dropped = False

    @property
    def idle(self) -> bool:
        return not self.pending and not self.outbox and not self.working


class PeerTable:
    """The peers of one server process and their accounting (see the module docstring)."""

    def __init__(self, max_clients: int, stall_timeout: float | None) -> None:
        self.max_clients = max_clients
        self.stall_timeout = stall_timeout
        self.peers: dict[Key, Peer] = {}
        self.waiting: OrderedDict[Key, Peer] = OrderedDict()  # peers with requests queued, in turn
        self.sending: dict[Key, Peer] = {}  # peers with replies in their outbox
        self.pending_bytes = 0
        self.budget = max_clients * RESERVE_BYTES

    def __len__(self) -> int:
        return len(self.peers)

    def find(self, key: Key) -> Peer | None:
        return self.peers.get(key)

    def refusal(self, key: Key, entry: Queued) -> tuple[ErrorKind, str] | None:
        """Why the requests of ``entry`` from ``key`` cannot be queued (None: they can)."""
        peer = self.peers.get(key)
        if peer is None:
            if len(self.peers) >= self.max_clients:
                return (
                    ErrorKind.BUSY,
                    f"the server keeps requests for {self.max_clients} clients already",
                )
            steps = held = 0
        else:
            steps, held = peer.steps, peer.pending_bytes
        if steps + entry.count > PEER_STEPS:
            return ErrorKind.PROTOCOL, f"more than {PEER_STEPS} requests pending from one client"
        cost = entry.cost
        if held + cost > PEER_PENDING_BYTES:
            return (
                ErrorKind.PROTOCOL,
                f"more than {PEER_PENDING_BYTES} bytes of requests pending from one client",
            )
        if self.pending_bytes + cost > self.budget and held + cost > RESERVE_BYTES:
            return ErrorKind.BUSY, f"the server holds {self.pending_bytes} bytes of requests already"
        return None

    def peer(self, key: Key, connection: tuple[int, int] | None = None) -> Peer:
        """The peer of ``key``, made if new (call :meth:`refusal` first)."""
        peer = self.peers.get(key)
        if peer is None:
            peer = self.peers[key] = Peer(key, connection)
        return peer

    def queue(self, peer: Peer, entry: Queued, first: bool = False) -> None:
        """Queue requests for ``peer`` (``first``: ahead of the others, e.g. given back by a worker that died)."""
        if first:
            peer.pending.appendleft(entry)
        else:
            peer.pending.append(entry)
        peer.steps += entry.count
        peer.pending_bytes += entry.cost
        self.pending_bytes += entry.cost
        if peer.key not in self.waiting:
            self.waiting[peer.key] = peer

    def take(self, peer: Peer, most: int = 1) -> Queued:
        """The next step waiting for ``peer`` (or its next request's next ``most`` steps), whose turn then passes to
        the next peer."""
        head = peer.pending[0]
        entry = head.take(most)
        peer.steps -= entry.count
        if entry is head:
            peer.pending.popleft()
            peer.pending_bytes -= head.cost
            self.pending_bytes -= head.cost
        if peer.pending:
            self.waiting.move_to_end(peer.key)
        else:
            del self.waiting[peer.key]
        return entry

    def clear_pending(self, peer: Peer) -> list[Queued]:
        """Remove and return everything ``peer`` has waiting."""
        entries = list(peer.pending)
        self.pending_bytes -= peer.pending_bytes
        peer.pending = deque()
        peer.pending_bytes = peer.steps = 0
        self.waiting.pop(peer.key, None)
        return entries

    def post(
        self, peer: Peer, parts: list[Any], own: bool = False, replies: int = 1, size: int | None = None
    ) -> bool:
        """Put a message answering ``replies`` steps in ``peer``'s outbox (``size``: its bytes, if known); one the
        server writes itself (``own``) only while the outbox holds fewer than :data:`OUTBOX` replies. Return
        whether it was taken."""
        if own and peer.outbox_replies >= OUTBOX:
            return False
        if size is None:
            size = sum(memoryview(part).nbytes for part in parts)
        if not peer.outbox:
            peer.progress = time.monotonic()
        peer.outbox.append((parts, size, replies))
        peer.outbox_bytes += size
        peer.outbox_replies += replies
        self.sending[peer.key] = peer
        return True

    def sent(self, peer: Peer) -> None:
        """The first reply in ``peer``'s outbox has left."""
        _, size, replies = peer.outbox.popleft()
        peer.outbox_bytes -= size
        peer.outbox_replies -= replies
        peer.progress = time.monotonic()
        if not peer.outbox:
            self.sending.pop(peer.key, None)

    def clear_outbox(self, peer: Peer) -> list[list[Any]]:
        """Remove and return every reply waiting in ``peer``'s outbox."""
        replies = [parts for parts, _, _ in peer.outbox]
        peer.outbox = deque()
        peer.outbox_bytes = peer.outbox_replies = 0
        self.sending.pop(peer.key, None)
        return replies

    def stalled(self, now: float) -> list[Peer]:
        """The peers whose outbox has not moved for ``stall_timeout`` seconds."""
        if self.stall_timeout is None:
            return []
        return [peer for peer in self.sending.values() if now - peer.progress > self.stall_timeout]

    def drop(self, peer: Peer) -> list[list[Any]]:
        """Forget ``peer`` (what workers compute for it is discarded when it comes back); return the replies its
        outbox held, for the caller to release."""
        peer.dropped = True
        self.clear_pending(peer)
        replies = self.clear_outbox(peer)
        if self.peers.get(peer.key) is peer:
            del self.peers[peer.key]
        return replies

    def release(self, peer: Peer) -> None:
        """Forget ``peer`` if it has nothing queued (its queues' memory goes back with it)."""
        if peer.idle and self.peers.get(peer.key) is peer:
            del self.peers[peer.key]

    @property
    def outbox_bytes(self) -> int:
        return sum(peer.outbox_bytes for peer in self.sending.values())


class Trimmer:
    """Hand memory back to the kernel once much of it was freed (glibc's ``malloc_trim``, at most once a second).

    The allocator's thresholds (:mod:`tensorcom._net.allocator`) keep up to 64 MiB of freed memory per arena for
    the next batches; what a flood of clients made the server hold is handed back once they leave.
    """

    def __init__(self) -> None:
        self.freed = 0
        self.held = 0
        self._last = 0.0
        self._trim: Any = None
        try:
            self._trim = ctypes.CDLL(None).malloc_trim
            self._trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):  # not glibc
            self._trim = None

    def check(self, held: int, now: float, freed: int = 0) -> bool:
        """Note that the queues hold ``held`` bytes now and ``freed`` more bytes were freed elsewhere; trim if it
        is time. Return whether it trimmed."""
        self.freed += freed + max(0, self.held - held)
        self.held = held
        if self._trim is None or self.freed < TRIM_AFTER or now - self._last < 1.0:
            return False
        self._trim(0)
        self.freed = 0
        self._last = now
        return True
