"""What a ``zrep`` worker computes: replies to HELLO and REQUEST messages from a pipeline factory.

:class:`RequestHandler` turns one request into an encoded reply (a BATCH with its tensor frames, an END, or an
ERROR); it runs in each worker process (:func:`worker_main`) or, with ``workers=0``, inside the front end. A handler
keeps recently used pipelines, so consecutive steps cost one ``next`` and others a random-access ``skip``. A
pipeline with a ``class_names`` attribute (label i named ``class_names[i]``) has them sent in the WELCOME.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import time
import traceback
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import msgpack
import zmq

from tensorcom import codec, protocol
from tensorcom._net import allocator, shm
from tensorcom._net.ratelog import RateLimitedLog
from tensorcom._net.security import Authenticator, ServerKeys
from tensorcom._net.transport import MAX_BATCH_FRAME, MAX_CONTROL_MESSAGE, send_parts
from tensorcom.errors import ConfigError, ProtocolError, StateError, TensorcomError
from tensorcom.protocol import (
    AnyMessage,
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
    flatten_batch,
)
from tensorcom.server._peers import (
    FRAME_BYTES,
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

__all__ = ["GROUP_BYTES", "Factory", "RequestHandler", "load_factory", "worker_main"]

log = logging.getLogger(__name__)

Factory = Callable[..., Any]
_CACHED_PIPELINES = 8
GROUP_BYTES = 4 << 20
"""Most bytes of batches one BATCHES message carries (the worker holds them until it is sent)."""


def load_factory(spec: str | Factory) -> Factory:
    """Return the factory named by ``"module:function"`` (or the callable itself)."""
    if callable(spec):
        return spec
    module_name, colon, name = str(spec).partition(":")
    if not colon or not module_name or not name:
        raise ConfigError(
            f"factory must be MODULE:FUNCTION, e.g. mypackage.data:make_pipeline. Found: {spec!r}"
        )
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"cannot import module {module_name!r} for factory {spec!r}: {error}") from error
    for part in name.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise ConfigError(f"module {module_name!r} has no attribute {name!r} (factory {spec!r})")
    if not callable(target):
        raise ConfigError(f"factory {spec!r} is not callable")
    return target


def _base_key(message: Hello | Request) -> bytes | str:
    """The cache key of a client configuration; any value a peer can send gives a key (bytes, odd map keys)."""
    config = [message.seed, message.rank, message.world_size, message.base.state, message.base.epoch]
    try:
        return msgpack.packb(
            config, use_bin_type=True
        )  # a peer's maps arrive in its order, the same every time
    except (TypeError, ValueError, OverflowError):
        return repr(config)


class RequestHandler:
    """Computes replies from requests: what a worker process (or a server with ``workers=0``) runs."""

    def __init__(self, factory: Factory, server: str = "") -> None:
        self.factory = factory
        self.server = server
        self._pipelines: OrderedDict[bytes | str, tuple[Any, int]] = OrderedDict()

    def _build(self, message: Hello | Request) -> Any:
        """The client's pipeline at its base (seed, rank, world size and base were checked when decoded)."""
        pipeline = self.factory(seed=message.seed, rank=message.rank, world_size=message.world_size)
        for method in ("next_with_meta", "load_state", "skip", "state"):
            if not hasattr(pipeline, method):
                raise ConfigError(
                    f"the factory returned a {type(pipeline).__name__}, which has no {method}(); "
                    "it must return a tensorcom pipeline (a Conveyer, Join or built PipelineBuilder)"
                )
        if message.base.state is not None:
            pipeline.load_state(message.base.state)
        elif message.base.epoch is not None:
            pipeline.set_epoch(message.base.epoch)
        return pipeline

    def _pipeline_at(
        self, message: Request, step: int, key: bytes | str | None = None
    ) -> tuple[bytes | str, Any]:
        """The client's pipeline positioned at ``step``, and its cache key (``key``, if known)."""
        if key is None:
            key = _base_key(message)
        pipeline, position = self._pipelines.pop(key, (None, 0))
        if pipeline is not None and position > step:
            pipeline.close()
            pipeline = None
        if pipeline is None:
            pipeline, position = self._build(message), 0
        if step > position:
            pipeline.skip(step - position)
        self._pipelines[key] = (pipeline, step)
        while len(self._pipelines) > _CACHED_PIPELINES:
            _, (old, _) = self._pipelines.popitem(last=False)
            old.close()
        return key, pipeline

    def _forget(self, message: AnyMessage) -> None:
        if not isinstance(message, Hello | Request):
            return
        pipeline, _ = self._pipelines.pop(_base_key(message), (None, 0))
        if pipeline is not None:
            pipeline.close()

    def handle(self, message: AnyMessage, arena: shm.Arena | None = None) -> tuple[bytes, list[Any]]:
        """Answer one HELLO or one step of a REQUEST (its ``step``) with (encoded header, tensor frames); errors
        become ERROR replies.

        With an ``arena``, a large batch goes into shared memory and its one frame is the descriptor.
        """
        step = message.step if isinstance(message, Request) else 0
        try:
            if isinstance(message, Hello):
                return self._welcome(message), []
            if not isinstance(message, Request):
                raise ProtocolError(f"a worker cannot handle {message.command.name}")
            computed = self._compute(message, step, arena)
            if isinstance(computed, bytes):
                return computed, []
            batch, encoded, frames, _ = computed
            return encoded or batch.encode(), frames
        except Exception as error:  # every failure becomes an ERROR reply; the server goes on
            return self._failed(message, step, error), []

    def answer(self, message: Request, arena: shm.Arena | None = None) -> list[tuple[list[Any], int, int]]:
        """Every reply to a REQUEST for ``count`` steps, as ``(parts, steps answered, bytes)``, in step order:
        consecutive batches sent from memory (not through shared memory) go together in one BATCHES message, up to
        :data:`GROUP_BYTES`; an ERROR or END, or a batch in shared memory, is a reply of its own."""
        if message.count == 1:
            header, frames = self.handle(message, arena)
            return [_sized([header, *frames], 1)]
        replies: list[tuple[list[Any], int, int]] = []
        group: list[Batch] = []
        group_frames: list[Any] = []
        group_bytes = arrays = 0
        key = _base_key(message)

        def close_group() -> None:
            nonlocal group, group_frames, group_bytes
            try:
                if len(group) == 1:
                    header = group[0].encode()
                    size = len(header) + group_bytes + sum(map(len, group_frames[0::2]))
                    replies.append(([header, *group_frames], 1, size))
                elif group:
                    tensors, data = Batches.pack(group_frames)
                    header = Batches.of(group, arrays, tensors).encode()
                    replies.append(([header, data], len(group), len(header) + len(data)))
            except Exception as error:  # a state msgpack cannot hold: each step of the group is an ERROR
                replies.extend(_sized([self._failed(message, batch.step, error)], 1) for batch in group)
            group, group_frames, group_bytes = [], [], 0

        for step in range(message.step, message.step + message.count):
            try:
                computed = self._compute(message, step, arena, key)
                if isinstance(computed, bytes):
                    close_group()
                    replies.append(_sized([computed], 1))
                    continue
                batch, encoded, frames, nbytes = computed
                if encoded is not None:  # in shared memory: its header is encoded, its frame a descriptor
                    close_group()
                    replies.append(_sized([encoded, *frames], 1))
                    continue
                if group and not _groups_with(group[0], batch, arrays, len(frames) // 2):
                    close_group()
                arrays = len(frames) // 2
                group.append(batch)
                group_frames.extend(frames)
                group_bytes += nbytes
                if group_bytes >= GROUP_BYTES:
                    close_group()
            except Exception as error:
                close_group()
                replies.append(_sized([self._failed(message, step, error)], 1))
        close_group()
        return replies

    def _welcome(self, message: Hello) -> bytes:
        pipeline = self._build(message)
        try:
            names = getattr(pipeline, "class_names", None)  # optional: label i is named names[i]
            reply = Welcome(
                fingerprint=pipeline.fingerprint,
                state=pipeline.state(),
                server=self.server,
                classes=None if names is None else tuple(str(name) for name in names),
            )
        finally:
            pipeline.close()
        return _encodable(reply)

    def _compute(
        self, message: Request, step: int, arena: shm.Arena | None, key: bytes | str | None = None
    ) -> bytes | tuple[Batch, bytes | None, list[Any], int]:
        """Step ``step`` of the client's stream: an encoded END, or its BATCH header, the header encoded where the
        batch went into shared memory (its one frame then the descriptor), its tensor frames and their bytes.
        Failures raise."""
        gen = message.gen
        key, pipeline = self._pipeline_at(message, step, key)
        try:
            batch, meta = pipeline.next_with_meta()
        except StopIteration:
            self._forget(message)
            return End(gen=gen, step=step, server=self.server).encode()
        self._pipelines[key] = (pipeline, step + 1)
        arrays, shape = flatten_batch(batch)
        frames = codec.encode(arrays)
        sizes = [memoryview(frame).nbytes for frame in frames[1::2]]
        largest = max(sizes, default=0)
        if largest > MAX_BATCH_FRAME:
            raise ConfigError(
                f"an array of {largest} bytes is larger than the {MAX_BATCH_FRAME}-byte frame limit; "
                "split it into several arrays"
            )
        header = Batch(
            gen=gen,
            step=step,
            epoch=int(meta.get("epoch", 0)),
            indices=[int(i) for i in meta.get("indices", [])],
            state=pipeline.state(),
            fingerprint=pipeline.fingerprint,
            server=self.server,
            **shape,
        )
        # A frame over the client's limit would make its socket drop the connection, and the client would ask
        # again forever: refuse it, unless the client reads the batch from shared memory.
        max_frame = message.max_frame
        too_large = None
        if max_frame is not None and largest > max_frame:
            too_large = replace(message, step=step, count=1).oversized(frames)
        if too_large is not None and not message.shm:
            raise ConfigError(too_large)
        nbytes = sum(sizes)
        # a chunk's framing adds at most 127 bytes: below that bound the arena refuses the batch, so do not ask it
        if arena is not None and nbytes + 128 * len(frames) >= arena.min_bytes:
            encoded = _encodable(header)  # before a slot is taken: this may fail
            descriptor = arena.put(frames)
            if descriptor is not None:
                return header, encoded, [descriptor], -1
        if too_large is not None:
            raise ConfigError(too_large)
        return header, None, frames, nbytes

    def _failed(self, message: AnyMessage, step: int, error: Exception) -> bytes:
        """The ERROR answering step ``step`` of ``message`` that raised ``error`` (the pipeline is forgotten)."""
        self._forget(message)
        kind = (
            ErrorKind.STATE
            if isinstance(error, StateError)
            else ErrorKind.PROTOCOL
            if isinstance(error, ProtocolError)
            else ErrorKind.PIPELINE
        )
        if kind is ErrorKind.PIPELINE and not isinstance(error, TensorcomError):
            log.warning(
                "pipeline error at step %s: %s",
                step,
                "".join(traceback.format_exception_only(error)).strip(),
            )
        text = f"{type(error).__name__}: {error}"
        if isinstance(message, Request) and message.step != step:
            message = replace(message, step=step, count=1)
        return Error.refusing(message, kind, text, self.server).encode()

    def close(self) -> None:
        """Close every cached pipeline (stopping their worker processes, if any)."""
        for pipeline, _ in self._pipelines.values():
            pipeline.close()
        self._pipelines.clear()


def _sized(parts: list[Any], steps: int) -> tuple[list[Any], int, int]:
    """``(parts, steps, bytes)`` of a reply."""
    return parts, steps, sum(memoryview(part).nbytes for part in parts)


def _groups_with(first: Batch, batch: Batch, arrays: int, batch_arrays: int) -> bool:
    """Whether ``batch`` may join the group that starts with ``first`` (of ``arrays`` arrays a batch)."""
    return (
        batch_arrays == arrays
        and batch.kind == first.kind
        and batch.keys == first.keys
        and batch.fingerprint == first.fingerprint
    )


def _encodable(message: Welcome | Batch) -> bytes:
    """``message`` encoded here, inside the handler's error handling (a hostile state can make a pipeline report
    values msgpack cannot hold): the failure becomes the request's ERROR reply instead of killing the worker."""
    return message.encode()


_PR_SET_PDEATHSIG = 1
_ALIVE_EVERY = 1.0  # seconds between a worker's signs of life to its front end
_READS_PER_TURN = 64  # client messages read from one socket before the next computation
_STEPS_PER_TURN = 8  # steps of one direct client's request computed (and answered together) in one turn
_CHECK_EVERY = 0.25  # seconds between looks for clients that do not read
# per reason: messages refused (too many frames, requests or clients), clients that do not read
_refused = RateLimitedLog(log)
_unanswered = RateLimitedLog(log)


def _die_with_parent() -> None:
    """Have the kernel kill this process with SIGKILL when the front end dies (Linux), even while a pipeline call
    never returns (a dead NFS mount, a FIFO nobody writes): the loop's own check runs only between requests."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the loop's check remains
        pass


def worker_main(
    factory: str | Factory,
    backend: str,
    identity: bytes,
    parent: int,
    server: str,
    listen: Sequence[str] = (),
    keys: ServerKeys | None = None,
    queue: int = 16,
    max_clients: int = 1024,
    stall_timeout: float | None = 10.0,
) -> None:
    """A worker process: take requests from the front end, and from clients directly on the ``listen`` addresses
    (its own ROUTER sockets, one per front-end URL), compute replies, until told to stop or orphaned.

    Its first message to the front end is READY followed by the addresses it listens on. Replies to direct
    requests go straight to the client (from the worker's memory, or its shared memory for a client on this host
    that asks for it): no front end in the way. The front end's requests and the clients' take turns, and clients
    take turns among themselves; one whose replies pile up unread (``OUTBOX``) gets nothing computed until it
    reads, so it cannot stall the others, and is dropped after ``stall_timeout`` seconds. Direct clients are
    bounded as the front end bounds its own (:mod:`tensorcom.server._peers`): ``max_clients`` of them, each with
    a budget of requests and replies.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front end decides when workers stop
    _die_with_parent()
    if os.getppid() != parent:  # it died before the line above took effect
        return
    allocator.tune()
    handler = RequestHandler(load_factory(factory), server)
    arena = shm.Arena() if shm.enabled() else None  # batches reach the front end through shared memory
    context: zmq.Context[Any] = zmq.Context()
    authenticator = Authenticator(context, keys, ", ".join(listen)) if keys is not None and listen else None
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.IDENTITY, identity)
    socket.setsockopt(zmq.LINGER, 1000)
    socket.setsockopt(zmq.SNDHWM, 8)
    socket.setsockopt(zmq.RCVHWM, 8)
    socket.setsockopt(zmq.MAXMSGSIZE, MAX_CONTROL_MESSAGE)
    socket.connect(backend)
    routers: list[zmq.Socket[Any]] = []
    addresses: list[bytes] = []
    for address in listen:
        router = context.socket(zmq.ROUTER)
        routers.append(router)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.SNDHWM, queue)
        router.setsockopt(zmq.RCVHWM, RECEIVE_QUEUE)
        router.setsockopt(zmq.MAXMSGSIZE, MAX_CONTROL_MESSAGE)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if not address:  # no address of its own for that URL: its clients go through the front end
            addresses.append(b"")
            continue
        if keys is not None:
            keys.apply(router)
        try:
            router.bind(address)
            addresses.append(router.getsockopt(zmq.LAST_ENDPOINT))
        except zmq.ZMQError as error:  # the front end's address still serves that client
            log.warning("worker %s cannot listen on %s (%s)", identity.decode(), address, error)
            addresses.append(b"")
    socket.send_multipart([b"READY", *addresses])
    poller = zmq.Poller()
    poller.register(socket, zmq.POLLIN)
    for router in routers:
        poller.register(router, zmq.POLLIN)
    where = f"worker {identity.decode()}"
    source = f"client of {where}"
    front: deque[tuple[bytes, AnyMessage]] = deque()  # the front end's requests: (route, message)
    peers = PeerTable(max_clients, stall_timeout)  # the direct clients' requests and replies
    decoder = Decoder()
    trimmer = Trimmer()
    front_turn = False  # whether the front end's requests go before the clients' on the next computation
    draining = False  # the front end drains: new direct requests are refused, those received are answered
    drained = False
    told_alive = last_check = time.monotonic()

    def answer(client: Key, message: AnyMessage) -> None:
        """Send a reply of the worker's own (PONG, ERROR) at once, or in the client's outbox while it has room;
        else drop it (the client does not read). Nothing is kept for a client unknown."""
        peer = peers.find(client)
        parts = [client[1], message.encode()]
        if peer is None or not peer.outbox:
            try:
                send_parts(routers[client[0]], parts, flags=zmq.NOBLOCK)
                return
            except zmq.Again:
                pass
            except zmq.ZMQError:  # gone
                return
        if peer is not None and peers.post(peer, parts, own=True):
            return
        _unanswered.note(
            (where, "unread"),
            "a client of %s does not read its replies: its messages go unanswered (a %s dropped)",
            where,
            message.command.name,
        )

    def flush(peer: Peer) -> None:
        while peer.outbox:
            try:
                send_parts(routers[peer.key[0]], peer.outbox[0][0], flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:  # the client is gone: so is what it asked for
                peers.drop(peer)
                return
            peers.sent(peer)
        peers.release(peer)

    def from_client(index: int) -> None:
        frames, dropped = receive_bounded(routers[index])
        client = (index, frames[0].bytes)
        if dropped:
            total = len(frames) - 1 + dropped
            _refused.note(
                (where, "frames"), "refused a message of %d frames from a %s (at most %d)", total, source, 1
            )
            text = f"a message to a worker has 1 frame; this one had {total}"
            answer(client, Error.refusing(None, ErrorKind.PROTOCOL, text, server))
            trimmer.check(
                peers.pending_bytes + peers.outbox_bytes, time.monotonic(), freed=dropped * FRAME_BYTES
            )
            return
        if len(frames) != 2:
            return
        try:
            message = protocol.decode(frames[1], source)
        except ProtocolError as error:
            answer(client, Error.refusing(None, ErrorKind.PROTOCOL, str(error), server))
            return
        if isinstance(message, Ping):
            answer(client, Pong(server=server))
            return
        if draining and isinstance(message, Hello | Request):
            text = f"server {server} is shutting down"
            answer(client, Error.refusing(message, ErrorKind.UNAVAILABLE, text, server))
            return
        if not isinstance(message, Hello | Request):
            text = f"a worker does not accept {message.command.name} messages"
            answer(client, Error.refusing(message, ErrorKind.PROTOCOL, text, server))
            return
        entry = Queued.of(message, frames[1].bytes)
        refusal = peers.refusal(client, entry)
        if refusal is not None:
            kind, text = refusal
            _refused.note((where, kind), "refusing requests from a %s: %s", source, text)
            answer(client, entry.error(kind, f"server {server}: {text}", server))
            return
        peer = peers.find(client) or peers.peer(client, connection_of(frames[0]))
        peers.queue(peer, entry)
        decoder.keep(entry, message)

    def next_peer() -> Peer | None:
        """The first client in turn that reads its replies (None: none)."""
        waiting = peers.waiting
        for _ in range(len(waiting)):
            peer = next(iter(waiting.values()))
            if peer.outbox_replies < OUTBOX:
                return peer
            waiting.move_to_end(peer.key)  # it does not read: the others go first
        return None

    def compute(message: AnyMessage, shared: shm.Arena | None) -> list[tuple[list[Any], int, int]]:
        """The replies to ``message`` (``[header, *tensor frames]`` each), the steps and the bytes of each."""
        try:
            if isinstance(message, Request):
                return handler.answer(message, shared)
            data, tensors = handler.handle(message, shared)
        except Exception as error:  # handle() answers errors itself; this keeps the worker alive regardless
            log.exception("%s: unexpected failure", where)
            text = f"{type(error).__name__}: {error}"
            data, tensors = Error.refusing(message, ErrorKind.PIPELINE, text, server).encode(), []
        return [_sized([data, *tensors], 1)]

    def compute_one() -> None:
        nonlocal front_turn
        peer = next_peer()
        if front and (peer is None or front_turn):
            front_turn = False
            route, message = front.popleft()
            for parts, steps, _ in compute(message, arena):
                send_parts(socket, [route, b"%d" % steps, *parts])
            return
        if peer is None:
            return
        front_turn = True
        entry = peers.take(peer, _STEPS_PER_TURN)
        try:
            message = decoder.message(entry, source)
        except ProtocolError as error:  # checked when received: cannot happen, but must not stop the worker
            refusals = entry.errors(ErrorKind.PROTOCOL, str(error), server)
            replies = [_sized([refusal.encode()], 1) for refusal in refusals]
        else:
            local = isinstance(message, Request) and message.shm and listen[peer.key[0]].startswith("ipc://")
            replies = compute(message, arena if local else None)
        for parts, steps, size in replies:
            peers.post(peer, [peer.key[1], *parts], replies=steps, size=size + len(peer.key[1]))
        flush(peer)

    def from_front_end(frames: list[bytes]) -> None:
        message = protocol.decode(frames[1], "front end")
        if len(frames) > 2 and isinstance(
            message, Request
        ):  # "step:count": some steps of a request for several
            step, _, count = frames[2].partition(b":")
            message = replace(message, step=int(step), count=int(count or 1))
        front.append((frames[0], message))

    try:
        while os.getppid() == parent:
            busy = bool(front) or any(peer.outbox_replies < OUTBOX for peer in peers.waiting.values())
            ready = dict(poller.poll(0 if busy else (10 if peers.sending else 500)))
            if socket in ready:
                stop = False
                while True:
                    try:
                        frames = socket.recv_multipart(zmq.NOBLOCK, copy=True)
                    except zmq.Again:
                        break
                    if frames == [b"STOP"]:
                        stop = True
                        break
                    if frames == [b"DRAIN"]:
                        draining = True
                        continue
                    from_front_end(frames)
                if stop:
                    break
            for index, router in enumerate(routers):
                reads = 0
                while router in ready and reads < _READS_PER_TURN and router.poll(0, zmq.POLLIN):
                    from_client(index)
                    reads += 1
            for peer in list(peers.sending.values()):
                flush(peer)
            now = time.monotonic()
            if now - told_alive >= _ALIVE_EVERY:  # the front end replaces a worker that stays silent (stuck)
                with contextlib.suppress(zmq.Again):
                    socket.send_multipart([b"ALIVE"], flags=zmq.NOBLOCK)
                told_alive = now
            if now - last_check >= _CHECK_EVERY:
                for peer in peers.stalled(now):
                    _unanswered.note(
                        (where, "stalled"),
                        "%s drops a client that has read nothing for %.0f s: %d replies and %d requests freed",
                        where,
                        now - peer.progress,
                        peer.outbox_replies,
                        peer.steps,
                    )
                    peers.drop(peer)
                    cut_connection(peer.connection)
                trimmer.check(peers.pending_bytes + peers.outbox_bytes, now)
                last_check = now
            if front or peers.waiting:
                compute_one()
            elif draining and not drained and not peers.sending:
                socket.send_multipart([b"DRAINED"])  # every direct request received has been answered
                drained = True
    finally:
        handler.close()
        socket.close()
        for router in routers:
            router.close(linger=2000 if drained else 0)  # a drained worker's last replies may still be queued
        if authenticator is not None:
            authenticator.stop()
        context.term()
        if arena is not None:
            arena.close(wait=1.0)
