"""Log lines that a peer can make repeat (a client refused, replies dropped for a client that left) at most once per
key every ``every`` seconds, with a count of the ones left out, so that a flood of bad peers cannot flood the log."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """``note(key, message, *args)`` logs ``message % args`` at ``level`` unless a line of the same ``key`` was
    logged less than ``every`` seconds ago; the next line that is logged says how many were left out."""

    def __init__(self, logger: logging.Logger, level: int = logging.WARNING, every: float = 10.0) -> None:
        self.logger = logger
        self.level = level
        self.every = every
        self._lock = threading.Lock()
        self._seen: dict[Any, tuple[float, int]] = {}

    def note(self, key: Any, message: str, *args: Any) -> bool:
        """Log the line if its key is due; return whether it was logged."""
        now = time.monotonic()
        with self._lock:
            last, suppressed = self._seen.get(key, (-self.every, 0))
            if now - last < self.every:
                self._seen[key] = (last, suppressed + 1)
                return False
            self._seen[key] = (now, 0)
            if len(self._seen) > 4096:  # keys a peer chooses: keep the table small
                self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.every}
        more = f" ({suppressed} more like it since the last report)" if suppressed else ""
        self.logger.log(self.level, message + "%s", *args, more)
        return True
