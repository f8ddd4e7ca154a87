"""Windows of per-frame statistics compared with a reference profile -> one :class:`WindowReport` per window.

Pure: no sockets, no clocks (the caller stamps payloads). Metrics, each comparing one window with the reference:

- ``js_coarse`` / ``js_fine``: Jensen-Shannon distance (base 2, in [0, 1]) of the coarse-label distribution and of
  the top-N fine classes plus "other";
- ``psi_coarse`` / ``psi_fine``: population stability index of the same distributions;
- ``ks_confidence`` / ``ks_margin`` / ``ks_entropy``: two-sample Kolmogorov-Smirnov statistic against the
  reference's reservoir;
- ``psi_<stat>`` for every input statistic, over the reference's quantile bins (outer bins open).

Thresholds are calibrated for the window size in use (see :func:`calibrate`), and ``drift`` needs
``cfg.consecutive`` windows in a row over a drift threshold, so one odd window does not flap the status. A
reference of fewer than two windows of frames calibrates on shorter windows (:func:`calibration_size`).

A window is ``cfg.window`` frames, or, with ``cfg.window_s``, as many frames as arrive in that many seconds:
then the frame count varies with the frame rate, and each window is judged with thresholds calibrated for a
size on a fixed grid just below its own (:func:`size_bucket`), computed the first time that size is met.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from eyed.config import MAX_LEARNED, MAX_WINDOW, MIN_WINDOW, DriftConfig
from eyed.drift.reference import (
    RESERVOIR,
    Histogram,
    ProfileBuilder,
    Reference,
    class_counts,
    fine_index,
)
from eyed.drift.stats import FIELDS, INPUT_STATS, NUMERIC_STATS, OUTPUT_STATS, FrameStats

logger = logging.getLogger(__name__)

SCHEMA = 1
# Pseudo-count added to every bin of both sides before PSI normalises: an empty bin would otherwise put a
# log(0) in the sum. 0.5 is the Jeffreys prior for counts.
PSEUDO = 0.5
BOOTSTRAP = 200
# A reference learned without a profile keeps every frame up to a profile's largest reservoir (see
# reference.profile_blocks), and blocks sampled as a profile's beyond: it bounds memory and calibration.
LEARNED_RESERVOIR = 4 * RESERVOIR
# Metrics that cannot exceed 1: a drift threshold scaled past that could never fire.
BOUNDED = ("js", "ks")
# The shipped thresholds, whose drift/warn ratio scales drift with a warn level that noise raised (levels).
SHIPPED = DriftConfig()
# Calibrated window sizes with drift.window_s: MIN_WINDOW x 2^(k/4). A window is judged as the grid size at or
# below its frame count (it is at most 19% larger); a smaller window is noisier, so its thresholds err on the
# side of fewer alarms.
BUCKET_STEPS = 4

# With drift.window_s, a pause between two frames is an outage (the window ends before it) only when it is
# window_s or more and also this many times the stream's usual interval, the median of its last INTERVALS: a
# source that sends a frame every window_s seconds or slower pauses that long between every two frames.
OUTAGE_FACTOR = 5
INTERVALS = 15

Status = Literal["ok", "warn", "drift"]
COL = {name: i for i, name in enumerate(FIELDS)}


def family(metric: str) -> str:
    """``psi``, ``js`` or ``ks``: which configured defaults a metric's thresholds start from."""
    return metric.split("_", 1)[0]


def psi(expected: np.ndarray, actual: np.ndarray, pseudo: float = PSEUDO) -> float:
    """Population stability index of two count vectors over the same bins, with ``pseudo`` added to each bin.

    The reference is first rescaled to the window's size, so both sides get the same smoothing: with raw
    counts a bin empty on both sides would weigh 0.5 in 250 against 0.5 in 50,000 and make identical
    distributions look different.
    """
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    e = e * (a.sum() / e.sum()) + pseudo if e.sum() > 0 else e + pseudo
    a = a + pseudo
    e /= e.sum()
    a /= a.sum()
    return float(np.sum((a - e) * np.log(a / e)))


