"""tensorcom.protocol: the typed messages keep the wire format byte for byte, decode what they encode, accept
fields they do not know, and refuse malformed fields naming them."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorcom.errors import ProtocolError
from tensorcom.protocol import (
    MAX_GROUP,
    MAX_HEADER_BYTES,
    MAX_INTEGER,
    MAX_SEED,
    MAX_WORKERS,
    AnyMessage,
    Base,
    Batch,
    Batches,
    Command,
    End,
    Error,
    ErrorKind,
    Hello,
    Message,
    Ping,
    Pong,
    Request,
    Seek,
    Sought,
    Welcome,
    decode,
    flatten_batch,
    rebuild_batch,
)

FINGERPRINT = "7fc8ebf2b2639e183c857cb44c10513c"
STATE = {"format": 1, "fingerprint": FINGERPRINT, "step": 1, "stream": {"seed": 1, "epoch": 0, "position": 4}}
UINT8_2X2 = bytes.fromhex("75310000000000000000000000000000020000000000000002000000000000000200000000000000")
INT64_SCALAR = bytes.fromhex("693800000000000000000000000000000000000000000000")
FLOAT32_3 = bytes.fromhex("6634000000000000000000000000000001000000000000000300000000000000")
CLIENT: dict[str, Any] = {"seed": 7, "rank": 1, "world_size": 2, "base": Base(), "gen": 0}

# Generated from Message(Command.X, fields).encode() before the typed classes existed, with the fields in the order
# each sender wrote them then (the client's HELLO/REQUEST, the worker's WELCOME/BATCH/END/ERROR, the front end's
# PONG and ERROR, the stream server's SOUGHT and refusal, the stream client's SEEK). Never regenerate them from the
# typed classes: they prove the wire format did not change.
GOLDEN: dict[str, tuple[AnyMessage, str]] = {
    "hello": (
        Hello(**CLIENT),
        "87a17601a3636d6401a47365656407a472616e6b01aa776f726c645f73697a6502a46261736582a57374617465c0a565706f6368c0"
        "a367656e00",
    ),
    "request": (
        Request(**CLIENT, step=8),
        "88a17601a3636d6403a47365656407a472616e6b01aa776f726c645f73697a6502a46261736582a57374617465c0a565706f6368c0"
        "a367656e00a47374657008",
    ),
    "request-group-shm": (
        Request(**CLIENT, step=8, count=4, shm=True),
        "8aa17601a3636d6403a47365656407a472616e6b01aa776f726c645f73697a6502a46261736582a57374617465c0a565706f6368c0"
        "a367656e00a47374657008a5636f756e7404a373686dc3",
    ),
    "welcome": (
        Welcome(fingerprint=FINGERPRINT, state=STATE, server="host:1234"),
        "85a17601a3636d6402ab66696e6765727072696e74d920376663386562663262323633396531383363383537636234346331303531"
        "3363a5737461746584a6666f726d617401ab66696e6765727072696e74d9203766633865626632623236333965313833633835376362"
        "343463313035313363a47374657001a673747265616d83a47365656401a565706f636800a8706f736974696f6e04a6736572766572a9"
        "686f73743a31323334",
    ),
    # the optional field of issue 18, pinned from msgpack.packb of the header map in the documented field order
    "welcome-classes": (
        Welcome(fingerprint=FINGERPRINT, state=STATE, server="host:1234", classes=("cat", "dog", "emu")),
        "86a17601a3636d6402ab66696e6765727072696e74d92037666338656266326232363339653138336338353763623434633130353133"
        "63a5737461746584a6666f726d617401ab66696e6765727072696e74d920376663386562663262323633396531383363383537636234"
        "3463313035313363a47374657001a673747265616d83a47365656401a565706f636800a8706f736974696f6e04a6736572766572a968"
        "6f73743a31323334a7636c617373657393a3636174a3646f67a3656d75",
    ),
    "batch": (
        Batch(
            gen=1,
            step=123,
            epoch=0,
            indices=[27, 26, 55, 31],
            state=STATE,
            fingerprint=FINGERPRINT,
            server="host:1234",
            kind="dict",
            keys=["image", "label"],
        ),
        "8ba17601a3636d6404a367656e01a4737465707ba565706f636800a7696e6469636573941b1a371fa5737461746584a6666f726d61"
        "7401ab66696e6765727072696e74d9203766633865626632623236333965313833633835376362343463313035313363a47374657001"
        "a673747265616d83a47365656401a565706f636800a8706f736974696f6e04ab66696e6765727072696e74d920376663386562663262"
        "3236333965313833633835376362343463313035313363a6736572766572a9686f73743a31323334a46b696e64a464696374a46b6579"
        "7392a5696d616765a56c6162656c",
    ),
    # BATCHES (issue 20), pinned from msgpack.packb of the header map in the documented field order: two steps whose
    # states are maps with the same keys (the second sent as its changed top-level fields), and two whose are not;
    # tensors: the .ten headers of a 2x2 uint8 array and an int64 scalar (twice), and of a float32 array of 3 (twice)
    "batches": (
        Batches(
            gen=1,
            step=123,
            arrays=2,
            epochs=[0, 0],
            indices=[[27, 26], [55, 31]],
            state=STATE,
            changes=[{"step": 2, "stream": {"seed": 1, "epoch": 0, "position": 8}}],
            tensors=[UINT8_2X2, INT64_SCALAR, UINT8_2X2, INT64_SCALAR],
            fingerprint=FINGERPRINT,
            server="host:1234",
            kind="dict",
            keys=["image", "label"],
        ),
        "8ea17601a3636d640ba367656e01a4737465707ba661727261797302a665706f636873920000a7696e646963657392921b1a92371fa5"
        "737461746584a6666f726d617401ab66696e6765727072696e74d9203766633865626632623236333965313833633835376362343463"
        "313035313363a47374657001a673747265616d83a47365656401a565706f636800a8706f736974696f6e04a76368616e6765739182a4"
        "7374657002a673747265616d83a47365656401a565706f636800a8706f736974696f6e08a774656e736f727394c42875310000000000"
        "000000000000000000020000000000000002000000000000000200000000000000c41869380000000000000000000000000000000000"
        "0000000000c42875310000000000000000000000000000020000000000000002000000000000000200000000000000c4186938000000"
        "00000000000000000000000000000000000000ab66696e6765727072696e74d920376663386562663262323633396531383363383537"
        "6362343463313035313363a6736572766572a9686f73743a31323334a46b696e64a464696374a46b65797392a5696d616765a56c6162"
        "656c",
    ),
    "batches-states": (
        Batches(
            step=7,
            arrays=1,
            epochs=[None, None],
            indices=[[], []],
            states=[[1], [2]],
            tensors=[FLOAT32_3, FLOAT32_3],
        ),
        "8aa17601a3636d640ba367656e00a47374657007a661727261797301a665706f63687392c0c0a7696e6469636573929090a673746174"
        "65739291019102a774656e736f727392c4206634000000000000000000000000000001000000000000000300000000000000c4206634"
        "000000000000000000000000000001000000000000000300000000000000a46b696e64a673696e676c65",
    ),
    "end": (
        End(gen=1, step=15, server="host:1234"),
        "85a17601a3636d6405a367656e01a4737465700fa6736572766572a9686f73743a31323334",
    ),
    "ping": (Ping(), "82a17601a3636d6407"),
    "pong": (Pong(server="host:1234"), "83a17601a3636d6408a6736572766572a9686f73743a31323334"),
    "seek-state": (
        Seek(state=STATE),
        "83a17601a3636d6409a5737461746584a6666f726d617401ab66696e6765727072696e74d920376663386562663262323633396531"
        "3833633835376362343463313035313363a47374657001a673747265616d83a47365656401a565706f636800a8706f736974696f6e04",
    ),
    "seek-epoch": (Seek(epoch=3), "83a17601a3636d6409a565706f636803"),
    "sought": (
        Sought(gen=1, fingerprint=FINGERPRINT),
        "84a17601a3636d640aa367656e01ab66696e6765727072696e74d9203766633865626632623236333965313833633835376362343463"
        "313035313363",
    ),
    "error-state": (
        Error(
            gen=2,
            step=0,
            error=ErrorKind.STATE,
            message="StateError: the state was saved from another pipeline",
            server="host:1234",
            request="HELLO",
        ),
        "88a17601a3636d6406a367656e02a47374657000a56572726f72a57374617465a76d657373616765d93553746174654572726f723a"
        "20746865207374617465207761732073617665642066726f6d20616e6f7468657220706970656c696e65a6736572766572a9686f7374"
        "3a31323334a772657175657374a548454c4c4f",
    ),
    "error-protocol": (
        Error(
            gen=0,
            step=0,
            error=ErrorKind.PROTOCOL,
            message="a server does not accept BATCH messages",
            server="host:1234",
            request="BATCH",
        ),
        "88a17601a3636d6406a367656e00a47374657000a56572726f72a870726f746f636f6ca76d657373616765d927612073657276657220"
        "646f6573206e6f7420616363657074204241544348206d65737361676573a6736572766572a9686f73743a31323334a7726571756573"
        "74a54241544348",
    ),
    "error-pipeline": (
        Error(
            gen=1,
            step=13,
            error=ErrorKind.PIPELINE,
            message="ValueError: sample 13 is corrupt",
            server="host:1234",
            request="REQUEST",
        ),
        "88a17601a3636d6406a367656e01a4737465700da56572726f72a8706970656c696e65a76d657373616765d92056616c7565457272"
        "6f723a2073616d706c6520313320697320636f7272757074a6736572766572a9686f73743a31323334a772657175657374a752455155"
        "455354",
    ),
    "error-unavailable": (
        Error(
            error=ErrorKind.UNAVAILABLE, message="the server has finished (12 batches sent) and is closing"
        ),
        "84a17601a3636d6406a56572726f72ab756e617661696c61626c65a76d657373616765d93874686520736572766572206861732066"
        "696e69736865642028313220626174636865732073656e742920616e6420697320636c6f73696e67",
    ),
    "error-busy": (
        Error(
            gen=2,
            step=40,
            error=ErrorKind.BUSY,
            message="the server keeps requests for 1024 clients already",
            server="host:1234",
            request="REQUEST",
            count=8,
        ),
        "89a17601a3636d6406a367656e02a47374657028a56572726f72a462757379a76d657373616765d93274686520736572766572206b"
        "6565707320726571756573747320666f72203130323420636c69656e747320616c7265616479a6736572766572a9686f73743a3132"
        "3334a772657175657374a752455155455354a5636f756e7408",
    ),
}


@pytest.mark.parametrize("name", list(GOLDEN), ids=list(GOLDEN))
def test_each_message_encodes_to_the_bytes_of_the_untyped_header(name: str) -> None:
    """A typed message encodes to exactly the bytes the untyped header gave for the same fields (pinned hex)."""
    message, golden = GOLDEN[name]
    assert message.encode().hex() == golden


@pytest.mark.parametrize("name", list(GOLDEN), ids=list(GOLDEN))
def test_the_pinned_bytes_decode_to_the_same_message(name: str) -> None:
    """decode() turns the pinned bytes back into an equal message of the right class, and Message.typed agrees."""
    message, golden = GOLDEN[name]
    decoded = decode(bytes.fromhex(golden), "test")
    assert type(decoded) is type(message) and decoded == message
    assert Message.decode(bytes.fromhex(golden)).typed() == message


def test_the_pins_cover_every_command_and_every_error_kind() -> None:
    """Every command, and an ERROR of every kind, has pinned bytes: a new one cannot go unpinned."""
    messages = [message for message, _ in GOLDEN.values()]
    assert {message.command for message in messages} == set(Command)
    assert {message.error for message in messages if isinstance(message, Error)} == set(ErrorKind)


def test_error_kinds_travel_as_the_strings_of_before() -> None:
    """ErrorKind values are the strings that servers sent before the enum existed, and compare equal to them."""
    assert [kind.value for kind in ErrorKind] == ["state", "protocol", "pipeline", "unavailable", "busy"]
    assert ErrorKind.STATE == "state" and isinstance(ErrorKind.PIPELINE, str)


@pytest.mark.parametrize("name", list(GOLDEN), ids=list(GOLDEN))
def test_fields_a_newer_peer_adds_are_accepted(name: str) -> None:
    """A header with extra fields no class knows decodes to the same message (forward compatibility)."""
    message, golden = GOLDEN[name]
    header = Message.decode(bytes.fromhex(golden))
    extended = Message(header.command, {**header.fields, "future": [1, {"x": 2}], "zz": None})
    assert decode(extended.encode(), "newer peer") == message


def test_class_names_only_add_a_field_to_welcome() -> None:
    """The optional WELCOME field is additive both ways: without it the bytes are today's WELCOME (servers that
    know no names send what they always sent, and those decode to classes None); with it, a peer that reads only
    the fields it knows (an older client) finds today's WELCOME."""
    plain, golden = GOLDEN["welcome"]
    named, named_golden = GOLDEN["welcome-classes"]
    assert decode(bytes.fromhex(golden), "old server") == plain and plain.classes is None
    header = Message.decode(bytes.fromhex(named_golden))
    older = {
        name: value for name, value in header.fields.items() if name in ("fingerprint", "state", "server")
    }
    assert Message(Command.WELCOME, older).encode().hex() == golden
    assert header.fields["classes"] == ["cat", "dog", "emu"] and named.classes == ("cat", "dog", "emu")


