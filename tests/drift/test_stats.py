"""Per-frame statistics: output statistics of known distributions, input statistics move the right way."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from eyed.drift.stats import DIGITS, FIELDS, NUMERIC_STATS, FrameStats, StatsExtractor, output_stats, small_grey
from eyed.types import Coarse, Prediction, Scored
from tests.conftest import synthetic_images
from tests.drift import COARSE


def prediction(probs: np.ndarray, coarse: str | None = "cat", topk: int = 5) -> Prediction:
    order = np.argsort(-probs, kind="stable")[:topk]
    scored = tuple(Scored(f"c{i}", int(i), float(probs[i])) for i in order)
    return Prediction(scored, Coarse(coarse, 0.9) if coarse else None, probs.astype(np.float32))


def photo(seed: int = 0, size: int = 32) -> np.ndarray:
    return synthetic_images(1, seed=seed, size=size)[0]


def test_output_stats_of_uniform_and_one_hot() -> None:
    uniform = np.full(1001, 1 / 1001)
    conf, margin, entropy = output_stats(prediction(uniform))
    assert conf == pytest.approx(1 / 1001) and margin == pytest.approx(0) and entropy == pytest.approx(1, abs=1e-5)
    one_hot = np.zeros(1001)
    one_hot[7] = 1.0  # exact zeros elsewhere: entropy must be 0, not NaN
    conf, margin, entropy = output_stats(prediction(one_hot))
    assert (conf, margin, entropy) == (1.0, 1.0, 0.0)


def test_entropy_is_normalised_by_the_number_of_classes() -> None:
    """Uniform over 10 of 1001 classes: log 10 / log 1001, not log 10 (which the [0, 1] clamp would hide as 1
    for most frames of a 1001-class model, and ks_entropy would go blind)."""
    probs = np.zeros(1001)
    probs[:10] = 0.1
    assert output_stats(prediction(probs))[2] == pytest.approx(math.log(10) / math.log(1001), rel=1e-5)


def test_statistics_are_measured_to_the_digits_a_profile_keeps() -> None:
    """A profile read back from its file must hold what is measured live: a still scene measured at 127.513997
    and stored as 127.514 fell outside its own histogram, and a confidence of 0.99999976 stored as 1 moved KS."""
    extractor = StatsExtractor()
    probs = np.full(10, 2.4e-8, dtype=np.float32)
    probs[3] = 1 - 9 * 2.4e-8
    stats = extractor(photo(5, 64), prediction(probs))
    for name in NUMERIC_STATS:
        value = getattr(stats, name)
        assert math.isnan(value) or value == float(f"{value:.{DIGITS}g}"), (name, value)
    assert stats.confidence == 1.0


def test_margin_without_a_second_topk_entry() -> None:
    probs = np.array([0.1, 0.6, 0.3])
    assert output_stats(prediction(probs, topk=1))[1] == pytest.approx(0.3)


def test_row_is_numeric_and_coarse_is_an_index() -> None:
    extractor = StatsExtractor(COARSE)
    probs = np.full(1001, 1 / 1001)
    first = extractor(photo(), prediction(probs, "cat"))
    assert first._fields == FIELDS
    assert first.coarse == COARSE.index("cat") and first.top1 == 0
    assert math.isnan(first.motion)  # no previous frame yet
    assert extractor(photo(), prediction(probs, None)).coarse == -1
    assert extractor(photo(), prediction(probs, "not a class")).coarse == -1
    assert all(isinstance(v, (int, float)) for v in first)


def test_motion_is_zero_for_a_repeated_frame_and_reset_forgets() -> None:
    extractor = StatsExtractor()
    pred = prediction(np.full(10, 0.1))
    extractor(photo(1), pred)
    assert extractor(photo(1), pred).motion == 0.0
    assert extractor(photo(2), pred).motion > 5
    extractor.reset()
    assert math.isnan(extractor(photo(2), pred).motion)


def test_a_frame_of_another_size_restarts_motion() -> None:
    extractor = StatsExtractor()
    pred = prediction(np.full(10, 0.1))
    extractor(photo(1, 32), pred)
    assert math.isnan(extractor(photo(1, 48), pred).motion)


def test_darkening_blur_and_low_contrast_move_the_right_statistics() -> None:
    extractor = StatsExtractor()
    pred = prediction(np.full(10, 0.1))
    rng = np.random.default_rng(0)
    # Detail at the pixel scale, like a photo: blur must have something to remove.
    img = np.clip(photo(3, 64).astype(np.int16) + rng.integers(-30, 30, (64, 64, 3)), 0, 255).astype(np.uint8)
    base = extractor(img, pred)
    dark = extractor((img * 0.35).astype(np.uint8), pred)
    blurred = extractor(cv2.GaussianBlur(img, (5, 5), 1.5), pred)
    mean = img.mean()
    flat = extractor(np.clip(mean + (img - mean) * 0.4, 0, 255).astype(np.uint8), pred)
    assert dark.brightness < 0.5 * base.brightness
    assert dark.contrast < base.contrast and dark.sharpness < base.sharpness
    assert blurred.sharpness < 0.3 * base.sharpness
    assert flat.contrast == pytest.approx(0.4 * base.contrast, rel=0.05)
    assert abs(flat.brightness - base.brightness) < 2


def test_clipped_counts_crushed_and_blown_pixels() -> None:
    extractor = StatsExtractor()
    pred = prediction(np.full(10, 0.1))
    img = np.full((32, 32, 3), 128, np.uint8)
    img[:8] = 0  # a quarter crushed
    img[8:12] = 255  # an eighth blown
    stats = extractor(img, pred)
    assert stats.clipped == pytest.approx(0.25 + 0.125)
    assert extractor(np.full((32, 32, 3), 128, np.uint8), pred).clipped == 0.0


@pytest.mark.parametrize(("h", "w"), [(32, 32), (480, 640), (1080, 1920), (100, 30)])
def test_small_grey_copy_is_at_most_64_px(h: int, w: int) -> None:
    grey = small_grey(np.zeros((h, w, 3), np.uint8))
    assert grey.ndim == 2 and grey.dtype == np.uint8 and max(grey.shape) == min(64, max(h, w))


def test_small_grey_keeps_the_mean_of_a_large_frame() -> None:
    img = cv2.resize(photo(5, 32), (1920, 1080), interpolation=cv2.INTER_CUBIC)
    full = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).mean()
    assert small_grey(img).mean() == pytest.approx(full, abs=1.5)


def test_frame_stats_is_immutable() -> None:
    stats = FrameStats(1, 0, 0.5, 0.1, 0.3, 100.0, 40.0, 200.0, 0.0, float("nan"))
    with pytest.raises(AttributeError):
        stats.top1 = 2  # type: ignore[misc]


# The levels 2 and 253 count as clipped ("at or beyond").
def test_clip_levels_are_inclusive() -> None:
    pred = Prediction((Scored("a", 0, 1.0),), None, np.ones(1, np.float32))
    for level, clipped in ((2, 1.0), (3, 0.0), (252, 0.0), (253, 1.0)):
        frame = np.full((16, 16, 3), level, np.uint8)
        assert StatsExtractor()(frame, pred).clipped == clipped, level
