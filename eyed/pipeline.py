"""Source -> inference workers -> publisher.

A worker takes the next frames from the source, resizes them into its own buffer (allocated once), classifies
them and hands the predictions in. Whichever worker then finds the next batch in frame order ready turns it
into events, so the publisher has one user at a time and events leave in the order the frames came.

A replay or file source is read by the workers themselves: it is never late and must deliver every frame.
Beside a bare onnxruntime loop, a hand-off to a separate reading thread cost 10-15% here. At fps 0 the daemon
runs as many workers as the machine has cores, each on one onnxruntime thread (``Settings.runtime_model``):
while one worker publishes, reads and resizes (Python, holding the GIL), the other's inference keeps its core
busy, and two frames on one thread each waste less than one frame split over two threads. Everything else runs
one worker, on all of onnxruntime's threads, which gives a single frame the lowest latency.

A live source (a camera) runs its own capture thread and hands over only its newest frame, so the loop never
works on a stale one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import numpy as np

from eyed.events import (
    EventContext,
    Health,
    drift_topic,
    health_event,
    health_topic,
    label_event,
    label_topic,
)
from eyed.publisher import Publisher
from eyed.sources.base import pace_listener
from eyed.types import Classifier, Frame, LiveSource, Prediction, Source

if TYPE_CHECKING:
    from eyed.drift import DriftMonitor, StatsExtractor, WindowReport

logger = logging.getLogger(__name__)


@dataclass
class Counters:
    """Written by the one worker publishing at a time, read by anyone (ints and floats: atomic enough under the
    GIL)."""

    frames: int = 0
    errors: int = 0
    started: float = field(default_factory=time.monotonic)
    last_progress: float = field(default_factory=time.monotonic)  # last turn of the inference loop
    paced_until: float = 0.0  # when the source's latest deliberate wait for its next frame (source.fps) ends

    def alive_at(self, now: float) -> float:
        """When the inference loop last showed it is alive, for the watchdog: its last turn, or the end of a
        wait on the source's pace (``now`` while it lasts), since a slow pace is not a hang."""
        return max(self.last_progress, min(self.paced_until, now))


class PipelineError(Exception):
    """The pipeline cannot go on (it fails, and the daemon exits 1 for systemd to restart it)."""


# A failure that repeats (every frame fails to resize, a model whose inference always fails) is logged once with
# its traceback, then as a count at most this often: one traceback per frame was 240 journal lines a second at
# 30 fps, past journald's rate limit (which then drops other lines too) and hard on an SD card.
REPEAT_LOG_EVERY_S = 60.0
# Frames kept coming and none could be classified for this long: the service is broken, not a frame. The
# pipeline fails (exit 1), so systemd restarts it with a fresh session, camera and process.
NOTHING_CLASSIFIED_GIVE_UP_S = 60.0


