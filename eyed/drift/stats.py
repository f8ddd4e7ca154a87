"""Per-frame statistics for drift monitoring: what the model says and what the input looks like, as numbers.

Runs on the hot path, once per classified frame, so it works on a small grey copy of the frame (at most
``SMALL`` pixels on the long side) and on values the prediction already holds. Nothing here keeps pixels
beyond the previous frame's small copy, which the frame-difference statistic needs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import cv2
import numpy as np

from eyed.model.labels import CoarseMapper
from eyed.types import Prediction

SMALL = 64
# Pixels at or beyond these grey levels count as clipped (crushed shadows, blown highlights).
CLIP_LOW = 2
CLIP_HIGH = 253

# Significant digits of every numeric statistic, as measured and as a profile stores it: a profile read back from
# its file must hold what the monitor compares with it live. A still scene measured at 127.51399739 but stored as
# 127.514 fell outside its own histogram; a confidence of 0.99999976 stored as 1 moved every KS window.
DIGITS = 6

OUTPUT_STATS = ("confidence", "margin", "entropy")
INPUT_STATS = ("brightness", "contrast", "sharpness", "clipped", "motion")
NUMERIC_STATS = OUTPUT_STATS + INPUT_STATS


class FrameStats(NamedTuple):
    """One frame's statistics, a row in ``FIELDS`` order.

    A NamedTuple rather than a frozen dataclass: it is as immutable, builds in a fraction of the time, and
    the monitor copies it into its window buffer as a plain tuple.
    """

    top1: int  # fine class id of the top prediction
    coarse: int  # index into the extractor's coarse classes; -1 when the frame has no coarse label
    confidence: float  # max probability
    margin: float  # top-1 minus top-2 probability
    entropy: float  # entropy of the softmax / log(number of classes), in [0, 1]
    brightness: float  # mean grey level, 0-255
    contrast: float  # RMS contrast: standard deviation of the grey levels
    sharpness: float  # variance of the Laplacian of the small grey copy
    clipped: float  # share of pixels <= CLIP_LOW or >= CLIP_HIGH
    motion: float  # mean absolute grey difference from the previous frame; NaN for the first frame


FIELDS = FrameStats._fields


def small_grey(image: np.ndarray, size: int = SMALL) -> np.ndarray:
    """A grey uint8 copy of an RGB uint8 frame, at most ``size`` pixels on the long side."""
    h, w = image.shape[:2]
    long_side = max(h, w)
    if long_side > 2 * size:
        # INTER_AREA over a whole 1080p frame reads every pixel: ~1.3 ms on one core, a large share of an
        # inference. Picking every step-th pixel first costs ~30 us. The aliasing it lets through is wanted:
        # native-resolution detail (focus, sensor noise) stays visible to the sharpness statistic, where a
        # full area average would wash it out. Mean, contrast and clipping stay unbiased estimates.
        step = long_side // (2 * size)
        image = image[::step, ::step]
        h, w = image.shape[:2]
        long_side = max(h, w)
    if long_side > size:
        scale = size / long_side
        image = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    if image.ndim == 2:
        return np.ascontiguousarray(image)
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


def output_stats(pred: Prediction) -> tuple[float, float, float]:
    """(max probability, margin to the second, normalised entropy) of one prediction."""
    probs = pred.probs
    top = pred.top.score
    if len(pred.topk) >= 2:
        second = pred.topk[1].score
    else:
        second = float(np.partition(probs, -2)[-2]) if probs.shape[0] >= 2 else 0.0
    k = probs.shape[0]
    # float32 softmax can underflow to exactly 0; the tiny offset turns 0 * log(0) into 0 instead of NaN.
    h = -float(probs @ np.log(probs + np.float32(1e-30)))
    entropy = h / math.log(k) if k > 1 else 0.0
    return float(top), float(top - second), min(max(entropy, 0.0), 1.0)


def kept(value: float) -> float:
    """``value`` to DIGITS significant digits, as a profile stores it; NaN and infinities as they are."""
    return float(f"{value:.{DIGITS}g}") if math.isfinite(value) else value


class StatsExtractor:
    """Turns (frame, prediction) into :class:`FrameStats`; keeps the previous frame's small grey copy.

    With ``mapper`` (the model's coarse mapper), the coarse column is the group with the most probability mass,
    before any prior correction: the prediction's own coarse label depends on ``model.coarse_priors``, so
    counts of it made under one priors file would not compare with counts made under another (nor with a
    profile that is itself the priors file). Without one, it is the index of the prediction's coarse label.
    """

    def __init__(
        self, coarse_classes: Sequence[str] = (), size: int = SMALL, *, mapper: CoarseMapper | None = None
    ) -> None:
        if mapper is not None and coarse_classes and tuple(coarse_classes) != mapper.classes:
            raise ValueError("coarse_classes and the mapper's classes differ")
        self.coarse_classes = tuple(coarse_classes) if coarse_classes else (mapper.classes if mapper else ())
        self.size = size
        self._mapper = mapper
        self._coarse_index = {c: i for i, c in enumerate(self.coarse_classes)}
        self._previous: np.ndarray | None = None

    def reset(self) -> None:
        """Forget the previous frame (e.g. after a camera reconnect): the next motion value is NaN."""
        self._previous = None

    def __call__(self, image: np.ndarray, pred: Prediction) -> FrameStats:
        confidence, margin, entropy = output_stats(pred)
        coarse = self._coarse(pred)
        grey = small_grey(image, self.size)
        mean, std = cv2.meanStdDev(grey)
        _, lap_std = cv2.meanStdDev(cv2.Laplacian(grey, cv2.CV_32F))
        inside = cv2.countNonZero(cv2.inRange(grey, CLIP_LOW + 1, CLIP_HIGH - 1))
        previous = self._previous
        if previous is not None and previous.shape == grey.shape:
            motion = float(cv2.mean(cv2.absdiff(grey, previous))[0])
        else:
            motion = math.nan
        self._previous = grey
        return FrameStats(
            top1=pred.top.class_id,
            coarse=coarse,
            confidence=kept(confidence),
            margin=kept(margin),
            entropy=kept(entropy),
            brightness=kept(float(mean[0, 0])),
            contrast=kept(float(std[0, 0])),
            sharpness=kept(float(lap_std[0, 0]) ** 2),
            clipped=kept(1.0 - inside / grey.size),
            motion=kept(motion),
        )

    def _coarse(self, pred: Prediction) -> int:
        """The coarse group with the most probability mass (no priors; -1 when none has any), or without a mapper
        the index of the prediction's coarse label."""
        if self._mapper is not None:
            masses = self._mapper.masses(pred.probs)
            best = int(masses.argmax())
            return best if masses[best] > 0 else -1
        return -1 if pred.coarse is None else self._coarse_index.get(pred.coarse.label, -1)
