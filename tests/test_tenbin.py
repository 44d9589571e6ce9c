"""tensorcom.tenbin: tensorcom 0.1's tenbin API over our codec, byte for byte what 0.1 wrote, with clear errors."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from helpers import MakeSocket
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tensorcom import ConfigError, DecodeError, codec, tenbin

ORIGINAL = os.environ.get("TENSORCOM_01_PYTHON")
needs_original = pytest.mark.skipif(
    not ORIGINAL, reason="set TENSORCOM_01_PYTHON to compare with tensorcom 0.1"
)

# Run by both interpreters (ours and 0.1's), so both encode the very same arrays.
ARRAYS = """
import numpy as np
arrays = [
    np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
    np.linspace(-1, 1, 7, dtype=np.float32),
    np.array([[1, -2], [3, -4]], dtype=np.int16),
    np.arange(5, dtype=np.int32) * -7,
    np.array([0.5, 2.0, -3.25], dtype=np.float16),
    np.arange(3, dtype=np.uint16) + 60000,
    np.array([1 << 40, -5], dtype=np.int64),
    np.array([3.5], dtype=np.float64),
    np.zeros((0, 3), dtype=np.float32),
    np.arange(130, dtype=np.int8),
]
infos = ["img", "x", "pair", "ints", "half", "u16", "wide", "dbl", "empty", "bytes130"]
"""


def shared_arrays() -> tuple[list[np.ndarray], list[str]]:
    scope: dict[str, Any] = {}
    exec(ARRAYS, scope)  # noqa: S102 (our own constant, run by both interpreters)
    return scope["arrays"], scope["infos"]


SAMPLE = [np.arange(6, dtype=np.uint8).reshape(2, 3), np.array([1.5, -2.0], np.float32)]


def same_arrays(left: list[Any], right: list[Any]) -> bool:
    return len(left) == len(right) and all(
        a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
        for a, b in zip(left, right, strict=True)
    )


# -- golden bytes (no 0.1 needed) ------------------------------------------------------------------------------------


def test_buffer_matches_the_bytes_tensorcom_01_wrote() -> None:
    """encode_buffer writes what 0.1.0 wrote for the same arrays and infos (digest recorded from 0.1.0)."""
    buffer = tenbin.encode_buffer(SAMPLE, infos=["img", "lbl"])
    assert isinstance(buffer, bytearray) and len(buffer) == 320
    assert (
        hashlib.sha256(buffer).hexdigest()
        == "c5908f9fad7b4f227430f5f2ca4bda9d01ec03538a9d3667a92709bdc6e63303"
    )


def test_headers_and_strings_match_tensorcom_01() -> None:
    """encode_header, magic and str64 give 0.1.0's values (recorded from 0.1.0)."""
    assert tenbin.encode_header(SAMPLE[0], "img").hex() == (
        "7531000000000000696d670000000000020000000000000002000000000000000300000000000000"
    )
    assert tenbin.encode_header(SAMPLE[1]).hex() == (
        "6634000000000000000000000000000001000000000000000200000000000000"
    )
    assert tenbin.magic == 9110334830257984638 and tenbin.magic_bytes == b"~TenBin~"
    assert tenbin.str64("abc") == 6513249 and tenbin.unstr64(6513249) == "abc"
    assert tenbin.decode_header(tenbin.encode_header(SAMPLE[0], "img")) == ((2, 3), np.dtype("uint8"), "img")


def test_dtype_tables_fix_the_uint32_typo() -> None:
    """long_to_short holds 0.1's dtypes with uint32 spelled right, and uint32 arrays round-trip."""
    assert tenbin.long_to_short["uint32"] == "u4" and tenbin.short_to_long["u4"] == "uint32"
    assert "unit32" not in tenbin.long_to_short and len(tenbin.long_to_short) == 11
    values = np.array([0, 1, 4_000_000_000], dtype=np.uint32)
    tenbin.check_acceptable_input_type([values], False)
    (back,) = tenbin.decode_buffer(tenbin.encode_buffer([values]))
    assert back.dtype == np.uint32 and back.tolist() == values.tolist()


