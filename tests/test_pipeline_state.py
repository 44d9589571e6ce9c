"""Every stage and combination through the checkpoint-at-every-step harness; state format and fingerprints."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import msgpack
import pytest
from pipeline_harness import check_resume_everywhere, make_sample, noisy, square

from tensorcom.errors import StateError
from tensorcom.pipeline import (
    Collate,
    Conveyer,
    DistributedBatchedMap,
    Join,
    Map,
    Partition,
    Permutation,
    Pipeline,
    Range,
    collate,
)
from tensorcom.pipeline.builder import PipelineBuilder


class Letters:
    """A re-iterable that is not a sequence: resumed by replay."""

    def __iter__(self) -> Iterator[str]:
        return iter("abcdefghijklmnopq")


def _join() -> Join:
    return Join([(Permutation(5, seed=1, repeating=True), 0.6), (Range(3, repeating=True), 0.4)], seed=9)


IN_PROCESS: dict[str, Callable[[], Pipeline]] = {
    "range": lambda: Range(17),
    "range-repeating": lambda: Range(5, repeating=True),
    "permutation": lambda: Permutation(13, seed=3),
    "permutation-repeating": lambda: Permutation(6, seed=3, repeating=True),
    "permutation-epoch-kwarg": lambda: Permutation(7, seed=3, repeating=True, epoch=4),
    "sequence": lambda: Conveyer([[f"s{i}" for i in range(15)], Map(str.upper)]),
    "iterable-replay": lambda: Conveyer([Letters()]),
    "partition": lambda: Conveyer([Permutation(23, seed=1), Partition(1, 3)]),
    "partition-drop-last": lambda: Conveyer([Permutation(23, seed=1), Partition(2, 3, drop_last=True)]),
    "partition-repeating": lambda: Conveyer([Permutation(7, seed=1, repeating=True), Partition(0, 3)]),
    "map-rng": lambda: Conveyer([Permutation(15, seed=2), Map(noisy)]),
    "collate": lambda: Conveyer([Permutation(22, seed=5), Map(make_sample), Collate(4)]),
    "collate-no-partial": lambda: Conveyer([Range(22), Map(square), Collate(4, return_partial_batch=False)]),
    "collate-then-partition": lambda: Conveyer([Permutation(40, seed=6), Collate(3), Partition(1, 2)]),
    "join": _join,
    "join-finite": lambda: Join([(Range(6), 0.5), (Permutation(9, seed=2), 0.5)], seed=1),
    "join-in-conveyer": lambda: Conveyer([_join(), Map(noisy), Collate(3)]),
    "join-of-conveyers": lambda: Join(
        [
            (Conveyer([Permutation(8, seed=1, repeating=True), Partition(0, 2)]), 1.0),
            (Conveyer([Range(4, repeating=True), Map(square)]), 2.5),
        ],
        seed=4,
    ),
    "nested-conveyer": lambda: Conveyer([Conveyer([Range(10), Map(square)]), Collate(3)]),
    "builder": lambda: (
        PipelineBuilder().add_source(range(30)).pipe(square, concurrency=3).aggregate(4).pipe(collate).build()
    ),
    "builder-pipeline-source": lambda: (
        PipelineBuilder().add_source(Conveyer([Permutation(12, seed=7), Map(noisy)])).aggregate(5).build()
    ),
}


@pytest.mark.parametrize("make", list(IN_PROCESS.values()), ids=list(IN_PROCESS))
def test_resume_at_every_step_in_process(make: Callable[[], Pipeline]) -> None:
    """Restoring the state saved before any item reproduces the rest of the stream, metadata and final state."""
    items = check_resume_everywhere(make, n_items=24)
    assert items


def _dbm_pipeline(map_stage: Callable[[], object]) -> Conveyer:
    return Conveyer([Permutation(20, seed=4), Partition(0, 2), map_stage(), Collate(3)])


WORKERS: dict[str, tuple[Callable[[], Pipeline], Callable[[], Pipeline]]] = {
    "dbm-1-worker-vs-2-workers": (
        lambda: _dbm_pipeline(lambda: DistributedBatchedMap(make_sample, n_workers=1)),
        lambda: _dbm_pipeline(lambda: DistributedBatchedMap(make_sample, n_workers=2, buffer_size=5)),
    ),
    "dbm-vs-in-process-map": (
        lambda: _dbm_pipeline(lambda: DistributedBatchedMap(make_sample, n_workers=2, buffer_size=3)),
        lambda: _dbm_pipeline(lambda: Map(make_sample)),
    ),
    "join-with-dbm-source": (
        lambda: Join(
            [
                (Conveyer([Range(6, repeating=True), DistributedBatchedMap(noisy, n_workers=2)]), 0.3),
                (Permutation(4, seed=8, repeating=True), 0.7),
            ],
            seed=2,
        ),
        lambda: Join(
            [
                (
                    Conveyer(
                        [Range(6, repeating=True), DistributedBatchedMap(noisy, n_workers=1, buffer_size=1)]
                    ),
                    0.3,
                ),
                (Permutation(4, seed=8, repeating=True), 0.7),
            ],
            seed=2,
        ),
    ),
}


@pytest.mark.parametrize("pair", list(WORKERS.values()), ids=list(WORKERS))
def test_resume_at_every_step_with_workers(
    pair: tuple[Callable[[], Pipeline], Callable[[], Pipeline]],
) -> None:
    """States saved with one n_workers/buffer_size restore exactly into another (or into an in-process Map)."""
    make, make_restored = pair
    check_resume_everywhere(make, n_items=8, make_restored=make_restored, fresh=False)


def test_state_is_small_plain_data() -> None:
    """A state is JSON- and msgpack-serialisable and its size does not grow with the position in the stream."""
    pipeline = Conveyer([_join(), Map(noisy), Collate(3)])
    early = pipeline.state()
    pipeline.skip(10**6)
    late = pipeline.state()
    for state in (early, late):
        assert json.loads(json.dumps(state)) == state
        assert msgpack.unpackb(msgpack.packb(state)) == state
    assert len(json.dumps(late)) < 400
    assert late["stream"]["position"] == 3 * 10**6


def test_mismatched_fingerprint_is_refused() -> None:
    """Loading a state saved by a differently configured pipeline raises StateError naming both digests."""
    saved = Conveyer([Permutation(100, seed=1), Collate(8)]).state()
    other = Conveyer([Permutation(100, seed=2), Collate(8)])
    with pytest.raises(StateError) as info:
        other.load_state(saved)
    assert saved["fingerprint"] in str(info.value) and other.fingerprint in str(info.value)


@pytest.mark.parametrize(
    "state",
    [{"format": 1}, {"format": 9, "fingerprint": "x", "step": 0, "stream": {}}, "nonsense"],
    ids=["missing-keys", "bad-format", "not-a-dict"],
)
def test_malformed_state_is_refused(state: object) -> None:
    """A state that is not the documented envelope raises StateError, not a KeyError or TypeError."""
    with pytest.raises(StateError):
        Range(5).load_state(state)  # type: ignore[arg-type]


def test_out_of_range_stream_state_is_refused() -> None:
    """A stream position beyond the epoch is refused with StateError."""
    pipeline = Permutation(10, seed=1)
    state = pipeline.state()
    state["stream"]["position"] = 11
    with pytest.raises(StateError, match="position"):
        pipeline.load_state(state)


def test_fingerprint_ignores_workers_buffers_and_ranks() -> None:
    """n_workers, buffer_size, rank and n_ranks do not change the fingerprint; seed, batch size and n do."""

    def make(
        seed: int = 1, n: int = 100, rank: int = 0, ranks: int = 2, workers: int = 1, bs: int = 4
    ) -> Conveyer:
        return Conveyer(
            [
                Permutation(n, seed=seed),
                Partition(rank, ranks),
                DistributedBatchedMap(square, n_workers=workers, buffer_size=workers + 3),
                Collate(bs),
            ]
        )

    base = make().fingerprint
    assert make(rank=1, ranks=5).fingerprint == base
    assert make(workers=3).fingerprint == base
    assert make(seed=2).fingerprint != base
    assert make(n=101).fingerprint != base
    assert make(bs=5).fingerprint != base
    assert len(base) == 32 and int(base, 16) >= 0


def test_join_fingerprint_depends_on_weights_and_seed() -> None:
    """Join's fingerprint changes with the weights and the seed, and not with equivalent weights."""

    def make(w1: float, w2: float, seed: int = 0) -> str:
        return Join([(Range(3, repeating=True), w1), (Range(4, repeating=True), w2)], seed=seed).fingerprint

    assert make(0.7, 0.3) == make(7, 3)
    assert make(0.7, 0.3) != make(0.6, 0.4)
    assert make(0.7, 0.3) != make(0.7, 0.3, seed=1)
