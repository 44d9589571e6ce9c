"""The deterministic request protocol (``zreq`` clients, ``zrep`` servers): commands, one typed class per message,
and the header they share.

Every message starts with one header frame, a msgpack map ``{"v": 1, "cmd": N, ...fields}``, followed by the tensor
frames of the ``.ten`` codec where the command carries a batch. msgpack is used for this small header only: nothing
is ever unpickled.

::

    client (DEALER)                                   server (ROUTER)
    Hello    {seed, rank, world_size, base, gen} ->   Welcome {fingerprint, state, server[, classes][, workers]}
                                                      (or Error)
    Request  {..., gen, step[, count][, shm]}    ->   Batch   {gen, step, epoch, indices, state, fingerprint,
             [count: n consecutive steps]                      server, kind[, keys]}
                                                      (n steps: one Batch, End or Error per step, or a Batches
                                                      for several consecutive steps)
                                                       + tensor frames [hdr0, data0, ...]
                                                      Batches {gen, step, arrays, epochs, indices,
                                                               states | state + changes, tensors,
                                                               fingerprint, server, kind[, keys]}
                                                       + one data frame: every array's bytes in turn
                                                      End     {gen, step, server}  the epoch has no step `step`
                                                      Error   {gen, step, error, message, server, request}
    Ping     {}                                 ->    Pong    {server[, workers]}

Stream servers that run a pipeline listen for control messages on a ROUTER of their own::

    Seek     {state | epoch}                    ->    Sought  {gen, fingerprint}   (or Error {error, message})

and then send from that state on, tagging every batch with the new ``gen`` in a trailing metadata frame, so the
client can drop batches sent before the seek. The frame is ``STREAM_META_MAGIC`` followed by msgpack (a
:class:`Batch`'s fields without the header, plus ``seed``), sent as one frame after the tensor frames, so a stream
message has an odd number of frames: ``[hdr0, data0, ..., meta]``. tensorcom 0.1 decodes a message pairwise
(``zip(frames[::2], frames[1::2])``) and so ignores the lone trailing frame: its clients receive exactly their
arrays from a default server. (Servers before this change sent the metadata as a last uint8 array labelled
``META_INFO``; clients still read that.)

A worker answers the steps of a REQUEST for several with small batches (not in shared memory) in one BATCHES
message (:class:`Batches`): ``len(epochs)`` consecutive steps from ``step``, each ``arrays`` arrays. ``tensors``
holds the .ten header chunk of every array, batch after batch, and the message has one frame after the header:
the arrays' bytes in the same order, each starting at a multiple of 64 bytes (:data:`tensorcom.codec.ALIGNMENT`)
with zeros between them, so that a client receives the group as two frames and makes its arrays as views of the
second. The fields the batches share are sent once; each step's state is sent whole
(``states``), or, where every state of the group is a map with the same keys in the same order, the first whole
(``state``) and for each later one the top-level fields that differ from the one before it (``changes``), from
which :meth:`Batches.state_at` rebuilds it exactly. A step that fails or ends the epoch is still an ERROR or an END
of its own, so a group holds the consecutive batches between them.

``base`` (:class:`Base`) says where step 0 starts: ``{"state": <pipeline state> | None, "epoch": <int> | None}``; a
server builds the pipeline with the client's seed, rank and world size, loads that state (or sets that epoch),
skips ``step`` batches by random access and computes the next one. ``gen`` is echoed back, so a client that
reloaded its state can drop late replies to requests it made before.

:func:`decode` checks a header and returns the typed message, or raises :class:`~tensorcom.ProtocolError` naming
the peer and the field at fault; fields a peer sends that a class does not know are ignored (a newer peer may add
some). ``encode()`` writes the fields in the order above and leaves out optional fields that are None (``count``
when 1, ``shm`` when False). :class:`Message` is the untyped header (a command and a dict) beneath them: what a
server reads before it knows a request is well formed, and what tests use to build malformed ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any, ClassVar, Self

import msgpack

from tensorcom.codec import ALIGNMENT as _ALIGNMENT
from tensorcom.errors import ProtocolError

_ZEROS = bytes(_ALIGNMENT)  # the padding between the arrays of a BATCHES data frame is cut from this

__all__ = [
    "MAX_ARRAY_ITEMS",
    "MAX_CONTAINERS",
    "MAX_GROUP",
    "MAX_HEADER_BYTES",
    "MAX_INTEGER",
    "MAX_MAP_ITEMS",
    "MAX_SEED",
    "MAX_WORKERS",
    "META_INFO",
    "STREAM_META_MAGIC",
    "VERSION",
    "AnyMessage",
    "Base",
    "Batch",
    "Batches",
    "Command",
    "End",
    "Error",
    "ErrorKind",
    "Hello",
    "Message",
    "Ping",
    "Pong",
    "Request",
    "Seek",
    "Sought",
    "Welcome",
    "check_bounded",
    "decode",
    "flatten_batch",
    "rebuild_batch",
    "split_stream_meta",
    "state_changes",
    "stream_meta_bytes",
    "stream_meta_frame",
    "unpack_bounded",
]

VERSION = 1
MAX_HEADER_BYTES = 1 << 20
META_INFO = "tcmeta"
STREAM_META_MAGIC = b"~TcMeta~"
MAX_INTEGER = 1 << 62
"""Largest magnitude of a step, epoch, position or other count a peer may send: far beyond any real stream, and
far enough below msgpack's 64-bit limit that counting on from it cannot overflow."""
MAX_SEED = (1 << 64) - 1
MAX_GROUP = 64
"""Most consecutive steps one REQUEST may ask for (``count``); each is answered by a BATCH of its own, or several
consecutive ones together by one BATCHES message."""
MAX_WORKERS = 256
"""Most worker addresses a WELCOME may name."""
_MAX_DEPTH = 32
MAX_CONTAINERS = 1 << 15
"""Most maps and arrays one header, metadata frame or control message may hold (a pipeline state of a Join of
thousands of sources fits)."""
MAX_ARRAY_ITEMS = 1 << 20
"""Longest array in a message from a peer (a batch's ``indices`` has one item per sample)."""
MAX_MAP_ITEMS = 1 << 12
"""Most keys of one map in a message from a peer."""
_BATCH_KINDS = ("single", "tuple", "list", "dict")


