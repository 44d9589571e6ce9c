"""The ``.ten`` tensor format: encoding lists of arrays as ZeroMQ frames, buffers and files.

This module is the wire-format specification. It is compatible with tensorcom 0.1 (``tenbin``) and imports
neither zmq nor torch.

Arrays and chunks
=================

A list of arrays ``[a0, a1, ...]`` becomes a list of *chunks* ``[hdr0, data0, hdr1, data1, ...]``: one header chunk
and one data chunk per array. There is no count and no version; the number of arrays is half the number of chunks.

Header chunk (all words little-endian int64, length ``24 + 8 * rank`` bytes)::

    offset  0        8        16       24       32            24 + 8*rank
            +--------+--------+--------+--------+----  ...  ---+
            | dtype  | info   | rank   | dim 0  | dim 1 ...    |
            +--------+--------+--------+--------+----  ...  ---+
    dtype: ASCII code NUL-padded to 8 bytes ("u1", "f4", ... see DTYPE_CODES)
    info:  up to 8 ASCII characters NUL-padded (a free-form label, e.g. a field name)
    rank:  number of dimensions (0 for a scalar)

Data chunk: the array's raw bytes in C order, little-endian. Its length must equal
``prod(shape) * itemsize``.

The dtype codes of tensorcom 0.1 are ``f2 f4 f8 i1 i2 i4 i8 u1 u2 u8``. This implementation adds ``u4`` (uint32;
the original misspelled it, so it never worked there), ``b1`` (bool) and ``bf16`` (bfloat16, via ml_dtypes).

Multipart messages
==================

Over ZeroMQ, each chunk is one frame: ``[hdr0, data0, hdr1, data1, ...]``. :func:`encode` returns the frames (data
frames are views of the arrays, never copies); :func:`decode` builds arrays with ``numpy.frombuffer`` on the received
buffers, so decoding costs the same for any batch size.

Buffers and files
=================

A single buffer (and a ``.ten`` file, which is one buffer) holds the chunks one after another, each chunk framed.
Two framings exist, and readers accept both, chunk by chunk:

Original framing (tensorcom 0.1; chunk k's payload sits at offset 16·(k+1) mod 64, so most are unaligned)::

    +----------+---------+---------------------------+
    | ~TenBin~ | n: i64  | payload (n bytes), zeros  |   chunk length = 16 + roundup(n, 64)
    +----------+---------+---------------------------+
    0          8         16

Aligned framing (written by this implementation by default; every payload at offset = 0 mod 64)::

    +----------+---------+----------------+---------------------------+
    | ~TenA64~ | n: i64  | 48 zero bytes  | payload (n bytes), zeros  |   chunk length = 64 + roundup(n, 64)
    +----------+---------+----------------+---------------------------+
    0          8         16               64

Since every aligned chunk starts and ends on a 64-byte boundary, every payload of a buffer or file starts on one,
so memory-mapped arrays are aligned for SIMD and DMA. tensorcom 0.1 rejects the aligned magic with an error rather
than misreading it; write ``aligned=False`` to produce files it can read.
"""

from __future__ import annotations

import functools
import mmap as _mmap
import os
from collections.abc import Sequence
from typing import Any, Literal, overload

import numpy as np

from tensorcom.errors import DecodeError

__all__ = [
    "ALIGNED_MAGIC",
    "DTYPE_CODES",
    "MAGIC",
    "bfloat16",
    "buffer_size",
    "data_size",
    "decode",
    "decode_buffer",
    "encode",
    "encode_buffer",
    "encode_into",
    "is_bfloat16",
    "load",
    "save",
]

MAGIC = b"~TenBin~"
ALIGNED_MAGIC = b"~TenA64~"
ALIGNMENT = 64
MAX_RANK = 32
MAX_INFO = 8
_HEADER_CACHE_SIZE = 1024  # headers remembered by the encoder and by the decoder (each)

