"""A source over images already in memory: the benchmark's way to feed identical frames to every path."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from types import TracebackType

import numpy as np

from eyed.types import Frame


class MemorySource:
    """Yields the given images once, stamped with the time each is handed out."""

    def __init__(
        self,
        images: Sequence[np.ndarray],
        truths: Sequence[str | None] | None = None,
        id: str = "memory",
    ):
        self.id = id
        self.live = False
        self.images = images
        self.truths = truths or [None] * len(images)
        self.skipped = 0

    def __enter__(self) -> MemorySource:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    def frames(self, stop: threading.Event | None = None) -> Iterator[Frame]:
        for i, (image, truth) in enumerate(zip(self.images, self.truths, strict=True)):
            if stop is not None and stop.is_set():
                return
            yield Frame(image, i, time.time(), time.perf_counter(), truth)
