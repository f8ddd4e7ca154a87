"""The daemon's lifecycle: start-up, run until done or signalled, bounded shutdown.

Signal handlers only set a flag, which a relay thread passes on to the ``stop`` event; the main thread waits on
it and shuts the pipeline down within ``daemon.shutdown_timeout_s``. While the model loads, where nothing looks
at ``stop``, a stop signal also raises StopRequested in the main thread, so a long first-start export is not
waited for.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import numpy as np

from eyed.config import ConfigError, Settings
from eyed.curve import CurveError
from eyed.events import drift_topic, label_topic
from eyed.model import load_classifier
from eyed.model.checkpoint import same_checkpoint
from eyed.pipeline import DriftWatch, Pipeline
from eyed.publisher import Publisher
from eyed.sdnotify import Notifier
from eyed.sources import SourceError, open_source
from eyed.types import Classifier, StartUp

if TYPE_CHECKING:
    from eyed.drift import Reference

logger = logging.getLogger(__name__)

# glibc's mallopt() parameter (malloc.h), and the value glibc starts from before it raises it as it goes.
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 128 * 1024
# How much longer systemd should wait for READY=1 each time a slow but working start-up reports (a replay
# waiting for datasets to walk a large folder reports every 30 s, dataset_info.CHILD_REPORT_S).
START_EXTEND_S = 120.0


class ShutdownTimeout(Exception):
    """The pipeline did not stop within the bound."""


def pin_mmap_threshold() -> bool:
    """Keeps glibc's mmap threshold at 128 KiB, so a large block goes back to the system when it is freed.

    glibc raises the threshold to the size of each mapped block freed (up to 32 MB). Blocks of that size then
    come from the heap and stay there once freed, as what onnxruntime frees while it builds a session does:
    8 MB more peak RSS for a replay daemon and 15 MB for a camera's, and a replay's RSS grows with each
    row group read (209 to 285 MB over 30,000 CIFAR-10 records; pinned, it stays at 204). Setting the threshold
    turns the adjustment off. A MALLOC_*_ variable the user set wins; other C libraries are left alone.
    Returns whether it was set.
    """
    if not sys.platform.startswith("linux") or any(
        k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    # glibc returns 1 on success; musl's mallopt is a stub that returns 0.
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def warm_up(classifier: Classifier, batch: int) -> float:
    """One inference on a blank frame so the first real frame is not the slow one; returns seconds."""
    t = time.perf_counter()
    blank = np.zeros((32, 32, 3), dtype=np.uint8)
    tensor = classifier.prepare(blank)
    classifier.predict(np.repeat(tensor[None], batch, axis=0))
    return time.perf_counter() - t


class StopRequested(BaseException):
    """Raised by a stop signal's handler in the main thread while it loads the model, where nothing looks at the
    stop flag. Not an Exception, as KeyboardInterrupt is not: no ``except Exception`` on the way takes it for a
    failure of the load."""


class Signals:
    """What the signal handlers set, and a thread that passes it on to the daemon's events.

    A handler runs in the main thread between two bytecodes, perhaps while that thread holds a lock: inside
    ``stop.wait()`` it holds the Event's own, which ``Event.set`` takes, so a handler that set an Event could
    deadlock the main thread. A handler here sets plain attributes and writes a byte to a pipe; the relay thread,
    woken by that byte, sets the events (a replay's wait for datasets and the wait for subscribers watch ``stop``
    while the main thread is in them).
    """

    def __init__(self, stop: threading.Event, reload: threading.Event | None = None) -> None:
        self.stop, self.reload = stop, reload
        self.stop_requested = False
        self.reload_requested = False
        # While True, a stop signal also raises StopRequested in the main thread (once: not again in the clean-up
        # that follows, as an export's removal of its temporary file).
        self.interruptible = False
        self._closing = False
        self._wake_r = self._wake_w = -1
        self._relay = threading.Thread(target=self._run_relay, name="eyed-signals", daemon=True)

    def on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stop_requested = True
        self._wake()
        if self.interruptible:
            self.interruptible = False
            raise StopRequested(signum)

    def on_reload(self, signum: int, frame: FrameType | None) -> None:
        self.reload_requested = True
        self._wake()

    def _wake(self) -> None:
        # Full: the relay has a wake-up pending anyway.
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"\0")

    def _run_relay(self) -> None:
        while True:
            os.read(self._wake_r, 512)  # blocks until a handler (or close) writes
            if self.stop_requested:
                self.stop.set()
            if self.reload_requested and self.reload is not None:
                self.reload_requested = False
                self.reload.set()
            if self._closing:
                return

    def start(self) -> None:
        """Start the relay; before the handlers are installed, as they write to its pipe."""
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)  # a handler must never block on a full pipe
        self._relay.start()

    def close(self) -> None:
        """End the relay (after the handlers are gone), passing on what the last handlers set."""
        if not self._relay.is_alive():
            return
        self._closing = True
        self._wake()
        self._relay.join(1.0)
        if not self._relay.is_alive():  # else it still reads the pipe: leaving it open is the lesser harm
            os.close(self._wake_r)
            os.close(self._wake_w)

    @contextlib.contextmanager
    def interrupting(self) -> Iterator[None]:
        """A stop signal raises StopRequested in the main thread while entered (and on entry, if one came
        before): for start-up steps that cannot look at the stop flag, as loading the model."""
        # Armed before looking: a signal between the two then raises in the handler, instead of going unseen.
        self.interruptible = True
        try:
            if self.stop_requested or self.stop.is_set():
                self.interruptible = False
                raise StopRequested()
            yield
        finally:
            self.interruptible = False


@contextlib.contextmanager
def signals_set(stop: threading.Event, reload: threading.Event | None = None) -> Iterator[Signals]:
    """Install handlers that only set flags, passed on to ``stop`` (SIGTERM/SIGINT) and ``reload`` (SIGHUP) by
    :class:`Signals`; restore the old handlers afterwards (ignored instead, once stopping).
    Off the main thread, nothing is installed."""
    signals = Signals(stop, reload)
    if threading.current_thread() is not threading.main_thread():
        try:
            yield signals
        finally:
            signals.close()
        return
    signals.start()
    stop_signals = (signal.SIGTERM, signal.SIGINT)
    old = {s: signal.signal(s, signals.on_stop) for s in stop_signals}
    if reload is not None:
        old[signal.SIGHUP] = signal.signal(signal.SIGHUP, signals.on_reload)
    try:
        yield signals
    finally:
        # Once a stop has been asked for (or the source has ended), the daemon is on its way out: a second stop
        # signal (systemd's, after a first one; a second Ctrl-C), or a reload (`systemctl reload` as a replay
        # ends), must not then kill the interpreter's teardown by the default action, turning exit 0 into death
        # by signal. Left ignored instead; systemd's SIGKILL after TimeoutStopSec still ends a teardown that
        # hangs.
        stopping = signals.stop_requested or stop.is_set()
        for s, h in old.items():
            signal.signal(s, signal.SIG_IGN if stopping else h)
        signals.close()


def reload_now(reload: threading.Event, notifier: Notifier, publisher: Publisher) -> None:
    """On SIGHUP: read the CURVE allow-list again, the one setting that changes without a restart."""
    if not reload.is_set():
        return
    reload.clear()
    notifier.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
    try:
        allowed = publisher.reload_clients()
    except CurveError as exc:
        # A failed reload must not take the service down: keep running with the list read before.
        logger.error("SIGHUP: %s; the previous allow-list stays in force", exc)
    except Exception as exc:
        # Nor may one that fails in a way nobody foresaw (pyzmq's certificate parser raises IndexError on a
        # malformed line): the list is replaced only once read whole, so the previous one is still in force.
        logger.error(
            "SIGHUP: reading the allow-list failed (%s: %s); the previous allow-list stays in force",
            type(exc).__name__,
            exc,
            exc_info=True,
        )
    else:
        if allowed is None:
            logger.info("SIGHUP: nothing to reload without CURVE; restart the daemon to apply other settings")
        else:
            logger.info("SIGHUP: CURVE allow-list read again, %d key(s); other settings need a restart", allowed)
    finally:
        notifier.notify("READY=1")


class PipelineShutdown:
    """Stops the pipeline and waits for its threads, once, bounded by ``daemon.shutdown_timeout_s``; entered on
    :func:`run`'s ExitStack after the publisher, the classifier and the source, so that on every way out of
    ``run`` (LIFO) the inference workers have ended before what they use closes.

    Without it, an exception escaping the main loop closed the publisher and the ONNX session under running
    workers: they failed on a closed object (onnxruntime could abort the process), and neither STOPPING=1 nor
    the last health event went out.
    """

    def __init__(self, pipeline: Pipeline, notifier: Notifier, stop: threading.Event, timeout_s: float) -> None:
        self.pipeline, self.notifier, self.stop, self.timeout_s = pipeline, notifier, stop, timeout_s
        self.started = False
        self.ended: bool | None = None  # whether the threads ended, once __call__ has waited for them

    def start(self) -> None:
        self.pipeline.start()
        self.started = True

    def __call__(self) -> bool:
        """STOPPING=1, set ``stop`` and wait for the threads; whether they ended in time. Only the first call
        does it: the main thread's own shutdown makes the one on the way out a no-op."""
        if self.ended is None:
            self.notifier.notify("STOPPING=1", "STATUS=stopping")
            if self.started and not self.pipeline.done.is_set():
                logger.info("stopping")
            self.stop.set()
            self.ended = self.pipeline.join(self.timeout_s) if self.started else True
        return self.ended

    def __enter__(self) -> PipelineShutdown:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if self.ended is not None or (exc is None and not self.started):
            return  # stopped already, or an early return that has said how it ended
        if not self.started:
            # Failed before the first frame: subscribers hear how it ended (the publisher's linger delivers it).
            try:
                self.pipeline.announce("failed")
            except Exception:
                logger.exception("could not announce the failure")
        if not self():
            logger.error(
                "inference still running %g s after a failure in the main thread: closing what it uses anyway",
                self.timeout_s,
            )


