"""Golden determinism: exact outputs for fixed seeds. A change here changes every user's data order."""

from __future__ import annotations

import numpy as np
from pipeline_harness import make_sample, noisy

from tensorcom.pipeline import Collate, Conveyer, Join, Map, Partition, Permutation, Range


def test_permutation_golden() -> None:
    """Permutation(1000, seed=42) starts with pinned indices in epochs 0 and 1."""
    assert [Permutation(1000, seed=42)[i] for i in range(10)] == [
        128,
        657,
        977,
        916,
        911,
        356,
        545,
        989,
        23,
        431,
    ]
    epoch1 = Permutation(1000, seed=42, epoch=1)
    assert [next(epoch1) for _ in range(10)] == [687, 970, 824, 800, 806, 149, 69, 198, 734, 19]


def test_permutation_golden_huge() -> None:
    """Permutation(10**9, seed=7) answers pinned indices at both ends with no table."""
    p = Permutation(10**9, seed=7)
    assert [p[0], p[1], p[2], p[10**9 - 1]] == [163291544, 962253695, 904262928, 43306795]


def test_join_golden() -> None:
    """Join of two ranges with weights 0.7/0.3 and seed 11 draws its sources in a pinned order."""
    join = Join([(Range(100, repeating=True), 0.7), (Range(100, repeating=True), 0.3)], seed=11)
    got = [join.next_with_meta() for _ in range(12)]
    assert [meta["sources"][0] for _, meta in got] == [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 1]
    assert [item for item, _ in got] == [0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 3, 4]


def test_full_pipeline_golden() -> None:
    """Permutation -> Partition -> Map(rng) -> Collate gives pinned indices and pinned per-sample random numbers."""
    pipeline = Conveyer([Permutation(50, seed=3), Partition(1, 2), Map(noisy), Collate(2)])
    expected_indices = [[43, 22], [2, 46], [27, 18]]
    expected_noise = [[0.26813149, 0.6936676], [0.10984633, 0.9686948], [0.46926879, 0.33822156]]
    for step, (indices, noise) in enumerate(zip(expected_indices, expected_noise, strict=True)):
        (values, draws), meta = pipeline.next_with_meta()
        assert meta == {"epoch": 0, "indices": indices, "step": step}
        assert values.tolist() == indices
        np.testing.assert_allclose(draws, noise, rtol=0, atol=1e-8)


def test_sample_rng_golden() -> None:
    """The generator a map function receives is pinned by (seed, epoch, sample index)."""
    batch = next(Conveyer([Permutation(50, seed=3), Map(make_sample), Collate(2)]))
    expected = [[-0.3924933969974518, -1.0005496740341187], [0.4677307903766632, -0.5909514427185059]]
    assert batch["jitter"].dtype == np.float32
    np.testing.assert_array_equal(batch["jitter"], np.array(expected, dtype=np.float32))
