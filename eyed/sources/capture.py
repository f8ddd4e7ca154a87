"""Cameras and video files through OpenCV (FFmpeg or V4L2): one class for webcam, RTSP and file sources.

A live source (webcam, RTSP) runs a capture thread that keeps only the newest frame and counts the ones it had
to overwrite. Opening and reading have timeouts; an open or a read that hangs anyway is abandoned by a watchdog
that starts a fresh capture. A lost camera is retried with exponential backoff and jitter, for ever: the daemon
never exits because a camera went away. A file source delivers every frame in order, paced to ``source.fps``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import cv2
import numpy as np

from eyed.config import SourceConfig
from eyed.sources.base import Pacer, SourceError, to_rgb
from eyed.types import Frame

logger = logging.getLogger(__name__)

# How much longer than open_timeout_s / read_timeout_s an open or a read may take before the watchdog gives up on
# it and starts a fresh capture.
HUNG_GRACE_S = 2.0
# How long leaving a source waits for its capture threads. They are daemon threads: one blocked in a driver call
# is abandoned rather than holding up a shutdown that systemd bounds (TimeoutStopSec).
EXIT_JOIN_S = 2.0
# Threads still blocked in a driver call the watchdog gave up on, beyond which it starts no more: a camera whose
# every open hangs would otherwise cost one stuck thread per open_timeout_s, for ever.
MAX_ABANDONED = 4
# Failed reads in a row after which a video file whose length is unknown (or was misreported) is taken to have
# ended. FFmpeg fails a read on a frame it cannot decode and goes on with the next one, so a single failure is
# a corrupt frame, not the end; at the end every read fails at once, so these cost next to nothing.
FILE_END_FAILURES = 30
# Frozen-frame detection compares single grey pixels on a grid of about this many columns and rows. Not an
# averaged thumbnail: averaging wipes out the sensor noise that tells a still scene from a repeated picture.
FREEZE_GRID = (64, 48)


class EnvLease:
    """Holds an environment variable at one value while the calls that need it run.

    OpenCV reads FFmpeg's options from the environment early in an open, and there is no telling when. Holding
    a lock across the whole open would let one hung open block every other, including the capture that replaces
    it; instead any number of opens needing the same value share the lease, and only an open needing another
    value waits for them to finish (one daemon runs one source, so that wait does not arise there). The lock
    itself is held only while the variable is read or written.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._cond = threading.Condition()
        self._holders = 0
        self._value: str | None = None
        self._previous: str | None = None

    @contextlib.contextmanager
    def holding(self, value: str) -> Iterator[None]:
        """The variable is ``value`` inside; the value it had before comes back once the last holder leaves."""
        with self._cond:
            self._cond.wait_for(lambda: self._holders == 0 or self._value == value)
            if self._holders == 0:
                self._previous, self._value = os.environ.get(self.name), value
                os.environ[self.name] = value
            self._holders += 1
        try:
            yield
        finally:
            with self._cond:
                self._holders -= 1
                if self._holders == 0:
                    self._restore()
                    self._cond.notify_all()

    def _restore(self) -> None:
        if self._previous is None:
            os.environ.pop(self.name, None)
        else:
            os.environ[self.name] = self._previous
        self._value = None


_ffmpeg_options = EnvLease("OPENCV_FFMPEG_CAPTURE_OPTIONS")
V4L_SELECT_TIMEOUT = "OPENCV_VIDEOIO_V4L_SELECT_TIMEOUT"


class Backoff:
    """Exponential delays with full jitter: initial, 2x, 4x, ... capped at ``maximum``."""

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None) -> None:
        self.initial, self.maximum = initial, maximum
        self.attempt = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        # 2**1024 overflows a float (6 h of an unplugged camera); 2**64 times any initial delay is past any cap.
        cap = min(self.maximum, self.initial * 2.0 ** min(self.attempt, 64))
        if cap < self.maximum:  # past the cap, the count has nothing left to say
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
        # No open parameters: in OpenCV 5, V4L2 is a legacy backend that refuses every one, and the capture comes
        # back unopened. Its reads give up after OPENCV_VIDEOIO_V4L_SELECT_TIMEOUT instead (see open_capture).
        return webcam_target(cfg.device), cv2.CAP_V4L2, [], props
    assert cfg.url is not None
    timeouts = [
        cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
        int(cfg.open_timeout_s * 1000),
        cv2.CAP_PROP_READ_TIMEOUT_MSEC,
        int(cfg.read_timeout_s * 1000),
    ]
    return cfg.url, cv2.CAP_FFMPEG, timeouts, {}


