"""The OpenCV capture source: backoff, device arguments, odd frames, video files, dead webcams."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from eyed.config import SourceConfig
from eyed.sources import SourceError
from eyed.sources.capture import Backoff, CaptureSource, capture_args, webcam_target
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


@pytest.mark.parametrize(("device", "target"), [(0, 0), ("2", 2), ("/dev/video3", "/dev/video3"), (" 1 ", 1)])
def test_webcam_target(device: int | str, target: int | str) -> None:
    assert webcam_target(device) == target


def test_webcam_capture_arguments() -> None:
    cfg = SourceConfig(kind="webcam", device="/dev/video1", width=640, height=480, fps=15, read_timeout_s=2)
    target, api, params, props = capture_args(cfg)
    assert target == "/dev/video1" and api == cv2.CAP_V4L2
    assert params == [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, 10000, cv2.CAP_PROP_READ_TIMEOUT_MSEC, 2000]
    assert props == {
        cv2.CAP_PROP_FRAME_WIDTH: 640,
        cv2.CAP_PROP_FRAME_HEIGHT: 480,
        cv2.CAP_PROP_FPS: 15,
        cv2.CAP_PROP_BUFFERSIZE: 1,
    }


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


def test_missing_file_is_a_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such file"):
        CaptureSource(SourceConfig(kind="file", url=str(tmp_path / "none.mp4"))).__enter__()


class ScriptedCapture:
    """Stands in for a camera driver that returns odd frames (which no real device here can produce)."""

    def __init__(self, frames: list[Any]) -> None:
        self.frames = list(frames)

    def isOpened(self) -> bool:
        return True

    def read(self) -> tuple[bool, Any]:
        if not self.frames:
            time.sleep(0.05)
            return False, None
        return True, self.frames.pop(0)

    def release(self) -> None:
        pass


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
        while src.reconnects < 3 and time.monotonic() < deadline:
            assert src.next_frame(0.1) is None
        assert src.reconnects >= 3
        assert src.state in ("offline", "connecting")


def test_latest_frame_only_counts_what_it_drops() -> None:
    frames = [np.full((8, 8, 3), i, np.uint8) for i in range(50)]
    cfg = SourceConfig(kind="webcam", device=0, reconnect_initial_s=10, reconnect_max_s=10)
    with CaptureSource(cfg, opener=lambda _cfg: ScriptedCapture(frames)) as src:
        time.sleep(0.5)  # the camera delivers 50 frames while nobody takes any
        frame = src.next_frame(1)
        assert frame is not None
        assert frame.index == 49  # the newest, never a stale one
        assert src.dropped == 49
        assert src.next_frame(0.1) is None  # nothing new since