def _request(**fields: Any) -> dict[str, Any]:
    return {"seed": 1, "rank": 0, "world_size": 2, "base": {"state": None, "epoch": None}, "gen": 3, **fields}


MALFORMED: list[tuple[Command, dict[str, Any], str]] = [
    (Command.REQUEST, _request(step="3"), "field 'step' .* must be an integer in"),
    (Command.REQUEST, _request(step=-1), "field 'step' .* must be an integer in"),
    (Command.REQUEST, _request(step=MAX_INTEGER + 1), "field 'step' .* must be an integer in"),
    (Command.REQUEST, _request(), "has no field 'step'"),
    (Command.REQUEST, _request(step=0, count=0), "field 'count' .* in \\[1, 64\\]"),
    (Command.REQUEST, _request(step=0, count=MAX_GROUP + 1), "field 'count'"),
    (Command.REQUEST, _request(step=0, shm="yes"), "field 'shm' .* must be true or false"),
    (Command.REQUEST, _request(step=0, gen=-2), "field 'gen'"),
    (Command.HELLO, _request(seed=-1), "field 'seed'"),
    (Command.HELLO, _request(seed=1.5), "field 'seed'"),
    (Command.HELLO, _request(rank=True), "field 'rank'"),
    (Command.HELLO, _request(rank=2), "field 'rank' .* must be < world_size \\(2\\)"),
    (Command.HELLO, _request(world_size=0), "field 'world_size'"),
    (Command.HELLO, {"seed": 1, "rank": 0, "base": None}, "has no field 'world_size'"),
    (Command.HELLO, _request(base=[1]), "field 'base' .* must be a map"),
    (Command.HELLO, _request(base={"epoch": "x"}), "field 'base.epoch'"),
    (
        Command.HELLO,
        _request(base={"state": {"step": 1 << 63}}),
        "base state .* field 'step' is out of range",
    ),
    (Command.WELCOME, {"fingerprint": 3}, "field 'fingerprint' .* must be a string"),
    (Command.WELCOME, {"classes": "cat"}, "field 'classes' .* must be a list of strings or nil"),
    (Command.WELCOME, {"classes": ["cat", 1]}, "field 'classes' .* must be a list of strings or nil"),
    (Command.BATCH, {"gen": "1", "step": 0, "kind": "single"}, "field 'gen'"),
    (Command.BATCH, {"step": 0, "epoch": "0", "kind": "single"}, "field 'epoch'"),
    (Command.BATCH, {"kind": "single"}, "has no field 'step'"),
    (
        Command.BATCH,
        {"step": 0, "indices": [1, "2"], "kind": "single"},
        "field 'indices' .* a list of integers",
    ),
    (Command.BATCH, {"step": 0, "indices": 7, "kind": "single"}, "field 'indices'"),
    (Command.BATCH, {"step": 0, "kind": "set"}, "field 'kind' .* one of single, tuple, list, dict"),
    (Command.BATCH, {"step": 0}, "has no field 'kind'"),
    (Command.BATCH, {"step": 0, "kind": "dict", "keys": [1]}, "field 'keys' .* a list of strings"),
    (Command.BATCH, {"step": 0, "kind": "tuple", "fingerprint": 5}, "field 'fingerprint'"),
    (Command.BATCH, {"step": 0, "kind": "tuple", "seed": -1}, "field 'seed'"),
    (Command.BATCHES, {"step": 0, "epochs": [0], "indices": [[]], "states": [None]}, "has no field 'arrays'"),
    (Command.BATCHES, {"step": 0, "arrays": -1, "epochs": [0]}, "field 'arrays'"),
    (Command.BATCHES, {"step": 0, "arrays": 1, "epochs": []}, "field 'epochs' .* 1 to 64"),
    (Command.BATCHES, {"step": 0, "arrays": 1, "epochs": [0] * 65}, "field 'epochs'"),
    (Command.BATCHES, {"step": 0, "arrays": 1, "epochs": ["0"]}, "field 'epochs'"),
    (
        Command.BATCHES,
        {"step": 0, "arrays": 1, "epochs": [0, 0], "indices": [[1]]},
        "field 'indices' .* 2 lists",
    ),
    (Command.BATCHES, {"step": 0, "arrays": 1, "epochs": [0], "indices": [[1.5]]}, "field 'indices'"),
    (
        Command.BATCHES,
        {"step": 0, "arrays": 1, "epochs": [0, 0], "indices": [[], []], "states": [None]},
        "field 'states' .* a list of 2 states",
    ),
    (
        Command.BATCHES,
        {"step": 0, "arrays": 1, "epochs": [0, 0], "indices": [[], []], "state": [1], "changes": [{}]},
        "field 'changes' .* after a map 'state'",
    ),
    (
        Command.BATCHES,
        {"step": 0, "arrays": 1, "epochs": [0, 0], "indices": [[], []], "state": {}, "changes": [{}, {}]},
        "field 'changes' .* 1 maps",
    ),
    (
        Command.BATCHES,
        {"step": 0, "arrays": 2, "epochs": [0], "indices": [[]], "states": [None], "tensors": [FLOAT32_3]},
        "field 'tensors' .* 2 .ten headers",
    ),
    (
        Command.BATCHES,
        {"step": 0, "arrays": 1, "epochs": [0], "indices": [[]], "states": [None], "tensors": ["f4"]},
        "field 'tensors'",
    ),
    (
        Command.BATCHES,
        {
            "step": 0,
            "arrays": 1,
            "epochs": [0],
            "indices": [[]],
            "states": [None],
            "tensors": [FLOAT32_3],
            "kind": 1,
        },
        "field 'kind'",
    ),
    (Command.END, {"gen": 1}, "has no field 'step'"),
    (Command.ERROR, {"error": "oops", "message": "m"}, "field 'error' .* one of state, protocol, pipeline"),
    (Command.ERROR, {"error": ["state"], "message": "m"}, "field 'error'"),
    (Command.ERROR, {"error": "state"}, "has no field 'message'"),
    (Command.ERROR, {"error": "state", "message": "m", "step": "x"}, "field 'step'"),
    (Command.PONG, {"server": 1}, "field 'server'"),
    (Command.SEEK, {}, "needs a state or an epoch"),
    (Command.SEEK, {"epoch": -1}, "field 'epoch'"),
    (Command.SEEK, {"state": {"position": -(1 << 63)}}, "SEEK state .* out of range"),
    (Command.SOUGHT, {"fingerprint": FINGERPRINT}, "has no field 'gen'"),
]