def open_capture(cfg: SourceConfig) -> Any:
    """A cv2.VideoCapture for ``cfg`` (check ``isOpened()``); never blocks past ``open_timeout_s`` for RTSP."""
    target, api, params, props = capture_args(cfg)
    if cfg.kind == "webcam":
        # V4L2's own read timeout (10 s unless set; OpenCV reads it once, at the first open): read_timeout_s, so
        # a camera that stops sending fails its read before the watchdog (read_timeout_s + HUNG_GRACE_S) has to
        # abandon it. A value the user exported stands.
        os.environ.setdefault(V4L_SELECT_TIMEOUT, str(math.ceil(cfg.read_timeout_s)))
    # Only RTSP needs the options: FFmpeg's file demuxers ignore an RTSP option, and V4L2 never reads them.
    if cfg.kind == "rtsp":
        with _ffmpeg_options.holding(f"rtsp_transport;{cfg.transport}"):
            cap = cv2.VideoCapture(target, api, params)
    else:
        cap = cv2.VideoCapture(target, api, params)
    for prop, value in props.items():
        cap.set(prop, value)
    return cap


def freeze_sample(image: np.ndarray) -> np.ndarray:
    """Grey values of single pixels on a grid over the full frame (about 64x48 of them; cheap, no averaging)."""
    height, width = image.shape[:2]
    step_y, step_x = max(1, height // FREEZE_GRID[1]), max(1, width // FREEZE_GRID[0])
    grid = np.ascontiguousarray(image[step_y // 2 :: step_y, step_x // 2 :: step_x])
    return cv2.cvtColor(grid, cv2.COLOR_RGB2GRAY)


@dataclass(frozen=True)
class Busy:
    """A blocking driver call in progress: what it is and when the watchdog gives up on it."""

    what: str
    started: float
    deadline: float


class Generation:
    """One capture thread's identity, and the driver call it is blocked in, for the watchdog.

    Each capture thread has its own, so a thread the watchdog abandoned can only ever clear its own record, never
    the one of the thread that replaced it.
    """

    def __init__(self, number: int) -> None:
        self.number = number
        self.busy: Busy | None = None

    @contextlib.contextmanager
    def blocking(self, what: str, timeout_s: float) -> Iterator[None]:
        """Marks a driver call (``what``: open or read) that should return within ``timeout_s``."""
        now = time.monotonic()
        self.busy = Busy(what, now, now + timeout_s + HUNG_GRACE_S)
        try:
            yield
        finally:
            self.busy = None


def frozen_pair(previous: np.ndarray | None, sample: np.ndarray, freeze_diff: float) -> bool:
    """Whether two consecutive :func:`freeze_sample` results differ by less than ``freeze_diff`` on average."""
    if previous is None or previous.shape != sample.shape:
        return False
    return float(cv2.absdiff(sample, previous).mean()) < freeze_diff


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
        self._gen = Generation(0)  # the current capture thread's; number 0 has no thread
        # One for every capture thread, the watchdog's replacements included: a camera that keeps hanging is
        # retried ever more slowly, as one that keeps failing is.
        self._backoff = Backoff(cfg.reconnect_initial_s, cfg.reconnect_max_s)
        self._at_cap = False  # MAX_ABANDONED reached (logged once)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- lifecycle --------------------------------------------------------------------------------------------
    def __enter__(self) -> CaptureSource:
        if self.cfg.kind == "file":
            if not os.path.isfile(str(self.cfg.url)):
                raise SourceError(f"source.url {self.cfg.url}: no such file")
            # Opened once here too, so a file that is not a video fails at start-up (exit 69), not later as a
            # pipeline failure.
            cap = self._open(self.cfg)
            readable = cap.isOpened()
            cap.release()
            if not readable:
                raise SourceError(f"source.url {self.cfg.url}: OpenCV cannot read this file")
        if self.live:
            self._start_capture()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        deadline = time.monotonic() + EXIT_JOIN_S
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                logger.warning("source %s: abandoning %s, still blocked in the camera driver", self.id, t.name)

    def _start_capture(self, delay_s: float = 0.0) -> None:
        gen = Generation(self._gen.number + 1)
        self._gen = gen
        t = threading.Thread(
            target=self._capture, args=(gen, delay_s), name=f"eyed-capture-{self.id}-{gen.number}", daemon=True
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
    def _capture(self, gen: Generation, delay_s: float) -> None:
        backoff = self._backoff
        if delay_s > 0:
            self._stop.wait(delay_s)
        first = True
        while self._current(gen):
            if not first:
                self.reconnects += 1
            first = False
            try:
                self._connect_and_read(gen, backoff)
            except Exception:
                # Whatever a driver or a conversion throws, only stop may end the retries: a thread that died
                # here would leave the source offline for ever.
                logger.exception("source %s: capture failed unexpectedly", self.id)
            if not self._current(gen):
                break
            self._set_state("offline")
            delay = backoff.next()
            logger.warning("source %s: offline; retrying in %.1f s", self.id, delay)
            self._stop.wait(delay)

    def _connect_and_read(self, gen: Generation, backoff: Backoff) -> None:
        self._set_state("connecting")
        cap = self._open_timed(gen)
        if cap is None:
            return
        try:
            if cap.isOpened():
                self._read_loop(cap, gen, backoff)
        finally:
            cap.release()

    def _current(self, gen: Generation) -> bool:
        return not self._stop.is_set() and gen is self._gen

    def _open_timed(self, gen: Generation) -> Any:
        try:
            with gen.blocking("open", self.cfg.open_timeout_s):
                return self._open(self.cfg)
        except Exception as exc:  # an OpenCV build without the backend, a bad device path
            logger.warning("source %s: cannot open: %s", self.id, exc)
            return None

    def _read_loop(self, cap: Any, gen: Generation, backoff: Backoff) -> None:
        previous: np.ndarray | None = None
        while self._current(gen):
            try:
                with gen.blocking("read", self.cfg.read_timeout_s):
                    ok, image = cap.read()
            except cv2.error as exc:  # a driver assertion (V4L2 has some): as good as a lost stream
                logger.warning("source %s: read failed: %s", self.id, exc)
                return
            if not self._current(gen):
                return
            if not ok or image is None:
                logger.warning("source %s: read failed (stream lost or read_timeout_s)", self.id)
                return
            rgb = self._convert(image)
            if rgb is None:
                continue
            now = time.monotonic()
            if self.cfg.freeze_diff > 0:
                sample = freeze_sample(rgb)
                if frozen_pair(previous, sample, self.cfg.freeze_diff):
                    self._frozen_since = self._frozen_since or now
                else:
                    self._frozen_since = None
                previous = sample
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
        self._check_hung()
        with self._cond:
            if self._latest is None:
                self._cond.wait(timeout_s)
            frame, self._latest = self._latest, None
        return frame

    def _check_hung(self) -> None:
        gen = self._gen
        busy = gen.busy
        now = time.monotonic()
        if busy is None or now < busy.deadline or not self._current(gen):
            return
        # cv2 cannot interrupt a blocked open or read: abandon that thread (it exits when the call returns) and
        # start a fresh capture, after the same backoff as any other failed attempt.
        abandoned = sum(t.is_alive() for t in self._threads[:-1])  # the last one is the current thread's
        if abandoned >= MAX_ABANDONED:
            if not self._at_cap:
                logger.error(
                    "source %s: %d capture threads are still blocked in the camera driver; no new one until one "
                    "returns",
                    self.id,
                    abandoned,
                )
                self._at_cap = True
            return
        self._at_cap = False
        delay = self._backoff.next()
        logger.error(
            "source %s: %s hung for %.0f s; recreating the capture in %.1f s",
            self.id,
            busy.what,
            now - busy.started,
            delay,
        )
        self.reconnects += 1
        self._set_state("offline")
        self._start_capture(delay)

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
                for image in self._file_images(cap):
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

    def _file_images(self, cap: Any) -> Iterator[np.ndarray]:
        """One pass over an opened video file: every frame FFmpeg can decode; the others are skipped and counted."""
        count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
        failed = 0  # reads failed in a row: corrupt frames if a good one follows, else the end of the file
        while failed < FILE_END_FAILURES:
            ok, image = cap.read()
            if ok and image is not None:
                if failed:
                    self.skipped += failed
                    logger.warning("source %s: skipped %d undecodable frame(s)", self.id, failed)
                failed = 0
                yield image
            elif count > 0 and cap.get(cv2.CAP_PROP_POS_FRAMES) >= count:
                return
            else:
                failed += 1