class Supervisor:
    """The main thread's view of the pipeline for systemd: watchdog pings while it progresses, STATUS lines."""

    def __init__(self, notifier: Notifier, pipeline: Pipeline, status_every_s: float) -> None:
        self.notifier = notifier
        self.pipeline = pipeline
        self.status_every_s = status_every_s
        self.watchdog_s = notifier.watchdog_s
        self._last_ping = 0.0
        self._last_status = 0.0
        self._status_frames = 0

    @property
    def tick_s(self) -> float:
        """How often the main thread should call :meth:`tick`."""
        return min(0.5, self.watchdog_s / 4) if self.watchdog_s else 0.5

    def healthy(self, now: float) -> bool:
        """True while the inference loop has come round, or waited on the source's pace, within the watchdog
        window (or no watchdog is set)."""
        if not self.watchdog_s:
            return True
        return now - self.pipeline.counters.alive_at(now) < self.watchdog_s

    def tick(self, waiting: bool = False) -> None:
        """Ping the watchdog at half its interval when healthy (or ``waiting`` for subscribers); update STATUS."""
        now = time.monotonic()
        if self.watchdog_s and now - self._last_ping >= self.watchdog_s / 2 and (waiting or self.healthy(now)):
            self.notifier.notify("WATCHDOG=1")
            self._last_ping = now
        if now - self._last_status >= self.status_every_s:
            self.notifier.notify(f"STATUS={self.status(now, waiting)}")
            self._status_frames = self.pipeline.counters.frames
            self._last_status = now

    def status(self, now: float, waiting: bool) -> str:
        if waiting:
            return "waiting for subscribers"
        c = self.pipeline.counters
        fps = (c.frames - self._status_frames) / max(now - self._last_status, 1e-9) if self._last_status else 0.0
        h = self.pipeline.health(fps)
        return f"{h.state}: {h.frames} frames, {h.fps:.1f} fps, {h.dropped} dropped, {h.errors} errors"


