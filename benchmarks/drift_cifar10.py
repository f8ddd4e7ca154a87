"""Drift monitoring on real data: false alarms on clean held-out CIFAR-10, detection of synthetic shifts.

A reference profile is built with the real MobileNetV2 on CIFAR-10 train[0:N]; held-out images (train[45000:])
are then replayed clean, and again after a clean lead-in with each shift applied: darkened, blurred, noised,
low contrast (strong, then milder versions). Prints the false alarms on clean data, the detection delay per
shift (in windows after the shift's first window), the metrics that fired, and the per-frame cost of the
statistics against inference.

    .venv/bin/python benchmarks/drift_cifar10.py            # assets from $EYED_SHARED or ../shared
    .venv/bin/python benchmarks/drift_cifar10.py --json
    .venv/bin/python benchmarks/drift_cifar10.py --window-s 4 --fps 25   # windows in seconds

With ``--window-s`` the frames are given times as if a camera delivered them at ``--fps``.

``run_experiment`` is also what tests/drift/test_real_assets.py runs, at a smaller scale.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from eyed.config import DEFAULT_WINDOW, DriftConfig, ModelConfig, SourceConfig
from eyed.drift import DriftMonitor, ProfileBuilder, Reference, StatsExtractor, WindowReport
from eyed.drift.reference import profile_blocks
from eyed.model import load_classifier
from eyed.sources import open_recorded
from eyed.types import Classifier, Prediction

logger = logging.getLogger("drift_cifar10")

HELD_OUT = 45000
BATCH = 16


def darken(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(img.astype(np.float32) * 0.35 + 0.5, 0, 255).astype(np.uint8)


def blur(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return cv2.GaussianBlur(img, (5, 5), 1.5)


def noise(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(img.astype(np.float32) + rng.normal(0, 25, img.shape), 0, 255).round().astype(np.uint8)


def low_contrast(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    f = img.astype(np.float32)
    mean = f.mean()
    return np.clip(mean + (f - mean) * 0.4 + 0.5, 0, 255).astype(np.uint8)


SHIFTS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "darken x0.35": darken,
    "blur 5x5 s1.5": blur,
    "noise s25": noise,
    "contrast x0.4": low_contrast,
}
# Milder versions, to show where detection stops (the benchmark runs them; the test does not).
MILD_SHIFTS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "darken x0.7": lambda img, rng: np.clip(img.astype(np.float32) * 0.7 + 0.5, 0, 255).astype(np.uint8),
    "blur 3x3 s0.8": lambda img, rng: cv2.GaussianBlur(img, (3, 3), 0.8),
    "noise s8": lambda img, rng: np.clip(img + rng.normal(0, 8, img.shape), 0, 255).round().astype(np.uint8),
    "contrast x0.7": lambda img, rng: np.clip(
        img.mean() + (img.astype(np.float32) - img.mean()) * 0.7 + 0.5, 0, 255
    ).astype(np.uint8),
}
# The input statistic a person would expect to move first under each shift.
EXPECTED = {
    "darken x0.35": {"psi_brightness"},
    "blur 5x5 s1.5": {"psi_sharpness"},
    "noise s25": {"psi_sharpness", "psi_clipped", "psi_contrast"},
    "contrast x0.4": {"psi_contrast"},
    "darken x0.7": {"psi_brightness"},
    "blur 3x3 s0.8": {"psi_sharpness"},
    "noise s8": {"psi_sharpness", "psi_clipped", "psi_contrast"},
    "contrast x0.7": {"psi_contrast"},
}


@dataclass
class Timing:
    frames: int = 0
    stats_s: float = 0.0
    monitor_s: float = 0.0
    infer_frames: int = 0
    infer_s: float = 0.0

    def summary(self) -> dict[str, float]:
        return {
            "stats_us": 1e6 * self.stats_s / max(self.frames, 1),
            "monitor_us": 1e6 * self.monitor_s / max(self.frames, 1),
            "infer_batch_ms": 1e3 * self.infer_s / max(self.infer_frames, 1),
        }


@dataclass
class Stream:
    """What one replayed stream produced."""

    name: str
    reports: list[WindowReport] = field(default_factory=list)
    shift_window: int | None = None  # index of the first window mostly of shifted frames

    def count(self, status: str) -> int:
        return sum(1 for r in self.reports if r.status == status)

    def delay(self) -> int | None:
        """Windows from the first shifted window to the first ``drift`` window (0 = that window itself)."""
        start = self.shift_window or 0
        for r in self.reports:
            if r.window >= start and r.status == "drift":
                return r.window - start
        return None

    def first_drift(self) -> WindowReport | None:
        return next((r for r in self.reports if r.status == "drift"), None)

    def early_alarms(self) -> int:
        """Non-ok windows before the shift starts (false alarms in the clean lead-in)."""
        start = self.shift_window if self.shift_window is not None else len(self.reports)
        return sum(1 for r in self.reports if r.window < start and r.status != "ok")


def load_images(cifar: Path, skip: int, limit: int) -> list[np.ndarray]:
    cfg = SourceConfig(dataset=str(cifar), split="train", skip=skip, limit=limit)
    with open_recorded(cfg) as src:
        return [f.image for f in src.frames()]


def classify(classifier: Classifier, images: list[np.ndarray], timing: Timing, batch: int = BATCH) -> list[Prediction]:
    preds: list[Prediction] = []
    for i in range(0, len(images), batch):
        tensors = np.stack([classifier.prepare(img) for img in images[i : i + batch]])
        t0 = time.perf_counter()
        preds.extend(classifier.predict(tensors))
        timing.infer_s += time.perf_counter() - t0
        timing.infer_frames += len(tensors)
    return preds


def infer_ms_batch1(classifier: Classifier, images: list[np.ndarray]) -> float:
    """Per-frame inference time at batch 1 (what the daemon does when frames do not queue up)."""
    tensors = [classifier.prepare(img)[None] for img in images]
    classifier.predict(tensors[0])  # warm-up
    t0 = time.perf_counter()
    for t in tensors:
        classifier.predict(t)
    return 1e3 * (time.perf_counter() - t0) / len(tensors)


def frames_per_window(cfg: DriftConfig, fps: float) -> int:
    """Frames in one window: ``cfg.window``, or what ``cfg.window_s`` seconds hold at ``fps``."""
    return cfg.window_frames if cfg.window_s is None else math.floor(fps * cfg.window_s) + 1


def build_reference(
    classifier: Classifier, images: list[np.ndarray], cfg: DriftConfig, timing: Timing, source: str, fps: float
) -> Reference:
    post = classifier.post  # type: ignore[attr-defined]
    mapper = post.mapper
    extractor = StatsExtractor(mapper=mapper)
    builder = ProfileBuilder(
        extractor.coarse_classes,
        top_classes=cfg.top_classes,
        block=cfg.window_frames,
        mapper=mapper,
        labels=post.labels,
        model=classifier.name,
        source=source,
    )
    preds = classify(classifier, images, timing)
    for img, pred in zip(images, preds, strict=True):
        builder.add(extractor(img, pred), pred.probs)
    builder.block, builder.reservoir_size = profile_blocks(cfg, len(images), (len(images) - 1) / fps)
    return builder.build()


def replay(
    name: str,
    monitor: DriftMonitor,
    extractor: StatsExtractor,
    images: list[np.ndarray],
    preds: list[Prediction],
    timing: Timing,
    shift_at: int | None = None,
    fps: float = 25.0,
) -> Stream:
    stream = Stream(name)
    timed = monitor.cfg.window_s is not None
    for i, (img, pred) in enumerate(zip(images, preds, strict=True)):
        t0 = time.perf_counter()
        stats = extractor(img, pred)
        t1 = time.perf_counter()
        report = monitor.update(stats, i / fps if timed else None)
        t2 = time.perf_counter()
        timing.stats_s += t1 - t0
        timing.monitor_s += t2 - t1
        timing.frames += 1
        if report is not None:
            stream.reports.append(report)
            # The shift's first window: the first one that is mostly shifted frames. (Windows in seconds need not
            # start where the shift does: the window before may hold a few shifted frames.)
            if shift_at is not None and stream.shift_window is None and i - shift_at + 1 >= report.n / 2:
                stream.shift_window = report.window
    return stream


def camera_stats_cost(sizes: tuple[tuple[int, int], ...] = ((640, 480), (1280, 720), (1920, 1080))) -> dict[str, float]:
    """StatsExtractor's per-frame cost (us) on camera-sized frames (the CIFAR run only sees 32x32)."""
    rng = np.random.default_rng(0)
    out = {}
    for w, h in sizes:
        img = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (9, 9), 3)
        probs = np.full(1001, 1 / 1001, dtype=np.float32)
        from eyed.types import Scored

        pred = Prediction((Scored("a", 1, 0.3), Scored("b", 2, 0.2)), None, probs)
        extractor = StatsExtractor()
        extractor(img, pred)
        n = 200
        t0 = time.perf_counter()
        for _ in range(n):
            extractor(img, pred)
        out[f"{w}x{h}"] = 1e6 * (time.perf_counter() - t0) / n
    return out


