"""The replay source on a hub dataset id (the default, uoft-cs/cifar10), served by a local stand-in for the hub:
the split's parquet files are found by datasets in a child process and streamed by eyed's own reader."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import CIFAR10, ROOT, png, synthetic_images, write_parquet_dataset
from tests.fake_hub import FakeHub, cifar10_repo

REPO = "uoft-cs/cifar10"
BROKEN = "eyed/broken"
PICTURES = "eyed/pictures"
CORRUPT = "eyed/corrupt-pictures"


def write_pictures(folder: Path) -> list[tuple[str, np.ndarray]]:
    """A hub repository that is an image folder (not parquet): train/{cat,dog}/N.png; its (class, RGB image)."""
    written = []
    for label, images in (("cat", synthetic_images(2, seed=5)), ("dog", synthetic_images(2, seed=6))):
        (folder / "train" / label).mkdir(parents=True)
        for i, image in enumerate(images):
            (folder / "train" / label / f"{i}.png").write_bytes(png(image))
            written.append((label, image))
    return written


def truncate(image: Path) -> None:
    """Cuts a PNG file short: PIL opens it, and fails when datasets decodes it."""
    image.write_bytes(image.read_bytes()[:300])


@pytest.fixture(scope="module")
def hub_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """uoft-cs/cifar10's layout: a train split of two shards (7 and 5 images) and a test split of one (4), in
    row groups of 2 images of noise (27 KB each: a shard is larger than what pyarrow reads with the footer)."""
    tmp = tmp_path_factory.mktemp("hub")
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (96, 96, 3), dtype=np.uint8) for _ in range(16)]
    labels = [(3 * i) % 10 for i in range(16)]
    shards = [
        write_parquet_dataset(tmp / name, images[part], labels[part], rows_per_group=2) / "train-00000-of-00001.parquet"
        for name, part in (("a", slice(0, 7)), ("b", slice(7, 12)), ("c", slice(12, 16)))
    ]
    return cifar10_repo(tmp / "repo", {"train": shards[:2], "test": shards[2:]})


@pytest.fixture
def hub(hub_repo: Path, tmp_path: Path) -> Iterator[FakeHub]:
    """``hub_repo`` as uoft-cs/cifar10, BROKEN: one shard that is not parquet, and PICTURES: an image folder."""
    broken = tmp_path / "broken"
    (broken / "data").mkdir(parents=True)
    (broken / "data" / "train-00000-of-00001.parquet").write_bytes(b"PAR1 not a parquet file" * 1000)
    write_pictures(tmp_path / "pictures")
    write_pictures(tmp_path / "corrupt")
    truncate(tmp_path / "corrupt" / "train" / "cat" / "1.png")
    truncate(tmp_path / "corrupt" / "train" / "dog" / "0.png")
    repos = {
        ("dataset", REPO): hub_repo,
        ("dataset", BROKEN): broken,
        ("dataset", PICTURES): tmp_path / "pictures",
        ("dataset", CORRUPT): tmp_path / "corrupt",
    }
    with FakeHub(repos) as served:
        yield served


def hub_env(hub: FakeHub, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EYED_", "HF_"))}
    return {**env, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(home)}


# Each line: truth, a digest of the decoded RGB pixels, and which heavy modules the process ended up with.
EYED_READS = """
import hashlib, json, sys
from eyed.config import SourceConfig
from eyed.sources.replay import ReplaySource
cfg = SourceConfig(dataset=sys.argv[1], split=sys.argv[2], skip=int(sys.argv[3]))
with ReplaySource(cfg) as src:
    for f in src.frames():
        print(json.dumps([f.truth, hashlib.sha1(f.image.tobytes()).hexdigest()]))
print(json.dumps(sorted(m for m in ("datasets", "pandas") if m in sys.modules)))
"""

DATASETS_READS = """
import hashlib, json, sys
import numpy as np
from datasets import load_dataset
ds = load_dataset(sys.argv[1], split=sys.argv[2], streaming=True).skip(int(sys.argv[3]))
names = ds.features["label"].names
for r in ds:
    pixels = np.asarray(r["img"].convert("RGB"))
    print(json.dumps([names[r["label"]], hashlib.sha1(pixels.tobytes()).hexdigest()]))
