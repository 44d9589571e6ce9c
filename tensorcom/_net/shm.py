"""The same-host fast path: batches travel through shared memory and ZeroMQ carries only a small descriptor.

When a server and its client share a host (``ipc://`` URLs, SwiftLoader, a zreq server's workers and its front end),
copying a 10 MB batch through a socket costs more than the memory bus allows for: the kernel copies it in and out,
and the receiver faults in fresh pages. Instead the producer writes the batch once into a *slot*, a file in
``/dev/shm`` that both processes map, and sends a descriptor; the consumer decodes the batch as views of its
mapping. When the consumer drops the last array (or tensor) made from the batch, the slot becomes free again::

    producer (Arena)                                     consumer (Reader)
    put(arrays) ─ writes slot k, sent = n ─ descriptor ─► read(descriptor): arrays are views of slot k
                                                          ... training step ...
    slot k free again  ◄──────────── released = n ────── the last view is garbage collected

Slot file layout (``/dev/shm/tensorcom-<pid>-<token>-<k>``; little-endian uint64 words, then the batch)::

    offset 0      8       16         24       32            40 ... 63   64
           +------+-------+----------+--------+-------------+----------+-----------------------------------+
           | magic| sent  | released | holder | holder's pid| reserved | the batch: an aligned .ten buffer |
           |      |       |          | pid    | namespace   |          | (codec.encode_into)               |
           +------+-------+----------+--------+-------------+----------+-----------------------------------+

``sent`` is written by the producer only (the number of the batch in the slot), ``released`` and ``holder`` by the
consumer only (after it has received the descriptor), so single aligned 8-byte stores suffice. A slot is free when
``released == sent``. Back-pressure is by slot count: an arena holds at most ``slots`` slots; when all are held it
waits briefly, then :meth:`Arena.put` returns None and the caller sends the batch through the socket as usual, so a
consumer that keeps many batches alive slows down to the socket path but never deadlocks.

Crashes: a producer keeps a shared ``flock`` on each of its slot files; :func:`sweep` (run whenever an arena
opens, and by a request server whenever a worker dies) deletes slot files nobody holds that lock on, so the files of
a killed process do not outlive it for long. A consumer that dies holding slots is noticed by its producer (the
holder's pid is gone) and its slots are taken back. A consumer maps files by name from descriptors sent by peers, so
a descriptor is checked before use: only ``/dev/shm/tensorcom-*`` names, sizes within the file, the batch number
still in the slot. Slot files are private to the user (mode 0600); the fast path is used only over ``ipc://``, where
the socket file already says the peer shares this host.

``TENSORCOM_SHM=0`` in the environment turns the fast path off in that process.

Stream sockets (``zpush+ipc``, ``zrpush+ipc``) carry descriptors on a *channel* of their own, a second socket at
``PATH.shm`` beside the URL's ``PATH`` (:func:`channel_url`), so that a client that cannot read descriptors
(tensorcom 0.1, ours with ``shm=False``) never receives one: it reads plain batches at ``PATH``, ours read the
channel. The side that binds listens on both; the side that connects waits until its peer listens on one of them
(:func:`listening`) and connects to the channel if it can, else to ``PATH``, so each pair of peers talks over one
socket and their batches keep their order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import mmap
import os
import re
import secrets
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np

from tensorcom import codec
from tensorcom.errors import DecodeError
from tensorcom.urls import ParsedURL

__all__ = [
    "CHANNEL_SUFFIX",
    "DESCRIPTOR_MAGIC",
    "MIN_BYTES",
    "Arena",
    "Reader",
    "StaleBatch",
    "channel_url",
    "enabled",
    "is_descriptor",
    "listening",
    "payload_size",
    "process_alive",
    "sweep",
]

log = logging.getLogger(__name__)

FOLDER = os.environ.get("TENSORCOM_SHM_DIR", "/dev/shm")
PREFIX = "tensorcom-"
DESCRIPTOR_MAGIC = b"~TenShm~"
MAGIC = b"TenShm1\0"
HEADER = 64
MIN_BYTES = 256 * 1024
"""Batches smaller than this go through the socket: below it, a descriptor saves less than it costs."""
_NAME = re.compile(r"tensorcom-[0-9]+-[0-9a-f]+-[0-9]+")
_SENT, _RELEASED, _HOLDER, _NAMESPACE = 1, 2, 3, 4
_GRANULE = 1 << 20  # slot capacities are rounded up to whole MiB so that batches of varying size reuse slots
_MAX_DESCRIPTOR = 4096
_EXPIRY_MARGIN = 5.0  # seconds between a descriptor's expiry and its producer taking the slot back


class StaleBatch(DecodeError):
    """A descriptor whose batch is gone: its slot file was deleted (the producer ended), its slot was reused, or it
    expired before it was read. A zreq client asks for the step again; a stream client counts it as malformed."""


_FOLDER_EXISTS = os.path.isdir(FOLDER)


def enabled() -> bool:
    """Whether the fast path may be used in this process: a shared-memory folder exists and $TENSORCOM_SHM is not 0."""
    setting = os.environ.get("TENSORCOM_SHM", "1").strip().lower()
    return _FOLDER_EXISTS and setting not in ("0", "false", "no", "off")


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one of another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


CHANNEL_SUFFIX = ".shm"
_SUN_PATH = 107  # longest unix socket path (sun_path holds 108 bytes with the NUL)


def channel_url(url: ParsedURL) -> ParsedURL | None:
    """The shared-memory channel of an ipc PUSH or PULL URL (same socket type and role, at ``PATH.shm``), or None
    where there is none (other transports and socket types, or a path too long for a unix socket)."""
    if url.transport != "ipc" or url.socket_type not in ("PUSH", "PULL"):
        return None
    if len(os.fsencode(url.address[len("ipc://") :])) + len(CHANNEL_SUFFIX) > _SUN_PATH:
        return None
    return dataclasses.replace(url, url=url.url + CHANNEL_SUFFIX, address=url.address + CHANNEL_SUFFIX)


_LISTENING = "00010000"  # __SO_ACCEPTCON in /proc/net/unix's Flags column


def listening(address: str) -> bool:
    """Whether some process listens on the unix socket of the ``ipc://`` ``address`` (a stale socket file left by a
    killed server does not count). Reads /proc/net/unix, so asking opens no connection to the server."""
    path = address[len("ipc://") :]
    try:
        with open("/proc/net/unix", encoding="utf-8", errors="replace") as table:
            next(table, None)
            for line in table:
                fields = line.split(None, 7)
                if len(fields) == 8 and fields[3] == _LISTENING and fields[7].rstrip("\n") == path:
                    return True
        return False
    except OSError:  # no procfs: a socket file that exists is the best guess
        return not path.startswith("@") and os.path.exists(path)


def is_descriptor(frames: Sequence[Any]) -> bool:
    """Whether a message (its frames after any routing or header frame) is a shared-memory descriptor."""
    if len(frames) != 1:
        return False
    frame = frames[0]
    data = getattr(frame, "buffer", frame)
    return bytes(memoryview(data)[: len(DESCRIPTOR_MAGIC)]) == DESCRIPTOR_MAGIC


def payload_size(frame: Any) -> int:
    """The batch size a descriptor frame announces (0 if it does not parse); for statistics only."""
    try:
        fields = msgpack.unpackb(bytes(getattr(frame, "buffer", frame))[len(DESCRIPTOR_MAGIC) :])
        return int(fields["size"])
    except Exception:  # statistics must not fail on a peer's bytes
        return 0


def sweep() -> int:
    """Delete slot files whose producer is gone (nobody holds their lock); return how many were deleted."""
    removed = 0
    try:
        names = [name for name in os.listdir(FOLDER) if _NAME.fullmatch(name)]
    except OSError:
        return 0
    for name in names:
        path = os.path.join(FOLDER, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # its producer is alive
        try:
            os.unlink(path)
            removed += 1
        except OSError:
            pass
        finally:
            os.close(fd)
    if removed:
        log.info("removed %d shared-memory slot files left by processes that ended", removed)
    return removed


class _Slot:
    """One slot file of an arena, mapped and locked by its producer."""

    def __init__(self, path: str, capacity: int) -> None:
        self.path = path
        self.capacity = capacity
        temporary = os.path.join(FOLDER, "." + os.path.basename(path))
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # held while this process lives: sweep() leaves the file alone
            os.posix_fallocate(fd, 0, HEADER + capacity)  # ENOSPC now, rather than SIGBUS on a later write
            os.rename(temporary, path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        self.fd = fd
        self.map = mmap.mmap(fd, HEADER + capacity, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.words = np.ndarray((8,), dtype="<u8", buffer=self.map)
        self.map[:8] = MAGIC
        self.sequence = 0
        self.until = 0.0

    @property
    def free(self) -> bool:
        return bool(self.words[_RELEASED] == self.words[_SENT])

    def reclaim_if_orphaned(self, namespace: int) -> bool:
        """Take the slot back if the consumer that held it has died, or if no consumer read its batch before the
        descriptor expired (its message was lost with a vanished peer); True if it did."""
        if self.free:
            return False
        holder = int(self.words[_HOLDER])
        if holder == 0:
            if time.monotonic() < self.until + _EXPIRY_MARGIN:
                return False
            log.info("a shared-memory batch was never read before it expired; taking its slot back")
        elif int(self.words[_NAMESPACE]) != namespace or process_alive(holder):
            return False
        else:
            log.info("consumer %d died holding a shared-memory slot; taking it back", holder)
        self.words[_RELEASED] = self.words[_SENT]
        return True

    def close(self) -> None:
        del self.words
        with contextlib.suppress(BufferError):
            self.map.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)


class Arena:
    """A producer's slots. :meth:`put` writes a batch into a free slot and returns its descriptor frame.

    Args:
        slots: at most this many slots (batches held by consumers or in transit at once).
        wait: seconds :meth:`put` waits for a slot to come free before giving up (the caller then sends normally).
        min_bytes: batches smaller than this are refused at once (they are cheaper through the socket).
        expire: seconds a consumer has to open a descriptor; a slot whose batch nobody opened in that time (its
            message went down with a vanished peer) is taken back. None: never (such slots stay lost, and the
            arena sends through the socket once all are).
    """

    def __init__(
        self, slots: int = 8, wait: float = 0.02, min_bytes: int = MIN_BYTES, expire: float | None = 120.0
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1. Found: {slots}")
        sweep()
        self.max_slots = slots
        self.wait = wait
        self.expire = expire
        self.min_bytes = min_bytes
        self._token = f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self._slots: list[_Slot] = []
        self._created = 0
        self._namespace = _pid_namespace()
        self._broken = False
        self.fallbacks = 0
        self.sent = 0

    @property
    def paths(self) -> list[str]:
        """The slot files this arena holds now."""
        return [slot.path for slot in self._slots]

    @property
    def free_slots(self) -> int:
        """Slots not held by a consumer (and not in transit)."""
        return sum(slot.free for slot in self._slots)

    def _new_slot(self, size: int) -> _Slot | None:
        capacity = -(-size // _GRANULE) * _GRANULE
        path = os.path.join(FOLDER, f"{self._token}-{self._created}")
        self._created += 1
        try:
            return _Slot(path, capacity)
        except OSError as error:  # /dev/shm full (a small container default) or not writable
            log.warning("shared memory unavailable (%s); sending batches through the socket", error)
            self._broken = True
            return None

    def _claim(self, size: int) -> _Slot | None:
        deadline = time.monotonic() + self.wait
        while True:
            free = [slot for slot in self._slots if slot.free]
            fitting = [slot for slot in free if slot.capacity >= size]
            if fitting:
                return min(fitting, key=lambda slot: slot.capacity)
            if len(self._slots) < self.max_slots:
                slot = self._new_slot(size)
                if slot is not None:
                    self._slots.append(slot)
                return slot
            if free:  # every free slot is too small: replace the smallest with a larger one
                old = min(free, key=lambda slot: slot.capacity)
                self._slots.remove(old)
                old.close()
                continue
            if any(slot.reclaim_if_orphaned(self._namespace) for slot in self._slots):
                continue
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.0005)

    def put(self, frames: Sequence[Any]) -> bytes | None:
        """Write ``frames`` (from :func:`tensorcom.codec.encode`) into a slot; return the descriptor frame to send
        in their place, or None (small batch, every slot held, no shared memory) to send them as they are."""
        if self._broken:
            return None
        size = codec.buffer_size(frames)
        if size < self.min_bytes:
            return None
        slot = self._claim(size)
        if slot is None:
            self.fallbacks += 1
            return None
        codec.encode_into(memoryview(slot.map)[HEADER : HEADER + size], frames)
        slot.sequence = int(slot.words[_SENT]) + 1
        slot.words[_HOLDER] = 0
        slot.words[_SENT] = slot.sequence  # after the data: a consumer checks it against the descriptor
        slot.until = float("inf") if self.expire is None else time.monotonic() + self.expire
        self.sent += 1
        fields = {"path": os.path.basename(slot.path), "seq": slot.sequence, "size": size}
        if self.expire is not None:
            fields["until"] = slot.until
        return DESCRIPTOR_MAGIC + msgpack.packb(fields, use_bin_type=True)

    def unopened(self) -> int:
        """Batches sent whose descriptor no consumer has opened yet."""
        return sum(not slot.free and int(slot.words[_HOLDER]) == 0 for slot in self._slots)

    def close(self, wait: float = 0.0) -> None:
        """Delete the slot files, first waiting up to ``wait`` seconds for consumers to open the batches sent
        (a consumer keeps what it has mapped; a descriptor opened after this fails with :class:`StaleBatch`)."""
        deadline = time.monotonic() + wait
        while self._slots and self.unopened() and time.monotonic() < deadline:
            time.sleep(0.005)
        for slot in self._slots:
            slot.close()
        self._slots = []

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class _Lease:
    """The owner of one batch's memory: every array decoded from it refers to this object, and when the last one
    is gone the slot is released. numpy keeps a reference to whatever exposes ``__array_interface__``."""

    __slots__ = ("__array_interface__", "__weakref__", "mapping")

    def __init__(self, mapping: _Mapping, offset: int, size: int) -> None:
        self.mapping = mapping
        self.__array_interface__ = {
            "data": (mapping.address + offset, False),
            "shape": (size,),
            "typestr": "|u1",
            "version": 3,
        }


class _Mapping:
    """A consumer's mapping of one slot file (kept while any batch decoded from it is alive)."""

    def __init__(self, path: str, inode: int, map_: mmap.mmap) -> None:
        self.path = path
        self.inode = inode
        self.map = map_
        self.words = np.ndarray((8,), dtype="<u8", buffer=map_)
        self.address = self.words.ctypes.data
        self.size = len(map_)


