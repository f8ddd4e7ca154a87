"""What every source shares: its error type and frame pacing."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar

import cv2
import numpy as np

# Who hears of a source's deliberate waits in this thread (the pipeline's worker reading the source): set by the
# reader rather than passed to the source, as every source makes its own Pacer (and a replay's reader its own
# pauses).
_pace_listener: ContextVar[Callable[[float], float | None] | None] = ContextVar("pace_listener", default=None)


class SourceError(Exception):
    """The source cannot be opened; the message tells the user what to do."""


@contextlib.contextmanager
def pace_listener(listener: Callable[[float], float | None]) -> Iterator[None]:
    """While entered, a :class:`Pacer` about to sleep in this thread, or a source about to wait on purpose
    (:func:`wait_announced`: a hub replay waiting for the network to come back), first calls ``listener`` with
    the monotonic time its wait ends: a watchdog can count a slow pace (one frame a minute) or an outage waited
    out as progress, not as a hang. The listener may return an earlier time to be called again at (a heartbeat
    due during the sleep)."""
    token = _pace_listener.set(listener)
    try:
        yield
    finally:
        _pace_listener.reset(token)


def announce_wait(until: float) -> float | None:
    """Tell the thread's :func:`pace_listener`, if any, that this thread waits on purpose until ``until``
    (monotonic); what it returns: when to call again, or None."""
    listener = _pace_listener.get()
    return listener(until) if listener is not None else None


def wait_announced(until: float, stop: threading.Event) -> bool:
    """Sleep until ``until`` (monotonic), announced to the thread's :func:`pace_listener` (again whenever it
    asks to be called earlier); False at once when ``stop`` is set. A source's deliberate waits (a pace, a
    pause for a network to come back) go through here, so that the daemon's watchdog counts them as alive."""
    now = time.monotonic()
    while now < until:
        wake = until
        if (sooner := announce_wait(until)) is not None:
            wake = min(wake, sooner)
        if stop.wait(max(0.0, wake - now)):
            return False
        now = time.monotonic()
    return not stop.is_set()


class Pacer:
    """Sleeps so that successive ``wait()`` calls return at most ``fps`` times a second (0 = never sleeps).

    A set ``stop`` ends the sleep at once, so a slow replay (one frame a minute) still stops within the
    daemon's shutdown bound. Each sleep is announced to the thread's :func:`pace_listener`, if any.
    """

    def __init__(self, fps: float, stop: threading.Event | None = None) -> None:
        self.period = 1.0 / fps if fps > 0 else 0.0
        self.stop = stop or threading.Event()
        self._next = 0.0

    def wait(self) -> bool:
        """False if ``stop`` is set: the caller should deliver nothing more."""
        if not self.period:
            return not self.stop.is_set()
        now = time.monotonic()
        if self._next > now:
            if not wait_announced(self._next, self.stop):
                return False
            now = self._next
        # Schedule from the ideal time, not from now, so a late frame does not shift every later one;
        # but a frame later than its slot starts a new schedule instead of bursting to catch up.
        self._next = max(self._next, now) + self.period
        return not self.stop.is_set()


def to_rgb(img: np.ndarray) -> np.ndarray:
    """Normalise an OpenCV-decoded image (gray, BGR, BGRA, 16-bit) to RGB uint8."""
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype != np.uint8:
        img = cv2.normalize(img.astype(np.float32), np.empty_like(img, np.float32), 0, 255, cv2.NORM_MINMAX).astype(
            np.uint8
        )
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    if img.shape[2] == 1:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