"""


def run_lines(script: str, env: dict[str, str], *args: str) -> list[list[str]]:
    out = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines()]


@pytest.mark.parametrize(("split", "skip"), [("train", 0), ("train", 9), ("test", 1)])
def test_a_hub_dataset_replays_as_datasets_streams_it(hub: FakeHub, tmp_path: Path, split: str, skip: int) -> None:
    """Same records, order, labels and pixels as datasets' own streaming, without datasets in the process."""
    env = hub_env(hub, tmp_path / "hf")
    *ours, imported = run_lines(EYED_READS, env, REPO, split, str(skip))
    theirs = run_lines(DATASETS_READS, env, REPO, split, str(skip))
    assert ours == theirs
    assert len(ours) == {"train": 12, "test": 4}[split] - skip
    assert imported == []
    # The shards were streamed by range requests, not fetched whole (nothing of the pixels stays on disk), and
    # followed to storage as on the real hub.
    assert any(r.startswith("GET /datasets/uoft-cs/cifar10/resolve/") for r in hub.requests)
    assert any(r.startswith("GET /_storage/") for r in hub.requests)
    assert not list((tmp_path / "hf").rglob("*.parquet"))


def test_a_hub_dataset_of_image_files_is_streamed_by_datasets(hub: FakeHub, tmp_path: Path) -> None:
    """Not parquet: datasets streams it in the daemon, and decodes the files itself whatever eyed asks."""
    expected = write_pictures(tmp_path / "expected")
    *got, imported = run_lines(EYED_READS, hub_env(hub, tmp_path / "hf"), PICTURES, "train", "0")
    assert got == [[label, hashlib.sha1(image.tobytes()).hexdigest()] for label, image in expected]
    assert imported == ["datasets", "pandas"]


# Each line a frame's truth and pixel digest, then what was counted; READER_FAILURES_IN_A_ROW as given.
REPLAY_CORRUPT = """
import hashlib, json, sys
from eyed.config import SourceConfig
from eyed.sources import replay
replay.READER_FAILURES_IN_A_ROW = int(sys.argv[4])
pause = replay.ReplaySource._pause
def logged_pause(self, seconds):
    print("pause", seconds, file=sys.stderr)
    return pause(self, seconds)
replay.ReplaySource._pause = logged_pause
cfg = SourceConfig(dataset=sys.argv[1], split="train", loop=sys.argv[2] == "loop", limit=int(sys.argv[3]))
with replay.ReplaySource(cfg) as src:
    for f in src.frames():
        print(json.dumps([f.truth, hashlib.sha1(f.image.tobytes()).hexdigest()]))
print(json.dumps([src.skipped, src.reader_failures]))
"""