def run_experiment(
    model: Path,
    cifar: Path,
    cache_dir: Path,
    *,
    ref_frames: int = 10000,
    clean_frames: int = 5000,
    shift_frames: int = 1000,
    lead_windows: int = 2,
    held_out: int = HELD_OUT,
    shifts: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] | None = None,
    cfg: DriftConfig | None = None,
    reference_out: Path | None = None,
    fps: float = 25.0,
) -> dict[str, Any]:
    """The whole experiment; returns the reference, one Stream per replay and the timings."""
    cfg = cfg or DriftConfig()
    classifier = load_classifier(ModelConfig(id=str(model), cache_dir=cache_dir))
    mapper = classifier.post.mapper  # type: ignore[attr-defined]
    classes = mapper.classes if mapper is not None else ()
    # Statistics and monitor cost per frame are timed on the reference-file replays only: a self-learning monitor
    # also calibrates once when it finishes learning (~0.2 s), a one-off that would blur the per-frame figure.
    build_timing, timing, self_timing = Timing(), Timing(), Timing()

    t0 = time.perf_counter()
    reference = build_reference(
        classifier,
        load_images(cifar, 0, ref_frames),
        cfg,
        build_timing,
        source=f"{cifar.name}:train[0:{ref_frames}]",
        fps=fps,
    )
    logger.info("reference of %d frames in %.1f s", reference.frames, time.perf_counter() - t0)
    if reference_out is not None:
        reference.write(reference_out)

    if held_out < ref_frames:
        raise ValueError(f"held-out images start at {held_out}, inside the reference's train[0:{ref_frames}]")
    clean = load_images(cifar, held_out, clean_frames)
    clean_preds = classify(classifier, clean, timing)
    monitor = DriftMonitor(cfg, reference, coarse_classes=classes)
    streams = [replay("clean", monitor, StatsExtractor(mapper=mapper), clean, clean_preds, timing, fps=fps)]
    logger.info(
        "clean: %d windows, %d warn, %d drift", len(streams[0].reports), *map(streams[0].count, ("warn", "drift"))
    )

    # Without a reference file the monitor learns from its first cfg.learn_windows windows: the same replays.
    self_streams = [
        replay(
            "clean",
            DriftMonitor(cfg, None, coarse_classes=classes),
            StatsExtractor(mapper=mapper),
            clean,
            clean_preds,
            self_timing,
            fps=fps,
        )
    ]
    lead = lead_windows * frames_per_window(cfg, fps)
    learn = cfg.learn_windows * frames_per_window(cfg, fps)
    rng = np.random.default_rng(0)
    for name, shift in (shifts if shifts is not None else SHIFTS).items():
        shifted = [shift(img, rng) for img in clean[:shift_frames]]
        preds = classify(classifier, shifted, timing)
        stream = replay(
            name,
            DriftMonitor(cfg, reference, coarse_classes=classes),
            StatsExtractor(mapper=mapper),
            clean[-lead:] + shifted,
            clean_preds[-lead:] + preds,
            timing,
            shift_at=lead,
            fps=fps,
        )
        streams.append(stream)
        self_streams.append(
            replay(
                name,
                DriftMonitor(cfg, None, coarse_classes=classes),
                StatsExtractor(mapper=mapper),
                clean[-learn:] + shifted,
                clean_preds[-learn:] + preds,
                self_timing,
                shift_at=learn,
                fps=fps,
            )
        )
        logger.info("%s: delay %s windows (self-learned reference: %s)", name, stream.delay(), self_streams[-1].delay())
    return {
        "reference": reference,
        # With windows in seconds each report carries the thresholds for its size: the last clean window's.
        "thresholds": dict(monitor.thresholds or streams[0].reports[-1].thresholds),
        "streams": streams,
        "self_streams": self_streams,
        "timing": {**timing.summary(), "infer_batch1_ms": infer_ms_batch1(classifier, clean[:200])},
    }


