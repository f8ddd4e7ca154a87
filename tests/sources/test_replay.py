"""The replay source on generated parquet datasets, image decoding, and pacing."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Generator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import PIL.Image
import PIL.ImageOps
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eyed.config import ConfigError, SourceConfig
from eyed.sources import SourceError, dataset_info, open_recorded, open_source
from eyed.sources import base as base_module
from eyed.sources import parquet as parquet_module
from eyed.sources import replay as replay_module
from eyed.sources.base import Pacer, pace_listener, to_rgb
from eyed.sources.replay import MAX_TRUTH_CHARS, ReplaySource, decode_image, not_a_label
from eyed.types import Frame, StartUp
from tests.conftest import CIFAR10, png, synthetic_images, write_parquet_dataset
from tests.daemon_helpers import finish, start_daemon

# tiny_dataset: 12 images, record i has label i % 10, record 5 is corrupt.
GOOD = [i for i in range(12) if i != 5]


def replay(dataset: Path, **kwargs: Any) -> tuple[list[Frame], ReplaySource]:
    cfg = SourceConfig(dataset=str(dataset), split="train", **kwargs)
    with ReplaySource(cfg) as src:
        frames = list(src.frames())
    return frames, src


@pytest.mark.usefixtures("reader")
def test_replays_every_good_record(tiny_dataset: Path) -> None:
    frames, src = replay(tiny_dataset)
    assert len(frames) == 11
    assert src.skipped == 1
    images = synthetic_images(12)
    for frame, i in zip(frames, GOOD, strict=True):
        assert frame.image.dtype == np.uint8
        assert frame.image.shape == (32, 32, 3)
        assert np.array_equal(frame.image, images[i])  # RGB, not BGR
        assert frame.truth == CIFAR10[i % 10]
    assert [f.index for f in frames] == list(range(11))
    assert src.id == f"{tiny_dataset.name}-train"


def test_open_source_table(tiny_dataset: Path) -> None:
    with open_source(SourceConfig(dataset=str(tiny_dataset), split="train", limit=2)) as src:
        assert isinstance(src, ReplaySource)
        assert len(list(src.frames())) == 2


def test_limit(tiny_dataset: Path) -> None:
    frames, _ = replay(tiny_dataset, limit=4)
    assert [f.truth for f in frames] == CIFAR10[:4]


@pytest.mark.usefixtures("reader")
def test_limit_counts_frames_not_records(tiny_dataset: Path) -> None:
    frames, src = replay(tiny_dataset, limit=7)
    assert len(frames) == 7
    assert src.skipped == 1
    assert frames[-1].truth == CIFAR10[7]


@pytest.mark.usefixtures("reader")
def test_skip(tiny_dataset: Path) -> None:
    frames, src = replay(tiny_dataset, skip=3)
    assert [f.truth for f in frames] == [CIFAR10[i % 10] for i in range(3, 12) if i != 5]
    assert [f.index for f in frames] == list(range(8))
    assert src.skipped == 1


@pytest.mark.usefixtures("reader")
def test_loop_wraps_around(tiny_dataset: Path) -> None:
    frames, src = replay(tiny_dataset, loop=True, limit=30)
    assert len(frames) == 30
    assert [f.index for f in frames] == list(range(30))
    expected = [CIFAR10[i % 10] for i in GOOD] * 3
    assert [f.truth for f in frames] == expected[:30]
    assert src.skipped == 3  # the corrupt record, once per pass


@pytest.mark.usefixtures("reader")
def test_a_looping_replay_whose_dataset_goes_bad_fails_instead_of_spinning(tmp_path: Path) -> None:
    images = synthetic_images(3)
    folder = write_parquet_dataset(tmp_path / "data", images, [0, 1, 2])
    with ReplaySource(SourceConfig(dataset=str(folder), split="train", loop=True)) as src:
        frames = src.frames()
        assert [next(frames).truth for _ in range(3)] == CIFAR10[:3]
        write_parquet_dataset(folder, images, [0, 1, 2], corrupt=(0, 1, 2))  # replaced after the first pass
        with pytest.raises(SourceError, match="gave no frame"):
            next(frames)
    assert src.delivered == 3
    assert src.skipped == 3


def test_frames_outside_the_context_manager(tiny_dataset: Path) -> None:
    src = ReplaySource(SourceConfig(dataset=str(tiny_dataset), split="train"))
    with pytest.raises(RuntimeError):
        next(src.frames())


class NotParquet:
    """A SplitQuery that finds no parquet shards, as for an image folder or a hub dataset."""

    def __init__(self, folder: str, split: str) -> None:
        pass

    def result(self, startup: StartUp | None = None) -> None:
        return None

    def cancel(self) -> None:
        pass


@pytest.fixture(params=["eyed", "datasets"])
def reader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Local parquet shards are read by eyed (ParquetRows); "datasets" sends them through datasets' streaming
    builder instead, the path hub datasets take."""
    if request.param == "datasets":
        monkeypatch.setattr(replay_module, "SplitQuery", NotParquet)


def _open_files(folder: Path) -> list[str]:
    """Files under ``folder`` this process has open (by Python or by Arrow's own readers)."""
    names = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            names.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the descriptor listdir itself used
            continue
    return [n for n in names if n.startswith(str(folder))]