@pytest.mark.parametrize(("loop", "limit"), [("once", 0), ("loop", 7)])
def test_a_corrupt_image_in_a_hub_image_folder_is_passed_over(
    hub: FakeHub, tmp_path: Path, loop: str, limit: int
) -> None:
    """datasets decodes a hub image folder's files itself, and a corrupt one fails its whole iterator: the replay
    reads on after it, every pass, rather than replaying the first frames for ever."""
    pictures = write_pictures(tmp_path / "expected")
    good = [[label, hashlib.sha1(image.tobytes()).hexdigest()] for label, image in pictures[:1] + pictures[3:]]
    out = subprocess.run(
        [sys.executable, "-c", REPLAY_CORRUPT, CORRUPT, loop, str(limit), "10"],
        env=hub_env(hub, tmp_path / "hf"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    *got, counted = [json.loads(line) for line in out.stdout.splitlines()]
    err = out.stderr
    if loop == "once":
        assert got == good and counted == [2, 2]
        # The first failure is read past at once; the second in a row waits, as for a network coming back.
        assert [line for line in err.splitlines() if line.startswith("pause")] == ["pause 0.0", "pause 0.5"]
    else:
        assert got == (good * 4)[:7] and counted == [6, 6]  # the 4th pass stopped before its corrupt images


def test_a_pass_the_reader_keeps_failing_in_is_not_looped(hub: FakeHub, tmp_path: Path) -> None:
    """Failures in a row end the pass; another would end at the same place, so a looped replay fails (and the
    daemon exits non-zero, for systemd to restart it) rather than repeat its first frames or end as finished."""
    env = hub_env(hub, tmp_path / "hf")
    out = subprocess.run(
        [sys.executable, "-c", REPLAY_CORRUPT, CORRUPT, "loop", "8", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert "SourceError: the dataset reader failed 2 times in a row; not looping" in out.stderr
    got = [json.loads(line) for line in out.stdout.splitlines()]
    assert [truth for truth, _ in got] == ["cat"]


def test_a_missing_hub_dataset_says_so(hub: FakeHub, tmp_path: Path) -> None:
    env = hub_env(hub, tmp_path / "hf")
    script = (
        "import sys\nfrom eyed.config import SourceConfig\nfrom eyed.sources.replay import ReplaySource\n"
        "ReplaySource(SourceConfig(dataset='nobody/nothing')).__enter__()"
    )
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "SourceError: cannot reach the hub for dataset nobody/nothing (DatasetNotFoundError" in out.stderr


# Reading on after the network fails. The process under test tells the hub when to fail, and makes huggingface_hub
# read 4 KB ahead and eyed one row a batch (so a shard takes several requests, between rows), without
# huggingface_hub's own retries (23 s of waiting in all), so that every failed request reaches eyed's reader.
QUICK_FAILURES = """
import functools, hashlib, json, logging, os, sys
from huggingface_hub import hf_file_system
from eyed.sources import parquet
from tests.fake_hub import fake_hub_control
logging.basicConfig(level=logging.WARNING)
hf_file_system.http_backoff = functools.partial(hf_file_system.http_backoff, max_retries=0)
parquet.HUB_BLOCK_BYTES, parquet.BATCH_BYTES, parquet.HUB_RESUME_WAITS_S = 4096, 1, (0.0, 0.0)
"""

READ_ON = (
    QUICK_FAILURES
    + """
files, failing = json.loads(sys.argv[1]), dict(json.loads(sys.argv[2]))
failures = []
got = []
for row in parquet.ParquetRows(files, ["img", "label"], on_error=lambda path, exc: failures.append(path)):
    got.append(row)
    if len(got) in failing:
        fake_hub_control(os.environ["HF_ENDPOINT"], f"fail?downloads={failing[len(got)]}")
digests = [hashlib.sha1(r["img"]["bytes"]).hexdigest() for r in got]
print(json.dumps({"digests": digests, "labels": [r["label"] for r in got], "failures": failures}))
"""
)


def train_files() -> list[str]:
    sha = FakeHub.sha("dataset", REPO)
    return [f"hf://datasets/{REPO}@{sha}/plain_text/train-0000{i}-of-00002.parquet" for i in range(2)]


def read_hub_files(
    hub: FakeHub, tmp_path: Path, failing: int | dict[int, int], files: list[str] | None = None
) -> tuple[dict[str, list[object]], list[int]]:
    """``files`` (the train split) read by eyed's reader, with ``failing`` downloads failed after 3 rows (or
    {after so many rows: downloads failed}); the result, and the rows at which reading was taken up again
    (logged)."""
    files = files or train_files()
    failing = {3: failing} if isinstance(failing, int) else failing
    env = {**hub_env(hub, tmp_path / "hf"), "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", READ_ON, json.dumps(files), json.dumps(list(failing.items()))],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = [int(m) for m in re.findall(r"failed at row (\d+)", out.stderr)]
    return json.loads(out.stdout), resumed


def test_reading_goes_on_from_the_row_reached_when_the_hub_fails_for_a_while(hub: FakeHub, tmp_path: Path) -> None:
    clean, none = read_hub_files(hub, tmp_path, failing=0)
    assert clean["labels"] == [(3 * i) % 10 for i in range(12)] and none == []
    assert sum(r.startswith("GET /datasets/uoft-cs/cifar10/resolve/") for r in hub.requests) > 4  # range reads
    got, resumed = read_hub_files(hub, tmp_path, failing=2)  # within the two waits allowed
    assert got == clean  # nothing lost, nothing twice
    assert len(resumed) == 2 and 3 <= resumed[0] < 7  # mid-shard, after the rows already read


def test_the_waits_are_allowed_again_once_reading_has_gone_on(hub: FakeHub, tmp_path: Path) -> None:
    """Two outages in one shard, each using both waits allowed, with rows read between them."""
    clean, _ = read_hub_files(hub, tmp_path, failing=0)
    got, resumed = read_hub_files(hub, tmp_path, failing={3: 2, 5: 2})
    assert got == clean
    assert len(resumed) == 4 and resumed[0] < resumed[2]


def test_a_hub_shard_that_stays_unreadable_is_reported_and_the_next_one_read(hub: FakeHub, tmp_path: Path) -> None:
    got, resumed = read_hub_files(hub, tmp_path, failing=3)  # one more than the waits allow
    assert got["failures"] == train_files()[:1]
    assert len(resumed) == 2
    # The rows before the failure, then the second shard: the rest of the first is given up.
    assert got["labels"] == [(3 * i) % 10 for i in [*range(resumed[0]), *range(7, 12)]]


REPLAY_UNTIL_DOWN = (
    QUICK_FAILURES
    + """
from eyed.config import SourceConfig
from eyed.sources.replay import ReplaySource
with ReplaySource(SourceConfig(dataset=sys.argv[1], split="train")) as src:
    frames = src.frames()
    first = [next(frames).truth for _ in range(2)]
    fake_hub_control(os.environ["HF_ENDPOINT"], "down")
    rest = [f.truth for f in frames]
print(json.dumps({"first": first, "rest": rest, "failures": src.reader_failures, "skipped": src.skipped}))
"""
)


def test_a_hub_that_goes_away_ends_the_pass_counted(hub: FakeHub, tmp_path: Path) -> None:
    """Through the replay source: class names from the hub's dataset card; a hub that goes away costs the rest
    of the pass, each shard counted, not the daemon."""
    env = {**hub_env(hub, tmp_path / "hf"), "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", REPLAY_UNTIL_DOWN, REPO], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)
    assert got["first"] == [CIFAR10[0], CIFAR10[3]]
    assert len(got["rest"]) < 5  # a row or two may have been read ahead
    assert (got["failures"], got["skipped"]) == (2, 2)


def test_a_broken_hub_shard_is_passed_over_at_once(hub: FakeHub, tmp_path: Path) -> None:
    """Not parquet is not a network failure: no waiting to read it again."""
    broken = f"hf://datasets/{BROKEN}@{FakeHub.sha('dataset', BROKEN)}/data/train-00000-of-00001.parquet"
    got, resumed = read_hub_files(hub, tmp_path, failing=0, files=[broken, *train_files()])
    assert got["failures"] == [broken] and resumed == []
    assert got["labels"] == [(3 * i) % 10 for i in range(12)]


STOP_WHILE_HUB_FAILS = (
    QUICK_FAILURES
    + """
import threading, time
from eyed.config import SourceConfig
from eyed.sources.replay import ReplaySource
control, loop, blocks = sys.argv[2:5]
parquet.HUB_RESUME_WAITS_S = (60.0,)
if blocks == "whole":  # the first shard comes in one block: a stall holds the second shard's opening
    parquet.HUB_BLOCK_BYTES = 2 << 20
stop = threading.Event()
with ReplaySource(SourceConfig(dataset=sys.argv[1], split="train", loop=loop == "loop")) as src:
    frames = src.frames(stop)
    first = [next(frames).truth for _ in range(2)]
    fake_hub_control(os.environ["HF_ENDPOINT"], control)
    threading.Timer(1.0, stop.set).start()
    start = time.monotonic()
    rest = [f.truth for f in frames]
    waited = time.monotonic() - start
print(json.dumps({"rest": rest, "waited": waited, "failures": src.reader_failures, "skipped": src.skipped}))
"""
)


def stopped_while_the_hub_fails(
    hub: FakeHub, tmp_path: Path, control: str, loop: str = "once", blocks: str = "small"
) -> tuple[dict[str, Any], str, float]:
    """A replay of the train split stopped 1 s after the hub was told ``control`` ("down", "stall"), two records
    in; what it read and how long the stop took, its stderr, and how long the whole process took."""
    env = {**hub_env(hub, tmp_path / "hf"), "PYTHONPATH": str(ROOT)}
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", STOP_WHILE_HUB_FAILS, REPO, control, loop, blocks],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout), out.stderr, time.monotonic() - start


@pytest.mark.parametrize("loop", ["once", "loop"])
def test_a_stop_cuts_short_the_wait_to_read_a_hub_shard_again(hub: FakeHub, tmp_path: Path, loop: str) -> None:
    """A daemon stopped during a hub outage stops within its shutdown bound, not after eyed's waits, and a
    looping replay does not start another pass (nor the next shard) to fail on."""
    got, stderr, _ = stopped_while_the_hub_fails(hub, tmp_path, "down", loop)
    assert stderr.count("reading on in 60 s") == 1
    assert got["waited"] < 10  # the stop came after 1 s
    assert got["failures"] == 0  # stopped, not failed


@pytest.mark.parametrize("held", ["open", "read"])
def test_a_stop_does_not_wait_for_a_stalled_hub(hub: FakeHub, tmp_path: Path, held: str) -> None:
    """A network that stalls holds a request for huggingface_hub's 10 s timeout (five times over, with the
    retries turned off here); a replay told to stop meanwhile ends at once, uncounted, and its process exits
    although the request is still held."""
    got, stderr, took = stopped_while_the_hub_fails(
        hub, tmp_path, "stall", blocks="whole" if held == "open" else "small"
    )
    assert got["waited"] < 5  # the stop came after 1 s; the request would have been held 10 s
    assert (got["failures"], got["skipped"]) == (0, 0)  # stopped, not failed
    if held == "open":  # the first shard came in one block: what it had left, then the second shard's opening
        assert got["rest"] == [CIFAR10[(3 * i) % 10] for i in range(2, 7)]
    else:
        assert len(got["rest"]) <= 1
    assert took < 30  # not held up at exit by the request still waiting
    assert "Traceback" not in stderr


# The hub stalls once the child process has described the dataset (not parquet), as the daemon itself asks
# datasets to stream it, and the daemon is told to stop 1 s later.
STOP_WHILE_DATASETS_LOADS = """
import json, os, sys, threading, time
from eyed.config import SourceConfig
from eyed.sources.replay import ReplaySource
from eyed.types import StartUp
from tests.fake_hub import fake_hub_control
startup, stopped_at = StartUp(), []
stream = ReplaySource._stream
def stop() -> None:
    stopped_at.append(time.monotonic())
    startup.stop.set()
def stalled(self, name):
    fake_hub_control(os.environ["HF_ENDPOINT"], "stall")
    threading.Timer(1.0, stop).start()
    return stream(self, name)
ReplaySource._stream = stalled
try:
    ReplaySource(SourceConfig(dataset=sys.argv[1], split="train"), startup=startup).__enter__()
    error = None
except Exception as exc:
    error = f"{type(exc).__name__}: {exc}"
print(json.dumps({"error": error, "waited": time.monotonic() - stopped_at[0]}))
"""


def test_a_stop_does_not_wait_for_datasets_on_a_stalled_hub(hub: FakeHub, tmp_path: Path) -> None:
    """huggingface_hub retries a stalled network for minutes while datasets opens a hub image folder; a daemon
    told to stop meanwhile gives up its start at once, as it does while the child process asks the hub."""
    env = {**hub_env(hub, tmp_path / "hf"), "PYTHONPATH": str(ROOT)}
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", STOP_WHILE_DATASETS_LOADS, PICTURES],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)
    assert hub.stalled.is_set()
    assert got["waited"] < 5
    assert got["error"].startswith(f"SourceError: cannot reach the hub for dataset {PICTURES} (stopped while")
    assert time.monotonic() - start < 40  # not held up at exit by the request still waiting


READ_AHEAD = """
import json, sys
from eyed.sources import parquet
parquet.HUB_BLOCK_BYTES = 8192
with parquet.HubFile(sys.argv[1]) as f:
    got = [(0, f.read(100))]
    print(f.size, flush=True)
    sys.stdin.readline()  # the test saw the next block asked for
    f.seek(-100, 2)
    got.append((f.tell(), f.read(100)))  # a footer: read as it is
    f.seek(100)
    got.append((100, f.read(8192 + 50)))  # the first block's rest, and the block read ahead
    got.append((f.tell(), f.read()))  # to the end
print(json.dumps([(at, data.hex()) for at, data in got]))
"""


def test_a_hub_shard_is_read_a_block_ahead(hub: FakeHub, tmp_path: Path) -> None:
    """The next block is asked for while pyarrow reads the one before, and kept through a small read elsewhere."""
    env = {**hub_env(hub, tmp_path / "hf"), "PYTHONPATH": str(ROOT)}
    file = train_files()[0]
    proc = subprocess.Popen(
        [sys.executable, "-c", READ_AHEAD, file], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdin is not None and proc.stdout is not None
    size = int(proc.stdout.readline())
    deadline = time.monotonic() + 30
    while "bytes=8192-16383" not in hub.ranges and time.monotonic() < deadline:
        time.sleep(0.05)
    assert hub.ranges == ["bytes=0-8191", "bytes=8192-16383"]  # asked for before it was wanted
    proc.stdin.write("\n")
    proc.stdin.close()
    got = json.loads(proc.stdout.read())
    assert proc.wait(30) == 0
    in_repo = file.split("@", 1)[1].split("/", 1)[1]  # hf://datasets/org/name@sha/<path in the repository>
    content = (hub.repos[("dataset", REPO)] / in_repo).read_bytes()
    assert len(content) == size
    assert [bytes.fromhex(data) for _, data in got] == [content[at : at + len(bytes.fromhex(data))] for at, data in got]
    assert sum(len(bytes.fromhex(data)) for _, data in got) == 100 + 100 + 8242 + size - 8342
    assert hub.ranges[2] == f"bytes={size - 100}-{size - 1}"  # the footer alone
    assert hub.ranges.count("bytes=8192-16383") == 1  # the block read ahead was kept through it
