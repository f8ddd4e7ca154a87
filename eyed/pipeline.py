"""Source -> inference thread -> publisher; live sources get a capture thread and a bounded queue in between.

The inference thread resizes frames into a buffer allocated once, classifies, turns predictions into events
and is the only user of the publisher. A live source (a camera) is read by its own capture thread, so a slow
camera never stalls the loop. A replay source is read by the inference thread itself: it is never late, it must
deliver every frame, and onnxruntime already keeps both cores of a small board busy, so a hand-off between
threads costs more than it saves (``eyed bench`` measured 0.83-0.89x of a bare onnxruntime loop with the hand-off,
0.96x without).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from eyed.events import EventContext, Health, health_event, health_topic, label_event, label_topic
from eyed.publisher import Publisher
from eyed.types import Classifier, Frame, Source

logger = logging.getLogger(__name__)

_END = None  # queued by the capture thread when the source is exhausted or failed


@dataclass
class Counters:
    """Written by the pipeline threads, read by anyone (ints and floats: atomic enough under the GIL)."""

    frames: int = 0
    errors: int = 0
    dropped: int = 0
    started: float = field(default_factory=time.monotonic)
    last_progress: float = field(default_factory=time.monotonic)  # last turn of the inference loop


class Pipeline:
    """Runs until the source ends or ``stop`` is set; ``join`` waits a bounded time."""

    def __init__(
        self,
        source: Source,
        classifier: Classifier,
        publisher: Publisher,
        *,
        batch: int = 1,
        queue_size: int = 4,
        heartbeat_s: float = 5.0,
        stop: threading.Event | None = None,
    ) -> None:
        self.source = source
        self.classifier = classifier
        self.publisher = publisher
        self.batch = batch
        self.heartbeat_s = heartbeat_s
        self.stop = stop or threading.Event()
        self.done = threading.Event()
        self.counters = Counters()
        self.state = "starting"
        self.failure: BaseException | None = None
        self.ctx = EventContext(source=source.id, model=classifier.name, backend=classifier.backend)
        self._queue: queue.Queue[Frame | None] = queue.Queue(max(queue_size, batch))
        self._inline: Iterator[Frame] | None = None if source.live else iter(source.frames())
        self._buffer = np.empty((batch, *classifier.input_shape), dtype=np.uint8)
        self._label_topic = label_topic(source.id)
        self._health_topic = health_topic(source.id)
        self._seq = 0
        self._health_seq = 0
        self._threads = [threading.Thread(target=self._infer, name="eyed-infer", daemon=True)]
        if source.live:
            self._threads.append(threading.Thread(target=self._capture, name="eyed-capture", daemon=True))

    def start(self) -> None:
        self.counters.started = self.counters.last_progress = time.monotonic()
        for t in self._threads:
            t.start()

    def join(self, timeout_s: float) -> bool:
        """Wait for the pipeline's threads; False if any is still running after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    # -- capture thread ------------------------------------------------------------------------------------
    def _put(self, item: Frame | None) -> bool:
        while not self.stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _capture(self) -> None:
        try:
            for frame in self.source.frames():
                if self.stop.is_set() or not self._put(frame):
                    break
        except BaseException as exc:  # reported by the inference thread and the daemon
            self.failure = exc
            logger.exception("source %s failed", self.source.id)
        finally:
            # Always wake the inference thread, even when stopping.
            with contextlib.suppress(queue.Full):
                self._queue.put(_END, timeout=1.0)

    # -- inference thread ----------------------------------------------------------------------------------
    def _next_batch(self) -> tuple[list[Frame], bool]:
        """Up to ``batch`` frames (waiting for the first only); True once the source has ended."""
        if self._inline is not None:
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
        try:
            first = self._queue.get(timeout=0.1)
        except queue.Empty:
            return [], False
        if first is _END:
            return [], True
        items = [first]
        while len(items) < self.batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _END:
                return items, True
            items.append(item)
        return items, False

    def _infer(self) -> None:
        next_beat = time.monotonic()
        beat_frames, beat_t = 0, time.monotonic()
        self.state = "live"
        try:
            ended = False
            while not ended and not self.stop.is_set():
                items, ended = self._next_batch()
                if items:
                    self._classify(items)
                now = time.monotonic()
                # The loop came round: what systemd's watchdog is fed on (a hung inference stops it).
                self.counters.last_progress = now
                if now >= next_beat:
                    fps = (self.counters.frames - beat_frames) / max(now - beat_t, 1e-9)
                    beat_frames, beat_t = self.counters.frames, now
                    self._send_health(fps)
                    next_beat = now + self.heartbeat_s
            self.state = "failed" if self.failure is not None else ("finished" if ended else "stopped")
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
            self.publisher.send(self._label_topic, label_event(self.ctx, self._seq, frame, pred, latency_ms))
            self._seq += 1
        self.counters.frames += len(frames)

    def health(self, fps: float) -> Health:
        c = self.counters
        return Health(
            state=self.state,
            frames=c.frames,
            fps=fps,
            dropped=c.dropped,
            errors=c.errors,
            skipped=self.source.skipped,
            uptime_s=time.monotonic() - c.started,
        )

    def _send_health(self, fps: float) -> None:
        h = self.health(fps)
        self.publisher.send(self._health_topic, health_event(self.ctx, self._health_seq, time.time(), h))
        self._health_seq += 1
        logger.info(
            "health source=%s state=%s frames=%d fps=%.1f dropped=%d errors=%d skipped=%d",
            self.ctx.source,
            h.state,
            h.frames,
            h.fps,
            h.dropped,
            h.errors,
            h.skipped,
        )