def drift_reference(settings: Settings) -> Reference | None:
    """The drift reference the configuration names (None without one, or with drift off); ConfigError for a
    file that is missing or not a profile, one profiled under another ``model.small_input``, or one too short
    to calibrate thresholds on (checked here, without the model, so ``eyed check-config`` finds them too)."""
    cfg = settings.drift
    if not cfg.active() or cfg.reference is None:
        return None
    from eyed.config import MIN_WINDOW
    from eyed.drift import load_reference
    from eyed.drift.monitor import calibration_size
    from eyed.drift.reference import check_small_input

    try:
        reference = load_reference(cfg.reference)
    except ValueError as exc:  # its message names drift.reference and the file
        raise ConfigError(str(exc)) from None
    try:
        check_small_input(reference, settings.model.small_input)
        calibration_size(MIN_WINDOW, reference.reservoir.shape[0])
    except ValueError as exc:
        raise ConfigError(f"drift.reference {cfg.reference}: {exc}") from None
    return reference


def build_drift(settings: Settings, classifier: Classifier, reference: Reference | None = None) -> DriftWatch | None:
    """The drift monitor the configuration asks for, or None; ConfigError for an unusable reference.

    ``reference``: the configured one, when :func:`drift_reference` has read it already.
    """
    cfg = settings.drift
    if not cfg.active():
        return None
    from eyed.drift import DriftMonitor, StatsExtractor
    from eyed.drift.monitor import MAX_WINDOW

    post = getattr(classifier, "post", None)
    mapper = getattr(post, "mapper", None)
    coarse = tuple(mapper.classes) if mapper is not None else ()
    labels = list(post.labels) if post is not None else None
    if cfg.reference is not None:
        reference = reference or drift_reference(settings)
        assert reference is not None  # drift is active and drift.reference set
        try:
            check_model(reference, classifier)
            monitor = DriftMonitor(cfg, reference, coarse_classes=coarse, labels=labels)
        except ValueError as exc:  # other preprocessing, or coarse classes that differ from the model's
            raise ConfigError(f"drift.reference {cfg.reference}: {exc}") from exc
        logger.info("drift: comparing windows of %s with %s", cfg.window_text(), cfg.reference)
    else:
        monitor = DriftMonitor(cfg, None, coarse_classes=coarse, labels=labels)
        logger.info(
            "drift: no drift.reference set; the first %d windows of %s become the reference "
            "(run `eyed profile` on in-domain data for a better one)",
            cfg.learn_windows,
            cfg.window_text(),
        )
    if cfg.window_s is not None and settings.source.fps > 0:
        monitor.expect_rate(settings.source.fps)
    if cfg.window_s is not None and settings.source.kind in ("replay", "file") and settings.source.fps == 0:
        logger.warning(
            "drift: windows of %s on a %s at fps 0 hold as many frames as inference gets through in that time "
            "(up to %d): set source.fps to replay at a camera's rate",
            cfg.window_text(),
            settings.source.kind,
            MAX_WINDOW,
        )
    # With the mapper, the coarse column is the plain group sum, the same under any model.coarse_priors.
    return DriftWatch(StatsExtractor(coarse, mapper=mapper), monitor)


