"""Windows, calibration, status with anti-flapping, learning without a reference, log line and payload."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np
import pytest

from eyed.cli import EXIT_CONFIG, main
from eyed.config import MAX_WINDOW, ConfigError, DriftConfig, load_settings
from eyed.drift import monitor as monitor_module
from eyed.drift.monitor import (
    Calibration,
    DriftMonitor,
    WindowReport,
    _window_starts,
    calibrate,
    format_window,
    learned_sample,
    levels,
    size_bucket,
    window_payload,
)
from eyed.drift.reference import ProfileBuilder, Reference, load_reference, reference_from_dict
from eyed.drift.stats import FrameStats, StatsExtractor
from tests.daemon_helpers import finish, start_daemon
from tests.drift import COARSE, scene_stream, synthetic_stats
from tests.drift.test_stats import prediction as stats_prediction

ALL_METRICS = {
    "js_coarse",
    "psi_coarse",
    "js_fine",
    "psi_fine",
    "ks_confidence",
    "ks_margin",
    "ks_entropy",
    "psi_brightness",
    "psi_contrast",
    "psi_sharpness",
    "psi_clipped",
    "psi_motion",
}


@pytest.fixture(scope="module")
def reference() -> Reference:
    builder = ProfileBuilder(COARSE, top_classes=20)
    for s in synthetic_stats(5000, seed=100):
        builder.add(s)
    return builder.build()


def feed(monitor: DriftMonitor, stats: list[FrameStats]) -> list[WindowReport]:
    return [r for r in map(monitor.update, stats) if r is not None]


def test_a_report_every_window(reference: Reference) -> None:
    monitor = DriftMonitor(DriftConfig(window=100), reference)
    reports = feed(monitor, synthetic_stats(450, seed=1))
    assert [r.window for r in reports] == [0, 1, 2, 3]
    assert all(r.n == 100 and r.reference == "file" and not r.learning for r in reports)
    assert set(reports[0].metrics) == ALL_METRICS
    assert set(reports[0].thresholds) == ALL_METRICS
    assert reports[0].summary["brightness"] == pytest.approx(120, abs=10)


def test_calibration_raises_thresholds_for_small_windows(reference: Reference) -> None:
    cfg = DriftConfig()
    small = calibrate(cfg, reference, window=50, rounds=100)
    large = calibrate(cfg, reference, window=1000, rounds=100)
    # 20 sparse fine classes in 50 frames: sampling noise alone is far over the textbook PSI of 0.1.
    assert small.null_mean["psi_fine"] > cfg.psi_warn
    warn, drift = small.thresholds["psi_fine"]
    assert warn >= small.null_mean["psi_fine"] + cfg.sigmas * small.null_std["psi_fine"] - 1e-9
    assert drift == pytest.approx(warn * cfg.psi_drift / cfg.psi_warn)
    for name in ALL_METRICS:
        assert small.thresholds[name][0] >= large.thresholds[name][0] - 1e-9, name
    # The configured values are floors: big windows keep them.
    assert large.thresholds["psi_brightness"] == (cfg.psi_warn, cfg.psi_drift)
    assert large.thresholds["ks_confidence"] == (cfg.ks_warn, cfg.ks_drift)


def test_calibration_is_seeded(reference: Reference) -> None:
    cfg = DriftConfig(window=100)
    assert calibrate(cfg, reference, rounds=50, seed=3) == calibrate(cfg, reference, rounds=50, seed=3)


def test_in_domain_stream_raises_no_drift_even_with_small_windows(reference: Reference) -> None:
    for window in (50, 250):
        monitor = DriftMonitor(DriftConfig(window=window), reference)
        reports = feed(monitor, synthetic_stats(window * 60, seed=7))
        statuses = [r.status for r in reports]
        assert statuses.count("drift") == 0, window
        # Each of the 12 metrics warns on ~1-2% of in-domain windows (mean + 3 std of a skewed statistic), so
        # about one window in ten warns; uncalibrated, psi_fine alone would warn on most 50-frame windows.
        assert statuses.count("warn") <= 0.2 * len(statuses), (window, statuses.count("warn"))


def test_without_calibration_small_windows_would_alarm(reference: Reference) -> None:
    """The reason calibration exists: the textbook thresholds call in-domain sampling noise drift."""
    cfg = DriftConfig(window=50)
    monitor = DriftMonitor(cfg, reference)
    reports = feed(monitor, synthetic_stats(2000, seed=7))
    raw_over = sum(1 for r in reports if r.metrics["psi_fine"] > cfg.psi_drift)
    assert raw_over > len(reports) // 4
    assert all(r.status != "drift" for r in reports)


def test_shift_is_drift_only_after_consecutive_windows(reference: Reference) -> None:
    cfg = DriftConfig(window=100, consecutive=3)
    monitor = DriftMonitor(cfg, reference)
    clean = feed(monitor, synthetic_stats(300, seed=2))
    dark = feed(monitor, synthetic_stats(500, seed=3, brightness=40))
    assert [r.status for r in clean] == ["ok"] * 3 or all(r.status != "drift" for r in clean)
    assert [r.status for r in dark] == ["warn", "warn", "drift", "drift", "drift"]
    assert dark[0].fired[0] == "psi_brightness"  # warn windows list metrics over warn, most exceeded first
    assert dark[2].fired == ("psi_brightness",)  # drift windows list metrics over drift
    assert all(r.metrics["psi_brightness"] > r.thresholds["psi_brightness"][1] for r in dark)


def test_one_odd_window_does_not_flap_to_drift(reference: Reference) -> None:
    monitor = DriftMonitor(DriftConfig(window=100, consecutive=2), reference)
    stream = [
        *synthetic_stats(200, seed=4),
        *synthetic_stats(100, seed=5, sharpness=40),
        *synthetic_stats(200, seed=6),
        *synthetic_stats(100, seed=8, sharpness=40),
        *synthetic_stats(100, seed=9),
    ]
    statuses = [r.status for r in feed(monitor, stream)]
    assert statuses[2] == "warn" and statuses[5] == "warn"
    assert "drift" not in statuses


def test_recovery_ends_drift(reference: Reference) -> None:
    monitor = DriftMonitor(DriftConfig(window=100, consecutive=2), reference)
    reports = feed(monitor, [*synthetic_stats(300, seed=3, brightness=40), *synthetic_stats(300, seed=4)])
    assert [r.status for r in reports][:3] == ["warn", "drift", "drift"]
    assert reports[-1].status == "ok"


def test_correlated_camera_frames_raise_no_false_drift() -> None:
    """Calibration windows are runs of consecutive frames: a camera whose scene changes every few hundred
    frames stays out of drift against a reference recorded from the same camera. Windows drawn at random
    from the same reference underestimate how much such windows vary, and alarm."""
    builder = ProfileBuilder(COARSE, top_classes=20)
    for s in scene_stream(4000, seed=1):
        builder.add(s)
    ref = builder.build()
    cfg = DriftConfig(window=250)
    live = scene_stream(10_000, seed=2)

    def statuses(calibration: Calibration) -> list[str]:
        monitor = DriftMonitor(cfg, ref, rounds=1)  # its own calibration is replaced by the one under test
        monitor.calibration = calibration
        return [r.status for r in feed(monitor, live)]

    contiguous = statuses(calibrate(cfg, ref))
    shuffled = statuses(calibrate(cfg, ref, contiguous=False))
    assert len(contiguous) == 40
    assert contiguous.count("drift") == 0 and contiguous.count("warn") <= 12
    assert shuffled.count("drift") >= 4 and shuffled.count("warn") > contiguous.count("warn")


def test_a_long_reference_raises_no_more_false_alarms_than_a_short_one() -> None:
    """A profile keeps about 5,000 rows however long its stream. Rows drawn one by one from 40,000 or 100,000
    frames are 8-20 frames apart, so a calibration window of 250 of them spans 8-20 times more scenes than a
    live window, varies too little, and its thresholds called clean windows drift (1 and 8 of these 40). Rows
    kept in blocks of consecutive frames calibrate like the short reference, which keeps every frame."""
    rows = scene_stream(100_000, seed=1)
    cfg = DriftConfig(window=250)
    live = scene_stream(10_000, seed=2)

    def statuses(frames: int) -> list[str]:
        builder = ProfileBuilder(COARSE, top_classes=20)
        builder.add_many(rows[:frames])
        ref = builder.build()
        assert ref.reservoir.shape[0] == min(frames, 5000)
        return [r.status for r in feed(DriftMonitor(cfg, ref), live)]

    short = statuses(4000)
    assert short.count("drift") == 0 and short.count("warn") <= 12
    for frames in (40_000, 100_000):
        long = statuses(frames)
        assert long.count("drift") == 0, frames
        assert long.count("warn") <= max(12, short.count("warn") + 4), (frames, long.count("warn"))


def test_calibration_windows_stay_inside_one_block() -> None:
    """Rows on both sides of a gap between blocks are far apart in the stream: a window across it would mix
    scenes. Every window that fits in a block is drawn, and none other."""
    builder = ProfileBuilder(COARSE, top_classes=20)
    builder.add_many(synthetic_stats(1150))
    ref = dataclasses.replace(builder.build(), frames=9000, blocks=((0, 300), (1000, 100), (5000, 750)))
    draw = _window_starts(ref, 250)
    rng = np.random.default_rng(0)
    starts = {draw(rng) for _ in range(5000)}
    assert starts == set(range(0, 51)) | set(range(400, 901))


def test_an_old_profile_sampled_frame_by_frame_is_used_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    builder = ProfileBuilder(COARSE, top_classes=20, reservoir=1000)
    builder.add_many(synthetic_stats(3000))
    old = dataclasses.replace(builder.build(), blocks=None)  # what a schema 1 file of a long stream loads as
    with caplog.at_level(logging.WARNING, logger="eyed.drift.monitor"):
        calibration = calibrate(DriftConfig(window=250), old, rounds=20)
    assert set(calibration.thresholds) == ALL_METRICS
    assert any("run 'eyed profile' again" in r.message for r in caplog.records)


def test_learning_without_a_reference(caplog: pytest.LogCaptureFixture) -> None:
    cfg = DriftConfig(window=100, learn_windows=3)
    monitor = DriftMonitor(cfg, None, coarse_classes=COARSE)
    assert monitor.learning
    with caplog.at_level(logging.INFO, logger="eyed.drift.monitor"):
        learning = feed(monitor, synthetic_stats(300, seed=10))
        assert [(r.status, r.learning, r.reference, dict(r.metrics)) for r in learning] == [
            ("ok", True, "self", {})
        ] * 3
        assert all("brightness" in r.summary for r in learning)  # raw statistics still reported
        assert not monitor.learning and monitor.reference is not None and monitor.reference.frames == 300
        after = feed(monitor, synthetic_stats(400, seed=11))
        dark = feed(monitor, synthetic_stats(200, seed=12, brightness=40))
    assert sum("learned one from the first 300 frames" in r.message for r in caplog.records) == 1
    assert all(r.reference == "self" and not r.learning for r in after + dark)
    assert set(after[0].metrics) == ALL_METRICS
    assert all(r.status != "drift" for r in after)
    assert [r.status for r in dark] == ["warn", "drift"]
    assert [r.window for r in learning + after + dark] == list(range(9))


def test_coarse_classes_must_match_the_reference(reference: Reference) -> None:
    with pytest.raises(ValueError, match="coarse classes"):
        DriftMonitor(DriftConfig(), reference, coarse_classes=("a", "b"))


def test_a_reference_made_with_another_model_is_refused() -> None:
    """Same coarse classes, different fine classes (the ImageNet model against one fine-tuned on CIFAR-10):
    the reference's class ids would mean other classes, and in-domain frames would look like drift."""
    labels = [f"class {i}" for i in range(61)]
    builder = ProfileBuilder(COARSE, top_classes=20, labels=labels)
    for s in synthetic_stats(2000, seed=7):
        builder.add(s)
    ref = builder.build()
    DriftMonitor(DriftConfig(), ref, coarse_classes=COARSE, labels=labels)  # the model it was made with
    renamed = [*labels]
    renamed[ref.fine_ids[3]] = "another class"
    with pytest.raises(ValueError, match=r"is 'class \d+', the model's 'another class': .* another model"):
        DriftMonitor(DriftConfig(), ref, coarse_classes=COARSE, labels=renamed)
    # A native CIFAR-10 model (eyed finetune): its class 1 is "automobile".
    with pytest.raises(ValueError, match=r"class 1 is 'class 1', the model's 'automobile'"):
        DriftMonitor(DriftConfig(), ref, coarse_classes=COARSE, labels=list(COARSE))
    with pytest.raises(ValueError, match=r"missing \(it has 1 classes\)"):
        DriftMonitor(DriftConfig(), ref, coarse_classes=COARSE, labels=labels[:1])


