"""tests/helpers.py and the fixtures on it: ready lines that fail clearly, bit-for-bit batch comparison, and zmq
contexts whose teardown cannot hang."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq
from helpers import (
    MakeSocket,
    StartProcess,
    TrackedContext,
    batch_difference,
    close_and_term,
    read_line,
    same_batch,
    term_within,
    wait_ready,
    wait_until,
)

# -- ready lines ----------------------------------------------------------------------------------------------------


def test_wait_ready_returns_the_first_url_of_the_ready_line(start_process: StartProcess) -> None:
    """A ``ready URL...`` line gives its first URL."""
    process = start_process(
        "-c", "print('ready zreq://127.0.0.1:5 zreq+ipc:///x', flush=True)", stdout=subprocess.PIPE
    )
    assert wait_ready(process) == "zreq://127.0.0.1:5"


def test_a_process_that_exits_before_its_ready_line_fails_with_its_stderr(
    start_process: StartProcess,
) -> None:
    """No ready line and an exit: the failure gives the exit code and what the process wrote on stderr."""
    script = "import sys; sys.stderr.write('no such dataset\\n'); sys.exit(3)"
    process = start_process("-c", script, stdout=subprocess.PIPE)
    with pytest.raises(AssertionError, match=r"(?s)stdout ended; exit code 3.*no such dataset"):
        wait_ready(process)


def test_a_silent_process_fails_within_the_time_limit_with_its_stderr(
    start_process: StartProcess, tmp_path: Path
) -> None:
    """A process that never prints fails the wait after its time limit (not pytest's), stopped, stderr shown."""
    written = tmp_path / "written"
    script = (
        "import pathlib, sys, time; sys.stderr.write('still loading\\n'); sys.stderr.flush(); "
        f"pathlib.Path({str(written)!r}).touch(); time.sleep(60)"
    )
    process = start_process("-c", script, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert wait_until(written.exists), "the process did not start"  # its start-up is not in the 2 s below
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"(?s)no line on its stdout within 2 s.*still loading"):
        wait_ready(process, timeout=2)
    assert time.monotonic() - started < 30
    assert process.poll() is not None


def test_another_first_line_is_not_a_ready_line(start_process: StartProcess) -> None:
    """A first line that is not ``ready URL`` fails, quoting it."""
    process = start_process(
        "-c", "print('Traceback (most recent call last):', flush=True)", stdout=subprocess.PIPE
    )
    with pytest.raises(AssertionError, match="did not start: its first line is 'Traceback"):
        wait_ready(process)


def test_read_line_gives_an_empty_string_at_the_end_when_allowed(start_process: StartProcess) -> None:
    """With allow_end, the end of the output reads as "" (as readline says) instead of failing."""
    process = start_process("-c", "print('one', flush=True)", stdout=subprocess.PIPE)
    assert read_line(process) == "one\n"
    assert read_line(process, allow_end=True) == ""


# -- batches --------------------------------------------------------------------------------------------------------


def test_identical_batches_of_every_kind_are_the_same() -> None:
    """Arrays, numpy scalars, tensors, tuples, lists, dicts and plain values equal bit for bit are the same."""
    images = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    tensor = torch.tensor([[1.5, float("nan")]])
    batch = {"images": images, "labels": (np.int64(3), [1, "a"]), "tensor": tensor, "empty": np.zeros((0, 4))}
    copy = {
        "images": images.copy(),
        "labels": (np.int64(3), [1, "a"]),
        "tensor": tensor.clone(),
        "empty": np.zeros((0, 4)),
    }
    assert same_batch(batch, copy)
    assert same_batch(np.array(np.nan), np.array(np.nan))  # the same bits, although nan != nan


@pytest.mark.parametrize(
    "left, right, where",
    [
        (
            (np.zeros(3, np.int32),),
            (np.zeros(3, np.int64),),
            r"batch\[0\]: ndarray int32\(3,\) != ndarray int64",
        ),
        (
            [np.zeros((2, 3))],
            [np.zeros((3, 2))],
            r"batch\[0\]: ndarray float64\(2, 3\) != ndarray float64\(3, 2\)",
        ),
        (
            [np.array([0.0, 1.0])],
            [np.array([-0.0, 1.0])],
            r"batch\[0\]: float64\(2,\): 1 of 2 elements differ",
        ),
        ({"a": 1, "b": 2}, {"b": 2, "a": 1}, r"batch: keys \['a', 'b'\] != \['b', 'a'\]"),
        ((1, 2), [1, 2], "batch: tuple of 2 != list of 2"),
        ([torch.zeros(2)], [torch.ones(2)], r"batch\[0\]: tensors torch.float32\(2,\) differ"),
        ([torch.zeros(2)], [np.zeros(2, np.float32)], r"batch\[0\]: Tensor torch.float32\(2,\) != ndarray"),
        ({"x": [1, 2]}, {"x": [1, 3]}, r"batch\['x'\]\[1\]: 2 != 3"),
    ],
    ids=[
        "dtype",
        "shape",
        "negative-zero",
        "key-order",
        "tuple-vs-list",
        "tensor-values",
        "tensor-vs-array",
        "deep",
    ],
)
def test_a_difference_is_found_and_located(left: object, right: object, where: str) -> None:
    """Each kind of difference makes batches differ, and the message says where and how."""
    found = batch_difference(left, right)
    assert found is not None and not same_batch(left, right)
    assert re.match(where, found), found


# -- zmq contexts ---------------------------------------------------------------------------------------------------


def test_sockets_left_open_with_queued_messages_do_not_hang_teardown(tmp_path: Path) -> None:
    """A socket the test leaves open, holding messages for a peer that never came, is closed with linger=0: term()
    returns at once."""
    context = TrackedContext()
    push = context.socket(zmq.PUSH)
    push.connect(f"ipc://{tmp_path}/nobody")
    push.send(b"queued for nobody")
    started = time.monotonic()
    close_and_term(context, seconds=20)
    assert push.closed and context.closed
    assert time.monotonic() - started < 10


def test_a_context_that_cannot_term_fails_naming_the_open_socket(tmp_path: Path) -> None:
    """A socket still open with queued messages (one made after teardown's closing pass, by a thread still running)
    keeps term() waiting: the test fails within the time limit, naming the socket and its endpoint."""
    context = TrackedContext()
    late = context.socket(zmq.PUSH)
    late.connect(f"ipc://{tmp_path}/nobody")
    late.send(b"queued for nobody")
    with pytest.raises(
        pytest.fail.Exception, match=f"within 1 s; sockets still open: PUSH ipc://{tmp_path}/nobody"
    ):
        term_within(context, seconds=1)
    late.close(linger=0)  # the term() left waiting in its thread can finish now
    deadline = time.monotonic() + 20
    while not context.closed and time.monotonic() < deadline:
        time.sleep(0.05)
    assert context.closed


def test_socket_fixture_makes_working_sockets_of_the_test_context(
    context: TrackedContext, socket: MakeSocket, tmp_path: Path
) -> None:
    """The socket fixture's sockets belong to the context fixture, which tracks them for teardown."""
    pull = socket(zmq.PULL)
    pull.bind(f"ipc://{tmp_path}/pair")
    push = socket(zmq.PUSH)
    push.connect(f"ipc://{tmp_path}/pair")
    push.send(b"hello")
    assert pull.poll(20_000) and pull.recv() == b"hello"
    assert context.made == [pull, push] and pull.context is context


# -- waiting for an event -------------------------------------------------------------------------------------------


def test_wait_until_returns_once_the_condition_holds(tmp_path: Path) -> None:
    """wait_until returns True as soon as the condition holds (here: a file another thread makes), not at the limit."""
    flag = tmp_path / "flag"
    timer = threading.Timer(0.2, flag.touch)
    timer.start()
    started = time.monotonic()
    assert wait_until(flag.exists, seconds=60)
    assert time.monotonic() - started < 30
    timer.join()


def test_wait_until_gives_up_at_its_limit() -> None:
    """A condition that never holds makes wait_until return False after its limit, having checked it again."""
    checks = []
    started = time.monotonic()
    assert not wait_until(lambda: checks.append(1), seconds=0.3)
    assert 0.3 <= time.monotonic() - started < 20 and len(checks) >= 2
