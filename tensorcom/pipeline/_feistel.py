"""A keyed bijection of ``[0, n)``: a balanced Feistel network over the next even power of two, with cycle-walking.

The network permutes ``[0, 4**h)`` where ``4**h`` is the smallest even power of two ``>= n`` (so ``4**h < 4n``);
positions that land outside ``[0, n)`` are encrypted again until they fall inside, which keeps the map a bijection
of ``[0, n)`` and costs fewer than four rounds of the network on average. Memory is a handful of integers whatever
``n`` is, so ``n = 10**9`` starts instantly.
"""

from __future__ import annotations

from collections.abc import Sequence

from tensorcom.errors import ConfigError

__all__ = ["FeistelPermutation", "mix64"]

_M64 = (1 << 64) - 1
_ROUNDS = 6


def mix64(value: int, key: int) -> int:
    """A 64-bit word that looks random for each ``(value, key)``: a splitmix64-style finaliser (pure integer math)."""
    z = ((value * 0x9E3779B97F4A7C15) ^ key) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


class FeistelPermutation:
    """Bijection ``position -> index`` of ``[0, n)`` determined by ``keys`` (one 64-bit word per round)."""

    __slots__ = ("_half", "_keys", "_mask", "n")

    def __init__(self, n: int, keys: Sequence[int]) -> None:
        if n <= 0:
            raise ConfigError(f"n must be > 0. Found: {n}")
        if len(keys) < _ROUNDS:
            raise ConfigError(f"need at least {_ROUNDS} round keys. Found: {len(keys)}")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self._half = (bits + 1) // 2
        self._mask = (1 << self._half) - 1
        self._keys = tuple(int(k) & _M64 for k in keys[:_ROUNDS])

    def _encrypt(self, x: int) -> int:
        half, mask = self._half, self._mask
        left, right = x >> half, x & mask
        for key in self._keys:
            left, right = right, left ^ (mix64(right, key) & mask)
        return (left << half) | right

    def __call__(self, position: int) -> int:
        if not 0 <= position < self.n:
            raise IndexError(f"position must be in [0, {self.n}). Found: {position}")
        if self.n == 1:
            return 0
        y = self._encrypt(position)
        while y >= self.n:
            y = self._encrypt(y)
        return y