def test_no_coarse_labels_means_no_coarse_metrics() -> None:
    builder = ProfileBuilder((), top_classes=5)
    rows = [s._replace(coarse=-1) for s in synthetic_stats(1000)]
    for s in rows:
        builder.add(s)
    monitor = DriftMonitor(DriftConfig(window=100), builder.build())
    report = feed(monitor, rows[:100])[0]
    assert "js_coarse" not in report.metrics and "js_fine" in report.metrics


def test_format_window_is_one_structured_line(reference: Reference) -> None:
    monitor = DriftMonitor(DriftConfig(window=100), reference)
    report = feed(monitor, synthetic_stats(100, seed=3, brightness=40))[0]
    line = format_window(report)
    assert "\n" not in line and line.startswith("drift window=0 n=100 status=warn reference=file ")
    fields = dict(part.split("=", 1) for part in line.split()[1:])
    assert float(fields["psi_brightness"]) == pytest.approx(report.metrics["psi_brightness"], rel=1e-3)
    assert fields["fired"].split(",")[0] == "psi_brightness"


def test_payload_is_json_ready(reference: Reference) -> None:
    monitor = DriftMonitor(DriftConfig(window=100), reference)
    report = feed(monitor, synthetic_stats(100, seed=3))[0]
    payload = window_payload(report, "cam1", seq=7, ts=1700000000.123456789)
    assert set(payload) == {
        "schema",
        "type",
        "source",
        "seq",
        "ts",
        "window",
        "n",
        "span_s",
        "status",
        "metrics",
        "fired",
        "thresholds",
        "reference",
        "learning",
        "summary",
    }
    assert (payload["schema"], payload["type"], payload["source"], payload["seq"]) == (1, "drift", "cam1", 7)
    assert payload["span_s"] is None  # fed without frame times
    assert payload["thresholds"]["psi_fine"] == [pytest.approx(v, rel=1e-5) for v in report.thresholds["psi_fine"]]
    assert json.loads(json.dumps(payload, allow_nan=False)) == payload


