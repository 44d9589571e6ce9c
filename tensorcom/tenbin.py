"""tensorcom 0.1's ``tenbin`` module: the same names, signatures and results, as a thin face over :mod:`tensorcom.codec`.

A program written for tensorcom 0.1 keeps its ``from tensorcom import tenbin``. The format is the one
:mod:`tensorcom.codec` specifies (its docstring has the byte layout); this module only keeps 0.1's calling
conventions:

- Writers (:func:`encode_chunks`, :func:`encode_buffer`, :func:`write_chunk`, :func:`write`, :func:`save`,
  :func:`zsend_single`) produce 0.1's framing (``~TenBin~``, length, payload padded to 64 bytes), byte for byte what
  0.1 wrote, since their readers may be 0.1 programs. Readers accept that framing and our aligned one (``~TenA64~``,
  what :func:`tensorcom.codec.save` writes by default).
- ``infos`` behaves as in 0.1: writers take one label (up to 8 ASCII characters) per array or None; readers take
  ``infos=False`` (return the arrays), ``True`` (return ``(arrays, infos)``) or a list of labels the data must carry.

Deliberate differences from 0.1:

- Bad input raises :class:`TenbinDecodeError` (malformed bytes) or :class:`TenbinConfigError` (an argument that
  cannot work) with a message saying what is wrong and where, where 0.1 had bare ``assert`` statements (gone under
  ``python -O``) or read out of bounds. Both are :class:`tensorcom.DecodeError` / :class:`tensorcom.ConfigError`
  (so ``ValueError``) *and* ``AssertionError``: code that caught 0.1's errors still catches ours.
- uint32 works (0.1 spelled it ``unit32`` in :data:`long_to_short`, so ``u4`` never did); readers also accept what
  our codec writes beyond 0.1 (bool, bfloat16, rank above 9). Integers are explicitly little-endian (0.1 used the
  machine's order, which is the same on every machine it ran on).
- A lone trailing frame in :func:`decode_list` is ignored, as 0.1 ignored it (a server of ours may append a
  metadata frame there); a data chunk must hold exactly the bytes its header announces.
- :func:`encode_header` returns ``bytes`` (0.1: a memoryview of int64 words, same bytes); :func:`encode_list`'s data
  chunks and :func:`decode_chunks`' chunks are memoryviews, never copies; :func:`zsend_multipart` sends large
  frames without copying them, so an array must not be modified until the message has left (0.1 copied it).
- File names may be ``os.PathLike``; :func:`read_chunk` reads a chunk in bounded pieces, so a lying length cannot
  make it allocate more than the stream holds.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from typing import IO, Any

import numpy as np

from tensorcom import codec
from tensorcom.errors import ConfigError, DecodeError

__all__ = [
    "TenbinConfigError",
    "TenbinDecodeError",
    "bytedata",
    "bytelen",
    "check_acceptable_input_type",
    "check_infos",
    "decode_buffer",
    "decode_chunks",
    "decode_header",
    "decode_list",
    "encode_buffer",
    "encode_chunks",
    "encode_header",
    "encode_list",
    "load",
    "long_to_short",
    "magic",
    "magic_bytes",
    "magic_str",
    "read",
    "read_chunk",
    "roundup",
    "save",
    "sctp_recv",
    "sctp_send",
    "short_to_long",
    "str64",
    "unstr64",
    "write",
    "write_chunk",
    "zrecv_multipart",
    "zrecv_single",
    "zsend_multipart",
    "zsend_single",
]


class TenbinDecodeError(DecodeError, AssertionError):
    """Bytes that are not a valid ``.ten`` encoding; also an AssertionError, what tensorcom 0.1 raised."""


class TenbinConfigError(ConfigError, AssertionError):
    """An argument tenbin cannot work with; also an AssertionError, what tensorcom 0.1 raised."""


long_to_short: dict[str, str] = {
    "float16": "f2",
    "float32": "f4",
    "float64": "f8",
    "int8": "i1",
    "int16": "i2",
    "int32": "i4",
    "int64": "i8",
    "uint8": "u1",
    "uint16": "u2",
    "uint32": "u4",
    "uint64": "u8",
}
"""The dtypes tensorcom 0.1 could send, by numpy name, with their wire codes."""
short_to_long: dict[str, str] = {code: name for name, code in long_to_short.items()}
_WIDE = ("float64", "int64", "uint64")
_INT64 = struct.Struct("<q")
_READ_PIECE = 1 << 24  # read_chunk reads at most this many bytes at a time


def bytelen(a: Any) -> int:
    """The length of ``a`` (an array, bytes, bytearray or memoryview) in bytes."""
    if hasattr(a, "nbytes"):
        return int(a.nbytes)
    if isinstance(a, bytes | bytearray):
        return len(a)
    raise TenbinConfigError(
        f"cannot tell the byte length of a {type(a).__name__}; expected an array, bytes or bytearray"
    )


def bytedata(a: Any) -> Any:
    """The raw data of ``a``: bytes, bytearray and memoryview as they are, an array's ``.data``."""
    if isinstance(a, bytes | bytearray | memoryview):
        return a
    if hasattr(a, "data"):
        return a.data
    raise TenbinConfigError(
        f"cannot take the raw data of a {type(a).__name__}; expected an array, bytes, bytearray or memoryview"
    )