def js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon distance, base 2 (0 = same, 1 = disjoint), of two count or probability vectors.

    Equals ``scipy.spatial.distance.jensenshannon(p, q, base=2)``, without importing scipy into the daemon.
    Empty bins need no smoothing here: 0 * log(0) is taken as 0.
    """
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    p = p / p.sum()
    q = q / q.sum()
    m = 0.5 * (p + q)

    def kl(x: np.ndarray) -> float:
        nz = x > 0
        return float(np.sum(x[nz] * np.log2(x[nz] / m[nz])))

    return math.sqrt(max(0.5 * kl(p) + 0.5 * kl(q), 0.0))


def ks_statistic(reference_sorted: np.ndarray, sample: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic (max distance between the empirical CDFs).

    ``reference_sorted`` must be sorted. Same value as ``scipy.stats.ks_2samp(...).statistic``.

    Looked up at the sample's points only, not at the reference's: between two sample points the sample's CDF
    is flat and the reference's rises, so the distance peaks just after the first point or just before the
    next. O(m log n) for a window of m against n reference values. (Calibration counts instead, see
    :class:`HeldOut`.)
    """
    sample = np.sort(sample)
    n, m = reference_sorted.size, sample.size
    gaps = [
        np.searchsorted(sample, sample, side=side) / m - np.searchsorted(reference_sorted, sample, side=side) / n
        for side in ("right", "left")  # at each point, and just before it
    ]
    return float(max(np.max(np.abs(gaps[0])), np.max(np.abs(gaps[1]))))


@dataclass(frozen=True)
class Baseline:
    """The reference side of every comparison, in the form the metrics read."""

    coarse_counts: np.ndarray | None  # None: no coarse labels to compare
    fine_ids: tuple[int, ...]
    fine_counts: np.ndarray
    histograms: Mapping[str, Histogram]  # input statistics only
    ks_sorted: Mapping[str, np.ndarray]  # finite reservoir values of the output statistics, sorted

    @classmethod
    def of(cls, ref: Reference) -> Baseline:
        coarse = ref.coarse_counts if len(ref.coarse_classes) and ref.coarse_counts.sum() > 0 else None
        ks = {}
        for name in OUTPUT_STATS:
            col = ref.column(name)
            col = np.sort(col[np.isfinite(col)])
            if col.size:
                ks[name] = col
        hists = {name: ref.histograms[name] for name in INPUT_STATS if name in ref.histograms}
        return cls(coarse, ref.fine_ids, ref.fine_counts, hists, ks)

    def metric_names(self) -> list[str]:
        names = ["js_coarse", "psi_coarse"] if self.coarse_counts is not None else []
        names += ["js_fine", "psi_fine"]
        names += [f"ks_{name}" for name in OUTPUT_STATS if name in self.ks_sorted]
        names += [f"psi_{name}" for name in INPUT_STATS if name in self.histograms]
        return names


def _fine_counts(rows: np.ndarray, fine_ids: tuple[int, ...]) -> np.ndarray:
    return np.bincount(fine_index(fine_ids, rows[:, COL["top1"]]), minlength=len(fine_ids) + 1)


def window_metrics(rows: np.ndarray, base: Baseline) -> dict[str, float]:
    """Every metric of one window of rows (``FIELDS`` order) against ``base``; a metric without data is left
    out (e.g. motion before a second frame)."""
    out: dict[str, float] = {}
    if base.coarse_counts is not None:
        counts = class_counts(rows[:, COL["coarse"]].astype(np.int64), base.coarse_counts.size)
        if counts.sum() > 0:
            out["js_coarse"] = js_distance(base.coarse_counts, counts)
            out["psi_coarse"] = psi(base.coarse_counts, counts)
    fine = _fine_counts(rows, base.fine_ids)
    out["js_fine"] = js_distance(base.fine_counts, fine)
    out["psi_fine"] = psi(base.fine_counts, fine)
    for name, ref_sorted in base.ks_sorted.items():
        col = rows[:, COL[name]]
        col = col[np.isfinite(col)]
        if col.size:
            out[f"ks_{name}"] = ks_statistic(ref_sorted, col)
    for name, hist in base.histograms.items():
        counts = hist.count(rows[:, COL[name]])
        if counts.sum() > 0:
            out[f"psi_{name}"] = psi(hist.counts, counts)
    return out