def test_payload_of_a_learning_window_has_no_nan() -> None:
    monitor = DriftMonitor(DriftConfig(window=20), None)
    stats = [s._replace(motion=float("nan")) for s in synthetic_stats(20)]
    report = feed(monitor, stats)[0]
    payload = window_payload(report, "cam", 0, 0.0)
    assert "motion" not in payload["summary"]
    json.dumps(payload, allow_nan=False)


def test_payload_carries_non_finite_numbers_as_null() -> None:
    # A metric over an empty bin or a span from a clock that jumped: JSON cannot carry NaN or infinity, and a
    # payload the publisher refuses would cost the window's event.
    nan, inf = float("nan"), float("inf")
    report = WindowReport(
        window=0,
        n=10,
        span_s=inf,
        status="ok",
        metrics={"psi_brightness": nan, "ks_confidence": 0.1234567},
        fired=(),
        thresholds={"psi_brightness": (nan, -inf)},
        reference="file",
        learning=False,
        summary={"brightness": nan},
    )
    payload = window_payload(report, "cam", 0, 0.0)
    assert payload["span_s"] is None
    assert payload["metrics"] == {"psi_brightness": None, "ks_confidence": 0.123457}
    assert payload["thresholds"] == {"psi_brightness": [None, None]}
    assert payload["summary"] == {"brightness": None}
    json.dumps(payload, allow_nan=False)


def test_window_rows_do_not_leak_between_windows(reference: Reference) -> None:
    monitor = DriftMonitor(DriftConfig(window=50), reference)
    first = feed(monitor, synthetic_stats(50, seed=3, brightness=40))[0]
    second = feed(monitor, synthetic_stats(50, seed=4))[0]
    assert first.summary["brightness"] < 60 and second.summary["brightness"] > 100
    assert np.isfinite(list(second.metrics.values())).all()


