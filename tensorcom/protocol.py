"""The deterministic request protocol (``zreq`` clients, ``zrep`` servers): commands and the message header.

Every message starts with one header frame, a msgpack map, followed by the tensor frames of the ``.ten`` codec
where the command carries a batch. msgpack is used for this small header only: nothing is ever unpickled.

::

    client (DEALER)                                   server (ROUTER)
    HELLO    {seed, rank, world_size, base}     ->    WELCOME {fingerprint, state, server}   (or ERROR)
    REQUEST  {gen, step, seed, rank, ..., base} ->    BATCH   {gen, step, epoch, indices, state, kind, keys}
             [count: n consecutive steps]            (n replies: one BATCH, END or ERROR per step)
                                                       + tensor frames [hdr0, data0, ...]
                                                      END     {gen, step, epoch}      the epoch has no step `step`
                                                      ERROR   {gen, step, error, message}
    PING     {}                                 ->    PONG    {server}

Stream servers that run a pipeline listen for control messages on a ROUTER of their own::

    SEEK     {state | epoch}                    ->    SOUGHT  {gen, fingerprint}   (or ERROR)

and then send from that state on, tagging every batch with the new ``gen`` in a trailing metadata array (a uint8
array of msgpack bytes whose .ten info is ``META_INFO``), so the client can drop batches sent before the seek.

``base`` says where step 0 starts: ``{"state": <pipeline state> | None, "epoch": <int> | None}``; a server builds the
pipeline with the client's seed, rank and world size, loads that state (or sets that epoch), skips ``step``
batches by random access and computes the next one. ``gen`` is echoed back, so a client that reloaded its state
can drop late replies to requests it made before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import msgpack

from tensorcom.errors import ProtocolError

__all__ = [
    "MAX_GROUP",
    "MAX_HEADER_BYTES",
    "MAX_INTEGER",
    "META_INFO",
    "VERSION",
    "Command",
    "Message",
    "check_batch_fields",
    "check_bounded",
    "flatten_batch",
    "rebuild_batch",
]

VERSION = 1
MAX_HEADER_BYTES = 1 << 20
META_INFO = "tcmeta"
MAX_INTEGER = 1 << 62
"""Largest magnitude of a step, epoch, position or other count a peer may send: far beyond any real stream, and
far enough below msgpack's 64-bit limit that counting on from it cannot overflow."""
MAX_SEED = (1 << 64) - 1
MAX_GROUP = 64
"""Most consecutive steps one REQUEST may ask for (``count``); each is answered by a BATCH of its own."""
_MAX_DEPTH = 32


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


_COMMANDS: dict[Any, Command] = {int(command): command for command in Command}


@dataclass(frozen=True)
class Message:
    """One protocol header: a command and its fields (plain msgpack-able data)."""

    command: Command
    fields: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        """The header frame: ``{"v": VERSION, "cmd": command, ...fields}`` as msgpack."""
        return msgpack.packb({"v": VERSION, "cmd": int(self.command), **self.fields}, use_bin_type=True)

    @classmethod
    def decode(cls, frame: Any, source: str = "peer") -> Message:
        """Parse and check a header frame; anything malformed raises :class:`ProtocolError` naming ``source``."""
        data = frame if type(frame) is bytes else bytes(getattr(frame, "bytes", frame))
        if len(data) > MAX_HEADER_BYTES:
            raise ProtocolError(f"header from {source} is {len(data)} bytes; at most {MAX_HEADER_BYTES}")
        try:
            header = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except Exception as error:  # msgpack raises several unrelated types for bad input
            raise ProtocolError(f"header from {source} is not valid msgpack: {error}") from None
        if not isinstance(header, dict):
            raise ProtocolError(f"header from {source} must be a map. Found: {type(header).__name__}")
        version = header.pop("v", None)
        if version != VERSION:
            raise ProtocolError(
                f"{source} speaks protocol version {version!r}; this tensorcom speaks {VERSION}"
            )
        code = header.pop("cmd", None)
        command = _COMMANDS.get(code) if type(code) is int else None  # not a bool, float or unhashable list
        if command is None:
            raise ProtocolError(f"unknown command from {source}: {str(code)[:100]}")
        return cls(command, header)

    def integer(self, name: str, minimum: int = 0, maximum: int = MAX_INTEGER) -> int:
        """Field ``name`` as an int in [``minimum``, ``maximum``], or :class:`ProtocolError`."""
        value = self.fields.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
            raise ProtocolError(
                f"{self.command.name} field {name!r} must be an integer in [{minimum}, {maximum}]. "
                f"Found: {str(value)[:100]}"
            )
        return value


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


def check_batch_fields(fields: dict[str, Any], source: str) -> None:
    """Raise :class:`ProtocolError` naming ``source`` unless a batch's metadata has the types a client relies on:
    integers ``gen``, ``step``, ``epoch`` (or none), a list of integer ``indices``, a string ``kind`` and
    ``fingerprint`` (or none)."""
    for name in ("gen", "step", "epoch"):
        value = fields.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise ProtocolError(
                f"batch metadata from {source}: {name} must be an integer. Found: {str(value)[:100]}"
            )
    indices = fields.get("indices", [])
    if not isinstance(indices, list) or not all(type(i) is int for i in indices):  # msgpack gives exact ints
        raise ProtocolError(f"batch metadata from {source}: indices must be a list of integers")
    for name in ("kind", "fingerprint"):
        value = fields.get(name)
        if value is not None and not isinstance(value, str):
            raise ProtocolError(
                f"batch metadata from {source}: {name} must be a string. Found: {str(value)[:100]}"
            )


def flatten_batch(batch: Any) -> tuple[list[Any], dict[str, Any]]:
    """Split a batch (tuple, list, dict of arrays, or one array) into arrays and the fields that rebuild it."""
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


def rebuild_batch(values: list[Any], message: Message) -> Any:
    """Inverse of :func:`flatten_batch`, from a BATCH header's ``kind`` and ``keys``."""
    kind = message.fields.get("kind")
    if kind == "dict":
        keys = message.fields.get("keys")
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
