"""The OpenCV capture source: backoff, device arguments, odd frames, video files, dead webcams, hung drivers."""

from __future__ import annotations

import itertools
import logging
import os
import random
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from eyed.config import SourceConfig
from eyed.sources import SourceError, describe, no_frames
from eyed.sources.capture import (
    FILE_END_FAILURES,
    MAX_ABANDONED,
    Backoff,
    CaptureSource,
    EnvLease,
    Throttle,
    capture_args,
    ffmpeg_options,
    open_capture,
    webcam_target,
)
from eyed.types import Frame
from tests.conftest import synthetic_images


def write_video(path: Path, frames: list[np.ndarray], fps: float = 20.0) -> Path:
    """A real video file (MJPG in AVI) written with OpenCV."""
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), fps, (w, h))
    assert writer.isOpened()
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def test_backoff_doubles_up_to_the_cap_with_jitter() -> None:
    b = Backoff(0.5, 4.0, random.Random(1))
    delays = [b.next() for _ in range(7)]
    caps = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0]
    for d, cap in zip(delays, caps, strict=True):
        assert cap / 2 <= d <= cap
    b.reset()
    assert b.next() <= 0.5


@pytest.mark.parametrize("attempt", [1024, 10**6])
def test_backoff_after_hours_of_retrying_stays_at_the_cap(attempt: int) -> None:
    b = Backoff(0.5, 30.0, random.Random(2))
    b.attempt = attempt  # 1024 attempts: about 6 h of an unplugged camera at the defaults
    delays = [b.next() for _ in range(100)]
    assert all(15.0 <= d <= 30.0 for d in delays)


def test_backoff_stops_counting_at_the_cap() -> None:
    b = Backoff(0.5, 30.0, random.Random(3))
    for _ in range(5000):
        b.next()
    assert b.attempt <= 7  # 0.5 * 2**7 > 30: no count that could ever overflow


@pytest.mark.parametrize(("device", "target"), [(0, 0), ("2", 2), ("/dev/video3", "/dev/video3"), (" 1 ", 1)])
def test_webcam_target(device: int | str, target: int | str) -> None:
    assert webcam_target(device) == target


def test_webcam_capture_arguments() -> None:
    cfg = SourceConfig(kind="webcam", device="/dev/video1", width=640, height=480, fps=15, read_timeout_s=2)
    target, api, params, props = capture_args(cfg)
    assert target == "/dev/video1" and api == cv2.CAP_V4L2
    # V4L2 is a legacy backend in OpenCV 5: it refuses open parameters, and the capture comes back unopened.
    assert cv2.CAP_PROP_OPEN_TIMEOUT_MSEC not in params[::2] and cv2.CAP_PROP_READ_TIMEOUT_MSEC not in params[::2]
    assert props == {
        cv2.CAP_PROP_FRAME_WIDTH: 640,
        cv2.CAP_PROP_FRAME_HEIGHT: 480,
        cv2.CAP_PROP_FPS: 15,
        cv2.CAP_PROP_BUFFERSIZE: 1,
    }


def test_webcam_open_parameters_suit_a_legacy_backend(tmp_path: Path) -> None:
    """There is no /dev/video here: OpenCV's MJPEG reader, a legacy backend like V4L2, stands in for it."""
    video = write_video(tmp_path / "clip.avi", synthetic_images(3, size=32))
    _, _, params, _ = capture_args(SourceConfig(kind="webcam", device=0))
    cap = cv2.VideoCapture(str(video), cv2.CAP_OPENCV_MJPEG, params)
    try:
        assert cap.isOpened()
    finally:
        cap.release()


def test_rtsp_and_file_use_ffmpeg_with_timeouts() -> None:
    for cfg in (SourceConfig(kind="rtsp", url="rtsp://h/s"), SourceConfig(kind="file", url="/v.mp4")):
        target, api, params, props = capture_args(cfg)
        assert target == cfg.url and api == cv2.CAP_FFMPEG and props == {}
        assert cv2.CAP_PROP_READ_TIMEOUT_MSEC in params


def test_file_source_delivers_every_frame_in_order(tmp_path: Path) -> None:
    images = synthetic_images(12, seed=4, size=64)
    video = write_video(tmp_path / "clip.avi", images)
    with CaptureSource(SourceConfig(kind="file", url=str(video))) as src:
        frames = list(src.frames())
        assert src.state == "finished"
    assert [f.index for f in frames] == list(range(12))
    assert all(f.image.shape == (64, 64, 3) and f.image.dtype == np.uint8 for f in frames)
    # MJPG is lossy: compare the mean colour, which survives compression, in RGB order.
    for got, want in zip(frames, images, strict=True):
        assert np.abs(got.image.astype(float).mean((0, 1)) - want.astype(float).mean((0, 1))).max() < 6


def test_file_source_loops_and_limits(tmp_path: Path) -> None:
    video = write_video(tmp_path / "clip.avi", synthetic_images(5, size=32))
    with CaptureSource(SourceConfig(kind="file", url=str(video), loop=True, limit=13)) as src:
        assert len(list(src.frames())) == 13


def corrupt_one_jpeg(video: Path, index: int) -> None:
    """Zeroes the start of one frame's JPEG in an MJPG AVI, leaving the container intact."""
    data = bytearray(video.read_bytes())
    starts = [i for i in range(len(data) - 2) if data[i : i + 3] == b"\xff\xd8\xff"]
    data[starts[index] : starts[index] + 200] = bytes(200)
    video.write_bytes(bytes(data))