def feed_timed(monitor: DriftMonitor, stats: list[FrameStats], times: list[float]) -> list[WindowReport]:
    return [r for r in map(monitor.update, stats, times) if r is not None]


def test_windows_in_seconds_close_on_frame_times(reference: Reference) -> None:
    cfg = DriftConfig(window_s=2.0)
    monitor = DriftMonitor(cfg, reference)
    stats = synthetic_stats(1000, seed=21)
    # 32 fps: frame times exact in binary, so "2 s after" is not at the mercy of rounding.
    reports = feed_timed(monitor, stats, [1000 + i / 32 for i in range(1000)])
    # A window closes with its first frame 2 s after its start: 65 frames (0 .. 2 s), and the next window
    # starts at the frame after.
    assert [r.n for r in reports] == [65] * 15
    assert all(r.span_s == 2.0 for r in reports)
    assert [r.window for r in reports] == list(range(15))
    # Judged with thresholds calibrated for the grid size just below 65 frames.
    assert size_bucket(65) == 57
    assert reports[0].thresholds == calibrate(cfg, reference, 57).thresholds
    assert all(r.status != "drift" for r in reports)
    assert monitor.thresholds == {}  # they depend on each window: the reports carry them
    line = format_window(reports[0])
    assert line.startswith("drift window=0 n=65 span_s=2 status=")
    assert window_payload(reports[0], "cam", 0, 0.0)["span_s"] == pytest.approx(2.0)


def test_windows_in_seconds_follow_a_changing_frame_rate(reference: Reference) -> None:
    """The camera slows from 32 to 8 fps: windows shrink from 129 to 33 frames and each is judged with
    thresholds for its own size. Thresholds for the larger windows would call clean small windows drift."""
    cfg = DriftConfig(window_s=4.0)
    monitor = DriftMonitor(cfg, reference)
    stats = synthetic_stats(3 * 129 + 20 * 33, seed=22)
    times = [i / 32 for i in range(3 * 129)] + [(3 * 129 - 1) / 32 + i / 8 for i in range(1, 20 * 33 + 1)]
    reports = feed_timed(monitor, stats, times)
    fast, slow = reports[:3], reports[3:]
    assert [r.n for r in fast] == [129] * 3 and [r.n for r in slow] == [33] * 20
    assert slow[-1].thresholds == calibrate(cfg, reference, size_bucket(33)).thresholds
    assert slow[-1].thresholds["psi_fine"][0] > fast[0].thresholds["psi_fine"][0]
    assert all(r.status != "drift" for r in reports)
    big = fast[0].thresholds

    def over_drift(thresholds: Mapping[str, tuple[float, float]]) -> int:
        return sum(1 for r in slow if any(r.metrics[m] > thresholds[m][1] for m in r.metrics))

    assert over_drift(slow[-1].thresholds) == 0
    assert over_drift(big) >= 3  # 4 of these 20 clean windows: why each size gets its own thresholds


def test_a_window_in_seconds_holds_at_least_twenty_frames(reference: Reference) -> None:
    monitor = DriftMonitor(DriftConfig(window_s=1.0), reference)
    reports = feed_timed(monitor, synthetic_stats(100, seed=23), [i / 2 for i in range(100)])  # 2 fps
    assert [r.n for r in reports] == [20] * 5
    assert reports[0].span_s == pytest.approx(9.5)


def test_a_window_in_seconds_is_capped_in_frames(reference: Reference, monkeypatch: pytest.MonkeyPatch) -> None:
    """A replay at fps 0 can outrun any window in seconds; the window's buffer grows from drift.window's 250
    rows up to the cap, and no further."""
    monkeypatch.setattr(monitor_module, "MAX_WINDOW", 600)
    monitor = DriftMonitor(DriftConfig(window_s=60.0), reference)
    stats = synthetic_stats(1500, seed=24)
    reports = feed_timed(monitor, stats, [i * 1e-4 for i in range(1500)])
    assert [r.n for r in reports] == [600] * 2
    assert monitor._buf.shape[0] == 600
    # Every row survived the growth (250 -> 500 -> 600): the summary is the mean of the frames fed.
    brightness = np.mean([s.brightness for s in stats[600:1200]])
    assert reports[1].summary["brightness"] == pytest.approx(brightness)


def test_a_window_in_seconds_ends_at_a_gap(reference: Reference) -> None:
    """The camera goes offline for a minute: the window closes at the last frame before the outage instead of
    taking in the first frame after it, and that frame starts the next window."""
    monitor = DriftMonitor(DriftConfig(window_s=10.0), reference)
    times = [i / 16 for i in range(100)] + [100 + i / 16 for i in range(200)]
    reports = feed_timed(monitor, synthetic_stats(300, seed=28), times)
    assert [r.n for r in reports] == [100, 161]
    assert reports[0].span_s == pytest.approx(99 / 16) and reports[1].span_s == 10.0


