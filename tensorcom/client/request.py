"""The ``zreq`` client: numbered batches from any number of stateless servers, exactly once and in order.

A :class:`RequestConnection` (what ``Connection("zreq://...")`` returns) holds one DEALER per server. It keeps a
window of ``prefetch`` requests outstanding, spread over the servers it believes alive, and yields replies in step
order. Every server is pinged each ``heartbeat`` seconds; one that stays silent for ``dead_after`` seconds is
considered down and its outstanding steps are asked of the others. It is used again as soon as it answers. A reply
that arrives late, twice, or for a state the client has since left is dropped, so delivery is exactly once.

Its :meth:`state_dict` (alias ``state``) is small plain data (the pipeline's own state after the last batch delivered,
the step of the next batch, the seed and a fingerprint of the pipeline) and is the same on every rank of a synchronous
job; a new connection given that state (``state=`` or :meth:`load_state_dict`), with any number of servers and any
world size, continues where it left off, and its step numbers (``last.step``) go on from there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq

from tensorcom import codec, protocol
from tensorcom._net import shm as _shm
from tensorcom._net.ratelog import RateLimitedLog
from tensorcom._net.security import KeyPath
from tensorcom._net.transport import MAX_BATCH_FRAME, PREALLOCATE, Endpoint, open_endpoint, receive
from tensorcom.client._base import MAX_DEFAULT_IO_THREADS, BatchInfo, Connection
from tensorcom.convert import ConverterSpec
from tensorcom.errors import (
    ConfigError,
    DecodeError,
    ProtocolError,
    RemoteError,
    StateError,
    TensorcomError,
    Timeout,
)
from tensorcom.protocol import (
    MAX_WORKERS,
    Base,
    Batch,
    Batches,
    End,
    Error,
    ErrorKind,
    Hello,
    Ping,
    Pong,
    Request,
    Welcome,
    rebuild_batch,
)
from tensorcom.urls import parse_url

__all__ = ["RequestConnection", "default_rank_and_world_size"]

log = logging.getLogger(__name__)
_busy = RateLimitedLog(log, logging.WARNING)

EXPECTED_WORKERS = 2
"""Data sockets per server socket that the default number of I/O threads counts on: a server's workers (two by
default, ``tensorcom serve -w 2``) each send on a connection of their own, and the default gives each such
connection an I/O thread (up to :data:`~tensorcom.client._base.MAX_DEFAULT_IO_THREADS` and the CPUs the process may
run on). Two workers' 9.6 MB batches read by one I/O thread ran at 0.83-0.85 of one worker's rate over loopback
tcp, at 0.96-1.0 with a thread each (benchmarks/README.md, "Many servers into one rank")."""
_SMALL_BATCH = 1 << 20  # below this many bytes, requests go in groups (see RequestConnection)
_NOBLOCK = int(zmq.NOBLOCK)  # plain ints: an enum flag costs an enum construction per call
_RCVMORE = int(zmq.RCVMORE)
_GROUP = 4
STATE_KIND = "tensorcom.zreq"
STATE_FORMAT = 2
_STATE_FORMATS = (1, 2)  # format 1 had no "step": it is read from the pipeline state, else 0


def default_rank_and_world_size() -> tuple[int, int]:
    """torch.distributed's rank and world size when it is initialised, else $RANK/$WORLD_SIZE, else (0, 1)."""
    import sys

    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        return int(distributed.get_rank()), int(distributed.get_world_size())
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


_BUSY_WAIT = 0.1  # seconds a server that refused requests as busy is left aside at first
_BUSY_WAIT_MOST = 2.0


@dataclass
class _Server:
    endpoint: Endpoint
    alive: bool = True
    last_heard: float = 0.0
    answered: bool = False  # it has sent something (a WELCOME, a PONG, a reply) since this connection opened
    last_ping: float = 0.0
    outstanding: set[int] = field(default_factory=set)
    fingerprint: str | None = None
    disconnects: int = 0
    shutting_down: bool = False  # it said so; not used again until its connection drops (a new process)
    shm: bool = False  # it is on this host (ipc) and batches may come as shared-memory descriptors
    parent: _Server | None = None  # for a server's worker process: the server (see Welcome.workers)
    stalled: bool = False  # it let a step pass its deadline; no requests until it answers one
    busy_until: float = 0.0  # it refused requests as busy (full): none until then
    busy_wait: float = (
        _BUSY_WAIT  # how long the next busy refusal keeps it aside (doubles, up to _BUSY_WAIT_MOST)
    )
    busy_why: str = ""  # what it said when it last refused as busy
    greet_again: bool = False  # it refused our HELLO as busy: greet it again once busy_until has passed
    workers: list[_Server] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.endpoint.address