# -- round trips -----------------------------------------------------------------------------------------------------


def _through_list(arrays: list[np.ndarray], infos: list[str] | None, want: Any) -> Any:
    return tenbin.decode_list([bytes(chunk) for chunk in tenbin.encode_list(arrays, infos)], infos=want)


def _through_buffer(arrays: list[np.ndarray], infos: list[str] | None, want: Any) -> Any:
    return tenbin.decode_buffer(bytes(tenbin.encode_buffer(arrays, infos)), infos=want)


def _through_chunks(arrays: list[np.ndarray], infos: list[str] | None, want: Any) -> Any:
    chunks = tenbin.decode_chunks(tenbin.encode_chunks(tenbin.encode_list(arrays, infos)))
    return tenbin.decode_list(chunks, infos=want)


def _through_stream(arrays: list[np.ndarray], infos: list[str] | None, want: Any) -> Any:
    stream = io.BytesIO()
    tenbin.write(stream, arrays, infos)
    stream.seek(0)
    return tenbin.read(stream, infos=want)


WAYS = {
    "list": _through_list,
    "buffer": _through_buffer,
    "chunks": _through_chunks,
    "stream": _through_stream,
}


@pytest.mark.parametrize("way", list(WAYS.values()), ids=list(WAYS))
def test_round_trips_keep_arrays_and_infos(way: Any) -> None:
    """Each encode/decode pair gives back the arrays, and infos as 0.1 did: False, True or a required list."""
    arrays, infos = shared_arrays()
    assert same_arrays(way(arrays, infos, False), arrays)
    back, labels = way(arrays, infos, True)
    assert same_arrays(back, arrays) and labels == infos
    assert same_arrays(way(arrays, infos, infos), arrays)
    _, unlabelled = way(arrays, None, True)
    assert unlabelled == [""] * len(arrays)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    """save writes 0.1's framing to a .ten file; load gives back writable arrays and their infos."""
    arrays, infos = shared_arrays()
    path = tmp_path / "data.ten"
    tenbin.save(str(path), *arrays, infos=infos)
    assert path.read_bytes() == bytes(tenbin.encode_buffer(arrays, infos))
    back, labels = tenbin.load(str(path), infos=True)
    assert same_arrays(back, arrays) and labels == infos
    assert all(a.flags.writeable for a in back)
    tenbin.save(tmp_path / "other.bin", *arrays, nocheck=True)  # a PathLike, another extension
    assert same_arrays(tenbin.load(tmp_path / "other.bin", nocheck=True), arrays)


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        dtype=st.sampled_from([np.uint8, np.int16, np.int32, np.float16, np.float32, np.uint32]),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
    )
)
def test_any_array_round_trips_through_a_buffer(array: np.ndarray) -> None:
    """Any shape (0-d and empty included) of the dtypes 0.1 sends comes back bit for bit from a buffer."""
    (back,) = tenbin.decode_buffer(tenbin.encode_buffer([array]))
    assert back.dtype == array.dtype and back.shape == array.shape
    assert back.tobytes() == array.tobytes()


def test_readers_accept_our_aligned_framing(tmp_path: Path) -> None:
    """Buffers and files in our aligned framing (codec's default) read with tenbin, in memory and from files."""
    arrays, infos = shared_arrays()
    aligned = codec.encode_buffer(arrays, infos)
    assert bytes(aligned[:8]) == codec.ALIGNED_MAGIC
    back, labels = tenbin.decode_buffer(aligned, infos=True)
    assert same_arrays(back, arrays) and labels == infos
    path = tmp_path / "aligned.ten"
    codec.save(path, arrays, infos)
    assert same_arrays(tenbin.load(str(path)), arrays)
    with open(path, "rb") as stream:
        assert same_arrays(tenbin.read(stream, n=3), arrays[:3])


def test_writers_use_the_original_framing() -> None:
    """tenbin writes 0.1's framing: the codec's unaligned buffer, byte for byte, for files and buffers alike."""
    arrays, infos = shared_arrays()
    buffer = tenbin.encode_buffer(arrays, infos)
    assert bytes(buffer[:8]) == b"~TenBin~"
    assert buffer == codec.encode_buffer(arrays, infos, aligned=False)
    stream = io.BytesIO()
    tenbin.write(stream, arrays, infos)
    assert stream.getvalue() == bytes(buffer)


