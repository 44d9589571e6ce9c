"""Join: weighted proportions, per-block quotas, random access to the source rule at corpus scale, skip and resume
mid-mix, sources that run out, and Partition inside or after a Join on changing world sizes."""

from __future__ import annotations

import collections
import tracemalloc
from collections.abc import Iterator

import numpy as np
import pytest
from pipeline_harness import check_resume_everywhere, collect

from tensorcom.errors import ConfigError, StateError
from tensorcom.pipeline import Conveyer, Join, Partition, Permutation, Range
from tensorcom.pipeline.state import fingerprint_of


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


def test_finite_source_drops_out_and_the_others_go_on() -> None:
    """When a finite source runs out its slots are passed over; the Join ends when every source has run out."""
    join = Join([(Range(3), 0.5), (Range(100), 0.5)], seed=2)
    metas = [meta for _, meta in collect(join, 1000)]
    assert [m["indices"][0] for m in metas if m["sources"] == [0]] == [0, 1, 2]
    assert [m["indices"][0] for m in metas if m["sources"] == [1]] == list(range(100))
    first_slots = [p for p in range(300) if join.source_at(p) == 0][:3]
    assert [m["sources"][0] for m in metas[: first_slots[-1] + 1]] == [
        join.source_at(p) for p in range(first_slots[-1] + 1)
    ]
    with pytest.raises(StopIteration):
        next(join)
    jumped = Join([(Range(3), 0.5), (Range(100), 0.5)], seed=2)
    jumped.skip(50)
    assert jumped.next_with_meta()[1] == {**metas[50], "step": 50}
    jumped.skip(52)
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


# -- corpus scale: the arrangement is computed, never stored ---------------------------------------------------------

_LARGE = [7919, 5003, 1, 977]  # a block of 13,900 positions: a split tree of leaves, not one table


def _large(seed: int = 5, repeating: bool = True, sizes: list[int] | None = None) -> Join:
    sizes = sizes or _LARGE
    return Join([(Range(n, repeating=repeating), n) for n in sizes], seed=seed)


def _sources(join: Join, start: int, stop: int) -> np.ndarray:
    return np.array([join.source_at(p) for p in range(start, stop)])


def test_large_block_windows_hold_exact_quotas() -> None:
    """Weights set to sizes: every window of one block's length, at any offset, holds exactly each source's size."""
    join = _large()
    block = sum(join.units)
    assert join.units == _LARGE and block > 4096
    sources = _sources(join, 0, 2 * block)
    for s, quota in enumerate(_LARGE):
        running = np.concatenate([[0], np.cumsum(sources == s)])
        windows = running[block : 2 * block + 1] - running[: block + 1]
        assert set(windows.tolist()) == {quota}


