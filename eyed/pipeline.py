"""Source -> inference thread -> publisher.

The inference thread resizes frames into a buffer allocated once, classifies, turns predictions into events and
is the only user of the publisher. A replay or file source is read by the inference thread itself: it is never
late, it must deliver every frame, and onnxruntime already keeps both cores of a small board busy, so a hand-off
between threads costs more than it saves (``eyed bench`` measured 0.83-0.89x of a bare onnxruntime loop with a
hand-off, 0.93x without). A live source (a camera) runs its own capture thread and hands over only its newest
frame, so the loop never works on a stale one.
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
from eyed.types import Classifier, Frame, LiveSource, Prediction, Source

if TYPE_CHECKING:
    from eyed.drift import DriftMonitor, StatsExtractor, WindowReport

logger = logging.getLogger(__name__)


@dataclass
class Counters:
    """Written by the inference thread, read by anyone (ints and floats: atomic enough under the GIL)."""

    frames: int = 0
    errors: int = 0
    started: float = field(default_factory=time.monotonic)
    last_progress: float = field(default_factory=time.monotonic)  # last turn of the inference loop


@dataclass
class DriftWatch:
    """Per-frame statistics into the drift monitor; a window report every ``drift.window`` frames (or
    ``drift.window_s`` seconds)."""

    extractor: StatsExtractor
    monitor: DriftMonitor

    def observe(self, frame: Frame, pred: Prediction) -> WindowReport | None:
        # t_in: monotonic, so a clock step does not cut a window in seconds short or stretch it.
        return self.monitor.update(self.extractor(frame.image, pred), frame.t_in)


class Pipeline:
    """Runs until the source ends or ``stop`` is set; ``join`` waits a bounded time."""

    def __init__(
        self,
        source: Source | LiveSource,
        classifier: Classifier,
        publisher: Publisher,
        *,
        batch: int = 1,
        heartbeat_s: float = 5.0,
        stop: threading.Event | None = None,
        drift: DriftWatch | None = None,
    ) -> None:
        self.source = source
        self.classifier = classifier
        self.publisher = publisher
        # Live frames go one at a time: waiting to fill a batch would make every frame late.
        self.batch = 1 if source.live else batch
        self.heartbeat_s = heartbeat_s
        self.stop = stop or threading.Event()
        self.done = threading.Event()
        self.counters = Counters()
        self.state = "starting"
        self.failure: BaseException | None = None
        self.ctx = EventContext(source=source.id, model=classifier.name, backend=classifier.backend)
        self._buffer = np.empty((self.batch, *classifier.input_shape), dtype=np.uint8)
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
        self._thread = threading.Thread(target=self._infer, name="eyed-infer", daemon=True)

    def start(self) -> None:
        self.counters.started = self.counters.last_progress = time.monotonic()
        self._thread.start()

    def join(self, timeout_s: float) -> bool:
        """Wait for the inference thread; False if it is still running after ``timeout_s``."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _next_batch(self) -> tuple[list[Frame], bool]:
        """Up to ``batch`` frames; True once the source has ended."""
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
        next_beat = time.monotonic()
        beat_frames, beat_t = 0, time.monotonic()
        self.state = "live"
        published_state = ""
        try:
            ended = False
            while not ended and not self.stop.is_set():
                items, ended = self._next_batch()
                if items:
                    self._classify(items)
                now = time.monotonic()
                # The loop came round: what systemd's watchdog is fed on (a hung inference stops it).
                self.counters.last_progress = now
                state = self.current_state()
                # A state change goes out at once; otherwise one heartbeat every heartbeat_s.
                if now >= next_beat or state != published_state:
                    fps = (self.counters.frames - beat_frames) / max(now - beat_t, 1e-9)
                    beat_frames, beat_t = self.counters.frames, now
                    self._send_health(fps)
                    published_state = state
                    next_beat = now + self.heartbeat_s
            # A paced source stopped mid-wait ends too: that is a stop, not the end of the source.
            finished = ended and not self.stop.is_set()
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

    def _classify(self, items: list[Frame]) -> None:
        frames: list[Frame] = []
        for frame in items:
            try:
                self.classifier.prepare(frame.image, out=self._buffer[len(frames)])
            except Exception:  # a frame OpenCV cannot resize: skip it, keep the camera
                self.counters.errors += 1
                logger.exception("could not preprocess frame %d; skipped", frame.index)
                continue
            frames.append(frame)
        if not frames:
            return
        try:
            preds = self.classifier.predict(self._buffer[: len(frames)])
        except Exception:
            self.counters.errors += len(frames)
            logger.exception("inference failed on %d frame(s); skipped", len(frames))
            return
        for frame, pred in zip(frames, preds, strict=True):
            latency_ms = (time.perf_counter() - frame.t_in) * 1000.0
            try:
                self.publisher.send(self._label_topic, label_event(self.ctx, self._seq, frame, pred, latency_ms))
            except ValueError:  # NaN or infinite scores (a broken model output): JSON cannot carry them
                self.counters.errors += 1
                logger.error("frame %d: the model gave non-finite scores; no event", frame.index)
                continue
            self._seq += 1
            # Counted per event sent, so frames + errors is every frame read, as for the failures above.
            self.counters.frames += 1
            if self.drift is not None:
                self._watch(self.drift, frame, pred)

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

        self.publisher.send(self._drift_topic, window_payload(report, self.ctx.source, self._drift_seq, time.time()))
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
            last_frame_age_s=live.last_frame_age_s() if live else None,
        )

    def _send_health(self, fps: float) -> None:
        h = self.health(fps)
        self.publisher.send(self._health_topic, health_event(self.ctx, self._health_seq, time.time(), h))
        self._health_seq += 1
        logger.info(
            "health source=%s state=%s frames=%d fps=%.1f dropped=%d errors=%d skipped=%d reconnects=%d",
            self.ctx.source,
            h.state,
            h.frames,
            h.fps,
            h.dropped,
            h.errors,
            h.skipped,
            h.reconnects,
        )