class Command(IntEnum):
    """What a message asks for or answers."""

    HELLO = 1
    WELCOME = 2
    REQUEST = 3
    BATCH = 4
    END = 5
    ERROR = 6
    PING = 7
    PONG = 8
    SEEK = 9
    SOUGHT = 10
    BATCHES = 11


class ErrorKind(StrEnum):
    """Why a server answered with an ERROR; the value is what travels (the ``error`` field)."""

    STATE = "state"
    """The client's state or configuration does not fit the pipeline served (a mismatched resume)."""
    PROTOCOL = "protocol"
    """The message was malformed or not one this peer accepts."""
    PIPELINE = "pipeline"
    """The pipeline failed computing the step (or killed its worker process three times)."""
    UNAVAILABLE = "unavailable"
    """The server is shutting down or has finished: ask another one."""
    BUSY = "busy"
    """The server holds as many clients or requests as it may now: ask another one, or this one again later."""


_COMMANDS: dict[Any, Command] = {int(command): command for command in Command}
_ERROR_KINDS: dict[Any, ErrorKind] = {kind.value: kind for kind in ErrorKind}
_MISSING: Any = object()


def _pack(header: dict[str, Any]) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def _frame_bytes(frame: Any) -> int:
    """The size in bytes of a frame about to be sent (bytes, a buffer, a zmq.Frame or an array)."""
    return memoryview(frame).nbytes


class _Overfull(Exception):
    """Raised inside msgpack's hooks to stop decoding a message that holds too many maps and arrays."""


def unpack_bounded(data: bytes | memoryview, what: str) -> Any:
    """Decode msgpack from a peer within fixed bounds, checked while it is decoded, before anything is built for
    what lies beyond them: at most :data:`MAX_CONTAINERS` maps and arrays, each at most :data:`MAX_MAP_ITEMS` /
    :data:`MAX_ARRAY_ITEMS` long, strings and bytes no longer than the message, no ext types, map keys strings.
    A message of a million empty maps is refused after decoding ``MAX_CONTAINERS`` of them (a few milliseconds), not
    turned into a million dicts. Raises :class:`ProtocolError` naming ``what``."""
    left = MAX_CONTAINERS

    def count(value: Any) -> Any:
        nonlocal left
        left -= 1
        if left < 0:
            raise _Overfull
        return value

    size = len(data)
    # Every map and array takes a byte at least: a message that short cannot hold too many (no hook calls needed).
    hook = None if size <= MAX_CONTAINERS else count
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            object_hook=hook,
            list_hook=hook,
            max_str_len=size,
            max_bin_len=size,
            max_array_len=MAX_ARRAY_ITEMS,
            max_map_len=MAX_MAP_ITEMS,
            max_ext_len=0,
        )
    except _Overfull:
        raise ProtocolError(f"{what} holds more than {MAX_CONTAINERS} maps and arrays") from None
    except Exception as error:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"{what} is not valid msgpack within bounds: {str(error)[:200]}") from None


def _parse(frame: Any, source: str) -> tuple[Command, dict[str, Any]]:
    """The command and the fields of a header frame, its version checked; anything malformed raises
    :class:`ProtocolError` naming ``source``."""
    data = frame if type(frame) is bytes else bytes(getattr(frame, "bytes", frame))
    if len(data) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header from {source} is {len(data)} bytes; at most {MAX_HEADER_BYTES}")
    header = unpack_bounded(data, f"header from {source}")
    if not isinstance(header, dict):
        raise ProtocolError(f"header from {source} must be a map. Found: {type(header).__name__}")
    version = header.pop("v", None)
    if version != VERSION:
        raise ProtocolError(f"{source} speaks protocol version {version!r}; this tensorcom speaks {VERSION}")
    code = header.pop("cmd", None)
    command = _COMMANDS.get(code) if type(code) is int else None  # not a bool, float or unhashable list
    if command is None:
        raise ProtocolError(f"unknown command from {source}: {str(code)[:100]}")
    return command, header


def _worker_addresses(fields: dict[str, Any], command: Command, source: str) -> tuple[str, ...] | None:
    workers = fields.get("workers")
    if workers is None:
        return None
    if (
        type(workers) is not list
        or len(workers) > MAX_WORKERS
        or not all(type(w) is str and len(w) <= 256 for w in workers)
    ):
        raise _field_error(
            command, source, "workers", f"a list of at most {MAX_WORKERS} addresses or nil", workers
        )
    return tuple(workers)


