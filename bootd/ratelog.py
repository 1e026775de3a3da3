"""Rate-limited log lines: a flood of the same refusal must not flood the journal too.

Each refusal is still counted in /metrics; the log line is there to say why,
and once a second per reason says it often enough.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class LogLimiter:
    """At most one line per key every ``every`` seconds, each saying how many were held back before it."""

    def __init__(self, every: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.every = every
        self._clock = clock
        self._seen: dict[str, tuple[float, int]] = {}  # key -> (last logged, held back since)

    def allow(self, key: str = "") -> int | None:
        """The number of lines held back since the last one if a line may be logged now, else None."""
        now = self._clock()
        last, held = self._seen.get(key, (-math.inf, 0))
        if now - last >= self.every:
            self._seen[key] = (now, 0)
            return held
        self._seen[key] = (last, held + 1)
        return None
