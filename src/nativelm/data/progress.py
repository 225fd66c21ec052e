"""Short progress lines on stderr, so a long `prepare` is never silent and stdout stays clean."""

from __future__ import annotations

import sys
import time


def note(message: str) -> None:
    """Print one `prepare: ...` line on stderr right away (stderr may be a pipe under DVC)."""
    print(f"prepare: {message}", file=sys.stderr, flush=True)


class Throttle:
    """Lets a loop report at most once every `every_s` seconds, so big corpora get a heartbeat."""

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s = every_s
        self._last = time.monotonic()

    def due(self) -> bool:
        """True when `every_s` seconds have passed since the last time it said so."""
        now = time.monotonic()
        if now - self._last < self.every_s:
            return False
        self._last = now
        return True