@pytest.mark.parametrize(
    "command, fields, message", MALFORMED, ids=[f"{c.name}-{i}" for i, (c, _, _) in enumerate(MALFORMED)]
)
def test_malformed_fields_are_refused_naming_the_field_and_the_peer(
    command: Command, fields: dict[str, Any], message: str
) -> None:
    """A wrong type, an out-of-range integer or a missing required field raises ProtocolError naming the field and
    the peer, from decode() and from Message.typed() alike."""
    frame = Message(command, fields).encode()
    with pytest.raises(ProtocolError, match=message) as raised:
        decode(frame, "server x")
    assert "server x" in str(raised.value)
    with pytest.raises(ProtocolError, match=message):
        Message.decode(frame, "server x").typed("server x")


@pytest.mark.parametrize(
    "frame, message",
    [
        (b"\xc1not msgpack", "is not valid msgpack"),
        (msgpack.packb([1, 3]), "must be a map"),
        (msgpack.packb({"v": 2, "cmd": 3}), "speaks protocol version 2"),
        (msgpack.packb({"v": 1, "cmd": 77}), "unknown command from peer x: 77"),
        (msgpack.packb({"v": 1, "cmd": True}), "unknown command"),
        (msgpack.packb({"v": 1, "cmd": [3]}), "unknown command"),
        (b"\x80" + b"\x00" * MAX_HEADER_BYTES, f"at most {MAX_HEADER_BYTES}"),
    ],
    ids=["garbage", "list", "version", "command", "bool-command", "list-command", "too-big"],
)
def test_malformed_headers_are_refused(frame: bytes, message: str) -> None:
    """A header that is not msgpack, not a map, of another version, of no known command or too large is refused."""
    with pytest.raises(ProtocolError, match=message):
        decode(frame, "peer x")


