"""Counter-based randomness keyed by (seed, epoch, sample index).

Every random decision the pipeline makes is a pure function of integers: a permutation's round keys come from
``(seed, epoch)``, and the generator handed to a map function comes from ``(seed, epoch, sample indices)``. Nothing
reads the global numpy or Python generators, so the same sample gets the same randomness on any rank, worker or
server.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence
from inspect import Parameter, signature
from typing import Any

import numpy as np

from tensorcom.errors import ConfigError

__all__ = ["derive_words", "sample_key", "sample_rng", "validate_seed", "wants_rng"]

_MAX_WORD = (1 << 64) - 1


def validate_seed(seed: Any, what: str = "seed") -> int:
    """Return ``seed`` if it is an int in ``[0, 2**64)``; raise :class:`ConfigError` otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ConfigError(f"{what} must be an int in [0, 2**64). Found: {seed!r}")
    seed = int(seed)
    if not 0 <= seed <= _MAX_WORD:
        raise ConfigError(f"{what} must be an int in [0, 2**64). Found: {seed}")
    return seed


def _digest(domain: bytes, words: Sequence[int], size: int) -> bytes:
    hasher = hashlib.blake2b(digest_size=size, person=domain[:16].ljust(16, b"\0"))
    hasher.update(struct.pack(f"<{len(words)}Q", *(w & _MAX_WORD for w in words)))
    hasher.update(struct.pack("<Q", len(words)))
    return hasher.digest()


def derive_words(domain: bytes, words: Sequence[int], count: int) -> list[int]:
    """Derive ``count`` independent 64-bit words from a domain tag and some integers (at most 8 words)."""
    if not 1 <= count <= 8:
        raise ConfigError(f"count must be in [1, 8]. Found: {count}")
    raw = _digest(domain, words, 8 * count)
    return list(struct.unpack(f"<{count}Q", raw))


def sample_key(salt: int, epoch: int, indices: Sequence[int]) -> int:
    """Return the 128-bit Philox key for the sample(s) ``indices`` of ``epoch`` in a stream seeded with ``salt``."""
    raw = _digest(b"tc-sample", [salt, epoch, *indices], 16)
    return int.from_bytes(raw, "little")


def sample_rng(key: int) -> np.random.Generator:
    """Return a fresh generator for a key made by :func:`sample_key`."""
    return np.random.Generator(np.random.Philox(key=key))


def wants_rng(fn: Callable[..., Any]) -> bool:
    """True when ``fn`` declares a parameter named ``rng`` (it then receives a per-sample generator)."""
    try:
        params = signature(fn).parameters
    except (TypeError, ValueError):
        return False
    param = params.get("rng")
    return param is not None and param.kind in (Parameter.POSITIONAL_OR_KEYWORD, Parameter.KEYWORD_ONLY)