class HeldOut:
    """The metrics of windows of reservoir rows, each against the reference *minus that window*: what an
    independent in-domain window would be compared with (counts subtracted; KS against the other reservoir
    rows). The same values :func:`window_metrics` gives against such a reduced baseline.

    Each row's class, bin and rank are looked up once, so a window costs a count over its rows and a pass
    over the reservoir's distinct values, with no sort: calibration does this 200 times, for windows of up to
    half of a 20,000-row reservoir, on the inference thread when a window in seconds meets a new size.
    """

    def __init__(self, reservoir: np.ndarray, base: Baseline) -> None:
        self.base = base
        # Rows without a value (no coarse label, NaN motion) go to one extra slot past the last, cut off later.
        self._coarse = None
        if base.coarse_counts is not None:
            coarse = reservoir[:, COL["coarse"]].astype(np.int64)
            k = base.coarse_counts.size
            self._coarse = np.where((coarse >= 0) & (coarse < k), coarse, k)
        self._fine = fine_index(base.fine_ids, reservoir[:, COL["top1"]])
        self._bins = {
            name: _slots(reservoir[:, COL[name]], h.edges, h.counts.size) for name, h in base.histograms.items()
        }
        # KS: each row's value as an index into the column's distinct values, and how many rows hold each.
        self._ranks: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name, ref_sorted in base.ks_sorted.items():
            distinct, counts = np.unique(ref_sorted, return_counts=True)
            self._ranks[name] = (_slots(reservoir[:, COL[name]], distinct, distinct.size), counts)

    def metrics(self, rows: slice | np.ndarray) -> dict[str, float]:
        """Every metric of the window of reservoir ``rows`` against the rest (same names as
        :func:`window_metrics`)."""
        base = self.base
        out: dict[str, float] = {}
        if base.coarse_counts is not None and self._coarse is not None:
            own = _count(self._coarse[rows], base.coarse_counts.size)
            if own.sum() > 0:
                rest = np.maximum(base.coarse_counts - own, 0)
                out["js_coarse"] = js_distance(rest, own)
                out["psi_coarse"] = psi(rest, own)
        own = _count(self._fine[rows], base.fine_counts.size)
        rest = np.maximum(base.fine_counts - own, 0)
        out["js_fine"] = js_distance(rest, own)
        out["psi_fine"] = psi(rest, own)
        for name, (ranks, counts) in self._ranks.items():
            own = _count(ranks[rows], counts.size)
            m = int(own.sum())
            if 0 < m < counts.sum():
                out[f"ks_{name}"] = _ks_of_counts(own, counts - own)
        for name, hist in base.histograms.items():
            own = _count(self._bins[name][rows], hist.counts.size)
            if own.sum() > 0:
                out[f"psi_{name}"] = psi(np.maximum(hist.counts - own, 0), own)
        return out


def _slots(values: np.ndarray, points: np.ndarray, size: int) -> np.ndarray:
    """Where each finite value goes among the sorted ``points`` (a histogram's right-closed bins, or the index of
    a value among them); ``size``, one past the last slot, for NaN and infinities."""
    out = np.full(values.shape, size, dtype=np.int64)
    finite = np.isfinite(values)
    out[finite] = np.searchsorted(points, values[finite], side="left")
    return out


def _count(slots: np.ndarray, size: int) -> np.ndarray:
    """How many of ``slots`` fall in each of 0..size-1 (the slot ``size`` stands for no value)."""
    return np.bincount(slots, minlength=size + 1)[:size]


