"""``Join``: a seeded, weighted mix of pipelines, with random access to which source serves any position.

Weights are quantised to units of 0.001 (each weight must be >= 0.001; they need not sum to 1) and divided by
their greatest common divisor, giving ``units[s]`` per source and a block of ``B = sum(units)`` positions. One
seeded arrangement of the block (``units[s]`` slots for source ``s``) is repeated block after block, so any window of
``B`` consecutive positions holds exactly ``units[s]`` slots of source ``s``.

The arrangement is never stored. With weights set to dataset sizes, ``B`` is the size of the corpus (10**8 and
more), so it is defined by a seeded split tree instead: the block is halved again and again, and how many of each
source's slots fall in the left half is drawn from ``(seed, node)`` (an approximately hypergeometric draw, exact
integer bookkeeping); a node of at most ``_LEAF`` positions is laid out as a seeded shuffle of its slots. The source
at a position, how many slots a source has before a position, and where a source's ``k``-th slot is are each one
walk down the tree, O(#sources * log B) time and O(#sources + _LEAF) memory whatever the sizes; the leaf last
used is cached, so reading in order costs O(1) a position. A block of at most ``_LEAF`` positions is a single leaf,
laid out as in earlier versions (the same seeded shuffle), so small weights keep their order and their fingerprint;
larger blocks carry ``"schedule"`` in the fingerprint, so a state saved by an earlier, table-based version is
refused.

Each source keeps its own cursor and its own epochs (use ``repeating=True`` sources for an endless mix). When a
finite source runs out, its slots are passed over and the others go on in their order; the Join ends when every
source has run out. So with weights set to the sizes of finite sources one epoch of the mix reads every sample of
every source once, also when each source is split by ``Partition(rank, world)`` inside the Join (the ranks' shares
of a source differ by one item, so a rank may run out of a source one slot before another) and across world-size
changes. ``skip(k)`` is exact without reading anything: it counts, per source, the slots in the window and, once a
source is short, finds where the ``k``-th item lands by bisection.

The state is Join's own position in the arrangement plus every source's state: O(#sources). It is the same on every
rank while the ranks are in step; in the last items of a finite epoch whose sources are partitioned with
``drop_last=False``, a rank that ran out of a source early is one slot ahead of the others (use
``Partition(..., drop_last=True)`` in the sources to keep every rank's state equal to the end).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import reduce
from typing import Any

import numpy as np

from tensorcom.errors import ConfigError, StateError
from tensorcom.pipeline._base import Pipeline, Record
from tensorcom.pipeline._feistel import mix64
from tensorcom.pipeline.rng import derive_words, validate_seed
from tensorcom.pipeline.sources import as_stage
from tensorcom.pipeline.state import require_int, require_keys

__all__ = ["Join"]

_UNIT = 0.001
_PER_ONE = 1000
_LEAF = 4096
_WALK = 48
_CACHED_LEAVES = 4
_HALF_WORD = 1 << 16
_SUM_OF_FOUR_MEAN = 2 * (_HALF_WORD - 1)
_SUM_OF_FOUR_STD = math.sqrt((_HALF_WORD * _HALF_WORD - 1) / 3)


def _units(weights: Sequence[Any]) -> list[int]:
    units = []
    for i, weight in enumerate(weights):
        if isinstance(weight, bool) or not isinstance(weight, int | float | np.integer | np.floating):
            raise ConfigError(f"weight {i} must be a number >= {_UNIT}. Found: {weight!r}")
        if not math.isfinite(weight) or weight < _UNIT * (1 - 1e-9):
            raise ConfigError(f"weight {i} must be a finite number >= {_UNIT}. Found: {weight!r}")
        if isinstance(weight, int | np.integer):
            units.append(int(weight) * _PER_ONE)  # exact for any size
        else:
            units.append(max(1, round(float(weight) / _UNIT)))
    divisor = reduce(math.gcd, units)
    return [u // divisor for u in units]


def _normal(word: int) -> float:
    """A roughly standard-normal number from a 64-bit word: the centred sum of its four 16-bit quarters.

    Only integer arithmetic, one division and ``+``/``*`` on doubles, so every platform computes the same value.
    """
    total = (word & 0xFFFF) + ((word >> 16) & 0xFFFF) + ((word >> 32) & 0xFFFF) + (word >> 48)
    return (total - _SUM_OF_FOUR_MEAN) / _SUM_OF_FOUR_STD


def _draw(marked: int, total: int, drawn: int, word: int) -> int:
    """How many of ``marked`` slots among ``total`` fall in ``drawn`` chosen ones: close to hypergeometric, always valid."""
    low, high = max(0, drawn - (total - marked)), min(marked, drawn)
    if low == high:
        return low
    mean = drawn * marked / total
    variance = drawn * marked * (total - marked) * (total - drawn) / (total * total * (total - 1))
    value = math.floor(mean + math.sqrt(variance) * _normal(word) + 0.5)
    return min(high, max(low, value))


@dataclass(frozen=True, slots=True)
class _Leaf:
    """A node of at most ``_LEAF`` positions, laid out: ``table[i]`` is the source at block position ``start + i``."""

    start: int
    table: np.ndarray
    before: tuple[int, ...]

    @property
    def stop(self) -> int:
        return self.start + len(self.table)


class _Schedule:
    """The seeded arrangement of one block, computed on demand (see the module docstring): O(#sources) memory."""

    def __init__(self, units: list[int], seed: int) -> None:
        self.units = units
        self.block = sum(units)
        self._seed = seed
        self._leaves: list[_Leaf] = []

    def _split(self, node: int, counts: list[tuple[int, int]], size: int, left: int) -> list[int]:
        """Slots of each source (``counts`` = ``[(source, slots), ...]``) in the first ``left`` of ``size``."""
        if len(counts) == 1:
            return [left]
        word = derive_words(b"tc-join-split", [self._seed, node], 1)[0]
        lefts, total, drawn = [], size, left
        for source, marked in counts:
            k = _draw(marked, total, drawn, mix64(source, word))
            lefts.append(k)
            total -= marked
            drawn -= k
        return lefts

    def _layout(self, node: int, start: int, counts: list[tuple[int, int]], before: list[int]) -> _Leaf:
        key = derive_words(b"tc-join", [self._seed] if node == 1 else [self._seed, node], 2)
        rng = np.random.Generator(np.random.Philox(key=key[0] | (key[1] << 64)))
        pattern = np.repeat(np.array([s for s, _ in counts]), [c for _, c in counts])
        leaf = _Leaf(start, rng.permutation(pattern), tuple(before))
        self._leaves = [leaf, *self._leaves[: _CACHED_LEAVES - 1]]
        return leaf

    def leaf(self, position: int) -> _Leaf:
        """The leaf holding block position ``position`` (``0 <= position < block``)."""
        for leaf in self._leaves:
            if leaf.start <= position < leaf.stop:
                return leaf
        node, start, size = 1, 0, self.block
        counts = list(enumerate(self.units))
        before = [0] * len(self.units)
        while size > _LEAF:
            left = size // 2
            lefts = self._split(node, counts, size, left)
            if position < start + left:
                counts = [(s, k) for (s, _), k in zip(counts, lefts, strict=True) if k]
                node, size = 2 * node, left
            else:
                for (s, _), k in zip(counts, lefts, strict=True):
                    before[s] += k
                counts = [(s, c - k) for (s, c), k in zip(counts, lefts, strict=True) if c - k]
                node, start, size = 2 * node + 1, start + left, size - left
        return self._layout(node, start, counts, before)

    def source(self, position: int) -> int:
        leaf = self.leaf(position)
        return int(leaf.table[position - leaf.start])

    def counts_before(self, position: int) -> list[int]:
        """Slots of every source at block positions ``[0, position)``, for ``0 <= position <= block``."""
        if position == 0:
            return [0] * len(self.units)
        if position == self.block:
            return list(self.units)
        leaf = self.leaf(position)
        inside = np.bincount(leaf.table[: position - leaf.start], minlength=len(self.units))
        return [b + int(c) for b, c in zip(leaf.before, inside, strict=True)]

    def count_before(self, source: int, position: int) -> int:
        if position == 0:
            return 0
        if position == self.block:
            return self.units[source]
        leaf = self.leaf(position)
        return leaf.before[source] + int(np.count_nonzero(leaf.table[: position - leaf.start] == source))

    def select(self, source: int, rank: int) -> int:
        """Block position of slot number ``rank`` (from 0) of ``source``; ``rank < units[source]``."""
        node, start, size = 1, 0, self.block
        counts = list(enumerate(self.units))
        before = [0] * len(self.units)
        while size > _LEAF:
            left = size // 2
            lefts = self._split(node, counts, size, left)
            mine = next(k for (s, _), k in zip(counts, lefts, strict=True) if s == source)
            if rank < mine:
                counts = [(s, k) for (s, _), k in zip(counts, lefts, strict=True) if k]
                node, size = 2 * node, left
            else:
                rank -= mine
                for (s, _), k in zip(counts, lefts, strict=True):
                    before[s] += k
                counts = [(s, c - k) for (s, c), k in zip(counts, lefts, strict=True) if c - k]
                node, start, size = 2 * node + 1, start + left, size - left
        leaf = next((f for f in self._leaves if f.start == start), None)
        if leaf is None:
            leaf = self._layout(node, start, counts, before)
        return start + int(np.flatnonzero(leaf.table == source)[rank])


class Join(Pipeline):
    """Mix ``[(pipeline, weight), ...]`` in proportion to the weights, deterministically for a ``seed``."""

    def __init__(self, sources: Iterable[tuple[Any, float]], seed: int = 0) -> None:
        pairs = list(sources)
        if not pairs:
            raise ConfigError("Join needs at least one (pipeline, weight) pair. Found: []")
        for i, pair in enumerate(pairs):
            if not isinstance(pair, tuple | list) or len(pair) != 2:
                raise ConfigError(f"source {i} must be a (pipeline, weight) pair. Found: {pair!r}")
        self._seed = validate_seed(seed)
        self._sources = [as_stage(src) for src, _ in pairs]
        if len({id(s) for s in self._sources}) != len(self._sources):
            raise ConfigError("Join sources must be distinct pipeline objects; the same one appears twice")
        self._units = _units([w for _, w in pairs])
        self._block = sum(self._units)
        self._schedule = _Schedule(self._units, self._seed)
        self._salts = [derive_words(b"tc-join-salt", [self._seed, s], 1)[0] for s in range(len(self._units))]
        self._position = 0
        self._spent: set[int] = set()

    @property
    def units(self) -> list[int]:
        """Quantised, reduced weights: source ``s`` serves ``units[s]`` of every ``sum(units)`` positions."""
        return list(self._units)

    @property
    def position(self) -> int:
        """Position in the arrangement of the next slot to consider (slots of sources that ran out are passed)."""
        return self._position

    def source_at(self, position: int) -> int:
        """Number of the source whose slot is ``position`` (whether or not that source still has items)."""
        return self._schedule.source(_check_position(position) % self._block)

    def served_before(self, source: int, position: int) -> int:
        """How many slots ``source`` has at positions ``[0, position)``."""
        whole, rest = divmod(_check_position(position), self._block)
        return whole * self._units[self._check_source(source)] + self._schedule.count_before(source, rest)

    def slot_of(self, source: int, count: int) -> int:
        """Position of slot number ``count`` (from 0) of ``source``: the inverse of :meth:`served_before`."""
        whole, rank = divmod(_check_position(count, "count"), self._units[self._check_source(source)])
        return whole * self._block + self._schedule.select(source, rank)

    def _check_source(self, source: int) -> int:
        if isinstance(source, bool) or not isinstance(source, int) or not 0 <= source < len(self._units):
            raise IndexError(f"source must be an int in [0, {len(self._units)}). Found: {source!r}")
        return source

    def _served_all(self, position: int) -> list[int]:
        whole, rest = divmod(position, self._block)
        return [whole * u + c for u, c in zip(self._units, self._schedule.counts_before(rest), strict=True)]

    def _window(self, start: int, stop: int) -> list[int]:
        """Slots of every source at positions ``[start, stop)``."""
        if stop - start <= _WALK:
            counts = [0] * len(self._units)
            for position in range(start, stop):
                counts[self._schedule.source(position % self._block)] += 1
            return counts
        return [b - a for a, b in zip(self._served_all(start), self._served_all(stop), strict=True)]

    def _next_live(self, position: int) -> int | None:
        """First position ``>= position`` whose source has not run out; None when every source has."""
        if not self._spent:
            return position
        if len(self._spent) == len(self._sources):
            return None
        for candidate in range(position, position + _WALK):
            if self._schedule.source(candidate % self._block) not in self._spent:
                return candidate
        return min(
            self.slot_of(s, self.served_before(s, position))
            for s in range(len(self._sources))
            if s not in self._spent
        )

    def _pull(self) -> Record:
        position = self._position
        while True:
            live = self._next_live(position)
            if live is None:
                raise StopIteration
            s = self._schedule.source(live % self._block)
            try:
                record = self._sources[s]._pull()
            except StopIteration:
                self._spent.add(s)
                position = live
                continue
            except Exception:
                self._position = live + 1
                raise
            self._position = live + 1
            salt = derive_words(b"tc-join-item", [self._salts[s], record.salt], 1)[0]
            return Record(record.value, record.epoch, record.indices, salt, (s,) * len(record.indices))

    def _skip(self, n: int) -> None:
        if n <= 0:
            return
        start = self._position
        if not self._spent:
            counts = self._window(start, start + n)
            if all(c == 0 or _fits(c, self._sources[s]._remaining()) for s, c in enumerate(counts)):
                for source, count in zip(self._sources, counts, strict=True):
                    if count:
                        source._skip(count)
                self._position = start + n
                return
        remaining = {s: source._remaining() for s, source in enumerate(self._sources) if s not in self._spent}
        known = {s: r for s, r in remaining.items() if r is not None}
        if len(known) < len(remaining):
            self._skip_by_walking(n)
        else:
            self._skip_by_bisection(n, {s: (math.inf if math.isinf(r) else int(r)) for s, r in known.items()})

    def _skip_by_bisection(self, n: int, left: dict[int, float]) -> None:
        """Skip ``n`` items when every live source's length is known: find where the ``n``-th item lands."""
        start = self._position
        base = self._served_all(start)

        def served(stop: int) -> float:
            counts = self._served_all(stop)
            return sum(min(counts[s] - base[s], quota) for s, quota in left.items())

        target = min(n, sum(left.values()))
        if target <= 0:
            for s in left:
                self._ask_spent(s)
            return
        low, high = start, start + int(target)
        while served(high) < target:
            low, high = high, start + 2 * (high - start)
        while high - low > 1:
            middle = (low + high) // 2
            if served(middle) < target:
                low = middle
            else:
                high = middle
        slots = self._served_all(high)
        for s, quota in left.items():
            window = slots[s] - base[s]
            count = int(min(window, quota))
            if count:
                self._sources[s]._skip(count)
            if (
                window > count
            ):  # the Join passed a slot of s after its last item: s was asked for one and is out
                self._ask_spent(s)
        self._position = high

    def _ask_spent(self, s: int) -> None:
        """Ask source ``s``, known to be out of items, for one more, as reading would (its state moves the same way)."""
        try:
            self._sources[s]._pull()
        except StopIteration:
            pass
        self._spent.add(s)

    def _skip_by_walking(self, n: int) -> None:
        """Skip ``n`` items one at a time (a live source of unknown length is read to find its end)."""
        position = self._position
        while n > 0:
            live = self._next_live(position)
            if live is None:
                return
            s = self._schedule.source(live % self._block)
            source, remaining = self._sources[s], self._sources[s]._remaining()
            if remaining is not None and remaining >= 1:
                source._skip(1)
            else:
                try:
                    source._pull()
                except StopIteration:
                    self._spent.add(s)
                    position = live
                    continue
                except Exception:  # a skipped item that fails is skipped all the same
                    pass
            position = self._position = live + 1
            n -= 1

    def _remaining(self) -> float | None:
        remaining = [s._remaining() for i, s in enumerate(self._sources) if i not in self._spent]
        if any(r is not None and math.isinf(r) for r in remaining):
            return math.inf
        if any(r is None for r in remaining):
            return None
        return float(sum(r for r in remaining if r is not None))

    def _get_state(self) -> dict[str, Any]:
        return {"position": self._position, "sources": [s._get_state() for s in self._sources]}

    def _set_state(self, state: Any) -> None:
        state = require_keys(state, ("position", "sources"), "Join")
        position = require_int(state, "position", "Join")
        states = state["sources"]
        if not isinstance(states, list | tuple) or len(states) != len(self._sources):
            raise StateError(f"Join: state must hold {len(self._sources)} source states. Found: {states!r}")
        for source, source_state in zip(self._sources, states, strict=True):
            source._set_state(source_state)
        self._position = position
        self._spent = set()

    def _config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "kind": "Join",
            "seed": self._seed,
            "units": self._units,
            "sources": [s._config() for s in self._sources],
        }
        if self._block > _LEAF:
            config["schedule"] = f"split-{_LEAF}"
        return config

    def _close(self) -> None:
        for source in self._sources:
            source._close()


def _fits(count: int, remaining: float | None) -> bool:
    return remaining is not None and count <= remaining


def _check_position(position: Any, what: str = "position") -> int:
    if isinstance(position, bool) or not isinstance(position, int | np.integer) or position < 0:
        raise IndexError(f"{what} must be an int >= 0. Found: {position!r}")
    return int(position)