class RepeatedFailure:
    """Logs one kind of failure that may repeat: the first with its traceback, the next ones as a count at most
    every :data:`REPEAT_LOG_EVERY_S`, and a line when it stops. Workers call it at the same time."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._lock = threading.Lock()
        self._streak = 0  # failures since the last success
        self._unsaid = 0  # failures not yet in a log line
        self._next_say = 0.0

    def failed(self, count: int, detail: str) -> None:
        """``count`` frames failed; ``detail`` names them. Call from an ``except`` block (the traceback)."""
        with self._lock:
            self._streak += count
            self._unsaid += count
            now = time.monotonic()
            if self._streak == count:  # the first of a streak: what went wrong, in full
                logger.exception("%s %s; skipped", self.what, detail)
            elif now >= self._next_say:
                logger.error("%s again: %d more frame(s) skipped (last: %s)", self.what, self._unsaid, detail)
            else:
                return
            self._unsaid = 0
            self._next_say = now + REPEAT_LOG_EVERY_S

    def succeeded(self) -> None:
        if not self._streak:  # the usual case, without the lock
            return
        with self._lock:
            if self._streak > 1:
                logger.info("%s: works again after %d frame(s) skipped", self.what, self._streak)
            self._streak = self._unsaid = 0
            self._next_say = 0.0


@dataclass
class DriftWatch:
    """Per-frame statistics into the drift monitor; a window report every ``drift.window`` frames (or
    ``drift.window_s`` seconds)."""

    extractor: StatsExtractor
    monitor: DriftMonitor

    def observe(self, frame: Frame, pred: Prediction) -> WindowReport | None:
        # t_in: monotonic, so a clock step does not cut a window in seconds short or stretch it.
        return self.monitor.update(self.extractor(frame.image, pred), frame.t_in)


@dataclass
class Classified:
    """What a worker made of one batch: the frames it classified, their predictions, and how many it could not."""

    frames: list[Frame] = field(default_factory=list)
    preds: list[Prediction] = field(default_factory=list)
    errors: int = 0


class Pipeline:
    """Runs until the source ends or ``stop`` is set; ``join`` waits a bounded time.

    ``workers`` (replay and files only; a live source has one) classify batches at the same time; their
    events still go out in frame order.
    """

    def __init__(
        self,
        source: Source | LiveSource,
        classifier: Classifier,
        publisher: Publisher,
        *,
        batch: int = 1,
        workers: int = 1,
        heartbeat_s: float = 5.0,
        stop: threading.Event | None = None,
        drift: DriftWatch | None = None,
    ) -> None:
        self.source = source
        self.classifier = classifier
        self.publisher = publisher
        # Live frames go one at a time: waiting to fill a batch would make every frame late, and a second
        # worker would only take its turn at the newest frame.
        self.batch = 1 if source.live else batch
        self.workers = 1 if source.live else workers
        self.heartbeat_s = heartbeat_s
        self.stop = stop or threading.Event()
        self.done = threading.Event()
        self.counters = Counters()
        self.state = "starting"
        self.failure: BaseException | None = None
        self.ctx = EventContext(source=source.id, model=classifier.name, backend=classifier.backend)
        self._inline: Iterator[Frame] | None = None
        # The class may serve both kinds (CaptureSource does files too): the flag decides, not the methods.
        self._live: LiveSource | None = cast(LiveSource, source) if source.live else None
        self._label_topic = label_topic(source.id)
        self._health_topic = health_topic(source.id)
        self._seq = 0
        self._health_seq = 0
        self.drift = drift
        self._drift_topic = drift_topic(source.id)
        self._drift_seq = 0
        # Taking frames from the source, and a ticket that fixes the batch's place in the event stream.
        self._source_lock = threading.Lock()
        self._ended = False
        self._issued = 0
        # Batches classified but not yet published, by ticket; and whether a worker is publishing them (it alone
        # then uses the publisher, the counters, the heartbeat and the drift monitor).
        self._turn = threading.Condition()
        self._ready: dict[int, Classified] = {}
        self._publishing = False
        self._published = 0
        # Tickets a worker may run ahead of the oldest batch not yet out: a stuck batch stops the others soon.
        self._ahead = 2 * self.workers
        self._next_beat = 0.0
        self._beat_frames, self._beat_t = 0, 0.0
        self._published_state = ""
        self._preprocess_failures = RepeatedFailure("could not preprocess a frame")
        self._inference_failures = RepeatedFailure("inference failed")
        self._failing_since: float | None = None  # since when no frame handed in could be classified
        self._thread = threading.Thread(target=self._infer, name="eyed-infer", daemon=True)

    def start(self) -> None:
        self.counters.started = self.counters.last_progress = time.monotonic()
        self._thread.start()

    def announce(self, state: str) -> None:
        """A health event before the loop starts, from the thread that will start it (nobody else publishes
        yet): ``waiting`` for subscribers, every ``heartbeat_s`` and at once on a change; ``stopped`` or
        ``failed`` when the daemon ends without starting the loop, so subscribers hear how it ended."""
        assert not self._thread.is_alive(), "announce() is for before the inference loop runs"
        self.state = state
        self._beat(progress=False)

    def join(self, timeout_s: float) -> bool:
        """Wait for the inference thread (which waits for its helpers); False if it is still running after
        ``timeout_s``."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _next_batch(self) -> tuple[list[Frame], bool]:
        """Up to ``batch`` frames; True once the source has ended. Called under ``_source_lock``."""
        if self._live is not None:
            frame = self._live.next_frame(0.1)
            return ([frame] if frame is not None else []), self._live.state == "finished"
        if self._inline is None:
            self._inline = iter(cast(Source, self.source).frames(self.stop))
        items: list[Frame] = []
        try:
            for frame in self._inline:
                items.append(frame)
                if len(items) == self.batch:
                    return items, False
        except Exception as exc:  # the frames read before the failure are still classified
            self.failure = exc
            logger.exception("source %s failed", self.source.id)
        return items, True

    def current_state(self) -> str:
        """What ``health.<id>`` says: the camera's own state while running, else the pipeline's."""
        if self.state == "live" and self._live is not None:
            return self._live.state
        return self.state

    def _infer(self) -> None:
        now = time.monotonic()
        self._next_beat, self._beat_frames, self._beat_t = now, 0, now
        self.state = "live"
        helpers = [
            threading.Thread(target=self._work, name=f"eyed-infer-{i + 1}", daemon=True)
            for i in range(self.workers - 1)
        ]
        try:
            for helper in helpers:
                helper.start()
            self._work()
            for helper in helpers:
                # Each ends once the source has, or on stop, after handing in the batch it holds.
                helper.join()
            # A paced source stopped mid-wait ends too: that is a stop, not the end of the source.
            finished = self._ended and not self.stop.is_set()
            self.state = "failed" if self.failure is not None else ("finished" if finished else "stopped")
            elapsed = time.monotonic() - self.counters.started
            self._send_health(self.counters.frames / max(elapsed, 1e-9))
        except BaseException as exc:
            self.failure = exc
            self.state = "failed"
            logger.exception("inference loop failed")
        finally:
            self.stop.set()
            self.done.set()

    def _work(self) -> None:
        """One worker, until the source ends or ``stop`` is set (:meth:`_take_batches`); a failure stops them all."""
        buffer = np.empty((self.batch, *self.classifier.input_shape), dtype=np.uint8)
        try:
            with pace_listener(self._paced):
                self._take_batches(buffer)
        except BaseException as exc:
            # The state is _infer's to set, once every worker is done: set here, the others' next batch would
            # announce it early. The first failure is the one reported.
            if self.failure is None:
                self.failure = exc
            logger.exception("inference worker %s failed", threading.current_thread().name)
            self.stop.set()
            with self._turn:
                self._turn.notify_all()  # a worker held back waiting for this one's batches: it stops too

    def _take_batches(self, buffer: np.ndarray) -> None:
        """Take a batch, classify it and hand it in; until the source ends or ``stop`` is set. Every ticket taken
        is handed in (perhaps empty), so the batches after it are not held up for ever."""
        while not self.stop.is_set():
            with self._source_lock:
                if self._ended:
                    return
                with self._turn:
                    self._turn.wait_for(lambda: self.stop.is_set() or self._issued - self._published < self._ahead)
                if self.stop.is_set():
                    return
                items, self._ended = self._next_batch()
                ticket = self._issued
                self._issued += 1
            done = Classified()
            try:
                done = self._classify(items, buffer)
            finally:
                self._hand_in(ticket, done)

    def _paced(self, until: float) -> float | None:
        """A worker reading the source is about to wait for its next frame until ``until``, on purpose
        (source.fps): the loop is idle, not stuck, until the wait ends. Heartbeats that fall due meanwhile go
        out on time (a frame a minute must not look like a dead daemon to ``eyed health``); returns when the
        next one is due, for the wait to wake then."""
        self.counters.paced_until = until
        if not self._publish_turn(beat=True):
            return None  # another worker is publishing, and beats when due: wake at the frame's time
        return self._next_beat

    def _hand_in(self, ticket: int, done: Classified) -> None:
        """Queue a classified batch and publish what is ready (:meth:`_publish_turn`)."""
        with self._turn:
            self._ready[ticket] = done
        self._publish_turn()

    def _publish_turn(self, beat: bool = False) -> bool:
        """The worker that finds no one publishing publishes every batch that is next in order, its own or
        others', so events leave in frame order and no worker idles waiting for a turn (waiting for the turn
        instead left a core idle 15-25% of the time with two INT8 workers). With ``beat``, it first sends a
        heartbeat if one is due. The one publishing at a time is also the one thread using the socket. False
        if another worker was publishing (it publishes what this one handed in)."""
        with self._turn:
            if self._publishing:
                return False
            self._publishing = True
        try:
            if beat:
                self._beat(progress=False)
            while True:
                with self._turn:
                    batch = self._ready.pop(self._published, None)
                    if batch is None:
                        self._publishing = False
                        return True
                    self._published += 1
                    self._turn.notify_all()
                self._publish(batch)
                self._beat()
        except BaseException:
            with self._turn:
                self._publishing = False
                self._turn.notify_all()
            raise

    def _classify(self, items: list[Frame], buffer: np.ndarray) -> Classified:
        """Resize and classify one batch (workers do this at the same time: the failure logs lock)."""
        done = Classified()
        for frame in items:
            try:
                self.classifier.prepare(frame.image, out=buffer[len(done.frames)])
            except Exception:  # a frame OpenCV cannot resize: skip it, keep the camera
                done.errors += 1
                self._preprocess_failures.failed(1, f"on frame {frame.index}")
                continue
            self._preprocess_failures.succeeded()
            done.frames.append(frame)
        if not done.frames:
            return done
        try:
            done.preds = self.classifier.predict(buffer[: len(done.frames)])
        except Exception:
            done.errors += len(done.frames)
            first, last = done.frames[0].index, done.frames[-1].index
            self._inference_failures.failed(len(done.frames), f"on frame(s) {first}-{last}")
            done.frames = []
        else:
            self._inference_failures.succeeded()
        return done

    def _publish(self, done: Classified) -> None:
        """Events for one classified batch (by the one worker publishing)."""
        self.counters.errors += done.errors
        self._check_classifying(done)
        for frame, pred in zip(done.frames, done.preds, strict=True):
            latency_ms = (time.perf_counter() - frame.t_in) * 1000.0
            try:
                self.publisher.send(self._label_topic, label_event(self.ctx, self._seq, frame, pred, latency_ms))
            except ValueError as exc:
                # A payload JSON cannot carry (NaN or infinite scores from a broken model output, a value orjson
                # refuses): it costs this event, not the worker. encode() says which.
                self.counters.errors += 1
                logger.error("frame %d: no label event: %s", frame.index, exc)
                continue
            self._seq += 1
            # Counted per event sent, so frames + errors is every frame read, as for the failures above.
            self.counters.frames += 1
            if self.drift is not None:
                self._watch(self.drift, frame, pred)

    def _beat(self, progress: bool = True) -> None:
        """After each batch published: progress for the watchdog, and a health event on a state change or
        every ``heartbeat_s``. During a pace wait, only the health event."""
        now = time.monotonic()
        if progress:
            # The loop came round: what systemd's watchdog is fed on (a hung inference stops it).
            self.counters.last_progress = now
        state = self.current_state()
        if now >= self._next_beat or state != self._published_state:
            fps = (self.counters.frames - self._beat_frames) / max(now - self._beat_t, 1e-9)
            self._beat_frames, self._beat_t = self.counters.frames, now
            self._send_health(fps)
            self._published_state = state
            self._next_beat = now + self.heartbeat_s

    def _check_classifying(self, done: Classified) -> None:
        """PipelineError once frames have kept coming for :data:`NOTHING_CLASSIFIED_GIVE_UP_S` and none of
        them could be classified (skipped frames are otherwise counted and the loop goes on)."""
        now = time.monotonic()
        if done.preds or not done.errors:
            self._failing_since = None
        elif self._failing_since is None:
            self._failing_since = now
        elif now - self._failing_since >= NOTHING_CLASSIFIED_GIVE_UP_S:
            raise PipelineError(
                f"no frame could be classified for {now - self._failing_since:.0f} s "
                f"({self.counters.errors} skipped so far): giving up, for a restart"
            )

    def _watch(self, drift: DriftWatch, frame: Frame, pred: Prediction) -> None:
        """After the label event is out, so drift statistics never add to its latency."""
        try:
            report = drift.observe(frame, pred)
        except Exception:  # a statistic that fails on an odd frame must not cost the label stream
            self.counters.errors += 1
            logger.exception("drift statistics failed on frame %d", frame.index)
            return
        if report is None:
            return
        from eyed.drift import format_window, window_payload

        try:
            self.publisher.send(
                self._drift_topic, window_payload(report, self.ctx.source, self._drift_seq, time.time())
            )
        except ValueError as exc:  # as for a label event: a payload JSON cannot carry costs the event only
            self.counters.errors += 1
            logger.error("drift window %d: no drift event: %s", report.window, exc)
            return
        self._drift_seq += 1
        log = logger.warning if report.status != "ok" else logger.info
        log("%s", format_window(report))

    def health(self, fps: float) -> Health:
        c = self.counters
        live = self._live
        return Health(
            state=self.current_state(),
            frames=c.frames,
            fps=fps,
            dropped=live.dropped if live else 0,
            errors=c.errors,
            skipped=self.source.skipped,
            uptime_s=time.monotonic() - c.started,
            reconnects=live.reconnects if live else 0,
            reconnect_attempts=live.reconnect_attempts if live else 0,
            last_frame_age_s=live.last_frame_age_s() if live else None,
        )

    def _send_health(self, fps: float) -> None:
        h = self.health(fps)
        self.publisher.send(self._health_topic, health_event(self.ctx, self._health_seq, time.time(), h))
        self._health_seq += 1
        logger.info(
            "health source=%s state=%s frames=%d fps=%.1f dropped=%d errors=%d skipped=%d reconnects=%d attempts=%d",
            self.ctx.source,
            h.state,
            h.frames,
            h.fps,
            h.dropped,
            h.errors,
            h.skipped,
            h.reconnects,
            h.reconnect_attempts,
        )
