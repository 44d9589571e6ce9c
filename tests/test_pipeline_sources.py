"""Range and Permutation: bijection, epochs, random access, skip and state arithmetic, argument checks."""

from __future__ import annotations

from typing import cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorcom.errors import ConfigError
from tensorcom.pipeline import Conveyer, Permutation, Range


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
