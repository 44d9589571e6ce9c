"""``Partition``: one rank's share of a stream, chosen by arithmetic so restoring on another world size is exact.

Rank ``r`` of ``n_ranks`` takes the global positions ``g + r, g + r + n_ranks, g + r + 2 n_ranks, ...`` where ``g``
is where the stream stood when the ranks started (0, or the position in a loaded state). Between two items the
upstream cursor rests at a round boundary ``g + k * n_ranks``, so the state of a synchronous job (every rank has
taken ``k`` items) is the same on every rank and holds neither the rank nor the world size. Restoring it into
``Partition(r', n')`` continues at that global position; across the old and the new ranks every sample of the epoch
is seen exactly once.

The end of a finite stream: with ``drop_last=False`` (default) the shares are balanced and complete: rank ``r`` gets
the positions ``< N`` of its residue class, so some ranks may get one item fewer than others. With
``drop_last=True`` every rank stops when any rank would run short (the last ``N mod n_ranks`` positions are not
served), which keeps synchronous jobs in lockstep. A repeating source is one endless stream: rounds run across epoch
boundaries, so shares stay balanced, complete per epoch, and in lockstep with no samples dropped.

Put ``Partition`` right after the source (or after ``Collate`` to deal out whole batches): it skips the other ranks'
positions with ``skip``, which is free on random-access stages and costly after a prefetching map.
"""

from __future__ import annotations

import math
from typing import Any

from tensorcom.errors import ConfigError
from tensorcom.pipeline._base import Record, Transform

__all__ = ["Partition"]


class Partition(Transform):
    """Deal a stream out to ``n_ranks`` ranks; this instance yields rank ``rank``'s share."""

    def __init__(self, rank: int, n_ranks: int, drop_last: bool = False) -> None:
        if isinstance(n_ranks, bool) or not isinstance(n_ranks, int) or n_ranks <= 0:
            raise ConfigError(f"n_ranks must be an int > 0. Found: {n_ranks!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < n_ranks:
            raise ConfigError(f"rank must be an int in [0, {n_ranks}). Found: {rank!r}")
        self.rank = rank
        self.n_ranks = n_ranks
        self.drop_last = bool(drop_last)

    def _pull(self) -> Record:
        upstream = self.upstream
        if self.drop_last:
            remaining = upstream._remaining()
            if remaining is None:
                raise ConfigError(
                    "Partition(drop_last=True) needs an upstream whose length is known (a Range, ...)"
                )
            if remaining < self.n_ranks:
                raise StopIteration
        upstream._skip(self.rank)
        try:
            record = upstream._pull()
        except StopIteration:
            raise
        except Exception:
            upstream._skip(self.n_ranks - 1 - self.rank)
            raise
        upstream._skip(self.n_ranks - 1 - self.rank)
        return record

    def _skip(self, n: int) -> None:
        self.upstream._skip(n * self.n_ranks)

    def _remaining(self) -> float | None:
        remaining = self.upstream._remaining()
        if remaining is None or math.isinf(remaining):
            return remaining
        if self.drop_last:
            return float(int(remaining) // self.n_ranks)
        return float(max(0, -(-(int(remaining) - self.rank) // self.n_ranks)))

    def _own_config(self) -> dict[str, Any]:
        return {"kind": "Partition", "drop_last": self.drop_last}
