"""Helpers for pipeline state: configuration fingerprints and checks on loaded state.

A state is plain data (dicts, lists, ints, floats, strings) so it survives JSON and msgpack. Its ``fingerprint`` is a
digest of the pipeline's configuration (stage kinds and parameters that change the stream, never worker counts,
buffer sizes, rank or world size), so loading a state into a differently configured pipeline is refused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from tensorcom.errors import StateError

__all__ = ["STATE_FORMAT", "check_state", "fingerprint_of", "require_int", "require_keys"]

STATE_FORMAT = 1


def fingerprint_of(config: Any) -> str:
    """Return a stable 32-hex-digit digest of a JSON-able configuration description."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def require_keys(state: Any, keys: tuple[str, ...], where: str) -> Mapping[str, Any]:
    """Return ``state`` as a mapping that holds ``keys``; raise :class:`StateError` naming ``where`` otherwise."""
    if not isinstance(state, Mapping):
        raise StateError(f"{where}: state must be a dict. Found: {type(state).__name__}")
    missing = [k for k in keys if k not in state]
    if missing:
        raise StateError(f"{where}: state lacks {missing}. Found keys: {sorted(map(str, state))}")
    return state


def require_int(state: Mapping[str, Any], key: str, where: str, low: int = 0, high: int | None = None) -> int:
    """Return ``state[key]`` as an int in ``[low, high]``; raise :class:`StateError` otherwise."""
    value = state[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise StateError(f"{where}: {key} must be an int. Found: {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise StateError(f"{where}: {key} must be {bound}. Found: {value}")
    return value


def check_state(state: Any, expected_fingerprint: str, where: str) -> Mapping[str, Any]:
    """Validate the envelope of a public state and that it was saved by an identically configured pipeline."""
    state = require_keys(state, ("format", "fingerprint", "step", "stream"), where)
    if state["format"] != STATE_FORMAT:
        raise StateError(f"{where}: state format must be {STATE_FORMAT}. Found: {state['format']!r}")
    if state["fingerprint"] != expected_fingerprint:
        raise StateError(
            f"{where}: state was saved by a pipeline with fingerprint {state['fingerprint']!r}, "
            f"but this pipeline's fingerprint is {expected_fingerprint!r}; the configurations differ"
        )
    require_int(state, "step", where)
    return state
