"""CPU use and latency of the daemon at a camera's pace, with onnxruntime's threads spinning and not.

Runs `eyed run` with the real MobileNetV2 from $EYED_SHARED (ONNX backend, export cached beforehand) on a
640x480 video file paced to `--fps` (what a camera delivers), once with `model.spinning=on` and once with
`off` (what `auto` picks for cameras and paced sources). Reports the daemon's CPU time per frame and as a
share of one core in steady state (read from /proc between the 20th and the last event, so start-up is not
counted), and the latency p50/p99 of the label events a SUB socket received.

    .venv/bin/python benchmarks/live_cpu.py [--seconds 12] [--fps 15] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from assets import cached_model
from startup_rss import write_video

from eyed.subscriber import Subscriber

WARM_EVENTS = 20  # events before the steady-state measurement starts


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (utime and stime are fields 14 and 15 of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_run(env: dict[str, str], endpoint: str, frames: int) -> dict[str, Any]:
    latencies: list[float] = []
    with Subscriber(endpoint, ("label.",)) as sub:
        proc = subprocess.Popen([sys.executable, "-m", "eyed", "run"], env=env, stderr=subprocess.PIPE, text=True)
        while len(latencies) < WARM_EVENTS:
            latencies.append(sub.receive(120)[1]["latency_ms"])
        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        while len(latencies) < frames:
            latencies.append(sub.receive(30)[1]["latency_ms"])
        cpu1, t1 = cpu_seconds(proc.pid), time.monotonic()
    _, err = proc.communicate(timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"eyed run exited {proc.returncode}: {err[-2000:]}")
    steady = frames - WARM_EVENTS
    lat = np.asarray(latencies[WARM_EVENTS:])
    return {
        "frames": steady,
        "fps": steady / (t1 - t0),
        "cpu_ms_per_frame": (cpu1 - cpu0) / steady * 1000,
        "cpu_share_of_one_core": (cpu1 - cpu0) / (t1 - t0),
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--fps", type=float, default=15.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    _, model = cached_model()
    frames = WARM_EVENTS + int(args.seconds * args.fps)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        video = write_video(Path(tmp) / "clip.avi", frames, (640, 480))
        for spinning in ("on", "off"):
            endpoint = f"ipc://{tmp}/live-{spinning}.sock"
            env = {k: v for k, v in os.environ.items() if not k.startswith("EYED_")}
            env.update(
                {
                    "HF_HUB_OFFLINE": "1",
                    **model,
                    "EYED_MODEL__SPINNING": spinning,
                    "EYED_SOURCE__KIND": "file",
                    "EYED_SOURCE__URL": str(video),
                    "EYED_SOURCE__FPS": str(args.fps),
                    "EYED_PUBLISH__ENDPOINT": endpoint,
                    "EYED_PUBLISH__WAIT_SUBSCRIBERS": "1",
                    "EYED_LOG__LEVEL": "WARNING",
                }
            )
            rows.append({"spinning": spinning, **one_run(env, endpoint, frames)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        print(
            f"spinning={r['spinning']:<3}  {r['fps']:5.1f} fps  CPU {r['cpu_ms_per_frame']:5.1f} ms/frame "
            f"({r['cpu_share_of_one_core']:.0%} of one core)  "
            f"latency p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms"
        )


if __name__ == "__main__":
    main()
