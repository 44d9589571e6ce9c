"""Partition: disjoint, complete, balanced shares; rank-independent state; elastic resume to other world sizes."""

from __future__ import annotations

import pytest

from tensorcom.errors import ConfigError
from tensorcom.pipeline import Collate, Conveyer, Partition, Permutation, Range


def _rank(n: int, rank: int, ranks: int, seed: int = 1, **kw: bool) -> Conveyer:
    return Conveyer([Permutation(n, seed=seed), Partition(rank, ranks, **kw)])


@pytest.mark.parametrize(("n", "ranks"), [(20, 4), (23, 4), (5, 8), (1, 3), (97, 6)], ids=lambda v: str(v))
def test_shares_are_disjoint_complete_balanced(n: int, ranks: int) -> None:
    """Every index goes to exactly one rank, and share sizes differ by at most one."""
    shares = [list(_rank(n, r, ranks)) for r in range(ranks)]
    flat = [i for share in shares for i in share]
    assert sorted(flat) == list(range(n))
    sizes = [len(s) for s in shares]
    assert max(sizes) - min(sizes) <= 1


def test_drop_last_keeps_ranks_in_lockstep() -> None:
    """With drop_last every rank gets n // ranks items and the shares stay disjoint."""
    shares = [list(_rank(23, r, 4, drop_last=True)) for r in range(4)]
    assert [len(s) for s in shares] == [5, 5, 5, 5]
    flat = [i for s in shares for i in s]
    assert len(set(flat)) == 20


def test_repeating_source_rounds_cross_epochs() -> None:
    """On a repeating source, each epoch is covered exactly once across ranks even when n % ranks != 0."""
    ranks, n = 3, 7
    streams = [Conveyer([Permutation(n, seed=2, repeating=True), Partition(r, ranks)]) for r in range(ranks)]
    seen: dict[int, list[int]] = {}
    for _ in range(14):
        for stream in streams:
            _, meta = stream.next_with_meta()
            seen.setdefault(meta["epoch"], []).extend(meta["indices"])
    for epoch in range(5):
        assert sorted(seen[epoch]) == list(range(n))


def test_state_is_identical_on_every_rank() -> None:
    """After the same number of steps every rank reports the same state, with no rank or world size in it."""
    streams = [_rank(40, r, 4) for r in range(4)]
    for stream in streams:
        for _ in range(3):
            next(stream)
    states = [s.state() for s in streams]
    assert all(s == states[0] for s in states)
    assert states[0]["stream"] == {"seed": 1, "epoch": 0, "position": 12}


@pytest.mark.parametrize("new_ranks", [3, 6, 1, 4], ids=["4-to-3", "4-to-6", "4-to-1", "4-to-4"])
@pytest.mark.parametrize("n", [50, 53], ids=["n=50", "n=53"])
def test_elastic_resume_covers_epoch_exactly_once(n: int, new_ranks: int) -> None:
    """4 ranks consume part of an epoch; resuming their common state on another world size covers the rest once."""
    old = [_rank(n, r, 4, seed=5) for r in range(4)]
    before = [next(s) for _ in range(7) for s in old]
    state = old[0].state()
    assert all(s.state() == state for s in old)
    after: list[int] = []
    for r in range(new_ranks):
        resumed = _rank(n, r, new_ranks, seed=5)
        resumed.load_state(state)
        after.extend(resumed)
    assert sorted(before + after) == list(range(n))


def test_elastic_resume_of_batches() -> None:
    """Batch-level partitioning (Collate then Partition) also resumes 4 -> 3 with every batch served once."""

    def make(rank: int, ranks: int) -> Conveyer:
        return Conveyer([Permutation(60, seed=2), Collate(4), Partition(rank, ranks)])

    old = [make(r, 4) for r in range(4)]
    before = [tuple(next(s).tolist()) for _ in range(2) for s in old]
    state = old[0].state()
    after: list[tuple[int, ...]] = []
    for r in range(3):
        p = make(r, 3)
        p.load_state(state)
        after.extend(tuple(b.tolist()) for b in p)
    assert sorted(i for b in before + after for i in b) == list(range(60))


def test_skip_is_arithmetic_on_a_partition() -> None:
    """skip(k) moves the global cursor by k * n_ranks without reading the source."""
    p = Conveyer([Range(10**12), Partition(2, 8)])
    p.skip(10**9)
    assert p.state()["stream"]["position"] == 8 * 10**9
    assert next(p) == 8 * 10**9 + 2


@pytest.mark.parametrize(
    ("args", "message"),
    [((0, 0), "n_ranks must be an int > 0. Found: 0"), ((4, 4), "rank must be an int in [0, 4). Found: 4")],
    ids=["zero-ranks", "rank-too-large"],
)
def test_bad_partition_arguments(args: tuple[int, int], message: str) -> None:
    """Invalid rank or world size raises ConfigError quoting the value."""
    with pytest.raises(ConfigError) as info:
        Partition(*args)
    assert message in str(info.value)


def test_drop_last_needs_known_length() -> None:
    """drop_last over a source of unknown length is refused with ConfigError."""
    p = Conveyer([iter(range(10)), Partition(0, 2, drop_last=True)])
    with pytest.raises(ConfigError, match="length is known"):
        next(p)