DTYPE_CODES: dict[str, np.dtype[Any]] = {
    "f2": np.dtype("<f2"),
    "f4": np.dtype("<f4"),
    "f8": np.dtype("<f8"),
    "i1": np.dtype("i1"),
    "i2": np.dtype("<i2"),
    "i4": np.dtype("<i4"),
    "i8": np.dtype("<i8"),
    "u1": np.dtype("u1"),
    "u2": np.dtype("<u2"),
    "u4": np.dtype("<u4"),
    "u8": np.dtype("<u8"),
    "b1": np.dtype("bool"),
}
"""The dtype of each code; ``bf16`` (bfloat16) is added on first use, when ml_dtypes is imported (it takes
most of a second to load, so ``import tensorcom`` does not load it)."""
_CODE_OF: dict[tuple[str, int], str] = {(dt.kind, dt.itemsize): code for code, dt in DTYPE_CODES.items()}
_CODE_BYTES: dict[bytes, np.dtype[Any]] = {
    code.encode("ascii").ljust(8, b"\0"): dt for code, dt in DTYPE_CODES.items()
}
_BF16 = b"bf16".ljust(8, b"\0")


def is_bfloat16(dtype: np.dtype[Any]) -> bool:
    """Whether ``dtype`` is ml_dtypes' bfloat16 (checked without importing ml_dtypes)."""
    return dtype.kind == "V" and dtype.name == "bfloat16"


@functools.cache
def bfloat16() -> np.dtype[Any]:
    """ml_dtypes' bfloat16 dtype, importing ml_dtypes on first use; registers the ``bf16`` code."""
    import ml_dtypes

    dtype = np.dtype(ml_dtypes.bfloat16)
    DTYPE_CODES["bf16"] = _CODE_BYTES[_BF16] = dtype
    return dtype


Frame = Any  # bytes, bytearray, memoryview, numpy array, or a zmq.Frame: anything with the buffer protocol


def _dtype_code(dtype: np.dtype[Any]) -> str:
    if is_bfloat16(dtype):
        return "bf16"
    code = _CODE_OF.get((dtype.kind, dtype.itemsize))
    if code is None:
        supported = ", ".join(sorted({str(dt) for dt in DTYPE_CODES.values()} | {"bfloat16"}))
        raise ValueError(f"dtype {dtype} cannot be encoded in .ten; supported: {supported}")
    return code


def _as_wire_array(value: Any) -> np.ndarray:
    """Return ``value`` as a C-contiguous little-endian array, copying only when it must."""
    if not isinstance(value, np.ndarray):
        if hasattr(value, "detach") and hasattr(value, "numpy"):  # a torch tensor, without importing torch
            value = _torch_to_numpy(value)
        else:
            value = np.asarray(value)
    if value.dtype.byteorder == ">" or (value.dtype.byteorder == "=" and np.little_endian is False):
        value = value.astype(value.dtype.newbyteorder("<"))
    return (
        value if value.flags.c_contiguous else value.copy(order="C")
    )  # ascontiguousarray would make 0-d 1-d


def _torch_to_numpy(tensor: Any) -> np.ndarray:
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if str(tensor.dtype) == "torch.bfloat16":
        import torch

        return tensor.contiguous().view(torch.int16).numpy().view(bfloat16())
    return tensor.numpy()


_encoded_headers: dict[tuple[np.dtype[Any], tuple[int, ...], str], bytes] = {}


def _encode_header(array: np.ndarray, info: str) -> bytes:
    key = (array.dtype, array.shape, info)
    header = _encoded_headers.get(key)
    if header is not None:
        return header
    if array.ndim > MAX_RANK:
        raise ValueError(f"array rank must be <= {MAX_RANK}. Found: {array.ndim}")
    if not info.isascii() or len(info) > MAX_INFO:
        raise ValueError(f"info must be at most {MAX_INFO} ASCII characters. Found: {info!r}")
    code = _dtype_code(array.dtype).encode("ascii").ljust(8, b"\0")
    dims = np.array([array.ndim, *array.shape], dtype="<i8").tobytes()
    if len(_encoded_headers) >= _HEADER_CACHE_SIZE:
        _encoded_headers.clear()
    header = _encoded_headers[key] = code + info.encode("ascii").ljust(8, b"\0") + dims
    return header