def summarise(result: dict[str, Any], cfg: DriftConfig) -> dict[str, Any]:
    """The experiment's numbers, JSON-ready."""
    clean, shifts = result["streams"][0], result["streams"][1:]
    warn_metrics = Counter(name for r in clean.reports for name in r.fired)
    return {
        "reference_frames": result["reference"].frames,
        "window": cfg.window_text(),
        "consecutive": cfg.consecutive,
        "clean": {
            "frames": sum(r.n for r in clean.reports),
            "windows": len(clean.reports),
            "drift_windows": clean.count("drift"),
            "warn_windows": clean.count("warn"),
            "warn_metrics": dict(warn_metrics),
        },
        "shifts": {s.name: _shift_summary(s) for s in shifts},
        "self": _self_summary(result["self_streams"]),
        "thresholds": {k: [round(w, 4), round(d, 4)] for k, (w, d) in result["thresholds"].items()},
        "timing": {k: round(v, 3) for k, v in result["timing"].items()},
    }


def _self_summary(streams: list[Stream]) -> dict[str, Any]:
    clean = streams[0]
    monitored = [r for r in clean.reports if not r.learning]
    return {
        "clean_windows": len(monitored),
        "clean_drift_windows": sum(1 for r in monitored if r.status == "drift"),
        "clean_warn_windows": sum(1 for r in monitored if r.status == "warn"),
        "shifts": {s.name: _shift_summary(s) for s in streams[1:]},
    }


