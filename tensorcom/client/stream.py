"""The stream client: receives batches from stream servers and yields them as arrays or tensors.

Stream mode (``zpull``, ``zsub``, ``zrpull``, ``zrsub``) receives whatever the servers send, as fast as the bounded
queues allow; it reads tensorcom 0.1 servers as well as ours. Every URL gets its own socket, all of them are
polled, and ready sockets are read in turn so no server starves another. ``Connection`` and ``BatchInfo`` are
re-exported here for code written against this module when it held them.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import zmq

from tensorcom import codec, protocol
from tensorcom._net import shm as _shm
from tensorcom._net.security import KeyPath
from tensorcom._net.transport import MAX_BATCH_FRAME, Endpoint, open_endpoint, parse_endpoints, receive
from tensorcom.client._base import BatchInfo, Connection, check_fan_in
from tensorcom.convert import ConverterSpec
from tensorcom.errors import ConfigError, DecodeError, ProtocolError, StateError, Timeout
from tensorcom.protocol import (
    MAX_HEADER_BYTES,
    META_INFO,
    Batch,
    Error,
    ErrorKind,
    Seek,
    Sought,
    rebuild_batch,
    split_stream_meta,
    stream_meta_bytes,
    unpack_bounded,
)
from tensorcom.urls import ParsedURL

__all__ = ["BatchInfo", "Connection", "StreamConnection"]

log = logging.getLogger(__name__)

_NOBLOCK = int(zmq.NOBLOCK)
_WATCH_STEP = 0.2  # seconds between looks at the sockets' handshakes while waiting
_RECENT_BATCHES = 4096  # batches remembered to notice two servers sending the same stream


class StreamConnection(Connection, schemes=("zpull", "zrpull", "zsub", "zrsub"), mode="stream"):
    """Receive whatever stream servers send (what ``Connection("zpull://...")`` builds).

    Args:
        urls, converters, timeout, epoch, total, client_key, server_public_key, max_message_size, shm: as for every
            :class:`~tensorcom.client.Connection`.
        queue: batches each socket may hold before the server is slowed down (the receive high-water mark).
        on_malformed: "raise" (default) raises :class:`tensorcom.DecodeError` naming the server; "log" logs it,
            counts it in ``malformed`` and goes on to the next batch.
        control: the ``zreq://`` URL of the server's control socket (a pipeline server started with ``control=``):
            then :meth:`load_state_dict` and :meth:`set_epoch` move that server (see :meth:`seek`).
        io_threads: ZeroMQ I/O threads, as for every :class:`~tensorcom.client.Connection`; by default one per two
            sockets to servers, at most 4.
        stripes: sockets opened to each ``zrpull`` URL (default 1). A ``zrpush`` server hands its batches to them in
            turn, so one fast server's stream spreads over ``stripes`` TCP connections. Batches from one server
            then arrive interleaved across its sockets, as batches from several servers do: stream mode never
            promised an order across sockets (use zreq for step order, or the step in ``last``). ``zsub`` URLs
            refuse stripes (every SUB socket would get every batch); bound URLs (``zpull``, ``zrsub``) keep one
            socket.
    """

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
        client_key: KeyPath | None = None,
        server_public_key: KeyPath | None = None,
        max_message_size: int = MAX_BATCH_FRAME,
        shm: bool | None = None,
        control: str | None = None,
        io_threads: int | None = None,
        stripes: int = 1,
    ) -> None:
        if on_malformed not in ("raise", "log"):
            raise ConfigError(f"on_malformed must be 'raise' or 'log'. Found: {on_malformed!r}")
        if control is not None:
            parse_endpoints(control, {"DEALER"}, "control")  # a bad URL fails here, not at the first seek
        check_fan_in(io_threads, stripes)
        if stripes > 1:
            parsed = parse_endpoints(urls, {"PULL", "SUB"}, "stream Connection")
            subscribers = [url.url for url in parsed if url.scheme == "zsub"]
            if subscribers:
                raise ConfigError(
                    f"stripes={stripes} cannot apply to {subscribers[0]!r}: every SUB socket receives every batch, "
                    "so striped zsub would deliver each batch several times; use stripes=1, or zrpull://"
                )
        self.max_message_size = max_message_size
        super().__init__(
            urls,
            queue=queue,
            immediate=False,
            converters=converters,
            timeout=timeout,
            epoch=epoch,
            total=total,
            client_key=client_key,
            server_public_key=server_public_key,
            max_message_size=max_message_size,
            shm=shm,
            io_threads=io_threads,
            stripes=stripes,
        )
        self.on_malformed = on_malformed
        self.control = control
        self._turn = 0
        self._stash: deque[tuple[Endpoint, list[Any]]] = deque()
        self._generation = 0
        self._pipeline_state: Any = None
        self._stream_meta: Batch | None = None
        self._recent: dict[
            tuple[Any, ...], str
        ] = {}  # recent batches' identities -> the server that sent them
        self._duplicates: set[frozenset[str]] = set()
        self._sources = [*self._endpoints, *self._companions]  # every socket read: URLs' and shm channels
        self._unconnected = [  # zrpull+ipc sockets waiting for a server, and the shm channel they would read
            (e, channel.address)
            for e in self._endpoints
            if not self._connects_at_once(e.url) and (channel := _shm.channel_url(e.url)) is not None
        ]
        try:
            for companion in self._companions:
                self._poller.register(companion.socket, zmq.POLLIN)
            self._connect_when_listening()
        except BaseException:
            self.close()
            raise

    def _before_open(self, url: ParsedURL, *, queue: int, max_message_size: int) -> None:
        """A bound ipc PULL listens on PATH.shm too (before PATH, so that a server that finds PATH listening finds
        the channel as well): a connecting server sends its shared-memory descriptors there."""
        if not hasattr(self, "_companions"):
            self._companions: list[Endpoint] = []
        channel = _shm.channel_url(url) if self._shm and url.bind else None
        if channel is not None:
            self._companions.append(
                open_endpoint(
                    self._context,
                    channel,
                    queue=queue,
                    monitor=True,
                    keys=self._keys,
                    max_message_size=max_message_size,
                )
            )

    def _connects_at_once(self, url: ParsedURL) -> bool:
        """A zrpull+ipc socket waits to connect until a server listens on PATH.shm (then it reads the shm channel)
        or on PATH (a server without one); see :meth:`_connect_when_listening`."""
        return url.bind or not (self._shm and url.socket_type == "PULL" and _shm.channel_url(url) is not None)

    def _connect_when_listening(self) -> None:
        """Connect each waiting ipc socket to its server's shm channel if one listens, else to the plain socket if a
        server listens there; one that finds neither keeps waiting (checked again while receiving)."""
        for endpoint, channel in list(self._unconnected):
            for address in (channel, endpoint.url.address):
                if _shm.listening(address):
                    endpoint.socket.connect(address)
                    log.debug("%s: reading %s", endpoint, address)
                    self._unconnected.remove((endpoint, channel))
                    break

    def close(self) -> None:
        """Close every socket at once, the shm channels' included."""
        for companion in getattr(self, "_companions", []):
            companion.close()
        self._companions = []
        self._sources = []
        super().close()

    def _next_ready(self) -> Endpoint:
        self._ensure_open()
        self._disconnects = sum(endpoint.disconnects for endpoint in self._sources)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            remaining = (
                _WATCH_STEP if deadline is None else max(0.0, min(_WATCH_STEP, deadline - time.monotonic()))
            )
            events = dict(self._poller.poll(int(remaining * 1000)))
            if not events:
                for endpoint in self._sources:
                    endpoint.check_handshakes()
                if self._unconnected:
                    self._connect_when_listening()
            count = len(self._sources)
            for offset in range(count):  # round robin over the ready sockets, so no server starves another
                endpoint = self._sources[(self._turn + offset) % count]
                if endpoint.socket in events:
                    self._turn = (self._turn + offset + 1) % count
                    return endpoint
            if deadline is not None and time.monotonic() >= deadline:
                waiting = ", ".join(str(endpoint) for endpoint, _ in self._unconnected)
                waiting = f" (no server listens on {waiting} yet)" if waiting else ""
                dropped = sum(endpoint.disconnects for endpoint in self._sources) - self._disconnects
                if dropped:
                    waiting += (
                        f" ({dropped} connections dropped meanwhile; one cause: this socket drops a connection "
                        f"that sends an array over max_message_size={self.max_message_size} bytes)"
                    )
                raise Timeout(f"no batch within {self.timeout} s from {', '.join(self.endpoints)}{waiting}")

    def _receive(self) -> tuple[Endpoint, list[Any]]:
        if self._stash:
            return self._stash.popleft()
        if len(self._sources) == 1:  # one server: take what is already queued without polling first
            endpoint = self._sources[0]
            try:
                return endpoint, self._read(endpoint, _NOBLOCK)
            except zmq.Again:
                pass
        endpoint = self._next_ready()
        return endpoint, self._read(endpoint)

    def _read(self, endpoint: Endpoint, flags: int = 0) -> list[Any]:
        lead = 1 if endpoint.url.topic else 0
        frames = receive(endpoint.socket, copy=self._reads_shm(endpoint), flags=flags, lead=lead)
        return frames[lead:]

    def _reads_shm(self, endpoint: Endpoint) -> bool:
        """Whether batches from ``endpoint`` may come in shared memory. Messages from such an endpoint are received
        as copies, not zmq.Frame objects: they are small, and a Frame's deallocation checks for signals, so it would
        swallow a Ctrl-C arriving then."""
        return self._shm and endpoint.url.transport == "ipc"

    def _decode(self, endpoint: Endpoint, frames: list[Any]) -> tuple[list[Any], list[str]] | None:
        """Decode a message; None if it is malformed and ``on_malformed="log"``."""
        try:
            if _shm.is_descriptor(frames):
                if not self._reads_shm(endpoint):
                    raise DecodeError(
                        "the server sent a batch in shared memory, which this connection does not read; "
                        "start the server with shm=False (or TENSORCOM_SHM=0)"
                    )
                return self._reader.read(frames[0], str(endpoint))
            if len(frames) == 1:  # tensorcom 0.1's single-buffer mode: one frame holding a .ten buffer
                return codec.decode_buffer(frames[0], infos=True)
            return codec.decode(frames, infos=True)
        except ValueError as error:  # DecodeError, or any other ValueError a malformed batch raises
            message = f"malformed batch from {endpoint}: {error}"
            if self.on_malformed == "raise":
                raise DecodeError(message) from error
            self.malformed += 1
            log.warning("%s (skipped; %d so far)", message, self.malformed)
            return None

    def recv(self) -> Any:
        """Receive the next batch (a list of arrays or converted values); details of it go to ``self.last``.

        Batches from a pipeline-mode server come back with their structure (tuple, dict, ...) and their metadata in
        ``self.last`` (step, epoch, indices); batches sent before this client's last :meth:`seek` are dropped.
        """
        self._reader.collect()  # slots of the batches dropped since the last call
        while True:
            endpoint, frames = self._receive()
            frames, packed = _split_meta(frames)
            decoded = self._decode(endpoint, frames)
            if decoded is None:
                continue
            arrays, infos = decoded
            if packed is None and infos and infos[-1] == META_INFO:  # servers before the metadata frame
                packed, arrays, infos = memoryview(arrays[-1].tobytes()), arrays[:-1], infos[:-1]
            try:
                meta = None if packed is None else _metadata(packed, endpoint)
            except ProtocolError as error:
                if self.on_malformed == "raise":
                    raise
                self.malformed += 1
                log.warning("%s (skipped; %d so far)", error, self.malformed)
                continue
            if meta is not None:
                if meta.gen < self._generation:
                    continue  # sent before our seek
                self._pipeline_state = meta.state
                self._stream_meta = meta
                if len(self._endpoints) > 1:
                    self._check_duplicate(meta, endpoint)
            self.count += 1
            self.last = BatchInfo(endpoint.address, sum(a.nbytes for a in arrays), infos, self.count)
            if meta is None:
                return self.convert(arrays)
            self.last.step = meta.step
            self.last.epoch = meta.epoch
            self.last.indices = list(meta.indices)
            return rebuild_batch(self.convert(arrays), meta.kind, meta.keys)

    def _check_duplicate(self, meta: Batch, endpoint: Endpoint) -> None:
        """Warn (once per pair of servers) when two servers send the same batch: servers started with the same seed,
        rank and world size feed this client the same stream twice."""
        key = (meta.seed, meta.fingerprint, meta.epoch, meta.step, tuple(meta.indices))
        first = self._recent.setdefault(key, endpoint.address)
        if len(self._recent) > _RECENT_BATCHES:
            del self._recent[next(iter(self._recent))]
        pair = frozenset((first, endpoint.address))  # either may send a step first
        if first != endpoint.address and pair not in self._duplicates:
            self._duplicates.add(pair)
            log.warning(
                "%s and %s send the same stream (seed %s, epoch %d, step %d): this client gets each of their "
                "batches twice; give each server its own --seed, or its own --rank of --world-size",
                first,
                endpoint.address,
                meta.seed,
                meta.epoch,
                meta.step,
            )

    def state(self) -> dict[str, Any]:
        """Where a pipeline-mode stream stands (after the last batch received), for :meth:`seek` after a restart.

        Stream mode gives no exactly-once guarantee across several clients or servers; use zreq for that.
        """
        meta = self._stream_meta
        if meta is None:
            raise StateError(
                "no batch with pipeline metadata received yet (the server must run a tensorcom pipeline)"
            )
        return {
            "kind": "tensorcom.stream",
            "format": 1,
            "seed": meta.seed,
            "fingerprint": meta.fingerprint,
            "pipeline": self._pipeline_state,
            "epoch": None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Move the server to ``state`` through the control socket given as ``control=``: the next batch received is
        the one after the batch the state was taken at (``load_state`` and ``set_state`` are the same method)."""
        self.seek(self._control_url("load_state_dict"), state)

    load_state = set_state = load_state_dict

    def set_epoch(self, epoch: int) -> None:
        """Move the server to the start of ``epoch`` through the control socket given as ``control=``."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ConfigError(f"epoch must be an int >= 0. Found: {epoch!r}")
        self.seek(self._control_url("set_epoch"), epoch=epoch)

    def _control_url(self, method: str) -> str:
        if self.control is None:
            raise ConfigError(
                f"{method}() on a stream connection moves its server through the server's control socket: pass "
                "control='zreq://...' (the server's control= address), or use zreq:// URLs"
            )
        return self.control

    def seek(self, control: str, state: dict[str, Any] | None = None, *, epoch: int | None = None) -> None:
        """Ask the stream server whose control socket is ``control`` (a ``zreq://`` URL) to continue from ``state``
        (a state from :meth:`state`, from a zreq connection, or a pipeline's own) or from the start of ``epoch``.

        Batches it sent before the seek are dropped; the next batch received is the one after ``state``. Meant for
        a connection that receives from that one server (after the server restarted, or to rewind it).
        """
        servers = {endpoint.url.url for endpoint in self._endpoints}
        if len(servers) != 1:
            raise ConfigError(f"seek needs a connection with one server; this one has {len(servers)}")
        if (state is None) == (epoch is None):
            raise ConfigError("seek needs a state or an epoch (one of them)")
        pipeline_state = state.get("pipeline") if state is not None and "kind" in state else state
        request = Seek(state=pipeline_state) if pipeline_state is not None else Seek(epoch=epoch)
        parsed = parse_endpoints(control, {"DEALER"}, "seek")[0]
        dealer = open_endpoint(self._context, parsed, queue=4, monitor=True, keys=self._keys)
        try:
            dealer.socket.send(request.encode())
            reply = self._await_reply(dealer)
        finally:
            dealer.close()
        if isinstance(reply, Error):
            error = StateError if reply.error is ErrorKind.STATE else ProtocolError
            raise error(f"server at {control} refused to seek: {reply.message}")
        if not isinstance(reply, Sought):
            raise ProtocolError(f"server at {control} answered SEEK with {reply.command.name}")
        self._generation = reply.gen

    def _await_reply(self, dealer: Endpoint) -> protocol.AnyMessage:
        """Wait for the control reply, stashing (not losing) batches that arrive meanwhile."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        poller = zmq.Poller()
        poller.register(dealer.socket, zmq.POLLIN)
        for data in self._sources:  # the server's stripes and shm channel too
            poller.register(data.socket, zmq.POLLIN)
        while deadline is None or time.monotonic() < deadline:
            events = dict(poller.poll(100))
            dealer.check_handshakes()
            if dealer.socket in events:
                return protocol.decode(dealer.socket.recv(), f"control socket {dealer}")
            for data in self._sources:
                if data.socket in events:
                    self._stash.append((data, self._read(data)))
            while len(self._stash) > 64:
                self._stash.popleft()  # older than anything the seek keeps
        raise Timeout(f"no answer to SEEK within {self.timeout} s from {dealer}")


def _split_meta(frames: list[Any]) -> tuple[list[Any], memoryview | None]:
    """A stream message's frames without its metadata frame, and that frame's msgpack bytes (or None)."""
    if len(frames) == 2 and _shm.is_descriptor(frames[:1]):  # a batch in shared memory, then its metadata
        packed = stream_meta_bytes(frames[1])
        return (frames[:1], packed) if packed is not None else (frames, None)
    return split_stream_meta(frames)


def _metadata(packed: memoryview, endpoint: Endpoint) -> Batch:
    """The metadata a pipeline-mode server sends with a batch (bounded before and while it is decoded)."""
    if packed.nbytes > MAX_HEADER_BYTES:
        raise ProtocolError(
            f"batch metadata from {endpoint} is {packed.nbytes} bytes; at most {MAX_HEADER_BYTES}"
        )
    fields = unpack_bounded(packed, f"batch metadata from {endpoint}")
    if not isinstance(fields, dict):
        raise ProtocolError(f"batch metadata from {endpoint} must be a map")
    return Batch.from_fields(fields, f"the batch metadata from {endpoint}")