def _ks_of_counts(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample KS statistic of two samples given as counts over the same sorted distinct values: their
    empirical CDFs only step at those values, so the largest gap is at one of them."""
    return float(np.max(np.abs(np.cumsum(a) / a.sum() - np.cumsum(b) / b.sum())))


@dataclass(frozen=True)
class Calibration:
    """Per metric: (warn, drift) thresholds, and the mean and std of the metric on in-domain windows of
    ``size`` frames (smaller than the windows judged when the reference is short, see
    :func:`calibration_size`)."""

    thresholds: Mapping[str, tuple[float, float]]
    null_mean: Mapping[str, float]
    null_std: Mapping[str, float]
    rounds: int
    size: int


def calibration_size(window: int, rows: int) -> int:
    """How many reservoir rows each calibration window of a reservoir of ``rows`` rows holds, to calibrate
    windows of ``window`` frames: ``window`` itself when it is at most half the rows, else the largest grid size
    (:func:`size_bucket`) that is. ValueError when not even the smallest window (MIN_WINDOW) is.

    Why half: a calibration window is compared with the rest of the reference, as a live window is with all of
    it; with less rest than window the comparison is far noisier than a live one (a reference of 251 frames left
    1 frame beside a 250-frame window, and thresholds no window could cross). A window judged with thresholds
    for a smaller one errs towards fewer alarms, as with the grid of :func:`size_bucket`.
    """
    half = rows // 2
    if half < MIN_WINDOW:
        raise ValueError(
            f"the reference keeps {rows} frames, too few to calibrate drift thresholds: it needs {2 * MIN_WINDOW} "
            f"at least (twice the shortest window, {MIN_WINDOW}); profile a longer stream"
        )
    return window if window <= half else size_bucket(half)


def calibrate(
    cfg: DriftConfig,
    reference: Reference,
    window: int | None = None,
    rounds: int = BOOTSTRAP,
    seed: int = 0,
    *,
    contiguous: bool = True,
) -> Calibration:
    """Thresholds that hold for windows of ``window`` frames (default ``cfg.window``) of in-domain data.

    A window of a few hundred frames differs from the reference by sampling noise alone, and for sparse
    distributions (20 fine classes) that noise exceeds the textbook PSI / JS thresholds. So: draw ``rounds``
    windows from the reference's reservoir and compare each with the reference *minus that window*
    (:class:`HeldOut`), which is what an in-domain window would see. The windows hold
    :func:`calibration_size` rows: ``window``, or fewer when the reservoir has less than twice that.

    Each window is a run of consecutive stream frames, inside one of the reservoir's blocks (never across the
    gap between two blocks), not rows drawn at random: a camera's frames are correlated (a person walking
    through fills a whole window), so its windows vary far more than random draws suggest, and thresholds from
    random draws raise false alarms. Rows on both sides of a gap are as far apart as random draws, which is
    why a window must not straddle one. On a stream of independent frames (a shuffled dataset) both ways give
    the same thresholds. ``contiguous=False`` draws at random (tests compare the two). Then, per metric:

    - warn = max(configured warn, mean + ``cfg.sigmas`` x std of the metric over those windows);
    - drift = max(configured drift, warn x configured drift / configured warn): the noise raises both levels by
      the same factor, so a shift must still be as many times the warn level as the defaults ask. For JS and
      KS, which cannot exceed 1, the scaled level stops halfway from warn to 1, so it can still fire.

    The defaults are floors: a large window on a steady reference keeps the textbook thresholds.
    """
    n = reference.reservoir.shape[0]
    size = calibration_size(window or cfg.window_frames, n)
    held_out = HeldOut(reference.reservoir, Baseline.of(reference))
    rng = np.random.default_rng(seed)
    starts = _window_starts(reference, size) if contiguous else None
    samples: dict[str, list[float]] = {name: [] for name in held_out.base.metric_names()}
    for _ in range(rounds):
        if starts is not None:
            start = starts(rng)
            rows: slice | np.ndarray = slice(start, start + size)
        else:
            rows = rng.choice(n, size=size, replace=False)
        for name, value in held_out.metrics(rows).items():
            samples.setdefault(name, []).append(value)
    thresholds: dict[str, tuple[float, float]] = {}
    means: dict[str, float] = {}
    stds: dict[str, float] = {}
    for name, values in samples.items():
        arr = np.asarray(values, dtype=np.float64)
        arr = arr[np.isfinite(arr)]
        means[name] = float(arr.mean()) if arr.size else 0.0
        stds[name] = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
        thresholds[name] = levels(cfg, name, means[name], stds[name])
    return Calibration(thresholds, means, stds, rounds, size)


def levels(cfg: DriftConfig, metric: str, mean: float, std: float) -> tuple[float, float]:
    """(warn, drift) thresholds of ``metric`` whose in-domain windows have this mean and std (see
    :func:`calibrate`)."""
    warn0, drift0 = _defaults(cfg, metric)
    warn = max(warn0, mean + cfg.sigmas * std)
    # By the shipped drift/warn ratio, not the configured one: a lower warn floor (drift.psi_warn = 0.02, for
    # earlier warnings) would otherwise push drift out of reach wherever noise sets warn.
    shipped_warn, shipped_drift = _defaults(SHIPPED, metric)
    scaled = warn * shipped_drift / shipped_warn
    if family(metric) in BOUNDED:
        # Never below warn: a warn level at 1 already cannot fire, and drift must not undercut it.
        scaled = min(scaled, max(warn, (warn + 1) / 2))
    return warn, max(drift0, scaled)


def _window_starts(reference: Reference, w: int) -> Callable[[np.random.Generator], int]:
    """A draw of the first reservoir row of a ``w``-row window, uniform over the windows that fit in a block."""
    n = reference.reservoir.shape[0]
    if reference.blocks is None:
        logger.warning(
            "drift: the reference is an older profile whose %d rows were drawn one by one from %d frames, so "
            "thresholds calibrated on it are too tight for a camera's correlated frames: run 'eyed profile' again",
            n,
            reference.frames,
        )
        lengths = np.array([n])
    else:
        lengths = np.array([length for _, length in reference.blocks])
        if lengths.max() < w and w > RESERVOIR:
            logger.warning(
                "drift: windows of %d frames are longer than a profile's blocks can be (%d frames), so "
                "calibration windows join blocks and thresholds may be too tight: use shorter windows",
                w,
                RESERVOIR,
            )
            lengths = np.array([n])
        elif lengths.max() < w:
            logger.warning(
                "drift: the reference's blocks of consecutive frames (%d at most) are shorter than a window (%d), "
                "so thresholds are too tight for a camera's correlated frames: run 'eyed profile' again with the "
                "drift.window or drift.window_s used here",
                lengths.max(),
                w,
            )
            lengths = np.array([n])
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    fits = lengths >= w
    # Windows that fit in each block, and where each block's first window is in that count.
    count = lengths[fits] - w + 1
    first = np.concatenate([[0], np.cumsum(count)[:-1]])
    offsets = offsets[fits]

    def draw(rng: np.random.Generator) -> int:
        i = int(rng.integers(0, int(count.sum())))
        b = int(np.searchsorted(first, i, side="right")) - 1
        return int(offsets[b] + i - first[b])

    return draw


def size_bucket(n: int) -> int:
    """The calibrated window size for a window of ``n`` frames: the largest grid size at or below ``n``."""
    # One step above the exact logarithm, then down: the grid sizes are rounded, so 28 (from 28.28) must serve 28.
    k = math.floor(BUCKET_STEPS * math.log2(max(n, MIN_WINDOW) / MIN_WINDOW)) + 1
    while (size := round(MIN_WINDOW * 2 ** (k / BUCKET_STEPS))) > n and k > 0:
        k -= 1
    return size


def _defaults(cfg: DriftConfig, metric: str) -> tuple[float, float]:
    fam = family(metric)
    return float(getattr(cfg, f"{fam}_warn")), float(getattr(cfg, f"{fam}_drift"))


@dataclass(frozen=True)
class WindowReport:
    """The verdict on one window of frames.

    ``fired`` lists the metrics over the threshold that matches the status, most exceeded first: over their
    drift threshold when the status is ``drift``, over their warn threshold when it is ``warn`` (this includes a
    window over a drift threshold that is not yet ``cfg.consecutive`` in a row), empty when ``ok``.
    """

    window: int  # index from 0 over the monitor's life, learning windows included
    n: int  # frames in the window
    span_s: float | None  # seconds from its first frame to its last; None when the frames came without times
    status: Status
    metrics: Mapping[str, float]
    fired: tuple[str, ...]
    thresholds: Mapping[str, tuple[float, float]]  # metric -> (warn, drift)
    reference: Literal["file", "self"]
    learning: bool
    summary: Mapping[str, float]  # mean of each statistic over the window, for people


def check_fine_labels(reference: Reference, labels: Sequence[str]) -> None:
    """ValueError unless the reference's fine classes are the same classes in this model: a profile made with
    another model that shares the coarse classes (the ImageNet model before ``eyed finetune``, say) would
    compare unrelated class ids and entropies, and report drift on in-domain frames."""
    for class_id, name in zip(reference.fine_ids, reference.fine_labels, strict=True):
        here = repr(labels[class_id]) if class_id < len(labels) else f"missing (it has {len(labels)} classes)"
        if class_id >= len(labels) or (name and labels[class_id] != name):
            raise ValueError(
                f"the drift reference's class {class_id} is {name!r}, the model's {here}: the reference was "
                "made with another model; profile this model again"
            )


class DriftMonitor:
    """Feeds on :class:`FrameStats`; every ``cfg.window`` frames (or ``cfg.window_s`` seconds of frame times)
    returns a :class:`WindowReport`.

    With ``reference=None`` the first ``cfg.learn_windows`` windows become the reference (status ``ok``,
    ``learning=True``, no metrics; more windows while they hold fewer than 2 x MIN_WINDOW frames, the least a
    reference can be calibrated with) and the monitor then compares with that, reporting ``reference="self"``.
    ``coarse_classes`` names the extractor's coarse indices; needed only when learning, and checked against a
    given reference. ValueError for a reference it cannot use.
    """

    def __init__(
        self,
        cfg: DriftConfig,
        reference: Reference | None,
        *,
        coarse_classes: Sequence[str] | None = None,
        labels: Sequence[str] | None = None,
        rounds: int = BOOTSTRAP,
        seed: int = 0,
    ) -> None:
        self.cfg = cfg
        self.rounds = rounds
        self.seed = seed
        self.origin: Literal["file", "self"] = "file" if reference is not None else "self"
        if reference is not None and coarse_classes is not None and tuple(coarse_classes) != reference.coarse_classes:
            raise ValueError(
                f"the drift reference has coarse classes {list(reference.coarse_classes)}, the model "
                f"{list(coarse_classes)}: profile this model again"
            )
        if reference is not None and labels is not None:
            check_fine_labels(reference, labels)
        if reference is not None:
            note_fixed_classes(cfg, reference)
        self._buf = np.empty((cfg.window_frames, len(FIELDS)), dtype=np.float64)
        self._fill = 0
        self._t0: float | None = None  # time of the window's first frame
        self._t1: float | None = None  # and of its last
        self._calibrations: dict[int, Calibration] = {}
        self._expected_fps = 0.0
        self._window = 0
        self._streak = 0
        self._longest = 0  # frames in the longest window learned so far
        self._warned_short = False
        # Frames left out when an outage ended a window too short to judge (see update).
        self.dropped = 0
        self._last_t: float | None = None  # time of the last frame, of whichever window
        self._intervals: deque[float] = deque(maxlen=INTERVALS)  # the last intervals between frames
        self._learner: ProfileBuilder | None = None
        self.reference: Reference | None = None
        self.calibration: Calibration | None = None
        self._base: Baseline | None = None
        if reference is not None:
            self._use(reference)
        else:
            self._learner = ProfileBuilder(
                coarse_classes or (),
                top_classes=cfg.top_classes,
                # Both set from what was learned when the reference is built (learned_sample).
                reservoir=RESERVOIR,
                block=cfg.window_frames,
                labels=labels,
                source="first windows of this run",
                seed=seed,
            )

    @property
    def learning(self) -> bool:
        return self._base is None

    @property
    def thresholds(self) -> Mapping[str, tuple[float, float]]:
        """(warn, drift) per metric for windows of ``cfg.window`` frames; empty while learning and with
        ``cfg.window_s``, where they depend on each window's size (its report carries them)."""
        return self.calibration.thresholds if self.calibration is not None else {}

    def _use(self, reference: Reference) -> None:
        # Refused here, not when a window in seconds first closes: every later size then calibrates.
        calibration_size(MIN_WINDOW, reference.reservoir.shape[0])
        # Calibrated before anything is assigned: a failure leaves the monitor as it was.
        calibration = None
        if self.cfg.window_s is None:
            calibration = self._calibrate(reference, self.cfg.window_frames)
        expected: dict[int, Calibration] = {}
        for size in self._expected():
            expected[size] = self._calibrate(reference, size, expected.values())
        self.reference = reference
        self._base = Baseline.of(reference)
        self._calibrations = expected
        self.calibration = calibration
        if expected:
            logger.info("drift: thresholds calibrated for windows of %s frames", ", ".join(map(str, expected)))

    def expect_rate(self, fps: float) -> None:
        """With ``cfg.window_s``: calibrate now for the window sizes a source at ``fps`` frames a second gives
        (a paced replay's or a camera's configured rate), so that the first windows do not wait for it on the
        inference thread. A rate that turns out different is calibrated when met, as without this."""
        self._expected_fps = fps
        if self.reference is not None:
            for size in self._expected():
                self._calibrated(size)

    def _expected(self) -> list[int]:
        """The grid sizes of windows in seconds at the expected frame rate (none without one)."""
        seconds = self.cfg.window_s
        if seconds is None or self._expected_fps <= 0:
            return []
        # The first frame at or after window_s closes the window; jitter moves that by a frame either way.
        n = math.ceil(seconds * self._expected_fps) + 1
        return sorted({size_bucket(min(max(m, MIN_WINDOW), MAX_WINDOW)) for m in (n - 1, n, n + 1)})

    def _calibrated(self, size: int) -> Calibration:
        """With ``cfg.window_s``: the calibration for windows of ``size`` frames, computed on first use (about
        0.05 s with a 5,000-row reservoir, 0.1 s with 20,000, whatever the size, on the inference thread: once
        per grid size, and a steady frame rate meets one or two)."""
        cal = self._calibrations.get(size)
        if cal is None:
            assert self.reference is not None
            cal = self._calibrate(self.reference, size, self._calibrations.values())
            self._calibrations[size] = cal
            logger.info("drift: thresholds calibrated for windows of %d frames", size)
        return cal

    def _calibrate(self, reference: Reference, size: int, made: Iterable[Calibration] = ()) -> Calibration:
        """Thresholds for windows of ``size`` frames; one of ``made`` when it was calibrated on the same windows
        (sizes over half a short reference all calibrate on the largest size that fits)."""
        rows = reference.reservoir.shape[0]
        target = calibration_size(size, rows)
        cal = next((c for c in made if c.size == target), None)
        if cal is None:
            cal = calibrate(self.cfg, reference, size, self.rounds, self.seed)
        if cal.size < size and not self._warned_short:
            self._warned_short = True
            logger.warning(
                "drift: the reference keeps %d frames, fewer than twice a window, so windows of %d frames are judged "
                "with thresholds calibrated on windows of %d (each must leave as many frames to compare with): "
                "milder drift goes unnoticed; %s",
                rows,
                size,
                cal.size,
                short_reference_advice(self.origin, rows, reference.frames),
            )
        return cal

    def update(self, stats: FrameStats, t: float | None = None) -> WindowReport | None:
        """Add one frame, seen at ``t`` (monotonic seconds; needed with ``cfg.window_s``); the report when this
        frame completes a window, else None."""
        seconds = self.cfg.window_s
        if t is None and seconds is not None:
            raise ValueError("drift.window_s needs the time of every frame")
        report = None
        # A gap as long as a window (the camera was offline): the window ends before it rather than judge the
        # scene before the outage together with the first frame after it.
        gap = t is not None and seconds is not None and self._fill > 0 and self._outage(t, seconds)
        if t is not None:
            if self._last_t is not None:
                self._intervals.append(t - self._last_t)
            self._last_t = t
        if gap and self._fill >= MIN_WINDOW:
            report = self._finish()
        elif gap:
            # Too few to judge: kept, they would open a window that spans the outage.
            self._drop_window()
        if self._fill == self._buf.shape[0]:
            # Only a window in seconds outgrows its first size (drift.window rows).
            grown = np.empty((min(2 * self._fill, MAX_WINDOW), len(FIELDS)), dtype=np.float64)
            grown[: self._fill] = self._buf
            self._buf = grown
        self._buf[self._fill] = stats
        self._fill += 1
        if t is not None:
            self._t0 = t if self._fill == 1 else self._t0
            self._t1 = t
        if report is None and self._complete(t):
            report = self._finish()
        return report

    def _outage(self, t: float, seconds: float) -> bool:
        """Whether the pause before a frame at ``t`` is an outage (:data:`OUTAGE_FACTOR`)."""
        if not self._intervals:  # the stream's first frame alone: nothing says what its pauses are like
            return False
        assert self._last_t is not None
        return t - self._last_t >= max(seconds, OUTAGE_FACTOR * statistics.median(self._intervals))

    def _drop_window(self) -> None:
        """Leave the frames buffered so far out, and start a new window."""
        logger.info(
            "drift: an outage after %d frames of a window, fewer than %d: they are left out and a new window starts",
            self._fill,
            MIN_WINDOW,
        )
        self.dropped += self._fill
        self._fill, self._t0, self._t1 = 0, None, None

    def _finish(self) -> WindowReport:
        """The report on the frames buffered so far, which then start over."""
        span = self._t1 - self._t0 if self._t0 is not None and self._t1 is not None else None
        rows, self._fill, self._t0, self._t1 = self._buf[: self._fill], 0, None, None
        report = self._close(rows, span)
        self._window += 1
        return report

    def _complete(self, t: float | None) -> bool:
        seconds = self.cfg.window_s
        if seconds is None:
            return self._fill >= self.cfg.window_frames
        if self._fill >= MAX_WINDOW:
            return True
        assert t is not None and self._t0 is not None
        return self._fill >= MIN_WINDOW and t - self._t0 >= seconds

    def _close(self, rows: np.ndarray, span: float | None) -> WindowReport:
        summary = window_summary(rows)
        n = rows.shape[0]
        if self._base is None:
            learner = self._learner
            assert learner is not None
            # Windows in seconds on a fast source can hold up to MAX_WINDOW frames each: what the learner
            # keeps stays bounded all the same.
            learner.add_rows(rows[: MAX_LEARNED - learner.frames])
            self._longest = max(self._longest, n)
            full = learner.frames >= MAX_LEARNED
            if full and self._window + 1 < self.cfg.learn_windows:
                logger.info(
                    "drift: learning ends after %d windows, not drift.learn_windows=%d: they hold the %d frames a "
                    "learned reference is made from",
                    self._window + 1,
                    self.cfg.learn_windows,
                    MAX_LEARNED,
                )
            # learn_windows = 1 with windows of fewer than 2 x MIN_WINDOW frames: one more window.
            if (full or self._window + 1 >= self.cfg.learn_windows) and learner.frames >= 2 * MIN_WINDOW:
                learner.reservoir_size, learner.block = learned_sample(learner.frames, self._longest)
                self._use(learner.build())
                self._learner = None
                logger.info(
                    "drift: no reference profile given; learned one from the first %d frames (%d windows): "
                    "later windows are compared with it",
                    learner.frames,
                    self._window + 1,
                )
            return WindowReport(self._window, n, span, "ok", {}, (), {}, "self", True, summary)
        metrics = window_metrics(rows, self._base)
        cal = self.calibration if self.cfg.window_s is None else self._calibrated(size_bucket(n))
        assert cal is not None
        thresholds = cal.thresholds
        over_warn = _over(metrics, thresholds, 0)
        over_drift = _over(metrics, thresholds, 1)
        self._streak = self._streak + 1 if over_drift else 0
        status: Status
        if self._streak >= self.cfg.consecutive:
            status, fired = "drift", over_drift
        elif over_warn:
            status, fired = "warn", over_warn
        else:
            status, fired = "ok", ()
        return WindowReport(
            self._window,
            n,
            span,
            status,
            metrics,
            fired,
            {name: thresholds[name] for name in metrics if name in thresholds},
            self.origin,
            False,
            summary,
        )