@pytest.fixture
def calibrated_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The window sizes the monitor calibrates from now on, in order (with fewer bootstrap rounds)."""
    sizes: list[int] = []

    def counting(cfg: DriftConfig, ref: Reference, window: int | None = None, *args: object) -> Calibration:
        sizes.append(window or 0)
        return calibrate(cfg, ref, window, 20)

    monkeypatch.setattr(monitor_module, "calibrate", counting)
    return sizes


def test_each_window_size_is_calibrated_once(reference: Reference, calibrated_sizes: list[int]) -> None:
    sizes = calibrated_sizes
    monitor = DriftMonitor(DriftConfig(window_s=2.0), reference)
    times = [i / 32 for i in range(650)] + [650 / 32 + i / 16 for i in range(1, 400)]
    feed_timed(monitor, synthetic_stats(1049, seed=29), times)
    assert sizes == [size_bucket(65), size_bucket(33)]


def test_an_expected_rate_is_calibrated_before_the_first_window(
    reference: Reference, calibrated_sizes: list[int]
) -> None:
    """A paced source's rate known in advance: its window size is calibrated at start-up, not on the inference
    thread when the first window closes; a rate that turns out different is still calibrated when met."""
    sizes = calibrated_sizes
    monitor = DriftMonitor(DriftConfig(window_s=2.0), reference)
    monitor.expect_rate(32.0)
    assert sizes == [size_bucket(65)]  # 64..66 frames: one grid size
    feed_timed(monitor, synthetic_stats(650, seed=32), [i / 32 for i in range(650)])
    assert sizes == [size_bucket(65)]
    feed_timed(monitor, synthetic_stats(200, seed=33), [650 / 32 + i / 16 for i in range(1, 200)])
    assert sizes == [size_bucket(65), size_bucket(33)]

    # Learning: the sizes are calibrated as soon as the reference is learned.
    sizes.clear()
    learner = DriftMonitor(DriftConfig(window_s=1.0, learn_windows=3), None, coarse_classes=COARSE)
    learner.expect_rate(128.0)
    assert sizes == []
    reports = feed_timed(learner, synthetic_stats(387, seed=34), [i / 128 for i in range(387)])
    assert len(reports) == 3 and not learner.learning and sizes == [size_bucket(129)]


def test_a_failed_calibration_leaves_the_monitor_learning(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(*args: object, **kwargs: object) -> Calibration:
        raise MemoryError("no room")

    monitor = DriftMonitor(DriftConfig(window=20, learn_windows=2), None, coarse_classes=COARSE)
    monkeypatch.setattr(monitor_module, "calibrate", failing)
    with pytest.raises(MemoryError):
        feed(monitor, synthetic_stats(40, seed=30))
    assert monitor.learning and monitor.reference is None and monitor.calibration is None
    # Windows in seconds with a rate known in advance: the sizes for that rate are calibrated with the
    # learned reference, and their failure leaves the monitor learning too.
    timed = DriftMonitor(DriftConfig(window_s=1.0, learn_windows=2), None, coarse_classes=COARSE)
    timed.expect_rate(32.0)
    with pytest.raises(MemoryError):
        feed_timed(timed, synthetic_stats(80, seed=30), [i / 32 for i in range(80)])
    assert timed.learning and timed.reference is None


def test_a_window_in_seconds_needs_frame_times(reference: Reference) -> None:
    monitor = DriftMonitor(DriftConfig(window_s=1.0), reference)
    with pytest.raises(ValueError, match=r"drift\.window_s"):
        monitor.update(synthetic_stats(1)[0])


def test_a_shift_is_drift_within_two_windows_in_seconds(reference: Reference) -> None:
    monitor = DriftMonitor(DriftConfig(window_s=4.0), reference)
    stats = synthetic_stats(400, seed=25) + synthetic_stats(400, seed=26, brightness=40)
    reports = feed_timed(monitor, stats, [i / 32 for i in range(800)])  # 32 fps: 129-frame windows
    before = [r for r in reports if r.window < 3]
    after = [r for r in reports if r.window >= 4]  # window 3 holds frames from both sides of the shift
    assert all(r.status != "drift" for r in before)
    assert after[1].status == "drift" and after[0].fired[0] == "psi_brightness"


def test_learning_with_windows_in_seconds() -> None:
    """Without a reference, the first windows become it, whatever their frame counts."""
    cfg = DriftConfig(window_s=1.0, learn_windows=3)
    monitor = DriftMonitor(cfg, None, coarse_classes=COARSE)
    stats = synthetic_stats(700, seed=27)
    reports = feed_timed(monitor, stats, [i / 128 for i in range(700)])  # 128 fps: 129-frame windows
    assert [r.learning for r in reports] == [True] * 3 + [False] * 2
    assert monitor.reference is not None and monitor.reference.frames == 387
    assert monitor.reference.reservoir.shape[0] == 387  # every learned frame, in one block
    assert reports[-1].reference == "self" and reports[-1].metrics and reports[-1].status != "drift"


def test_learning_keeps_every_frame_of_long_windows_in_one_block() -> None:
    """More learned frames than a profile's 5,000: cut into 250-frame blocks, they would not hold a window of
    1,601 frames, and calibration windows would straddle blocks."""
    monitor = DriftMonitor(DriftConfig(window_s=50.0, learn_windows=4), None, coarse_classes=COARSE)
    feed_timed(monitor, synthetic_stats(6405, seed=31), [i / 32 for i in range(6405)])
    assert monitor.reference is not None and monitor.reference.frames == 6404
    assert monitor.reference.blocks == ((0, 6404),)


def test_learning_ends_once_it_holds_the_most_frames_a_learned_reference_is_made_from(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Windows in seconds hold up to MAX_WINDOW frames each on a fast source, and the monitor keeps every
    learned frame until learning ends: drift.learn_windows of them had no bound."""
    monkeypatch.setattr(monitor_module, "MAX_LEARNED", 300)
    monitor = DriftMonitor(DriftConfig(window_s=1.0, learn_windows=10), None, coarse_classes=COARSE)
    with caplog.at_level(logging.INFO, logger="eyed.drift.monitor"):
        reports = feed_timed(monitor, synthetic_stats(900, seed=29), [i / 128 for i in range(900)])
    # 129-frame windows: the third brings the learner to 300 frames (it takes 42 of its 129).
    assert [r.learning for r in reports][:4] == [True, True, True, False]
    assert monitor.reference is not None and monitor.reference.frames == 300
    assert any("learning ends after 3 windows, not drift.learn_windows=10" in r.message for r in caplog.records)