def test_an_error_reply_echoes_what_it_can_of_the_request() -> None:
    """Error.refusing echoes a typed request's gen, step and command; a header that failed its checks gives what
    of them is valid (else 0); nothing readable gives 0, 0 and no request name."""
    request = Request(**CLIENT, step=9)
    assert Error.refusing(request, ErrorKind.PIPELINE, "t", "s") == Error(
        gen=0, step=9, error=ErrorKind.PIPELINE, message="t", server="s", request="REQUEST"
    )
    hello = Error.refusing(Hello(**{**CLIENT, "gen": 4}), ErrorKind.STATE, "t", "s")
    assert (hello.gen, hello.step, hello.request) == (4, 0, "HELLO")
    header = Message(Command.REQUEST, {"gen": 5, "step": "x"})
    echoed = Error.refusing(header, ErrorKind.PROTOCOL, "t", "s")
    assert (echoed.gen, echoed.step, echoed.request) == (5, 0, "REQUEST")
    unknown = Error.refusing(None, ErrorKind.PROTOCOL, "t", "s")
    assert (unknown.gen, unknown.step, unknown.request) == (0, 0, None)


def test_stream_batch_metadata_decodes_as_a_batch() -> None:
    """The metadata a stream server appends (a BATCH's fields without header, with seed) decodes to a Batch."""
    fields = {"gen": 2, "step": 5, "epoch": 1, "indices": [3, 4], "state": STATE, "fingerprint": FINGERPRINT}
    packed = msgpack.packb({**fields, "seed": 11, "kind": "tuple"}, use_bin_type=True)
    batch = Batch.from_fields(msgpack.unpackb(packed), "stream server")
    assert batch == Batch(**fields, seed=11, kind="tuple")
    assert batch.server is None and batch.keys is None