def encode(arrays: Sequence[Any], infos: Sequence[str] | None = None) -> list[Any]:
    """Encode arrays as the frames ``[hdr0, data0, hdr1, data1, ...]``.

    Data frames are memoryviews of the arrays (no copy) unless an array had to be made contiguous or
    little-endian first. Accepts numpy arrays, numbers, nested lists and CPU or device torch tensors.
    """
    if isinstance(arrays, np.ndarray):
        raise TypeError("encode takes a sequence of arrays; wrap a single array in a list")
    if infos is not None and len(infos) != len(arrays):
        raise ValueError(f"infos must have one entry per array ({len(arrays)}). Found: {len(infos)}")
    frames: list[Any] = []
    for i, value in enumerate(arrays):
        array = _as_wire_array(value)
        frames.append(_encode_header(array, infos[i] if infos is not None else ""))
        frames.append(array.reshape(-1).view(np.uint8).data if array.size else b"")
    return frames


def _buffer(frame: Frame) -> memoryview:
    buffer = getattr(frame, "buffer", None)  # zmq.Frame exposes its bytes without a copy here
    view = memoryview(buffer if buffer is not None else frame)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    return view


def _decode_header(header: memoryview, where: str) -> tuple[np.dtype[Any], str, tuple[int, ...]]:
    size = len(header)
    if size < 24 or size % 8:
        raise DecodeError(f"{where}: header must be 24 + 8*rank bytes long. Found: {size} bytes")
    code = bytes(header[0:8])
    dtype = _CODE_BYTES.get(code)
    if dtype is None:
        if code != _BF16:
            known = ", ".join([*(c for c in DTYPE_CODES if c != "bf16"), "bf16"])
            raise DecodeError(f"{where}: unknown dtype code {code.rstrip(bytes(1))!r}; known: {known}")
        dtype = bfloat16()
    raw_info = bytes(header[8:16]).rstrip(b"\0")
    if not raw_info.isascii():
        raise DecodeError(f"{where}: info field is not ASCII: {raw_info!r}")
    words = np.frombuffer(header, dtype="<i8", offset=16)
    rank = int(words[0])
    if not 0 <= rank <= MAX_RANK:
        raise DecodeError(f"{where}: rank must be between 0 and {MAX_RANK}. Found: {rank}")
    if len(words) != rank + 1:
        raise DecodeError(
            f"{where}: header of rank {rank} must be {24 + 8 * rank} bytes long. Found: {size} bytes"
        )
    shape = tuple(int(d) for d in words[1:])
    if any(d < 0 for d in shape):
        raise DecodeError(f"{where}: negative dimension in shape {shape}")
    return dtype, raw_info.decode("ascii"), shape


_header_cache: dict[bytes, tuple[np.dtype[Any], str, tuple[int, ...], int]] = {}


def _parsed_header(header: bytes, where: str) -> tuple[np.dtype[Any], str, tuple[int, ...], int]:
    """``(dtype, info, shape, nbytes)`` of a header chunk. A stream repeats the same few headers batch after batch,
    so parsed headers are kept (at most ``_HEADER_CACHE_SIZE``; only valid ones): decoding a small batch is then
    two dictionary lookups rather than a parse per array."""
    parsed = _header_cache.get(header)
    if parsed is None:
        dtype, info, shape = _decode_header(memoryview(header), where)
        nbytes = dtype.itemsize
        for dim in shape:
            nbytes *= dim  # Python ints: a lying shape cannot overflow into a small number
        if len(_header_cache) >= _HEADER_CACHE_SIZE:
            _header_cache.clear()
        parsed = _header_cache[header] = (dtype, info, shape, nbytes)
    return parsed


def data_size(header: Frame) -> int | None:
    """The length of the data frame that follows ``header``, or None if ``header`` is not a valid header chunk.
    Lets a receiver allocate a data frame's buffer before the frame arrives."""
    key = header if type(header) is bytes else bytes(_buffer(header))
    parsed = _header_cache.get(key)
    if parsed is None:
        if len(key) < 24 or len(key) % 8 or key[:8] not in _CODE_BYTES:
            return None
        try:
            parsed = _parsed_header(key, "header")
        except DecodeError:
            return None
    return parsed[3]