@pytest.fixture
def one_bad_frame(tmp_path: Path) -> tuple[Path, list[float]]:
    """A 30-frame MJPG video whose frame 10 cannot be decoded, and the grey level of every frame."""
    levels = [float(i * 8) for i in range(30)]
    video = write_video(tmp_path / "onebad.avi", [np.full((48, 64, 3), level, np.uint8) for level in levels])
    corrupt_one_jpeg(video, 10)
    return video, levels


def test_a_corrupt_frame_in_a_file_is_skipped_not_the_end(one_bad_frame: tuple[Path, list[float]]) -> None:
    video, levels = one_bad_frame
    with CaptureSource(SourceConfig(kind="file", url=str(video))) as src:
        frames = list(src.frames())
        assert src.state == "finished"
    assert src.skipped == 1
    got = [f.image.mean() for f in frames]
    assert got == pytest.approx(levels[:10] + levels[11:], abs=3)


def test_a_looped_file_with_a_corrupt_frame_plays_all_of_it(one_bad_frame: tuple[Path, list[float]]) -> None:
    video, levels = one_bad_frame
    with CaptureSource(SourceConfig(kind="file", url=str(video), loop=True, limit=2 * 29 + 3)) as src:
        got = [f.image.mean() for f in src.frames()]
    good = levels[:10] + levels[11:]
    assert got == pytest.approx(good + good + good[:3], abs=3)
    assert src.skipped == 2  # the third pass stopped before frame 10


def corrupt_jpegs(video: Path, indices: range) -> None:
    """Overwrites the whole JPEG of each frame in ``indices`` of an MJPG AVI with noise (no 0xFF byte, so no
    marker), leaving the AVI chunks around them intact."""
    data = bytearray(video.read_bytes())
    starts = [i for i in range(len(data) - 2) if data[i : i + 3] == b"\xff\xd8\xff"]
    rng = np.random.default_rng(0)
    for k in indices:
        end = data.index(b"\xff\xd9", starts[k]) + 2  # entropy-coded data escapes 0xFF: the first EOI is its end
        data[starts[k] : end] = rng.integers(0, 255, end - starts[k], dtype=np.uint8).tobytes()
    video.write_bytes(bytes(data))


def damaged_video(tmp_path: Path, bad: range) -> tuple[Path, list[float]]:
    """A 100-frame MJPG video whose frames in ``bad`` cannot be decoded, and the grey levels of the good ones."""
    levels = [float(i * 2) for i in range(100)]
    video = write_video(tmp_path / "damaged.avi", [np.full((48, 64, 3), level, np.uint8) for level in levels])
    corrupt_jpegs(video, bad)
    return video, [level for i, level in enumerate(levels) if i not in bad]


@pytest.mark.parametrize(
    "bad",
    [range(20, 20 + FILE_END_FAILURES + 5), range(90, 100)],
    ids=["a-run-longer-than-an-unknown-end", "the-last-frames"],
)
def test_corrupt_frames_within_a_files_length_are_skipped_and_counted(tmp_path: Path, bad: range) -> None:
    video, good = damaged_video(tmp_path, bad)
    with CaptureSource(SourceConfig(kind="file", url=str(video))) as src:
        got = [f.image.mean() for f in src.frames()]
        assert src.state == "finished"
    assert got == pytest.approx(good, abs=3)
    assert src.skipped == len(bad)


def test_a_looped_file_gets_past_a_long_corrupt_run(tmp_path: Path) -> None:
    video, good = damaged_video(tmp_path, range(20, 20 + FILE_END_FAILURES + 5))
    with CaptureSource(SourceConfig(kind="file", url=str(video), loop=True, limit=2 * len(good) + 3)) as src:
        got = [f.image.mean() for f in src.frames()]
    assert got == pytest.approx(good + good + good[:3], abs=3)


def test_a_file_that_is_not_a_video_fails_at_start(tmp_path: Path) -> None:
    garbage = tmp_path / "clip.mp4"
    garbage.write_bytes(b"this is not a video" * 100)
    with pytest.raises(SourceError, match="cannot read this file"):
        CaptureSource(SourceConfig(kind="file", url=str(garbage))).__enter__()


def test_missing_file_is_a_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such file"):
        CaptureSource(SourceConfig(kind="file", url=str(tmp_path / "none.mp4"))).__enter__()


# A camera's URL as users write them: a password, and a token in the query.
SECRET_URL = "rtsp://admin:hunter2@cam.local/live?token=s3cr3t"
SECRETS = ("hunter2", "s3cr3t")


def shows_no_secret(text: str) -> bool:
    return not any(secret in text for secret in SECRETS)


def test_file_errors_show_the_url_without_its_secrets(tmp_path: Path) -> None:
    """kind=file given a camera's URL by mistake: the error, printed to the journal at every restart, keeps the
    user name and host (what one checks) and hides the password and the token."""
    with pytest.raises(SourceError, match="no such file") as missing:
        CaptureSource(SourceConfig(kind="file", url=SECRET_URL)).__enter__()
    assert shows_no_secret(str(missing.value))
    assert "rtsp://admin:***@cam.local/live?token=***" in str(missing.value)
    # A file that is there but is not a video, whose path holds a secret item (as some cameras' URLs do).
    garbage = tmp_path / "password=hunter2" / "s.mp4"
    garbage.parent.mkdir()
    garbage.write_bytes(b"this is not a video" * 100)
    with pytest.raises(SourceError, match="cannot read this file") as unreadable:
        CaptureSource(SourceConfig(kind="file", url=str(garbage))).__enter__()
    assert shows_no_secret(str(unreadable.value)) and "password=***" in str(unreadable.value)
    # The file gone unreadable between the start and a pass: frames() opens it again.
    src = CaptureSource(SourceConfig(kind="file", url=SECRET_URL), opener=lambda _cfg: ClosedCapture())
    with pytest.raises(SourceError, match="cannot read this file") as later:
        next(iter(src.frames()))
    assert shows_no_secret(str(later.value))
    # What the offline commands say of a recorded source that gave no frames.
    assert shows_no_secret(describe(SourceConfig(kind="file", url=SECRET_URL)))
    assert shows_no_secret(str(no_frames(SourceConfig(kind="file", url=SECRET_URL))))