def learned_sample(frames: int, longest: int) -> tuple[int, int]:
    """(reservoir rows, frames per block) of a reference learned from ``frames`` frames in windows of up to
    ``longest`` frames: every frame, in one block, up to a profile's largest reservoir; beyond that, blocks as
    a profile keeps them (a window long, at most RESERVOIR frames, four blocks at least), so memory and the
    time calibration takes on the inference thread stay bounded however long the windows."""
    if frames <= LEARNED_RESERVOIR:
        return frames, frames
    block = min(RESERVOIR, longest)
    return min(LEARNED_RESERVOIR, max(RESERVOIR, 4 * block)), block


def note_fixed_classes(cfg: DriftConfig, reference: Reference) -> None:
    """Log that ``drift.top_classes`` does not apply to a reference file, which fixes the fine classes."""
    held = len(reference.fine_ids)
    if cfg.top_classes == held:
        return
    # A warning only for a value someone set: the default differs from files of streams with fewer classes.
    level = logging.WARNING if "top_classes" in cfg.model_fields_set else logging.INFO
    logger.log(
        level,
        "drift: drift.top_classes (%d) does not apply to a reference file: it compares the %d fine classes it "
        "was profiled with",
        cfg.top_classes,
        held,
    )


def short_reference_advice(origin: Literal["file", "self"], rows: int, frames: int) -> str:
    """What makes a reference long enough for its windows: it keeps every frame, or a sample of them."""
    if origin == "self":
        return "raise drift.learn_windows" if rows == frames else "use shorter windows"
    if rows == frames:
        return "profile a longer stream"
    return "run 'eyed profile' with the window used here, or use shorter windows"