def test_a_batch_counted_on_past_the_input_bound_is_accepted() -> None:
    """A server may count on from a state as high as MAX_INTEGER (what a peer may send it), so a BATCH's gen, step
    and epoch beyond that bound still decode (a hostile seek once made a client refuse the stream)."""
    batch = Batch(gen=MAX_INTEGER + 1, step=MAX_INTEGER + 157, epoch=MAX_INTEGER + 2, kind="single")
    assert decode(batch.encode(), "server x") == batch


@pytest.mark.parametrize(
    "batch",
    [("a", "b"), ["a", "b"], {"x": "a", "y": "b"}, "a"],
    ids=["tuple", "list", "dict", "single"],
)
def test_a_batch_is_rebuilt_from_its_kind_and_keys(batch: Any) -> None:
    """rebuild_batch(values, **shape) inverts flatten_batch for every kind of batch."""
    values, shape = flatten_batch(batch)
    assert rebuild_batch(values, **shape) == batch
    header = Batch(step=0, **shape)
    assert rebuild_batch(values, header.kind, header.keys) == batch


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, MAX_SEED),
    world_size=st.integers(1, MAX_INTEGER),
    data=st.data(),
    step=st.integers(0, MAX_INTEGER),
    count=st.integers(1, MAX_GROUP),
    shm=st.booleans(),
    epoch=st.none() | st.integers(0, MAX_INTEGER),
)
def test_requests_and_batches_round_trip(
    seed: int, world_size: int, data: st.DataObject, step: int, count: int, shm: bool, epoch: int | None
) -> None:
    """Any REQUEST and BATCH within the field ranges decodes to the message that was encoded."""
    rank = data.draw(st.integers(0, world_size - 1))
    request = Request(
        seed=seed,
        rank=rank,
        world_size=world_size,
        base=Base(epoch=epoch),
        gen=3,
        step=step,
        count=count,
        shm=shm,
    )
    assert decode(request.encode()) == request
    batch = Batch(gen=3, step=step, epoch=epoch, indices=[rank, step], server="s", kind="list")
    assert decode(batch.encode()) == batch


