"""Cameras and video files through OpenCV (FFmpeg or V4L2): one class for webcam, RTSP and file sources.

A live source (webcam, RTSP) runs a capture thread that keeps only the newest frame and counts the ones it had
to overwrite. Opening and reading have timeouts; a read that hangs anyway is abandoned by a watchdog that starts
a fresh capture. A lost camera is retried with exponential backoff and jitter, for ever: the daemon never exits
because a camera went away. A file source delivers every frame in order, paced to ``source.fps``.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import cv2
import numpy as np

from eyed.config import SourceConfig
from eyed.sources.base import Pacer, SourceError, to_rgb
from eyed.types import Frame

logger = logging.getLogger(__name__)

# OpenCV reads FFmpeg options from this environment variable when a capture opens; the lock keeps two sources
# from opening with each other's options.
_FFMPEG_OPTIONS = "OPENCV_FFMPEG_CAPTURE_OPTIONS"
_open_lock = threading.Lock()
# How much longer than read_timeout_s a read may take before the watchdog gives up on it.
HUNG_READ_GRACE_S = 2.0


class Backoff:
    """Exponential delays with full jitter: initial, 2x, 4x, ... capped at ``maximum``."""

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None) -> None:
        self.initial, self.maximum = initial, maximum
        self.attempt = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        cap = min(self.maximum, self.initial * 2**self.attempt)
        self.attempt += 1
        # Half fixed, half random: spreads reconnect storms without ever retrying at once.
        return cap / 2 + self._rng.uniform(0, cap / 2)

    def reset(self) -> None:
        self.attempt = 0


def webcam_target(device: int | str) -> int | str:
    """A V4L2 index for ``0`` / ``"0"``, or the device path as given (``/dev/video2``)."""
    if isinstance(device, int):
        return device
    text = str(device).strip()
    return int(text) if text.isdigit() else text


def capture_args(cfg: SourceConfig) -> tuple[int | str, int, list[int], dict[int, float]]:
    """What to hand cv2.VideoCapture: (target, backend API, open parameters, properties to set after opening)."""
    timeouts = [
        cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
        int(cfg.open_timeout_s * 1000),
        cv2.CAP_PROP_READ_TIMEOUT_MSEC,
        int(cfg.read_timeout_s * 1000),
    ]
    if cfg.kind == "webcam":
        assert cfg.device is not None
        props: dict[int, float] = {}
        if cfg.width:
            props[cv2.CAP_PROP_FRAME_WIDTH] = cfg.width
        if cfg.height:
            props[cv2.CAP_PROP_FRAME_HEIGHT] = cfg.height
        if cfg.fps:
            props[cv2.CAP_PROP_FPS] = cfg.fps
        # A small driver queue: with the default of 4 buffers the "newest" frame can be 4 frames old.
        props[cv2.CAP_PROP_BUFFERSIZE] = 1
        return webcam_target(cfg.device), cv2.CAP_V4L2, timeouts, props
    assert cfg.url is not None
    return cfg.url, cv2.CAP_FFMPEG, timeouts, {}


def open_capture(cfg: SourceConfig) -> Any:
    """A cv2.VideoCapture for ``cfg`` (check ``isOpened()``); never blocks past ``open_timeout_s`` for RTSP."""
    target, api, params, props = capture_args(cfg)
    with _open_lock:
        previous = os.environ.get(_FFMPEG_OPTIONS)
        if cfg.kind == "rtsp":
            os.environ[_FFMPEG_OPTIONS] = f"rtsp_transport;{cfg.transport}"
        try:
            cap = cv2.VideoCapture(target, api, params)
        finally:
            if cfg.kind == "rtsp":
                if previous is None:
                    os.environ.pop(_FFMPEG_OPTIONS, None)
                else:
                    os.environ[_FFMPEG_OPTIONS] = previous
    for prop, value in props.items():
        cap.set(prop, value)
    return cap


def _thumb(image: np.ndarray) -> np.ndarray:
    """A tiny grey copy for frozen-frame detection (cheap: 32x24 pixels)."""
    return cv2.resize(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), (32, 24), interpolation=cv2.INTER_AREA)


class CaptureSource:
    """``source.kind`` webcam, rtsp or file. Live kinds: :meth:`next_frame`; file: :meth:`frames`."""

    def __init__(self, cfg: SourceConfig, opener: Any = open_capture) -> None:
        self.cfg = cfg
        self.id = cfg.resolved_id()
        self.live = cfg.kind != "file"
        self.skipped = 0  # frames that could not be converted (zero-size, unsupported layout)
        self.dropped = 0
        self.reconnects = 0
        self._open = opener
        self._state = "connecting"
        self._cond = threading.Condition()
        self._latest: Frame | None = None
        self._index = 0
        self._last_frame_t: float | None = None
        self._frozen_since: float | None = None
        self._read_started: float | None = None
        self._generation = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- lifecycle --------------------------------------------------------------------------------------------
    def __enter__(self) -> CaptureSource:
        if self.cfg.kind == "file" and not os.path.isfile(str(self.cfg.url)):
            raise SourceError(f"source.url {self.cfg.url}: no such file")
        if self.live:
            self._start_capture()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        deadline = time.monotonic() + self.cfg.read_timeout_s + 1
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def _start_capture(self) -> None:
        self._generation += 1
        t = threading.Thread(
            target=self._capture, args=(self._generation,), name=f"eyed-capture-{self.id}", daemon=True
        )
        self._threads = [t for t in self._threads if t.is_alive()] + [t]
        t.start()

    # -- state ------------------------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        """connecting | live | stalled | offline | finished"""
        state = self._state
        if state == "live":
            now = time.monotonic()
            no_frame = self._last_frame_t is None or now - self._last_frame_t > self.cfg.stall_s
            frozen = self._frozen_since is not None and now - self._frozen_since > self.cfg.stall_s
            if no_frame or frozen:
                return "stalled"
        return state

    def _set_state(self, state: str) -> None:
        if state != self._state:
            logger.info("source %s: %s -> %s", self.id, self._state, state)
            self._state = state

    def last_frame_age_s(self) -> float | None:
        return None if self._last_frame_t is None else time.monotonic() - self._last_frame_t

    # -- live: capture thread ---------------------------------------------------------------------------------
    def _capture(self, generation: int) -> None:
        backoff = Backoff(self.cfg.reconnect_initial_s, self.cfg.reconnect_max_s)
        first = True
        while self._current(generation):
            if not first:
                self.reconnects += 1
            first = False
            self._set_state("connecting")
            try:
                cap = self._open(self.cfg)
            except Exception as exc:  # an OpenCV build without the backend, a bad device path
                logger.warning("source %s: cannot open: %s", self.id, exc)
                cap = None
            if cap is not None and cap.isOpened():
                try:
                    self._read_loop(cap, generation, backoff)
                finally:
                    cap.release()
            elif cap is not None:
                cap.release()
            if not self._current(generation):
                break
            self._set_state("offline")
            delay = backoff.next()
            logger.warning("source %s: offline; retrying in %.1f s", self.id, delay)
            self._stop.wait(delay)

    def _current(self, generation: int) -> bool:
        return not self._stop.is_set() and generation == self._generation

    def _read_loop(self, cap: Any, generation: int, backoff: Backoff) -> None:
        previous: np.ndarray | None = None
        while self._current(generation):
            self._read_started = time.monotonic()
            ok, image = cap.read()
            self._read_started = None
            if not self._current(generation):
                return
            if not ok or image is None:
                logger.warning("source %s: read failed (stream lost or read_timeout_s)", self.id)
                return
            rgb = self._convert(image)
            if rgb is None:
                continue
            now = time.monotonic()
            if self.cfg.freeze_diff > 0:
                thumb = _thumb(rgb)
                if previous is not None and float(cv2.absdiff(thumb, previous).mean()) < self.cfg.freeze_diff:
                    self._frozen_since = self._frozen_since or now
                else:
                    self._frozen_since = None
                previous = thumb
            self._hand_over(rgb, now)
            backoff.reset()
            self._set_state("live")

    def _convert(self, image: np.ndarray) -> np.ndarray | None:
        if image.size == 0 or image.ndim not in (2, 3):
            self.skipped += 1
            return None
        try:
            return to_rgb(image)
        except cv2.error:
            self.skipped += 1
            return None

    def _hand_over(self, rgb: np.ndarray, now: float) -> None:
        frame = Frame(rgb, self._index, time.time(), time.perf_counter())
        self._index += 1
        with self._cond:
            if self._latest is not None:
                self.dropped += 1  # the pipeline never saw it: a newer frame replaces it
            self._latest = frame
            self._last_frame_t = now
            self._cond.notify()

    # -- live: the inference thread's side --------------------------------------------------------------------
    def next_frame(self, timeout_s: float) -> Frame | None:
        """The newest frame not yet handed out, waiting up to ``timeout_s``; None if there is none."""
        self._check_hung_read()
        with self._cond:
            if self._latest is None:
                self._cond.wait(timeout_s)
            frame, self._latest = self._latest, None
        return frame

    def _check_hung_read(self) -> None:
        started = self._read_started
        if started is not None and time.monotonic() - started > self.cfg.read_timeout_s + HUNG_READ_GRACE_S:
            # cv2 cannot interrupt a blocked read: abandon that thread (it exits when the read returns) and
            # start a fresh capture.
            logger.error("source %s: read hung for %.0f s; recreating the capture", self.id, time.monotonic() - started)
            self._read_started = None
            self.reconnects += 1
            self._set_state("connecting")
            self._start_capture()

    # -- file -------------------------------------------------------------------------------------------------
    def frames(self, stop: threading.Event | None = None) -> Iterator[Frame]:
        """Every frame of the video file in order, paced to ``source.fps``, looping if ``source.loop``."""
        pacer = Pacer(self.cfg.fps, stop)
        delivered = 0
        while True:
            cap = self._open(self.cfg)
            if not cap.isOpened():
                cap.release()
                raise SourceError(f"source.url {self.cfg.url}: OpenCV cannot read this file")
            produced = 0
            try:
                self._set_state("live")
                while True:
                    ok, image = cap.read()
                    if not ok or image is None:
                        break
                    rgb = self._convert(image)
                    if rgb is None:
                        continue
                    if not pacer.wait():
                        return
                    now = time.monotonic()
                    self._last_frame_t = now
                    yield Frame(rgb, delivered, time.time(), time.perf_counter())
                    delivered += 1
                    produced += 1
                    if self.cfg.limit and delivered >= self.cfg.limit:
                        return
            finally:
                cap.release()
            if not self.cfg.loop or produced == 0:
                self._set_state("finished")
                return
