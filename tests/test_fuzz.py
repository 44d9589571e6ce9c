"""Hostile input: random and mutated frames for the decoder, a live request server, a stream server's control socket
and a stream client; and pickles that would run code if anything unpickled them.

Every case is bounded in time. Hypothesis runs derandomised (the same cases every run) and without a database.
The `slow` variants try ten times as many cases (`make test-slow`).
"""

from __future__ import annotations

import builtins
import pickle
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import factories
import msgpack
import numpy as np
import pytest
import zmq
from helpers import MakeSocket, StartProcess, assert_same_batches, serve
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from reliability import record, reference

from tensorcom import Connection, DecodeError, ProtocolError, Server, codec
from tensorcom.protocol import META_INFO, Command, Message

REPLY_SECONDS = 20


def fuzz_settings(examples: int, shrink: bool = True) -> settings:
    """Derandomised, no database; live-peer fuzzing does not shrink (a failing case is reported as found)."""
    phases = [Phase.explicit, Phase.generate, *([Phase.shrink] if shrink else [])]
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=phases,
        report_multiple_bugs=False,
        suppress_health_check=list(HealthCheck),
    )


# strategies

EXTREME_INTS = st.sampled_from(
    [0, 1, -1, 2, 7, 255, 2**31 - 1, 2**31, 2**32, 2**53, 2**62, 2**63 - 1, -(2**63), 2**64 - 1]
)
MSGPACK_INTS = st.integers(min_value=-(2**63), max_value=2**64 - 1) | EXTREME_INTS
SCALARS = (
    st.none()
    | st.booleans()
    | MSGPACK_INTS
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.binary(max_size=12)
)
VALUES = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
FIELD_NAMES = st.sampled_from(
    ["seed", "rank", "world_size", "step", "gen", "base", "state", "epoch", "fingerprint", "kind", "keys"]
)
CODEC_DTYPES = st.sampled_from(["u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f2", "f4", "f8", "?"])


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = np.dtype(draw(CODEC_DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=4)))
    count = int(np.prod(shape))
    raw = draw(st.binary(min_size=count * dtype.itemsize, max_size=count * dtype.itemsize))
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


