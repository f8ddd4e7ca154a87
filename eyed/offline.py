"""Recorded frames through the configured model the daemon's way at fps 0, for eval, priors, profile and drift.

With the onnx backend on the CPU the daemon runs a frame per core at once (``model.batch`` frames, 1 by
default), each on one onnxruntime thread: two frames at once were faster here than a batch of them on two
threads (README, Performance), and ``eyed eval`` went from 241 to 492 FP32 frames/s that way. With one worker
(torch, a GPU provider, one core: ``Settings.runtime_model``) each batch of frames the caller hands over runs
as one call.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import TypeVar

import numpy as np

from eyed.config import Settings
from eyed.model import load_classifier
from eyed.types import Frame, Prediction

R = TypeVar("R")


class OfflineRunner:
    """Owns the classifier (as ``Settings.full_speed_model`` configures it) and the threads that call it."""

    def __init__(self, settings: Settings) -> None:
        model = settings.full_speed_model()
        self.classifier = load_classifier(model)
        self.workers = model.workers
        self.batch = model.batch
        self._pool: ThreadPoolExecutor | None = None
        if self.workers > 1:
            self._pool = ThreadPoolExecutor(self.workers, "eyed-offline")
            # Start every thread now: the pool adds one per task only while none is idle, so a first worker that
            # finished its share before the next was handed over would take that share too.
            started = threading.Barrier(self.workers)
            for ready in [self._pool.submit(started.wait) for _ in range(self.workers)]:
                ready.result()

    def __enter__(self) -> OfflineRunner:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self.classifier.close()

    def logits(self, frames: list[Frame]) -> np.ndarray:
        """(len(frames), classes) logits, in frame order."""
        if not frames:
            classes: int = len(self.classifier.post.labels)  # type: ignore[attr-defined]
            return np.empty((0, classes), dtype=np.float32)
        return np.concatenate(self._run(frames, self.classifier.logits))

    def predict(self, frames: list[Frame]) -> list[Prediction]:
        """A prediction per frame, in frame order."""
        return [p for preds in self._run(frames, self.classifier.predict) for p in preds]

    def _run(self, frames: list[Frame], call: Callable[[np.ndarray], R]) -> list[R]:
        """``call`` (the classifier's logits or predict) over ``frames``: one call on all of them, or with
        workers, each worker a contiguous share of them, ``model.batch`` frames a call; the results in frame
        order."""
        clf = self.classifier
        if not frames:
            return []
        if self._pool is None:
            return [call(np.stack([clf.prepare(f.image) for f in frames]))]

        def in_batches(share: list[Frame]) -> list[R]:
            buffer = np.empty((self.batch, *clf.input_shape), dtype=np.uint8)
            results = []
            for start in range(0, len(share), self.batch):
                part = share[start : start + self.batch]
                for i, frame in enumerate(part):
                    clf.prepare(frame.image, out=buffer[i])
                results.append(call(buffer[: len(part)]))
            return results

        size = -(-len(frames) // self.workers)
        shares = [frames[i : i + size] for i in range(0, len(frames), size)]
        return [r for results in self._pool.map(in_batches, shares) for r in results]