def _field_error(command: Command, source: str, name: str, expected: str, value: Any) -> ProtocolError:
    if value is _MISSING:
        return ProtocolError(f"{command.name} from {source} has no field {name!r} ({expected})")
    return ProtocolError(
        f"{command.name} field {name!r} from {source} must be {expected}. Found: {str(value)[:100]}"
    )


def _integer(
    fields: dict[str, Any],
    name: str,
    command: Command,
    source: str,
    minimum: int = 0,
    maximum: int = MAX_INTEGER,
    default: Any = _MISSING,
) -> int:
    """Field ``name`` as an int in [``minimum``, ``maximum``] (``default`` when absent, if given)."""
    value = fields.get(name, default)
    if type(value) is int and minimum <= value <= maximum:  # msgpack gives exact ints: a bool is refused
        return value
    raise _field_error(command, source, name, f"an integer in [{minimum}, {maximum}]", value)


def _optional_integer(
    fields: dict[str, Any], name: str, command: Command, source: str, maximum: int = MAX_INTEGER
) -> int | None:
    value = fields.get(name)
    if value is None or (type(value) is int and 0 <= value <= maximum):
        return value
    raise _field_error(command, source, name, f"an integer in [0, {maximum}] or nil", value)


def _optional_string(fields: dict[str, Any], name: str, command: Command, source: str) -> str | None:
    value = fields.get(name)
    if value is None or type(value) is str:
        return value
    raise _field_error(command, source, name, "a string or nil", value)


def _string(fields: dict[str, Any], name: str, command: Command, source: str) -> str:
    value = fields.get(name, _MISSING)
    if type(value) is str:
        return value
    raise _field_error(command, source, name, "a string", value)


@dataclass(frozen=True, slots=True, kw_only=True)
class Base:
    """Where step 0 of a client's stream starts (the ``base`` field of HELLO and REQUEST): a pipeline state to
    load, or the start of an epoch, or (both None) the start of the stream."""

    state: Any = None
    epoch: int | None = None

    def fields(self) -> dict[str, Any]:
        return {"state": self.state, "epoch": self.epoch}

    @classmethod
    def from_fields(cls, value: Any, command: Command, source: str) -> Base:
        if value is None:
            return cls()
        if type(value) is not dict:
            raise _field_error(command, source, "base", "a map", value)
        state, epoch = value.get("state"), value.get("epoch")
        check_bounded(state, f"{command.name} base state from {source}")
        if epoch is not None and (type(epoch) is not int or not 0 <= epoch <= MAX_INTEGER):
            raise _field_error(
                command, source, "base.epoch", f"an integer in [0, {MAX_INTEGER}] or nil", epoch
            )
        return cls(state=state, epoch=epoch)


