"""Collate: stacking of arrays, numbers, tuples, dicts and torch tensors; partial batches; metadata."""

from __future__ import annotations

import numpy as np
import pytest

from tensorcom.errors import ConfigError, PipelineError
from tensorcom.pipeline import Collate, Conveyer, Map, Range, collate


def test_stacks_nested_structures() -> None:
    """Dicts of tuples of arrays and numbers stack along a new first dimension, as numpy."""
    items = [{"x": (np.full((2,), i, np.int16), float(i)), "name": f"n{i}"} for i in range(3)]
    batch = collate(items)
    assert batch["x"][0].shape == (3, 2) and batch["x"][0].dtype == np.int16
    assert batch["x"][1].tolist() == [0.0, 1.0, 2.0]
    assert batch["name"] == ["n0", "n1", "n2"]


def test_stacks_torch_tensors() -> None:
    """Items that are torch tensors stack into a torch tensor."""
    torch = pytest.importorskip("torch")
    batch = collate([(torch.ones(2) * i, i) for i in range(4)])
    assert isinstance(batch[0], torch.Tensor) and batch[0].shape == (4, 2)
    assert isinstance(batch[1], np.ndarray)


@pytest.mark.parametrize(
    ("partial", "sizes"), [(True, [4, 4, 2]), (False, [4, 4])], ids=["partial-batch", "drop-partial"]
)
def test_partial_batches(partial: bool, sizes: list[int]) -> None:
    """The last short batch is returned only with return_partial_batch=True."""
    batches = list(Conveyer([Range(10), Collate(4, return_partial_batch=partial)]))
    assert [len(b) for b in batches] == sizes


def test_batch_meta_lists_all_indices() -> None:
    """A batch's metadata holds every sample index and the step number."""
    p = Conveyer([Range(10), Map(lambda i: i * 10), Collate(3)])
    p.skip(1)
    batch, meta = p.next_with_meta()
    assert batch.tolist() == [30, 40, 50]
    assert meta == {"epoch": 0, "indices": [3, 4, 5], "step": 1}
    assert p.last_indices == [3, 4, 5]


@pytest.mark.parametrize(
    "items",
    [[{"a": 1}, {"b": 2}], [(1, 2), (1,)], [np.zeros(2), np.zeros(3)]],
    ids=["dict-keys", "tuple-length", "array-shapes"],
)
def test_mismatched_items_raise(items: list[object]) -> None:
    """Items that cannot be stacked raise PipelineError describing the mismatch."""
    with pytest.raises(PipelineError, match="collate"):
        collate(items)


def test_bad_batch_size() -> None:
    """batch_size must be positive."""
    with pytest.raises(ConfigError, match="batch_size must be an int > 0. Found: 0"):
        Collate(0)
