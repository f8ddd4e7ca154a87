"""Drift monitoring tests; the helpers below make synthetic per-frame statistics."""

from __future__ import annotations

import numpy as np

from eyed.drift.stats import FrameStats

COARSE = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def synthetic_stats(
    n: int, seed: int = 0, *, brightness: float = 120.0, sharpness: float = 400.0, classes: int = 60
) -> list[FrameStats]:
    """In-domain-looking rows: a long-tailed fine class distribution, coarse labels from it, smooth stats."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, classes + 1)
    top1 = rng.choice(classes, size=n, p=weights / weights.sum()) + 1
    conf = rng.beta(4, 3, size=n)
    margin = conf * rng.uniform(0.2, 0.9, size=n)
    rows = []
    for i in range(n):
        rows.append(
            FrameStats(
                top1=int(top1[i]),
                coarse=int(top1[i] % len(COARSE)),
                confidence=float(conf[i]),
                margin=float(margin[i]),
                entropy=float(np.clip(1.0 - conf[i] + rng.normal(0, 0.05), 0, 1)),
                brightness=float(np.clip(rng.normal(brightness, 25), 0, 255)),
                contrast=float(abs(rng.normal(50, 10))),
                sharpness=float(rng.lognormal(np.log(sharpness), 0.5)),
                clipped=float(max(0.0, rng.normal(0.0, 0.02))),
                motion=float("nan") if i == 0 else float(abs(rng.normal(30, 8))),
            )
        )
    return rows


def scene_stream(n: int, seed: int) -> list[FrameStats]:
    """A camera's statistics: the scene changes every 100-300 frames (lighting, what is in view), and frames
    within a scene are alike, so neighbouring frames are correlated as a real camera's are."""
    rng = np.random.default_rng(seed)
    rows: list[FrameStats] = []
    while len(rows) < n:
        rows += synthetic_stats(
            int(rng.integers(100, 300)),
            seed=int(rng.integers(1 << 30)),
            brightness=float(rng.normal(120, 15)),
            sharpness=float(np.exp(rng.normal(np.log(400), 0.3))),
            classes=int(rng.integers(20, 60)),
        )
    return rows[:n]