def built(rows: list[FrameStats]) -> Reference:
    builder = ProfileBuilder(COARSE, top_classes=20)
    builder.add_many(rows)
    return builder.build()


def test_a_reference_of_one_window_calibrates_on_windows_of_half_its_frames(caplog: pytest.LogCaptureFixture) -> None:
    """A reference of one window of frames (a short `eyed profile`): calibration windows of a whole window
    would be compared with nothing left, or with the same frames. Windows of half the reference leave as
    many frames beside them; the thresholds they give are looser than a full window needs, so clean windows
    stay clean (101 of 120 warned before), and a window judged with them says so in the log, once."""
    cfg = DriftConfig(window=250)
    with caplog.at_level(logging.WARNING, logger="eyed.drift.monitor"):
        monitor = DriftMonitor(cfg, built(synthetic_stats(250, seed=1)))
        reports = feed(monitor, synthetic_stats(250 * 40, seed=101))
    statuses = [r.status for r in reports]
    assert statuses.count("drift") == 0 and statuses.count("warn") <= 0.2 * len(statuses), statuses.count("warn")
    assert monitor.calibration is not None and monitor.calibration.size == size_bucket(125) == 113
    short = [r.message for r in caplog.records if "fewer than twice a window" in r.message]
    assert len(short) == 1
    assert "windows of 250 frames are judged with thresholds calibrated on windows of 113" in short[0]
    assert "profile a longer stream" in short[0]


@pytest.mark.parametrize("frames", [251, 260])
def test_a_reference_just_over_one_window_still_sees_a_darkening(frames: int) -> None:
    """With one frame more than a window, the rest of the reference beside a calibration window was 1 frame:
    thresholds beyond any value (KS drift 1.05, PSI 13.9) and an obvious darkening stayed ok."""
    monitor = DriftMonitor(DriftConfig(window=250), built(synthetic_stats(frames, seed=1)))
    assert all(drift < 1 for name, (_, drift) in monitor.thresholds.items() if name.startswith(("js", "ks")))
    feed(monitor, synthetic_stats(500, seed=7))
    dark = feed(monitor, synthetic_stats(750, seed=8, brightness=40.0, sharpness=100.0))
    assert [r.status for r in dark] == ["warn", "drift", "drift"]


def test_learning_a_single_window_raises_no_false_alarms() -> None:
    """drift.learn_windows = 1: the learned reference is one window long (95 of 120 clean windows warned)."""
    monitor = DriftMonitor(DriftConfig(window=250, learn_windows=1), None, coarse_classes=COARSE)
    reports = [r for r in feed(monitor, synthetic_stats(250 * 41, seed=3)) if not r.learning]
    statuses = [r.status for r in reports]
    assert len(statuses) == 40 and statuses.count("drift") == 0 and statuses.count("warn") <= 8


def test_learning_goes_on_until_a_reference_can_be_calibrated() -> None:
    """One window of 20 frames is too short to calibrate on (twice the shortest window is the least): the
    next window is learned too."""
    monitor = DriftMonitor(DriftConfig(window=20, learn_windows=1), None, coarse_classes=COARSE)
    reports = feed(monitor, synthetic_stats(60, seed=4))
    assert [r.learning for r in reports] == [True, True, False]
    assert monitor.reference is not None and monitor.reference.frames == 40


@pytest.mark.parametrize("cfg", [DriftConfig(window=20), DriftConfig(window_s=10.0)])
def test_a_reference_too_short_for_the_shortest_window_is_refused(cfg: DriftConfig) -> None:
    with pytest.raises(ValueError, match=r"keeps 39 frames, too few .* 40 at least .* profile a longer stream"):
        DriftMonitor(cfg, built(synthetic_stats(39, seed=5)))
    DriftMonitor(cfg, built(synthetic_stats(40, seed=5)))