class QuotingCapture:
    """A driver binding whose failures quote the URL it was given, as a library's messages may."""

    def isOpened(self) -> bool:
        return True

    def grab(self) -> bool:
        raise RuntimeError(f"driver failed reading {SECRET_URL}")

    def release(self) -> None:
        pass


@pytest.mark.parametrize("failure", ["open", "read"])
def test_camera_log_lines_show_the_url_without_its_secrets(failure: str, caplog: pytest.LogCaptureFixture) -> None:
    def opener(cfg: SourceConfig) -> Any:
        if failure == "open":
            raise OSError(f"cannot open {cfg.url}")
        return QuotingCapture()

    cfg = SourceConfig(kind="rtsp", url=SECRET_URL, reconnect_initial_s=0.01, reconnect_max_s=0.02)
    with caplog.at_level(logging.DEBUG, logger="eyed.sources.capture"), CaptureSource(cfg, opener=opener) as src:
        assert retried_for(src, 2) >= 2
    quoted = "cannot open: cannot open" if failure == "open" else "capture failed unexpectedly"
    assert quoted in caplog.text
    assert "rtsp://admin:***@cam.local/live?token=***" in caplog.text  # the URL is still there to read
    assert shows_no_secret(caplog.text)


class FakeDriver:
    """What the capture source uses of cv2.VideoCapture, on top of a fake's ``read()``: ``grab()`` reads a frame
    and ``retrieve()`` gives it, as OpenCV's read() is a grab() and a retrieve()."""

    grabbed: tuple[bool, Any] = (False, None)

    def isOpened(self) -> bool:
        return True

    def read(self) -> tuple[bool, Any]:
        raise NotImplementedError

    def grab(self) -> bool:
        self.grabbed = self.read()
        return self.grabbed[0]

    def retrieve(self) -> tuple[bool, Any]:
        return self.grabbed

    def release(self) -> None:
        pass


class ScriptedCapture(FakeDriver):
    """Stands in for a camera driver that returns odd frames (which no real device here can produce), once
    ``go`` is set; then the stream is lost."""

    def __init__(self, frames: list[Any]) -> None:
        self.frames = list(frames)
        self.go = threading.Event()

    def read(self) -> tuple[bool, Any]:
        self.go.wait(5)
        if not self.frames:
            time.sleep(0.05)
            return False, None
        return True, self.frames.pop(0)


def taking_from(src: CaptureSource, camera: ScriptedCapture) -> None:
    """The pipeline starts taking frames, then the camera starts sending: none is passed over before."""
    assert src.next_frame(0) is None
    camera.go.set()


def test_odd_frames_are_converted_or_skipped() -> None:
    odd = [
        np.full((48, 64), 200, np.uint8),  # grey
        np.zeros((48, 64, 4), np.uint8),  # BGRA
        np.full((48, 64, 3), 40000, np.uint16),  # 16-bit
        np.zeros((0, 0, 3), np.uint8),  # zero-size read
        np.zeros((2, 2, 3), np.uint8),  # tiny
        np.zeros((2160, 3840, 3), np.uint8),  # 4K
        np.zeros((4, 4, 2), np.uint8),  # two channels: nothing we can show
    ]
    cfg = SourceConfig(kind="webcam", device=0, reconnect_initial_s=10, reconnect_max_s=10)
    camera = ScriptedCapture(odd)
    with CaptureSource(cfg, opener=lambda _cfg: camera) as src:
        taking_from(src, camera)
        got: list[Frame] = []
        deadline = time.monotonic() + 10
        # Until the camera has handed over every frame and the last one has been taken.
        while (camera.frames or src.skipped + len(got) + src.dropped < len(odd)) and time.monotonic() < deadline:
            frame = src.next_frame(0.2)
            if frame is not None:
                got.append(frame)
        assert src.skipped == 2
    # The capture thread may outrun us: every frame it replaced counts as dropped, none is lost silently.
    assert len(got) + src.dropped == 5
    assert all(f.image.ndim == 3 and f.image.shape[2] == 3 and f.image.dtype == np.uint8 for f in got)


def test_a_missing_webcam_is_retried_not_fatal() -> None:
    cfg = SourceConfig(
        kind="webcam", device="/dev/video99", open_timeout_s=1, reconnect_initial_s=0.05, reconnect_max_s=0.1
    )
    with CaptureSource(cfg) as src:
        deadline = time.monotonic() + 10
        while src.reconnect_attempts < 3 and time.monotonic() < deadline:
            assert src.next_frame(0.1) is None
        assert src.reconnect_attempts >= 3
        assert src.reconnects == 0  # never connected, so never back either
        assert src.state in ("offline", "connecting")


def test_latest_frame_only_counts_what_it_drops() -> None:
    camera = ScriptedCapture([np.full((8, 8, 3), i, np.uint8) for i in range(50)])
    cfg = SourceConfig(kind="webcam", device=0, reconnect_initial_s=10, reconnect_max_s=10)
    with CaptureSource(cfg, opener=lambda _cfg: camera) as src:
        taking_from(src, camera)
        time.sleep(0.5)  # the camera delivers 50 frames while the pipeline is busy
        frame = src.next_frame(1)
        assert frame is not None
        assert frame.index == 49  # the newest, never a stale one
        assert src.dropped == 49
        assert src.next_frame(0.1) is None  # nothing new since