@pytest.mark.parametrize("kind", [Welcome, Pong])
def test_worker_addresses_travel_in_welcome_and_pong_and_are_bounded(kind: Any) -> None:
    """WELCOME and PONG may name the server's workers (absent when None, so older peers see the same bytes); a
    list that is not strings, or longer than MAX_WORKERS, is refused."""
    message = kind(server="s", workers=("tcp://:4000", "ipc:///tmp/s.worker-1"))
    assert decode(message.encode(), "server x") == message
    assert b"workers" not in kind(server="s").encode()
    for bad in (["x"] * (MAX_WORKERS + 1), [1, 2], "tcp://:1"):
        header = Message(kind.command, {"server": "s", "workers": bad}).encode()
        with pytest.raises(ProtocolError, match="workers"):
            decode(header, "server x")


STEP_STATES = [
    {
        "format": 1,
        "fingerprint": FINGERPRINT,
        "step": step,
        "stream": {"seed": 1, "epoch": 0, "position": 4 * step},
    }
    for step in range(1, 5)
]


@pytest.mark.parametrize(
    "states, as_changes",
    [
        (STEP_STATES, True),
        ([{"a": 1, "b": 1}, {"a": True, "b": 1}, {"a": 1.0, "b": 2}], True),
        ([{"a": 1, "b": 2}, {"b": 2, "a": 1}], False),
        ([{"a": 1}, {"a": 1, "b": 2}], False),
        ([[1], [2]], False),
        ([None, {"a": 1}], False),
    ],
    ids=["pipeline states", "1, True and 1.0 differ", "key order", "new key", "not maps", "first not a map"],
)
def test_batches_rebuild_every_state_exactly(states: list[Any], as_changes: bool) -> None:
    """States are sent as changes only where every one is a map with the same keys in the same order, and each
    rebuilt state packs to the very bytes of the state sent (msgpack tells 1, True and 1.0 apart)."""
    batches = [Batch(step=10 + i, state=state, indices=[i]) for i, state in enumerate(states)]
    group = Batches.of(batches, arrays=1, tensors=[FLOAT32_3] * len(states))
    assert (group.changes is not None) == as_changes
    received = decode(group.encode(), "test")
    assert isinstance(received, Batches) and received.count == len(states)
    for index, state in enumerate(states):
        packed = msgpack.packb(received.state_at(index), use_bin_type=True)
        assert packed == msgpack.packb(state, use_bin_type=True)
        assert received.batch(index) == batches[index]