def _server_state(server: _Server) -> str:
    """How a server stands, for messages: never answered, stalled, busy (and why), up or down."""
    if not server.answered:
        return "never answered"
    if server.stalled:
        return "stalled"
    if server.busy_why and server.busy_until > time.monotonic() - _BUSY_WAIT_MOST:
        return f"busy: {server.busy_why}"
    return "up" if server.alive else "down"


class RequestConnection(Connection, schemes=("zreq",), mode="deterministic request"):
    """Receive the deterministic stream ``factory(seed, rank, world_size)`` from ``zreq`` servers (what
    ``Connection("zreq://...")`` builds).

    Args:
        urls: ``zreq://host:port`` URLs (braces expand), one per server.
        seed: the pipeline seed; with rank and world size it fixes every batch.
        rank, world_size: default to torch.distributed, else $RANK/$WORLD_SIZE, else 0 and 1.
        prefetch: requests outstanding at once (the credit window), spread over live servers. For batches under
            1 MB, each request asks for 4 consecutive steps and the window holds ``4 * prefetch`` steps: a batch
            that small costs less to move than its request costs to send. The receive queue holds the whole window.
        timeout: seconds without the next batch before :class:`tensorcom.Timeout` (names every endpoint and whether
            it is up, down, or never answered).
        heartbeat: seconds between pings to each server.
        dead_after: seconds of silence after which a server's outstanding steps go elsewhere (default
            ``max(3 * heartbeat, 2)``).
        state: a :meth:`state` saved earlier (by any rank, with any world size) to continue from.
        converters, epoch, total, client_key, server_public_key, max_message_size: as for every
            :class:`~tensorcom.client.Connection` (a server that refuses this client's key raises
            :class:`tensorcom.SecurityError`). A malformed reply always raises.
        shm: read batches from shared memory when the server is on this host (:mod:`tensorcom._net.shm`). None (the
            default): for ``ipc://`` servers, unless $TENSORCOM_SHM is 0. False: always through the socket.
            The arrays of such a batch are views of shared memory; its slot is reused once they are all dropped.
        io_threads: ZeroMQ I/O threads, as for every :class:`~tensorcom.client.Connection`. The sockets to the
            servers' worker processes (opened after the first WELCOME) share them, so the default counts
            :data:`EXPECTED_WORKERS` per server socket (see :meth:`_default_io_threads`).
        request_deadline: seconds a server may take to answer a step before that is a fault (None: no limit): its
            unanswered steps are asked of the other servers, and it gets no more requests until it answers one
            (a PONG does not count: a server's front end answers pings while a worker is stuck). The default, 300 s,
            leaves room for heavy augmentation of large batches.
        stripes: DEALER sockets opened to each server (default 1), each greeted, pinged and asked for steps as a
            server of its own (and each connecting to that server's workers itself), so one fast server's replies
            spread over ``stripes`` TCP connections. Batches are still yielded in step order, exactly once.

    Once open, ``fingerprint`` names the served pipeline and ``class_names`` holds the names of its classes (label i
    named ``class_names[i]``) where the servers send them in their WELCOME (serve-imagenet-dir: its class folders),
    else None. Stream servers have no such handshake: a stream connection has no ``class_names``.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        prefetch: int = 4,
        timeout: float | None = 60.0,
        heartbeat: float = 1.0,
        dead_after: float | None = None,
        state: dict[str, Any] | None = None,
        converters: ConverterSpec = None,
        epoch: int | None = None,
        total: int | None = None,
        client_key: KeyPath | None = None,
        server_public_key: KeyPath | None = None,
        max_message_size: int = MAX_BATCH_FRAME,
        shm: bool | None = None,
        io_threads: int | None = None,
        stripes: int = 1,
        request_deadline: float | None = 300.0,
    ) -> None:
        default_rank, default_world = default_rank_and_world_size()
        rank = default_rank if rank is None else rank
        world_size = default_world if world_size is None else world_size
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(
                f"rank must be in [0, world_size) and world_size >= 1. Found: rank={rank}, world_size={world_size}"
            )
        if prefetch < 1:
            raise ConfigError(f"prefetch must be >= 1. Found: {prefetch}")
        if heartbeat <= 0:
            raise ConfigError(f"heartbeat must be > 0 seconds. Found: {heartbeat}")
        if request_deadline is not None and request_deadline <= 0:
            raise ConfigError(f"request_deadline must be > 0 seconds or None. Found: {request_deadline}")
        self.request_deadline = request_deadline
        self._asked: dict[int, float] = {}  # step -> when it was last requested
        super().__init__(
            urls,
            queue=prefetch * _GROUP + 16,  # the whole window fits: the server never waits on us
            immediate=True,  # no queueing toward a server that is not there
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
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.prefetch = prefetch
        self._max_message_size = max_message_size
        self.heartbeat = heartbeat
        self.dead_after = dead_after if dead_after is not None else max(3 * heartbeat, 2.0)
        self.fingerprint: str | None = None
        self.class_names: tuple[str, ...] | None = None
        self._servers = [
            _Server(endpoint, shm=self._shm and endpoint.url.transport == "ipc")
            for endpoint in self._endpoints
        ]
        self._by_socket = {server.endpoint.socket: server for server in self._servers}
        self._generation = 0
        self._base = Base()
        self._base_step = 0  # the absolute step (last.step) of the base's step 0
        self._state: Any = None  # pipeline state after the last batch delivered
        self._state_in: tuple[Batches, int] | None = None  # or: where to rebuild it from (see state())
        self._next_step = 0  # the step the caller gets next
        self._next_request = 0  # the lowest step never requested
        self._end_step: int | None = None
        self._last_epoch: int | None = None
        self._to_request: list[int] = []
        # step -> (header, the step's place in a BATCHES header, (arrays, infos) or frames)
        self._replies: dict[int, tuple[Batch | Batches | Error, int, Any]] = {}
        self._expected_fingerprint: str | None = None
        self._group = 1  # steps per request: _GROUP once batches are known to be small
        self._started_waiting = time.monotonic()
        self._received: tuple[bytes, protocol.AnyMessage, list[tuple[int, int]] | None] | None = None
        try:
            if state is not None:
                self.load_state(state)
            self._hello()
        except BaseException:
            self.close()
            raise

    def _default_io_threads(self, sockets: int) -> int:
        """The context exists before the servers name their workers, so count :data:`EXPECTED_WORKERS` sockets to
        workers for each socket to a server (whose own traffic, once workers answer, is pings and requests), and
        give each of them an I/O thread, at most :data:`~tensorcom.client._base.MAX_DEFAULT_IO_THREADS` and at most
        the CPUs this process may run on (more threads than cores only take turns on them)."""
        return max(1, min(MAX_DEFAULT_IO_THREADS, usable_cpus(), sockets * EXPECTED_WORKERS))

    # state

    def state(self) -> dict[str, Any]:
        """Where the stream stands: plain data to store in a checkpoint and pass to ``Connection(state=...)`` or
        :meth:`load_state_dict` (``state_dict`` is the same method)."""
        if self._state_in is not None:  # the last batch came in a BATCHES message: rebuild its state once
            group, index = self._state_in
            self._state, self._state_in = group.state_at(index), None
        return {
            "kind": STATE_KIND,
            "format": STATE_FORMAT,
            "seed": self.seed,
            "fingerprint": self.fingerprint,
            "pipeline": self._state if self._state is not None else self._base.state,
            "epoch": None if self._state is not None else self._base.epoch,
            "step": self._base_step + self._next_step,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the next batch is the one after the batch the state was taken at, and its
        ``last.step`` the one after that batch's (``load_state_dict`` and ``set_state`` are the same method)."""
        if not isinstance(state, dict) or state.get("kind") != STATE_KIND:
            raise StateError(
                f"not a zreq connection state (expected kind {STATE_KIND!r}). Found: {str(state)[:200]}"
            )
        if state.get("format") not in _STATE_FORMATS:
            raise StateError(
                f"state format {state.get('format')!r} is not supported; expected one of {list(_STATE_FORMATS)}"
            )
        if state.get("seed") != self.seed:
            raise StateError(
                f"the state was saved with seed {state.get('seed')!r}; this connection has seed {self.seed}"
            )
        if self.fingerprint is not None and state.get("fingerprint") not in (None, self.fingerprint):
            raise StateError(
                f"the state was saved from pipeline {state.get('fingerprint')}; the servers serve {self.fingerprint}"
            )
        pipeline, step = state.get("pipeline"), _step_of(state)
        if pipeline is None:  # at the start of the stream or of an epoch, ``step`` batches into it
            self._restart(Base(epoch=state.get("epoch")), first_step=step)
        else:
            self._restart(Base(state=pipeline, epoch=state.get("epoch")), base_step=step)
        self._expected_fingerprint = state.get("fingerprint")

    set_state = load_state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The same as :meth:`load_state`."""
        self.load_state(state)

    def set_epoch(self, epoch: int) -> None:
        """Continue from the start of ``epoch`` (as ``DistributedSampler.set_epoch`` does); steps count from 0 again.

        The servers' pipeline must be able to start an epoch (its source a ``Range`` or ``Permutation``)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ConfigError(f"epoch must be an int >= 0. Found: {epoch!r}")
        self._restart(Base(epoch=epoch))

    def seek_step(self, step: int) -> None:
        """Continue from step ``step`` of the stream from its start (the seed's stream, before any epoch was set):
        the next batch is that step. Servers skip to it without computing the batches before it where the stages
        allow random access."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ConfigError(f"step must be an int >= 0. Found: {step!r}")
        self._restart(Base(), first_step=step)

    def seek(self, control: str, state: dict[str, Any] | None = None, *, epoch: int | None = None) -> None:
        """Stream servers only: a zreq connection moves with :meth:`load_state_dict` or :meth:`set_epoch` instead."""
        raise ConfigError(
            "seek() is for stream connections; a zreq connection continues from a state with load_state_dict() "
            "or from an epoch with set_epoch()"
        )

    def _restart(self, base: Base, *, base_step: int = 0, first_step: int = 0) -> None:
        """Drop what is in flight; ask for steps from ``first_step`` of ``base``, whose step 0 is ``base_step``."""
        self._generation += 1
        self._base = base
        self._base_step = base_step
        self._state = self._state_in = None
        self._next_step = self._next_request = first_step
        self._end_step = None
        self._to_request = []
        self._replies = {}
        self._asked.clear()
        for server in self._servers:
            server.outstanding.clear()

    # messages

    def _request(self, server: _Server, step: int, count: int = 1) -> Request:
        return Request(
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            base=self._base,
            gen=self._generation,
            step=step,
            count=count,
            shm=server.shm,
            max_frame=self._max_message_size,
        )

    def _send(self, server: _Server, message: Hello | Request | Ping) -> bool:
        try:
            server.endpoint.socket.send(message.encode(), flags=zmq.NOBLOCK)
            return True
        except zmq.Again:  # not connected (IMMEDIATE) or its queue is full
            return False

    def _hello(self) -> None:
        """Greet every server and wait for the first WELCOME: it checks our state against the served pipeline."""
        hello = Hello(
            seed=self.seed, rank=self.rank, world_size=self.world_size, base=self._base, gen=self._generation
        )
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        greeted: set[int] = set()
        while self.fingerprint is None:
            for index, server in enumerate(self._servers):
                if server.greet_again and time.monotonic() >= server.busy_until:
                    server.greet_again = False
                    greeted.discard(index)  # it was full when we said HELLO: try again
                if index not in greeted and self._send(server, hello):
                    greeted.add(index)
            self._poll_once(min(self.heartbeat, 0.1))
            for server in self._servers:
                server.endpoint.check_handshakes()
            if deadline is not None and time.monotonic() > deadline:
                raise Timeout(f"no zreq server answered within {self.timeout} s: {self._describe_servers()}")

    def _on_welcome(self, server: _Server, message: Welcome) -> None:
        fingerprint = message.fingerprint
        server.fingerprint = fingerprint
        expected = self._expected_fingerprint
        if expected is not None and fingerprint != expected:
            raise StateError(
                f"the state was saved from pipeline {expected}; server {server.address} serves {fingerprint}"
            )
        if self.class_names is None:
            self.class_names = message.classes
        if message.workers and server.parent is None:
            self._add_workers(server, message.workers)
        if self.fingerprint is None:
            self.fingerprint = fingerprint
        elif fingerprint != self.fingerprint:
            raise ProtocolError(
                f"server {server.address} serves pipeline {fingerprint}, but others serve {self.fingerprint}"
            )

    def _add_workers(self, server: _Server, addresses: Sequence[str]) -> None:
        """Connect to the worker processes of ``server`` that take requests themselves: their replies then come
        straight from them. Only addresses on the server's own host (``tcp://:PORT``), or ipc paths for a server
        reached over ipc, are used; requests go to the server itself while no worker is connected."""
        url = server.endpoint.url
        known = {worker.endpoint.url.address for worker in server.workers}
        for address in addresses[:MAX_WORKERS]:
            if (
                url.transport == "tcp"
                and address.startswith("tcp://:")
                and address[len("tcp://:") :].isdigit()
            ):
                host = url.address[len("tcp://") :].rsplit(":", 1)[0]
                target = f"zreq://{host}:{address[len('tcp://:') :]}"
            elif url.transport == "ipc" and address.startswith("ipc://"):
                target = "zreq+" + address
            else:
                log.debug("ignoring worker address %r of server %s", address, server.address)
                continue
            parsed = parse_url(target)
            if parsed.address in known:
                continue
            known.add(parsed.address)
            try:
                endpoint = open_endpoint(
                    self._context,
                    parsed,
                    queue=self.prefetch * _GROUP + 16,
                    monitor=True,
                    keys=self._keys,
                    max_message_size=self._max_message_size,
                    immediate=True,
                )
            except TensorcomError as error:
                log.info("cannot connect to a worker of server %s at %s: %s", server.address, target, error)
                continue
            worker = _Server(endpoint, shm=server.shm, parent=server, answered=True, alive=False)
            server.workers.append(worker)
            self._servers.append(worker)
            self._by_socket[endpoint.socket] = worker
            self._poller.register(endpoint.socket, zmq.POLLIN)

    def _poll_once(self, seconds: float) -> None:
        for socket, _ in self._poller.poll(int(seconds * 1000)):
            server = self._by_socket[socket]
            while True:  # every message the socket holds
                try:
                    header = socket.recv(_NOBLOCK)
                except zmq.Again:
                    break
                message = protocol.decode(header, f"server {server.address}")
                places = None
                if not socket.getsockopt(_RCVMORE):
                    frames: list[Any] = [header]
                elif isinstance(message, Batches):
                    data, places = self._group_data(socket, server, message)
                    frames = [header, data]
                else:
                    # From a server that sends shared-memory descriptors, messages are small: copies (bytes),
                    # not zmq.Frame objects, whose deallocation checks for signals and would swallow a Ctrl-C.
                    frames = [header, *receive(socket, copy=server.shm)]
                self._received = (header, message, places)  # so that _on_message does not decode it again
                self._on_message(server, frames)

    def _group_data(
        self, socket: zmq.Socket[Any], server: _Server, message: Batches
    ) -> tuple[memoryview, list[tuple[int, int]]]:
        """The data frame of a BATCHES message and where each array lies in it, checked against the length its
        headers announce (received into a buffer of that length from a server on this host, as :func:`receive`
        receives small frames; else as a zmq.Frame, without a copy)."""
        try:
            places, end = _layout(message, server)
        except ProtocolError:
            _drain(socket)
            raise
        if server.shm and end <= PREALLOCATE:
            buffer = bytearray(end)
            received = socket.recv_into(buffer)
            data = memoryview(buffer)
        else:
            frame = socket.recv(copy=False)
            data = frame.buffer
            received = data.nbytes
        extra = _drain(socket)
        if received != end or extra:
            raise ProtocolError(
                f"server {server.address} sent {message.count} batches whose headers announce {end} bytes in one "
                f"frame, in a data frame of {received} bytes and {extra} frames more"
            )
        return data, places

    def _on_message(self, server: _Server, frames: list[Any]) -> None:
        """A message from ``server``: its header frame, and the frames after it (one for BATCHES: its data)."""
        received, places = self._received, None
        if received is not None and received[0] is frames[0]:
            _, message, places = received
        else:
            message = protocol.decode(frames[0], f"server {server.address}")
        server.last_heard = time.monotonic()
        server.answered = True
        if not server.alive:
            log.info("server %s answers again", server.address)
            server.alive = True
        if isinstance(message, Batches):
            if places is None:
                places, end = _layout(message, server)
                if len(frames) != 2 or memoryview(frames[1]).nbytes != end:
                    raise ProtocolError(
                        f"server {server.address} sent a BATCHES message without its {end} bytes"
                    )
            self._on_batches(server, message, memoryview(frames[1]), places)
            return
        if isinstance(message, Pong):
            if message.workers and server.parent is None:
                self._add_workers(server, message.workers)
            return
        if isinstance(message, Welcome):
            self._on_welcome(server, message)
            return
        if not isinstance(message, Batch | End | Error):
            raise ProtocolError(f"server {server.address} sent an unexpected {message.command.name}")
        if message.gen != self._generation:
            self._release(server, frames[1:])
            return  # a reply to a request made before the last load_state
        step = message.step
        if step is None:
            raise ProtocolError(f"server {server.address} sent {message.command.name} without a step")
        server.outstanding.discard(step)
        self._asked.pop(step, None)
        server.stalled = False  # it answers steps again
        if isinstance(message, Error) and message.error is ErrorKind.BUSY:
            self._on_busy(server, message)
            return
        if isinstance(message, Error) and message.error is ErrorKind.UNAVAILABLE:
            if server.shutting_down:
                self._to_request = sorted({*self._to_request, step})
            else:
                server.shutting_down = True
                server.outstanding.add(step)  # so that _lose asks another server for it
                self._lose(server, "is shutting down")
            return
        if isinstance(message, Error):
            hello = message.request == "HELLO"
            where = "refused this connection" if hello else f"failed at step {step}"
            text = f"server {server.address} {where}: {message.message}"
            if message.error is ErrorKind.STATE:
                raise StateError(text)
            if message.error is ErrorKind.PROTOCOL:
                raise ProtocolError(text)
            if hello:
                raise RemoteError(text)
            self._replies.setdefault(step, (message, 0, []))
            return
        if isinstance(message, End):
            self._end_step = step if self._end_step is None else min(self._end_step, step)
            return
        server.busy_wait, server.busy_why = _BUSY_WAIT, ""  # it computes for us again
        if message.fingerprint != self.fingerprint:
            raise ProtocolError(
                f"server {server.address} now serves pipeline {message.fingerprint}, "
                f"not {self.fingerprint}: it was restarted with a different configuration"
            )
        if step < self._next_step or step in self._replies:
            self._release(server, frames[1:])
            return
        payload: Any = frames[1:]
        if _shm.is_descriptor(payload):
            if not server.shm:
                raise ProtocolError(
                    f"server {server.address} sent a shared-memory batch to a client that did not ask for one"
                )
            try:  # opened now, so that its slot is released even if the batch is dropped before recv()
                payload = self._reader.read(payload[0], f"server {server.address}")
            except _shm.StaleBatch as error:
                log.warning("%s; asking for step %d again", error, step)
                self._to_request = sorted({*self._to_request, step})
                return
        self._replies[step] = (message, 0, payload)

    def _on_batches(
        self, server: _Server, message: Batches, data: memoryview, places: list[tuple[int, int]]
    ) -> None:
        """Consecutive steps' batches in one message (array j's bytes at ``places[j]`` in ``data``): each is kept
        as a reply of its own, the .ten frames ``[header, view of data, ...]`` of its arrays."""
        if message.gen != self._generation:
            return  # replies to requests made before the last load_state (never in shared memory)
        first, count = message.step, message.count
        steps = range(first, first + count)
        server.outstanding.difference_update(steps)
        asked = self._asked
        for step in steps:
            asked.pop(step, None)
        server.stalled = False
        server.busy_wait, server.busy_why = _BUSY_WAIT, ""
        if message.fingerprint != self.fingerprint:
            raise ProtocolError(
                f"server {server.address} now serves pipeline {message.fingerprint}, "
                f"not {self.fingerprint}: it was restarted with a different configuration"
            )
        replies, next_step, tensors, arrays = self._replies, self._next_step, message.tensors, message.arrays
        for index, step in enumerate(steps):
            if step >= next_step and step not in replies:
                frames: list[Any] = []
                for array in range(index * arrays, (index + 1) * arrays):
                    offset, size = places[array]
                    frames += (tensors[array], data[offset : offset + size])
                replies[step] = (message, index, frames)

    def _release(self, server: _Server, frames: list[Any]) -> None:
        """Release the shared-memory slot of a reply that is dropped unread (late, or a duplicate)."""
        if server.shm and _shm.is_descriptor(frames):
            with contextlib.suppress(DecodeError):
                self._reader.read(frames[0], f"server {server.address}")

    def _on_busy(self, server: _Server, message: Error) -> None:
        """A server refused a HELLO or REQUEST because it is full (clients or queued requests): leave it aside for a
        while (longer each time in a row) and ask others, or it again then, for the refused steps."""
        now = time.monotonic()
        server.busy_until = now + server.busy_wait
        server.busy_wait = min(server.busy_wait * 2, _BUSY_WAIT_MOST)
        server.busy_why = message.message
        if message.request == "HELLO":
            server.greet_again = True
        else:
            first = message.step or 0
            steps = range(first, first + max(1, message.count or 1))
            server.outstanding.difference_update(steps)
            for step in steps:
                self._asked.pop(step, None)
            self._to_request = sorted({*self._to_request, *steps})
        _busy.note(
            server.address,
            "server %s is busy (%s); asking others, or it again in %.1f s",
            server.address,
            message.message,
            server.busy_until - now,
        )

    # the request window

    def _live(self) -> list[_Server]:
        """The servers that take requests now: a server's connected workers rather than the server itself."""
        now = time.monotonic()
        return [
            server
            for server in self._servers
            if server.alive
            and not server.shutting_down
            and not server.stalled
            and server.busy_until <= now
            and not any(worker.alive and not worker.stalled for worker in server.workers)
            and (server.parent is None or (server.parent.alive and not server.parent.shutting_down))
        ]

    def _fill_window(self) -> None:
        while True:
            in_flight = len(self._replies)
            for server in self._servers:
                in_flight += len(server.outstanding)
            room = self.prefetch * self._group - in_flight
            count = 1
            if self._to_request:
                step = self._to_request[0]
            elif (room >= self._group or (room > 0 and in_flight == 0)) and (
                self._end_step is None or self._next_request < self._end_step
            ):
                step = self._next_request
                count = min(room, self._group)
                if self._end_step is not None:
                    count = min(count, self._end_step - step)
            else:
                return
            if (
                step < self._next_step
                or step in self._replies
                or (self._end_step is not None and step >= self._end_step)
            ):
                self._to_request.pop(0)
                continue
            for server in sorted(self._live(), key=lambda s: len(s.outstanding)):
                if self._send(server, self._request(server, step, count)):
                    server.outstanding.update(range(step, step + count))
                    now = time.monotonic()
                    self._asked.update((asked, now) for asked in range(step, step + count))
                    break
            else:
                return  # no live server takes requests now; heartbeats will tell when one does
            if self._to_request and self._to_request[0] == step:
                self._to_request.pop(0)
            else:
                self._next_request += count

    def _lose(self, server: _Server, why: str) -> None:
        """Ask other servers for what ``server`` owed us, and wait for it to answer before using it again."""
        server.alive = False
        lost = sorted(server.outstanding)
        server.outstanding.clear()
        self._to_request = sorted(set(self._to_request) | set(lost))
        what = "server" if server.parent is None else f"a worker of server {server.parent.address} at"
        log.warning("%s %s %s; asking others for steps %s", what, server.address, why, lost)
        for worker in server.workers:
            if worker.outstanding:
                self._lose(worker, f"belongs to a server {why}")

    def _check_liveness(self) -> None:
        now = time.monotonic()
        for server in self._servers:
            server.endpoint.check_handshakes()
            if (
                server.endpoint.disconnects > server.disconnects
            ):  # its connection dropped: replies owed are lost
                server.disconnects = server.endpoint.disconnects
                server.shutting_down = False
                self._lose(server, "disconnected")
            if self.request_deadline is not None and server.outstanding:
                oldest = min(server.outstanding, key=lambda step: self._asked.get(step, now))
                if now - self._asked.get(oldest, now) > self.request_deadline:
                    server.stalled = True
                    self._lose(server, f"did not answer step {oldest} within {self.request_deadline:g} s")
            if server.parent is not None:  # a worker: up while connected; its server answers the pings
                if not server.alive and server.endpoint.peers > 0 and server.parent.alive:
                    server.alive = True
                continue
            if now - server.last_ping >= self.heartbeat:
                self._send(server, Ping())
                server.last_ping = now
            silent = now - max(server.last_heard, self._started_waiting)
            if server.alive and silent > self.dead_after:
                self._lose(server, f"silent for {silent:.1f} s")  # and what its workers owed us

    def _describe_servers(self) -> str:
        """Each server's address and whether it is up, down, or never answered (a wrong address, or not started)."""
        described = (  # a server striped over several sockets is named once per state its sockets are in
            f"{s.address} ({_server_state(s)})" for s in self._servers if s.parent is None
        )
        return ", ".join(dict.fromkeys(described))

    def recv(self) -> Any:
        """The next batch of the stream. Raises StopIteration at the end of a finite epoch."""
        self._ensure_open()
        self._reader.collect()  # slots of the batches dropped since the last call
        step = self._next_step
        self._started_waiting = time.monotonic()
        deadline = None if self.timeout is None else self._started_waiting + self.timeout
        while step not in self._replies:
            if self._end_step is not None and step >= self._end_step:
                self._finish_epoch()
                raise StopIteration
            self._check_liveness()
            self._fill_window()
            self._poll_once(min(self.heartbeat, 0.05) if step not in self._replies else 0)
            if step not in self._replies and deadline is not None and time.monotonic() > deadline:
                raise Timeout(
                    f"no batch for step {step} within {self.timeout} s from {self._describe_servers()}"
                )
        message, index, payload = self._replies.pop(step)
        self._next_step += 1
        self._fill_window()
        if isinstance(message, Error):
            raise RemoteError(f"server {message.server} failed at step {step}: {message.message}")
        try:
            arrays, infos = payload if isinstance(payload, tuple) else codec.decode(payload, infos=True)
        except ValueError as error:  # DecodeError, or any other ValueError a malformed batch raises
            raise DecodeError(f"malformed batch for step {step} from {message.server}: {error}") from None
        if isinstance(message, Batches):
            self._state_in = (message, index)  # rebuilt only if state() is asked for (see Batches.state_at)
            epoch, indices = message.epochs[index], message.indices[index]
        else:
            self._state, self._state_in = message.state, None
            epoch, indices = message.epoch, message.indices
        nbytes = 0
        for array in arrays:
            nbytes += array.nbytes
        self._group = _GROUP if nbytes < _SMALL_BATCH else 1
        self._last_epoch = epoch if isinstance(epoch, int) else self._last_epoch
        self.count += 1
        self.last = BatchInfo(
            endpoint=message.server or "",
            nbytes=nbytes,
            infos=infos,
            count=self.count,
            step=self._base_step + step,
            epoch=self._last_epoch,
            indices=list(indices),
        )
        return rebuild_batch(self.convert(arrays), message.kind, message.keys)

    def close(self) -> None:
        """Close every socket at once, those to servers' workers included."""
        for server in getattr(self, "_servers", []):
            if server.parent is not None:
                server.endpoint.close()
        super().close()

    def _finish_epoch(self) -> None:
        """After the last batch of a finite epoch, the next request starts the following epoch at position 0."""
        epoch = self._last_epoch if self._last_epoch is not None else _epoch_in(self._base.state) or 0
        self._restart(Base(epoch=epoch + 1))
        self._last_epoch = None


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the platform tells it, else the CPU count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _layout(message: Batches, server: _Server) -> tuple[list[tuple[int, int]], int]:
    """Where each array of a BATCHES message lies in its data frame, and the frame's length."""
    sizes = []
    for header in message.tensors:
        size = codec.data_size(header)
        if size is None:
            raise ProtocolError(
                f"server {server.address} sent a BATCHES message with a malformed .ten header"
            )
        sizes.append(size)
    places = message.layout(sizes)
    return places, places[-1][0] + places[-1][1] if places else 0


def _drain(socket: zmq.Socket[Any]) -> int:
    """Read and drop the rest of a message; return how many frames that was."""
    dropped = 0
    while socket.getsockopt(_RCVMORE):
        socket.recv(copy=False)
        dropped += 1
    return dropped


def _step_of(state: dict[str, Any]) -> int:
    """The absolute step of the batch after ``state``: its "step", else (format 1) its pipeline state's, else 0."""
    step = state.get("step")
    if step is None:
        pipeline = state.get("pipeline")
        step = pipeline.get("step") if isinstance(pipeline, dict) else None
        return step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else 0
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise StateError(f"the state's step must be an int >= 0. Found: {step!r}")
    return step


def _epoch_in(state: Any) -> int | None:
    """The first 'epoch' found in a pipeline state (its source's), or None."""
    if isinstance(state, dict):
        if isinstance(state.get("epoch"), int):
            return int(state["epoch"])
        values: Any = state.values()
    elif isinstance(state, list):
        values = state
    else:
        return None
    for value in values:
        found = _epoch_in(value)
        if found is not None:
            return found
    return None
