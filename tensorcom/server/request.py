"""The ``zrep`` server of the deterministic request protocol: a ROUTER front end and worker processes.

::

    clients (DEALER)          front end (this process)                    workers (processes)
    zreq://host:7880  ──────► ROUTER ─ per-client queues ─ round robin ──► ROUTER ──ipc──► DEALER: factory(...)
                      ◄────── replies routed back by client identity ◄──────────────────── BATCH/END/ERROR
    with direct=True:
    zreq://host:PORTk ─────────────────────────────────────────────────────────────────► ROUTER of worker k
                      ◄──────────────────────────────────────────────────────────────── BATCH/END/ERROR

With ``direct=True`` (the tf.data-service split) each worker also listens on an address of its own (the front end's
host, a port of its own; or ``PATH.worker-k`` beside an ipc front end) and the front end names them in its WELCOME
and PONG replies. A client connects to them and sends its REQUESTs there: a reply leaves the worker's memory
straight for the client's socket, with no front end, no extra process hop and no copy beyond what the transport
makes. The front end keeps HELLO, PING (its liveness), supervision and the slow path: a client that cannot reach a
worker (a firewall, a port not exposed) keeps asking the front end, and gets the same batches. A worker restarted
after a crash listens on the port it had, so its clients reconnect; what it owed them is asked of others.

The front end answers PING itself, so a server busy computing still shows it is alive. It hands HELLO and REQUEST
messages to workers, at most ``worker_queue`` at a time each, taking clients in turn so every client (every rank of
every job) is served fairly. Workers are stateless between requests as far as the client can tell: any worker of
any server computes any step from (factory, seed, rank, world size, base, step). A worker keeps recently used
pipelines so consecutive steps cost one ``next`` and others a random-access ``skip``. A worker that dies is
restarted and its requests are given to another; a pipeline error becomes an ERROR reply for that step only.

Stopping with a drain (what SIGTERM does under ``tensorcom serve``) finishes the requests already received, answers
new ones with an ``unavailable`` ERROR (clients then ask other servers at once), and closes within the drain time.
With CURVE keys the front end accepts only allowed clients; the back end is an ipc socket in a private folder.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import tempfile
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import zmq

from tensorcom import codec, protocol
from tensorcom._net import allocator, shm
from tensorcom._net.ratelog import RateLimitedLog
from tensorcom._net.security import Authenticator, KeyPath, server_keys_from
from tensorcom._net.transport import (
    MAX_BATCH_FRAME,
    Endpoint,
    open_endpoint,
    parse_endpoints,
    send_parts,
)
from tensorcom.errors import ConfigError, DecodeError, ProtocolError
from tensorcom.protocol import AnyMessage, Error, ErrorKind, Hello, Message, Ping, Pong, Request, Welcome
from tensorcom.server._base import Server
from tensorcom.server._peers import (
    FRAME_BYTES,
    MOST_FRAMES,
    OUTBOX,
    RECEIVE_QUEUE,
    Decoder,
    Key,
    Peer,
    PeerTable,
    Queued,
    Trimmer,
    connection_of,
    cut_connection,
    receive_bounded,
)
from tensorcom.server.worker import Factory, RequestHandler, load_factory, worker_main
from tensorcom.urls import ParsedURL

__all__ = ["RequestServer"]

log = logging.getLogger(__name__)
# per endpoint and reason: clients that vanish with replies owed, messages refused, clients that do not read
_dropped = RateLimitedLog(log, logging.INFO)
_refused = RateLimitedLog(log)
_unanswered = RateLimitedLog(log)

_MAX_ATTEMPTS = 3
_STEPS_AT_ONCE = 8  # steps of one client's request handed to a worker (or computed inline) at once
_SHM_CLIENTS = 4096  # clients remembered as able to read shared memory
_LIMIT_DRAIN = 5.0  # seconds to answer the requests held once run()'s count or duration is reached
_SUN_PATH = 107  # longest unix socket path
_STOPPING_SIGNALS = frozenset({-signal.SIGTERM, -signal.SIGINT, -signal.SIGHUP})  # the exit codes they give


class _Worker:
    """The front end's record of one worker process and the requests it holds."""

    def __init__(self, index: int) -> None:
        self.identity = b"worker-%d" % index
        self.process: Any = None
        self.ready = False
        self.outstanding: dict[int, tuple[Peer, Queued]] = {}
        self.next_ticket = 0
        self.died: float | None = None  # when it was first seen dead (None: alive, or not looked at since)
        # where it takes requests from clients directly, per front-end URL ("": it does not)
        self.addresses: list[str] = []
        self.draining = False  # told to drain its direct clients' requests, and not done yet
        self.last_heard = 0.0  # when it last sent the front end anything (it says ALIVE every second)


