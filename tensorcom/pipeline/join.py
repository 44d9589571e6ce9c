"""``Join``: a seeded, weighted mix of pipelines, with random access to which source serves any position.

Weights are quantised to units of 0.001 (each weight must be >= 0.001; they need not sum to 1) and divided by
their greatest common divisor, giving ``units[s]`` per source and a block of ``B = sum(units)`` positions. One
seeded permutation of the block (``units[s]`` slots for source ``s``) is repeated block after block, so any window of
``B`` consecutive positions holds exactly ``units[s]`` items of source ``s``, and the source of position ``p`` and
how many items each source has served before ``p`` are O(log B) lookups. That makes ``skip(k)`` exact without
reading anything: each source is skipped by its own count.

Each source keeps its own cursor and its own epochs (use ``repeating=True`` sources for an endless mix). When a
finite source runs out at a position that needs it, the Join ends there (StopIteration), like ``zip``. The state is
Join's own position plus every source's state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from functools import reduce
from typing import Any

import numpy as np

from tensorcom.errors import ConfigError, StateError
from tensorcom.pipeline._base import Pipeline, Record
from tensorcom.pipeline.rng import derive_words, validate_seed
from tensorcom.pipeline.sources import as_stage
from tensorcom.pipeline.state import require_int, require_keys

__all__ = ["Join"]

_UNIT = 0.001


def _units(weights: Sequence[Any]) -> list[int]:
    units = []
    for i, weight in enumerate(weights):
        if isinstance(weight, bool) or not isinstance(weight, int | float | np.integer | np.floating):
            raise ConfigError(f"weight {i} must be a number >= {_UNIT}. Found: {weight!r}")
        if not math.isfinite(weight) or weight < _UNIT * (1 - 1e-9):
            raise ConfigError(f"weight {i} must be a finite number >= {_UNIT}. Found: {weight!r}")
        units.append(max(1, round(float(weight) / _UNIT)))
    divisor = reduce(math.gcd, units)
    return [u // divisor for u in units]


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
        pattern = np.repeat(np.arange(len(self._units)), self._units)
        key = derive_words(b"tc-join", [self._seed], 2)
        rng = np.random.Generator(np.random.Philox(key=key[0] | (key[1] << 64)))
        self._pattern = rng.permutation(pattern)
        self._slots = [np.flatnonzero(self._pattern == s) for s in range(len(self._units))]
        self._salts = [derive_words(b"tc-join-salt", [self._seed, s], 1)[0] for s in range(len(self._units))]
        self._position = 0
        self._exhausted = False

    @property
    def units(self) -> list[int]:
        """Quantised, reduced weights: source ``s`` serves ``units[s]`` of every ``sum(units)`` positions."""
        return list(self._units)

    @property
    def position(self) -> int:
        return self._position

    def source_at(self, position: int) -> int:
        """Number of the source that serves ``position``."""
        return int(self._pattern[position % self._block])

    def served_before(self, source: int, position: int) -> int:
        """How many items ``source`` serves at positions ``[0, position)``."""
        whole, rest = divmod(position, self._block)
        return whole * self._units[source] + int(np.searchsorted(self._slots[source], rest))

    def _pull(self) -> Record:
        if self._exhausted:
            raise StopIteration
        s = self.source_at(self._position)
        try:
            record = self._sources[s]._pull()
        except StopIteration:
            raise
        except Exception:
            self._position += 1
            raise
        self._position += 1
        salt = derive_words(b"tc-join-item", [self._salts[s], record.salt], 1)[0]
        return Record(record.value, record.epoch, record.indices, salt, (s,) * len(record.indices))

    def _skip(self, n: int) -> None:
        if n <= 0 or self._exhausted:
            return
        start, end = self._position, self._position + n
        for s, source in enumerate(self._sources):
            count = self.served_before(s, end) - self.served_before(s, start)
            remaining = source._remaining()
            if remaining is not None and count > remaining:
                self._exhausted = True
            source._skip(count)
        self._position = end

    def _remaining(self) -> float | None:
        if self._exhausted:
            return 0.0
        return math.inf if all(s._remaining() == math.inf for s in self._sources) else None

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
        self._exhausted = False

    def _config(self) -> dict[str, Any]:
        return {
            "kind": "Join",
            "seed": self._seed,
            "units": self._units,
            "sources": [s._config() for s in self._sources],
        }

    def _close(self) -> None:
        for source in self._sources:
            source._close()
