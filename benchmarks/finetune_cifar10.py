"""Fine-tune MobileNetV2's head on CIFAR-10 with the real assets, then compare it with the zero-shot model.

Trains with `eyed finetune` on the first --limit images of CIFAR-10 train in $EYED_SHARED (a tenth of them held
out for validation), then runs `eyed eval` on the last 5,000 train images, which training never saw: the
zero-shot ImageNet model (coarse labels through the shipped mapping and priors) against the fine-tuned one
(native CIFAR-10 labels), on the same frames, with per-class accuracy and both confusion matrices as a PNG.

    .venv/bin/python benchmarks/finetune_cifar10.py [--limit 45000] [--output /tmp/eyed-ft-cifar10]

The backbone features are cached under the model cache, so a second run only retrains the head.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from assets import shared_folder

ROOT = Path(__file__).resolve().parent.parent


def run(args: list[str]) -> tuple[str, float]:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "eyed", *args], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"eyed {args[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout, time.monotonic() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=45000, help="training images (first of CIFAR-10 train)")
    parser.add_argument("--output", type=Path, default=Path("/tmp/eyed-ft-cifar10"))
    parser.add_argument("--heldout", type=int, default=5000, help="evaluated images, from record 45000 on")
    args = parser.parse_args()
    if args.limit > 45000:
        raise SystemExit("--limit above 45000 would train on the held-out images")
    shared = shared_folder()
    config = [
        "--set", f"source.dataset={shared / 'data' / 'cifar10'}",
        "--set", "source.split=train",
        "--set", f"model.id={shared / 'models' / 'mobilenet_v2_1.0_224'}",
        "--set", f"model.cache_dir={ROOT / '.cache' / 'eyed'}",
    ]  # fmt: skip
    report, train_s = run(["finetune", *config, "--limit", str(args.limit), "--output", str(args.output)])
    print(report.strip())
    print(f"finetune wall time: {train_s:.0f} s for {args.limit} images")
    png = args.output / "confusion.png"
    ev = ["eval", *config, "--set", f"source.limit={args.heldout}", "--skip", "45000"]
    text, eval_s = run([*ev, "--vs", f"model.id={args.output}", "--png", str(png)])
    print(text.strip())
    print(f"eval wall time: {eval_s:.0f} s for {args.heldout} held-out images, both models")


if __name__ == "__main__":
    main()