class RequestServer(Server, sockets=("ROUTER",)):
    """Serve numbered batches of ``factory(seed=..., rank=..., world_size=...)`` to ``zreq`` clients: what
    ``Server(factory, "zrep://...")`` returns.

    Args:
        factory: a callable (module-level, so worker processes can import it) or ``"module:function"``.
        urls: ``zrep://`` URLs to bind (braces expand).
        workers: worker processes computing batches; 0 computes in this process (no extra hop, but a batch being
            computed delays heartbeat answers).
        worker_queue: requests handed to one worker at a time. With 4, a worker finishing a batch has the next
            requests waiting, instead of idling for a round trip through the front end (64 kB batches: about
            5.5k -> 8.5k batches/s with one or two workers); each may hold one finished batch in memory.
        queue: replies queued per client before sending blocks.
        report_interval: seconds between rate reports through ``logging``.
        server_key, client_keys: CURVE: this server's ``.key_secret`` file and the folder of allowed client
            ``NAME.key`` files (default: $TENSORCOM_SERVER_KEY and $TENSORCOM_CLIENT_KEYS; neither: plain). The
            workers' own sockets use the same keys.
        worker_deadline: seconds a worker may stay silent (stuck in the pipeline: a dead NFS mount, a FIFO nobody
            writes) before it is killed and replaced; its requests go to the others, its direct clients ask other
            servers. None: never.
        direct: workers take requests from clients on addresses of their own and reply directly (see the module
            docstring; the default); False: every request and reply passes through the front end (one port).
        max_clients: clients the front end (and each worker) keeps requests and replies for at once; a new client
            beyond them gets an ``unavailable`` ERROR (a zreq client asks another server) and a log line. A client
            with nothing queued holds no place.
        stall_timeout: seconds a client's replies may wait unread (its socket queue full and not moving) before
            the client is dropped: its queues freed, its connection shut. A zreq client never gets there (its
            receive queue holds its whole window). None: never.

    Memory (see :mod:`tensorcom.server._peers`): with C = ``max_clients``, q = ``queue``, W = ``workers``,
    w = ``worker_queue`` and B the largest reply (batch), what clients can make the front end hold is at most::

        requests waiting   2 × C × 32 KiB                (header bytes as received: 64 MiB at C = 1024)
        replies waiting    C × 4 × B  +  W × w × B       (outboxes; own replies count among the 4)
        libzmq queues      C × q × B  (replies)  +  connections × 3 × (header ≤ 1 MiB, or 64 B a frame)

    and each worker with ``direct`` the same with W × w replaced by the one reply it computes. Each client holds
    at most 256 steps and 2 MiB of requests, and 4 replies beyond its socket queue; a client that does not read
    for ``stall_timeout`` seconds gives all of it back, and so does one that leaves. Messages are read a frame at
    a time and at most 4 frames kept: a message of a million empty frames costs the 64 MB libzmq buffered for it
    (until it is read, about 0.6 µs a frame), not a list of a million objects.

    Shared memory (:mod:`tensorcom._net.shm`): workers hand batches to the front end through shared memory; a client
    that connects over ``ipc://`` and says it can read shared memory gets the descriptor itself, and the batch
    never passes through a socket. Others get the batch as frames sent from the shared memory without a copy.
    ``TENSORCOM_SHM=0`` turns this off.
    """

    def __init__(
        self,
        factory: str | Factory,
        urls: str | Sequence[str] = "zrep://127.0.0.1:7880",
        *,
        workers: int = 2,
        worker_queue: int = 4,
        queue: int = 16,
        report_interval: float = 10.0,
        name: str | None = None,
        server_key: KeyPath | None = None,
        client_keys: KeyPath | None = None,
        direct: bool = True,
        worker_deadline: float | None = 300.0,
        max_clients: int = 1024,
        stall_timeout: float | None = 10.0,
    ) -> None:
        super().__init__(report_interval)
        if workers < 0:
            raise ConfigError(f"workers must be >= 0. Found: {workers}")
        if worker_queue < 1:
            raise ConfigError(f"worker_queue must be >= 1. Found: {worker_queue}")
        self.factory = factory
        load_factory(factory)  # fail now, not in a worker
        self.workers = workers
        self.worker_queue = worker_queue
        if worker_deadline is not None and worker_deadline <= 0:
            raise ConfigError(f"worker_deadline must be > 0 seconds or None. Found: {worker_deadline}")
        self.worker_deadline = worker_deadline
        if max_clients < 1:
            raise ConfigError(f"max_clients must be >= 1. Found: {max_clients}")
        if stall_timeout is not None and stall_timeout <= 0:
            raise ConfigError(f"stall_timeout must be > 0 seconds or None. Found: {stall_timeout}")
        self.max_clients = max_clients
        self.stall_timeout = stall_timeout
        self.direct = direct and workers > 0
        self.queue = queue
        parsed = parse_endpoints(urls, {"ROUTER"}, "request Server")
        keys = self._keys = server_keys_from(server_key, client_keys)
        allocator.tune()  # small batches: no heap shrink-and-regrow per batch
        self._context: zmq.Context[Any] = zmq.Context()
        self._authenticator: Authenticator | None = None
        self._frontends: list[Endpoint] = []
        self._folder = tempfile.TemporaryDirectory(prefix="tensorcom-server-")
        self._processes: list[_Worker] = []
        self._handler: RequestHandler | None = None
        self._stopping = False
        self._last_check = 0.0
        self.draining = False
        try:
            if keys is not None:  # before binding: no client may connect before the allow-list is in force
                self._authenticator = Authenticator(self._context, keys, ", ".join(url.url for url in parsed))
            for url in parsed:
                endpoint = open_endpoint(self._context, url, queue=queue, monitor=True, keys=keys)
                endpoint.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
                endpoint.socket.setsockopt(
                    zmq.RCVHWM, RECEIVE_QUEUE
                )  # before any client: it is not ready yet
                self._frontends.append(endpoint)
        except BaseException:
            self.close()
            raise
        if self._authenticator is not None:
            self._authenticator.where = ", ".join(self.endpoints)
        self.name = name or f"{os.uname().nodename}:{os.getpid()}"
        self._backend = self._context.socket(zmq.ROUTER)
        self._backend.setsockopt(zmq.LINGER, 0)
        self._backend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._backend.setsockopt(zmq.MAXMSGSIZE, MAX_BATCH_FRAME)
        self._backend_address = f"ipc://{self._folder.name}/workers"
        self._backend.bind(self._backend_address)
        # what is queued for each client: its requests waiting for a worker, its replies waiting for its socket
        self._peers = PeerTable(max_clients, stall_timeout)
        self._pending = self._peers.waiting  # the clients with requests waiting, in turn
        self._decoder = Decoder()
        self._trimmer = Trimmer()
        self._reader = shm.Reader()
        self._arena: shm.Arena | None = None  # for batches computed here (workers=0)
        self._shm = shm.enabled()
        self._shm_clients: OrderedDict[tuple[int, bytes], None] = OrderedDict()
        # the clients that greeted or pinged lately (newest last, at most max_clients): told at once when a worker
        # becomes ready, rather than at their next PING (a second later, when all of start-up ran on one worker)
        self._greeted: OrderedDict[tuple[int, bytes], None] = OrderedDict()

    def _addresses(self) -> list[tuple[ParsedURL, str]]:
        return [(endpoint.url, endpoint.address) for endpoint in self._frontends]

    # worker supervision

    def _start_worker(self, worker: _Worker) -> None:
        context = multiprocessing.get_context("spawn")
        listen = (
            [self._worker_address(i, endpoint, worker) for i, endpoint in enumerate(self._frontends)]
            if self.direct
            else []
        )
        worker.process = context.Process(
            target=worker_main,
            args=(self.factory, self._backend_address, worker.identity, os.getpid(), self.name),
            kwargs={
                "listen": listen,
                "keys": self._keys,
                "queue": self.queue,
                "max_clients": self.max_clients,
                "stall_timeout": self.stall_timeout,
            },
            name=f"tensorcom-{worker.identity.decode()}",
            daemon=True,
        )
        worker.ready = False
        worker.died = None
        worker.process.start()

    @staticmethod
    def _worker_address(index: int, endpoint: Endpoint, worker: _Worker) -> str:
        """Where a worker listens for the clients of front-end URL ``index``: the same host on a port of its own
        (after a restart, the one it had, so clients reconnect), or an ipc path beside the front end's ("": none)."""
        address = endpoint.address
        known = worker.addresses[index] if index < len(worker.addresses) else ""
        if address.startswith("tcp://"):
            host = address[len("tcp://") :].rsplit(":", 1)[0]
            port = known.rsplit(":", 1)[1] if known.startswith("tcp://") else "0"
            return f"tcp://{host}:{port}"
        if address.startswith("ipc://"):
            path = f"{address}.{worker.identity.decode()}"
            return path if len(os.fsencode(path)) - len("ipc://") <= _SUN_PATH else ""
        return ""

    def _supervise(self) -> None:
        """Restart the workers that died, their requests given to the others; while stopping, let them go.

        A SIGTERM to the whole process group (a process manager stopping the group) reaches the workers too and may
        kill one before this process's handler has run (:meth:`stop`). So whether the server is stopping is read
        only after a death was seen, and a worker that a stopping signal killed is restarted only if the server is
        still not stopping on the next round (0.25 s later): a worker cannot die of a signal sent to the group
        before the signal is pending here too, and its handler runs well within that time.
        """
        now = time.monotonic()
        for worker in self._processes:
            if (
                self.worker_deadline is not None
                and worker.ready
                and worker.process is not None
                and worker.process.is_alive()
                and now - worker.last_heard > self.worker_deadline
            ):
                log.warning(
                    "worker %s silent for %.0f s (stuck in the pipeline?): replacing it",
                    worker.identity.decode(),
                    now - worker.last_heard,
                )
                worker.process.kill()
                worker.process.join(timeout=5)
            if worker.process is None or worker.process.is_alive():
                continue
            code = worker.process.exitcode
            first_look = worker.died is None
            if first_look:  # its requests go to the others at once; it gets no more
                self._release(worker)
                worker.died = now
            if self.stopping:
                if first_look:
                    log.debug("worker %s ended (exit code %s) while stopping", worker.identity.decode(), code)
                continue
            if first_look and code in _STOPPING_SIGNALS:
                continue
            log.warning("worker %s died (exit code %s); restarting it", worker.identity.decode(), code)
            self._start_worker(worker)
        if self.stopping and self._processes and not any(w.died is None for w in self._processes):
            self._refuse_pending(f"server {self.name} is shutting down and has no worker left")

    def _release(self, worker: _Worker) -> None:
        """Give a dead worker's requests back to the queue (its slot files swept); it gets no more.

        A worker computes its requests in turn: only the oldest was running when it died; the others go back
        without blame (three deaths in a row make a request an ERROR).
        """
        for rank, ticket in enumerate(sorted(worker.outstanding, reverse=True)):
            peer, entry = worker.outstanding[ticket]
            peer.working -= 1
            if rank == len(worker.outstanding) - 1:  # the oldest
                entry.attempts += 1
            self._requeue(peer, entry)
        worker.outstanding.clear()
        worker.ready = False
        shm.sweep()  # its slot files

    def _refuse_pending(self, text: str) -> None:
        """Answer every request waiting for a worker with an ``unavailable`` ERROR (clients ask elsewhere)."""
        for peer in list(self._peers.waiting.values()):
            for entry in self._peers.clear_pending(peer):
                for error in entry.errors(ErrorKind.UNAVAILABLE, text, self.name):
                    self._reply(peer, error, [])

    def _requeue(self, peer: Peer, entry: Queued) -> None:
        """Queue a request again, first in its client's turn (a worker died with it); after three deaths it is an
        ERROR."""
        if peer.dropped:
            return
        if entry.attempts >= _MAX_ATTEMPTS:
            text = f"the request killed {entry.attempts} worker processes in a row"
            for error in entry.errors(ErrorKind.PIPELINE, text, self.name):
                self._reply(peer, error, [])
            return
        self._peers.queue(peer, entry, first=True)

    # front end

    def _reply(self, peer: Peer, header: AnyMessage | bytes, frames: Sequence[Any], steps: int = 1) -> None:
        """Send a reply to ``steps`` of a client's requests without blocking the front end: one that the client's
        full socket queue refuses waits in its outbox (see :meth:`_flush`); one to a client that has gone is
        dropped."""
        data = header if isinstance(header, bytes) else header.encode()
        if shm.is_descriptor(frames):
            self.nbytes += shm.payload_size(frames[0])
        else:
            self.nbytes += sum(len(f) for f in frames[1::2])
        if frames:
            self.served += steps
        self._peers.post(peer, [peer.key[1], data, *frames], replies=steps)
        self._flush(peer)

    def _answer(self, client: Key, message: AnyMessage) -> None:
        """Send a reply the front end writes itself (a PONG, an ERROR refusing a message): at once if the client's
        socket queue takes it, else in its outbox while that holds fewer than ``OUTBOX`` replies; else it is
        dropped (the client does not read), with a rate-limited log line. Nothing is kept for a client unknown."""
        endpoint = self._frontends[client[0]]
        peer = self._peers.find(client)
        parts = [client[1], message.encode()]
        if peer is None or not peer.outbox:
            try:
                send_parts(endpoint.socket, parts, flags=zmq.NOBLOCK)
                return
            except zmq.Again:
                pass
            except zmq.ZMQError:  # gone
                return
        if peer is not None and self._peers.post(peer, parts, own=True):
            return
        _unanswered.note(
            (endpoint.address, "unread"),
            "a client of %s does not read its replies: its messages go unanswered (a %s dropped)",
            endpoint,
            message.command.name,
        )

    def _flush(self, peer: Peer) -> None:
        """Send what waits in a client's outbox, in order, until its socket queue is full again; forget the client
        once nothing is queued for it."""
        endpoint = self._frontends[peer.key[0]]
        while peer.outbox:
            try:
                send_parts(endpoint.socket, peer.outbox[0][0], flags=zmq.NOBLOCK)
            except zmq.Again:  # its queue is full: the client is busy; try again on the next turn
                return
            except zmq.ZMQError as error:  # the client is gone (EHOSTUNREACH): so is what it asked for
                _dropped.note(
                    (endpoint.address, str(error)),
                    "dropping %d replies and %d requests of a client of %s: %s",
                    peer.outbox_replies,
                    peer.steps,
                    endpoint,
                    error,
                )
                self._drop(peer)
                return
            self._peers.sent(peer)
        self._peers.release(peer)

    def _drop(self, peer: Peer) -> None:
        """Forget a client: its queues are freed, its shared-memory slots released; what workers compute for it
        is discarded."""
        for parts in self._peers.drop(peer):
            self._discard(parts[2:])

    def _drop_stalled(self, now: float) -> None:
        """Drop the clients whose outbox has not moved for ``stall_timeout`` seconds, and shut their connections
        (libzmq then frees the replies it queued for them)."""
        for peer in self._peers.stalled(now):
            endpoint = self._frontends[peer.key[0]]
            _unanswered.note(
                (endpoint.address, "stalled"),
                "dropping a client of %s that has read nothing for %.0f s: %d replies (%d bytes) and %d requests "
                "freed",
                endpoint,
                now - peer.progress,
                peer.outbox_replies,
                peer.outbox_bytes,
                peer.steps,
            )
            self._drop(peer)
            cut_connection(peer.connection)

    def _materialize(self, descriptor: Any) -> list[Any]:
        """The frames of a batch in shared memory (views: the slot is released once they have been sent)."""
        arrays, infos = self._reader.read(descriptor, "a worker")
        return codec.encode(arrays, infos)

    def _discard(self, frames: Sequence[Any]) -> None:
        """Release the shared-memory slot of a reply that will not be sent."""
        if shm.is_descriptor(frames):
            with contextlib.suppress(DecodeError):
                self._reader.read(frames[0], "a worker")

    def _receive_client(self, index: int) -> None:
        endpoint = self._frontends[index]
        frames, dropped = receive_bounded(endpoint.socket)
        client = (index, frames[0].bytes)
        if dropped:
            total = len(frames) - 1 + dropped
            _refused.note(
                (endpoint.address, "frames"),
                "refused a message of %d frames from a client of %s (at most %d)",
                total,
                endpoint,
                MOST_FRAMES - 1,
            )
            text = f"a message has at most {MOST_FRAMES - 1} frames; this one had {total}"
            self._answer(client, Error.refusing(None, ErrorKind.PROTOCOL, text, self.name))
            self._trimmer.check(self._held(), time.monotonic(), freed=dropped * FRAME_BYTES)
            return
        if len(frames) < 2:
            return
        header: Message | None = None
        try:  # the header first, so that a request with a bad field gets an ERROR echoing its gen and step
            header = Message.decode(frames[1], f"client of {endpoint}")
            message = header.typed(f"client of {endpoint}")
        except ProtocolError as error:
            self._answer(client, Error.refusing(header, ErrorKind.PROTOCOL, str(error), self.name))
            return
        if self.direct and isinstance(message, Ping | Hello):
            self._greet(client)
        if isinstance(message, Ping):
            workers = self._worker_addresses(index) if self.direct else None
            self._answer(client, Pong(server=self.name, workers=workers or None))
            return
        if not isinstance(message, Hello | Request):
            text = f"a server does not accept {message.command.name} messages"
            self._answer(client, Error.refusing(message, ErrorKind.PROTOCOL, text, self.name))
            return
        if self.draining:
            text = f"server {self.name} is shutting down"
            self._answer(client, Error.refusing(message, ErrorKind.UNAVAILABLE, text, self.name))
            return
        entry = Queued.of(message, frames[1].bytes)
        refusal = self._peers.refusal(client, entry)
        if refusal is not None:
            kind, text = refusal
            _refused.note(
                (endpoint.address, kind), "refusing requests from a client of %s: %s", endpoint, text
            )
            self._answer(client, entry.error(kind, f"server {self.name}: {text}", self.name))
            return
        if (
            isinstance(message, Request)
            and message.shm
            and endpoint.url.transport == "ipc"
            and client not in self._shm_clients
        ):
            self._shm_clients[client] = None  # it shares this host and reads shared memory
            while len(self._shm_clients) > _SHM_CLIENTS:
                self._shm_clients.popitem(last=False)
        peer = self._peers.find(client) or self._peers.peer(client, connection_of(frames[0]))
        self._peers.queue(peer, entry)
        if not self.workers:
            self._decoder.keep(entry, message)

    def _dispatch(self) -> None:
        """Hand pending requests to workers with room, one client at a time in turn; a client whose outbox is full
        (it does not read) waits its turn until it reads."""
        waiting = self._peers.waiting
        skipped = 0
        while waiting and skipped < len(waiting):
            if self.workers:
                free = [w for w in self._processes if w.ready and len(w.outstanding) < self.worker_queue]
                if not free:
                    return
                worker = min(free, key=lambda w: len(w.outstanding))
            peer = next(iter(waiting.values()))
            if peer.outbox_replies >= OUTBOX:  # it does not read: compute nothing more for it
                waiting.move_to_end(peer.key)
                skipped += 1
                continue
            skipped = 0
            entry = self._peers.take(peer, _STEPS_AT_ONCE)
            if not self.workers:
                self._handle_inline(peer, entry)
                continue
            ticket = worker.next_ticket
            worker.next_ticket += 1
            worker.outstanding[ticket] = (peer, entry)
            peer.working += 1
            route = b"%d:%d:" % (peer.key[0], ticket) + peer.key[1]
            try:
                steps = b"%d:%d" % (entry.step, entry.count)
                self._backend.send_multipart([worker.identity, route, entry.header, steps])
            except zmq.ZMQError as error:  # the worker died since it last spoke (EHOSTUNREACH)
                log.info(
                    "worker %s is gone (%s); its requests wait for another", worker.identity.decode(), error
                )
                del worker.outstanding[ticket]
                peer.working -= 1
                worker.ready = False  # supervision restarts it; until then it gets nothing
                self._requeue(peer, entry)

    def _handle_inline(self, peer: Peer, entry: Queued) -> None:
        if self._handler is None:
            self._handler = RequestHandler(load_factory(self.factory), self.name)
        arena = None
        if peer.key in self._shm_clients and self._shm:
            if self._arena is None:
                self._arena = shm.Arena()
            arena = self._arena
        try:
            request = self._decoder.message(entry, "a client")
        except ProtocolError as error:  # checked when received: cannot happen, but must not stop the server
            for refusal in entry.errors(ErrorKind.PROTOCOL, str(error), self.name):
                self._reply(peer, refusal, [])
            return
        if isinstance(request, Request):  # its steps, small batches together in one BATCHES message
            peer.working += 1  # the client is not forgotten between the replies (see PeerTable.release)
            try:
                for parts, steps, _ in self._handler.answer(request, arena):
                    self._reply(peer, parts[0], parts[1:], steps)
            finally:
                peer.working -= 1
            self._flush(peer)
            return
        reply, tensors = self._handler.handle(request, arena)
        self._reply(peer, reply, tensors)

    def _receive_worker(self) -> None:
        frames = self._backend.recv_multipart(copy=False)
        identity = frames[0].bytes
        worker = next((w for w in self._processes if w.identity == identity), None)
        if worker is None:
            return
        worker.last_heard = time.monotonic()
        if frames[1].bytes == b"ALIVE":
            return
        if frames[1].bytes == b"DRAINED":
            worker.draining = False
            return
        if frames[1].bytes == b"READY":
            worker.ready = True
            worker.addresses = [frame.bytes.decode(errors="replace") for frame in frames[2:]]
            log.debug(
                "worker %s ready (%s)", identity.decode(), ", ".join(worker.addresses) or "via the front end"
            )
            if self.direct:
                self._announce_workers()
            return
        # [route, steps answered, header, *tensor frames]: one of the replies to the steps handed over with a ticket
        ticket = int(frames[1].bytes.split(b":", 2)[1])
        held = worker.outstanding.get(ticket)
        if held is None:
            self._discard(frames[4:])
            return
        peer, entry = held
        steps = int(frames[2].bytes)
        first = entry.step
        entry.step += steps  # what is left of it goes to another worker if this one dies
        entry.count -= steps
        if entry.count <= 0:
            del worker.outstanding[ticket]
            peer.working -= 1
        if peer.dropped:  # a client dropped meanwhile: nobody to send it to
            self._discard(frames[4:])
            return
        replies = frames[4:]
        if shm.is_descriptor(replies) and peer.key not in self._shm_clients:
            try:  # send the batch itself, from the worker's shared memory without a copy
                replies = self._materialize(replies[0])
            except DecodeError as error:
                log.warning(
                    "cannot read a batch from worker %s (%s); computing it again", identity.decode(), error
                )
                again = Queued(entry.header, entry.hello, entry.gen, first, steps, entry.attempts + 1)
                self._requeue(peer, again)
                return
        header = frames[3].bytes
        if self.direct and entry.hello:
            header = self._with_workers(header, peer.key[0])
        self._reply(peer, header, replies, steps)

    def _greet(self, client: tuple[int, bytes]) -> None:
        """Remember ``client`` as one to tell when a worker becomes ready (the newest ``max_clients``)."""
        self._greeted[client] = None
        self._greeted.move_to_end(client)
        while len(self._greeted) > max(self._peers.max_clients, 1):
            self._greeted.popitem(last=False)

    def _announce_workers(self) -> None:
        """Tell every client that greeted lately where the ready workers are, in an unasked PONG: a client then
        spreads its requests over a worker that has just started (or replaced one) at once. Sent only where the
        client's socket queue takes it (else its next PING tells it); a client that has gone is forgotten."""
        pongs: dict[int, bytes | None] = {}  # one PONG per front-end URL, whatever the number of clients
        for client in list(self._greeted):
            index = client[0]
            if index not in pongs:
                addresses = self._worker_addresses(index)
                pongs[index] = Pong(server=self.name, workers=addresses).encode() if addresses else None
            pong = pongs[index]
            if pong is None:
                continue
            try:
                send_parts(self._frontends[index].socket, [client[1], pong], flags=zmq.NOBLOCK)
            except zmq.Again:
                pass
            except zmq.ZMQError:  # it has gone (EHOSTUNREACH)
                del self._greeted[client]

    def _with_workers(self, header: bytes, index: int) -> bytes:
        """A worker's WELCOME with the addresses of this server's workers (see :meth:`_worker_addresses`)."""
        message = protocol.decode(header, "a worker")
        addresses = self._worker_addresses(index)
        if not isinstance(message, Welcome) or not addresses:
            return header
        return replace(message, workers=addresses).encode()

    def _worker_addresses(self, index: int) -> tuple[str, ...]:
        """Where the ready workers take requests from the clients of front-end URL ``index`` (a TCP address
        without its host: the client uses the host it reached this server at)."""
        addresses = []
        for worker in self._processes:
            address = worker.addresses[index] if worker.ready and index < len(worker.addresses) else ""
            if address.startswith("tcp://"):
                addresses.append("tcp://:" + address.rsplit(":", 1)[1])
            elif address:
                addresses.append(address)
        return tuple(addresses)

    def run(self, count: int | None = None, duration: float | None = None) -> int:
        """Serve until :meth:`stop`, an interrupt (KeyboardInterrupt closes at once), ``count`` batches served or
        ``duration`` seconds; then close. Returns the number of batches served.

        After ``count`` or ``duration``, the requests already received are still answered (for at most 5 s), so
        a client is not left waiting for replies it was promised: more than ``count`` batches may be served."""
        self._check_run_limits(count, duration)
        self._processes = [_Worker(i) for i in range(self.workers)]
        for worker in self._processes:
            self._start_worker(worker)
        poller = zmq.Poller()
        for endpoint in self._frontends:
            poller.register(endpoint.socket, zmq.POLLIN)
        poller.register(self._backend, zmq.POLLIN)
        self._indices = {endpoint.socket: index for index, endpoint in enumerate(self._frontends)}
        started = self._last_check = time.monotonic()
        linger = 0.0
        log.info(
            "serving %s on %s with %d workers", self._factory_name(), ", ".join(self.endpoints), self.workers
        )
        try:
            while not self._stop_requested and (count is None or self.served < count):
                if duration is not None and time.monotonic() - started >= duration:
                    break
                self._serve_once(poller)
                self._maybe_report()
            if not self._stop_requested:  # count or duration reached: answer the requests already received
                linger = self._finish(poller, _LIMIT_DRAIN)
            elif self._drain is not None:
                linger = self._finish(poller, self._drain)
        finally:
            self.close(linger=linger)
        return self.served

    def _serve_once(self, poller: zmq.Poller) -> None:
        self._reader.collect()  # slots of the batches the sockets have finished sending
        for peer in list(self._peers.sending.values()):
            self._flush(peer)
        # a full client queue: look again soon
        for socket, _ in poller.poll(1 if self._peers.sending else 100):
            if socket is self._backend:
                self._receive_worker()
            else:
                self._receive_client(self._indices[socket])
        self._dispatch()
        now = time.monotonic()
        if now - self._last_check > 0.25:
            self._supervise()
            self._drop_stalled(now)
            self._trimmer.check(self._held(), now)
            for endpoint in self._frontends:
                endpoint.count_peers()  # logs the clients refused meanwhile
            self._last_check = now

    def _held(self) -> int:
        """Bytes of the requests and replies queued for clients."""
        return self._peers.pending_bytes + self._peers.outbox_bytes

    @property
    def in_flight(self) -> int:
        """Requests received and not answered yet (queued, or being computed by a worker)."""
        queued = sum(peer.steps for peer in self._peers.waiting.values())
        queued += sum(peer.outbox_replies for peer in self._peers.sending.values())
        queued += sum(worker.draining and worker.process.is_alive() for worker in self._processes)
        return queued + sum(len(worker.outstanding) for worker in self._processes)

    def _finish(self, poller: zmq.Poller, seconds: float) -> float:
        """Answer the requests already received (new ones get an ``unavailable`` ERROR) for at most ``seconds``;
        return the time left, which the sockets then get to send the last replies."""
        self.draining = True
        for worker in self._processes if self.direct else []:  # they answer their direct requests too
            if worker.ready:
                try:
                    self._backend.send_multipart([worker.identity, b"DRAIN"], flags=zmq.NOBLOCK)
                    worker.draining = True
                except zmq.ZMQError:
                    pass
        deadline = time.monotonic() + seconds
        log.info("draining: finishing %d requests (at most %.1f s)", self.in_flight, seconds)
        while self.in_flight and time.monotonic() < deadline:
            self._serve_once(poller)
        if self.in_flight:
            log.warning("drain time over after %.1f s: dropping %d requests", seconds, self.in_flight)
        else:
            log.info("drained")
        return max(0.0, deadline - time.monotonic())

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called (or the server is closing)."""
        return self._stop_requested or self._stopping

    def _factory_name(self) -> str:
        factory = self.factory
        return (
            factory
            if isinstance(factory, str)
            else f"{factory.__module__}:{getattr(factory, '__qualname__', factory)}"
        )

    def close(self, linger: float | None = None) -> None:
        """Stop the workers (asking first, then terminating, then killing) and close every socket, giving replies
        already queued up to ``linger`` seconds to leave."""
        linger = linger or 0.0
        self._stopping = True
        for worker in self._processes:
            if worker.process is None or not worker.process.is_alive():
                continue
            if not worker.ready:  # not connected yet: it would never read a STOP
                worker.process.terminate()
                continue
            try:
                self._backend.send_multipart([worker.identity, b"STOP"], flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        deadline = time.monotonic() + 5
        for worker in self._processes:
            if worker.process is None:
                continue
            worker.process.join(timeout=max(0.1, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.terminate()
                worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(timeout=5)
        self._processes = []
        if self._handler is not None:
            self._handler.close()
            self._handler = None
        arena: shm.Arena | None = getattr(self, "_arena", None)
        if arena is not None:
            arena.close(wait=min(linger, 1.0))
            self._arena = None
        if hasattr(self, "_reader"):
            self._reader.close()
        for endpoint in self._frontends:
            endpoint.count_peers()  # log the clients refused since the last look
            endpoint.close(linger=min(linger, 5.0))
        self._frontends = []
        if hasattr(self, "_backend"):
            self._backend.close(linger=0)
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None
        if not self._context.closed:
            self._context.term()
        self._folder.cleanup()