def test_large_block_random_access_agrees_with_reading_in_order() -> None:
    """source_at, served_before and slot_of give the same answers in any order of calls (no hidden order state)."""
    join = _large(seed=9)
    block = sum(join.units)
    in_order = _sources(join, 0, block + 50)
    shuffled = np.random.default_rng(0).permutation(block + 50)[:600]
    fresh = _large(seed=9)
    assert [fresh.source_at(int(p)) for p in shuffled] == in_order[shuffled].tolist()
    for s in range(len(_LARGE)):
        running = np.concatenate([[0], np.cumsum(in_order == s)])
        probes = [0, 1, 4095, 4096, 4097, block - 1, block, block + 1, *shuffled[:40].tolist()]
        assert [fresh.served_before(s, int(p)) for p in probes] == [int(running[p]) for p in probes]
        slots = np.flatnonzero(in_order == s)
        picks = sorted({0, len(slots) // 2, len(slots) - 1})
        assert [fresh.slot_of(s, k) for k in picks] == slots[picks].tolist()


def test_large_block_is_seeded() -> None:
    """The same seed gives the same arrangement; another seed another one."""
    assert _sources(_large(seed=1), 6000, 6100).tolist() == _sources(_large(seed=1), 6000, 6100).tolist()
    assert _sources(_large(seed=1), 6000, 6100).tolist() != _sources(_large(seed=2), 6000, 6100).tolist()


def test_large_block_skip_matches_walking() -> None:
    """skip(k) over several leaves leaves Join and every source exactly where k calls of next leave them."""
    walked, jumped = _large(), _large()
    for _ in range(9000):
        next(walked)
    jumped.skip(8990)
    jumped.skip(10)
    assert jumped.state() == walked.state()
    assert [jumped.next_with_meta() for _ in range(30)] == [walked.next_with_meta() for _ in range(30)]


def test_corpus_scale_join_holds_no_per_sample_table() -> None:
    """Weights equal to sizes of 10**8 + 3*10**7 + 10**6 samples: building, reading and skipping allocate < 2 MB."""
    sizes = [100_000_007, 30_000_001, 1_000_003]
    tracemalloc.start()
    try:
        join = Join([(Permutation(n, seed=i), n) for i, n in enumerate(sizes)], seed=4)
        items = [next(join) for _ in range(5000)]
        join.skip(60_000_000)
        after_skip = next(join)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000
    assert len(items) == 5000 and after_skip is not None
    assert join.served_before(0, sum(join.units)) == sizes[0]
    assert [join.served_before(s, sum(join.units)) for s in range(3)] == sizes


def test_integer_weights_are_exact() -> None:
    """Integer weights (dataset sizes) are used exactly, however large."""
    join = Join([(Range(3, repeating=True), 10**13 + 1), (Range(3, repeating=True), 10**13)])
    assert join.units == [10**13 + 1, 10**13]
    assert Join([(Range(3), 1400), (Range(3), 500), (Range(3), 100)]).units == [14, 5, 1]


def test_large_block_resume_and_drain_at_every_step() -> None:
    """Big weights over small finite sources (they run out at once): resume before every item, skip anywhere."""

    def make() -> Join:
        return Join([(Range(20), 7919), (Permutation(15, seed=3), 5003), (Range(4), 977)], seed=6)

    items = check_resume_everywhere(make, n_items=60, skip_checks=12)
    assert len(items) == 39
    assert sorted((m["sources"][0], m["indices"][0]) for _, m in items) == sorted(
        [(0, i) for i in range(20)] + [(1, i) for i in range(15)] + [(2, i) for i in range(4)]
    )


class Letters:
    """A re-iterable of unknown length: Join finds its end by reading it."""

    def __iter__(self) -> Iterator[str]:
        return iter("abcdefg")


def test_source_of_unknown_length_drains_and_resumes() -> None:
    """A source whose length is unknown is read to its end, skipped by reading, and resumed exactly."""

    def make() -> Join:
        return Join([(Letters(), 0.5), (Range(9), 0.5)], seed=3)

    items = check_resume_everywhere(make, n_items=40)
    assert sorted(str(v) for v, _ in items) == sorted([*"abcdefg", *map(str, range(9))])


def test_fingerprint_of_a_table_based_state_is_refused() -> None:
    """Small blocks keep the earlier fingerprint; a state saved by the earlier table-based Join for a large block is
    refused with a StateError naming both fingerprints."""
    small = _mix([0.7, 0.3])
    old_small = {k: v for k, v in small._config().items() if k != "schedule"}
    assert "schedule" not in small._config() and fingerprint_of(old_small) == small.fingerprint
    large = _large()
    state = large.state()
    old_config = {k: v for k, v in large._config().items() if k != "schedule"}
    state["fingerprint"] = fingerprint_of(old_config)
    with pytest.raises(StateError, match="fingerprint"):
        _large().load_state(state)


# -- Join and Partition: nothing lost, on any world size -------------------------------------------------------------


def _ranked(sizes: tuple[int, ...], rank: int, world: int, drop_last: bool = False) -> Join:
    return Join(
        [
            (Conveyer([Permutation(n, seed=i), Partition(rank, world, drop_last=drop_last)]), n)
            for i, n in enumerate(sizes)
        ],
        seed=5,
    )


def _drain(join: Join) -> list[tuple[int, int]]:
    return [(m["sources"][0], m["indices"][0]) for _, m in collect(join, 10**6)]


@pytest.mark.parametrize(
    "sizes", [(31, 59), (60, 30), (5000, 3001, 17)], ids=["31+59", "60+30", "5000+3001+17"]
)
@pytest.mark.parametrize(
    ("old", "new"), [(2, 2), (2, 3), (3, 2), (4, 1), (1, 3), (3, 5)], ids=lambda w: str(w)
)
def test_partition_inside_join_loses_nothing_across_world_sizes(
    sizes: tuple[int, ...], old: int, new: int
) -> None:
    """Ranks split each source (Partition inside the Join), save their common state mid-epoch, resume on another
    world size and drain: every sample of every source is served exactly once."""
    everything = sorted((s, i) for s, n in enumerate(sizes) for i in range(n))
    steps = sum(sizes) // (3 * old)
    ranks = [_ranked(sizes, r, old) for r in range(old)]
    before = [
        (m["sources"][0], m["indices"][0])
        for _ in range(steps)
        for j in ranks
        for m in [j.next_with_meta()[1]]
    ]
    state = ranks[0].state()
    assert all(j.state() == state for j in ranks)
    after = []
    for r in range(new):
        resumed = _ranked(sizes, r, new)
        resumed.load_state(state)
        after.extend(_drain(resumed))
    assert sorted(before + after) == everything


def test_partition_inside_join_with_drop_last_keeps_ranks_in_step() -> None:
    """With Partition(drop_last=True) in every source, all ranks stop together and report equal states to the end."""
    sizes, world = (31, 59, 8), 3
    ranks = [_ranked(sizes, r, world, drop_last=True) for r in range(world)]
    counts = {len(_drain(_ranked(sizes, r, world, drop_last=True))) for r in range(world)}
    assert counts == {sum(n // world for n in sizes)}
    for _ in range(counts.pop()):
        for j in ranks:
            next(j)
        assert all(j.state() == ranks[0].state() for j in ranks)


@pytest.mark.parametrize(("old", "new"), [(2, 3), (4, 1), (3, 2)], ids=["2-to-3", "4-to-1", "3-to-2"])
def test_partition_after_join_resumes_on_another_world_size(old: int, new: int) -> None:
    """Join first, then Partition: a mid-epoch state resumed on another world size serves every sample once."""
    sizes = (31, 59)

    def make(rank: int, world: int) -> Conveyer:
        return Conveyer(
            [Join([(Permutation(n, seed=i), n) for i, n in enumerate(sizes)], seed=2), Partition(rank, world)]
        )

    ranks = [make(r, old) for r in range(old)]
    before = [
        (m["sources"][0], m["indices"][0]) for _ in range(7) for c in ranks for m in [c.next_with_meta()[1]]
    ]
    state = ranks[0].state()
    assert all(c.state() == state for c in ranks)
    after = []
    for r in range(new):
        resumed = make(r, new)
        resumed.load_state(state)
        after.extend((m["sources"][0], m["indices"][0]) for _, m in collect(resumed, 1000))
    assert sorted(before + after) == sorted((s, i) for s, n in enumerate(sizes) for i in range(n))


def test_partition_inside_join_resumes_at_every_step() -> None:
    """The checkpoint-at-every-step harness on one rank of a Join of partitioned finite sources, into the end."""
    items = check_resume_everywhere(lambda: _ranked((31, 59, 5), 1, 3), n_items=40, skip_checks=10)
    assert len(items) == 10 + 20 + 2