def test_decode_list_ignores_a_lone_trailing_frame() -> None:
    """As in 0.1, a last frame without a partner (a server's metadata frame) is left out, not decoded."""
    chunks = [bytes(c) for c in tenbin.encode_list(SAMPLE)] + [b"~TcMeta~\x80"]
    assert same_arrays(tenbin.decode_list(chunks), SAMPLE)


def test_bytelen_bytedata_and_roundup() -> None:
    """bytelen and bytedata take arrays and bytes as 0.1 did; roundup rounds to 64 by default."""
    array = np.zeros((3, 5), np.float32)
    assert tenbin.bytelen(array) == 60 and tenbin.bytelen(b"abc") == 3 and tenbin.bytelen(bytearray(4)) == 4
    assert tenbin.bytedata(b"xy") == b"xy" and bytes(tenbin.bytedata(array)) == array.tobytes()
    assert [tenbin.roundup(n) for n in (0, 1, 64, 65)] == [0, 64, 64, 128] and tenbin.roundup(5, 4) == 8


def test_sctp_helpers_send_and_read_one_original_buffer() -> None:
    """sctp_send sends one 0.1 buffer to the destination; sctp_recv decodes the first datagram of a connection."""

    class Peer:
        def __init__(self) -> None:
            self.sent: list[tuple[bytes, Any]] = []

        def sctp_send(self, data: bytes, to: Any) -> None:
            self.sent.append((data, to))

        def accept(self) -> tuple[Peer, Any]:
            return self, None

        def sctp_recv(self, maxsize: int) -> tuple[None, None, bytes, None]:
            return None, None, self.sent[0][0][:maxsize], None

    peer = Peer()
    tenbin.sctp_send(peer, ("127.0.0.1", 9), SAMPLE)
    assert peer.sent[0] == (bytes(tenbin.encode_buffer(SAMPLE)), ("127.0.0.1", 9))
    assert same_arrays(tenbin.sctp_recv(peer), SAMPLE)


# -- over real sockets -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("single", [False, True], ids=["multipart", "single"])
def test_zmq_helpers_cross_a_real_socket(socket: MakeSocket, tmp_path: Path, single: bool) -> None:
    """zsend_multipart/zrecv_multipart and zsend_single/zrecv_single carry arrays and infos over ipc."""
    sender, receiver = socket(zmq.PUSH), socket(zmq.PULL)
    address = f"ipc://{tmp_path / 'tenbin'}"
    receiver.bind(address)
    sender.connect(address)
    arrays, infos = shared_arrays()
    arrays.append(np.arange(1 << 16, dtype=np.float32))  # 256 kB: sent without a copy
    infos.append("big")
    if single:
        tenbin.zsend_single(sender, arrays, infos)
        back, labels = tenbin.zrecv_single(receiver, infos=True)
    else:
        tenbin.zsend_multipart(sender, arrays, infos)
        back, labels = tenbin.zrecv_multipart(receiver, infos=True)
    assert same_arrays(back, arrays) and labels == infos


# -- errors ----------------------------------------------------------------------------------------------------------


def _decode_error(call: Any) -> str:
    with pytest.raises(tenbin.TenbinDecodeError) as caught:
        call()
    assert isinstance(caught.value, DecodeError) and isinstance(caught.value, AssertionError)
    return str(caught.value)