@dataclass(frozen=True, slots=True, kw_only=True)
class _ClientConfig:
    """What fixes a client's stream: the fields HELLO and REQUEST share."""

    seed: int
    rank: int
    world_size: int
    base: Base = field(default_factory=Base)
    gen: int = 0

    @staticmethod
    def _config(fields: dict[str, Any], command: Command, source: str) -> dict[str, Any]:
        seed = _integer(fields, "seed", command, source, maximum=MAX_SEED)
        rank = _integer(fields, "rank", command, source)
        world_size = _integer(fields, "world_size", command, source, 1)
        if rank >= world_size:
            raise _field_error(command, source, "rank", f"< world_size ({world_size})", rank)
        base = Base.from_fields(fields.get("base"), command, source)
        gen = _integer(fields, "gen", command, source, default=0)
        return {"seed": seed, "rank": rank, "world_size": world_size, "base": base, "gen": gen}

    def _header(self, command: Command) -> dict[str, Any]:
        return {
            "v": VERSION,
            "cmd": command,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "base": self.base.fields(),
            "gen": self.gen,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello(_ClientConfig):
    """A client's greeting: the server answers WELCOME with its pipeline's fingerprint, or a STATE ERROR."""

    command: ClassVar[Command] = Command.HELLO

    def encode(self) -> bytes:
        return _pack(self._header(Command.HELLO))

    @classmethod
    def from_fields(cls, fields: dict[str, Any], source: str) -> Self:
        return cls(**cls._config(fields, Command.HELLO, source))


@dataclass(frozen=True, slots=True, kw_only=True)
class Request(_ClientConfig):
    """Ask for ``count`` consecutive steps from ``step`` on; ``shm``: the client reads shared memory;
    ``max_frame`` (optional): the largest frame the client's socket accepts, so that a server answers a batch with a
    larger array by an ERROR naming both sizes instead of sending what the client's socket would drop."""

    command: ClassVar[Command] = Command.REQUEST
    step: int
    count: int = 1
    shm: bool = False
    max_frame: int | None = None

    def encode(self) -> bytes:
        header = self._header(Command.REQUEST)
        header["step"] = self.step
        if self.count != 1:
            header["count"] = self.count
        if self.shm:
            header["shm"] = True
        if self.max_frame is not None:
            header["max_frame"] = self.max_frame
        return _pack(header)

    @classmethod
    def from_fields(cls, fields: dict[str, Any], source: str) -> Self:
        command = Command.REQUEST
        shm = fields.get("shm", False)
        if type(shm) is not bool:
            raise _field_error(command, source, "shm", "true or false", shm)
        return cls(
            **cls._config(fields, command, source),
            step=_integer(fields, "step", command, source),
            count=_integer(fields, "count", command, source, 1, MAX_GROUP, default=1),
            shm=shm,
            max_frame=_optional_integer(fields, "max_frame", command, source),
        )

    def oversized(self, frames: Sequence[Any]) -> str | None:
        """Why the reply ``frames`` (a .ten batch: header and data frames) cannot reach this client, or None."""
        if self.max_frame is None:
            return None
        largest = max((_frame_bytes(frame) for frame in frames[1::2]), default=0)
        if largest <= self.max_frame:
            return None
        return (
            f"the batch for step {self.step} holds an array of {largest} bytes; the client accepts frames of at "
            f"most {self.max_frame} bytes (its max_message_size)"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Welcome:
    """The answer to HELLO: the served pipeline's fingerprint and its state at step 0.

    ``classes`` (optional, absent when None): the names of the pipeline's classes, label i named ``classes[i]``,
    for tools that caption samples. Older clients ignore it; servers that know none leave it out.

    ``workers`` (optional): addresses where this server's worker processes take REQUEST messages themselves, so
    that their replies go straight to the client instead of through the server's front end (``tcp://:PORT`` means
    the host the client reached the server at). A client that cannot reach them keeps using the server's address.
    """

    command: ClassVar[Command] = Command.WELCOME
    fingerprint: str | None = None
    state: Any = None
    server: str | None = None
    classes: tuple[str, ...] | None = None
    workers: tuple[str, ...] | None = None

    def encode(self) -> bytes:
        header = {
            "v": VERSION,
            "cmd": Command.WELCOME,
            "fingerprint": self.fingerprint,
            "state": self.state,
            "server": self.server,
            "classes": None if self.classes is None else list(self.classes),
            "workers": None if self.workers is None else list(self.workers),
        }
        return _pack(_without_none(header))

    @classmethod
    def from_fields(cls, fields: dict[str, Any], source: str) -> Self:
        command = Command.WELCOME
        classes = fields.get("classes")
        if classes is not None and (type(classes) is not list or not all(type(c) is str for c in classes)):
            raise _field_error(command, source, "classes", "a list of strings or nil", classes)
        workers = _worker_addresses(fields, command, source)
        return cls(
            fingerprint=_optional_string(fields, "fingerprint", command, source),
            state=fields.get("state"),
            server=_optional_string(fields, "server", command, source),
            classes=None if classes is None else tuple(classes),
            workers=workers,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Batch:
    """One step's batch: its place in the stream, the pipeline's state after it, and how to rebuild its structure
    from the arrays that follow (``kind``: single, tuple, list or dict, with ``keys``). Stream servers send the same
    fields, with ``seed`` and without ``server``, in a batch's metadata array."""

    command: ClassVar[Command] = Command.BATCH
    gen: int = 0
    step: int
    epoch: int | None = None
    indices: list[int] = field(default_factory=list)
    state: Any = None
    fingerprint: str | None = None
    server: str | None = None
    seed: int | None = None
    kind: str = "single"
    keys: list[str] | None = None

    def encode(self) -> bytes:
        header: dict[str, Any] = {"v": VERSION, "cmd": Command.BATCH, "gen": self.gen, "step": self.step}
        if self.epoch is not None:
            header["epoch"] = self.epoch
        header["indices"] = self.indices
        if self.state is not None:
            header["state"] = self.state
        return _pack_with_labels(header, self.fingerprint, self.server, self.seed, self.kind, self.keys)

    @classmethod
    def from_fields(cls, fields: dict[str, Any], source: str) -> Self:
        # One per batch on every client: the checks are written out, not calls to the helpers above (but for the
        # labels, shared with BATCHES). Positions are not bounded by MAX_INTEGER: a server counts on from the state
        # it was given, which may be that high.
        command, get = Command.BATCH, fields.get
        gen, step, epoch = get("gen", 0), get("step", _MISSING), get("epoch")
        if type(gen) is not int:
            raise _field_error(command, source, "gen", "an integer", gen)
        if type(step) is not int:
            raise _field_error(command, source, "step", "an integer", step)
        if epoch is not None and type(epoch) is not int:
            raise _field_error(command, source, "epoch", "an integer or nil", epoch)
        indices = get("indices", [])
        if not _integers(indices):
            raise _field_error(command, source, "indices", "a list of integers", indices)
        seed = get("seed")
        if seed is not None and (type(seed) is not int or not 0 <= seed <= MAX_SEED):
            raise _field_error(command, source, "seed", f"an integer in [0, {MAX_SEED}] or nil", seed)
        fingerprint, server, kind, keys = _batch_labels(command, source, get)
        return cls(
            gen=gen,
            step=step,
            epoch=epoch,
            indices=indices,
            state=get("state"),
            fingerprint=fingerprint,
            server=server,
            seed=seed,
            kind=kind,
            keys=keys,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Batches:
    """Consecutive steps' batches in one message (see the module docstring): step ``step + i`` has epoch
    ``epochs[i]``, sample indices ``indices[i]``, state :meth:`state_at` ``(i)`` and ``arrays`` arrays, whose .ten
    headers are ``tensors[arrays * i : arrays * (i + 1)]`` and whose bytes follow in the data frame (see
    :meth:`layout`). ``kind``, ``keys``, ``fingerprint`` and ``server`` are those of every batch in the group."""

    command: ClassVar[Command] = Command.BATCHES
    gen: int = 0
    step: int
    arrays: int
    epochs: list[int | None]
    indices: list[list[int]]
    states: list[Any] | None = None
    state: Any = None
    changes: list[dict[str, Any]] | None = None
    tensors: list[bytes] = field(default_factory=list)
    fingerprint: str | None = None
    server: str | None = None
    kind: str = "single"
    keys: list[str] | None = None

    @property
    def count(self) -> int:
        """How many steps (batches) the message carries."""
        return len(self.epochs)

    def state_at(self, index: int) -> Any:
        """The pipeline state after step ``step + index``, rebuilt exactly from ``changes`` where they were sent."""
        if self.states is not None:
            return self.states[index]
        state = self.state
        for changed in (self.changes or [])[:index]:
            state = {**state, **changed}
        return state

    def batch(self, index: int) -> Batch:
        """The header step ``step + index`` would have had as a BATCH of its own."""
        return Batch(
            gen=self.gen,
            step=self.step + index,
            epoch=self.epochs[index],
            indices=self.indices[index],
            state=self.state_at(index),
            fingerprint=self.fingerprint,
            server=self.server,
            kind=self.kind,
            keys=self.keys,
        )

    @classmethod
    def of(cls, batches: Sequence[Batch], arrays: int, tensors: list[bytes] | None = None) -> Batches:
        """The message carrying ``batches`` (consecutive steps with the same kind, keys, fingerprint and server),
        each ``arrays`` arrays with the .ten headers ``tensors``; states sent as changes where they can be rebuilt
        exactly."""
        first = batches[0]
        states = [batch.state for batch in batches]
        changes = state_changes(states)
        return cls(
            gen=first.gen,
            step=first.step,
            arrays=arrays,
            epochs=[batch.epoch for batch in batches],
            indices=[batch.indices for batch in batches],
            states=states if changes is None else None,
            state=None if changes is None else states[0],
            changes=changes,
            tensors=tensors or [],
            fingerprint=first.fingerprint,
            server=first.server,
            kind=first.kind,
            keys=first.keys,
        )

    @staticmethod
    def pack(frames: Sequence[Any]) -> tuple[list[bytes], bytes]:
        """The ``tensors`` and the data frame for the .ten frames ``[hdr0, data0, hdr1, data1, ...]`` of the
        batches of a group, one after the other (the data is copied into place, 64-byte aligned, zeros between).
        One pass over the bytes: a join writes each array once into a buffer it does not clear first."""
        tensors = [bytes(header) for header in frames[0::2]]
        pieces: list[Any] = []
        offset = 0
        for data in frames[1::2]:
            view = memoryview(data).cast("B")
            padding = -offset % _ALIGNMENT
            if padding:
                pieces.append(_ZEROS[:padding])
            pieces.append(view)
            offset += padding + view.nbytes
        return tensors, b"".join(pieces)

    def layout(self, sizes: Sequence[int]) -> list[tuple[int, int]]:
        """``(offset, length)`` in the data frame of each array, given each array's bytes (announced by its header
        in ``tensors``)."""
        places = []
        offset = 0
        for size in sizes:
            offset = -(-offset // _ALIGNMENT) * _ALIGNMENT
            places.append((offset, size))
            offset += size
        return places

    def encode(self) -> bytes:
        header: dict[str, Any] = {
            "v": VERSION,
            "cmd": Command.BATCHES,
            "gen": self.gen,
            "step": self.step,
            "arrays": self.arrays,
            "epochs": self.epochs,
            "indices": self.indices,
        }
        if self.changes is None:
            header["states"] = self.states
        else:
            header["state"] = self.state
            header["changes"] = self.changes
        header["tensors"] = self.tensors
        return _pack_with_labels(header, self.fingerprint, self.server, None, self.kind, self.keys)

    @classmethod
    def from_fields(cls, fields: dict[str, Any], source: str) -> Self:
        command, get = Command.BATCHES, fields.get
        gen, step, arrays = get("gen", 0), get("step", _MISSING), get("arrays", _MISSING)
        if type(gen) is not int:
            raise _field_error(command, source, "gen", "an integer", gen)
        if type(step) is not int:
            raise _field_error(command, source, "step", "an integer", step)
        if type(arrays) is not int or not 0 <= arrays <= MAX_ARRAY_ITEMS:
            raise _field_error(command, source, "arrays", f"an integer in [0, {MAX_ARRAY_ITEMS}]", arrays)
        epochs = get("epochs", _MISSING)
        if type(epochs) is not list or not 1 <= len(epochs) <= MAX_GROUP or not _integers(epochs, nil=True):
            raise _field_error(
                command, source, "epochs", f"a list of 1 to {MAX_GROUP} integers or nils", epochs
            )
        count = len(epochs)
        indices = get("indices", _MISSING)
        if type(indices) is not list or len(indices) != count or not all(map(_integers, indices)):
            raise _field_error(
                command, source, "indices", f"{count} lists of integers (one per epoch)", indices
            )
        states, changes = get("states"), get("changes")
        if changes is None:
            if type(states) is not list or len(states) != count:
                raise _field_error(command, source, "states", f"a list of {count} states", states)
        elif (
            type(get("state")) is not dict
            or type(changes) is not list
            or len(changes) != count - 1
            or not all(type(changed) is dict for changed in changes)
        ):
            raise _field_error(
                command, source, "changes", f"{count - 1} maps of changed fields after a map 'state'", changes
            )
        tensors = get("tensors", _MISSING)
        if type(tensors) is not list or len(tensors) != count * arrays or not _all_bytes(tensors):
            raise _field_error(
                command,
                source,
                "tensors",
                f"{count * arrays} .ten headers ({count} x {arrays} arrays)",
                tensors,
            )
        fingerprint, server, kind, keys = _batch_labels(command, source, get)
        return cls(
            gen=gen,
            step=step,
            arrays=arrays,
            epochs=epochs,
            indices=indices,
            states=states if changes is None else None,
            state=None if changes is None else get("state"),
            changes=changes,
            tensors=tensors,
            fingerprint=fingerprint,
            server=server,
            kind=kind,
            keys=keys,
        )


def _pack_with_labels(
    header: dict[str, Any],
    fingerprint: str | None,
    server: str | None,
    seed: int | None,
    kind: str,
    keys: list[str] | None,
) -> bytes:
    """A BATCH or BATCHES header with its labels added last (those that are not nil), packed."""
    if fingerprint is not None:
        header["fingerprint"] = fingerprint
    if server is not None:
        header["server"] = server
    if seed is not None:
        header["seed"] = seed
    header["kind"] = kind
    if keys is not None:
        header["keys"] = keys
    return _pack(header)


def _batch_labels(
    command: Command, source: str, get: Callable[..., Any]
) -> tuple[str | None, str | None, str, list[str] | None]:
    """The checked ``fingerprint``, ``server``, ``kind`` and ``keys`` of a BATCH or BATCHES header (``get`` is its
    fields' ``get``)."""
    fingerprint, server = get("fingerprint"), get("server")
    if fingerprint is not None and type(fingerprint) is not str:
        raise _field_error(command, source, "fingerprint", "a string or nil", fingerprint)
    if server is not None and type(server) is not str:
        raise _field_error(command, source, "server", "a string or nil", server)
    kind, keys = get("kind", _MISSING), get("keys")
    if type(kind) is not str or kind not in _BATCH_KINDS:
        raise _field_error(command, source, "kind", f"one of {', '.join(_BATCH_KINDS)}", kind)
    if keys is not None and (type(keys) is not list or not all(type(key) is str for key in keys)):
        raise _field_error(command, source, "keys", "a list of strings", keys)
    return fingerprint, server, kind, keys


def _all_bytes(values: list[Any]) -> bool:
    for value in values:
        if type(value) is not bytes:
            return False
    return True


def _integers(values: Any, nil: bool = False) -> bool:
    """Whether ``values`` is a list of integers (``nil``: or nils); a loop, not a generator: this runs per batch."""
    if type(values) is not list:
        return False
    for value in values:
        if type(value) is not int and (not nil or value is not None):
            return False
    return True


def state_changes(states: Sequence[Any]) -> list[dict[str, Any]] | None:
    """For each state after the first, its top-level fields that differ from the state before it; None unless every
    state is a map with the same keys in the same order (then ``{**before, **changed}`` is the state, exactly).

    A field counts as unchanged only if it is the same scalar (same type, equal value) or the very same object, so
    that a rebuilt state packs to the same bytes (``1 == True == 1.0`` in Python, not in msgpack)."""
    first = states[0]
    if type(first) is not dict:
        return None
    keys = list(first)
    changes = []
    before = first
    for state in states[1:]:
        if type(state) is not dict or list(state) != keys:
            return None
        changes.append(
            {
                key: value
                for key, value in state.items()
                if not (  # unchanged: the very same object, or the same scalar (type and value); inline: per step
                    value is (other := before[key])
                    or (type(value) is type(other) and type(value) in _SCALARS and value == other)
                )
            }
        )
        before = state
    return changes


_SCALARS = frozenset((int, float, str, bytes, bool, type(None)))


@dataclass(frozen=True, slots=True, kw_only=True)
class End:
    """The epoch has no step ``step``: the client's epoch ends there."""

    command: ClassVar[Command] = Command.END
    gen: int = 0
    step: int
    server: str | None = None

    def encode(self) -> bytes:
        return _pack(
            _without_none(
                {"v": VERSION, "cmd": Command.END, "gen": self.gen, "step": self.step, "server": self.server}
            )
        )

    @classmethod
    def from_fields(cls, fields: dict[str, Any], source: str) -> Self:
        command = Command.END
        return cls(
            gen=_integer(fields, "gen", command, source, default=0),
            step=_integer(fields, "step", command, source),
            server=_optional_string(fields, "server", command, source),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Error:
    """A refusal or a failure: ``error`` says why, ``message`` says what happened. Replies to a request carry its
    ``gen``, ``step`` and command name (``request``); a stream server's answer to SEEK carries neither."""

    command: ClassVar[Command] = Command.ERROR
    gen: int | None = None
    step: int | None = None
    error: ErrorKind
    message: str
    server: str | None = None
    request: str | None = None
    count: int | None = (
        None  # the refused REQUEST's steps from ``step`` (a BUSY refusal answers them all at once)
    )

    def encode(self) -> bytes:
        header = {
            "v": VERSION,
            "cmd": Command.ERROR,
            "gen": self.gen,
            "step": self.step,
            "error": self.error.value,
            "message": self.message,
            "server": self.server,
            "request": self.request,
            "count": self.count,
        }
        return _pack(_without_none(header))

    @classmethod
    def refusing(
        cls, request: AnyMessage | Message | None, error: ErrorKind, text: str, server: str
    ) -> Error:
        """The ERROR that answers ``request`` (a typed message, or a header that failed its checks, or None when
        even the header could not be read), echoing its ``gen`` and ``step`` where it has valid ones (else 0)."""
        if request is None:
            return cls(gen=0, step=0, error=error, message=text, server=server)
        if isinstance(request, Message):
            gen, step = request.fields.get("gen", 0), request.fields.get("step", 0)
        else:
            gen = request.gen if isinstance(request, Hello | Request) else 0
            step = request.step if isinstance(request, Request) else 0
        return cls(
            gen=gen if type(gen) is int and 0 <= gen <= MAX_INTEGER else 0,
            step=step if type(step) is int and 0 <= step <= MAX_INTEGER else 0,
            error=error,
            message=text,
            server=server,
            request=request.command.name,
        )

    @classmethod
    def from_fields(cls, fields: dict[str, Any], source: str) -> Self:
        command = Command.ERROR
        kind = fields.get("error", _MISSING)
        error = _ERROR_KINDS.get(kind) if type(kind) is str else None
        if error is None:
            raise _field_error(command, source, "error", f"one of {', '.join(_ERROR_KINDS)}", kind)
        return cls(
            gen=_optional_integer(fields, "gen", command, source),
            step=_optional_integer(fields, "step", command, source),
            error=error,
            message=_string(fields, "message", command, source),
            server=_optional_string(fields, "server", command, source),
            request=_optional_string(fields, "request", command, source),
            count=_optional_integer(fields, "count", command, source),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Ping:
    """Are you there? Answered by PONG, even while the server is busy computing."""

    command: ClassVar[Command] = Command.PING

    def encode(self) -> bytes:
        return _PING

    @classmethod
    def from_fields(cls, fields: dict[str, Any], source: str) -> Self:
        return cls()


@dataclass(frozen=True, slots=True, kw_only=True)
class Pong:
    """The answer to PING: the server's name, and (optional) where its workers take requests now (see
    :class:`Welcome`), so that a client learns of workers started or restarted after it said HELLO."""

    command: ClassVar[Command] = Command.PONG
    server: str | None = None
    workers: tuple[str, ...] | None = None

    def encode(self) -> bytes:
        workers = None if self.workers is None else list(self.workers)
        return _pack(
            _without_none({"v": VERSION, "cmd": Command.PONG, "server": self.server, "workers": workers})
        )

    @classmethod
    def from_fields(cls, fields: dict[str, Any], source: str) -> Self:
        return cls(
            server=_optional_string(fields, "server", Command.PONG, source),
            workers=_worker_addresses(fields, Command.PONG, source),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Seek:
    """Ask a stream server to continue from ``state`` (a pipeline state), or else from the start of ``epoch``."""

    command: ClassVar[Command] = Command.SEEK
    state: Any = None
    epoch: int | None = None

    def encode(self) -> bytes:
        if self.state is not None:
            return _pack({"v": VERSION, "cmd": Command.SEEK, "state": self.state})
        return _pack({"v": VERSION, "cmd": Command.SEEK, "epoch": self.epoch})

    @classmethod
    def from_fields(cls, fields: dict[str, Any], source: str) -> Self:
        command = Command.SEEK
        state = fields.get("state")
        if state is not None:
            check_bounded(state, f"SEEK state from {source}")
            return cls(state=state)
        epoch = _optional_integer(fields, "epoch", command, source)
        if epoch is None:
            raise ProtocolError(f"SEEK from {source} needs a state or an epoch")
        return cls(epoch=epoch)


@dataclass(frozen=True, slots=True, kw_only=True)
class Sought:
    """The answer to SEEK: the stream's new generation, which tags every batch sent from the new state on."""

    command: ClassVar[Command] = Command.SOUGHT
    gen: int
    fingerprint: str | None = None

    def encode(self) -> bytes:
        return _pack(
            _without_none(
                {"v": VERSION, "cmd": Command.SOUGHT, "gen": self.gen, "fingerprint": self.fingerprint}
            )
        )

    @classmethod
    def from_fields(cls, fields: dict[str, Any], source: str) -> Self:
        command = Command.SOUGHT
        return cls(
            gen=_integer(fields, "gen", command, source),
            fingerprint=_optional_string(fields, "fingerprint", command, source),
        )


AnyMessage = Hello | Welcome | Request | Batch | Batches | End | Error | Ping | Pong | Seek | Sought
_CLASSES: dict[Command, Any] = {
    cls.command: cls
    for cls in (Hello, Welcome, Request, Batch, Batches, End, Error, Ping, Pong, Seek, Sought)
}
_PING = _pack({"v": VERSION, "cmd": Command.PING})


def _without_none(header: dict[str, Any]) -> dict[str, Any]:
    """``header`` without the None values of its optional fields."""
    return {name: value for name, value in header.items() if value is not None}


def decode(frame: Any, source: str = "peer") -> AnyMessage:
    """The typed message in a header frame; a malformed header or field raises :class:`ProtocolError` naming
    ``source`` (and the field)."""
    command, fields = _parse(frame, source)
    return _CLASSES[command].from_fields(fields, source)


@dataclass(frozen=True)
class Message:
    """An untyped header: a command and its fields as plain msgpack-able data, unchecked.

    A server reads this first, so that it can answer a request whose fields fail their checks with an ERROR that
    echoes the request's ``gen`` and ``step``; tests use it to build messages the typed classes would refuse.
    """

    command: Command
    fields: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        """The header frame: ``{"v": VERSION, "cmd": command, ...fields}`` as msgpack."""
        return _pack({"v": VERSION, "cmd": int(self.command), **self.fields})

    @classmethod
    def decode(cls, frame: Any, source: str = "peer") -> Message:
        """Parse a header frame and check its version and command (not its fields); anything malformed raises
        :class:`ProtocolError` naming ``source``."""
        return cls(*_parse(frame, source))

    def typed(self, source: str = "peer") -> AnyMessage:
        """The typed message these fields make, checked as :func:`decode` checks them."""
        return _CLASSES[self.command].from_fields(self.fields, source)


def check_bounded(value: Any, what: str, depth: int = 0) -> None:
    """Raise :class:`ProtocolError` unless ``value`` (a state or other plain data from a peer) nests at most 32
    deep and holds no integer beyond ±:data:`MAX_INTEGER` (seeds may reach 2**64 - 1), so loading it into a
    pipeline cannot make a later count overflow."""
    if depth > _MAX_DEPTH:
        raise ProtocolError(f"{what} nests deeper than {_MAX_DEPTH} levels")
    if isinstance(value, bool) or value is None or isinstance(value, (str, bytes, float)):
        return
    if isinstance(value, int):
        if not -MAX_INTEGER <= value <= MAX_SEED:
            raise ProtocolError(f"{what} holds an integer out of range: {value}")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, int) and not isinstance(item, bool) and key != "seed":
                if not -MAX_INTEGER <= item <= MAX_INTEGER:
                    raise ProtocolError(f"{what} field {key!r} is out of range: {item}")
            check_bounded(item, what, depth + 1)
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            check_bounded(item, what, depth + 1)
        return
    raise ProtocolError(f"{what} holds a {type(value).__name__}, which is not plain data")


def flatten_batch(batch: Any) -> tuple[list[Any], dict[str, Any]]:
    """Split a batch (tuple, list, dict of arrays, or one array) into arrays and the fields that rebuild it
    (``kind`` and, for dicts, ``keys``: see :func:`rebuild_batch`)."""
    if isinstance(batch, dict):
        keys = list(batch)
        if not all(isinstance(key, str) for key in keys):
            raise ProtocolError(f"dict batches need string keys. Found: {keys!r}")
        return [batch[key] for key in keys], {"kind": "dict", "keys": keys}
    if isinstance(batch, tuple):
        return list(batch), {"kind": "tuple"}
    if isinstance(batch, list):
        return batch, {"kind": "list"}
    return [batch], {"kind": "single"}


def rebuild_batch(values: list[Any], kind: str, keys: list[str] | None = None) -> Any:
    """Inverse of :func:`flatten_batch`: ``rebuild_batch(values, **shape)``, or from a :class:`Batch`'s ``kind``
    and ``keys``."""
    if kind == "dict":
        if not isinstance(keys, list) or len(keys) != len(values):
            raise ProtocolError(f"BATCH keys {keys!r} do not match its {len(values)} arrays")
        return dict(zip(keys, values, strict=True))
    if kind == "tuple":
        return tuple(values)
    if kind == "list":
        return values
    if kind == "single" and len(values) == 1:
        return values[0]
    raise ProtocolError(f"BATCH kind {kind!r} with {len(values)} arrays cannot be rebuilt")


def stream_meta_frame(fields: dict[str, Any]) -> bytes:
    """The trailing frame a stream server appends to a pipeline batch (see the module docstring)."""
    return STREAM_META_MAGIC + msgpack.packb(fields, use_bin_type=True)


def stream_meta_bytes(frame: Any) -> memoryview | None:
    """The msgpack bytes of a stream metadata frame, or None if ``frame`` is not one."""
    view = memoryview(getattr(frame, "buffer", frame))
    if view.nbytes < len(STREAM_META_MAGIC) or bytes(view[: len(STREAM_META_MAGIC)]) != STREAM_META_MAGIC:
        return None
    return view[len(STREAM_META_MAGIC) :]


def split_stream_meta(frames: list[Any]) -> tuple[list[Any], memoryview | None]:
    """``(tensor frames, metadata bytes)`` of a stream message; ``(frames, None)`` when it carries no metadata frame.

    Only a lone last frame of an odd-length message can be metadata: a .ten header frame never starts with
    ``STREAM_META_MAGIC``, and a one-frame message is a single .ten buffer.
    """
    if len(frames) < 3 or len(frames) % 2 == 0:
        return frames, None
    packed = stream_meta_bytes(frames[-1])
    return (frames, None) if packed is None else (frames[:-1], packed)