def check_model(reference: Reference, classifier: Classifier) -> None:
    """ValueError when ``reference`` was profiled with a model that prepares its input differently; a warning
    when it names another model. A quantized file of the profiled model is the same model by name
    (eyed.model_id), and a legitimate user of its profile."""
    from eyed.drift.reference import check_preprocess_spec, preprocess_spec

    spec = preprocess_spec(classifier)
    if spec is not None:
        check_preprocess_spec(reference, spec, classifier.name)
    # A checkpoint folder written another way (relative, from another folder, by an older eyed) is the same.
    if reference.model and not same_checkpoint(reference.model, classifier.name):
        logger.warning(
            "drift: the reference was profiled with model %s, this run uses %s: if that is another model, run "
            "`eyed profile` with it, or its class and confidence distributions may report drift on in-domain frames",
            reference.model,
            classifier.name,
        )


def extend_start(notifier: Notifier) -> Callable[[str], None]:
    """What a slow but working start-up reports, for systemd: the status, and more time before the unit's start
    timeout (TimeoutStartSec) would fail it."""

    def waiting(status: str) -> None:
        notifier.notify(f"EXTEND_TIMEOUT_USEC={int(START_EXTEND_S * 1e6)}", f"STATUS={status}")

    return waiting


def stopped_early(notifier: Notifier) -> int:
    """A stop before the first frame: a clean exit."""
    logger.info("stopped before the first frame")
    notifier.notify("STOPPING=1")
    return 0


def note_cache_outside_unit(settings: Settings) -> None:
    """Warn when the service's cache folder ($CACHE_DIRECTORY) is set but model.cache_dir, from the file, lies
    outside it: under ProtectSystem=strict such a folder is read-only, and a first export would fail (configs
    saved from `eyed check-config` before the unit stopped overriding cache_dir hold ~/.cache/eyed)."""
    unit = [Path(p) for p in os.environ.get("CACHE_DIRECTORY", "").split(":") if p]
    if not unit or settings.model.onnx is not None:
        return
    cache = settings.model.cache_dir.expanduser().resolve()
    if not any(cache.is_relative_to(folder.resolve()) for folder in unit):
        logger.warning(
            "model.cache_dir %s is outside the service's cache folder %s: under the unit it is read-only, so an "
            "export would fail there; remove cache_dir from the configuration file to use the service's",
            cache,
            unit[0],
        )


