"""Deterministic, resumable pipeline stages (no zmq, no torch at import time)."""

from __future__ import annotations

__all__: list[str] = []