@pytest.mark.parametrize("kept", [True, False])
@pytest.mark.usefixtures("reader")
def test_a_pass_left_unfinished_is_released_with_the_source(tiny_dataset: Path, kept: bool) -> None:
    """A scan abandoned mid-pass (a limit, a stopped daemon) must be freed when the source closes, not by the
    garbage collector at interpreter exit: there, an Arrow thread that drops the last reference to the shard's
    Python file cannot take the GIL, and the process aborted (exit 134) in about one run in six under load."""
    with ReplaySource(SourceConfig(dataset=str(tiny_dataset), split="train")) as src:
        frames = src.frames()
        next(frames)
        assert _open_files(tiny_dataset)  # the scan is under way
        if not kept:
            del frames  # dropped by its reader, as a pipeline does; datasets' cycles keep the scan alive
    assert not _open_files(tiny_dataset)


def test_fps_paces_frames(tiny_dataset: Path) -> None:
    frames, _ = replay(tiny_dataset, fps=50, limit=6)
    gaps = np.diff([f.ts for f in frames])
    assert len(frames) == 6
    assert gaps.mean() >= 0.015  # a lower bound only: a busy machine may be slower, never faster


def test_fps_first_interval_is_paced(tiny_dataset: Path) -> None:
    frames, _ = replay(tiny_dataset, fps=10, limit=3)
    assert frames[-1].ts - frames[0].ts >= 0.18  # two periods of 0.1 s, minus slack


def test_pacer_spaces_the_first_two_calls() -> None:
    pacer = Pacer(10)
    pacer.wait()
    start = time.monotonic()
    pacer.wait()
    assert time.monotonic() - start >= 0.08


class OversleepingClock(threading.Event):
    """A stop event whose wait() moves a fake monotonic clock on by the timeout plus an oversleep, as a busy
    machine's sleeps do, instead of sleeping."""

    def __init__(self, oversleep: float) -> None:
        super().__init__()
        self.now = 1000.0
        self.oversleep = oversleep

    def monotonic(self) -> float:
        return self.now

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None
        self.now += timeout + self.oversleep
        return False


