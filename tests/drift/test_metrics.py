"""PSI, Jensen-Shannon and Kolmogorov-Smirnov against known values and scipy; binning and smoothing."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import ks_2samp

from eyed.drift.monitor import js_distance, ks_statistic, psi, remove_sorted
from eyed.drift.reference import hist_counts, quantile_edges


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
    assert edges[0] == 0.0 and np.all(np.diff(edges) > 0)  # tied quantiles merged
    counts = hist_counts(values, edges)
    assert counts[0] == 700 and counts.sum() == 1000
    outside = hist_counts(np.array([-5.0, 99.0, np.nan]), edges)
    assert outside[0] == 1 and outside[-1] == 1 and outside.sum() == 2  # NaN left out


def test_quantile_edges_of_no_data() -> None:
    assert quantile_edges(np.array([np.nan])).size == 0


def test_remove_sorted_takes_one_copy_of_each_value_out() -> None:
    rng = np.random.default_rng(3)
    for _ in range(100):
        all_values = rng.integers(0, 8, int(rng.integers(1, 60))).astype(np.float64)
        taken = rng.choice(all_values, size=int(rng.integers(0, all_values.size + 1)), replace=False)
        rest = list(all_values)
        for v in taken:
            rest.remove(v)
        assert remove_sorted(np.sort(all_values), taken).tolist() == sorted(rest)