def _dtype_name(a: Any) -> str:
    dtype = getattr(a, "dtype", None)
    if dtype is None:
        raise TenbinConfigError(f"expected an array (numpy or torch). Found: {type(a).__name__}")
    return getattr(dtype, "name", None) or str(dtype).removeprefix("torch.")


def check_acceptable_input_type(data: Sequence[Any], allow64: bool) -> None:
    """Refuse arrays of a dtype 0.1 cannot carry, and 64-bit ones unless ``allow64``."""
    for index, a in enumerate(data):
        name = _dtype_name(a)
        if name not in long_to_short:
            raise TenbinConfigError(
                f"array {index}: dtype {name} cannot be sent; expected one of {', '.join(long_to_short)}"
            )
        if not allow64 and name in _WIDE:
            raise TenbinConfigError(
                f"array {index}: 64-bit dtype {name} is refused unless allow64=True "
                "(convert it, e.g. to int32 or float32, or pass allow64=True)"
            )


def str64(s: str) -> int:
    """Pack up to 8 ASCII characters (NUL-padded) into an int64, as header words hold them."""
    if not isinstance(s, str) or not s.isascii() or len(s) > 8:
        raise TenbinConfigError(f"expected a string of at most 8 ASCII characters. Found: {s!r}")
    value: int = _INT64.unpack(s.encode("ascii").ljust(8, b"\0"))[0]
    return value


def unstr64(i: int) -> str:
    """The string :func:`str64` packed into ``i``."""
    try:
        return _INT64.pack(int(i)).decode("ascii").strip("\0")
    except (struct.error, UnicodeDecodeError) as error:
        raise TenbinDecodeError(f"{i!r} does not hold an ASCII string: {error}") from None


def check_infos(data: list[Any], infos: list[str], required_infos: Any = None) -> Any:
    """What a reader returns for its ``infos`` argument: the arrays (False or None), ``(arrays, infos)`` (True), or
    the arrays after checking that each carries the label required at its position (a list)."""
    if required_infos is False or required_infos is None:
        return data
    if required_infos is True:
        return data, infos
    if not isinstance(required_infos, tuple | list):
        raise TenbinConfigError(f"infos must be False, True or a list of labels. Found: {required_infos!r}")
    for index, (required, actual) in enumerate(zip(required_infos, infos)):  # noqa: B905 (0.1 compares a prefix)
        if required != actual:
            raise TenbinDecodeError(f"array {index} carries info {actual!r}; {required!r} is required")
    return data


def _encoded(arrays: Sequence[Any], infos: Sequence[str] | None) -> list[Any]:
    try:
        return codec.encode(arrays, infos)
    except DecodeError:
        raise
    except (ValueError, TypeError) as error:
        raise TenbinConfigError(str(error)) from None


def encode_header(a: Any, info: str = "") -> bytes:
    """The header chunk of array ``a`` (dtype code, info, rank, shape as little-endian int64 words)."""
    header: bytes = _encoded([a], [info])[0]
    return header


def decode_header(h: Any) -> tuple[tuple[int, ...], np.dtype[Any], str]:
    """``(shape, dtype, info)`` from a header chunk."""
    header = bytes(h)
    if header[:8] == b"bf16".ljust(8, b"\0"):
        codec.bfloat16()  # registers the code, so that the header validates
    if codec.data_size(header) is None:  # not a valid header: let the codec say why
        try:
            codec.decode([header, b""])
        except DecodeError as error:
            raise TenbinDecodeError(str(error)) from None
        raise TenbinDecodeError(f"not a .ten header chunk: {header[:64]!r}")
    words = np.frombuffer(header, dtype="<i8")
    dtype = codec.DTYPE_CODES[header[:8].rstrip(b"\0").decode("ascii")]
    shape = tuple(int(d) for d in words[3:])
    return shape, dtype, header[8:16].rstrip(b"\0").decode("ascii")


def encode_list(l: Sequence[Any], infos: Sequence[str] | None = None) -> list[Any]:  # noqa: E741 (0.1's name)
    """Encode arrays as chunks ``[hdr0, data0, hdr1, data1, ...]``; ``infos``: one label per array, or None."""
    if infos is not None and len(infos) != len(l):
        raise TenbinConfigError(f"infos must have one label per array ({len(l)}). Found: {len(infos)}")
    return _encoded(l, infos)