def test_the_pace_keeps_its_schedule_through_oversleeps(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every sleep overruns by 0.2 ms: scheduling from the wake-up instead of the slot would lose 2% at 100 fps
    # (a 10 ms period); from the slot the overruns do not add up.
    clock = OversleepingClock(oversleep=0.0002)
    monkeypatch.setattr(base_module, "time", SimpleNamespace(monotonic=clock.monotonic))
    pacer = Pacer(100, clock)
    pacer.wait()
    start = clock.now
    for _ in range(300):
        assert pacer.wait()
    assert clock.now - start == pytest.approx(300 * 0.01, abs=0.001)


def test_a_frame_later_than_its_slot_starts_a_new_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = OversleepingClock(oversleep=0.0)
    monkeypatch.setattr(base_module, "time", SimpleNamespace(monotonic=clock.monotonic))
    pacer = Pacer(10, clock)
    pacer.wait()
    clock.now += 1.0  # the consumer was busy for ten periods
    late = clock.now
    pacer.wait()
    assert clock.now == late  # no sleep: it is late
    pacer.wait()
    pacer.wait()
    assert clock.now == pytest.approx(late + 0.2)  # paced again, not a burst of the ten missed frames


def test_stop_cuts_a_slow_pace_short() -> None:
    stop = threading.Event()
    pacer = Pacer(0.05, stop)  # a frame every 20 s
    assert pacer.wait()  # the first frame goes at once
    threading.Timer(0.2, stop.set).start()
    start = time.monotonic()
    assert not pacer.wait()
    assert time.monotonic() - start < 5


def test_stop_ends_a_paced_replay(tiny_dataset: Path) -> None:
    stop = threading.Event()
    with ReplaySource(SourceConfig(dataset=str(tiny_dataset), split="train", fps=0.1)) as src:
        frames = src.frames(stop)
        assert next(frames).index == 0
        threading.Timer(0.2, stop.set).start()
        start = time.monotonic()
        assert list(frames) == []
        assert time.monotonic() - start < 5


def test_pacer_zero_fps_never_sleeps() -> None:
    pacer = Pacer(0)
    assert pacer.period == 0.0
    for _ in range(1000):
        pacer.wait()  # returns at once: a sleep of even 1 ms each would make this test take a second


@pytest.mark.usefixtures("reader")
def test_int_label_column_without_class_names(tmp_path: Path) -> None:
    from datasets import Dataset, Features, Image, Value

    images = synthetic_images(3, seed=9)
    ds = Dataset.from_dict(
        {"image": [{"bytes": png(img), "path": None} for img in images], "label": [7, 3, 11]},
        features=Features({"image": Image(), "label": Value("int64")}),
    )
    ds.to_parquet(str(tmp_path / "train-00000-of-00001.parquet"))
    frames, src = replay(tmp_path)
    assert [f.truth for f in frames] == ["7", "3", "11"]
    assert np.array_equal(frames[2].image, images[2])
    assert src.skipped == 0


def image_folder(root: Path, labels: list[str | None], seed: int = 4) -> list[np.ndarray]:
    """``root/train/<label>/<i>.png`` (or ``root/train/<i>.png`` for a None label); the images written."""
    images = synthetic_images(len(labels), seed=seed)
    for i, (label, img) in enumerate(zip(labels, images, strict=True)):
        folder = root / "train" / label if label else root / "train"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.png").write_bytes(png(img))
    return images


@pytest.mark.usefixtures("reader")
def test_image_folder_replays(tmp_path: Path) -> None:
    # eyed decodes the files datasets' image-folder builder lists; "datasets" streams them through datasets.
    images = image_folder(tmp_path, ["cat", "dog", "cat", "bird"])
    (tmp_path / "train" / "dog" / "9.png").write_bytes(b"not a png")  # listed by datasets, undecodable
    frames, src = replay(tmp_path, skip=1)
    # datasets' order: by path (bird/3, cat/0, cat/2, dog/1, dog/9), from the second on.
    assert [f.truth for f in frames] == ["cat", "cat", "dog"]
    for frame, i in zip(frames, [0, 2, 1], strict=True):
        assert np.array_equal(frame.image, images[i])
    assert src.class_names == ["bird", "cat", "dog"]
    assert src.skipped == 1


@pytest.mark.usefixtures("reader")
def test_image_folder_without_classes_has_no_truth_and_loops(tmp_path: Path) -> None:
    images = image_folder(tmp_path, [None, None])
    frames, src = replay(tmp_path, loop=True, limit=5)
    assert [f.truth for f in frames] == [None] * 5
    for frame, i in zip(frames, [0, 1, 0, 1, 0], strict=True):
        assert np.array_equal(frame.image, images[i])
    assert src.class_names is None


@pytest.mark.usefixtures("reader")
def test_image_folder_with_a_label_file_keeps_a_missing_label_missing(tmp_path: Path) -> None:
    images = image_folder(tmp_path, [None, None, None])
    (tmp_path / "train" / "metadata.csv").write_text("file_name,label\n0.png,cat\n1.png,\n2.png,dog\n")
    frames, src = replay(tmp_path)
    assert [f.truth for f in frames] == ["cat", None, "dog"]
    for frame, img in zip(frames, images, strict=True):
        assert np.array_equal(frame.image, img)
    assert src.class_names is None  # names from a file, not a ClassLabel


def test_image_folder_passes_read_the_listing_independently(tmp_path: Path) -> None:
    image_folder(tmp_path, ["cat", "dog", "cat", "dog"])
    with ReplaySource(SourceConfig(dataset=str(tmp_path), split="train")) as src:
        first, second = src.frames(), src.frames()
        a = [next(first).truth]
        b = [f.truth for f in second]
        a += [f.truth for f in first]
    assert a == b == ["cat", "cat", "dog", "dog"]
    assert src.skipped == 0


def test_image_folder_is_decoded_by_eyed(tmp_path: Path) -> None:
    """Without the "datasets" reader: the images come from datasets' listing, not from its streaming."""
    image_folder(tmp_path, ["cat", "dog"])
    with ReplaySource(SourceConfig(dataset=str(tmp_path), split="train")) as src:
        assert isinstance(src._dataset, dataset_info.ImageRows)
        assert len(list(src.frames())) == 2


def test_image_folder_with_metadata_is_left_to_datasets(tmp_path: Path) -> None:
    image_folder(tmp_path, [None, None])
    (tmp_path / "train" / "metadata.csv").write_text("file_name,caption\n0.png,a\n1.png,b\n")
    with ReplaySource(SourceConfig(dataset=str(tmp_path), split="train", label_column="caption")) as src:
        assert not isinstance(src._dataset, dataset_info.ImageRows)
        assert [f.truth for f in src.frames()] == ["a", "b"]


# VmHWM, not ru_maxrss: Linux carries the parent's (pytest's) peak over into a child's ru_maxrss at exec.
FIRST_FRAME_PEAK = """
import re, sys
from eyed.config import SourceConfig
from eyed.sources import replay
from eyed.sources.replay import ReplaySource
def peak_kib():
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\\s+(\\d+)", f.read()).group(1))
if sys.argv[2] == "datasets":
    replay.SplitQuery.result = lambda self, startup=None: None
with ReplaySource(SourceConfig(dataset=sys.argv[1], split="train")) as src:
    before = peak_kib()
    next(src.frames())
    print(peak_kib() - before)
"""


def test_first_frame_of_a_big_row_group_is_read_lean(tmp_path: Path) -> None:
    """CIFAR-10's shards are one 10,000-row group each. A reader that holds a group's image column while the
    group is replayed grows the peak by at least the column: datasets' builder, 2.6x here. Read a batch of
    pages at a time, the first frame costs 0.33-0.54x (the reader and Arrow's set-up, the first batch, the
    decoder's set-up: 10-15 MB whatever the group's size).
    """
    from datasets import Dataset, Features, Image, Value

    rng = np.random.default_rng(0)
    # Noise does not compress: the column holds what it says.
    blobs = [png(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)) for _ in range(4000)]
    ds = Dataset.from_dict(
        {"img": [{"bytes": b, "path": None} for b in blobs], "label": [0] * len(blobs)},
        features=Features({"img": Image(), "label": Value("int64")}),
    )
    ds.to_parquet(str(tmp_path / "train-00000-of-00001.parquet"), batch_size=len(blobs))
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    column_bytes = sum(len(b) for b in blobs)
    growth = {}
    for reader in ("eyed", "datasets"):
        out = subprocess.run(
            [sys.executable, "-c", FIRST_FRAME_PEAK, str(tmp_path), reader],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        growth[reader] = int(out.stdout.split()[-1]) * 1024 / column_bytes
    assert growth["datasets"] > 1.0, growth  # the measure sees a whole-group read
    assert growth["eyed"] < 1.0, growth


ARROW_POOL = """
import sys
from eyed.config import SourceConfig
from eyed.sources.replay import ReplaySource
with ReplaySource(SourceConfig(dataset=sys.argv[1], split="train")) as src:
    next(src.frames())
    import pyarrow
    print(pyarrow.mimalloc_memory_pool().max_memory(), pyarrow.jemalloc_memory_pool().max_memory())
"""


def test_arrow_default_pool_is_jemalloc_from_its_first_use(tiny_dataset: Path) -> None:
    """Parts of the parquet reader allocate from Arrow's default pool whatever pyarrow.set_memory_pool says;
    mimalloc, its default, kept 7 MB more resident in a replay daemon. Chosen late, mimalloc is used too."""
    import pyarrow

    try:
        pyarrow.jemalloc_memory_pool()
        pyarrow.mimalloc_memory_pool()
    except NotImplementedError:
        pytest.skip("this pyarrow is built without jemalloc or mimalloc")
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    out = subprocess.run(
        [sys.executable, "-c", ARROW_POOL, str(tiny_dataset)], env=env, capture_output=True, text=True, check=True
    )
    mimalloc_peak, jemalloc_peak = map(int, out.stdout.split())
    assert (mimalloc_peak, jemalloc_peak > 0) == (0, True)


@pytest.mark.parametrize(
    ("machine", "backend"), [("x86_64", "jemalloc"), ("AMD64", "jemalloc"), ("aarch64", "system"), ("armv7l", "system")]
)
def test_arrow_is_asked_for_jemalloc_only_where_its_wheels_have_it(machine: str, backend: str) -> None:
    """On a Raspberry Pi (aarch64) pyarrow has no jemalloc: asked for it, Arrow wrote "Unsupported backend" to the
    daemon's stderr at every start and kept mimalloc (seen under QEMU, benchmarks/arm64_qemu.py)."""
    from eyed.sources.replay import arrow_pool_backend

    expected = backend if sys.platform.startswith("linux") else "system"
    assert arrow_pool_backend(machine) == expected


def test_an_unreadable_shard_is_counted_and_the_others_replay(tmp_path: Path) -> None:
    images = synthetic_images(6)
    for i, part in enumerate((slice(0, 3), slice(3, 6))):
        folder = write_parquet_dataset(tmp_path / f"part{i}", images[part], [0, 1, 2])
        (folder / "train-00000-of-00001.parquet").rename(tmp_path / f"train-0000{2 * i}-of-00003.parquet")
    (tmp_path / "train-00001-of-00003.parquet").write_bytes(b"PAR1 not a parquet file" * 10)
    frames, src = replay(tmp_path, loop=True, limit=12)
    assert len(frames) == 12
    for frame, i in zip(frames, [0, 1, 2, 3, 4, 5] * 2, strict=True):
        assert np.array_equal(frame.image, images[i])
    assert (src.skipped, src.reader_failures) == (2, 2)  # once per pass


@pytest.mark.usefixtures("reader")
@pytest.mark.parametrize("field", ["image_column", "label_column"])
def test_a_column_the_dataset_lacks_is_a_configuration_error(tiny_dataset: Path, field: str) -> None:
    """A restart cannot mend it (exit 78, not 69): the message names the field."""
    cfg = SourceConfig(dataset=str(tiny_dataset), split="train", **{field: "photo"})
    with pytest.raises(ConfigError, match=f"^source.{field} photo: .* has no such column \\(it has img, label\\)"):
        ReplaySource(cfg).__enter__()


def test_a_dataset_without_an_image_column_is_a_configuration_error(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a"], "label": [0]}), tmp_path / "train-00000-of-00001.parquet")
    with pytest.raises(ConfigError, match=r"^source\.image_column: no image column among text, label"):
        ReplaySource(SourceConfig(dataset=str(tmp_path), split="train")).__enter__()


def test_missing_local_folder(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such folder"):
        ReplaySource(SourceConfig(dataset=str(tmp_path / "absent"))).__enter__()


@pytest.mark.usefixtures("reader")
def test_an_unknown_split_is_a_configuration_error(tiny_dataset: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape("source.split validation: source.dataset ")) as refused:
        ReplaySource(SourceConfig(dataset=str(tiny_dataset), split="validation")).__enter__()
    assert str(refused.value).endswith("has no split 'validation' (it has train)")


@pytest.mark.parametrize("layout", ["images", "csv"])
def test_an_unknown_split_of_other_folders_is_a_configuration_error(tmp_path: Path, layout: str) -> None:
    """An image folder (listed in the child process) and a csv folder (streamed by datasets, asked here)."""
    if layout == "images":
        image_folder(tmp_path, ["cat", "dog"])
    else:
        (tmp_path / "train.csv").write_text("image,label\na,0\n")
    with pytest.raises(ConfigError, match=r"^source\.split nope: .*has no split 'nope' \(it has train\)"):
        ReplaySource(SourceConfig(dataset=str(tmp_path), split="nope")).__enter__()


@pytest.mark.parametrize("setting", ["source.split", "source.image_column"])
def test_the_daemon_exits_78_on_a_wrong_split_or_column(base: dict[str, object], setting: str) -> None:
    """Exit 78 (configuration), which the unit does not restart; 69 would be restarted for ever."""
    proc = start_daemon({**base, "publish.wait_subscribers": 0, setting: "nope"})
    code, stderr = finish(proc, timeout_s=60)
    assert code == 78, stderr[-2000:]
    assert f"eyed: {setting} nope: " in stderr


def test_offline_hub_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # Both libraries read the variables once, at import: once imported (as here), their constants decide.
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SourceError, match="local folder"):
        ReplaySource(SourceConfig(dataset="uoft-cs/cifar10")).__enter__()


# Waiting for a hub to come back


def read_as_hub_files(monkeypatch: pytest.MonkeyPatch, wait_s: float) -> list[float]:
    """From now on, local shards are read as a hub dataset's are: a failed read is taken up again after
    ``wait_s``. The first read fails (as on a network gone away) after 3 rows; returns the list of the times at
    which reads failed."""
    monkeypatch.setattr(parquet_module, "HUB_RESUME_WAITS_S", (wait_s,))
    monkeypatch.setattr(parquet_module, "is_hub_file", lambda path: True)
    monkeypatch.setattr(parquet_module, "opened_shard", lambda path, pause: contextlib.nullcontext(path))
    file_rows = parquet_module.ParquetRows._file_rows
    failed: list[float] = []

    def failing_once(self: Any, path: str, to_skip: int, progress: Any) -> Generator[dict[str, Any], None, int]:
        rows = file_rows(self, path, to_skip, progress)
        while True:
            if not failed and progress.read == 3:
                failed.append(time.monotonic())
                raise ConnectionError("simulated: network unreachable")
            try:
                row = next(rows)
            except StopIteration as end:
                left: int = end.value
                return left
            yield row

    monkeypatch.setattr(parquet_module.ParquetRows, "_file_rows", failing_once)
    return failed


def test_a_wait_for_the_hub_to_come_back_is_announced(tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub replay waits up to a minute before reading on after the network failed (HUB_RESUME_WAITS_S). The wait
    is announced to the thread's pace listener with its end, as a Pacer's sleep is: the daemon's watchdog
    (WatchdogSec=30) then counts a daemon waiting out an outage as alive instead of killing it as hung."""
    heard: list[float] = []
    with ReplaySource(SourceConfig(dataset=str(tiny_dataset), split="train")) as src, pace_listener(heard.append):
        failed = read_as_hub_files(monkeypatch, 0.5)
        truths = [f.truth for f in src.frames()]
    assert truths == [CIFAR10[i % 10] for i in GOOD]  # read on from the row reached: nothing lost or twice
    assert len(failed) == 1
    assert len(heard) == 1, "the wait to read on was not announced"
    assert failed[0] + 0.5 <= heard[0] < failed[0] + 1.5  # the time the wait ends


def test_a_replays_pauses_are_announced_and_cut_short_by_a_stop(tiny_dataset: Path) -> None:
    """The pauses after datasets' reader fails (READER_RETRY_S) go through the same wait."""
    heard: list[float] = []
    stop = threading.Event()
    with ReplaySource(SourceConfig(dataset=str(tiny_dataset), split="train")) as src, pace_listener(heard.append):
        frames = src.frames(stop)
        next(frames)  # the pass under way: its stop is the pauses' stop
        before = time.monotonic()
        assert src._pause(0.2)
        assert src._pause(0)  # no wait, nothing announced
        threading.Timer(0.1, stop.set).start()
        assert not src._pause(30)
        assert time.monotonic() - before < 5
    assert len(heard) == 2 and before + 0.2 <= heard[0] < before + 1 and heard[1] > before + 30


# Labels: what an event's truth may carry


def labelled_dataset(folder: Path, label: Any, values: list[Any]) -> Path:
    """Images in ``image``, and a ``label`` column of feature ``label`` holding ``values``."""
    from datasets import Dataset, Features, Image

    images = synthetic_images(len(values), seed=21)
    ds = Dataset.from_dict(
        {"image": [{"bytes": png(img), "path": None} for img in images], "label": values},
        features=Features({"image": Image(), "label": label}),
    )
    folder.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(folder / "train-00000-of-00001.parquet"))
    return folder


def masks(n: int) -> list[dict[str, Any]]:
    return [{"bytes": png(m), "path": None} for m in synthetic_images(n, seed=22, size=8)]


def refused_label_columns() -> dict[str, tuple[Any, list[Any]]]:
    """Features no label column may have, each with two values: its contents would go out in every event."""
    from datasets import Features, Image, List, Value

    return {
        "Image": (Image(), masks(2)),
        "Value(binary)": (Value("binary"), [b"\x89PNG\r\n\x1a\n", b"\x89PNG\r\n\x1a\n"]),
        "List": (List(Value("int64")), [[1, 2], [3]]),
        "a struct": (Features({"mask": Image()}), [{"mask": m} for m in masks(2)]),
        "Value(float32)": (Value("float32"), [0.5, 1.5]),
    }


@pytest.mark.usefixtures("reader")
@pytest.mark.parametrize("kind", list(refused_label_columns()))
def test_a_label_column_that_holds_no_labels_is_refused(tmp_path: Path, kind: str) -> None:
    """source.label_column set to such a column (the image column by mistake, a segmentation dataset's mask) is a
    configuration error (exit 78) rather than a daemon that sends the column's contents with every event."""
    feature, values = refused_label_columns()[kind]
    folder = labelled_dataset(tmp_path, feature, values)
    with pytest.raises(ConfigError, match=f"^source.label_column label: its feature is {re.escape(kind)}, not a label"):
        ReplaySource(SourceConfig(dataset=str(folder), split="train", label_column="label")).__enter__()
    with pytest.raises(ConfigError, match=r"^source\.label_column image: its feature is Image, not a label"):
        ReplaySource(SourceConfig(dataset=str(folder), split="train", label_column="image")).__enter__()


@pytest.mark.usefixtures("reader")
@pytest.mark.parametrize("kind", list(refused_label_columns()))
def test_a_column_that_holds_no_labels_is_not_detected_as_one(tmp_path: Path, kind: str) -> None:
    """A segmentation dataset calls its mask column "label": left unset, source.label_column finds no label and
    the events carry no truth."""
    feature, values = refused_label_columns()[kind]
    frames, src = replay(labelled_dataset(tmp_path, feature, values))
    assert len(frames) == 2 and src.skipped == 0
    assert [f.truth for f in frames] == [None, None]


def test_the_truth_is_a_label_or_nothing() -> None:
    """What reaches the truth is checked again (a dataset whose features do not say what a column holds): a class
    name, an integer, a string cut to MAX_TRUTH_CHARS; nothing else."""
    src = ReplaySource(SourceConfig(dataset="/no/such/folder"))
    src._label_col, src._names = "label", ["cat", "dog"]
    assert [src._truth({"label": v}) for v in (1, np.int64(0), 7, "frog", None)] == ["dog", "cat", "7", "frog", None]
    assert src._truth({"label": "x" * 5000}) == "x" * MAX_TRUTH_CHARS
    image = {"bytes": png(synthetic_images(1)[0]), "path": None}
    for value in (image, image["bytes"], bytearray(b"\x89PNG"), [1, 2], np.zeros(3), 0.5):
        assert src._truth({"label": value}) is None


def test_what_can_be_a_label() -> None:
    for spec in ({"_type": "ClassLabel", "names": ["a"]}, {"_type": "Value", "dtype": "int64"}, None):
        assert not_a_label(spec) is None
    for dtype in ("uint8", "string", "large_string"):
        assert not_a_label({"_type": "Value", "dtype": dtype}) is None
    assert not_a_label({"_type": "Audio"}) == "Audio"
    assert not_a_label({"_type": "Video"}) == "Video"
    assert not_a_label({"_type": "Sequence", "feature": {"_type": "Value", "dtype": "int64"}}) == "Sequence"
    assert not_a_label({"_type": "Value", "dtype": "large_binary"}) == "Value(large_binary)"
    assert not_a_label([{"_type": "Value", "dtype": "int64"}]) == "a list"
    assert not_a_label({"x": {"_type": "Value", "dtype": "int64"}}) == "a struct"


# Decoding


def encode(ext: str, image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(ext, image)
    assert ok
    return buf.tobytes()


def test_decode_colour_png_is_rgb() -> None:
    rgb = synthetic_images(1, seed=11)[0]
    decoded = decode_image({"bytes": encode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)), "path": None})
    assert decoded is not None
    assert np.array_equal(decoded, rgb)


def test_decode_grayscale() -> None:
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    decoded = decode_image(encode(".png", gray))
    assert decoded is not None
    assert decoded.shape == (8, 8, 3)
    assert decoded.dtype == np.uint8
    assert all(np.array_equal(decoded[..., c], gray) for c in range(3))


def test_decode_bgra() -> None:
    bgra = np.zeros((4, 4, 4), dtype=np.uint8)
    bgra[..., 0] = 200  # blue
    bgra[..., 2] = 10  # red
    bgra[..., 3] = 128  # alpha
    decoded = decode_image(encode(".png", bgra))
    assert decoded is not None
    assert decoded.shape == (4, 4, 3)
    assert (decoded[..., 0] == 10).all()
    assert (decoded[..., 2] == 200).all()


def test_decode_16_bit() -> None:
    deep = np.full((4, 4, 3), 0x8000, dtype=np.uint16)
    deep[..., 0] = 0xFFFF  # blue channel in OpenCV order
    decoded = decode_image(encode(".png", deep))
    assert decoded is not None
    assert decoded.dtype == np.uint8
    assert (decoded[..., 2] == 255).all()
    assert (decoded[..., 0] == 128).all()


def wide_grey() -> tuple[bytes, bytes]:
    """The same grey ramp over the full 16-bit range as PNG and as float TIFF."""
    ramp = np.tile(np.linspace(0, 65535, 256), (16, 1))
    return encode(".png", ramp.astype(np.uint16)), encode(".tiff", (ramp / 65535).astype(np.float32))


@pytest.mark.parametrize(("fmt", "mode"), [("png", None), ("png", "I"), ("tiff", None)])
def test_a_wide_pil_image_decodes_as_its_file_does(fmt: str, mode: str | None) -> None:
    """datasets hands over a hub image folder's files as PIL images: 16-bit and float ones are scaled, not clipped.

    Mode I is how older Pillow opens a 16-bit PNG (newer opens it as I;16).
    """
    png16, tiff32 = wide_grey()
    data = png16 if fmt == "png" else tiff32
    opened = PIL.Image.open(io.BytesIO(data))
    image = opened.convert(mode) if mode is not None else opened
    assert image.mode in ("I;16", "I", "F")
    from_file, from_pil = decode_image(data), decode_image(image)
    assert from_file is not None and from_pil is not None
    assert from_pil.dtype == np.uint8 and from_pil.shape == (16, 256, 3)
    assert np.array_equal(from_pil, from_file)
    assert from_pil.min() == 0 and from_pil.max() == 255 and 120 < from_pil.mean() < 135


def test_an_8_bit_pil_image_decodes_as_its_file_does() -> None:
    rgb = synthetic_images(1, seed=13)[0]
    data = encode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    decoded = decode_image(PIL.Image.open(io.BytesIO(data)))
    assert decoded is not None
    assert np.array_equal(decoded, rgb)


def test_decode_from_path(tmp_path: Path) -> None:
    rgb = synthetic_images(1, seed=12)[0]
    path = tmp_path / "a.png"
    path.write_bytes(encode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)))
    decoded = decode_image({"bytes": None, "path": str(path)})
    assert decoded is not None
    assert np.array_equal(decoded, rgb)
    assert decode_image({"bytes": None, "path": str(tmp_path / "missing.png")}) is None