def test_malformed_buffers_raise_decode_errors_that_say_where() -> None:
    """Wrong magic, truncation and lying lengths raise TenbinDecodeError (a DecodeError and an AssertionError)."""
    good = bytes(tenbin.encode_buffer(SAMPLE))
    assert "wrong magic" in _decode_error(lambda: tenbin.decode_buffer(b"~Nothing" + good[8:]))
    assert "truncated chunk prefix" in _decode_error(lambda: tenbin.decode_buffer(good[:10]))
    assert "claims 40 bytes but only 4 remain" in _decode_error(lambda: tenbin.decode_buffer(good[:20]))
    lying = bytearray(good)
    lying[8:16] = (1 << 40).to_bytes(8, "little")
    assert "claims" in _decode_error(lambda: tenbin.decode_buffer(bytes(lying)))
    assert "dtype" in _decode_error(lambda: tenbin.decode_header(b"zz" + bytes(22)))
    assert "header" in _decode_error(lambda: tenbin.decode_header(b"u1"))
    header = tenbin.encode_header(SAMPLE[0])
    assert "needs 6 bytes" in _decode_error(lambda: tenbin.decode_list([header, b"12345"]))


def test_malformed_streams_raise_decode_errors() -> None:
    """read_chunk refuses a wrong magic, a negative or lying length and a stream that ends early, reading no more
    than the stream holds."""
    assert tenbin.read_chunk(io.BytesIO(b"")) is None
    assert "magic" in _decode_error(lambda: tenbin.read_chunk(io.BytesIO(b"~Nothing" + bytes(8))))
    negative = b"~TenBin~" + (-1).to_bytes(8, "little", signed=True)
    assert ">= 0" in _decode_error(lambda: tenbin.read_chunk(io.BytesIO(negative)))
    huge = b"~TenBin~" + (1 << 60).to_bytes(8, "little") + b"only this"
    assert "ends" in _decode_error(lambda: tenbin.read_chunk(io.BytesIO(huge)))
    header_only = io.BytesIO()
    tenbin.write_chunk(header_only, tenbin.encode_header(SAMPLE[0]))
    header_only.seek(0)
    assert "after the header" in _decode_error(lambda: tenbin.read(header_only))


def test_infos_that_do_not_match_are_refused() -> None:
    """A required infos list that the data does not carry raises, naming the array and both labels."""
    buffer = tenbin.encode_buffer(SAMPLE, infos=["img", "lbl"])
    message = _decode_error(lambda: tenbin.decode_buffer(buffer, infos=["img", "cls"]))
    assert "array 1" in message and "'lbl'" in message and "'cls'" in message


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: tenbin.check_acceptable_input_type([np.zeros(2, np.int64)], False), "allow64"),
        (lambda: tenbin.check_acceptable_input_type([np.zeros(2, bool)], True), "dtype bool"),
        (lambda: tenbin.check_acceptable_input_type([[1, 2]], True), "expected an array"),
        (lambda: tenbin.str64("nine chars"), "at most 8"),
        (lambda: tenbin.encode_header(np.zeros(2), "much too long"), "info"),
        (lambda: tenbin.encode_list(SAMPLE, infos=["one"]), "one label per array"),
        (lambda: tenbin.encode_buffer(SAMPLE, infos=["one"]), "one label per array"),
        (lambda: tenbin.save("data.npy", *SAMPLE), ".ten"),
        (lambda: tenbin.bytelen(3), "byte length"),
        (lambda: tenbin.bytedata(3), "raw data"),
    ],
    ids=[
        "int64",
        "bool",
        "list",
        "str64",
        "info",
        "infos-list",
        "infos-buffer",
        "file-name",
        "bytelen",
        "bytedata",
    ],
)
def test_bad_arguments_raise_config_errors(call: Any, words: str) -> None:
    """Arguments 0.1 asserted on raise TenbinConfigError (a ConfigError and an AssertionError) saying what is wrong."""
    with pytest.raises(tenbin.TenbinConfigError, match=words) as caught:
        call()
    assert isinstance(caught.value, ConfigError) and isinstance(caught.value, AssertionError)


def test_64_bit_arrays_pass_with_allow64() -> None:
    """check_acceptable_input_type lets 64-bit arrays through with allow64, and torch tensors by their dtype."""
    tenbin.check_acceptable_input_type([np.zeros(2, np.int64), np.zeros(2, np.float64)], True)
    torch = pytest.importorskip("torch")
    tenbin.check_acceptable_input_type([torch.zeros(2, dtype=torch.float32)], False)
    with pytest.raises(tenbin.TenbinConfigError, match="int64"):
        tenbin.check_acceptable_input_type([torch.zeros(2, dtype=torch.int64)], False)