def decode_list(l: Sequence[Any], infos: Any = False) -> Any:  # noqa: E741 (0.1's name)
    """Decode chunks ``[hdr0, data0, ...]`` into arrays (views of the chunks); see :func:`check_infos` for
    ``infos``. A lone trailing chunk is ignored, as 0.1 ignored it."""
    chunks = list(l)
    if len(chunks) % 2:
        chunks = chunks[:-1]
    try:
        arrays, labels = codec.decode(chunks, infos=True)
    except DecodeError as error:
        raise TenbinDecodeError(str(error)) from None
    return check_infos(arrays, labels, infos)


magic_str = "~TenBin~"
magic = str64(magic_str)
magic_bytes = codec.MAGIC


def roundup(n: int, k: int = 64) -> int:
    """``n`` rounded up to a multiple of ``k``."""
    return k * ((n + k - 1) // k)


def encode_chunks(l: Sequence[Any]) -> bytearray:  # noqa: E741 (0.1's name)
    """Frame chunks into one buffer in 0.1's layout: per chunk ``~TenBin~``, its length, the bytes padded to 64."""
    views = [memoryview(bytedata(chunk)).cast("B") for chunk in l]
    result = bytearray(sum(16 + roundup(len(view)) for view in views))
    offset = 0
    for view in views:
        result[offset : offset + 16] = magic_bytes + _INT64.pack(len(view))
        offset += 16
        result[offset : offset + len(view)] = view
        offset += roundup(len(view))
    return result


def _prefix_size(found: bytes, where: str) -> int:
    if found == codec.MAGIC:
        return 16
    if found == codec.ALIGNED_MAGIC:
        return codec.ALIGNMENT
    raise TenbinDecodeError(
        f"{where}: wrong magic {found!r}; expected {codec.MAGIC!r} or {codec.ALIGNED_MAGIC!r}"
    )


def decode_chunks(buf: Any) -> list[memoryview]:
    """Split a buffer (either framing) into its chunks, as memoryviews of ``buf``."""
    view = memoryview(bytedata(buf)).cast("B")
    chunks: list[memoryview] = []
    offset = 0
    while offset < len(view):
        where = f"chunk {len(chunks)} at byte {offset}"
        if len(view) - offset < 16:
            raise TenbinDecodeError(f"{where}: truncated chunk prefix ({len(view) - offset} of 16 bytes)")
        start = offset + _prefix_size(bytes(view[offset : offset + 8]), where)
        nbytes = _INT64.unpack(view[offset + 8 : offset + 16])[0]
        if nbytes < 0 or start + nbytes > len(view):
            raise TenbinDecodeError(
                f"{where}: chunk claims {nbytes} bytes but only {max(len(view) - start, 0)} remain"
            )
        chunks.append(view[start : start + nbytes])
        offset = min(start + roundup(nbytes), len(view))
    return chunks


def encode_buffer(l: Sequence[Any], infos: Sequence[str] | None = None) -> bytearray:  # noqa: E741 (0.1's name)
    """Encode arrays as one buffer in 0.1's layout (what a ``.ten`` file holds)."""
    if infos is not None and len(infos) != len(l):
        raise TenbinConfigError(f"infos must have one label per array ({len(l)}). Found: {len(infos)}")
    try:
        return codec.encode_buffer(l, infos, aligned=False)
    except DecodeError:
        raise
    except (ValueError, TypeError) as error:
        raise TenbinConfigError(str(error)) from None


def decode_buffer(buf: Any, infos: Any = False) -> Any:
    """Decode a buffer (either framing) into arrays, views of ``buf``; see :func:`check_infos` for ``infos``."""
    return decode_list(decode_chunks(buf), infos=infos)


def write_chunk(stream: IO[bytes], buf: Any) -> None:
    """Write one chunk to a binary stream in 0.1's framing."""
    data = memoryview(bytedata(buf)).cast("B")
    stream.write(magic_bytes + _INT64.pack(len(data)))
    stream.write(data)
    padding = roundup(len(data)) - len(data)
    if padding:
        stream.write(bytes(padding))


def _read_exactly(stream: IO[bytes], nbytes: int, what: str) -> bytes:
    pieces = []
    missing = nbytes
    while missing > 0:
        piece = stream.read(min(missing, _READ_PIECE))
        if not piece:
            raise TenbinDecodeError(f"{what}: the stream ends {missing} bytes short of {nbytes}")
        pieces.append(piece)
        missing -= len(piece)
    return b"".join(pieces)


def read_chunk(stream: IO[bytes]) -> bytes | None:
    """Read one chunk (either framing) from a binary stream; None at the end of the stream."""
    found = stream.read(8)
    if found == b"":
        return None
    if len(found) < 8:
        raise TenbinDecodeError(f"truncated chunk magic ({len(found)} of 8 bytes)")
    prefix = _prefix_size(found, "chunk")
    nbytes = _INT64.unpack(_read_exactly(stream, 8, "chunk length"))[0]
    if nbytes < 0:
        raise TenbinDecodeError(f"chunk length must be >= 0. Found: {nbytes}")
    _read_exactly(stream, prefix - 16, "chunk prefix")
    data = _read_exactly(stream, nbytes, f"chunk of {nbytes} bytes")
    padding = roundup(nbytes) - nbytes
    if padding:
        stream.read(padding)  # the last chunk of a file may lack its padding
    return data


def write(stream: IO[bytes], l: Sequence[Any], infos: Sequence[str] | None = None) -> None:  # noqa: E741
    """Write arrays to a binary stream in 0.1's framing."""
    for chunk in encode_list(l, infos=infos):
        write_chunk(stream, chunk)


def read(stream: IO[bytes], n: int = 999999, infos: Any = False) -> Any:
    """Read at most ``n`` arrays from a binary stream (either framing); see :func:`check_infos` for ``infos``."""
    chunks: list[bytes] = []
    for _ in range(n):
        header = read_chunk(stream)
        if header is None:
            break
        data = read_chunk(stream)
        if data is None:
            raise TenbinDecodeError(f"the stream ends after the header of array {len(chunks) // 2}")
        chunks += [header, data]
    return decode_list(chunks, infos=infos)


def _check_name(fname: str | os.PathLike[str], nocheck: bool) -> str:
    name = os.fspath(fname)
    if not nocheck and not name.endswith(".ten"):
        raise TenbinConfigError(f"a .ten file name must end in .ten (or pass nocheck=True). Found: {name!r}")
    return name


def save(
    fname: str | os.PathLike[str], *args: Any, infos: Sequence[str] | None = None, nocheck: bool = False
) -> None:
    """Write the arrays ``args`` to a ``.ten`` file in 0.1's framing (0.1 reads it)."""
    name = _check_name(fname, nocheck)
    if infos is not None and len(infos) != len(args):
        raise TenbinConfigError(f"infos must have one label per array ({len(args)}). Found: {len(infos)}")
    try:
        codec.save(name, args, infos, aligned=False)
    except DecodeError:
        raise
    except (ValueError, TypeError) as error:
        raise TenbinConfigError(str(error)) from None


def load(fname: str | os.PathLike[str], infos: Any = False, nocheck: bool = False) -> Any:
    """Read a ``.ten`` file (either framing) into writable arrays; see :func:`check_infos` for ``infos``."""
    name = _check_name(fname, nocheck)
    try:
        arrays, labels = codec.load(name, mmap=False, infos=True)
    except DecodeError as error:
        raise TenbinDecodeError(str(error)) from None
    return check_infos(arrays, labels, infos)


def zsend_single(socket: Any, l: Sequence[Any], infos: Sequence[str] | None = None) -> Any:  # noqa: E741
    """Send arrays as a one-frame ZMQ message (one buffer in 0.1's framing)."""
    return socket.send(encode_buffer(l, infos=infos))


def zrecv_single(socket: Any, infos: Any = False) -> Any:
    """Receive a one-frame ZMQ message and decode its arrays."""
    return decode_buffer(socket.recv(), infos=infos)


def zsend_multipart(socket: Any, l: Sequence[Any], infos: Sequence[str] | None = None) -> Any:  # noqa: E741
    """Send arrays as a multipart ZMQ message ``[hdr0, data0, ...]``; frames of 64 kB and more are not copied."""
    return socket.send_multipart(encode_list(l, infos=infos), copy=False)


def zrecv_multipart(socket: Any, infos: Any = False) -> Any:
    """Receive a multipart ZMQ message and decode its arrays (views of the received frames, no copy)."""
    return decode_list(socket.recv_multipart(copy=False), infos=infos)


def sctp_send(socket: Any, dest: Any, l: Sequence[Any], infos: Sequence[str] | None = None) -> None:  # noqa: E741
    """Send arrays as one SCTP datagram (a convenience, as in 0.1)."""
    socket.sctp_send(bytes(encode_buffer(l, infos=infos)), to=dest)


def sctp_recv(socket: Any, infos: Any = False, maxsize: int = 100000000) -> Any:
    """Accept an SCTP connection and decode the arrays of its first datagram (a convenience, as in 0.1)."""
    client, _ = socket.accept()
    _, _, data, _ = client.sctp_recv(maxsize)
    return decode_buffer(data, infos=infos)
