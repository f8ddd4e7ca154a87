"""More inference workers than cores on the daemon path: does a worker in Python (resizing, publishing, waiting
for the GIL) leave a core idle that another worker could fill? The real pipeline, fed from memory, publishing
to a SUB socket in another process (as in ``eyed bench``), FP32 and INT8, each worker on one onnxruntime
thread, in alternating rounds so that the ratios come from rounds seconds apart.

    .venv/bin/python benchmarks/extra_workers.py [--workers 2,3] [--frames 200] [--rounds 12]

The model and frames come from configs/replay.toml pointed at the real MobileNetV2 and CIFAR-10 in $EYED_SHARED
(``--config`` reads another file as it is); the INT8 file is the one ``eyed bench`` quantises into the cache.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from pathlib import Path

from assets import replay_settings

from eyed.bench import DaemonPath, int8_model, load_frames
from eyed.model import load_classifier
from eyed.model.onnx_backend import OnnxClassifier


def median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, help="default: configs/replay.toml on the assets in $EYED_SHARED")
    ap.add_argument("--workers", default="2,3", help="comma-separated worker counts; the first is the baseline")
    ap.add_argument("--frames", type=int, default=200, help="decoded frames, gone over 3 times a round")
    ap.add_argument("--rounds", type=int, default=12)
    args = ap.parse_args()
    counts = [int(w) for w in args.workers.split(",")]

    settings = replay_settings(args.config)
    images, _ = load_frames(settings, args.frames)
    cfg = settings.full_speed_model().model_copy(update={"threads": 1})
    fp32 = load_classifier(cfg)
    assert isinstance(fp32, OnnxClassifier)
    models = {"fp32": fp32, "int8": OnnxClassifier(cfg.model_copy(update={"onnx": int8_model(settings, fp32)}))}
    fps: dict[tuple[str, int], list[float]] = {}
    with contextlib.ExitStack() as stack:
        paths = []
        for precision, classifier in models.items():
            for w in counts:
                path = stack.enter_context(
                    DaemonPath(classifier, images * 3, subscriber=True, settings=settings, workers=w)
                )
                path(1)  # warm-up, not measured
                paths.append(((precision, w), path))
        for r in range(args.rounds):
            for key, path in paths if r % 2 == 0 else paths[::-1]:
                fps.setdefault(key, []).append(path(1)["fps"])

    base = counts[0]
    for precision in models:
        for w in counts:
            line = f"{precision} {w} workers: {statistics.median(fps[precision, w]):7.1f} frames/s"
            if w != base:
                line += f", {median_ratio(fps[precision, w], fps[precision, base]):.3f}x of {base} workers"
            print(line)
    for w in counts:
        print(f"INT8/FP32 with {w} workers: {median_ratio(fps['int8', w], fps['fp32', w]):.3f}")


if __name__ == "__main__":
    main()
