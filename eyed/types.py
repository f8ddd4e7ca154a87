"""The values that flow through the pipeline, and the protocols of its two pluggable parts."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Frame:
    """One RGB uint8 image (H, W, 3) with when it arrived and, for replay, the dataset's class name."""

    image: np.ndarray = field(repr=False)
    index: int
    ts: float  # unix seconds when the source produced it
    t_in: float  # time.perf_counter() at the same moment, for latency
    truth: str | None = None


def _ignore(status: str) -> None:
    pass


@dataclass(frozen=True)
class StartUp:
    """What a source may need while it is entered: a set ``stop`` cuts a long start short, and ``waiting`` is
    told now and then what a slow but working start waits for (the daemon passes it on to systemd)."""

    stop: threading.Event = field(default_factory=threading.Event)
    waiting: Callable[[str], None] = _ignore


@dataclass(frozen=True)
class Scored:
    """A label with its score."""

    label: str
    class_id: int
    score: float


@dataclass(frozen=True)
class Coarse:
    """A label in a coarse space (e.g. CIFAR-10) derived from a fine prediction."""

    label: str
    score: float


@dataclass(frozen=True)
class Prediction:
    """What the classifier says about one frame."""

    topk: tuple[Scored, ...]
    coarse: Coarse | None
    probs: np.ndarray = field(repr=False, compare=False)

    @property
    def top(self) -> Scored:
        return self.topk[0]


class Source(Protocol):
    """A context manager that yields every frame in order (replay, video file); ``skipped`` counts records it
    could not decode."""

    id: str
    live: bool
    skipped: int

    def __enter__(self) -> Source: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    def frames(self, stop: threading.Event | None = None) -> Iterator[Frame]:
        """Every frame in order; a set ``stop`` ends the iteration (it cuts a paced source's wait short)."""
        ...


class LiveSource(Protocol):
    """A camera: its own capture thread keeps only the newest frame; ``state`` says how the camera is doing."""

    id: str
    live: bool
    skipped: int
    dropped: int  # frames overwritten before the pipeline took them
    reconnects: int
    reconnect_attempts: int  # opens tried after the first, successful or not

    @property
    def state(self) -> str:
        """connecting | live | stalled | offline | finished"""
        ...

    def __enter__(self) -> LiveSource: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    def next_frame(self, timeout_s: float) -> Frame | None:
        """The newest frame not yet handed out, waiting up to ``timeout_s``; None if there is none."""
        ...

    def last_frame_age_s(self) -> float | None: ...


class Preparer(Protocol):
    def __call__(self, image: np.ndarray, out: np.ndarray | None = None) -> np.ndarray: ...


class Classifier(Protocol):
    """Turns RGB frames into predictions. ``prepare`` is pure and thread-safe. ``logits`` and ``predict`` may be
    called from several threads at once with different batches (``model.workers``): an onnxruntime session
    runs concurrent calls, and a torch forward pass under ``inference_mode`` changes no state."""

    name: str
    backend: str
    input_shape: tuple[int, int, int]  # (H, W, 3) of one prepared frame

    @property
    def prepare(self) -> Preparer:
        """RGB uint8 (H, W, 3) -> uint8 ``input_shape`` (resize and crop), into ``out`` when given."""
        ...

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Prepared uint8 (N, H, W, 3) -> (N, classes) float logits."""
        ...

    def predict(self, batch: np.ndarray) -> list[Prediction]: ...

    def close(self) -> None: ...