@overload
def decode(frames: Sequence[Frame], infos: Literal[False] = False) -> list[np.ndarray]: ...
@overload
def decode(frames: Sequence[Frame], infos: Literal[True]) -> tuple[list[np.ndarray], list[str]]: ...
def decode(
    frames: Sequence[Frame], infos: bool = False
) -> list[np.ndarray] | tuple[list[np.ndarray], list[str]]:
    """Decode frames ``[hdr0, data0, ...]`` into arrays that are views of the frames' buffers.

    Arrays are writable when the frames are (received zmq frames are). With ``infos=True``, return
    ``(arrays, infos)``. Raises :class:`DecodeError` naming the frame for any malformed input.
    """
    if len(frames) % 2:
        raise DecodeError(
            f"a .ten message needs an even number of frames (header, data pairs). Found: {len(frames)}"
        )
    arrays: list[np.ndarray] = []
    labels: list[str] = []
    for i in range(0, len(frames), 2):
        header = frames[i]
        dtype, info, shape, nbytes = _parsed_header(
            header if type(header) is bytes else bytes(_buffer(header)),
            f"array {i // 2} (frames {i} and {i + 1})",
        )
        data = _buffer(frames[i + 1])
        if nbytes != len(data):
            raise DecodeError(
                f"array {i // 2} (frames {i} and {i + 1}): shape {shape} of {dtype} needs {nbytes} bytes of data. "
                f"Found: {len(data)} bytes"
            )
        try:
            arrays.append(np.ndarray(shape, dtype, buffer=data))
        except (ValueError, TypeError) as error:
            # e.g. a zero-size shape with a dimension numpy cannot represent
            raise DecodeError(f"array {i // 2}: shape {shape} cannot be built: {error}") from None
        labels.append(info)
    return (arrays, labels) if infos else arrays


