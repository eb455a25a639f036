"""Rate-limited logging, so a flood of bad input cannot flood the log."""

from __future__ import annotations

import logging
import time


class RateLimitedLog:
    """Logs the first message per key, then at most one per ``interval`` seconds, with a count of those suppressed."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0, max_keys: int = 1000) -> None:
        self.logger = logger
        self.interval = interval
        self.max_keys = max_keys
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, level: int, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        if len(self._last) >= self.max_keys and key not in self._last:
            self._last.clear()
            self._suppressed.clear()
        suppressed = self._suppressed.pop(key, 0)
        self._last[key] = now
        if suppressed:
            msg += " (%d similar messages suppressed)"
            args = (*args, suppressed)
        self.logger.log(level, msg, *args)