def photo_on_its_side() -> tuple[np.ndarray, bytes]:
    """A landscape picture as a phone stores it when held upright: pixels on their side, EXIF Orientation 6
    ("rotate 90 degrees clockwise to view"). A red block marks the stored top left corner."""
    stored = np.zeros((40, 60, 3), np.uint8)
    stored[..., 2] = 200
    stored[:10, :15] = (255, 0, 0)
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    PIL.Image.fromarray(stored).save(buffer, "JPEG", exif=exif.tobytes(), quality=95)
    return stored, buffer.getvalue()


def test_the_exif_orientation_is_applied_as_datasets_applies_it(tmp_path: Path) -> None:
    """datasets (PIL) and transformers' loaders turn a photo upright; a replayed image folder must too, or a
    phone's photos are classified, and fine-tuned on, on their side."""
    _, jpeg = photo_on_its_side()
    upright = np.asarray(PIL.ImageOps.exif_transpose(PIL.Image.open(io.BytesIO(jpeg))).convert("RGB"))
    assert upright.shape == (60, 40, 3)
    path = tmp_path / "photo.jpg"
    path.write_bytes(jpeg)
    for value in (jpeg, {"bytes": None, "path": str(path)}):
        decoded = decode_image(value)
        assert decoded is not None
        assert decoded.shape == upright.shape
        assert np.abs(decoded.astype(int) - upright).mean() < 2  # two JPEG decoders: close, not equal
        corner = decoded[:10, -8:].astype(int)  # the marked corner, turned to the top right
        assert (corner[..., 0] > 200).all() and (corner[..., 2] < 60).all()


