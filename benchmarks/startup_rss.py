"""Start-up time (process start -> first label event received) and peak RSS of an onnx-backend daemon.

Runs `eyed run` as a child process with the real MobileNetV2 from $EYED_SHARED (its ONNX export cached
beforehand, as on a device), on a video file (what a camera deployment loads), on the replay source over
local parquet shards (which adds pyarrow, and datasets in a child process of its own), on the replay source
over a folder of images (datasets lists it in the same kind of child, and the daemon decodes the files) and on
the replay source over the default hub dataset, uoft-cs/cifar10 (test split: one of the shared shards), served
by a local stand-in for the hub (tests/fake_hub.py: loopback, so no network latency), and reports for each:
seconds to the first event at a real SUB socket, peak RSS (the child's VmHWM) and which of torch,
transformers, datasets and pandas it imported.

    .venv/bin/python benchmarks/startup_rss.py [--runs 3] [--onnx m8.onnx] [--replay-limit 200] [--json]

``--onnx`` runs that file (an `eyed export --int8` one, say) instead of the cached FP32 export.
``--replay-limit`` is how many records the replay daemon runs through: 30000 crosses two shard boundaries
(about 90 s a run for FP32 here), for the peak of a long replay.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from assets import cached_model

from eyed.subscriber import Subscriber

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.fake_hub import FakeHub, cifar10_repo  # noqa: E402 (the checkout's tests, beside this script)

# Modules an onnx-backend daemon should not need; the report names those it imported.
HEAVY = ("torch", "transformers", "datasets", "pandas")


def write_video(path: Path, frames: int = 60, size: tuple[int, int] = (320, 240)) -> Path:
    """A small MJPG clip of smooth random pictures, ``size`` = (width, height)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 15, size)
    rng = np.random.default_rng(0)
    for _ in range(frames):
        writer.write(cv2.resize(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8), size))
    writer.release()
    return path


def write_image_folder(path: Path, per_class: int = 100) -> Path:
    """An image folder for datasets' imagefolder builder: two class folders of small smooth PNG pictures."""
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (path / label).mkdir(parents=True)
        for i in range(per_class):
            cv2.imwrite(
                str(path / label / f"{i}.png"), cv2.resize(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8), (64, 64))
            )
    return path


def one_run(env: dict[str, str], endpoint: str) -> dict[str, Any]:
    # The child reports which heavy modules it imported and its peak RSS (VmHWM: ru_maxrss would not do, as
    # Linux carries this process's peak over into a child's at exec); the daemon itself is unchanged.
    probe = (
        "import atexit, re, sys; "
        "atexit.register(lambda: print('MODULES', "
        "re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1), "
        f"*[m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)); "
        "from eyed.cli import main; sys.exit(main(['run']))"
    )
    with Subscriber(endpoint, ("label.",)) as sub:
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-c", probe], env=env, stderr=subprocess.PIPE, text=True)
        sub.receive(120)
        first = time.monotonic() - t0
    # A long replay runs through its records after the first event: allow 20 frames/s at the least.
    _, err = proc.communicate(timeout=120 + int(env.get("EYED_SOURCE__LIMIT", "0")) / 20)
    if proc.returncode != 0:
        raise RuntimeError(f"eyed run exited {proc.returncode}: {err[-2000:]}")
    peak_kib, *imported = next(line for line in err.splitlines() if line.startswith("MODULES")).split()[1:]
    return {"first_event_s": first, "peak_rss_mb": int(peak_kib) / 1024, "imported": imported}


def measure(name: str, settings: dict[str, str], runs: int, folder: Path) -> dict[str, Any]:
    """``runs`` daemons with ``settings``, each publishing on an ipc socket in ``folder`` (removed with it)."""
    results = []
    for i in range(runs):
        endpoint = f"ipc://{folder}/{name}-{i}.sock"
        env = {k: v for k, v in os.environ.items() if not k.startswith("EYED_")}
        env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "EYED_PUBLISH__ENDPOINT": endpoint})
        env.update({"EYED_PUBLISH__WAIT_SUBSCRIBERS": "1", "EYED_LOG__LEVEL": "WARNING"})
        env.update(settings)
        results.append(one_run(env, endpoint))
    return {
        "source": name,
        "runs": runs,
        "first_event_s_median": statistics.median(r["first_event_s"] for r in results),
        "first_event_s": [round(r["first_event_s"], 3) for r in results],
        "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
        "imported": sorted({m for r in results for m in r["imported"]}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--onnx", type=Path, help="run this ONNX file instead of the cached FP32 export")
    parser.add_argument("--replay-limit", type=int, default=200, help="records the replay daemon runs through")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    shared, common = cached_model()
    if args.onnx:
        common["EYED_MODEL__ONNX"] = str(args.onnx.resolve())
    with contextlib.ExitStack() as stack:
        # Also the daemons' ipc sockets: none is left in the system's temporary folder.
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="eyed-startup-")))
        video = write_video(tmp / "clip.avi")
        repo = cifar10_repo(tmp / "hub", {"test": [shared / "data" / "cifar10" / "train-00000-of-00005.parquet"]})
        hub = stack.enter_context(FakeHub({("dataset", "uoft-cs/cifar10"): repo}))
        rows = [
            # The file source starts in the same order the RTSP/webcam ones do: model, publisher, then capture.
            measure("file", {**common, "EYED_SOURCE__KIND": "file", "EYED_SOURCE__URL": str(video)}, args.runs, tmp),
            measure(
                "replay",
                {
                    **common,
                    "EYED_SOURCE__DATASET": str(shared / "data" / "cifar10"),
                    "EYED_SOURCE__SPLIT": "train",
                    "EYED_SOURCE__LIMIT": str(args.replay_limit),
                },
                args.runs,
                tmp,
            ),
            measure(
                "images",
                {
                    **common,
                    "EYED_SOURCE__DATASET": str(write_image_folder(tmp / "images")),
                    "EYED_SOURCE__SPLIT": "train",
                    "EYED_SOURCE__LIMIT": str(min(args.replay_limit, 200)),
                },
                args.runs,
                tmp,
            ),
            measure(
                "hub",
                {
                    **common,
                    "HF_HUB_OFFLINE": "0",
                    "HF_DATASETS_OFFLINE": "0",
                    "HF_ENDPOINT": hub.endpoint,
                    "HF_HOME": str(tmp / "hf"),
                    "EYED_SOURCE__DATASET": "uoft-cs/cifar10",
                    "EYED_SOURCE__SPLIT": "test",
                    "EYED_SOURCE__LIMIT": str(args.replay_limit),
                },
                args.runs,
                tmp,
            ),
        ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        print(
            f"{r['source']:<7} first event {r['first_event_s_median']:.2f} s (runs {r['first_event_s']}), "
            f"peak RSS {r['peak_rss_mb']:.0f} MB, imported of {', '.join(HEAVY)}: "
            f"{', '.join(r['imported']) or 'none'}"
        )


if __name__ == "__main__":
    main()