# -- against tensorcom 0.1 itself ------------------------------------------------------------------------------------

ORIGINAL_ENCODER = (
    ARRAYS
    + """
import io, json, sys
from tensorcom import tenbin
stream = io.BytesIO()
tenbin.write(stream, arrays, infos=infos)
tenbin.save(sys.argv[1], *arrays, infos=infos)
print(json.dumps({
    "buffer": bytes(tenbin.encode_buffer(arrays, infos=infos)).hex(),
    "list": [bytes(chunk).hex() for chunk in tenbin.encode_list(arrays, infos=infos)],
    "headers": [bytes(tenbin.encode_header(a, i)).hex() for a, i in zip(arrays, infos)],
    "chunks": bytes(tenbin.encode_chunks([memoryview(b"abc"), memoryview(bytearray(70))])).hex(),
    "stream": stream.getvalue().hex(),
    "str64": [tenbin.str64(s) for s in ["", "a", "~TenBin~", "12345678"]],
}))
"""
)

ORIGINAL_DECODER = (
    ARRAYS
    + """
import sys
from tensorcom import tenbin
back, labels = tenbin.load(sys.argv[1], infos=True)
assert labels == infos, labels
assert len(back) == len(arrays)
for a, b in zip(arrays, back):
    assert a.dtype == b.dtype and a.shape == b.shape and (a == b).all(), (a, b)
with open(sys.argv[2], "rb") as stream:
    assert all((a == b).all() for a, b in zip(arrays, tenbin.decode_buffer(stream.read())))
print("ok")
"""
)


def run_original(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` with 0.1.0's interpreter, outside this checkout and without PYTHONPATH, so it imports 0.1."""
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    return subprocess.run(
        [str(ORIGINAL), "-c", code, *args], capture_output=True, text=True, timeout=120, cwd="/", env=env
    )


@needs_original
def test_every_encoding_is_byte_identical_to_tensorcom_01(tmp_path: Path) -> None:
    """Buffers, chunk lists, headers, framed chunks, streams, files and str64 equal 0.1.0's, byte for byte."""
    theirs = tmp_path / "theirs.ten"
    result = run_original(ORIGINAL_ENCODER, str(theirs))
    assert result.returncode == 0, result.stderr
    expected = json.loads(result.stdout)
    arrays, infos = shared_arrays()
    stream = io.BytesIO()
    tenbin.write(stream, arrays, infos=infos)
    ours = tmp_path / "ours.ten"
    tenbin.save(str(ours), *arrays, infos=infos)
    assert bytes(tenbin.encode_buffer(arrays, infos=infos)).hex() == expected["buffer"]
    assert [bytes(chunk).hex() for chunk in tenbin.encode_list(arrays, infos=infos)] == expected["list"]
    assert [tenbin.encode_header(a, i).hex() for a, i in zip(arrays, infos, strict=True)] == expected[
        "headers"
    ]
    assert (
        bytes(tenbin.encode_chunks([memoryview(b"abc"), memoryview(bytearray(70))])).hex()
        == expected["chunks"]
    )
    assert stream.getvalue().hex() == expected["stream"]
    assert [tenbin.str64(s) for s in ["", "a", "~TenBin~", "12345678"]] == expected["str64"]
    assert ours.read_bytes() == theirs.read_bytes()
    back, labels = tenbin.load(str(theirs), infos=True)
    assert same_arrays(back, arrays) and labels == infos


@needs_original
def test_tensorcom_01_reads_what_tenbin_writes(tmp_path: Path) -> None:
    """0.1.0 loads a file saved by our tenbin and decodes our buffer, arrays and infos intact."""
    arrays, infos = shared_arrays()
    tenbin.save(str(tmp_path / "ours.ten"), *arrays, infos=infos)
    (tmp_path / "buffer.bin").write_bytes(bytes(tenbin.encode_buffer(arrays)))
    result = run_original(ORIGINAL_DECODER, str(tmp_path / "ours.ten"), str(tmp_path / "buffer.bin"))
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