def test_windows_in_seconds_longer_than_half_the_reference_are_judged_as_the_largest_that_fits(
    calibrated_sizes: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    """A window in seconds meets its sizes at run time: one over half of a 100-frame reference gets the
    thresholds of the largest grid size that fits (48), computed once for every such size; smaller windows
    keep their own. Nothing is refused mid-run."""
    ref = built(synthetic_stats(100, seed=6))
    cfg = DriftConfig(window_s=2.0)
    monitor = DriftMonitor(cfg, ref)
    # 32 fps (65-frame windows), 64 fps (129) and 8 fps (17 -> 20 frames) in turn.
    times = [i / 32 for i in range(130)]
    times += [times[-1] + i / 64 for i in range(1, 259)]
    times += [times[-1] + i / 8 for i in range(1, 41)]
    with caplog.at_level(logging.WARNING, logger="eyed.drift.monitor"):
        reports = feed_timed(monitor, synthetic_stats(len(times), seed=7), times)
    assert [r.n for r in reports] == [65, 65, 129, 129, 20, 20]
    assert calibrated_sizes == [size_bucket(65), 20]  # 129 frames took the calibration on 48 already made
    assert set(monitor._calibrations) == {size_bucket(65), size_bucket(129), 20}
    assert monitor._calibrations[size_bucket(129)] is monitor._calibrations[size_bucket(65)]
    assert monitor._calibrations[size_bucket(65)].size == size_bucket(50) == 48
    assert reports[0].thresholds == calibrate(cfg, ref, 48, 20).thresholds
    assert sum("fewer than twice a window" in r.message for r in caplog.records) == 1


def test_drift_window_is_bounded_like_a_window_in_seconds() -> None:
    """drift.window = 1,000,000 took two minutes to calibrate at start-up and 80 MB of window buffer."""
    assert load_settings(None, [f"drift.window={MAX_WINDOW}"]).drift.window == MAX_WINDOW
    with pytest.raises(ConfigError, match=r"drift\.window\b.*20000"):
        load_settings(None, [f"drift.window={MAX_WINDOW + 1}"])


def test_a_learned_reference_keeps_blocks_of_its_frames_as_a_profile_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """Long learned windows kept every frame (864,000 rows for hour-long windows) and calibration took tens of
    seconds on the inference thread. Beyond a profile's largest reservoir (shrunk to 300 rows here), the
    learned frames are sampled in blocks of a window, as `eyed profile` samples a stream."""
    assert learned_sample(20_000, 20_000) == (20_000, 20_000)  # every frame, up to the largest reservoir
    assert learned_sample(80_000, 20_000) == (20_000, 5_000)  # 4 windows of 20,000: 4 blocks of 5,000
    assert learned_sample(25_000, 250) == (5_000, 250)  # 100 windows of 250: a profile's 5,000 rows
    monkeypatch.setattr(monitor_module, "LEARNED_RESERVOIR", 300)
    monitor = DriftMonitor(DriftConfig(window=100, learn_windows=4), None, coarse_classes=COARSE)
    feed(monitor, synthetic_stats(400, seed=8))
    ref = monitor.reference
    assert ref is not None and ref.frames == 400 and ref.reservoir.shape[0] == 300
    assert ref.blocks is not None and all(length % 100 == 0 for _, length in ref.blocks)


def test_a_gap_before_a_window_can_close_starts_a_new_window(
    reference: Reference, caplog: pytest.LogCaptureFixture
) -> None:
    """Five frames, an hour offline, then frames again: the five are left out and counted, rather than open a
    window that spans the outage (it closed with span_s = 3607.8 for window_s = 10)."""
    monitor = DriftMonitor(DriftConfig(window_s=10.0), reference)
    times = [float(i) for i in range(5)] + [3604 + i / 5 for i in range(100)]
    with caplog.at_level(logging.INFO, logger="eyed.drift.monitor"):
        reports = feed_timed(monitor, synthetic_stats(105, seed=9), times)
    assert [r.n for r in reports] == [51]
    assert reports[0].span_s is not None and reports[0].span_s < 20
    assert monitor.dropped == 5
    assert any("outage after 5 frames" in r.message for r in caplog.records)


def test_a_source_slower_than_a_window_in_seconds_still_gets_windows(reference: Reference) -> None:
    """A frame every 5 s (or slower) against window_s = 5: each pause is the stream's usual one, not an
    outage; taken for one, every frame was dropped and no window ever closed."""
    rng = np.random.default_rng(3)
    for spacing in (5.0, 12.0):
        monitor = DriftMonitor(DriftConfig(window_s=5.0), reference)
        times = list(np.cumsum(rng.uniform(0.9, 1.1, 100) * spacing))
        reports = feed_timed(monitor, synthetic_stats(100, seed=11), times)
        assert [r.n for r in reports] == [20] * 5 and monitor.dropped == 0, spacing
    # The same stream, offline for an hour after 5 frames of a window: that is an outage.
    monitor = DriftMonitor(DriftConfig(window_s=5.0), reference)
    times = [5.0 * i for i in range(45)] + [3800 + 5.0 * i for i in range(40)]
    reports = feed_timed(monitor, synthetic_stats(85, seed=12), times)
    assert [r.n for r in reports] == [20, 20, 20, 20] and monitor.dropped == 5


def still_scene(n: int, scale: float = 1.0) -> list[FrameStats]:
    """A still scene without sensor noise: every input statistic is the same in every frame."""
    return [
        s._replace(brightness=113.0 * scale, contrast=48.0 * scale, sharpness=900.0 * scale**2, motion=0.0)
        for s in synthetic_stats(n, seed=10)
    ]


def test_a_constant_statistic_in_the_reference_still_sees_a_change() -> None:
    """The scene at half the light: with one histogram edge at the reference's only value, lower values fell
    into its bin and every input PSI was 0."""
    monitor = DriftMonitor(DriftConfig(window=100), built(still_scene(1000)))
    reports = feed(monitor, still_scene(200, scale=0.5))
    assert [r.status for r in reports] == ["warn", "drift"]
    assert {"psi_brightness", "psi_contrast", "psi_sharpness"} <= set(reports[0].fired)


def still_frames(n: int, scale: float = 1.0) -> list[FrameStats]:
    """A still scene without sensor noise through the real extractor: the same frame n times."""
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8), (0, 0), 3)
    image = np.clip(image.astype(np.float32) * scale, 0, 255).astype(np.uint8)
    extractor = StatsExtractor(COARSE)
    pred = stats_prediction(np.full(10, 0.1, dtype=np.float32))
    return [extractor(image, pred)._replace(top1=s.top1, coarse=s.coarse) for s in synthetic_stats(n, seed=10)]


