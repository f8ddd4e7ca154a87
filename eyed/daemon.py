"""The daemon's lifecycle: start-up, run until done or signalled, bounded shutdown.

Signal handlers only set a flag; the main thread waits on it and shuts the pipeline down within
``daemon.shutdown_timeout_s``.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from types import FrameType

import numpy as np

from eyed.config import Settings
from eyed.model import load_classifier
from eyed.pipeline import Pipeline
from eyed.publisher import Publisher
from eyed.sources import open_source
from eyed.types import Classifier

logger = logging.getLogger(__name__)


class ShutdownTimeout(Exception):
    """The pipeline did not stop within the bound."""


def warm_up(classifier: Classifier, batch: int) -> float:
    """One inference on a blank frame so the first real frame is not the slow one; returns seconds."""
    t = time.perf_counter()
    blank = np.zeros((32, 32, 3), dtype=np.uint8)
    tensor = classifier.prepare(blank)
    classifier.predict(np.repeat(tensor[None], batch, axis=0))
    return time.perf_counter() - t


@contextlib.contextmanager
def signals_set(stop: threading.Event):
    """Install SIGTERM/SIGINT handlers that only set ``stop``; restore the old ones afterwards."""

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run(settings: Settings, stop: threading.Event | None = None) -> int:
    """Run the daemon until the source finishes (exit 0) or a signal arrives (exit 0 after clean shutdown)."""
    stop = stop or threading.Event()
    with signals_set(stop), contextlib.ExitStack() as stack:
        classifier = load_classifier(settings.model)
        stack.callback(classifier.close)
        logger.info("warm-up took %.0f ms", warm_up(classifier, settings.model.batch) * 1000)
        source = stack.enter_context(open_source(settings.source))
        publisher = stack.enter_context(Publisher(settings.publish))
        publisher.wait_for_subscribers(settings.publish.wait_subscribers, settings.publish.wait_timeout_s, stop=stop)
        pipeline = Pipeline(
            source,
            classifier,
            publisher,
            batch=settings.model.batch,
            queue_size=settings.source.queue,
            heartbeat_s=settings.publish.heartbeat_s,
            stop=stop,
        )
        if stop.is_set():
            logger.info("stopped before the first frame")
            return 0
        pipeline.start()
        logger.info("running: source=%s model=%s backend=%s", source.id, classifier.name, classifier.backend)
        # A timed wait keeps the main thread responsive to signals and is where watchdog pings will go.
        while not stop.wait(0.5):
            pass
        if not pipeline.done.is_set():
            logger.info("stopping")
        if not pipeline.join(settings.daemon.shutdown_timeout_s):
            raise ShutdownTimeout(f"pipeline still running after {settings.daemon.shutdown_timeout_s:g} s")
        if pipeline.failure is not None:
            # Already logged with its traceback where it happened; a non-zero exit lets systemd restart us.
            logger.error("pipeline failed: %s", pipeline.failure)
            return 1
        logger.info("done: %d frames, %d skipped", pipeline.counters.frames, source.skipped)
    return 0
