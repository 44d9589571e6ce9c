"""Range and Permutation: bijection, epochs, random access, skip and state arithmetic, argument checks; IterableSource:
one-shot iterators and re-iterables, replay, close."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pipeline_harness import check_resume_everywhere, square

from tensorcom.errors import ConfigError, StateError
from tensorcom.pipeline import Conveyer, IterableSource, Map, Permutation, Range


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 600), seed=st.integers(0, 2**64 - 1), epoch=st.integers(0, 10**6))
def test_permutation_is_a_bijection(n: int, seed: int, epoch: int) -> None:
    """For any n, seed and epoch, the positions 0..n-1 map onto 0..n-1 exactly once."""
    p = Permutation(n, seed=seed, epoch=epoch)
    assert sorted(p.index_at(i) for i in range(n)) == list(range(n))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 16, 17, 1000, 1025], ids=lambda n: f"n={n}")
def test_permutation_iterates_one_epoch(n: int) -> None:
    """A non-repeating Permutation yields each index once, then stops, and stays stopped."""
    p = Permutation(n, seed=5)
    assert sorted(p) == list(range(n))
    with pytest.raises(StopIteration):
        next(p)


def test_permutation_new_order_every_epoch() -> None:
    """A repeating Permutation covers every index each epoch, in a different order each time."""
    p = Permutation(50, seed=1, repeating=True)
    epochs = [[next(p) for _ in range(50)] for _ in range(4)]
    assert all(sorted(e) == list(range(50)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 4
    assert p.epoch == 4 and p.position == 0


def test_permutation_seed_changes_order() -> None:
    """Two seeds give different orders; the same seed gives the same order."""
    a, b, c = (list(Permutation(100, seed=s)) for s in (1, 2, 1))
    assert a == c and a != b


def test_permutation_is_not_the_identity() -> None:
    """The order is shuffled: few fixed points and no long runs of consecutive indices."""
    order = list(Permutation(10_000, seed=0))
    fixed = sum(i == x for i, x in enumerate(order))
    ascending = sum(b == a + 1 for a, b in zip(order, order[1:], strict=False))
    assert fixed < 20 and ascending < 20


def test_huge_permutation_random_access() -> None:
    """n = 10**12 works with random access anywhere and a few integers of memory."""
    p = Permutation(10**12, seed=3)
    picks = [p[i] for i in (0, 10**6, 10**12 - 1)]
    assert all(0 <= x < 10**12 for x in picks) and len(set(picks)) == 3
    p.skip(10**11 + 5)
    assert p.state()["stream"] == {"seed": 3, "epoch": 0, "position": 10**11 + 5}
    assert next(p) == p.index_at(10**11 + 5)


@pytest.mark.parametrize(
    "make",
    [lambda: Range(7, repeating=True), lambda: Permutation(7, seed=2, repeating=True)],
    ids=["range", "permutation"],
)
def test_skip_across_epochs_is_arithmetic(make: object) -> None:
    """skip(k) on a repeating source lands on the same epoch, position and item as k calls of next."""
    walked, jumped = make(), make()  # type: ignore[operator]
    for _ in range(23):
        next(walked)
    jumped.skip(23)
    assert jumped.state() == walked.state()
    assert jumped.state()["stream"]["epoch"] == 3 and jumped.state()["stream"]["position"] == 2
    assert next(jumped) == next(walked)


def test_start_at_epoch() -> None:
    """epoch=, set_epoch and load_state with position 0 all start the same epoch's order."""
    by_kwarg = Permutation(20, seed=9, epoch=3)
    by_setter = Permutation(20, seed=9)
    by_setter.set_epoch(3)
    by_state = Permutation(20, seed=9)
    state = by_state.state()
    state["stream"]["epoch"] = 3
    by_state.load_state(state)
    assert list(by_kwarg) == list(by_setter) == list(by_state)
    conveyer = Conveyer([Permutation(20, seed=9)])
    conveyer.set_epoch(3)
    assert list(conveyer) == list(Permutation(20, seed=9, epoch=3))


def test_range_in_order_and_repeating() -> None:
    """Range yields 0..n-1; with repeating=True it starts over and counts epochs."""
    assert list(Range(4)) == [0, 1, 2, 3]
    r = Range(3, repeating=True)
    got = [r.next_with_meta() for _ in range(7)]
    assert [v for v, _ in got] == [0, 1, 2, 0, 1, 2, 0]
    assert [m["epoch"] for _, m in got] == [0, 0, 0, 1, 1, 1, 2]


def test_callable_and_context_manager() -> None:
    """A pipeline can be called for its next item and used as a context manager."""
    with Range(3) as r:
        assert r() == 0 and next(r) == 1


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: Range(0), "n must be an int > 0. Found: 0"),
        (lambda: Permutation(5, seed=-1), "seed must be an int in [0, 2**64). Found: -1"),
        (lambda: Permutation(5, seed=cast(int, 1.5)), "seed must be an int"),
        (lambda: Range(5, epoch=-2), "epoch must be an int >= 0. Found: -2"),
        (lambda: Range(5).skip(-1), "n must be an int >= 0. Found: -1"),
    ],
    ids=["zero-n", "negative-seed", "float-seed", "negative-epoch", "negative-skip"],
)
def test_bad_arguments_are_refused(call: object, message: str) -> None:
    """Bad constructor or skip arguments raise ConfigError showing the value."""
    with pytest.raises(ConfigError) as info:
        call()  # type: ignore[operator]
    assert message in str(info.value)