def run(settings: Settings, stop: threading.Event | None = None) -> int:
    """Run the daemon until the source finishes (exit 0) or a signal arrives (exit 0 after clean shutdown)."""
    note_cache_outside_unit(settings)
    stop = stop or threading.Event()
    reload = threading.Event()
    # Before the model and the dataset make their large allocations.
    if pin_mmap_threshold():
        logger.debug("glibc mmap threshold pinned at %d bytes", MMAP_THRESHOLD_BYTES)
    with signals_set(stop, reload) as signals, contextlib.ExitStack() as stack:
        notifier = stack.enter_context(Notifier())
        # Before the model loads: a bad reference file is a config error, found in a moment.
        reference = drift_reference(settings)
        # Made before the model loads, entered after: a replay source starts asking datasets about a local
        # folder (in a child process) at once, so that wait overlaps the model's.
        source = open_source(settings.source, StartUp(stop, extend_start(notifier)))
        model = settings.runtime_model()
        try:
            # Tens of seconds for a first-start export on a Pi: a stop must not wait for it (TimeoutStopSec).
            with signals.interrupting():
                classifier = load_classifier(model)
                stack.callback(classifier.close)
                logger.info("warm-up took %.0f ms", warm_up(classifier, model.batch) * 1000)
        except StopRequested:
            return stopped_early(notifier)
        try:
            stack.enter_context(source)
        except SourceError:
            if not stop.is_set():
                raise
            # A replay gave up waiting for datasets because we are told to stop: not a failure.
            return stopped_early(notifier)
        drift = build_drift(settings, classifier, reference)
        # The wait for subscribers counts those who will get this source's events, not any label subscriber.
        topics = [label_topic(source.id), *([drift_topic(source.id)] if drift is not None else [])]
        publisher = stack.enter_context(Publisher(settings.publish, event_topics=topics))
        pipeline = Pipeline(
            source,
            classifier,
            publisher,
            batch=model.batch,
            workers=model.workers,
            heartbeat_s=settings.publish.heartbeat_s,
            stop=stop,
            drift=drift,
        )
        # From here on, every way out of run() (an exception from the main loop too) ends the workers first.
        shutdown = stack.enter_context(PipelineShutdown(pipeline, notifier, stop, settings.daemon.shutdown_timeout_s))
        supervisor = Supervisor(notifier, pipeline, settings.publish.heartbeat_s)
        # Ready: the model is loaded and warm, the endpoint is bound. Waiting for subscribers comes after, so a
        # unit's start-up timeout never depends on when clients show up.
        notifier.notify("READY=1", "STATUS=ready")

        def waiting_tick() -> None:
            # A key added to the allow-list and a SIGHUP can let in the subscriber being waited for.
            reload_now(reload, notifier, publisher)
            supervisor.tick(waiting=True)
            # Subscribers already there hear that the daemon is up and what it waits for.
            pipeline.announce("waiting")

        # A failure here (PublishError: the wait timed out) is announced by PipelineShutdown on the way out.
        publisher.wait_for_subscribers(
            settings.publish.wait_subscribers,
            settings.publish.wait_timeout_s,
            stop=stop,
            tick=waiting_tick,
        )
        if stop.is_set():
            pipeline.announce("stopped")
            return stopped_early(notifier)
        shutdown.start()
        logger.info(
            "running: source=%s model=%s%s backend=%s spinning=%s workers=%d threads=%s batch=%d",
            source.id,
            classifier.name,
            f" onnx={model.onnx}" if model.onnx is not None else "",
            classifier.backend,
            model.spinning if classifier.backend == "onnx" else "n/a",
            pipeline.workers,
            model.threads or "default",
            pipeline.batch,
        )
        # A timed wait keeps the main thread responsive to signals and paces the watchdog.
        while not stop.wait(supervisor.tick_s):
            reload_now(reload, notifier, publisher)
            supervisor.tick()
        if not shutdown():
            raise ShutdownTimeout(f"pipeline still running after {settings.daemon.shutdown_timeout_s:g} s")
        if pipeline.failure is not None:
            # Already logged with its traceback where it happened; a non-zero exit lets systemd restart us.
            logger.error("pipeline failed: %s", pipeline.failure)
            return 1
        logger.info("done: %d frames, %d skipped", pipeline.counters.frames, source.skipped)
    return 0