@st.composite
def mutated(draw: st.DrawFn, frames: list[bytes]) -> list[bytes]:
    """Apply a few random corruptions to a list of frames."""
    frames = list(frames)
    for _ in range(draw(st.integers(1, 4))):
        operation = draw(st.sampled_from(["flip", "truncate", "extend", "drop", "duplicate", "swap", "word"]))
        if not frames:
            frames.append(draw(st.binary(max_size=64)))
            continue
        index = draw(st.integers(0, len(frames) - 1))
        frame = bytearray(frames[index])
        if operation == "flip" and frame:
            position = draw(st.integers(0, len(frame) - 1))
            frame[position] ^= draw(st.integers(1, 255))
        elif operation == "truncate":
            frame = frame[: draw(st.integers(0, len(frame)))]
        elif operation == "extend":
            frame += draw(st.binary(min_size=1, max_size=64))
        elif operation == "drop":
            del frames[index]
            continue
        elif operation == "duplicate":
            frames.insert(index, bytes(frame))
        elif operation == "swap":
            other = draw(st.integers(0, len(frames) - 1))
            frames[index], frames[other] = frames[other], frames[index]
            continue
        elif operation == "word" and len(frame) >= 8:
            offset = draw(st.integers(0, len(frame) // 8 - 1)) * 8
            value = draw(st.integers(-(2**63), 2**63 - 1) | EXTREME_INTS.filter(lambda v: v < 2**63))
            frame[offset : offset + 8] = int(value).to_bytes(8, "little", signed=True)
        frames[index] = bytes(frame)
    return frames


@st.composite
def ten_messages(draw: st.DrawFn, with_meta: bool = False) -> list[bytes]:
    """A valid .ten message (optionally with a hostile metadata array), then corrupted, or not, or random frames."""
    choice = draw(st.integers(0, 9))
    if choice == 0:
        return draw(st.lists(st.binary(max_size=200), max_size=8))
    values = draw(st.lists(arrays(), min_size=1, max_size=4))
    infos = [""] * len(values)
    if with_meta and draw(st.booleans()):
        meta = draw(st.dictionaries(FIELD_NAMES, VALUES, max_size=5))
        values.append(np.frombuffer(msgpack.packb(meta, use_bin_type=True), np.uint8))
        infos.append(META_INFO)
    frames = [bytes(memoryview(frame).cast("B")) for frame in codec.encode(values, infos)]
    return frames if choice == 1 else draw(mutated(frames))


# the decoder, in process


def decode_or_none(frames: list[bytes]) -> list[np.ndarray] | None:
    """codec.decode, or None for a DecodeError; any other exception fails the test."""
    try:
        return codec.decode(frames)
    except DecodeError:
        return None


def test_decoder_refuses_a_zero_size_shape_with_a_huge_dimension() -> None:
    """Found by the fuzzer: shape (0, 2**62, 3) of float16 with no data must raise DecodeError."""
    header = b"f2".ljust(16, b"\0") + np.array([3, 0, 2**62, 3], "<i8").tobytes()
    with pytest.raises(DecodeError):
        codec.decode([header, b""])


def check_decoded(frames: list[bytes], arrays_: list[np.ndarray]) -> None:
    """A successful decode gives views exactly the size of their data frames, every byte readable."""
    assert len(arrays_) == len(frames) // 2
    for array, data in zip(arrays_, frames[1::2], strict=True):
        assert array.nbytes == len(data)
        array.tobytes()


def run_decoder_fuzz(examples: int) -> int:
    """Hypothesis: structured random and mutated messages, buffers and headers."""
    tried = 0

    @fuzz_settings(examples)
    @given(frames=ten_messages(with_meta=True))
    def frames_case(frames: list[bytes]) -> None:
        nonlocal tried
        tried += 1
        decoded = decode_or_none(frames)
        if decoded is not None:
            check_decoded(frames, decoded)

    @fuzz_settings(examples // 3)
    @given(data=st.data())
    def buffer_case(data: st.DataObject) -> None:
        nonlocal tried
        tried += 1
        values = data.draw(st.lists(arrays(), max_size=3))
        buffer = bytes(codec.encode_buffer(values, aligned=data.draw(st.booleans())))
        if data.draw(st.booleans()):
            buffer = b"".join(data.draw(mutated([buffer[i : i + 16] for i in range(0, len(buffer), 16)])))
        try:
            decoded = codec.decode_buffer(buffer)
        except DecodeError:
            return
        for array in decoded:
            assert array.nbytes <= len(buffer)
            array.tobytes()

    @fuzz_settings(examples // 3)
    @given(header=st.binary(max_size=120) | VALUES.map(lambda v: msgpack.packb(v, use_bin_type=True)))
    def header_case(header: bytes) -> None:
        nonlocal tried
        tried += 1
        try:
            message = Message.decode(header, "fuzz")
        except ProtocolError:
            return
        assert isinstance(message.command, Command)

    frames_case()
    buffer_case()
    header_case()
    return tried


def run_mutation_fuzz(cases: int, seed: int = 0) -> int:
    """A fast seeded mutator for volume: valid messages of every dtype, corrupted 1 to 4 times each."""
    rng = np.random.default_rng(seed)
    extremes = [0, 1, -1, 2**31, 2**32, 2**62, 2**63 - 1, -(2**63), 64, 65]
    bases = []
    for dtype in ["u1", "i2", "u4", "i8", "f2", "f4", "f8", "?"]:
        for shape in [(), (0,), (3,), (2, 3), (1, 2, 2, 1)]:
            values = [rng.integers(0, 256, int(np.prod(shape)), np.uint8).view(np.uint8)]
            array = np.zeros(shape, dtype)
            array.reshape(-1).view(np.uint8)[:] = rng.integers(0, 256, array.nbytes, np.uint8)
            values = [array, np.arange(int(rng.integers(0, 4)), dtype=np.int64)]
            bases.append([bytes(memoryview(f).cast("B")) for f in codec.encode(values, ["a", "b"])])
    for _ in range(cases):
        frames = list(bases[int(rng.integers(len(bases)))])
        for _ in range(int(rng.integers(1, 5))):
            index = int(rng.integers(len(frames))) if frames else 0
            operation = int(rng.integers(6))
            if not frames:
                frames.append(rng.bytes(int(rng.integers(0, 40))))
            elif operation == 0 and frames[index]:
                frame = bytearray(frames[index])
                frame[int(rng.integers(len(frame)))] ^= int(rng.integers(1, 256))
                frames[index] = bytes(frame)
            elif operation == 1:
                frames[index] = frames[index][: int(rng.integers(len(frames[index]) + 1))]
            elif operation == 2:
                frames[index] += rng.bytes(int(rng.integers(1, 40)))
            elif operation == 3:
                del frames[index]
            elif operation == 4:
                frames.insert(index, frames[index])
            elif len(frames[index]) >= 8:
                frame = bytearray(frames[index])
                offset = int(rng.integers(len(frame) // 8)) * 8
                value = extremes[int(rng.integers(len(extremes)))]
                frame[offset : offset + 8] = value.to_bytes(8, "little", signed=True)
                frames[index] = bytes(frame)
        decoded = decode_or_none(frames)
        if decoded is not None:
            check_decoded(frames, decoded)
    return cases


def test_decoder_raises_only_decode_error() -> None:
    """Random and mutated frames, buffers and headers (hypothesis), then 20000 seeded mutations of valid messages:
    the decoder returns in-bounds views or raises DecodeError (headers: ProtocolError), nothing else."""
    tried = run_decoder_fuzz(1200) + run_mutation_fuzz(20000)
    assert tried >= 21900
    record("decoder", cases=tried)


@pytest.mark.slow
def test_decoder_raises_only_decode_error_long() -> None:
    """The same with ten times as many cases."""
    tried = run_decoder_fuzz(12000) + run_mutation_fuzz(200000, seed=1)
    record("decoder-long", cases=tried)


# a live request server


@st.composite
def hostile_requests(draw: st.DrawFn, state: dict[str, Any]) -> list[bytes]:
    """Random frames, random headers, or a well-formed HELLO/REQUEST with some fields made hostile."""
    kind = draw(st.integers(0, 4))
    if kind == 0:
        frames = draw(st.lists(st.binary(max_size=100), min_size=1, max_size=4))
    elif kind == 1:
        header = {"v": draw(st.sampled_from([1, 1, 1, 0, 2, None, "1"])), "cmd": draw(MSGPACK_INTS)}
        header.update(draw(st.dictionaries(FIELD_NAMES, VALUES, max_size=6)))
        frames = [msgpack.packb(header, use_bin_type=True)]
    else:
        fields: dict[str, Any] = {
            "seed": draw(st.integers(0, 3)),
            "rank": 0,
            "world_size": 1,
            "gen": 1,
            "step": draw(st.integers(0, 20)),
            "base": {"state": state if draw(st.booleans()) else None, "epoch": None},
        }
        for name in draw(st.lists(FIELD_NAMES, max_size=3)):
            fields[name] = draw(VALUES | EXTREME_INTS)
        if draw(st.booleans()):  # corrupt the pipeline state inside base
            corrupt = dict(state, step=draw(EXTREME_INTS))
            corrupt["stream"] = dict(state["stream"], **{draw(FIELD_NAMES): draw(VALUES)})
            fields["base"] = {"state": corrupt, "epoch": draw(VALUES)}
        command = draw(st.sampled_from([Command.HELLO, Command.REQUEST, Command.REQUEST, Command.PING]))
        frames = [Message(command, fields).encode()]
    if draw(st.integers(0, 4)) == 0:
        frames += draw(st.lists(st.binary(max_size=50), min_size=1, max_size=3))
    return frames


def run_server_fuzz(start_process: StartProcess, socket: MakeSocket, examples: int) -> dict[str, int]:
    process, url = serve(start_process, "factories:small", "-o", "repeating=true", workers=1)
    expected = reference(
        factories.small, count=examples // 25 + 2, seed=5, rank=0, world_size=1, repeating=True
    )
    with factories.small(seed=0, rank=0, world_size=1, repeating=True) as pipeline:
        state = pipeline.state()
    dealer = socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(url.replace("zreq://", "tcp://"))
    counts = {"cases": 0, "errors": 0, "batches": 0, "well_formed_batches": 0}
    well_formed = Connection(url, seed=5, timeout=30)
    received: list[Any] = []
    try:

        @fuzz_settings(examples, shrink=False)
        @given(frames=hostile_requests(state))
        def case(frames: list[bytes]) -> None:
            counts["cases"] += 1
            dealer.send_multipart(frames)
            assert dealer.poll(REPLY_SECONDS * 1000), f"no reply within {REPLY_SECONDS} s to {frames!r}"
            reply = Message.decode(dealer.recv_multipart()[0], "server")
            allowed = (
                Command.ERROR,
                Command.WELCOME,
                Command.BATCH,
                Command.BATCHES,
                Command.END,
                Command.PONG,
            )
            assert reply.command in allowed
            counts["errors"] += reply.command == Command.ERROR
            counts["batches"] += reply.command in (Command.BATCH, Command.BATCHES)
            if counts["cases"] % 25 == 0:  # the well-formed client is served all along
                received.append(well_formed.recv())

        case()
        received.append(well_formed.recv())
        counts["well_formed_batches"] = len(received)
        assert_same_batches(received, expected[: len(received)])
        assert process.poll() is None
    finally:
        well_formed.close()
        dealer.close()
    return counts


def test_live_request_server_survives_hostile_messages(
    start_process: StartProcess, socket: MakeSocket
) -> None:
    """Hundreds of random and mutated messages: each gets one reply, the server stays up, and a well-formed client
    interleaved with them receives its exact stream."""
    counts = run_server_fuzz(start_process, socket, 600)
    assert counts["cases"] == 600 and counts["errors"] > 150
    record("request-server", **counts)


@pytest.mark.slow
def test_live_request_server_survives_hostile_messages_long(
    start_process: StartProcess, socket: MakeSocket
) -> None:
    """The same with ten times as many messages."""
    record("request-server-long", **run_server_fuzz(start_process, socket, 6000))


# a stream server's control socket


@st.composite
def hostile_seeks(draw: st.DrawFn, state: dict[str, Any]) -> list[bytes]:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.lists(st.binary(max_size=100), min_size=1, max_size=3))
    if kind == 1:
        header = {"v": 1, "cmd": draw(st.sampled_from([int(c) for c in Command]) | MSGPACK_INTS)}
        header.update(draw(st.dictionaries(FIELD_NAMES, VALUES, max_size=4)))
        return [msgpack.packb(header, use_bin_type=True)]
    corrupt = dict(state, step=draw(st.integers(0, 50) | EXTREME_INTS))
    for name in draw(st.lists(st.sampled_from(["format", "fingerprint", "step", "stream"]), max_size=2)):
        corrupt[name] = draw(VALUES)
    if isinstance(corrupt.get("stream"), dict) and draw(st.booleans()):
        corrupt["stream"] = dict(corrupt["stream"], **{draw(FIELD_NAMES): draw(VALUES | EXTREME_INTS)})
    fields = {"state": corrupt} if kind == 2 else {"epoch": draw(VALUES | st.integers(0, 3))}
    return [Message(Command.SEEK, fields).encode()]


def run_control_fuzz(ipc_url: Callable[..., str], socket: MakeSocket, examples: int) -> int:
    with factories.small(seed=4, rank=0, world_size=1, repeating=True) as pipeline:
        state = pipeline.state()
    expected = reference(factories.small, count=3, seed=4, rank=0, world_size=1, repeating=True)
    connection = Connection(ipc_url("zpull"), timeout=30)
    server = Server(
        lambda **kw: factories.small(repeating=True, **kw),
        ipc_url("zpush"),
        seed=4,
        control=ipc_url("zrep", "control"),
        send_timeout=60,  # longer than a busy machine may keep the reader thread from reading; stop() ends it
        linger=0,
    )
    failures: list[BaseException] = []

    def run_server() -> None:
        try:
            server.run()
        except BaseException as error:  # the test checks that the server never stopped on an error
            failures.append(error)

    reading = threading.Event()
    reading.set()

    def read() -> None:
        while reading.is_set():
            try:
                connection.recv()
            except Exception:  # a hostile SEEK may make the stream end; reading only keeps the server moving
                time.sleep(0.01)

    server_thread = threading.Thread(target=run_server, daemon=True)
    reader = threading.Thread(target=read, daemon=True)
    server_thread.start()
    reader.start()
    dealer = socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(ipc_url("zreq", "control").split("+", 1)[1])
    tried = 0
    try:

        @fuzz_settings(examples, shrink=False)
        @given(frames=hostile_seeks(state))
        def case(frames: list[bytes]) -> None:
            nonlocal tried
            tried += 1
            dealer.send_multipart(frames)
            assert dealer.poll(REPLY_SECONDS * 1000), (
                f"no reply to {frames!r} (case {tried}); server thread alive: {server_thread.is_alive()}, "
                f"stopped by {failures!r}"
            )
            reply = Message.decode(dealer.recv_multipart()[0], "control")
            assert reply.command in (Command.SOUGHT, Command.ERROR)

        case()
        reading.clear()
        reader.join(timeout=40)
        connection.seek(ipc_url("zreq", "control"), epoch=0)
        assert_same_batches([connection.recv() for _ in range(3)], expected)
    finally:
        reading.clear()
        server.stop()
        dealer.close()
        connection.close()
        server_thread.join(timeout=30)
    assert [type(error).__name__ for error in failures] == []
    return tried


def test_stream_control_socket_survives_hostile_seeks(
    ipc_url: Callable[..., str], socket: MakeSocket
) -> None:
    """Random and corrupted SEEK messages each get SOUGHT or ERROR; afterwards a valid seek restarts the stream
    exactly, and the server runs until the test stops it."""
    tried = run_control_fuzz(ipc_url, socket, 300)
    record("control-socket", cases=tried)


# a stream client


def run_client_fuzz(ipc_url: Callable[..., str], socket: MakeSocket, examples: int) -> dict[str, int]:
    counts = {"cases": 0, "raised": 0, "skipped": 0, "decoded": 0}
    push = socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    with Connection(ipc_url("zpull"), timeout=REPLY_SECONDS, on_malformed="log") as connection:
        push.connect(connection.endpoints[0])

        @fuzz_settings(examples, shrink=False)
        @given(frames=ten_messages(with_meta=True))
        def case(frames: list[bytes]) -> None:
            counts["cases"] += 1
            marker = np.array([counts["cases"]], np.int64)
            if frames:
                push.send_multipart(frames)
            push.send_multipart(codec.encode([marker], ["marker"]))
            for _ in range(3):
                try:
                    batch = connection.recv()
                except (DecodeError, ProtocolError):
                    counts["raised"] += 1
                    continue
                if connection.last.infos == ["marker"] and np.array_equal(batch[0], marker):
                    return
                counts["decoded"] += 1
            raise AssertionError(f"the marker batch after {frames!r} never came")

        try:
            case()
        finally:
            push.close()
        counts["skipped"] = connection.malformed
    return counts


def test_stream_client_survives_hostile_batches(ipc_url: Callable[..., str], socket: MakeSocket) -> None:
    """Random and mutated batches (with hostile metadata) make a stream client raise DecodeError or ProtocolError, or
    skip them; the well-formed batch after each one always arrives."""
    counts = run_client_fuzz(ipc_url, socket, 600)
    assert counts["cases"] == 600 and counts["raised"] + counts["skipped"] > 200
    record("stream-client", **counts)


# pickles


class _Armed:
    """Unpickling this opens (creates) a marker file: what an attacker's pickle could do, harmlessly."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (builtins.open, (str(self.path), "w"))


def armed_pickle(path: Path) -> bytes:
    return pickle.dumps(_Armed(path), protocol=pickle.HIGHEST_PROTOCOL)


def test_the_armed_pickle_really_runs_code(tmp_path: Path) -> None:
    """The payload used below does create its marker file when unpickled (so its absence means something)."""
    marker = tmp_path / "proof"
    pickle.loads(armed_pickle(marker)).close()
    assert marker.exists()


def test_pickles_sent_to_every_receiving_socket_are_never_unpickled(
    start_process: StartProcess, ipc_url: Callable[..., str], tmp_path: Path, socket: MakeSocket
) -> None:
    """A pickle that would create a marker file, sent as a request, inside a request field, as batches and metadata
    to a stream client, and to a control socket: no marker ever appears and every peer keeps working."""
    markers = {name: tmp_path / f"marker-{name}" for name in ("frame", "field", "client", "meta", "control")}
    process, url = serve(start_process, "factories:small", workers=1)
    dealer = socket(zmq.DEALER)
    dealer.connect(url.replace("zreq://", "tcp://"))
    inner = Message(Command.REQUEST, {"seed": 0, "rank": 0, "world_size": 1, "step": 0, "gen": 1})
    inner.fields["base"] = {"state": armed_pickle(markers["field"]), "epoch": None}
    for frames in ([armed_pickle(markers["frame"])], [inner.encode(), armed_pickle(markers["frame"])]):
        dealer.send_multipart(frames)
        assert dealer.poll(REPLY_SECONDS * 1000)
        assert Message.decode(dealer.recv_multipart()[0]).command == Command.ERROR
    dealer.close(linger=0)
    with Connection(url, timeout=30) as connection:
        assert_same_batches(
            [connection.recv()], reference(factories.small, count=1, seed=0, rank=0, world_size=1)
        )

    push = socket(zmq.PUSH)
    with Connection(ipc_url("zpull"), timeout=REPLY_SECONDS, on_malformed="log") as client:
        push.connect(client.endpoints[0])
        push.send(armed_pickle(markers["client"]))
        push.send_multipart([armed_pickle(markers["client"])] * 2)
        payload = np.frombuffer(armed_pickle(markers["meta"]), np.uint8)
        push.send_multipart(codec.encode([np.zeros(1), payload], ["", META_INFO]))
        push.send_multipart(codec.encode([np.array([7])]))
        outcomes: list[Any] = []
        while not outcomes or isinstance(outcomes[-1], str):
            try:
                outcomes.append(client.recv())
            except (DecodeError, ProtocolError) as error:
                outcomes.append(type(error).__name__)
        assert len(outcomes) == 1 and outcomes[0][0].tolist() == [7]
        assert client.malformed == 3  # the two pickle-only messages and the pickled metadata, skipped
    push.close(linger=0)

    server = Server(factories.small, ipc_url("zpush"), control=ipc_url("zrep", "c"), send_timeout=3, linger=0)
    control = socket(zmq.DEALER)
    control.connect(ipc_url("zreq", "c").split("+", 1)[1])
    control.send(armed_pickle(markers["control"]))
    with Connection(ipc_url("zpull"), timeout=REPLY_SECONDS) as reader:
        thread = threading.Thread(target=lambda: _quietly(server.run), daemon=True)
        thread.start()
        reader.recv()
        assert control.poll(REPLY_SECONDS * 1000)
        assert Message.decode(control.recv_multipart()[0]).command == Command.ERROR
        reader.recv()
    control.close(linger=0)
    thread.join(timeout=20)
    assert process.poll() is None
    assert [name for name, path in markers.items() if path.exists()] == []


def _quietly(function: Callable[[], object]) -> None:
    try:
        function()
    except Exception:  # the server ends by send timeout once the test stops reading
        pass


def test_the_package_never_unpickles_network_data() -> None:
    """pickle appears in the package only where a pipeline's own worker processes report errors over a local
    pipe; the network modules never import it."""
    package = Path(__file__).parent.parent / "tensorcom"
    users = sorted(
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if re.search(r"^\s*(import pickle|from pickle|import cPickle|import dill)", path.read_text(), re.M)
    )
    assert users == ["pipeline/_worker.py"]