@pytest.mark.usefixtures("reader")
def test_an_image_folder_of_photos_replays_upright(tmp_path: Path) -> None:
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "0.jpg").write_bytes(photo_on_its_side()[1])
    frames, _ = replay(tmp_path)
    assert [f.image.shape for f in frames] == [(60, 40, 3)]


def unchanged(data: bytes) -> np.ndarray:
    """``data`` decoded as eyed decoded it before it applied the EXIF orientation."""
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded is not None
    return to_rgb(decoded)


@pytest.mark.assets
def test_cifar_decodes_as_it_did_before_orientation(real_cifar: Path) -> None:
    """The flags that apply the orientation give the pixels IMREAD_UNCHANGED and to_rgb gave, byte for byte
    (checked on all 50,000 images; the first 5,000 here)."""
    import pyarrow.parquet as pq

    shard = pq.ParquetFile(real_cifar / "train-00000-of-00005.parquet")
    batch = next(shard.iter_batches(batch_size=5000, columns=["img"]))
    for record in batch.column("img").to_pylist():
        before = unchanged(record["bytes"])
        now = decode_image(record)
        assert now is not None and now.dtype == before.dtype and np.array_equal(now, before)


def test_odd_files_decode_as_they_did_before_orientation() -> None:
    """Grey, grey with alpha, palettes with transparency, RGBA, 16-bit, float and 32-bit integer TIFFs (which
    OpenCV cannot decode to 3 channels: decoded as they are)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)

    def pil(image: PIL.Image.Image, fmt: str, **kwargs: Any) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, fmt, **kwargs)
        return buffer.getvalue()

    files = [
        pil(PIL.Image.fromarray(rgb[..., 0]).convert("LA"), "PNG"),
        pil(PIL.Image.fromarray(rgb).convert("P"), "PNG", transparency=0),
        pil(PIL.Image.fromarray(rgb[..., 0] > 128), "PNG"),
        pil(PIL.Image.fromarray(rgb).convert("CMYK"), "JPEG"),
        pil(PIL.Image.fromarray(rng.integers(0, 1 << 20, (8, 8), dtype=np.int32)), "TIFF"),
        encode(".png", rng.integers(0, 65536, (8, 8, 4), dtype=np.uint16)),
        encode(".tiff", rng.random((8, 8)).astype(np.float32)),
        encode(".tiff", rng.random((8, 8, 3)).astype(np.float32)),
    ]
    for data in files:
        before = unchanged(data)
        now = decode_image(data)
        assert now is not None and np.array_equal(now, before)


@pytest.mark.parametrize(
    "value",
    [
        b"garbage bytes, not an image",
        b"\x89PNG\r\n\x1a\n truncated",
        b"",
        None,
        {"bytes": None, "path": None},
        {"bytes": b"junk", "path": None},
        "a string",
    ],
)
def test_decode_garbage_is_none(value: object) -> None:
    assert decode_image(value) is None


def png_header(width: int, height: int) -> bytes:
    """A tiny PNG (a few dozen bytes) whose header claims ``width`` x ``height`` pixels."""
    import struct
    import zlib

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    )


def test_an_image_claiming_too_many_pixels_is_a_record_to_skip(tmp_path: Path) -> None:
    """OpenCV raises (not returns None) for a header over its pixel limit: one such record ended the replay
    (exit 1, and a restart met it again)."""
    assert decode_image({"bytes": png_header(100_000, 100_000), "path": None}) is None
    images = synthetic_images(4)
    dataset = write_parquet_dataset(tmp_path, images, [0, 1, 2, 3])
    table = pq.read_table(next(dataset.rglob("*.parquet")))
    rows = table.to_pylist()
    rows[1]["img"] = {"bytes": png_header(100_000, 100_000), "path": None}
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), next(dataset.rglob("*.parquet")))
    with ReplaySource(SourceConfig(dataset=str(dataset), split="train")) as src:
        frames = list(src.frames())
        assert [f.truth for f in frames] == [CIFAR10[0], CIFAR10[2], CIFAR10[3]] and src.skipped == 1


def test_eyed_caps_the_pixels_an_image_may_claim() -> None:
    """200 MB for a 10,000 x 10,000 image (OpenCV's own limit is 2**30 pixels, 3 GB): refused from its header,
    before its memory is taken, in a process that imported eyed before OpenCV; the environment may allow more."""
    script = (
        "import sys, eyed.sources.replay, cv2, numpy as np\n"
        "try:\n"
        "    cv2.imdecode(np.frombuffer(sys.stdin.buffer.read(), np.uint8), cv2.IMREAD_COLOR)\n"
        "except cv2.error as exc:\n"
        "    sys.exit(3 if 'CV_IO_MAX_IMAGE_PIXELS' in str(exc) else 4)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_IO_MAX_IMAGE_PIXELS"}
    for allowed, code in ((None, 3), (1 << 30, 0)):  # 0: past the header check (then libpng finds no pixels)
        extra = {"OPENCV_IO_MAX_IMAGE_PIXELS": str(allowed)} if allowed else {}
        result = subprocess.run(
            [sys.executable, "-c", script],
            input=png_header(10_000, 10_000),
            env={**env, **extra},
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == code, result.stderr


def test_to_rgb_shapes() -> None:
    assert to_rgb(np.zeros((5, 6), dtype=np.uint8)).shape == (5, 6, 3)
    assert to_rgb(np.zeros((5, 6, 1), dtype=np.uint8)).shape == (5, 6, 3)
    assert to_rgb(np.zeros((5, 6, 4), dtype=np.uint8)).shape == (5, 6, 3)
    floats = to_rgb(np.linspace(0, 1, 30, dtype=np.float32).reshape(5, 6))
    assert floats.dtype == np.uint8
    assert floats.min() == 0
    assert floats.max() == 255


@pytest.mark.parametrize("paced", [False, True])
def test_offline_commands_read_a_recorded_source_once(tiny_dataset: Path, paced: bool) -> None:
    """eval, priors, profile, export --int8, finetune and bench: a looping replay would never end (limit 0) or
    count records twice; only the drift commands keep the pace, as their windows are in seconds."""
    cfg = SourceConfig(dataset=str(tiny_dataset), split="train", loop=True, fps=50.0)
    with open_recorded(cfg, paced=paced) as source:
        assert isinstance(source, ReplaySource)
        assert source.cfg.loop is False and source.cfg.fps == (50.0 if paced else 0.0)
        assert len(list(source.frames())) == 11  # 12 records, one corrupt
    with pytest.raises(SourceError, match="live camera"):
        open_recorded(SourceConfig(kind="webcam", device=0))


def test_an_image_column_that_holds_no_images_is_refused(tmp_path: Path) -> None:
    """File names in a column called image: every record was skipped, and the daemon ended as if done."""
    from datasets import ClassLabel, Dataset, Features, Value

    features = Features({"image": Value("string"), "label": ClassLabel(names=CIFAR10)})
    Dataset.from_dict({"image": ["a.png", "b.png"], "label": [0, 1]}, features=features).to_parquet(
        str(tmp_path / "train-00000-of-00001.parquet")
    )
    with pytest.raises(ConfigError, match=r"source.image_column image: its feature is Value\(string\), not an image"):
        replay(tmp_path)


def test_a_replay_that_gives_no_frame_fails(tmp_path: Path, tiny_dataset: Path) -> None:
    """Under systemd an exit 0 leaves the service down looking fine: a replay of nothing is a failure (69)."""
    broken = write_parquet_dataset(tmp_path / "broken", synthetic_images(3), [0, 1, 2], corrupt=(0, 1, 2))
    for dataset, extra, said in (
        (broken, {}, "(3 record(s) skipped, none readable as an image in 'img')"),
        (broken, {"loop": True}, "(3 record(s) skipped, none readable as an image in 'img')"),
        (tiny_dataset, {"skip": 100, "loop": True}, "from record 100 on"),
    ):
        with pytest.raises(SourceError, match=re.escape(said)):
            replay(dataset, **extra)


# A label one past the ClassLabel's names goes out as its number (an off-by-one would end the replay).
def test_a_label_past_the_class_names_is_its_number(tmp_path: Path) -> None:
    folder = write_parquet_dataset(tmp_path / "d", synthetic_images(3), [0, 1, 2])
    shard = folder / "train-00000-of-00001.parquet"
    table = pq.read_table(shard)
    table = table.set_column(1, table.schema.field(1), pa.array([0, 10, 2], type=table.schema.field(1).type))
    pq.write_table(table, shard)
    with ReplaySource(SourceConfig(dataset=str(folder), split="train")) as src:
        truths = [f.truth for f in src.frames()]
    assert truths == ["airplane", "10", "bird"]
