"""The stream server: encodes batches and sends them over push/pub sockets without copying them.

Stream mode (``zpush``, ``zpub``, ``zrpush``, ``zrpub``) sends every batch of a source as fast as the clients take
them. Send queues are bounded in whole batches (``queue``), so a slow client slows the server instead of growing its
memory. A PUB URL opens an XPUB socket with XPUB_NODROP unless ``drop=True``: subscribers are slowed down rather than
silently losing batches, and the server waits for its first subscriber before sending. When the source is exhausted,
:meth:`StreamServer.run` returns only after the queued batches have left and the clients have disconnected (bounded by
``linger`` seconds).

Batches must not be modified after they are handed to the server: their memory is sent in place.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import zmq

from tensorcom import codec
from tensorcom._net import allocator
from tensorcom._net import shm as _shm
from tensorcom._net.ratelog import RateLimitedLog
from tensorcom._net.security import Authenticator, KeyPath, server_keys_from
from tensorcom._net.transport import (
    ConnectionScan,
    Endpoint,
    SendCancelled,
    open_endpoint,
    parse_endpoints,
    receive_small,
    send_frames,
)
from tensorcom.errors import ConfigError, ProtocolError, StateError, TensorcomError, Timeout
from tensorcom.protocol import Error, ErrorKind, Seek, Sought, decode, flatten_batch, stream_meta_frame
from tensorcom.server._base import Server
from tensorcom.urls import ParsedURL

__all__ = ["StreamServer", "serve"]

log = logging.getLogger(__name__)

_SENDING = {"PUSH", "PUB"}
_PEER_CHECK = 0.05  # seconds between looks at the sockets' connection events while sending
_CONTROL_PER_LOOK = 16  # control messages answered per look, at most
_SUBSCRIPTIONS_PER_LOOK = 256  # subscription messages read per look, at most
_SUBSCRIBER_BYTES = 2048  # most a subscriber may send besides its topic (handshake + subscription: < 1 kB)
_GUARD_LOOK = 0.02  # seconds between the subscriber guard's looks at a zpub socket's connections
_GUARD_SCAN = 0.2  # seconds between its looks at all of the process's file descriptors for new connections...
_GUARD_ALERT = 5.0  # ...but at each look for this long after a new connection or a cut
_guarded = RateLimitedLog(logging.getLogger(__name__), logging.WARNING, 60.0)
_stalled = RateLimitedLog(logging.getLogger(__name__), logging.WARNING, 60.0)
_PICK_STEP = 0.1  # seconds between looks at handshakes, the timeout and stop() while no socket has room
_HOLD_SHARE = 0.5  # share of wall time one subscriber may hold a zpub stream while another subscriber waits
_HOLD_LOOK = 0.02  # seconds between looks at the subscribers' send queues while a send on a zpub socket waits
_RECEIVER_BYTES = 4096  # a TCP peer that took more than this receives the stream (a handshake: ~100 B)
_held = RateLimitedLog(logging.getLogger(__name__), logging.WARNING, 60.0)


class _SubscriberGuard(threading.Thread):
    """Watches the connections of zpub sockets from a thread of its own, with plain system calls (see
    :class:`ConnectionScan`), and shuts down those that sent more than ``limit`` bytes (TCP) and the newest beyond
    ``most`` per socket. libzmq applies every subscription a peer sends to a trie of its own (XPUB_MANUAL included)
    inside whatever call the server's thread makes on the socket, which can last as long as peers keep sending, so
    a look from that thread between sends comes too late; this one does not wait for it.

    Every ``_GUARD_LOOK`` seconds it reads the byte counts of the connections it knows and of those the sending
    thread's monitor reported; every ``_GUARD_SCAN`` seconds, and at every look for ``_GUARD_ALERT`` seconds after a
    new connection or a cut, it looks through all of the process's file descriptors for new ones (about 1 ms per
    200 descriptors)."""

    def __init__(self, endpoints: Sequence[Endpoint], most: int) -> None:
        super().__init__(name="zpub-subscriber-guard", daemon=True)
        self.most = most
        self.refused = 0  # connections cut: over the cap, or sending too much
        self._scans = [(e, ConnectionScan(e.address), _subscriber_bytes(e)) for e in endpoints]
        self._stop_event = threading.Event()

    def run(self) -> None:
        scanned = alerted = 0.0
        while not self._stop_event.wait(_GUARD_LOOK):
            now = time.monotonic()
            everything = now - scanned >= _GUARD_SCAN or now - alerted < _GUARD_ALERT
            if everything:
                scanned = now
            for endpoint, scan, limit in self._scans:
                try:
                    # between full scans, the connections the sending thread's monitor reported (unless libzmq
                    # holds that thread) and those found before
                    if self._look(scan, limit, endpoint.fds.copy(), everything):
                        alerted = now
                except Exception:  # never let the guard die quietly: say why, and keep guarding
                    log.exception("subscriber guard of %s failed a look", scan.address)

    def _look(self, scan: ConnectionScan, limit: int, hint: set[int], everything: bool) -> bool:
        """Cut what sent too much, then the newest beyond the cap: connections cut but not yet closed by libzmq
        still count, since libzmq still holds what they sent. True if there was a new connection or a cut."""
        connections = scan.scan(hint, everything)
        new = scan.new
        chatty = [fd for fd in connections if not scan.is_cut(fd) and (scan.received(fd) or 0) > limit]
        for fd in chatty:
            scan.cut(fd)
        over = [fd for fd in connections[self.most :] if not scan.is_cut(fd)]
        for fd in over:
            scan.cut(fd)
        self.refused += len(chatty) + len(over)
        if chatty:
            _guarded.note(
                (scan.address, "bytes"),
                "cut %d peer(s) of %s that sent more than %d bytes: a subscriber sends a handshake and its topic, "
                "the rest was subscriptions to topics it does not publish",
                len(chatty),
                scan.address,
                limit,
            )
        if over:
            _guarded.note(
                (scan.address, "count"),
                "refused %d connection(s) to %s: it has %d subscribers, the most it takes (max_subscribers)",
                len(over),
                scan.address,
                self.most,
            )
        return bool(new or chatty or over)

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=5.0)


def _subscriber_bytes(endpoint: Endpoint) -> int:
    """The most a subscriber of ``endpoint`` may send before it is cut: a handshake and a few (un)subscriptions."""
    return _SUBSCRIBER_BYTES + 4 * len(endpoint.url.topic)


class _HoldAccount:
    """Per connection of one XPUB socket: how long it has held the stream while another subscriber waited for it,
    as a leaky bucket (see :class:`StreamServer`'s ``stall_timeout``).

    While a send waits, every ``_HOLD_LOOK`` seconds the connections' kernel send queues are read: those with bytes
    queued hold the stream (XPUB_NODROP refuses a send while any subscriber's queue is full, and a full queue
    means bytes stuck in the kernel), those with none have taken everything and wait. When at least one subscriber
    waits, every holder is charged the time since the last look. Each account drains at ``share`` of wall time, and
    a connection whose account passes ``budget`` seconds is cut. A subscriber slower than the server but alone (or
    beside others as slow) is never charged: nobody waits for it in particular.

    A waiting connection counts only if it receives the stream: over TCP, once it has taken more than
    ``_RECEIVER_BYTES`` (an idle or unsubscribed peer never does, so it cannot make another subscriber be cut). ipc
    has no byte counters: there every connection counts, so a slow subscriber beside an idle local connection (one
    subscribed to another topic) is charged as if that connection waited; ipc is local and guarded by the file
    permissions of its path.
    """

    def __init__(self, budget: float, share: float = _HOLD_SHARE) -> None:
        self.budget = budget
        self.share = share
        self.looked = 0.0  # time of the last look during the current wait
        self._accounts: dict[int, list[float]] = {}  # fd -> [seconds held, time of last update]
        self._receivers: set[int] = set()

    def start(self) -> None:
        """A new wait begins: time before it is never charged."""
        self.looked = time.monotonic()

    def look(self, endpoint: Endpoint) -> list[int]:
        """Charge the connections that held the last ``_HOLD_LOOK`` seconds of a wait; return those over budget."""
        now = time.monotonic()
        elapsed, self.looked = now - self.looked, now
        queued = endpoint.queued()
        for fd in [fd for fd in self._accounts if fd not in queued]:  # gone (a new connection may reuse it)
            del self._accounts[fd]
            self._receivers.discard(fd)
        holders = [fd for fd, size in queued.items() if size > 0]
        self._receivers.update(holders)
        waiting = bool(holders) and self._someone_waits(endpoint, [fd for fd in queued if fd not in holders])
        over = []
        for fd, size in queued.items():
            account = self._accounts.setdefault(fd, [0.0, now])
            account[0] = max(0.0, account[0] - self.share * (now - account[1]))
            account[1] = now
            if waiting and size > 0:
                account[0] += elapsed
                if account[0] >= self.budget:
                    over.append(fd)
        for fd in over:
            del self._accounts[fd]
            self._receivers.discard(fd)
        return over

    def _someone_waits(self, endpoint: Endpoint, idle: list[int]) -> bool:
        """Whether one of the connections with nothing queued receives the stream (so it waits for the others)."""
        if any(fd in self._receivers for fd in idle):
            return True
        for fd in idle:
            delivered = endpoint.delivered(fd)
            if delivered is None or delivered > _RECEIVER_BYTES:  # None: ipc, where every peer counts
                self._receivers.add(fd)
                return True
        return False


def _as_arrays(batch: Any) -> Sequence[Any]:
    if isinstance(batch, (list, tuple)):
        return batch
    if isinstance(batch, dict):
        raise ConfigError(
            "stream mode sends lists or tuples of arrays; convert dict batches to a tuple first"
        )
    return [batch]


class StreamServer(Server, sockets=("PUSH", "PUB")):
    """Send batches to clients over one or more stream URLs: what ``Server(source, "zpub://...")`` returns.

    Args:
        source: an iterable of batches (lists or tuples of arrays) for :meth:`run`, or None to call :meth:`send`.
        urls: one URL, a whitespace-separated string, or a list; braces expand. Each URL gets its own socket and
            the batches are dealt to them in turn (batch i to URL i mod n): several URLs are several publishers, each
            a distinct share of the stream, and a client of all of them (the same brace URL) receives every batch
            once. A PUSH socket hands a batch to one of its clients, a PUB socket to all of them.
        queue: batches each socket may queue per peer before :meth:`send` blocks (the send high-water mark).
        linger: seconds :meth:`close` waits for queued batches to leave before dropping them.
        send_timeout: seconds to wait for a client to take a batch before raising :class:`tensorcom.Timeout`
            (None: wait for clients forever, logging every ``report_interval``).
        drop: for PUB URLs, use plain PUB semantics (drop batches for slow or absent subscribers).
        stall_timeout: for PUB URLs without ``drop``: XPUB_NODROP holds every subscriber to the slowest one's
            pace, so a subscriber's connection is cut (one log line) when it holds the others too long. Each
            connection has a leaky bucket: while a send waits, a subscriber whose kernel send queue holds bytes is
            charged the waiting time whenever another subscriber has taken everything and waits; the bucket drains
            at half of wall time, and the connection is cut once it holds ``stall_timeout / 2`` seconds. So a
            subscriber that holds the stream all the time while others wait is cut after about ``stall_timeout``,
            one that holds it 75 % of the time after about 2 ``stall_timeout``, and one that holds it at most half
            the time never (the others keep at least half the server's pace). A subscriber slower than the server
            but alone, or beside others as slow, is never charged. Over TCP only peers that have received the
            stream count as waiting; ipc has no byte counters, so there every local connection counts. Besides,
            a send that waits a whole ``stall_timeout`` cuts the connections whose peer reads nothing at all.
            None: wait for every subscriber, whatever it takes.
        max_subscribers: for bound PUB URLs: the most connections one socket keeps; a thread of the server shuts the
            newest ones beyond it down (one log line, rate-limited; :attr:`refused_subscribers` counts them). The
            same thread cuts a TCP connection once its peer has sent more than 2 kB plus 4 times the topic (a
            subscriber sends a handshake and its topic: about 100 bytes, 600 with CURVE). This bounds libzmq's own
            memory: it keeps every subscription a peer sends in a trie (XPUB_MANUAL included) until the peer leaves,
            about 15 bytes per byte of distinct 255-byte subscriptions (60,000 of them on short-lived connections
            held 215 MB and stalled the stream for 20 s), and up to one 56-byte node per byte in the worst case. A
            connection's kernel receive buffer is small (:data:`~tensorcom._net.transport.XPUB_RECEIVE_BUFFER`, 4 kB
            once Linux doubles it), so the subscriptions libzmq holds stay under about ``max_subscribers`` × (2 kB
            + 4 × topic + 4 kB) bytes (1.6 MB at the default 256 and a short topic: 24 MB of trie, 90 MB at
            worst), plus what arrives in the 20 ms between two looks of the thread. Over ipc there are no byte
            counters: only the connection cap holds there, and a local peer may send any number of distinct
            subscriptions on its connections, each at most the topic plus 2 kB; ipc is local and guarded by the
            permissions of its path.
        infos: per-array labels (up to 8 ASCII characters) written into the .ten headers.
        report_interval: seconds between rate reports through ``logging``.
        control: a ``zrep://`` URL where clients send SEEK messages (pipeline sources only): the server then
            continues from the client's state. See :meth:`tensorcom.Connection.seek`.
        metadata: send each batch's step, epoch, indices and pipeline state in a trailing metadata frame (default:
            on for pipeline sources). Clients of tensorcom 0.1 ignore that frame and receive just their arrays.
        seed, rank, world_size: passed to ``source`` when it is a pipeline factory rather than an iterable.
        server_key, client_keys: CURVE: this server's ``.key_secret`` file and the folder of allowed client
            ``NAME.key`` files (default: $TENSORCOM_SERVER_KEY and $TENSORCOM_CLIENT_KEYS; neither: plain). Every
            socket, the control socket included, then encrypts and accepts only those clients.
        shm: send large batches through shared memory on ``zpush+ipc``/``zrpush+ipc`` URLs, with only a small
            descriptor on a channel socket beside the URL's (``PATH.shm``) that only our clients read, so clients
            of tensorcom 0.1 on ``PATH`` still get plain batches (:mod:`tensorcom._net.shm`). None (the default): on
            for those URLs unless $TENSORCOM_SHM is 0; False: off.
    """

    def __init__(
        self,
        source: Iterable[Any] | Callable[..., Any] | None = None,
        urls: str | Sequence[str] = "zpub://127.0.0.1:7880",
        *,
        queue: int = 2,
        linger: float = 30.0,
        send_timeout: float | None = None,
        drop: bool = False,
        infos: Sequence[str] | None = None,
        report_interval: float = 10.0,
        control: str | None = None,
        metadata: bool | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        server_key: KeyPath | None = None,
        client_keys: KeyPath | None = None,
        shm: bool | None = None,
        stall_timeout: float | None = 10.0,
        max_subscribers: int = 256,
    ) -> None:
        if linger < 0:
            raise ConfigError(f"linger must be >= 0 seconds. Found: {linger}")
        if max_subscribers < 1:
            raise ConfigError(f"max_subscribers must be >= 1. Found: {max_subscribers}")
        self._guard: _SubscriberGuard | None = None
        if stall_timeout is not None and stall_timeout <= 0:
            raise ConfigError(f"stall_timeout must be > 0 seconds or None. Found: {stall_timeout}")
        self.stall_timeout = stall_timeout
        self.cut_subscribers = 0  # subscribers cut for not reading (stall_timeout)
        if send_timeout is not None and send_timeout <= 0:
            raise ConfigError(f"send_timeout must be > 0 seconds or None. Found: {send_timeout}")
        super().__init__(report_interval)
        parsed = parse_endpoints(urls, _SENDING, "stream Server")
        keys = server_keys_from(server_key, client_keys)
        if callable(source) and not hasattr(source, "__iter__"):
            source = source(seed=seed, rank=rank, world_size=world_size)  # a pipeline factory
        self.pipeline: Any = source if hasattr(source, "next_with_meta") else None
        if control is not None and self.pipeline is None:
            raise ConfigError("control= needs a tensorcom pipeline (or a factory of one) as the source")
        self.metadata = self.pipeline is not None if metadata is None else metadata
        if self.metadata and self.pipeline is None:
            raise ConfigError("metadata=True needs a tensorcom pipeline (or a factory of one) as the source")
        self.seed = seed
        self.generation = 0
        self.source: Any = source
        self.linger = linger
        self.send_timeout = send_timeout
        self.infos = list(infos) if infos is not None else None
        allocator.tune()  # small batches: no heap shrink-and-regrow per batch
        self._context: zmq.Context[Any] = zmq.Context()
        self._endpoints: list[Endpoint] = []
        self._authenticator: Authenticator | None = None
        self._control: Endpoint | None = None
        self._linger_ends: float | None = None
        self._companions: list[Endpoint] = []
        # by id(endpoint) of an ipc PUSH URL: its shm channel's socket (None when this server connects), address, arena
        self._channels: dict[int, tuple[Endpoint | None, str, _shm.Arena]] = {}
        self._connected: dict[
            int, bool
        ] = {}  # by id(endpoint) of a connecting one: True once on the shm channel
        try:
            if keys is not None:  # before binding: no client may connect before the allow-list is in force
                where = ", ".join([url.url for url in parsed] + ([control] if control else []))
                self._authenticator = Authenticator(self._context, keys, where)
            use_shm = shm is not False and _shm.enabled()
            for url in parsed:
                channel = _shm.channel_url(url) if use_shm and url.socket_type == "PUSH" else None
                companion = None
                if (
                    channel is not None and url.bind
                ):  # first: a client that finds PATH listening finds PATH.shm
                    companion = open_endpoint(
                        self._context, channel, queue=queue, monitor=True, keys=keys, immediate=True
                    )
                    self._companions.append(companion)
                endpoint = open_endpoint(
                    self._context,
                    url,
                    queue=queue,
                    xpub=not drop,
                    monitor=True,
                    keys=keys,
                    immediate=True,
                    connect=channel is None,
                )
                self._endpoints.append(endpoint)
                if channel is not None:
                    self._channels[id(endpoint)] = (companion, channel.address, _shm.Arena(expire=None))
            if control is not None:
                self._control = open_endpoint(
                    self._context,
                    parse_endpoints(control, {"ROUTER"}, "control")[0],
                    queue=8,
                    monitor=True,
                    keys=keys,
                )
        except BaseException:
            self.close()
            raise
        if self._authenticator is not None:
            self._authenticator.where = ", ".join(
                [e.address for e in self._endpoints] + ([self._control.address] if self._control else [])
            )
        self._subscribed = {id(e): e.socket.type != zmq.XPUB for e in self._endpoints}
        hold_budget = (stall_timeout or 0.0) * (1.0 - _HOLD_SHARE)  # always holding: cut after stall_timeout
        self._holds = {id(e): _HoldAccount(hold_budget) for e in self._endpoints if e.socket.type == zmq.XPUB}
        published = [e for e in self._endpoints if e.socket.type == zmq.XPUB and e.url.bind]
        if published:
            self._guard = _SubscriberGuard(published, max_subscribers)
            self._guard.start()
        self._peers_checked = 0.0
        self._turn = 0  # the socket that gets the next batch
        self._plain_next = False  # alternation between an ipc URL's plain socket and its shm channel

    def _addresses(self) -> list[tuple[ParsedURL, str]]:
        return [(endpoint.url, endpoint.address) for endpoint in self._endpoints]

    def _await_subscriber(self, endpoint: Endpoint) -> None:
        """Block until an XPUB socket has a subscriber for its topic, so the first batches reach someone."""
        started = reported = time.monotonic()
        while not self._drain_subscriptions(endpoint):
            now = time.monotonic()
            if self.send_timeout is not None and now - started >= self.send_timeout:
                raise Timeout(f"no subscriber on {endpoint} within {self.send_timeout} s")
            if self._stop_requested:
                raise SendCancelled(f"stopped while waiting for a subscriber on {endpoint}")
            if now - reported >= self.report_interval:
                log.info("waiting for a subscriber on %s (%.0f s so far)", endpoint, now - started)
                reported = now
            endpoint.socket.poll(250, zmq.POLLIN)
        self._subscribed[id(endpoint)] = True

    def _drain_subscriptions(self, endpoint: Endpoint) -> bool:
        """Read pending (un)subscription messages (a bounded number per call, so a flood cannot hold the sender
        here) and apply those that match this endpoint's topic (the socket is XPUB_MANUAL); True if one subscribes
        to the topic. Peers that send more than a subscriber does are cut by the subscriber guard's thread."""
        matched = False
        socket = endpoint.socket
        for _ in range(_SUBSCRIPTIONS_PER_LOOK):
            if not socket.poll(0, zmq.POLLIN):
                break
            message = socket.recv(copy=True)
            if message[:1] in (b"\x00", b"\x01") and endpoint.url.topic.startswith(message[1:]):
                subscribe = message[:1] == b"\x01"
                # applies to the pipe the message came from
                socket.setsockopt(zmq.SUBSCRIBE if subscribe else zmq.UNSUBSCRIBE, message[1:])
                matched = matched or subscribe
        return matched

    @property
    def control_endpoint(self) -> str | None:
        """The address of the control socket (where clients send SEEK), if there is one."""
        return self._control.address if self._control is not None else None

    def send(self, batch: Any, meta: dict[str, Any] | None = None) -> None:
        """Encode one batch and queue it on every socket (blocking while the queues are full).

        With ``meta`` (pipeline mode), the batch's structure and metadata travel in a trailing metadata array.
        """
        if meta is None:
            arrays = _as_arrays(batch)
            trailer: list[bytes] = []
        else:
            arrays, shape = flatten_batch(batch)
            trailer = [stream_meta_frame({**meta, **shape})]
        frames = codec.encode(arrays, self.infos)
        now = time.monotonic()
        check_peers = now - self._peers_checked >= _PEER_CHECK
        if check_peers:
            self._peers_checked = now
        if check_peers:
            for endpoint in [*self._endpoints, *self._companions]:
                endpoint.count_peers()  # logs the clients refused lately
        endpoint = self._endpoints[self._turn]  # each batch goes to one URL, in turn: distinct shards
        if not self._subscribed[id(endpoint)]:
            self._await_subscriber(endpoint)
        elif endpoint.socket.type == zmq.XPUB:
            self._drain_subscriptions(endpoint)
        message = [endpoint.url.topic, *frames, *trailer] if endpoint.url.topic else [*frames, *trailer]
        channel = self._channels.get(id(endpoint))
        if channel is not None:
            companion, address, arena = channel
            if companion is not None:
                endpoint = self._pick(endpoint, companion)
                shared = endpoint is companion
            else:
                if id(endpoint) not in self._connected:
                    self._connected[id(endpoint)] = self._connect(endpoint, address)
                shared = self._connected[id(endpoint)]
            descriptor = arena.put(frames) if shared else None
            if descriptor is not None:
                message = [descriptor, *trailer]
        if endpoint.socket.type == zmq.XPUB and self.stall_timeout is not None:
            self._publish(endpoint, message)
        else:
            send_frames(endpoint, message, timeout=self.send_timeout, waiting=self._waiting)
        self._turn = (self._turn + 1) % len(self._endpoints)
        self.served += 1
        self.nbytes += sum(getattr(a, "nbytes", 0) for a in arrays)
        self._maybe_report()

    def _connect(self, endpoint: Endpoint, channel: str) -> bool:
        """Connect the socket of a ``zpush+ipc`` URL once its client listens: to the client's shm channel if it has
        one (True: send descriptors), else to the URL's path (False: plain batches, e.g. for tensorcom 0.1)."""
        deadline = None if self.send_timeout is None else time.monotonic() + self.send_timeout
        while True:
            for address in (channel, endpoint.url.address):
                if _shm.listening(address):
                    endpoint.socket.connect(address)
                    log.debug("%s: sending to %s", endpoint, address)
                    return address == channel
            if deadline is not None and time.monotonic() > deadline:
                raise Timeout(f"no client listens on {endpoint} within {self.send_timeout} s")
            if self._waiting():
                raise SendCancelled(f"gave up sending a batch on {endpoint}: the server is stopping")
            time.sleep(_PICK_STEP)

    def _publish(self, endpoint: Endpoint, message: list[Any]) -> None:
        """Send on an XPUB socket, where one subscriber that stops reading would stop the stream for all: once a send
        has waited ``stall_timeout`` seconds, the connections whose peer has stopped reading (bytes stuck in the
        kernel's send queue) are cut, with one log line, and the send goes on. The others keep every batch, in order;
        a cut subscriber that comes back gets the stream from where it then is."""
        stall = self.stall_timeout or 0.0  # set: _publish is used only then
        holds = self._holds[id(endpoint)]
        waited = 0.0

        def waiting() -> bool:
            if time.monotonic() - holds.looked >= _HOLD_LOOK:
                self._cut_holders(endpoint, holds.look(endpoint))
            return self._waiting_on(endpoint)

        while True:
            wait = stall if self.send_timeout is None else min(stall, self.send_timeout - waited)
            holds.start()
            try:
                send_frames(endpoint, message, timeout=wait, waiting=waiting)
                return
            except Timeout:
                waited += wait
                if self.send_timeout is not None and waited >= self.send_timeout:
                    raise Timeout(
                        f"could not send a batch on {endpoint} within {self.send_timeout} s (no subscriber took it)"
                    ) from None
            stalled = endpoint.stalled_peers()
            for fd in stalled:
                endpoint.cut(fd)
            if stalled:
                self.cut_subscribers += len(stalled)
                _stalled.note(
                    endpoint.address,
                    "cut %d subscriber(s) of %s that read nothing for %.0f s (%d so far); the others go on",
                    len(stalled),
                    endpoint,
                    stall,
                    self.cut_subscribers,
                )

    def _cut_holders(self, endpoint: Endpoint, over: list[int]) -> None:
        """Cut the subscribers whose hold account passed its budget (one rate-limited log line)."""
        if not over:
            return
        for fd in over:
            endpoint.cut(fd)
        self.cut_subscribers += len(over)
        _held.note(
            endpoint.address,
            "cut %d subscriber(s) of %s that held the stream while others waited more than %.0f%% of the time, "
            "%.2g s past that share (%d so far); the others go on",
            len(over),
            endpoint,
            _HOLD_SHARE * 100,
            self._holds[id(endpoint)].budget,
            self.cut_subscribers,
        )

    def _pick(self, plain: Endpoint, channel: Endpoint) -> Endpoint:
        """The socket of a bound ipc URL that takes the next batch: its shm channel (clients that read descriptors)
        or its plain socket (tensorcom 0.1, or clients with shm off), whichever has room, in turn when both have."""
        poller = zmq.Poller()
        poller.register(plain.socket, zmq.POLLOUT)
        poller.register(channel.socket, zmq.POLLOUT)
        deadline = None if self.send_timeout is None else time.monotonic() + self.send_timeout
        while True:
            ready = dict(poller.poll(int(_PICK_STEP * 1000)))
            if plain.socket in ready and channel.socket in ready:
                self._plain_next = not self._plain_next
                return plain if self._plain_next else channel
            if ready:
                return plain if plain.socket in ready else channel
            if deadline is not None and time.monotonic() > deadline:
                raise Timeout(
                    f"could not send a batch on {plain} within {self.send_timeout} s (no peer took it)"
                )
            if self._waiting():
                raise SendCancelled(f"gave up sending a batch on {plain}: the server is stopping")
            plain.check_handshakes()

    def _waiting_on(self, endpoint: Endpoint) -> bool:
        """:meth:`_waiting` for a send on an XPUB socket, which also keeps reading its subscriptions meanwhile."""
        self._drain_subscriptions(endpoint)
        return self._waiting()

    def _waiting(self) -> bool:
        """While a send waits for a client: keep reporting, and give up once :meth:`stop` was called."""
        self._maybe_report()
        return self._stop_requested

    def run(self, count: int | None = None, duration: float | None = None) -> int:
        """Send the source's batches (at most ``count``, for at most ``duration`` seconds, until :meth:`stop`),
        then close, waiting up to ``linger`` s (after :meth:`stop`: its ``drain``) for them to leave.

        Returns the number of batches sent.
        """
        if self.source is None:
            raise ConfigError("this Server has no source; pass one to Server(...) or call send() yourself")
        self._check_run_limits(count, duration)
        started = time.monotonic()
        try:
            for batch, meta in self._batches():
                if count is not None and self.served >= count:
                    break
                if self._stop_requested or (duration is not None and time.monotonic() - started >= duration):
                    break
                self.send(batch, meta)
                if count is not None and self.served >= count:
                    break  # before the source reads control again: a SEEK obeyed now would never be acted on
        except SendCancelled:
            pass  # stop() while a send waited for a client: that batch was not sent
        except BaseException:
            self.close(linger=0)  # interrupted or failed: do not hold the process for queued batches
            raise
        if (
            self._stop_requested
        ):  # queued batches get the drain time to leave; connected clients are not awaited
            self._close(self._drain or 0.0, await_clients=False)
        else:
            self.close()
        elapsed = max(time.monotonic() - self._started, 1e-9)
        log.info("finished: %d batches, %.1f MB in %.1f s", self.served, self.nbytes / 1e6, elapsed)
        return self.served

    def _await_disconnect(self, seconds: float) -> None:
        """Keep the sockets open until every client has disconnected, or for at most ``seconds``.

        A batch that has left this process can still be lost if the connection closes first: over ipc, a receiver
        whose queue is full drops what its kernel buffer still holds when the sender hangs up. So a finished server
        lingers while clients remain connected, and closes once they have gone.
        """
        deadline = time.monotonic() + seconds
        endpoints = [*self._endpoints, *self._companions]
        while any(endpoint.count_peers() for endpoint in endpoints) and time.monotonic() < deadline:
            self._refuse_control()
            time.sleep(0.02)

    def _refuse_control(self) -> None:
        """Answer control messages that arrive while the server closes with an error, so that a client's SEEK fails
        at once, naming the reason, instead of waiting out its timeout."""
        text = f"the server has finished ({self.served} batches sent) and is closing"
        refusal = Error(error=ErrorKind.UNAVAILABLE, message=text)
        self._answer_control(lambda _: refusal)

    def _batches(self) -> Iterator[tuple[Any, dict[str, Any] | None]]:
        """The source's batches, with metadata in pipeline mode, obeying SEEK control messages between batches."""
        if self.pipeline is None:
            for batch in self.source:
                yield batch, None
            return
        while True:
            self._obey_control()
            try:
                batch, meta = self.pipeline.next_with_meta()
            except StopIteration:
                if not self._await_seek():
                    return
                continue
            yield batch, self._metadata(meta) if self.metadata else None

    def _await_seek(self) -> bool:
        """At the end of the pipeline, while clients stay connected (for at most ``linger`` seconds), keep answering
        control messages: True if a SEEK moved the stream, so that sending goes on."""
        if self._control is None:
            return False
        generation = self.generation
        deadline = self._linger_ends = time.monotonic() + self.linger
        while True:
            self._obey_control()
            if self.generation != generation:
                self._linger_ends = None
                return True
            connected = any(endpoint.count_peers() for endpoint in (*self._endpoints, *self._companions))
            if not connected or time.monotonic() >= deadline:
                return False
            self._control.socket.poll(20, zmq.POLLIN)

    def _metadata(self, meta: dict[str, Any]) -> dict[str, Any]:
        pipeline = self.pipeline
        return {
            "gen": self.generation,
            "step": int(meta.get("step", 0)),
            "epoch": int(meta.get("epoch", 0)),
            "indices": [int(i) for i in meta.get("indices", [])],
            "state": pipeline.state(),
            "fingerprint": pipeline.fingerprint,
            "seed": self.seed,
        }

    def _obey_control(self) -> None:
        """Handle pending SEEK messages: restart the pipeline from the state (or epoch) a client sent."""
        if self._control is not None:
            self._control.count_peers()
        self._answer_control(self._seek)

    def _answer_control(self, answer: Callable[[bytes], Error | Sought]) -> None:
        """Reply to every pending control message with ``answer(its header)``."""
        control = self._control
        if control is None:
            return
        for _ in range(_CONTROL_PER_LOOK):  # a flood of control messages cannot hold the stream here
            if not control.socket.poll(0, zmq.POLLIN):
                break
            frames, extra = receive_small(control.socket, 2)
            if len(frames) < 2:
                continue
            reply = (
                answer(frames[1])
                if not extra
                else Error(
                    error=ErrorKind.PROTOCOL, message=f"a control message has 2 frames. Found: {2 + extra}"
                )
            )
            try:
                control.socket.send_multipart([frames[0], reply.encode()], flags=zmq.NOBLOCK)
            except zmq.ZMQError as error:
                log.info("could not answer a control message on %s: %s", control, error)

    def _seek(self, header: bytes) -> Error | Sought:
        pipeline = self.pipeline
        try:
            message = decode(header, f"control client of {self._control}")
            if not isinstance(message, Seek):
                raise ProtocolError(f"the control socket accepts SEEK only. Found: {message.command.name}")
            if message.state is not None:
                pipeline.load_state(message.state)
            else:
                pipeline.set_epoch(message.epoch)
        except (TensorcomError, ValueError, TypeError, KeyError) as error:
            kind = ErrorKind.STATE if isinstance(error, StateError) else ErrorKind.PROTOCOL
            return Error(error=kind, message=f"{type(error).__name__}: {error}")
        self.generation += 1
        log.info("seek: continuing from step %d (generation %d)", pipeline.step, self.generation)
        return Sought(gen=self.generation, fingerprint=pipeline.fingerprint)

    def close(self, linger: float | None = None) -> None:
        """Close the sockets, waiting up to ``linger`` seconds (default: the server's) for queued batches to leave
        and for connected clients to go."""
        seconds = self.linger if linger is None else linger
        if self._linger_ends is not None:  # part of the linger time went to waiting for a SEEK
            seconds = min(seconds, max(0.0, self._linger_ends - time.monotonic()))
        self._close(seconds, await_clients=True)

    @property
    def refused_subscribers(self) -> int:
        """Connections to zpub sockets cut for sending more than a subscriber does, or refused past
        ``max_subscribers``."""
        return self._guard.refused if self._guard is not None else 0

    def _close(self, seconds: float, await_clients: bool) -> None:
        if await_clients:
            self._await_disconnect(seconds)
        guard: _SubscriberGuard | None = getattr(self, "_guard", None)
        if guard is not None:
            guard.stop()
        for endpoint in [*self._endpoints, *getattr(self, "_companions", [])]:
            endpoint.close(linger=seconds)
        self._endpoints = []
        self._companions = []
        for _, _, arena in getattr(self, "_channels", {}).values():
            arena.close()
        self._channels = {}
        control: Endpoint | None = getattr(self, "_control", None)
        if control is not None:
            control.close()
            self._control = None
        if self.pipeline is not None:
            self.pipeline.close()
        authenticator: Authenticator | None = getattr(self, "_authenticator", None)
        if authenticator is not None:
            authenticator.stop()
            self._authenticator = None
        if not self._context.closed:
            self._context.term()  # blocks until queued messages are sent or the linger time is over


def serve(source: Iterable[Any], urls: str | Sequence[str], **options: Any) -> int:
    """Send every batch of ``source`` on ``urls`` and return the number sent; see :class:`StreamServer` for options."""
    return StreamServer(source, urls, **options).run()
