"""Receivers allocate only for bytes that arrive and bound a message's frame count (issue 21, items 1 and 3)."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import zmq

from tensorcom import Connection, DecodeError, codec
from tensorcom._net.transport import MAX_FRAMES, PREALLOCATE, receive


def test_headers_announcing_more_than_arrives_allocate_little(context: zmq.Context, tmp_path: Path) -> None:
    """4,000 headers each announcing a 100 kB array, each followed by an empty data frame (400 MB announced, a
    few kB sent): receiving the message allocates at most about PREALLOCATE bytes."""
    pull = context.socket(zmq.PULL)
    pull.bind(f"ipc://{tmp_path}/s")
    push = context.socket(zmq.PUSH)
    push.connect(f"ipc://{tmp_path}/s")
    header = codec.encode([np.zeros(100_000, np.uint8)])[0]
    push.send_multipart([header, b""] * 4000)
    assert pull.poll(30_000)
    tracemalloc.start()
    try:
        frames = receive(pull, copy=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(frames) == 8000
    assert peak < PREALLOCATE + (16 << 20), peak
    with pytest.raises(DecodeError):
        codec.decode(frames)


def test_a_message_with_too_many_frames_is_dropped_and_the_stream_goes_on(tmp_path: Path) -> None:
    """A message of more than MAX_FRAMES frames is read to its end and refused with a DecodeError naming its size;
    the next batch arrives intact."""
    with Connection(f"zpull+ipc://{tmp_path}/s", timeout=30, shm=False) as connection:
        push = zmq.Context.instance().socket(zmq.PUSH)
        try:
            push.connect(f"ipc://{tmp_path}/s")
            push.send_multipart([b""] * (MAX_FRAMES + 10))
            push.send_multipart(codec.encode([np.arange(5)]))
            with pytest.raises(DecodeError, match=f"{MAX_FRAMES + 10} frames"):
                connection.recv()
            assert connection.recv()[0].tolist() == [0, 1, 2, 3, 4]
        finally:
            push.close(linger=0)
