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
from tensorcom._net.security import Authenticator, ServerKeys
from tensorcom._net.transport import MAX_BATCH_FRAME, MAX_CONTROL_MESSAGE, send_parts
from tensorcom.errors import ConfigError, ProtocolError, StateError, TensorcomError
from tensorcom.protocol import (
    AnyMessage,
    Batch,
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

__all__ = ["Factory", "RequestHandler", "load_factory", "worker_main"]

log = logging.getLogger(__name__)

Factory = Callable[..., Any]
_CACHED_PIPELINES = 8


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

    def _pipeline_at(self, message: Request, step: int) -> tuple[bytes | str, Any]:
        """The client's pipeline positioned at ``step``, and its cache key."""
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
        """Answer one HELLO or REQUEST with (encoded header, tensor frames); errors become ERROR replies.

        With an ``arena``, a large batch goes into shared memory and its one frame is the descriptor.
        """
        step = message.step if isinstance(message, Request) else 0
        try:
            if isinstance(message, Hello):
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
                return _encodable(reply), []
            if not isinstance(message, Request):
                raise ProtocolError(f"a worker cannot handle {message.command.name}")
            gen = message.gen
            key, pipeline = self._pipeline_at(message, step)
            try:
                batch, meta = pipeline.next_with_meta()
            except StopIteration:
                self._forget(message)
                return End(gen=gen, step=step, server=self.server).encode(), []
            self._pipelines[key] = (pipeline, step + 1)
            arrays, shape = flatten_batch(batch)
            frames = codec.encode(arrays)
            largest = max((memoryview(frame).nbytes for frame in frames[1::2]), default=0)
            if largest > MAX_BATCH_FRAME:
                raise ConfigError(
                    f"an array of {largest} bytes is larger than the {MAX_BATCH_FRAME}-byte frame limit; "
                    "split it into several arrays"
                )
            batch_header = Batch(
                gen=gen,
                step=step,
                epoch=int(meta.get("epoch", 0)),
                indices=[int(i) for i in meta.get("indices", [])],
                state=pipeline.state(),
                fingerprint=pipeline.fingerprint,
                server=self.server,
                **shape,
            )
            header = _encodable(batch_header)  # before a slot is taken: this may fail
            # A frame over the client's limit would make its socket drop the connection, and the client would ask
            # again forever: refuse it, unless the client reads the batch from shared memory.
            too_large = message.oversized(frames)
            if too_large is not None and not message.shm:
                raise ConfigError(too_large)
            if arena is not None:
                descriptor = arena.put(frames)
                if descriptor is not None:
                    return header, [descriptor]
            if too_large is not None:
                raise ConfigError(too_large)
            return header, frames
        except Exception as error:  # every failure becomes an ERROR reply; the server goes on
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
            return Error.refusing(message, kind, text, self.server).encode(), []

    def close(self) -> None:
        """Close every cached pipeline (stopping their worker processes, if any)."""
        for pipeline, _ in self._pipelines.values():
            pipeline.close()
        self._pipelines.clear()


def _encodable(message: Welcome | Batch) -> bytes:
    """``message`` encoded here, inside the handler's error handling (a hostile state can make a pipeline report
    values msgpack cannot hold): the failure becomes the request's ERROR reply instead of killing the worker."""
    return message.encode()


_MAX_PENDING_PER_CLIENT = 256
_PR_SET_PDEATHSIG = 1
_ALIVE_EVERY = 1.0  # seconds between a worker's signs of life to its front end
_OUTBOX = 4  # replies waiting for a client's socket queue before no more of its requests are computed
_FRONT = (-1, b"")  # the key of the requests the front end hands over


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
) -> None:
    """A worker process: take requests from the front end, and from clients directly on the ``listen`` addresses
    (its own ROUTER sockets, one per front-end URL), compute replies, until told to stop or orphaned.

    Its first message to the front end is READY followed by the addresses it listens on. Replies to direct
    requests go straight to the client (from the worker's memory, or its shared memory for a client on this host
    that asks for it): no front end in the way. Clients take turns; one whose replies pile up unread (``_OUTBOX``)
    gets nothing computed until it reads, so it cannot stall the others.
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
        router.setsockopt(zmq.RCVHWM, queue)
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
    # requests waiting, per source in turn: the front end's (route, message), a client's (None, message)
    pending: OrderedDict[tuple[int, bytes], deque[tuple[bytes | None, AnyMessage]]] = OrderedDict()
    outbox: dict[tuple[int, bytes], deque[list[Any]]] = {}
    draining = False  # the front end drains: new direct requests are refused, those received are answered
    drained = False
    told_alive = time.monotonic()

    def flush(client: tuple[int, bytes]) -> None:
        waiting = outbox.get(client)
        while waiting:
            try:
                send_parts(routers[client[0]], waiting[0], flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:  # the client is gone
                waiting.clear()
                break
            waiting.popleft()
        outbox.pop(client, None)

    def from_client(index: int) -> None:
        frames = routers[index].recv_multipart(copy=True)
        if len(frames) != 2:
            return
        client = (index, frames[0])
        try:
            message = protocol.decode(frames[1], f"client of worker {identity.decode()}")
        except ProtocolError as error:
            reply = Error.refusing(None, ErrorKind.PROTOCOL, str(error), server).encode()
            outbox.setdefault(client, deque()).append([client[1], reply])
            return
        if isinstance(message, Ping):
            outbox.setdefault(client, deque()).append([client[1], Pong(server=server).encode()])
            return
        if draining and isinstance(message, Hello | Request):
            text = f"server {server} is shutting down"
            refusal = Error.refusing(message, ErrorKind.UNAVAILABLE, text, server).encode()
            outbox.setdefault(client, deque()).append([client[1], refusal])
            return
        if not isinstance(message, Hello | Request):
            text = f"a worker does not accept {message.command.name} messages"
            outbox.setdefault(client, deque()).append(
                [client[1], Error.refusing(message, ErrorKind.PROTOCOL, text, server).encode()]
            )
            return
        requests: list[AnyMessage] = [message]
        if isinstance(message, Request) and message.count > 1:
            requests = [
                replace(message, step=step, count=1)
                for step in range(message.step, message.step + message.count)
            ]
        waiting = pending.setdefault(client, deque())
        if len(waiting) + len(requests) > _MAX_PENDING_PER_CLIENT:
            text = f"more than {_MAX_PENDING_PER_CLIENT} requests pending from one client"
            outbox.setdefault(client, deque()).append(
                [client[1], Error.refusing(message, ErrorKind.PROTOCOL, text, server).encode()]
            )
            return
        waiting.extend((None, request) for request in requests)

    def compute_one() -> None:
        for client in list(pending):
            if client != _FRONT and len(outbox.get(client, ())) >= _OUTBOX:
                pending.move_to_end(client)  # it does not read: the others go first
                continue
            waiting = pending[client]
            route, message = waiting.popleft()
            pending.move_to_end(client)
            if not waiting:
                del pending[client]
            direct = client != _FRONT
            shared = (
                arena
                if not direct
                or (isinstance(message, Request) and message.shm and listen[client[0]].startswith("ipc://"))
                else None
            )
            try:
                data, tensors = handler.handle(message, shared)
            except (
                Exception
            ) as error:  # handle() answers errors itself; this keeps the worker alive regardless
                log.exception("worker %s: unexpected failure", identity.decode())
                text = f"{type(error).__name__}: {error}"
                data, tensors = Error.refusing(message, ErrorKind.PIPELINE, text, server).encode(), []
            if direct:
                outbox.setdefault(client, deque()).append([client[1], data, *tensors])
                flush(client)
            else:
                send_parts(socket, [route, data, *tensors])
            return

    try:
        while os.getppid() == parent:
            busy = any(client == _FRONT or len(outbox.get(client, ())) < _OUTBOX for client in pending)
            ready = dict(poller.poll(0 if busy else (10 if outbox else 500)))
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
                    message = protocol.decode(frames[1], "front end")
                    pending.setdefault(_FRONT, deque()).append((frames[0], message))
                if stop:
                    break
            for index, router in enumerate(routers):
                while router in ready and router.poll(0, zmq.POLLIN):
                    from_client(index)
            for client in list(outbox):
                flush(client)
            now = time.monotonic()
            if now - told_alive >= _ALIVE_EVERY:  # the front end replaces a worker that stays silent (stuck)
                with contextlib.suppress(zmq.Again):
                    socket.send_multipart([b"ALIVE"], flags=zmq.NOBLOCK)
                told_alive = now
            if pending:
                compute_one()
            elif draining and not drained and not outbox:
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
