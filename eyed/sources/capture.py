"""Cameras and video files through OpenCV (FFmpeg or V4L2): one class for webcam, RTSP and file sources.

A live source (webcam, RTSP) runs a capture thread that keeps only the newest frame and counts the ones it had
to overwrite; with ``source.fps`` set it passes on at most that many frames a second, and with ``source.limit``
it finishes after that many. Opening and reading have timeouts; an open or a read that hangs anyway is abandoned
by a watchdog that starts a fresh capture. A lost camera is retried with exponential backoff and jitter, for
ever: the daemon never exits because a camera went away. A file source delivers every frame in order, paced to
``source.fps``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import cv2
import numpy as np

from eyed.config import SourceConfig, redact_url
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
# Failed reads in a row after which a video file whose length is unknown, or that has gone past the length it
# states, is taken to have ended. FFmpeg fails a read on a frame it cannot decode and goes on with the next one,
# so a single failure is a corrupt frame, not the end; at the end every read fails at once (about a microsecond
# each), so these cost next to nothing.
FILE_END_FAILURES = 30
# Within the length a file states, a run of failed reads is corrupt frames however long it is, up to this many:
# a bound only for a stated length that is absurdly wrong (100,000 failed reads at the real end take ~0.1 s).
FILE_MAX_CORRUPT_RUN = 100_000
# A camera's frame this much of a period early still falls due (source.fps): a camera sending at just that rate
# jitters around its slots, and a frame a little early must not wait for the next one.
EARLY_FRACTION = 0.25
# A connection starts the reconnect backoff over once it has given frames, with no gap of source.stall_s between
# them, for stall_s and at least this long: live by the measure the state uses, for long enough that it was a
# working stream. A camera that takes a session and closes it after a frame or a few (an NVR over its client limit,
# an encoder that keeps crashing) is retried ever more slowly, as one that refuses the connection is, instead of
# every reconnect_initial_s for ever.
SETTLED_MIN_S = 5.0
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

    def outside(self) -> str | None:
        """The variable's value outside any lease: the one it has now, or had before the first holder came."""
        with self._cond:
            return self._previous if self._holders else os.environ.get(self.name)

    def _restore(self) -> None:
        if self._previous is None:
            os.environ.pop(self.name, None)
        else:
            os.environ[self.name] = self._previous
        self._value = None


_ffmpeg_options = EnvLease("OPENCV_FFMPEG_CAPTURE_OPTIONS")
V4L_SELECT_TIMEOUT = "OPENCV_VIDEOIO_V4L_SELECT_TIMEOUT"


def ffmpeg_options(user: str | None, transport: str) -> str:
    """OPENCV_FFMPEG_CAPTURE_OPTIONS for an RTSP open: the options the user exported (``key;value|key;value``),
    with ``rtsp_transport`` set to ``source.transport``."""
    kept = [item for item in (user or "").split("|") if item and item.split(";", 1)[0].strip() != "rtsp_transport"]
    return "|".join([*kept, f"rtsp_transport;{transport}"])


class Throttle:
    """Lets a camera's frames through at most ``fps`` times a second (0: every one), without ever waiting.

    Unlike a :class:`~eyed.sources.base.Pacer` it never sleeps: a camera's frames must not queue up behind a
    sleep, or the one taken would be old. The capture reads on and takes the first frame that falls due.
    """

    def __init__(self, fps: float) -> None:
        self.period = 1.0 / fps if fps > 0 else 0.0
        self._next = -math.inf

    def due(self, now: float) -> bool:
        """Whether a frame that arrived at ``now`` (monotonic) is to be taken; if so, the next slot is set."""
        if not self.period:
            return True
        if now < self._next - self.period * EARLY_FRACTION:
            return False
        # From the slot, not from now, so a camera that sends 15 frames a second still gives 10 at fps 10; but a
        # frame more than a period late starts a new schedule rather than a burst.
        late = now - self._next
        self._next = self._next + self.period if late < self.period else now + self.period
        return True


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


