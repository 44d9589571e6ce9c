"""Keep glibc's allocator from handing memory back to the kernel after every small batch.

Small batches are copied once on each side (into a ZeroMQ message when sent, into a fresh buffer when received),
and libzmq's I/O thread allocates and frees one message per frame. With glibc's starting thresholds (memory above
128 kB of free space at the top of the heap is returned, blocks of 128 kB and more are mapped afresh), that pattern
makes the heap shrink and grow again for nearly every batch, and every page that comes back is faulted in and
zeroed by the kernel. Measured with 64 kB batches over tcp (zreq, credit 4): about 8.5k batches/s with the starting
thresholds, 10–11k with the ones below.

glibc moves to these thresholds by itself once it has freed one large mapped block (it raises the mapping threshold
to that block's size, at most 32 MiB, and the trim threshold to twice that), so large-batch processes already run
with them; :func:`tune` sets them from the start. The cost is that up to 64 MiB of freed memory per malloc arena may
stay in the process instead of going back to the kernel.

Servers and connections call :func:`tune` when they are created. Nothing is changed when ``TENSORCOM_MALLOC=0``,
when the process already chose its own thresholds (``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_`` or a
``glibc.malloc`` tunable in ``GLIBC_TUNABLES``), or outside glibc.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "tune"]

MMAP_THRESHOLD = 32 << 20
"""Blocks of this size and more are mapped on their own (glibc's largest automatic value)."""
TRIM_THRESHOLD = 64 << 20
"""Free space at the top of a heap beyond this goes back to the kernel (glibc: twice the mapping threshold)."""

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")
_USER_TUNABLES = ("glibc.malloc.trim_threshold", "glibc.malloc.mmap_threshold")

_lock = threading.Lock()
_result: bool | None = None


def _chosen_by_user() -> bool:
    if os.environ.get("TENSORCOM_MALLOC", "1") == "0":
        return True
    if any(name in os.environ for name in _USER_SETTINGS):
        return True
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return any(name in tunables for name in _USER_TUNABLES)


def tune() -> bool:
    """Set glibc's trim and mapping thresholds for this process (once); return whether they are set."""
    global _result
    with _lock:
        if _result is None:
            _result = _apply()
        return _result


def _apply() -> bool:
    if _chosen_by_user() or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