def test_a_command_this_version_does_not_know_is_a_clear_protocol_error() -> None:
    """A header with the next command number (one a newer peer might send) raises ProtocolError naming it."""
    frame = msgpack.packb({"v": 1, "cmd": max(Command) + 1, "step": 0})
    with pytest.raises(ProtocolError, match=f"unknown command from server x: {max(Command) + 1}"):
        decode(frame, "server x")


def test_batches_pack_their_arrays_64_byte_aligned_in_one_frame() -> None:
    """Batches.pack puts each array's bytes at the next multiple of 64 (zeros between), and layout() finds them
    from the sizes the headers announce: the arrays decode back from views of the one frame."""
    import numpy as np

    from tensorcom import codec

    arrays = [
        np.arange(5, dtype=np.int16),
        np.array(7, dtype=np.int64),
        np.zeros((0, 3), np.uint8),
        np.ones(70, "u1"),
    ]
    frames = codec.encode(arrays)
    tensors, data = Batches.pack(frames)
    assert tensors == [bytes(header) for header in frames[0::2]]
    group = Batches(step=0, arrays=2, epochs=[0, 0], indices=[[], []], states=[None, None], tensors=tensors)
    places = group.layout([codec.data_size(header) for header in tensors])
    assert places == [(0, 10), (64, 8), (128, 0), (128, 70)] and len(data) == 198
    assert bytes(data[10:64]) == bytes(54) and bytes(data[72:128]) == bytes(56)
    view = memoryview(data)
    decoded = codec.decode(
        [x for t, (o, n) in zip(tensors, places, strict=True) for x in (t, view[o : o + n])]
    )
    for got, want in zip(decoded, arrays, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
