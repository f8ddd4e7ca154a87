"""What every source shares: its error type and frame pacing."""

from __future__ import annotations

import time


class SourceError(Exception):
    """The source cannot be opened; the message tells the user what to do."""


class Pacer:
    """Sleeps so that successive ``wait()`` calls return at most ``fps`` times a second (0 = never sleeps)."""

    def __init__(self, fps: float) -> None:
        self.period = 1.0 / fps if fps > 0 else 0.0
        self._next = 0.0

    def wait(self) -> None:
        if not self.period:
            return
        now = time.monotonic()
        if self._next > now:
            time.sleep(self._next - now)
            now = self._next
        # Schedule from the ideal time, not from now, so a late frame does not shift every later one;
        # but a frame later than its slot starts a new schedule instead of bursting to catch up.
        self._next = max(self._next, now) + self.period
