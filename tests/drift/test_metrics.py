"""PSI, Jensen-Shannon and Kolmogorov-Smirnov against known values and scipy; binning and smoothing."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import ks_2samp

from eyed.drift.monitor import Baseline, HeldOut, js_distance, ks_statistic, psi, window_metrics
from eyed.drift.reference import Histogram, ProfileBuilder, class_counts, fine_index, hist_counts, quantile_edges
from eyed.drift.stats import FIELDS
from tests.drift import COARSE, synthetic_stats


def test_psi_of_identical_distributions_is_zero_and_a_known_value() -> None:
    counts = np.array([10, 20, 30, 40])
    assert psi(counts, counts * 3, pseudo=0.0) == pytest.approx(0.0, abs=1e-12)
    assert psi(counts, counts) == pytest.approx(0.0, abs=1e-12)
    a, b = np.array([500, 500]), np.array([900, 100])
    # Without smoothing: (0.9 - 0.5) ln(0.9/0.5) + (0.1 - 0.5) ln(0.1/0.5)
    expected = 0.4 * math.log(1.8) - 0.4 * math.log(0.2)
    assert psi(a, b, pseudo=0.0) == pytest.approx(expected)
    assert psi(a, b, pseudo=0.0) == pytest.approx(psi(b, a, pseudo=0.0))


def test_psi_smooths_empty_bins() -> None:
    ref = np.array([100, 100, 100, 0])
    window = np.array([0, 50, 50, 0])
    with np.errstate(divide="ignore", invalid="ignore"):
        assert not math.isfinite(psi(ref, window, pseudo=0.0))
    value = psi(ref, window)
    assert math.isfinite(value) and value > 0.1
    # The pseudo-count pulls a small window towards uniform, so it must not dominate 1,000 frames.
    assert psi(ref * 10, np.array([330, 330, 340, 0])) < 0.01


@pytest.mark.parametrize("seed", range(3))
def test_js_distance_matches_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    p, q = rng.integers(0, 50, 12), rng.integers(0, 50, 12)
    p[0] = 0  # empty bins need no smoothing
    q[1] = 0
    assert js_distance(p, q) == pytest.approx(float(jensenshannon(p, q, base=2)))


def test_js_distance_bounds() -> None:
    assert js_distance(np.array([1, 2, 3]), np.array([2, 4, 6])) == pytest.approx(0.0, abs=1e-7)
    assert js_distance(np.array([1, 0]), np.array([0, 1])) == pytest.approx(1.0)


@pytest.mark.parametrize(("n", "m", "shift"), [(500, 100, 0.0), (2000, 250, 0.3), (50, 60, 1.0)])
def test_ks_statistic_matches_scipy(n: int, m: int, shift: float) -> None:
    rng = np.random.default_rng(n)
    a, b = rng.normal(0, 1, n), rng.normal(shift, 1, m)
    b[:5] = a[:5]  # ties across samples
    assert ks_statistic(np.sort(a), b) == pytest.approx(ks_2samp(a, b).statistic)


def test_ks_statistic_matches_scipy_with_many_ties() -> None:
    """Looked up at the sample's points only, it must still find the largest gap wherever it lies: discrete
    values (a confidence rounded in a profile, a still scene) tie within and across the two samples."""
    rng = np.random.default_rng(7)
    for _ in range(200):
        n, m = int(rng.integers(1, 400)), int(rng.integers(1, 60))
        a = rng.integers(0, int(rng.integers(2, 30)), n).astype(np.float64)
        b = rng.integers(0, int(rng.integers(2, 30)), m).astype(np.float64) + float(rng.integers(-3, 4))
        assert ks_statistic(np.sort(a), b) == pytest.approx(ks_2samp(a, b).statistic), (a, b)


def test_ks_statistic_of_disjoint_samples_is_one() -> None:
    assert ks_statistic(np.arange(10.0), np.arange(20.0, 30.0)) == 1.0


def test_quantile_bins_are_right_closed_with_open_outer_bins() -> None:
    values = np.concatenate([np.zeros(700), np.linspace(0.01, 1, 300)])  # a point mass at 0 (no clipping)
    edges = quantile_edges(values, 10)
    assert edges[0] < 0.0 and edges[1] == 0.0 and edges[-1] == 1.0 and np.all(np.diff(edges) > 0)  # ties merged
    counts = hist_counts(values, edges)
    assert counts[0] == 0 and counts[1] == 700 and counts[-1] == 0 and counts.sum() == 1000
    outside = hist_counts(np.array([-5.0, 99.0, np.nan]), edges)
    assert outside[0] == 1 and outside[-1] == 1 and outside.sum() == 2  # NaN left out


@pytest.mark.parametrize("constant", [0.0, 90.0, 1e6])
def test_values_beyond_a_constant_reference_have_bins_of_their_own(constant: float) -> None:
    """A still scene without sensor noise: one value, one quantile. Lower and higher values must not share
    its bin, or a window at half the light has the reference's distribution."""
    edges = quantile_edges(np.full(500, constant))
    assert hist_counts(np.full(500, constant), edges).tolist() == [0, 500, 0]
    assert hist_counts(np.array([constant / 2 - 1, constant, constant * 2 + 1]), edges).tolist() == [1, 1, 1]
    assert np.isfinite(quantile_edges(np.array([-np.finfo(np.float64).max, 0.0]))).all()


def test_quantile_edges_of_no_data() -> None:
    assert quantile_edges(np.array([np.nan])).size == 0


def test_held_out_metrics_equal_a_window_against_the_rest_of_the_reference() -> None:
    """Calibration counts each window's rows against the reference minus that window without rebuilding the
    reference: the metrics must be those of the plain computation, ties, NaN and unlabelled rows included."""
    rows = [
        s._replace(confidence=round(s.confidence, 1), coarse=-1 if i % 7 == 0 else s.coarse)
        for i, s in enumerate(synthetic_stats(600, seed=5))
    ]
    builder = ProfileBuilder(COARSE, top_classes=8)
    builder.add_many(rows)
    ref = builder.build()
    base = Baseline.of(ref)
    held_out = HeldOut(ref.reservoir, base)
    rng = np.random.default_rng(0)
    windows: list[slice | np.ndarray] = [slice(0, 40), slice(100, 400), rng.choice(600, 50, replace=False)]
    for window in windows:
        inside = np.zeros(ref.reservoir.shape[0], dtype=bool)
        inside[window] = True
        expected = window_metrics(ref.reservoir[inside], rest_of(base, ref.reservoir[inside], ref.reservoir[~inside]))
        got = held_out.metrics(window)
        assert got.keys() == expected.keys()
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)


def rest_of(base: Baseline, window: np.ndarray, rest: np.ndarray) -> Baseline:
    """``base`` without the ``window`` rows, computed the plain way (``rest`` holds the other reservoir rows)."""
    col = {name: i for i, name in enumerate(FIELDS)}
    assert base.coarse_counts is not None
    coarse = base.coarse_counts - class_counts(window[:, col["coarse"]].astype(np.int64), base.coarse_counts.size)
    fine = base.fine_counts - np.bincount(
        fine_index(base.fine_ids, window[:, col["top1"]]), minlength=len(base.fine_ids) + 1
    )
    hists = {name: Histogram(h.edges, h.counts - h.count(window[:, col[name]])) for name, h in base.histograms.items()}
    ks = {}
    for name in base.ks_sorted:
        values = rest[:, col[name]]
        ks[name] = np.sort(values[np.isfinite(values)])
    return Baseline(coarse, base.fine_ids, fine, hists, ks)
