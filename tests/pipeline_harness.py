"""Shared helpers for the pipeline tests: picklable worker functions and the checkpoint-at-every-step harness.

``check_resume_everywhere`` is the one harness every stage and combination goes through: it runs a reference
pipeline, saves its state before every item, restores each state (after a JSON and a msgpack round trip) into
another pipeline built by a second factory (e.g. with a different ``n_workers``) and checks that the rest of the
stream, its metadata and the final state are identical; it also checks that ``skip(k)`` lands exactly where ``k``
calls of ``next`` land.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
from helpers import assert_same_batch

from tensorcom.pipeline import Pipeline

# -- functions run by worker processes (module level so they pickle) ------------------------------------------------


def square(x: int) -> int:
    return x * x


def noisy(x: int, rng: np.random.Generator) -> tuple[int, float]:
    return x, float(rng.random())


def make_sample(index: int, rng: np.random.Generator) -> dict[str, Any]:
    image = np.full((2, 3), index, dtype=np.uint8)
    return {"image": image, "label": index % 10, "jitter": rng.normal(size=2).astype(np.float32)}


def fail_on_seven(x: int) -> int:
    if x == 7:
        raise KeyError(f"no sample {x}")
    return x


def exit_on_five(x: int) -> int:
    if x == 5:
        os._exit(3)
    return x


def kill_on_five(x: int) -> int:
    if x == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def hang_on_three(x: int) -> int:
    if x == 3:
        time.sleep(60)
    return x


# -- serialisation --------------------------------------------------------------------------------------------------


def round_trip(state: dict[str, Any]) -> dict[str, Any]:
    """Check ``state`` survives JSON and msgpack unchanged; return the msgpack copy (what a server would get)."""
    assert json.loads(json.dumps(state)) == state, "state does not survive JSON"
    copy = msgpack.unpackb(msgpack.packb(state), strict_map_key=False)
    assert copy == state, "state does not survive msgpack"
    return copy


def collect(pipeline: Pipeline, limit: int) -> list[tuple[Any, dict[str, Any]]]:
    out: list[tuple[Any, dict[str, Any]]] = []
    for _ in range(limit):
        try:
            out.append(pipeline.next_with_meta())
        except StopIteration:
            break
    return out


# -- the harness ----------------------------------------------------------------------------------------------------


def check_resume_everywhere(
    make: Callable[[], Pipeline],
    n_items: int,
    make_restored: Callable[[], Pipeline] | None = None,
    fresh: bool = True,
    skip_checks: int = 6,
) -> list[tuple[Any, dict[str, Any]]]:
    """Checkpoint before every one of the first ``n_items`` items, restore, and compare the rest of the stream.

    ``make_restored`` builds the pipeline states are restored into (default ``make``); with ``fresh=False`` one such
    pipeline is built and every state is loaded into it in turn (cheaper where building starts processes). Returns
    the reference items with their metadata.
    """
    restore_factory = make_restored or make
    reference = make()
    try:
        states = [round_trip(reference.state())]
        items: list[tuple[Any, dict[str, Any]]] = []
        for _ in range(n_items):
            try:
                items.append(reference.next_with_meta())
            except StopIteration:
                break
            states.append(round_trip(reference.state()))
    finally:
        reference.close()
    assert [meta["step"] for _, meta in items] == list(range(len(items)))

    shared = None if fresh else restore_factory()
    try:
        for k, state in enumerate(states):
            target = restore_factory() if shared is None else shared
            try:
                target.load_state(state)
                assert target.state() == state, f"state changed by loading it at step {k}"
                rest = collect(target, len(items) - k)
                assert len(rest) == len(items) - k, f"restored at step {k}: stream ended early"
                for j, ((a, meta_a), (b, meta_b)) in enumerate(zip(items[k:], rest, strict=True)):
                    assert meta_a == meta_b, f"restored at step {k}, item {k + j}: meta {meta_a} != {meta_b}"
                    assert_same_batch(a, b, f"restored at step {k}, item {k + j}")
                assert target.state() == states[-1], f"restored at step {k}: final state differs"
            finally:
                if shared is None:
                    target.close()

        last = len(items) - 1
        picks = sorted({0, 1, last // 2, last, *range(0, last + 1, max(1, last // max(1, skip_checks)))})
        for k in [p for p in picks if 0 <= p <= last]:
            target = restore_factory() if shared is None else shared
            try:
                target.load_state(states[0])
                target.skip(k)
                assert target.state() == states[k], f"skip({k}) state {target.state()} != {states[k]}"
                item, meta = target.next_with_meta()
                assert meta == items[k][1], f"skip({k}): meta {meta} != {items[k][1]}"
                assert_same_batch(item, items[k][0], f"skip({k})")
                if k + 2 <= last:
                    target.load_state(states[k])
                    target.skip(2)
                    assert_same_batch(next(target), items[k + 2][0], f"load step {k} then skip(2)")
            finally:
                if shared is None:
                    target.close()
    finally:
        if shared is not None:
            shared.close()
    return items
