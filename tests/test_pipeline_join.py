"""Join: weighted proportions, per-block quotas, random access to the source rule, skip and resume mid-mix."""

from __future__ import annotations

import collections

import pytest
from pipeline_harness import check_resume_everywhere

from tensorcom.errors import ConfigError
from tensorcom.pipeline import Conveyer, Join, Permutation, Range


def _mix(weights: list[float], seed: int = 3) -> Join:
    return Join([(Permutation(10 + i, seed=i, repeating=True), w) for i, w in enumerate(weights)], seed=seed)


@pytest.mark.parametrize(
    "weights",
    [[0.7, 0.3], [1, 1, 1], [0.123, 0.5, 2.0], [0.001, 0.999]],
    ids=["70-30", "equal", "odd", "tiny"],
)
def test_proportions_over_a_long_run(weights: list[float]) -> None:
    """Over 20,000 items each source's share matches its weight to within 1%."""
    join = _mix(weights)
    counts = collections.Counter(join.next_with_meta()[1]["sources"][0] for _ in range(20_000))
    total = sum(weights)
    for s, w in enumerate(weights):
        assert abs(counts[s] / 20_000 - w / total) < 0.01


def test_every_block_window_holds_exact_quota() -> None:
    """Any window of one block's length (at any offset) holds exactly units[s] items of source s."""
    join = _mix([0.5, 0.3, 0.2])
    units = join.units
    block = sum(units)
    assert units == [5, 3, 2]
    sources = [join.source_at(p) for p in range(5 * block)]
    for start in range(4 * block):
        window = collections.Counter(sources[start : start + block])
        assert [window[s] for s in range(3)] == units


def test_served_before_matches_counting() -> None:
    """served_before(s, p) equals counting the source rule over [0, p) for many p."""
    join = _mix([0.25, 0.6, 0.15], seed=8)
    counts = [0, 0, 0]
    for p in range(300):
        assert [join.served_before(s, p) for s in range(3)] == counts
        counts[join.source_at(p)] += 1


def test_skip_matches_walking() -> None:
    """skip(k) leaves Join and every source exactly where k calls of next leave them."""
    walked, jumped = _mix([0.6, 0.4]), _mix([0.6, 0.4])
    for _ in range(1234):
        next(walked)
    jumped.skip(1234)
    assert jumped.state() == walked.state()
    assert [next(jumped) for _ in range(50)] == [next(walked) for _ in range(50)]


def test_resume_mid_mix_is_exact() -> None:
    """A state saved mid-mix restores Join's own position and each source's cursor; the mix does not drift."""
    reference = _mix([0.45, 0.35, 0.2])
    for _ in range(777):
        next(reference)
    state = reference.state()
    assert state["stream"]["position"] == 777
    expected = [reference.next_with_meta() for _ in range(200)]
    restored = _mix([0.45, 0.35, 0.2])
    restored.load_state(state)
    assert [restored.next_with_meta() for _ in range(200)] == expected
    check_resume_everywhere(lambda: _mix([0.45, 0.35, 0.2]), n_items=20)


def test_sources_keep_their_own_epochs() -> None:
    """Each source wraps into its own next epoch independently of the others."""
    join = Join([(Range(2, repeating=True), 0.5), (Range(5, repeating=True), 0.5)], seed=1)
    metas = [join.next_with_meta()[1] for _ in range(20)]
    last = {m["sources"][0]: m["epoch"] for m in metas}
    assert last == {0: 4, 1: 1}


def test_finite_source_ends_the_join() -> None:
    """When a finite source it must draw from runs out, the Join stops; skip past that point stops it too."""
    join = Join([(Range(3), 0.5), (Range(100), 0.5)], seed=2)
    metas = []
    with pytest.raises(StopIteration):
        while True:
            metas.append(join.next_with_meta()[1])
    assert [m["indices"][0] for m in metas if m["sources"] == [0]] == [0, 1, 2]
    assert join.source_at(len(metas)) == 0
    jumped = Join([(Range(3), 0.5), (Range(100), 0.5)], seed=2)
    jumped.skip(50)
    with pytest.raises(StopIteration):
        next(jumped)


def test_join_as_first_stage_of_conveyer() -> None:
    """A Join can be the source of a Conveyer and the Conveyer's state includes the Join's."""
    conveyer = Conveyer([_mix([0.5, 0.5])])
    next(conveyer)
    assert conveyer.state()["stream"]["position"] == 1


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        ([], "at least one"),
        ([(Range(3), 0.0005)], "weight 0 must be a finite number >= 0.001"),
        ([(Range(3), -1)], "Found: -1"),
        ([(Range(3), "a")], "weight 0 must be a number"),
        ([Range(3)], "must be a (pipeline, weight) pair"),
    ],
    ids=["empty", "too-small", "negative", "not-number", "not-pair"],
)
def test_bad_join_arguments(pairs: list[object], message: str) -> None:
    """Invalid sources or weights raise ConfigError quoting what was wrong."""
    with pytest.raises(ConfigError) as info:
        Join(pairs)  # type: ignore[arg-type]
    assert message in str(info.value)


def test_same_source_twice_is_refused() -> None:
    """One pipeline object cannot feed two slots of a Join (it would advance twice)."""
    r = Range(3, repeating=True)
    with pytest.raises(ConfigError, match="distinct"):
        Join([(r, 1), (r, 1)])
