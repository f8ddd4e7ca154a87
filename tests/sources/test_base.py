"""Announcements of a source's deliberate waits (a Pacer's sleeps, a replay's pauses), which the pipeline's
watchdog feed counts as progress."""

from __future__ import annotations

import threading
import time

from eyed.sources.base import Pacer, pace_listener, wait_announced


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


def test_a_sources_wait_is_announced_with_its_end_and_again_when_asked() -> None:
    """wait_announced (a hub replay's pause for the network to come back) tells the listener when it ends, as a
    Pacer's sleep does, and again whenever the listener asks (the pipeline's heartbeats fall due meanwhile)."""
    heard: list[float] = []

    def listener(until: float) -> float:
        heard.append(until)
        return time.monotonic() + 0.05

    with pace_listener(listener):
        before = time.monotonic()
        assert wait_announced(before + 0.3, threading.Event())
        woke = time.monotonic()
        assert wait_announced(time.monotonic(), threading.Event())  # no wait: nothing to announce
    assert woke >= before + 0.3
    assert len(heard) >= 3  # called again at each time it asked for
    assert set(heard) == {before + 0.3}


def test_a_stop_ends_an_announced_wait_at_once() -> None:
    heard: list[float] = []
    stop = threading.Event()
    threading.Timer(0.1, stop.set).start()
    with pace_listener(heard.append):
        before = time.monotonic()
        assert not wait_announced(before + 30, stop)
    assert time.monotonic() - before < 5
    assert heard == [before + 30]
    assert not wait_announced(time.monotonic() + 30, stop)  # already stopped: no wait
