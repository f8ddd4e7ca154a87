"""INT8 choices measured: how many leading convolutions stay float, and grid-aligned weight scales or not.

For each variant, quantises the real MobileNetV2 from $EYED_SHARED (calibrated on the first --calibration
CIFAR-10 train images, as `eyed export --int8` does), then reports on the held-out images from record 45,000
on: coarse accuracy of FP32 and INT8 on the same frames, top-1 agreement, and bare onnxruntime frames/s of
INT8 over FP32 (the same BareLoop `eyed bench` uses), every variant in the same alternating rounds.

    .venv/bin/python benchmarks/int8_tradeoff.py [--heldout 2000] [--variants 0a,3a,3d,9d] [--json]

A variant is the number of leading float convolutions, then "a" (grid-aligned weight scales, the default)
or "d" (onnxruntime's default per-channel scales). With no float convolution the first one reads the uint8
pixels (the input stage folded into it) four columns at a time, the default; a trailing "c" has it read one
column at a time, and a trailing "q" quantises the normalised float input instead.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from assets import cached_fp32, replay_settings

from eyed.bench import BareLoop, bare_model, load_frames
from eyed.model.onnx_backend import OnnxClassifier
from eyed.model.quantize import check_accuracy, quantize_int8

ROUNDS = 10
VARIANT = re.compile(r"(\d+)([ad])([cq]?)")


def speed_ratios(loops: list[BareLoop]) -> list[float]:
    """Frames/s of each loop over the first one's (FP32): every loop runs once per round, in an order reversed
    every other round, and the ratio is the median of the per-round ratios, so load that comes and goes during
    the run falls on every variant alike."""
    per_round: list[list[float]] = [[] for _ in loops]
    for r in range(ROUNDS):
        order = list(range(len(loops)))
        fps = {}
        for i in order if r % 2 == 0 else reversed(order):
            fps[i] = loops[i]()["fps"]
        for i in order:
            per_round[i].append(fps[i] / fps[0])
    return [statistics.median(ratios) for ratios in per_round]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heldout", type=int, default=2000, help="evaluated images, from record 45000 on")
    parser.add_argument("--calibration", type=int, default=300)
    parser.add_argument("--variants", default="0d,0a,0ac,0aq,1a,3d,3a,9a")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    variants = args.variants.split(",")
    for variant in variants:  # before the minutes of loading and quantising
        if not VARIANT.fullmatch(variant):
            parser.error(
                f"--variants: {variant!r} is not a count of float convolutions, 'a' or 'd', then 'c', 'q' or not"
            )

    cached_fp32()
    settings = replay_settings()
    fp32 = OnnxClassifier(settings.model)
    calibration = np.stack([fp32.prepare(i) for i in load_frames(settings, args.calibration)[0]])
    heldout = settings.model_copy(update={"source": settings.source.model_copy(update={"skip": 45000})})
    images, truths = load_frames(heldout, args.heldout)
    tensors = np.stack([fp32.prepare(i) for i in images])

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="eyed-int8-") as tmp:
        # The threads `eyed bench`'s bare loop runs on: the cores this process may use.
        bare_cfg = bare_model(settings)
        loops = [BareLoop(fp32.path, bare_cfg, list(tensors[:200]))]
        for variant in variants:
            match = VARIANT.fullmatch(variant)
            assert match is not None
            leading, align, fold, group = int(match[1]), match[2] == "a", match[3] != "q", match[3] != "c"
            path = quantize_int8(fp32.path, Path(tmp) / f"{variant}.onnx", calibration, leading, align, fold, group)
            int8 = OnnxClassifier(settings.model.model_copy(update={"onnx": path}))
            check = check_accuracy(fp32, int8, tensors, truths)
            int8.close()
            loops.append(BareLoop(path, bare_cfg, list(tensors[:200])))
            rows.append(
                {
                    "float_leading_convs": leading,
                    "weights": "grid-aligned" if align else "onnxruntime default",
                    "input": ("pixels, 4 columns" if group else "pixels, 1 column")
                    if leading == 0 and fold
                    else "float",
                    "coarse_fp32": check.coarse_accuracy_fp32,
                    "coarse_int8": check.coarse_accuracy_int8,
                    "top1_agreement": check.top1_agreement,
                }
            )
        # Speed last, every variant in the same rounds: measured between quantisations, the ratios of
        # identical graphs drifted apart by up to 20% with the machine's load.
        for row, ratio in zip(rows, speed_ratios(loops)[1:], strict=True):
            row["int8_over_fp32"] = ratio
    if not args.json:
        for row in rows:
            a, b = 100 * (row["coarse_fp32"] or 0.0), 100 * (row["coarse_int8"] or 0.0)
            print(
                f"{row['float_leading_convs']:2d} float convs, {row['weights']:19s}, {row['input']} input: "
                f"coarse {b:.2f}% "
                f"(FP32 {a:.2f}%, {b - a:+.2f}), top-1 agreement {row['top1_agreement']:.3f}, "
                f"INT8/FP32 {row['int8_over_fp32']:.2f}x"
            )
    fp32.close()
    if args.json:
        print(json.dumps({"heldout": len(tensors), "calibration": len(calibration), "variants": rows}, indent=2))


if __name__ == "__main__":
    main()