def test_a_still_scene_profiled_to_a_file_still_sees_a_change(tmp_path: Path) -> None:
    """What the daemon does: `eyed profile` writes the file, the daemon reads it. Stored rows rounded to six
    digits against edges at the measured value put every calibration window of a still scene outside the
    reference's histogram: thresholds of 10 and more, and half the light went unseen."""
    builder = ProfileBuilder(COARSE, top_classes=20, block=100)
    builder.add_many(still_frames(1000))
    in_memory = builder.build()
    from_file = load_reference(in_memory.write(tmp_path / "still.json"))
    assert np.array_equal(from_file.reservoir, in_memory.reservoir, equal_nan=True)
    for reference in (in_memory, from_file):
        monitor = DriftMonitor(DriftConfig(window=100), reference)
        assert monitor.thresholds["psi_brightness"] == (0.1, 0.25)
        assert [r.status for r in feed(monitor, still_frames(100))] == ["ok"]
        assert [r.status for r in feed(monitor, still_frames(200, scale=0.5))] == ["warn", "drift"]


def test_drift_sigmas_sets_how_far_above_the_noise_warn_is() -> None:
    assert levels(DriftConfig(sigmas=3), "psi_brightness", 0.2, 0.05)[0] == pytest.approx(0.35)
    assert levels(DriftConfig(sigmas=1), "psi_brightness", 0.2, 0.05)[0] == pytest.approx(0.25)


def test_a_lower_warn_floor_does_not_push_drift_out_of_reach() -> None:
    """Where noise sets warn, drift is warn times the shipped ratio (2.5 for PSI): drift.psi_warn = 0.02 asked
    for earlier warnings, and got a drift level of 2.96 instead of 0.59."""
    noisy = levels(DriftConfig(), "psi_sharpness", 0.087, 0.05)
    for warn_floor in (0.1, 0.05, 0.02):
        assert levels(DriftConfig(psi_warn=warn_floor), "psi_sharpness", 0.087, 0.05) == pytest.approx(noisy)
    assert noisy == pytest.approx((0.237, 0.5925))
    # A configured drift level still counts where it is the larger.
    assert levels(DriftConfig(psi_drift=1.0), "psi_sharpness", 0.087, 0.05) == pytest.approx((0.237, 1.0))


def test_an_older_profile_keeps_the_histogram_edges_it_holds() -> None:
    """Profiles written before the outer edges load with the edges they hold, and judge as before."""
    data = built(still_scene(1000)).to_dict()
    data["histograms"]["brightness"] = {"edges": [113.0], "counts": [1000, 0]}
    old = reference_from_dict(json.loads(json.dumps(data)))
    assert old.histograms["brightness"].edges.tolist() == [113.0]
    report = feed(DriftMonitor(DriftConfig(window=100), old), still_scene(100, scale=0.5))[0]
    assert report.metrics["psi_brightness"] == 0.0  # the old single bin: lower light unseen, as before


def test_bounded_metrics_keep_reachable_drift_thresholds(reference: Reference) -> None:
    """JS distance and KS statistic are at most 1. For 20-frame windows warn x drift / warn put js_fine's
    drift threshold at 1.14: it could never fire. It now stops halfway from warn to 1."""
    cal = calibrate(DriftConfig(window_s=10.0), reference, 20)
    for name, (warn, drift) in cal.thresholds.items():
        if name.startswith(("js", "ks")):
            assert warn <= drift <= (warn + 1) / 2 < 1, name
    cfg = DriftConfig(js_warn=0.1, js_drift=0.9)
    assert levels(cfg, "js_fine", 0.5, 0.05) == pytest.approx((0.65, 0.9))  # a configured floor is kept
    assert levels(cfg, "js_fine", 0.2, 0.05) == pytest.approx((0.35, 0.9))
    assert levels(cfg, "psi_fine", 0.5, 0.1) == pytest.approx((0.8, 2.0))  # PSI is unbounded: scaled as before
    assert levels(DriftConfig(), "ks_margin", 0.6, 0.2) == pytest.approx((1.2, 1.2))  # never below warn
    with pytest.raises(ConfigError, match=r"drift\.js_drift"):  # as drift.ks_*: a JS distance is at most 1
        load_settings(None, ["drift.js_drift=1.5"])


def test_top_classes_of_a_reference_file_are_its_own(reference: Reference, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="eyed.drift.monitor"):
        monitor = DriftMonitor(DriftConfig(top_classes=3), reference)
    assert monitor._base is not None and len(monitor._base.fine_ids) == 20
    warned = [r for r in caplog.records if "drift.top_classes (3) does not apply" in r.message]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="eyed.drift.monitor"):
        DriftMonitor(DriftConfig(), reference)  # the default, and the file's 20 classes
    assert not any("top_classes" in r.message for r in caplog.records)


def test_daemon_refuses_a_reference_too_short_to_calibrate(
    tiny_dataset: Path,
    tiny_checkpoint: Path,
    tiny_onnx: Path,
    tmp_path: Path,
    base: dict[str, object],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A profile of the 11 readable frames of a tiny dataset, as an older `eyed profile` wrote it (it now
    refuses to): a configuration error (exit 78) at start, naming drift.reference and what to do."""
    out = tmp_path / "short.json"
    args = ["--set", f"source.dataset={tiny_dataset}", "--set", "source.split=train"]
    args += ["--set", f"model.id={tiny_checkpoint}", "--set", f"model.onnx={tiny_onnx}"]
    with monkeypatch.context() as older:
        older.setattr(monitor_module, "calibration_size", lambda window, rows: window)
        assert main(["profile", *args, "--output", str(out)]) == 0
    code, err = finish(start_daemon({**base, "drift.reference": out, "drift.window": 20}))
    assert code == EXIT_CONFIG
    assert f"drift.reference {out}: the reference keeps" in err and "profile a longer stream" in err
    # check-config says so too, without loading the model.
    assert main(["check-config", *args, "--set", f"drift.reference={out}"]) == EXIT_CONFIG