def _shift_summary(stream: Stream) -> dict[str, Any]:
    first = stream.first_drift()
    fired = list(first.fired) if first is not None else []
    return {
        "delay_windows": stream.delay(),
        "lead_in_alarms": stream.early_alarms(),
        "statuses": [r.status for r in stream.reports],
        "fired_first_drift": fired,
        "expected_fired": bool(EXPECTED[stream.name] & set(fired)),
    }


def main(argv: list[str] | None = None) -> int:
    from assets import shared_folder  # here: the tests import this module as benchmarks.drift_cifar10

    default_shared = shared_folder()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shared", type=Path, default=Path(default_shared), help="real assets folder (../shared)")
    p.add_argument("--cache-dir", type=Path, default=Path("~/.cache/eyed").expanduser(), help="ONNX export cache")
    p.add_argument("--reference-frames", type=int, default=10000)
    p.add_argument("--clean-frames", type=int, default=5000)
    p.add_argument("--shift-frames", type=int, default=1000)
    p.add_argument("--held-out", type=int, default=HELD_OUT, help="first train record of the clean replay")
    p.add_argument("--no-mild", action="store_true", help="skip the milder shifts")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW)
    p.add_argument("--window-s", type=float, help="windows of so many seconds instead of --window frames")
    p.add_argument("--fps", type=float, default=25.0, help="with --window-s: the frame rate the frames are timed at")
    p.add_argument("--reference-out", type=Path, help="also write the reference profile here")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    model, cifar = args.shared / "models" / "mobilenet_v2_1.0_224", args.shared / "data" / "cifar10"
    if not (model / "config.json").is_file() or not cifar.is_dir():
        print(f"real assets not found in {args.shared}", file=sys.stderr)
        return 2
    cfg = DriftConfig(window=args.window) if args.window_s is None else DriftConfig(window_s=args.window_s)
    result = run_experiment(
        model,
        cifar,
        args.cache_dir,
        ref_frames=args.reference_frames,
        clean_frames=args.clean_frames,
        shift_frames=args.shift_frames,
        held_out=args.held_out,
        shifts=SHIFTS if args.no_mild else {**SHIFTS, **MILD_SHIFTS},
        cfg=cfg,
        reference_out=args.reference_out,
        fps=args.fps,
    )
    summary = summarise(result, cfg)
    summary["timing"]["camera_stats_us"] = {k: round(v, 1) for k, v in camera_stats_cost().items()}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    c, t = summary["clean"], summary["timing"]
    print(
        f"reference: {summary['reference_frames']} frames; windows of {cfg.window_text()}, "
        f"drift after {cfg.consecutive}"
    )
    print(
        f"clean held-out: {c['frames']} frames, {c['windows']} windows: {c['drift_windows']} drift, "
        f"{c['warn_windows']} warn {c['warn_metrics'] or ''}"
    )
    for name, s in summary["shifts"].items():
        print(
            f"{name:<15} delay {s['delay_windows']} windows, lead-in alarms {s['lead_in_alarms']}, "
            f"fired {','.join(s['fired_first_drift']) or '-'}  [{' '.join(s['statuses'])}]"
        )
    own = summary["self"]
    print(
        f"without a reference file (learned from the first {cfg.learn_windows} windows): clean "
        f"{own['clean_windows']} windows monitored: {own['clean_drift_windows']} drift, {own['clean_warn_windows']} "
        "warn; delays: " + ", ".join(f"{k} {v['delay_windows']}" for k, v in own["shifts"].items())
    )
    print(
        f"per frame: statistics {t['stats_us']:.1f} us + monitor {t['monitor_us']:.1f} us; inference "
        f"{t['infer_batch_ms']:.2f} ms (batch {BATCH}), {t['infer_batch1_ms']:.2f} ms (batch 1)"
        + ("; the monitor's figure includes each monitor's one calibration (0.1-0.2 s)" if cfg.window_s else "")
    )
    print("statistics on camera frames (us): " + ", ".join(f"{k} {v}" for k, v in t["camera_stats_us"].items()))
    print("thresholds (warn, drift): " + ", ".join(f"{k} {w}/{d}" for k, (w, d) in summary["thresholds"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