# -- frozen pictures ---------------------------------------------------------------------------------------------
class LoopingCapture(FakeDriver):
    """A camera that shows the same few frames round and round, about 100 a second."""

    def __init__(self, frames: list[np.ndarray]) -> None:
        self.frames, self.reads = frames, 0

    def read(self) -> tuple[bool, Any]:
        time.sleep(0.01)
        self.reads += 1
        return True, self.frames[self.reads % len(self.frames)]


def still_scene(rng: np.random.Generator) -> np.ndarray:
    """A 640x480 shelf that does not move: smooth shapes, no two neighbours far apart."""
    blobs = rng.uniform(30, 220, (480, 640, 3)).astype(np.float32)
    return cv2.GaussianBlur(blobs, (0, 0), 5)


def sensor_noise(scene: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What a working camera returns for a still scene: Gaussian noise, sigma 2, on every pixel and channel."""
    return np.clip(scene + rng.normal(0, 2, scene.shape), 0, 255).round().astype(np.uint8)


def rounding_jitter(scene: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A frozen picture re-encoded: a fifth of the pixels off by one level, the rest identical."""
    image = scene.round().astype(np.int16)
    image[rng.random(scene.shape[:2]) < 0.2] += rng.choice(np.array([-1, 1], np.int16), (1, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def states_while_running(src: CaptureSource, seconds: float, until: Callable[[str], bool]) -> tuple[set[str], int]:
    """The states seen and frames taken over ``seconds`` (or until ``until(state)``)."""
    seen: set[str] = set()
    frames = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        frames += src.next_frame(0.1) is not None
        seen.add(src.state)
        if until(src.state):
            break
    return seen, frames


FREEZE_CFG = {"kind": "webcam", "device": 0, "stall_s": 1, "reconnect_initial_s": 10, "reconnect_max_s": 10}


def test_a_still_scene_with_sensor_noise_is_not_frozen() -> None:
    rng = np.random.default_rng(7)
    scene = still_scene(rng)
    camera = LoopingCapture([sensor_noise(scene, rng) for _ in range(6)])
    with CaptureSource(SourceConfig(**FREEZE_CFG), opener=lambda _cfg: camera) as src:
        seen, frames = states_while_running(src, 3 * src.cfg.stall_s, lambda s: s == "stalled")
    assert "stalled" not in seen and "live" in seen
    assert frames > 10


@pytest.mark.parametrize(
    "make",
    [lambda scene, rng: scene.round().astype(np.uint8), rounding_jitter],
    ids=["identical", "rounding-jitter"],
)
def test_a_frozen_picture_is_stalled(make: Callable[[np.ndarray, np.random.Generator], np.ndarray]) -> None:
    rng = np.random.default_rng(8)
    scene = still_scene(rng)
    camera = LoopingCapture([make(scene, rng) for _ in range(6)])
    with CaptureSource(SourceConfig(**FREEZE_CFG), opener=lambda _cfg: camera) as src:
        seen, frames = states_while_running(src, src.cfg.stall_s + 5, lambda s: s == "stalled")
    assert "stalled" in seen
    assert frames > 10  # frames kept coming: frozen, not silent


# -- hung drivers ------------------------------------------------------------------------------------------------
class HangingCapture(FakeDriver):
    """A camera driver that gives ``good`` frames, then blocks in read() for ``hang_s`` (or until released)."""

    def __init__(self, good: int, hang_s: float | None, release: threading.Event) -> None:
        self.good, self.hang_s, self.released = good, hang_s, release
        self.reads = 0
        self.hanging = threading.Event()

    def read(self) -> tuple[bool, Any]:
        self.reads += 1
        if self.reads > self.good:
            self.hanging.set()
            self.released.wait(self.hang_s if self.hang_s is not None else 60)
            return False, None
        time.sleep(0.02)
        return True, np.full((48, 64, 3), self.reads, np.uint8)


@pytest.fixture
def released() -> Iterator[threading.Event]:
    """Set at the end of a test: frees whatever driver call a test left blocked."""
    event = threading.Event()
    yield event
    event.set()


def test_a_camera_that_goes_silent_is_stalled_before_its_read_times_out(released: threading.Event) -> None:
    """A camera that stops sending while its read waits (read_timeout_s longer than stall_s) is stalled once
    stall_s has passed without a frame, not live until the read gives up. Only an RTSP test that needs
    GStreamer (test_rtsp.py) caught this before: a run without it skipped it."""
    camera = HangingCapture(5, None, released)
    with CaptureSource(SourceConfig(**FREEZE_CFG, read_timeout_s=30), opener=lambda _cfg: camera) as src:
        seen, frames = states_while_running(src, 4, lambda s: s == "stalled")
        silent = camera.hanging.is_set()
        released.set()  # lets the blocked read return, so leaving is quick
    assert silent and frames >= 1
    assert "live" in seen
    assert "stalled" in seen, f"a camera silent for over stall_s stayed {seen}"


def test_a_second_hang_is_caught_after_the_first_hung_read_returns(released: threading.Event) -> None:
    # The first capture's read returns (late) after the watchdog replaced it, while the replacement is hung: that
    # late return must not hide the second hang.
    cameras: list[HangingCapture] = []

    def opener(_cfg: SourceConfig) -> HangingCapture:
        first = not cameras
        cameras.append(HangingCapture(5, 3.5 if first else None, threading.Event() if first else released))
        return cameras[-1]

    cfg = SourceConfig(kind="webcam", device=0, read_timeout_s=0.5, reconnect_initial_s=0.2, reconnect_max_s=0.2)
    with CaptureSource(cfg, opener=opener) as src:
        deadline = time.monotonic() + 9
        while (src.reconnect_attempts < 2 or len(cameras) < 3) and time.monotonic() < deadline:
            src.next_frame(0.1)
        assert src.reconnect_attempts >= 2, "the second hung read was never noticed"
        assert len(cameras) >= 3
        released.set()  # lets the hung capture thread go, so leaving is quick


def test_a_hung_open_is_abandoned_for_a_fresh_one(released: threading.Event) -> None:
    opens = 0

    def opener(_cfg: SourceConfig) -> LoopingCapture:
        nonlocal opens
        opens += 1
        if opens == 1:
            released.wait(60)
        return LoopingCapture([np.zeros((48, 64, 3), np.uint8)])

    cfg = SourceConfig(kind="webcam", device=0, open_timeout_s=0.5, reconnect_initial_s=0.2, reconnect_max_s=0.2)
    with CaptureSource(cfg, opener=opener) as src:
        deadline = time.monotonic() + 8
        frame = None
        while frame is None and time.monotonic() < deadline:
            frame = src.next_frame(0.1)
        assert frame is not None, "the capture never got past the hung open"
        assert src.reconnect_attempts == 1 and opens == 2
        assert src.reconnects == 0  # the first connection gave no frame: this is the first, not a return
        released.set()


def hanging_opens(released: threading.Event) -> tuple[list[float], Callable[[SourceConfig], Any]]:
    """An opener whose every call blocks until ``released``, and the times it was called."""
    calls: list[float] = []

    def opener(_cfg: SourceConfig) -> Any:
        calls.append(time.monotonic())
        released.wait(30)
        return LoopingCapture([np.zeros((48, 64, 3), np.uint8)])

    return calls, opener


def test_opens_that_keep_hanging_are_retried_with_backoff(
    monkeypatch: pytest.MonkeyPatch, released: threading.Event
) -> None:
    monkeypatch.setattr("eyed.sources.capture.HUNG_GRACE_S", 0.05)
    calls, opener = hanging_opens(released)
    cfg = SourceConfig(kind="webcam", device=0, open_timeout_s=0.1, reconnect_initial_s=1.0, reconnect_max_s=1.0)
    with CaptureSource(cfg, opener=opener) as src:
        end = time.monotonic() + 3
        while time.monotonic() < end:
            src.next_frame(0.05)
        # Each hang is noticed after 0.15 s; the replacement waits 0.5-1 s first. Without backoff: about 20 opens.
        assert 2 <= len(calls) <= 6
        assert all(b - a >= 0.5 for a, b in itertools.pairwise(calls))
        released.set()


def test_threads_blocked_in_the_driver_are_capped(
    monkeypatch: pytest.MonkeyPatch, released: threading.Event, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("eyed.sources.capture.HUNG_GRACE_S", 0.05)
    calls, opener = hanging_opens(released)
    cfg = SourceConfig(kind="webcam", device=0, open_timeout_s=0.05, reconnect_initial_s=0.05, reconnect_max_s=0.05)
    with caplog.at_level(logging.ERROR), CaptureSource(cfg, opener=opener) as src:
        end = time.monotonic() + 3
        while time.monotonic() < end:
            src.next_frame(0.02)
        # The current thread plus MAX_ABANDONED abandoned ones, all still blocked: then no more.
        assert len(calls) == MAX_ABANDONED + 1
        assert sum(t.is_alive() for t in threading.enumerate() if t.name.startswith("eyed-capture-")) <= len(calls)
        assert "no new one until one returns" in caplog.text
        released.set()


def test_webcam_read_timeout_reaches_v4l2(monkeypatch: pytest.MonkeyPatch) -> None:
    # Set, then removed: monkeypatch restores only what it changed, and open_capture sets it.
    monkeypatch.setenv("OPENCV_VIDEOIO_V4L_SELECT_TIMEOUT", "unset by the test")
    monkeypatch.delenv("OPENCV_VIDEOIO_V4L_SELECT_TIMEOUT")
    monkeypatch.setattr(cv2, "VideoCapture", lambda *args: types.SimpleNamespace(set=lambda prop, value: True))
    open_capture(SourceConfig(kind="webcam", device=0, read_timeout_s=2.5))
    # V4L2 takes no timeout parameter: its select() timeout comes from this variable, in whole seconds.
    assert os.environ["OPENCV_VIDEOIO_V4L_SELECT_TIMEOUT"] == "3"


def test_a_hung_open_does_not_block_the_next(monkeypatch: pytest.MonkeyPatch, released: threading.Event) -> None:
    options_seen: list[str | None] = []

    def video_capture(target: Any, api: int, params: list[int]) -> Any:
        """Stands in for cv2.VideoCapture: the first open hangs until released."""
        options_seen.append(os.environ.get("OPENCV_FFMPEG_CAPTURE_OPTIONS"))
        if len(options_seen) == 1:
            released.wait(30)
        return types.SimpleNamespace(set=lambda prop, value: True)

    monkeypatch.setattr(cv2, "VideoCapture", video_capture)
    monkeypatch.delenv("OPENCV_FFMPEG_CAPTURE_OPTIONS", raising=False)
    rtsp = SourceConfig(kind="rtsp", url="rtsp://127.0.0.1:1/s", transport="udp")
    hung = threading.Thread(target=open_capture, args=(rtsp,), daemon=True)
    hung.start()
    while not options_seen and hung.is_alive():
        time.sleep(0.01)
    done = threading.Event()

    def open_again() -> None:
        open_capture(rtsp)
        done.set()

    threading.Thread(target=open_again, daemon=True).start()
    assert done.wait(3), "the replacement open waited for the hung one"
    assert options_seen == ["rtsp_transport;udp", "rtsp_transport;udp"]
    released.set()
    hung.join(5)
    assert "OPENCV_FFMPEG_CAPTURE_OPTIONS" not in os.environ


def test_env_lease_shares_one_value_and_makes_another_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EYED_TEST_LEASE", "operator's")
    lease = EnvLease("EYED_TEST_LEASE")
    entered_b = threading.Event()

    def hold_b() -> None:
        with lease.holding("b"):
            assert os.environ["EYED_TEST_LEASE"] == "b"
            entered_b.set()

    with lease.holding("a"), lease.holding("a"):
        other = threading.Thread(target=hold_b, daemon=True)
        other.start()
        assert not entered_b.wait(0.3)
        assert os.environ["EYED_TEST_LEASE"] == "a"
    assert entered_b.wait(5)
    other.join(5)
    assert os.environ["EYED_TEST_LEASE"] == "operator's"


def test_leaving_a_source_with_a_blocked_read_is_bounded(
    released: threading.Event, caplog: pytest.LogCaptureFixture
) -> None:
    camera = HangingCapture(0, None, released)
    cfg = SourceConfig(kind="webcam", device=0, read_timeout_s=30)
    src = CaptureSource(cfg, opener=lambda _cfg: camera).__enter__()
    assert camera.hanging.wait(5)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="eyed.sources.capture"):
        src.__exit__(None, None, None)
    assert time.monotonic() - started < 5
    assert "abandoning" in caplog.text


class RaisingCapture(LoopingCapture):
    """A driver whose read() raises once, as V4L2's CV_Assert does on a bad buffer."""

    def read(self) -> tuple[bool, Any]:
        if self.reads == 3:
            self.reads += 1
            raise cv2.error("read_frame_v4l2: bad buffer")
        return super().read()


def test_a_read_that_raises_reconnects_at_once() -> None:
    opens = 0

    def opener(_cfg: SourceConfig) -> RaisingCapture:
        nonlocal opens
        opens += 1
        return RaisingCapture([np.zeros((48, 64, 3), np.uint8)])

    # read_timeout_s is long: recovery must not wait for the hung-read watchdog.
    cfg = SourceConfig(kind="webcam", device=0, read_timeout_s=5, reconnect_initial_s=0.1, reconnect_max_s=0.1)
    with CaptureSource(cfg, opener=opener) as src:
        deadline = time.monotonic() + 4
        while opens < 2 and time.monotonic() < deadline:
            src.next_frame(0.1)
        assert opens == 2 and src.reconnect_attempts == 1
        assert src.next_frame(2) is not None
        assert src.reconnects == 1


class UnexpectedCapture(LoopingCapture):
    """A driver binding that throws what nobody expected of it (not cv2.error) from read()."""

    def read(self) -> tuple[bool, Any]:
        raise RuntimeError("unexpected driver failure")


def retried_for(src: CaptureSource, attempts: int, timeout_s: float = 5.0) -> int:
    deadline = time.monotonic() + timeout_s
    while src.reconnect_attempts < attempts and time.monotonic() < deadline:
        src.next_frame(0.05)
    return src.reconnect_attempts


@pytest.mark.parametrize("failure", ["open", "read"])
def test_a_camera_failing_unexpectedly_is_retried_for_ever(failure: str, caplog: pytest.LogCaptureFixture) -> None:
    opens = 0

    def opener(_cfg: SourceConfig) -> Any:
        nonlocal opens
        opens += 1
        if failure == "open":
            raise OSError("no camera")
        return UnexpectedCapture([np.zeros((8, 8, 3), np.uint8)])

    cfg = SourceConfig(kind="webcam", device=0, reconnect_initial_s=0.001, reconnect_max_s=0.01)
    src = CaptureSource(cfg, opener=opener)
    src._backoff.attempt = 1020  # stands in for hours of retrying: the next few used to overflow
    with caplog.at_level(logging.ERROR, logger="eyed.sources.capture"), src:
        first = retried_for(src, 10)
        assert first >= 10
        assert retried_for(src, first + 10) >= first + 10  # still going, not a thread that died
        assert src._threads[-1].is_alive()
        assert src.state in ("offline", "connecting")
    assert opens >= 20
    if failure == "read":
        assert "capture failed unexpectedly" in caplog.text


def test_a_users_ffmpeg_options_are_kept_with_the_sources_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    exported = "rtsp_transport;tcp|fflags;nobuffer|flags;low_delay|buffer_size;1048576"
    monkeypatch.setenv("OPENCV_FFMPEG_CAPTURE_OPTIONS", exported)
    seen: list[str | None] = []

    def video_capture(target: Any, api: int, params: list[int]) -> Any:
        seen.append(os.environ.get("OPENCV_FFMPEG_CAPTURE_OPTIONS"))
        return types.SimpleNamespace(set=lambda prop, value: True)

    monkeypatch.setattr(cv2, "VideoCapture", video_capture)
    open_capture(SourceConfig(kind="rtsp", url="rtsp://127.0.0.1:1/s", transport="udp"))
    assert seen == ["fflags;nobuffer|flags;low_delay|buffer_size;1048576|rtsp_transport;udp"]
    assert os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] == exported


@pytest.mark.parametrize(
    ("user", "merged"),
    [
        (None, "rtsp_transport;tcp"),
        ("", "rtsp_transport;tcp"),
        ("rtsp_transport;udp", "rtsp_transport;tcp"),
        ("stimeout;5000000|", "stimeout;5000000|rtsp_transport;tcp"),
    ],
)
def test_ffmpeg_options_set_only_the_transport(user: str | None, merged: str) -> None:
    assert ffmpeg_options(user, "tcp") == merged


# -- a stream that falls silent ----------------------------------------------------------------------------------
class FlushingCapture(FakeDriver):
    """An RTSP stream read by FFmpeg that falls silent after ``good`` frames: each read then waits out the read
    timeout and still succeeds, with a frame the decoder had held back (grey level 200) since before the silence."""

    def __init__(self, good: int, timeout_s: float) -> None:
        self.good, self.timeout_s, self.reads = good, timeout_s, 0

    def read(self) -> tuple[bool, Any]:
        self.reads += 1
        if self.reads > self.good:
            time.sleep(self.timeout_s)
            return True, np.full((48, 64, 3), 200, np.uint8)
        time.sleep(0.02)
        return True, np.full((48, 64, 3), self.reads, np.uint8)


def levels_until(src: CaptureSource, done: Callable[[list[int]], bool], timeout_s: float = 5.0) -> list[int]:
    """The grey levels of the frames taken until ``done(levels)`` (or ``timeout_s``)."""
    levels: list[int] = []
    deadline = time.monotonic() + timeout_s
    while not done(levels) and time.monotonic() < deadline:
        frame = src.next_frame(0.05)
        if frame is not None:
            levels.append(int(frame.image[0, 0, 0]))
    return levels


def test_frames_flushed_by_a_read_timeout_are_not_handed_over() -> None:
    cameras: list[FlushingCapture] = []

    def opener(_cfg: SourceConfig) -> FlushingCapture:
        cameras.append(FlushingCapture(5, 0.3))
        return cameras[-1]

    cfg = SourceConfig(
        kind="rtsp", url="rtsp://127.0.0.1:1/s", read_timeout_s=0.3, reconnect_initial_s=0.2, reconnect_max_s=0.2
    )
    with CaptureSource(cfg, opener=opener) as src:
        levels = levels_until(src, lambda levels: bool(levels) and src.state != "live")
        assert src.state in ("offline", "connecting")  # at once, not live on stale frames for stall_s
        levels += levels_until(src, lambda _: len(cameras) >= 2)
    assert 200 not in levels, "a frame held back since before the silence was handed over as new"
    assert len(cameras) == 2 and cameras[0].reads == 6  # the connection was dropped at the first timed-out read


def test_a_webcam_frame_that_took_long_is_still_a_fresh_one() -> None:
    """V4L2 fails a read that times out; one that succeeds late brings a frame the camera has just sent."""
    cfg = SourceConfig(kind="webcam", device=0, read_timeout_s=0.3, freeze_diff=0)
    with CaptureSource(cfg, opener=lambda _cfg: FlushingCapture(5, 0.3)) as src:
        assert 200 in levels_until(src, lambda levels: 200 in levels)


# -- source.fps and source.limit for cameras ---------------------------------------------------------------------
def test_throttle_takes_a_faster_cameras_frames_at_the_rate() -> None:
    throttle = Throttle(10)
    taken = [t for t in (i / 15 for i in range(150)) if throttle.due(t)]  # 10 s of a 15 fps camera
    assert len(taken) == 100
    assert min(b - a for a, b in itertools.pairwise(taken)) > 0.06


def test_throttle_takes_every_frame_of_a_camera_at_or_under_the_rate() -> None:
    rng = random.Random(4)
    jittery = [i / 10 + rng.uniform(-0.02, 0.02) for i in range(100)]  # 10 fps, each frame up to 20 ms off
    assert all(Throttle(10).due(t) for t in jittery)
    assert all(Throttle(10).due(i / 5) for i in range(50))
    assert all(Throttle(0).due(i / 1000) for i in range(1000))


def test_a_camera_is_taken_at_most_fps_times_a_second() -> None:
    camera = LoopingCapture([np.full((48, 64, 3), i, np.uint8) for i in range(3)])  # about 100 frames a second
    with CaptureSource(SourceConfig(kind="webcam", device=0, fps=10), opener=lambda _cfg: camera) as src:
        started = time.monotonic()
        taken = 0
        while time.monotonic() - started < 1.0:
            taken += src.next_frame(0.05) is not None
        handed_over = taken + src.dropped
        elapsed = time.monotonic() - started
    # The frames passed over to keep the rate are not `dropped` (that says inference is too slow): what was
    # taken or dropped is what the rate let through, at most one per 0.1 s (a frame may come a quarter early).
    assert taken > 0 and handed_over <= elapsed * 10 + 1.25
    assert camera.reads > 2 * handed_over


def test_a_camera_finishes_after_source_limit_frames() -> None:
    camera = LoopingCapture([np.full((48, 64, 3), i, np.uint8) for i in range(3)])
    cfg = SourceConfig(kind="webcam", device=0, limit=5, freeze_diff=0)
    with CaptureSource(cfg, opener=lambda _cfg: camera) as src:
        levels = levels_until(src, lambda _: src.state == "finished")
        assert len(levels) == 5 and src.state == "finished"
        src._threads[-1].join(2)
        assert not src._threads[-1].is_alive()  # the camera is let go
        assert src.next_frame(0.1) is None and src.state == "finished"


# -- counters ----------------------------------------------------------------------------------------------------
def test_frames_before_the_pipeline_takes_any_are_neither_dropped_nor_kept() -> None:
    """While the daemon waits for subscribers the camera sends on; the pipeline has missed nothing yet."""
    camera = LoopingCapture([np.full((48, 64, 3), i, np.uint8) for i in range(3)])
    with CaptureSource(SourceConfig(kind="webcam", device=0), opener=lambda _cfg: camera) as src:
        deadline = time.monotonic() + 5
        while camera.reads < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert src.dropped == 0
        asked = time.perf_counter()
        frame = src.next_frame(2)
        assert frame is not None and frame.index == 0
        assert frame.t_in > asked  # read after it was asked for, not kept from before


class ClosedCapture(FakeDriver):
    """A camera that is not there (yet)."""

    def isOpened(self) -> bool:
        return False


def test_reconnects_count_the_times_the_camera_came_back_not_the_attempts() -> None:
    def frames(n: int) -> ScriptedCapture:
        camera = ScriptedCapture([np.full((48, 64, 3), i, np.uint8) for i in range(n)])
        camera.go.set()
        return camera

    # Live, lost; three failed attempts; back, lost again; back for good.
    plan: list[FakeDriver] = [frames(3), ClosedCapture(), ClosedCapture(), ClosedCapture(), frames(3)]
    plan.append(LoopingCapture([np.zeros((48, 64, 3), np.uint8)]))
    opened = list(plan)
    cfg = SourceConfig(kind="webcam", device=0, reconnect_initial_s=0.01, reconnect_max_s=0.02)
    with CaptureSource(cfg, opener=lambda _cfg: plan.pop(0)) as src:
        deadline = time.monotonic() + 5
        while (plan or src.reconnects < 2) and time.monotonic() < deadline:
            src.next_frame(0.05)
        assert src.state == "live"
        assert src.reconnects == 2
        assert src.reconnect_attempts == len(opened) - 1


# -- connections that end early ----------------------------------------------------------------------------------
class FakeClock:
    """time.monotonic for the capture module: moved on only by the frames of a :class:`TimedConnection`."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TimedConnection(FakeDriver):
    """One connection: a frame after each of ``gaps`` (seconds on ``clock``), then the stream is lost."""

    def __init__(self, clock: FakeClock, gaps: list[float]) -> None:
        self.clock, self.gaps = clock, list(gaps)

    def read(self) -> tuple[bool, Any]:
        if not self.gaps:
            return False, None
        self.clock.now += self.gaps.pop(0)
        return True, np.zeros((8, 8, 3), np.uint8)


class NotedWaits(threading.Event):
    """A source's stop event whose timed waits (the reconnect backoff between connections) are noted instead of
    waited out, the first ``count`` of them; the next one is waited out (``blocked`` set), till the source stops."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count
        self.asked: list[float] = []
        self.blocked = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        if timeout is not None and len(self.asked) < self.count:
            self.asked.append(timeout)
            return self.is_set()
        self.blocked.set()
        return super().wait(timeout)


def backoff_waits(
    monkeypatch: pytest.MonkeyPatch, connections: list[list[float]], count: int, **cfg: Any
) -> tuple[list[float], CaptureSource]:
    """The first ``count`` waits a webcam source asks for before reconnecting, with the source (stopped): its
    connections give frames at the gaps (fake seconds) of each of ``connections`` in turn, then one frame each."""
    clock = FakeClock()
    fake_time = types.SimpleNamespace(monotonic=clock, time=time.time, perf_counter=time.perf_counter)
    monkeypatch.setattr("eyed.sources.capture.time", fake_time)
    plan = list(connections)
    src = CaptureSource(
        SourceConfig(kind="webcam", device=0, **cfg),
        opener=lambda _cfg: TimedConnection(clock, plan.pop(0) if plan else [0.0]),
    )
    waits = src._stop = NotedWaits(count)
    with src:
        assert waits.blocked.wait(10), f"only {len(waits.asked)} reconnects in 10 s"
    return waits.asked, src


def within_caps(waits: list[float], caps: list[float]) -> bool:
    """Whether each wait is one Backoff gives at that cap (half of it fixed, half jitter)."""
    return len(waits) == len(caps) and all(cap / 2 <= wait <= cap for wait, cap in zip(waits, caps, strict=True))


def test_a_camera_that_drops_each_connection_after_a_frame_is_retried_ever_more_slowly(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An NVR over its client limit takes the session, sends a keyframe and closes it. The backoff was reset at a
    connection's first frame, so such a camera was retried every reconnect_initial_s for ever (49 connections and
    300 log lines in 20 s): one frame does not make a connection that worked."""
    with caplog.at_level(logging.WARNING, logger="eyed.sources.capture"):
        waits, src = backoff_waits(monkeypatch, [], 9, reconnect_initial_s=0.5, reconnect_max_s=30)
    assert within_caps(waits, [0.5, 1, 2, 4, 8, 16, 30, 30, 30]), waits
    said = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert said[:9] == [f"source {src.id}: offline; retrying in {wait:.1f} s" for wait in waits]  # and the 10th
    # Ten connections, each of which gave a frame: nine attempts to reconnect, and nine times back.
    assert (src.reconnect_attempts, src.reconnects) == (9, 9)


@pytest.mark.parametrize(
    ("stall_s", "gaps", "settles"),
    [
        (10, [0.0] + [1.0] * 11, True),  # 11 s of frames: live for longer than stall_s
        (10, [0.0] + [1.0] * 8, False),  # 8 s only
        (10, [0.0] + [1.0] * 5 + [11.0] + [1.0] * 8, False),  # 22 s, but stalled 11 s on the way: 8 s since
        (1, [0.0] + [0.5] * 8, False),  # 4 s: longer than stall_s, shorter than SETTLED_MIN_S
        (1, [0.0] + [0.5] * 11, True),  # 5.5 s
    ],
    ids=["live", "short", "stalled", "short-of-the-floor", "past-the-floor"],
)
def test_a_connection_that_stays_live_starts_the_backoff_over(
    monkeypatch: pytest.MonkeyPatch, stall_s: float, gaps: list[float], settles: bool
) -> None:
    """Two connections that end after a frame, then one with ``gaps`` between its frames, then two more that end
    after a frame."""
    waits, _ = backoff_waits(monkeypatch, [[0.0], [0.0], gaps], 5, stall_s=stall_s, reconnect_initial_s=0.5)
    assert within_caps(waits, [0.5, 1, 0.5, 1, 2] if settles else [0.5, 1, 2, 4, 8]), waits