# -- IterableSource: one-shot iterators and re-iterables -------------------------------------------------------------


def closing_generator(n: int, closed: threading.Event) -> Iterator[int]:
    try:
        yield from range(n)
    finally:
        closed.set()


def test_iterable_source_closes_a_generator_and_refuses_to_read_it_again() -> None:
    """close() runs the generator's finally; reading on afterwards is a StateError saying why; the state still
    says where it stopped."""
    closed = threading.Event()
    p = Conveyer([closing_generator(100, closed), Map(square)])
    assert [next(p) for _ in range(3)] == [0, 1, 4]
    p.close()
    assert closed.is_set()
    assert p.state()["stream"] == {"position": 3}
    with pytest.raises(StateError, match="was closed by close\\(\\) after 3 items and cannot be read again"):
        next(p)


def test_iterable_source_over_a_generator_goes_forward_but_not_back() -> None:
    """A one-shot iterator loads a state ahead of it by reading and dropping the items between; going back is a
    StateError naming the positions and what to do instead."""
    p = IterableSource(iter(range(100)))
    assert [next(p) for _ in range(5)] == [0, 1, 2, 3, 4]
    p.load_state({**p.state(), "stream": {"position": 40}})
    assert p.state()["stream"] == {"position": 40} and next(p) == 40
    with pytest.raises(StateError, match="cannot go back to position 2: 41 items were already read"):
        p.load_state({**p.state(), "stream": {"position": 2}})


def test_states_load_into_a_fresh_generator() -> None:
    """A state saved at any step, loaded into an IterableSource over a fresh generator, continues exactly, the
    metadata (index = position in the iterable) included; skip(k) on a fresh one lands on item k."""
    reference = IterableSource(x * 3 for x in range(12))
    states, items = [reference.state()], []
    for _ in range(12):
        items.append(reference.next_with_meta())
        states.append(reference.state())
    for k, state in enumerate(states):
        fresh = IterableSource(x * 3 for x in range(12))
        fresh.load_state(state)
        assert [fresh.next_with_meta() for _ in range(12 - k)] == items[k:]
        with pytest.raises(StopIteration):
            next(fresh)
        skipped = IterableSource(x * 3 for x in range(12))
        skipped.skip(k)
        assert skipped.state() == state


class Reiterable:
    """A re-iterable whose iterators are generators that count how often they were closed, and that fail on
    ``fail_at`` (the item is lost, the iterator goes on)."""

    def __init__(self, n: int, fail_at: int | None = None) -> None:
        self.n, self.fail_at = n, fail_at
        self.closed = 0

    def __iter__(self) -> Iterator[int]:
        return FailingIterator(self)


class FailingIterator:
    def __init__(self, owner: Reiterable) -> None:
        self.owner, self.i = owner, 0

    def __iter__(self) -> FailingIterator:
        return self

    def __next__(self) -> int:
        i, self.i = self.i, self.i + 1
        if i >= self.owner.n:
            raise StopIteration
        if i == self.owner.fail_at:
            raise OSError(f"cannot read item {i}")
        return i

    def close(self) -> None:
        self.owner.closed += 1


def test_reiterable_source_replays_and_closes_the_iterators_it_leaves() -> None:
    """A re-iterable goes back by starting over (the abandoned iterator is closed) and reads on after close()."""
    items = Reiterable(10)
    p = IterableSource(items)
    assert [next(p) for _ in range(6)] == list(range(6))
    p.load_state({**p.state(), "stream": {"position": 2}})
    assert items.closed == 1 and next(p) == 2
    p.close()
    assert items.closed == 2 and list(p) == list(range(3, 10))


def test_a_failed_read_counts_as_an_item_when_read_and_when_replayed() -> None:
    """An iterator that raises on one item moves past it (the position counts it), and a replay passes over it."""
    p = IterableSource(Reiterable(8, fail_at=3))
    assert [next(p) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(OSError, match="cannot read item 3"):
        next(p)
    assert p.state()["stream"] == {"position": 4} and list(p) == [4, 5, 6, 7]
    q = IterableSource(Reiterable(8, fail_at=3))
    q.load_state({**q.state(), "stream": {"position": 5}})
    assert list(q) == [5, 6, 7]


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh", "shared"])
def test_reiterable_source_resumes_at_every_step(fresh: bool) -> None:
    """The shared checkpoint-at-every-step harness holds for a re-iterable (replay) source, into fresh pipelines
    and into one pipeline that loads every state in turn (going back and forth)."""

    def make() -> Any:
        return Conveyer([Reiterable(15), Map(square)])

    assert len(check_resume_everywhere(make, n_items=15, fresh=fresh)) == 15