def _roundup(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def _chunk_prefix(length: int, aligned: bool) -> bytes:
    size = np.array([length], dtype="<i8").tobytes()
    return ALIGNED_MAGIC + size + bytes(48) if aligned else MAGIC + size


def _framed_size(chunks: Sequence[memoryview], aligned: bool) -> int:
    prefix = 64 if aligned else 16
    return sum(prefix + _roundup(len(c)) for c in chunks)


def _write_chunks(target: memoryview, chunks: Sequence[memoryview], aligned: bool) -> None:
    offset = 0
    for chunk in chunks:
        prefix = _chunk_prefix(len(chunk), aligned)
        target[offset : offset + len(prefix)] = prefix
        offset += len(prefix)
        target[offset : offset + len(chunk)] = chunk
        offset += _roundup(len(chunk))


def buffer_size(frames: Sequence[Frame], *, aligned: bool = True) -> int:
    """The bytes a buffer holding ``frames`` (from :func:`encode`) takes in the given framing."""
    return _framed_size([_buffer(f) for f in frames], aligned)


def encode_into(target: Frame, frames: Sequence[Frame]) -> int:
    """Write ``frames`` (from :func:`encode`) into ``target`` (writable, at least :func:`buffer_size` bytes) as one
    aligned buffer, as :func:`encode_buffer` would make it; return the bytes written. Padding is left as it was."""
    chunks = [_buffer(f) for f in frames]
    size = _framed_size(chunks, True)
    view = _buffer(target)
    if len(view) < size:
        raise ValueError(f"target holds {len(view)} bytes; the buffer needs {size}")
    _write_chunks(view, chunks, True)
    return size


def encode_buffer(
    arrays: Sequence[Any], infos: Sequence[str] | None = None, *, aligned: bool = True
) -> bytearray:
    """Encode arrays as one buffer (the content of a ``.ten`` file); see the module docstring for the framing.
    Aligned by default, which tensorcom 0.1 cannot read; ``aligned=False`` gives the original framing."""
    chunks = [_buffer(f) for f in encode(arrays, infos)]
    result = bytearray(_framed_size(chunks, aligned))  # zero-filled, so padding is zeros
    _write_chunks(memoryview(result), chunks, aligned)
    return result


def _split_chunks(buffer: memoryview, source: str) -> list[memoryview]:
    chunks: list[memoryview] = []
    offset = 0
    total = len(buffer)
    while offset < total:
        where = f"{source}: chunk {len(chunks)} at byte {offset}"
        if total - offset < 16:
            raise DecodeError(f"{where}: truncated chunk prefix ({total - offset} of 16 bytes)")
        magic = bytes(buffer[offset : offset + 8])
        if magic == MAGIC:
            prefix = 16
        elif magic == ALIGNED_MAGIC:
            prefix = 64
        else:
            raise DecodeError(f"{where}: wrong magic {magic!r}; expected {MAGIC!r} or {ALIGNED_MAGIC!r}")
        length = int(np.frombuffer(buffer, dtype="<i8", count=1, offset=offset + 8)[0])
        start = offset + prefix
        if length < 0 or start + length > total:
            raise DecodeError(
                f"{where}: chunk claims {length} bytes but only {max(total - start, 0)} remain in the buffer"
            )
        chunks.append(buffer[start : start + length])
        offset = min(start + _roundup(length), total)
    return chunks


@overload
def decode_buffer(buffer: Frame, infos: Literal[False] = False) -> list[np.ndarray]: ...
@overload
def decode_buffer(buffer: Frame, infos: Literal[True]) -> tuple[list[np.ndarray], list[str]]: ...
def decode_buffer(
    buffer: Frame, infos: bool = False
) -> list[np.ndarray] | tuple[list[np.ndarray], list[str]]:
    """Decode a single buffer in either framing; arrays are views of ``buffer``."""
    chunks = _split_chunks(_buffer(buffer), "buffer")
    return decode(chunks, infos=True) if infos else decode(chunks)


def save(
    path: str | os.PathLike[str],
    arrays: Sequence[Any],
    infos: Sequence[str] | None = None,
    *,
    aligned: bool = True,
) -> None:
    """Write arrays to a ``.ten`` file.

    By default every payload is 64-byte aligned (:func:`load` memory-maps it, aligned for SIMD and DMA), which
    tensorcom 0.1 cannot read: it stops at the aligned magic with an error. For a file that tensorcom 0.1 (or a
    program using its ``tenbin``) must read, pass ``aligned=False``: the original framing, which this module reads
    as well. (:func:`tensorcom.tenbin.save`, the 0.1 face, writes the original framing.)
    """
    chunks = [_buffer(f) for f in encode(arrays, infos)]
    with open(path, "wb") as stream:
        for chunk in chunks:
            stream.write(_chunk_prefix(len(chunk), aligned))
            stream.write(chunk)
            stream.write(bytes(_roundup(len(chunk)) - len(chunk)))


@overload
def load(
    path: str | os.PathLike[str], mmap: bool = True, infos: Literal[False] = False
) -> list[np.ndarray]: ...
@overload
def load(
    path: str | os.PathLike[str], mmap: bool, infos: Literal[True]
) -> tuple[list[np.ndarray], list[str]]: ...
def load(
    path: str | os.PathLike[str], mmap: bool = True, infos: bool = False
) -> list[np.ndarray] | tuple[list[np.ndarray], list[str]]:
    """Read a ``.ten`` file. With ``mmap=True`` the arrays are read-only views of a memory map (nothing is read
    until touched); with ``mmap=False`` the file is read into memory and the arrays are writable."""
    source = os.fspath(path)
    with open(source, "rb") as stream:
        if mmap:
            size = os.fstat(stream.fileno()).st_size
            data: Any = _mmap.mmap(stream.fileno(), 0, access=_mmap.ACCESS_READ) if size else b""
        else:
            data = bytearray(stream.read())
    chunks = _split_chunks(memoryview(data), source)
    return decode(chunks, infos=True) if infos else decode(chunks)