def _over(metrics: Mapping[str, float], thresholds: Mapping[str, tuple[float, float]], level: int) -> tuple[str, ...]:
    """Metrics over their threshold at ``level`` (0 warn, 1 drift), most exceeded (by ratio) first."""
    over = [
        (value / thresholds[name][level], name)
        for name, value in metrics.items()
        if name in thresholds and value > thresholds[name][level]
    ]
    return tuple(name for _, name in sorted(over, key=lambda x: (-x[0], x[1])))


def window_summary(rows: np.ndarray) -> dict[str, float]:
    """Mean of each numeric statistic over a window (NaN left out; a statistic with no value is omitted)."""
    out = {}
    for name in NUMERIC_STATS:
        col = rows[:, COL[name]]
        col = col[np.isfinite(col)]
        if col.size:
            out[name] = float(col.mean())
    return out


def _num(value: float) -> float | None:
    """A JSON-safe number, to 6 significant digits; None for NaN and infinities."""
    return float(f"{value:.6g}") if math.isfinite(value) else None


def format_window(report: WindowReport) -> str:
    """One structured log line: ``drift window=3 n=250 status=ok reference=file psi_brightness=0.0123 ...``."""
    parts = [
        f"drift window={report.window}",
        f"n={report.n}",
        *([f"span_s={report.span_s:.3g}"] if report.span_s is not None else []),
        f"status={report.status}",
        f"reference={report.reference}",
    ]
    if report.learning:
        parts.append("learning=true")
    parts += [f"{name}={value:.4g}" for name, value in report.metrics.items()]
    if report.fired:
        parts.append("fired=" + ",".join(report.fired))
    if report.learning:
        parts += [f"mean_{name}={value:.4g}" for name, value in report.summary.items()]
    return " ".join(parts)


def window_payload(report: WindowReport, source: str, seq: int, ts: float) -> dict[str, Any]:
    """The JSON-ready payload of ``drift.<source>`` for one window (numbers only: no pixels)."""
    return {
        "schema": SCHEMA,
        "type": "drift",
        "source": source,
        "seq": seq,
        "ts": round(ts, 6),
        "window": report.window,
        "n": report.n,
        "span_s": None if report.span_s is None else _num(report.span_s),
        "status": report.status,
        "metrics": {name: _num(value) for name, value in report.metrics.items()},
        "fired": list(report.fired),
        "thresholds": {name: [_num(w), _num(d)] for name, (w, d) in report.thresholds.items()},
        "reference": report.reference,
        "learning": report.learning,
        "summary": {name: _num(value) for name, value in report.summary.items()},
    }