def _release(words: np.ndarray, sequence: int) -> None:
    if int(words[_SENT]) == sequence:
        words[_HOLDER] = 0
        words[_RELEASED] = sequence


class Reader:
    """A consumer's view of the producers' slots: turns descriptors into arrays and releases slots when the arrays
    are dropped. Mappings are cached by file (at most ``cache`` of them).

    A dropped batch is released by :meth:`collect`, which :meth:`read` calls (and so does every ``recv`` of a
    Connection): the moment the last view goes, only a C-level callback runs (it queues the batch). Python code run
    from a garbage-collection callback would swallow a Ctrl-C that arrived meanwhile.
    """

    def __init__(self, cache: int = 64) -> None:
        self.cache = cache
        self._mappings: OrderedDict[str, _Mapping] = OrderedDict()
        self._pid = os.getpid()
        self._namespace = _pid_namespace()
        self._lock = threading.Lock()
        self._dropped: deque[weakref.ref[_Lease]] = deque()
        self._leases: dict[weakref.ref[_Lease], tuple[np.ndarray, int]] = {}
        self.received = 0

    def collect(self) -> int:
        """Release the slots of the batches whose arrays have all been dropped; return how many."""
        released = 0
        while self._dropped:
            held = self._leases.pop(self._dropped.popleft(), None)
            if held is not None:
                _release(*held)
                released += 1
        return released

    def _mapping(self, name: str, source: str) -> _Mapping:
        mapping = self._mappings.get(name)
        if mapping is not None:
            self._mappings.move_to_end(name)
            return mapping
        path = os.path.join(FOLDER, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as error:
            raise StaleBatch(
                f"shared-memory batch from {source}: cannot open {path} ({error.strerror}); "
                "its producer may have ended"
            ) from None
        try:
            status = os.fstat(fd)
            if status.st_size <= HEADER:
                raise DecodeError(f"shared-memory batch from {source}: {path} is not a slot file")
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            map_ = mmap.mmap(fd, status.st_size, flags, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        if map_[:8] != MAGIC:
            raise DecodeError(f"shared-memory batch from {source}: {path} is not a slot file")
        mapping = _Mapping(path, status.st_ino, map_)
        self._mappings[name] = mapping
        if len(self._mappings) > self.cache:
            self._forget_stale()
        return mapping

    def _forget_stale(self) -> None:
        """Drop cached mappings whose files are gone or replaced (their memory goes once their batches do), then
        the least recently used beyond the cache size."""
        for name, mapping in list(self._mappings.items()):
            try:
                current = os.stat(mapping.path).st_ino
            except OSError:
                current = -1
            if current != mapping.inode:
                del self._mappings[name]
        while len(self._mappings) > self.cache:
            self._mappings.popitem(last=False)

    def read(self, frame: Any, source: str) -> tuple[list[np.ndarray], list[str]]:
        """The arrays (and their infos) of the batch a descriptor frame points to; views of shared memory."""
        data = bytes(memoryview(getattr(frame, "buffer", frame))[: _MAX_DESCRIPTOR + 1])
        if len(data) > _MAX_DESCRIPTOR or not data.startswith(DESCRIPTOR_MAGIC):
            raise DecodeError(f"malformed shared-memory descriptor from {source}")
        try:
            fields = msgpack.unpackb(data[len(DESCRIPTOR_MAGIC) :], raw=False, strict_map_key=True)
            name, sequence, size = fields["path"], fields["seq"], fields["size"]
            until = float(fields.get("until", "inf"))
        except Exception:  # msgpack raises several unrelated types; a map may lack keys
            raise DecodeError(f"malformed shared-memory descriptor from {source}") from None
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise DecodeError(
                f"shared-memory descriptor from {source} names no slot file: {str(name)[:100]!r}"
            )
        for value in (sequence, size):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise DecodeError(f"malformed shared-memory descriptor from {source}: {fields!r:.200}")
        with self._lock:
            mapping = self._mapping(name, source)
            if size > mapping.size - HEADER:
                raise DecodeError(
                    f"shared-memory descriptor from {source} claims {size} bytes; the slot holds "
                    f"{mapping.size - HEADER}"
                )
            if time.monotonic() >= until or int(mapping.words[_SENT]) != sequence:
                raise StaleBatch(
                    f"shared-memory batch from {source} expired or was overwritten before it was read "
                    f"(slot {name} holds batch {int(mapping.words[_SENT])}, the descriptor {sequence})"
                )
            mapping.words[_NAMESPACE] = self._namespace
            mapping.words[_HOLDER] = self._pid
            if time.monotonic() >= until + _EXPIRY_MARGIN / 2:  # stalled between the checks: do not trust it
                raise StaleBatch(f"shared-memory batch from {source} expired while it was being opened")
        self.collect()
        lease = _Lease(mapping, HEADER, size)
        self._leases[weakref.ref(lease, self._dropped.append)] = (mapping.words, sequence)
        self.received += 1
        return codec.decode_buffer(np.asarray(lease), infos=True)

    def close(self) -> None:
        """Forget the cached mappings (each goes once no batch decoded from it is alive)."""
        with self._lock:
            self._mappings.clear()