def read_timeout_ms(cfg: SourceConfig) -> int:
    """``source.read_timeout_s`` as FFmpeg is given it."""
    return int(cfg.read_timeout_s * 1000)


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
        read_timeout_ms(cfg),
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
    # Only RTSP needs the options: FFmpeg's file demuxers ignore an RTSP option, and V4L2 never reads them. The
    # user's own (low-latency flags, buffer sizes) stay; only the transport is source.transport's.
    if cfg.kind == "rtsp":
        with _ffmpeg_options.holding(ffmpeg_options(_ffmpeg_options.outside(), cfg.transport)):
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
        # source.url as messages show it: a camera's URL often holds a password or a token, and an error message
        # goes to the journal at every restart.
        self.shown_url = redact_url(str(cfg.url))
        self.skipped = 0  # frames that could not be converted (zero-size, unsupported layout)
        self.dropped = 0  # frames replaced by a newer one while the pipeline was taking frames
        self.reconnects = 0  # times the camera came back: a new connection's first frame, after an earlier one's
        self.reconnect_attempts = 0  # opens tried after the first, whether they came to anything or not
        self._open = opener
        self._state = "connecting"
        self._cond = threading.Condition()
        self._latest: Frame | None = None
        self._index = 0
        self._taken = 0  # frames next_frame handed out, for source.limit
        # Set at the first next_frame: till then (the daemon waiting for subscribers) no frame is converted or
        # handed over, so none can be counted as dropped or be old by the time the pipeline takes it.
        self._consuming = False
        self._was_live = False  # some connection has given a frame: the next one to do so is a reconnection
        self._settle_s = max(cfg.stall_s, SETTLED_MIN_S)  # live this long, a connection resets the backoff
        self._last_frame_t: float | None = None
        self._frozen_since: float | None = None
        self._gen = Generation(0)  # the current capture thread's; number 0 has no thread
        # One for every capture thread, the watchdog's replacements included: a camera that keeps hanging is
        # retried ever more slowly, as one that keeps failing is. Reset by a connection that settled.
        self._backoff = Backoff(cfg.reconnect_initial_s, cfg.reconnect_max_s)
        self._at_cap = False  # MAX_ABANDONED reached (logged once)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- lifecycle --------------------------------------------------------------------------------------------
    def __enter__(self) -> CaptureSource:
        if self.cfg.kind == "file":
            if not os.path.isfile(str(self.cfg.url)):
                raise SourceError(f"source.url {self.shown_url}: no such file")
            # Opened once here too, so a file that is not a video fails at start-up (exit 69), not later as a
            # pipeline failure.
            cap = self._open(self.cfg)
            readable = cap.isOpened()
            cap.release()
            if not readable:
                raise SourceError(f"source.url {self.shown_url}: OpenCV cannot read this file")
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
        # Finished is for good: a capture thread still on its way out must not make it live or offline again.
        if state != self._state and self._state != "finished":
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
                self.reconnect_attempts += 1
            first = False
            try:
                self._connect_and_read(gen, backoff)
            except Exception as exc:
                # Whatever a driver or a conversion throws, only stop may end the retries: a thread that died
                # here would leave the source offline for ever. Its traceback is logged redacted, as a driver's
                # message may quote the URL.
                trace = redact_url("".join(traceback.format_exception(exc))).rstrip()
                logger.error("source %s: capture failed unexpectedly\n%s", self.id, trace)
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
            logger.warning("source %s: cannot open: %s", self.id, redact_url(str(exc)))  # it may quote the URL
            return None

    def _read_loop(self, cap: Any, gen: Generation, backoff: Backoff) -> None:
        """One connection's frames, until it is lost or the source stops: each one the pipeline takes and that
        falls due (``source.fps``) is turned into a picture and handed over; the others are only grabbed."""
        throttle = Throttle(self.cfg.fps)
        previous: np.ndarray | None = None
        last: float | None = None  # this connection's last frame
        live_since = 0.0  # since when its frames have come with no gap of stall_s
        settled = False
        while self._grab(cap, gen):
            now = time.monotonic()
            if last is None:
                self._connected()
            if last is None or now - last > self.cfg.stall_s:
                live_since = now
            last = now
            if not settled and now - live_since >= self._settle_s:
                settled = True
                self._settled(backoff, now - live_since)
            self._last_frame_t = now  # a frame passed over below is still news from the camera
            if not (self._consuming and throttle.due(now)):
                continue  # grabbed only, never converted to a picture: the work a lower source.fps saves
            image = self._retrieve(cap)
            if image is None:
                return
            rgb = self._convert(image)
            if rgb is None:
                continue
            previous = self._watch_freeze(previous, rgb, now)
            self._hand_over(rgb)

    def _grab(self, cap: Any, gen: Generation) -> bool:
        """The camera's next frame, not yet a picture; False once the connection is lost or no longer ours."""
        started = time.monotonic()
        try:
            with gen.blocking("read", self.cfg.read_timeout_s):
                ok = cap.grab()
        except cv2.error as exc:  # a driver assertion (V4L2 has some): as good as a lost stream
            if self._current(gen):
                logger.warning("source %s: read failed: %s", self.id, redact_url(str(exc)))
            return False
        if not self._current(gen):
            return False
        if not ok:
            logger.warning("source %s: read failed (stream lost or read_timeout_s)", self.id)
            return False
        if self._timed_out(time.monotonic() - started):
            logger.warning(
                "source %s: no new frame within source.read_timeout_s (%g s); reconnecting",
                self.id,
                self.cfg.read_timeout_s,
            )
            return False
        return True

    def _timed_out(self, took_s: float) -> bool:
        """Whether FFmpeg's read timeout cut a read of ``took_s`` short.

        Such a read still succeeds: the interrupt flushes FFmpeg's decoder, which gives back the frames it held
        (one per timeout with 2 decoder threads, about 7 with 8), all from before the silence. They are stale,
        so the connection is dropped rather than read on. V4L2's timeout fails the read instead, and a webcam's
        frame that took long is a fresh one.
        """
        return self.cfg.kind == "rtsp" and took_s * 1000 >= read_timeout_ms(self.cfg)

    def _retrieve(self, cap: Any) -> np.ndarray | None:
        """The grabbed frame as a picture; None if the driver cannot give it (as good as a lost stream)."""
        try:
            ok, image = cap.retrieve()
        except cv2.error as exc:
            logger.warning("source %s: read failed: %s", self.id, redact_url(str(exc)))
            return None
        if not ok or image is None:
            logger.warning("source %s: read failed (no picture for the frame read)", self.id)
            return None
        return image

    def _connected(self) -> None:
        """A connection's first frame: the camera is live, and back if an earlier connection was. The backoff is
        left as it is until the connection has settled: one frame says little about a stream."""
        if self._was_live:
            self.reconnects += 1
            logger.info("source %s: reconnected (%d attempts to reconnect so far)", self.id, self.reconnect_attempts)
        self._was_live = True
        self._set_state("live")

    def _settled(self, backoff: Backoff, live_s: float) -> None:
        """The connection has been live for ``live_s`` (at least the settle time): the next reconnect, if any, is
        tried after the initial delay again."""
        if backoff.attempt:
            logger.info("source %s: live for %.0f s; the reconnect backoff starts over", self.id, live_s)
        backoff.reset()

    def _watch_freeze(self, previous: np.ndarray | None, rgb: np.ndarray, now: float) -> np.ndarray | None:
        """Notes since when the picture is frozen; returns what the next frame is to be compared with."""
        if self.cfg.freeze_diff <= 0:
            return None
        sample = freeze_sample(rgb)
        if frozen_pair(previous, sample, self.cfg.freeze_diff):
            self._frozen_since = self._frozen_since or now
        else:
            self._frozen_since = None
        return sample

    def _convert(self, image: np.ndarray) -> np.ndarray | None:
        if image.size == 0 or image.ndim not in (2, 3):
            self.skipped += 1
            return None
        try:
            return to_rgb(image)
        except cv2.error:
            self.skipped += 1
            return None

    def _hand_over(self, rgb: np.ndarray) -> None:
        frame = Frame(rgb, self._index, time.time(), time.perf_counter())
        self._index += 1
        with self._cond:
            if self._state == "finished":
                return
            if self._latest is not None:
                self.dropped += 1  # the pipeline never saw it: a newer frame replaces it
            self._latest = frame
            self._cond.notify()

    # -- live: the inference thread's side --------------------------------------------------------------------
    def next_frame(self, timeout_s: float) -> Frame | None:
        """The newest frame not yet handed out, waiting up to ``timeout_s``; None if there is none. After
        ``source.limit`` frames the state is ``finished`` and there are no more."""
        self._check_hung()
        with self._cond:
            if self._state == "finished":
                return None
            self._consuming = True
            if self._latest is None:
                self._cond.wait(timeout_s)
            frame, self._latest = self._latest, None
            if frame is not None:
                self._taken += 1
                if self.cfg.limit and self._taken >= self.cfg.limit:
                    self._finish()
        return frame

    def _finish(self) -> None:
        """``source.limit`` reached: finished, as a replay is at its end; the capture thread leaves."""
        self._set_state("finished")
        self._stop.set()
        logger.info("source %s: source.limit of %d frames reached", self.id, self.cfg.limit)

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
        self.reconnect_attempts += 1
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
                raise SourceError(f"source.url {self.shown_url}: OpenCV cannot read this file")
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
        stated = cap.get(cv2.CAP_PROP_FRAME_COUNT)
        count = int(stated) if math.isfinite(stated) else 0  # the length the file states; 0 or less if unknown
        position = 0  # frames read this pass, good or not: FFmpeg moves on by one frame with every read
        failed = 0  # reads failed in a row: corrupt frames if a good one follows, else perhaps the end
        while not self._file_ended(count, position, failed):
            ok, image = cap.read()
            position += 1
            if ok and image is not None:
                if failed:
                    self._skip_undecodable(failed)
                failed = 0
                yield image
            else:
                failed += 1
        # A pass that ends short of the stated length ended on frames that could not be decoded: those count.
        within = min(failed, count - (position - failed)) if count > 0 else 0
        if within > 0:
            self._skip_undecodable(within, at_end=True)

    @staticmethod
    def _file_ended(count: int, position: int, failed: int) -> bool:
        """Whether ``failed`` reads in a row at ``position`` mean the end of a file stating ``count`` frames.

        The position is counted here: POS_FRAMES counts only the frames decoded, so a failed read leaves it be.
        """
        if count > 0 and position < count:
            return failed >= FILE_MAX_CORRUPT_RUN
        return failed >= FILE_END_FAILURES

    def _skip_undecodable(self, frames: int, at_end: bool = False) -> None:
        self.skipped += frames
        where = " at the end of the file" if at_end else ""
        logger.warning("source %s: skipped %d undecodable frame(s)%s", self.id, frames, where)
