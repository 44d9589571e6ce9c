"""A factory whose module makes every worker process but the first wait at import until the test opens a gate.

tests/test_request_direct.py sets ``TENSORCOM_TEST_LATE_WORKER`` to a folder before starting a server: the first
process that imports this module there claims ``first`` and goes on; the others wait (at most 120 s) for ``gate``,
so one worker becomes ready at a moment the test chooses. Without the variable (the test process itself) nothing
waits.
"""

from __future__ import annotations

import os
import time
from typing import Any

import factories

_FOLDER = os.environ.get("TENSORCOM_TEST_LATE_WORKER")
if _FOLDER:
    try:
        os.close(os.open(os.path.join(_FOLDER, "first"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        _deadline = time.monotonic() + 120
        while not os.path.exists(os.path.join(_FOLDER, "gate")) and time.monotonic() < _deadline:
            time.sleep(0.05)


def endless(*, seed: int, rank: int, world_size: int) -> Any:
    """``factories.small`` over 400 samples, repeating."""
    return factories.small(seed=seed, rank=rank, world_size=world_size, n=400, repeating=True)
