"""Replay from a hub dataset over a slow link: eyed's hub reader, which asks for the next block while the rows
of the one before are classified, against huggingface_hub's own file, which eyed read through before (each
block asked for when pyarrow reaches it), on the same shard, link and consumer.

The hub is tests/fake_hub.py serving one of the shared CIFAR-10 shards as uoft-cs/cifar10, with each answer
delayed by the link's latency and files sent at its rate. The consumer stands in for the daemon's inference: it
decodes each record and spends ``--fps``'s share of time per frame asleep (with the GIL released, as
onnxruntime runs). Each run is a child process; the report gives frames/s and the child's peak RSS.

    .venv/bin/python benchmarks/hub_link.py [--rows 3000] [--fps 580] [--json]

580 frames/s is what the INT8 daemon path reached on this machine (``eyed bench``); ``--fps 0`` reads as fast
as the source can.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from assets import shared_folder  # noqa: E402

from tests.fake_hub import FakeHub, cifar10_repo  # noqa: E402 (the checkout's tests, beside this script)

# name: (latency per request in s, bytes/s; None: as fast as loopback goes)
LINKS: dict[str, tuple[float, float | None]] = {
    "loopback": (0.0, None),
    "4 MB/s, 20 ms": (0.02, 4e6),
    "1 MB/s, 50 ms": (0.05, 1e6),
}
READERS = ("eyed", "huggingface_hub file")
# Records read in each run, as in the README's figures.
ROWS = 3000

CHILD = """
import contextlib, json, resource, sys, time
from eyed.sources import parquet
from eyed.sources.replay import decode_image
files, rows, fps, reader = json.loads(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
if reader != "eyed":
    from huggingface_hub import HfFileSystem

    @contextlib.contextmanager
    def opened(path, pause=None):
        with HfFileSystem().open(path, "rb", block_size=5 << 20) as f:  # eyed's reader before 2026-11-24
            yield f

    parquet.opened_shard = opened
parquet.prepare_hub_reading()
per_frame = 1 / fps if fps else 0.0
start = time.perf_counter()
n, owed = 0, 0.0
for row in parquet.ParquetRows(files, ["img", "label"]):
    if decode_image(row["img"]) is None:
        raise SystemExit("a record did not decode")
    n, owed = n + 1, owed + per_frame
    if owed >= 0.01:
        time.sleep(owed)
        owed = 0.0
    if n == rows:
        break
elapsed = time.perf_counter() - start
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"rows": n, "seconds": elapsed, "fps": n / elapsed, "peak_rss_mb": peak_mb}))
"""


def run(hub: FakeHub, home: Path, rows: int, fps: float, reader: str) -> dict[str, Any]:
    sha = FakeHub.sha("dataset", "uoft-cs/cifar10")
    files = [f"hf://datasets/uoft-cs/cifar10@{sha}/plain_text/test-00000-of-00001.parquet"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EYED_", "HF_"))}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(home), PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(files), str(rows), str(fps), reader],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=ROWS, help="records read in each run (a shard has 10,000)")
    parser.add_argument("--fps", type=float, default=580.0, help="the consumer's frames/s; 0: no consumer")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    shared = shared_folder()
    shard = shared / "data" / "cifar10" / "train-00000-of-00005.parquet"
    if not shard.exists():
        raise SystemExit(f"no {shard}: set EYED_SHARED")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = cifar10_repo(Path(tmp) / "hub", {"test": [shard]})
        for link, (latency_s, rate) in LINKS.items():
            with contextlib.ExitStack() as stack:
                repos = {("dataset", "uoft-cs/cifar10"): repo}
                hub = stack.enter_context(FakeHub(repos, latency_s=latency_s, bytes_per_s=rate))
                for reader in READERS:
                    got = run(hub, Path(tmp) / "hf", args.rows, args.fps, reader)
                    results.append({"link": link, "reader": reader, **got})
    if args.json:
        print(json.dumps({"rows": args.rows, "consumer_fps": args.fps, "runs": results}, indent=2))
        return
    print(f"{args.rows} records of one CIFAR-10 shard; consumer at {args.fps:g} frames/s (0: none)")
    print(f"{'link':16s} {'reader':22s} {'frames/s':>9s} {'seconds':>8s} {'peak RSS MB':>12s}")
    for r in results:
        print(f"{r['link']:16s} {r['reader']:22s} {r['fps']:9.0f} {r['seconds']:8.1f} {r['peak_rss_mb']:12.0f}")


if __name__ == "__main__":
    main()
