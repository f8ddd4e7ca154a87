"""Pacer's announcements of its sleeps, which the pipeline's watchdog feed counts as progress."""

from __future__ import annotations

import threading
import time

from eyed.sources.base import Pacer, pace_listener


def test_pacer_tells_the_threads_listener_when_each_sleep_ends() -> None:
    heard: list[float] = []
    pacer = Pacer(1)  # a second apart: the second wait sleeps however slow the machine is
    with pace_listener(heard.append):
        pacer.wait()  # the first frame goes at once: no sleep to announce
        assert heard == []
        before = time.monotonic()
        pacer.wait()
        woke = time.monotonic()
    assert len(heard) == 1
    assert before < heard[0] <= woke  # announced before the sleep, with the time it ends


def test_only_the_listening_thread_is_heard() -> None:
    heard: list[float] = []
    other = Pacer(4)
    with pace_listener(heard.append):
        # A pacer read in another thread (another pipeline's worker) is not this listener's.
        thread = threading.Thread(target=lambda: [other.wait() for _ in range(3)])
        thread.start()
        thread.join(5)
        Pacer(0).wait()  # never sleeps
    pacer = Pacer(4)
    pacer.wait()
    pacer.wait()  # sleeps, after the listener is gone
    assert heard == []
