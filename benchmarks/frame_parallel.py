"""Two ways to use this machine's N cores: one frame at a time on N onnxruntime threads (what eyed does for
cameras and paced sources), or N frames at once, each on one thread (one session, run from N Python threads;
onnxruntime releases the GIL while it runs: what eyed does at fps 0, ``model.workers``). A bare loop on random
pixels, FP32 and INT8, in alternating rounds.

    .venv/bin/python benchmarks/frame_parallel.py --int8 m8.onnx [--fp32 FILE] [--frames 1200] [--rounds 4]

The FP32 file defaults to the cached export of the real MobileNetV2 from $EYED_SHARED (made if missing).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from assets import cached_fp32

from eyed.config import ModelConfig, available_cores
from eyed.model.export import INPUT_NAME, K_NAME, OUTPUT_NAME
from eyed.model.onnx_backend import open_session


def session(path: Path, threads: int) -> Any:
    # The daemon's options at fps 0 (spinning on), with the thread count under test.
    return open_session(path, ModelConfig(onnx=path, threads=threads, spinning="on"))


def fps(sess: Any, feeds: list[dict[str, np.ndarray]], frames: int, workers: int) -> float:
    """Frames/s of ``frames`` frames shared among ``workers`` threads (the remainder to the first ones), counted
    as they ran."""
    shares = [frames // workers + (i < frames % workers) for i in range(workers)]
    ran = [0] * workers

    def work(worker: int) -> None:
        for i in range(shares[worker]):
            sess.run([OUTPUT_NAME], feeds[i % len(feeds)])
            ran[worker] += 1

    t = time.perf_counter()
    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return sum(ran) / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--int8", type=Path, required=True, help="an `eyed export --int8` file")
    parser.add_argument("--fp32", type=Path)
    parser.add_argument("--frames", type=int, default=1200)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    fp32 = args.fp32 or cached_fp32()
    rng = np.random.default_rng(0)
    feeds: list[dict[str, np.ndarray]] = [
        {INPUT_NAME: rng.integers(0, 256, (1, 224, 224, 3), dtype=np.uint8), K_NAME: np.array([1], dtype=np.int64)}
        for _ in range(50)
    ]
    # The cores this process may use (an affinity mask or a CPU quota counts), as the daemon counts them.
    cores = available_cores()
    threaded, at_once = f"one frame, {cores} threads", f"{cores} frames at once, one thread each"
    ways = {threaded: (cores, 1), at_once: (1, cores)}
    files = {"fp32": fp32, "int8": args.int8}
    results: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for model, path in files.items():
            for way, (threads, workers) in ways.items():
                # A session per round and only one alive at a time: an idle session's threads would spin
                # beside the one measured.
                sess = session(path, threads)
                fps(sess, feeds, 20, workers)  # warm-up
                results.setdefault((model, way), []).append(fps(sess, feeds, args.frames, workers))
                del sess
    median = {key: statistics.median(values) for key, values in results.items()}
    for (model, way), value in median.items():
        print(f"{model} {way:<36} {value:7.1f} frames/s")
    for way in ways:
        print(f"int8/fp32, {way}: {median[('int8', way)] / median[('fp32', way)]:.2f}x")
    for model in ("fp32", "int8"):
        print(f"{model}: {at_once} / {threaded}: {median[(model, at_once)] / median[(model, threaded)]:.2f}x")


if __name__ == "__main__":
    main()
