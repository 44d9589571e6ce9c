"""The .ten codec: round trips, the wire format of tensorcom 0.1, alignment, zero copy and hostile input."""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from helpers import assert_same_batch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tensorcom import DecodeError, codec

DTYPES = ["f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "bool"]

# Produced by tensorcom 0.1.0 (tenbin.encode_list / encode_buffer) for GOLDEN_ARRAYS with infos ["img", "lbl"].
GOLDEN_FRAMES = [
    "7531000000000000696d670000000000020000000000000002000000000000000300000000000000",
    "000102030405",
    "66340000000000006c626c000000000001000000000000000200000000000000",
    "0000c03f000000c0",
]
GOLDEN_BUFFER_SHA256 = "c5908f9fad7b4f227430f5f2ca4bda9d01ec03538a9d3667a92709bdc6e63303"


def golden_arrays() -> list[np.ndarray]:
    return [np.arange(6, dtype=np.uint8).reshape(2, 3), np.array([1.5, -2.0], dtype=np.float32)]


@settings(max_examples=60, deadline=None)
@given(
    arrays=st.lists(
        hnp.arrays(
            dtype=st.sampled_from(DTYPES).map(np.dtype),
            shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
        ),
        min_size=0,
        max_size=4,
    )
)
def test_round_trip_frames_buffers_and_both_framings(arrays: list[np.ndarray]) -> None:
    """Every supported dtype and shape (0-d and empty included) survives frames, both buffer framings."""
    assert_same_batch(codec.decode(codec.encode(arrays)), arrays)
    assert_same_batch(codec.decode_buffer(codec.encode_buffer(arrays)), arrays)
    assert_same_batch(codec.decode_buffer(codec.encode_buffer(arrays, aligned=False)), arrays)


def test_bfloat16_round_trip() -> None:
    """bfloat16 arrays travel with their own code and come back as bfloat16."""
    array = np.array([1.0, -2.5, 3.25], dtype=ml_dtypes.bfloat16)
    frames = codec.encode([array])
    assert bytes(frames[0][:8]).rstrip(b"\0") == b"bf16"
    (decoded,) = codec.decode(frames)
    assert decoded.dtype == ml_dtypes.bfloat16
    assert np.array_equal(decoded.astype(np.float32), array.astype(np.float32))


def test_frames_match_tensorcom_0_1_bytes() -> None:
    """Headers and data frames are byte-identical to what tensorcom 0.1 sends."""
    frames = codec.encode(golden_arrays(), ["img", "lbl"])
    assert [bytes(f).hex() for f in frames] == GOLDEN_FRAMES


def test_original_framing_matches_tensorcom_0_1_buffer() -> None:
    """The unaligned single-buffer form is byte-identical to tensorcom 0.1's encode_buffer."""
    buffer = codec.encode_buffer(golden_arrays(), ["img", "lbl"], aligned=False)
    assert hashlib.sha256(bytes(buffer)).hexdigest() == GOLDEN_BUFFER_SHA256


def test_decodes_tensorcom_0_1_frames_with_infos() -> None:
    """Frames written by tensorcom 0.1 decode to the original arrays and labels."""
    arrays, infos = codec.decode([bytes.fromhex(h) for h in GOLDEN_FRAMES], infos=True)
    assert_same_batch(arrays, golden_arrays())
    assert infos == ["img", "lbl"]


def test_aligned_buffer_puts_every_payload_on_64_bytes() -> None:
    """Our buffers place each payload at an offset that is a multiple of 64; the original framing drifts."""
    arrays = [np.ones(3, np.uint8), np.ones((5, 7), np.float64), np.array(2, np.int16)]
    buffer = codec.encode_buffer(arrays)
    base = np.frombuffer(buffer, np.uint8).ctypes.data
    decoded = codec.decode_buffer(buffer)
    assert [(a.ctypes.data - base) % 64 for a in decoded] == [0, 0, 0]
    original = codec.encode_buffer(arrays, aligned=False)
    base = np.frombuffer(original, np.uint8).ctypes.data
    # each original chunk adds a 16-byte prefix, so chunk k's payload sits at 16 * (k + 1) mod 64
    assert [(a.ctypes.data - base) % 64 for a in codec.decode_buffer(original)] == [32, 0, 32]


def test_decode_returns_views_not_copies() -> None:
    """Decoded arrays share memory with the received data frames, so decoding cost does not grow with size."""
    images = np.zeros((64, 3, 224, 224), np.uint8)
    labels = np.arange(64, dtype=np.int64)
    frames = [bytearray(f) for f in codec.encode([images, labels])]
    decoded = codec.decode(frames)
    for array, frame in zip(decoded, frames[1::2], strict=True):
        assert np.shares_memory(array, np.frombuffer(frame, np.uint8))
        assert array.flags.writeable


def test_encode_does_not_copy_contiguous_arrays() -> None:
    """The data frames that encode returns are views of the caller's arrays."""
    array = np.arange(1000, dtype=np.float32)
    frames = codec.encode([array])
    assert np.shares_memory(np.frombuffer(frames[1], np.uint8), array)


@pytest.mark.parametrize(
    "array",
    [
        np.arange(24, dtype=np.int32).reshape(4, 6)[:, ::2],
        np.arange(24, dtype=">f4").reshape(2, 12),
        np.arange(5, dtype=">u8"),
    ],
    ids=["non-contiguous", "big-endian-float", "big-endian-uint64"],
)
def test_non_native_input_is_converted_not_corrupted(array: np.ndarray) -> None:
    """Non-contiguous and big-endian arrays arrive with their values intact, little-endian on the wire."""
    frames = codec.encode([array])
    (decoded,) = codec.decode(frames)
    assert np.array_equal(decoded, array)
    assert bytes(frames[1]) == np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def test_torch_tensors_encode_without_torch_import_in_codec() -> None:
    """Torch tensors (bfloat16 included) are accepted by encode and decode to equal arrays."""
    torch = pytest.importorskip("torch")
    tensors = [
        torch.arange(6, dtype=torch.int64).reshape(2, 3),
        torch.tensor([1.0, 2.0], dtype=torch.bfloat16),
    ]
    decoded = codec.decode(codec.encode(tensors))
    assert np.array_equal(decoded[0], tensors[0].numpy())
    assert np.array_equal(decoded[1].astype(np.float32), np.array([1.0, 2.0], np.float32))


@pytest.mark.parametrize(
    "value, message",
    [
        (np.array([1 + 2j]), "cannot be encoded"),
        (np.array(["text"]), "cannot be encoded"),
    ],
    ids=["complex", "string"],
)
def test_unsupported_dtypes_are_refused(value: np.ndarray, message: str) -> None:
    """Dtypes the format cannot carry raise a ValueError naming the dtype."""
    with pytest.raises(ValueError, match=message):
        codec.encode([value])


def test_info_longer_than_eight_characters_is_refused() -> None:
    """An info label over 8 ASCII characters is an error, not a silent truncation."""
    with pytest.raises(ValueError, match="at most 8"):
        codec.encode([np.zeros(1)], ["too-long-label"])


def header(code: bytes, rank: int, *dims: int, info: bytes = b"") -> bytes:
    return code.ljust(8, b"\0") + info.ljust(8, b"\0") + np.array([rank, *dims], "<i8").tobytes()


MALFORMED_FRAMES = {
    "odd-frame-count": ([header(b"u1", 1, 3)], "even number of frames"),
    "short-header": ([b"u1\0\0", b"abc"], "header must be"),
    "header-not-multiple-of-8": ([header(b"u1", 1, 3) + b"x", b"abc"], "header must be"),
    "unknown-dtype": ([header(b"q9", 1, 3), b"abc"], "unknown dtype code b'q9'"),
    "rank-too-large": ([header(b"u1", 99), b""], "rank must be between"),
    "negative-rank": ([header(b"u1", -1), b""], "rank must be between"),
    "rank-disagrees-with-length": ([header(b"u1", 2, 3), b"abc"], "header of rank 2"),
    "negative-dimension": ([header(b"u1", 1, -3), b"abc"], "negative dimension"),
    "data-too-short": ([header(b"f4", 1, 3), b"\0" * 8], "needs 12 bytes of data. Found: 8"),
    "data-too-long": ([header(b"u1", 1, 3), b"abcd"], "needs 3 bytes"),
    "lying-huge-shape": ([header(b"f8", 2, 2**40, 2**40), b"\0" * 8], "needs"),
    "non-ascii-info": ([header(b"u1", 1, 1, info=b"\xff"), b"a"], "not ASCII"),
}


@pytest.mark.parametrize("frames, message", MALFORMED_FRAMES.values(), ids=MALFORMED_FRAMES.keys())
def test_malformed_frames_raise_decode_error(frames: list[bytes], message: str) -> None:
    """Each kind of malformed message raises DecodeError (a ValueError) saying what is wrong and where."""
    with pytest.raises(DecodeError, match=message) as raised:
        codec.decode(frames)
    assert isinstance(raised.value, ValueError)
    if len(frames) % 2 == 0:
        assert "array 0" in str(raised.value)


def test_a_header_seen_before_still_checks_its_data() -> None:
    """Parsed headers are remembered between batches; the data of every batch is still checked against its
    header, and a header that failed to parse is not remembered."""
    good = header(b"f4", 1, 3)
    assert codec.decode([good, bytes(12)])[0].shape == (3,)
    with pytest.raises(DecodeError, match="needs 12 bytes of data. Found: 8"):
        codec.decode([good, bytes(8)])
    bad = header(b"u1", 1, -3)
    for _ in range(2):
        with pytest.raises(DecodeError, match="negative dimension"):
            codec.decode([bad, b"abc"])
    assert bad not in codec._header_cache


def test_remembered_headers_stay_bounded() -> None:
    """A stream whose shapes never repeat does not grow the header memory without bound."""
    for length in range(3 * codec._HEADER_CACHE_SIZE):
        (array,) = codec.decode([header(b"u1", 1, length), bytes(length)])
        assert array.shape == (length,)
        assert len(codec._header_cache) <= codec._HEADER_CACHE_SIZE


def prefix(magic: bytes, length: int) -> bytes:
    return magic + np.array([length], "<i8").tobytes()


MALFORMED_BUFFERS = {
    "wrong-magic": (b"~NotTen~" + bytes(8), "wrong magic"),
    "truncated-prefix": (codec.MAGIC + b"\x01\x02", "truncated chunk prefix"),
    "length-past-end": (prefix(codec.MAGIC, 1000) + bytes(48), "claims 1000 bytes but only 48 remain"),
    "negative-length": (prefix(codec.MAGIC, -5) + bytes(48), "claims -5 bytes"),
    "aligned-length-past-end": (
        prefix(codec.ALIGNED_MAGIC, 64) + bytes(48),
        "claims 64 bytes but only 0 remain",
    ),
    "odd-chunk-count": (prefix(codec.MAGIC, 24) + header(b"u1", 0) + bytes(40), "even number of frames"),
}


@pytest.mark.parametrize("buffer, message", MALFORMED_BUFFERS.values(), ids=MALFORMED_BUFFERS.keys())
def test_malformed_buffers_raise_decode_error(buffer: bytes, message: str) -> None:
    """Buffers with bad magic, truncation or lying lengths raise DecodeError and never read out of bounds."""
    with pytest.raises(DecodeError, match=message):
        codec.decode_buffer(buffer)


def test_truncated_file_names_the_file(tmp_path: Path) -> None:
    """A .ten file cut short raises DecodeError naming the file and the byte offset."""
    path = tmp_path / "cut.ten"
    codec.save(path, [np.arange(100, dtype=np.int32)])
    path.write_bytes(path.read_bytes()[:-300])
    with pytest.raises(DecodeError, match=f"{path}: chunk 1 at byte"):
        codec.load(path)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_crash_the_buffer_decoder(data: bytes) -> None:
    """Arbitrary bytes either decode or raise DecodeError; nothing else escapes."""
    try:
        codec.decode_buffer(codec.MAGIC + data)
    except DecodeError:
        pass


def test_save_and_load_with_mmap_map_the_file(tmp_path: Path) -> None:
    """load(mmap=True) returns read-only views of the file (a later write to the file shows through)."""
    path = tmp_path / "batch.ten"
    arrays = [np.zeros((4, 16), np.float32), np.arange(3, dtype=np.int64)]
    codec.save(path, arrays, ["x", "y"])
    mapped, infos = codec.load(path, True, infos=True)
    assert infos == ["x", "y"]
    assert not mapped[0].flags.writeable
    with open(path, "r+b") as stream:
        stream.seek(192)  # data payload of array 0: after a 64-byte prefix, the header, another prefix
        stream.write(np.ones(1, np.float32).tobytes())
    assert mapped[0][0, 0] == 1.0
    read = codec.load(path, mmap=False)
    assert read[0].flags.writeable and read[0][0, 0] == 1.0


def test_loads_files_in_the_original_framing(tmp_path: Path) -> None:
    """Files written in tensorcom 0.1's framing load the same as aligned ones."""
    path = tmp_path / "old.ten"
    codec.save(path, golden_arrays(), aligned=False)
    assert path.read_bytes() == bytes(codec.encode_buffer(golden_arrays(), aligned=False))
    assert_same_batch(codec.load(path), golden_arrays())


def test_empty_file_loads_as_no_arrays(tmp_path: Path) -> None:
    """An empty .ten file holds an empty list of arrays."""
    path = tmp_path / "empty.ten"
    path.write_bytes(b"")
    assert codec.load(path) == []


def test_package_has_no_bare_assert() -> None:
    """No assert statement guards anything in the package (they vanish under python -O)."""
    package = Path(codec.__file__).parent
    offenders = [
        f"{path}:{node.lineno}"
        for path in package.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Assert)
    ]
    assert offenders == []
