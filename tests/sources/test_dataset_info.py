"""A local dataset's files and features, asked of datasets in a child process so the daemon never imports it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from eyed.config import ConfigError, SourceConfig
from eyed.sources import dataset_info
from eyed.sources.base import SourceError
from eyed.sources.replay import ReplaySource
from eyed.types import StartUp
from tests.conftest import BUSY_DATASETS, CIFAR10, fake_datasets_package, png, synthetic_images


@pytest.fixture
def in_child(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in a daemon that has not imported datasets: SplitQuery asks a child process."""
    monkeypatch.setattr(dataset_info, "datasets_imported", lambda: False)


@pytest.mark.usefixtures("in_child")
def test_the_child_answers_as_datasets_does_here(tiny_dataset: Path) -> None:
    from_child = dataset_info.SplitQuery(str(tiny_dataset), "train").result()
    here = dataset_info.scan(str(tiny_dataset), "train", dataset_info.Listing.temporary())
    assert from_child == here
    assert isinstance(from_child, dataset_info.ParquetSplit)
    assert from_child.files == [str(tiny_dataset / "train-00000-of-00001.parquet")]
    assert from_child.features == {"img": {"_type": "Image"}, "label": {"names": CIFAR10, "_type": "ClassLabel"}}


def listed(images: dataset_info.LocalImages) -> list[tuple[str, object]]:
    return [(r["image"]["path"], r.get("label")) for r in images.rows("image", "label")]


@pytest.mark.usefixtures("in_child")
def test_the_child_lists_an_image_folder_as_datasets_does_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dataset_info, "LISTING_CHUNK_BYTES", 7)  # lines cut across reads
    for i, label in enumerate(["dog", "cat", "dog"]):
        (tmp_path / label).mkdir(exist_ok=True)
        (tmp_path / label / f"{i}.png").write_bytes(png(synthetic_images(1, seed=i)[0]))
    from_child = dataset_info.SplitQuery(str(tmp_path), "train").result()
    here = dataset_info.scan(str(tmp_path), "train", dataset_info.Listing.temporary())
    assert isinstance(here, dataset_info.LocalImages)
    assert isinstance(from_child, dataset_info.LocalImages)
    features = {"image": {"_type": "Image"}, "label": {"names": ["cat", "dog"], "_type": "ClassLabel"}}
    assert (from_child.count, from_child.features) == (here.count, here.features) == (3, features)
    paths = [str(tmp_path / f) for f in ("cat/1.png", "dog/0.png", "dog/2.png")]
    assert listed(from_child) == listed(here) == list(zip(paths, [0, 1, 1], strict=True))
    # Another pass, and one from a record on, read the same listing again.
    assert [r["image"]["path"] for r in from_child.rows("image", None, skip=2)] == paths[2:]
    assert "label" not in next(iter(from_child.rows("image", None)))
    assert listed(from_child) == list(zip(paths, [0, 1, 1], strict=True))


@pytest.mark.usefixtures("in_child")
def test_a_folder_that_is_neither_is_left_to_datasets(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("text,label\na,0\n")
    assert dataset_info.SplitQuery(str(tmp_path), "train").result() is None


@pytest.mark.usefixtures("in_child")
def test_errors_come_back_from_the_child(tiny_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(dataset_info.UnknownSplit, match=r"no split 'validation' \(it has train\)"):
        dataset_info.SplitQuery(str(tiny_dataset), "validation").result()
    with pytest.raises(ConfigError, match=r"^source\.split validation: source\.dataset .* has no split 'validation'"):
        ReplaySource(SourceConfig(dataset=str(tiny_dataset), split="validation")).__enter__()
    (tmp_path / "train-00000-of-00001.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(SourceError, match=r"source.dataset .*"):
        ReplaySource(SourceConfig(dataset=str(tmp_path), split="train")).__enter__()


@pytest.mark.usefixtures("in_child")
def test_without_datasets_the_replay_extra_is_named(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_datasets(tmp_path, "raise ImportError(\"No module named 'datasets'\")\n", monkeypatch)
    with pytest.raises(SourceError, match=re.escape("pip install 'eyed[replay]'")):
        ReplaySource(SourceConfig(dataset=str(tiny_dataset), split="train")).__enter__()


def fake_datasets(folder: Path, body: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``datasets`` package that the child imports first, doing ``body`` instead."""
    monkeypatch.setenv("PYTHONPATH", fake_datasets_package(folder, body))


SLEEPING_DATASETS = "import time\ntime.sleep(60)\n"


def query_with_child(
    body: str, dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[dataset_info.SplitQuery, subprocess.Popen[bytes]]:
    """A query on ``dataset`` whose child imports a ``datasets`` that does ``body``, and that child."""
    fake_datasets(tmp_path, body, monkeypatch)
    query = dataset_info.SplitQuery(str(dataset), "train")
    assert query._child is not None
    return query, query._child


@pytest.mark.usefixtures("in_child")
def test_a_query_dropped_unanswered_stops_its_child(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A source made but never entered (the model failed to load) leaves no child behind."""
    query, child = query_with_child(SLEEPING_DATASETS, tiny_dataset, tmp_path, monkeypatch)
    assert child.poll() is None
    del query
    assert child.returncode == -9  # killed and reaped at once


@pytest.fixture
def quick_stall(monkeypatch: pytest.MonkeyPatch) -> None:
    """A child stalls after a second without CPU time; the wait says it is still going every half second."""
    monkeypatch.setattr(dataset_info, "CHILD_STALL_S", 1.0)
    monkeypatch.setattr(dataset_info, "CHILD_POLL_S", 0.05)
    monkeypatch.setattr(dataset_info, "CHILD_REPORT_S", 0.5)


@pytest.mark.usefixtures("in_child", "quick_stall")
def test_a_child_that_stalls_is_given_up_on(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    query, child = query_with_child(SLEEPING_DATASETS, tiny_dataset, tmp_path, monkeypatch)
    with pytest.raises(dataset_info.DatasetInfoError, match=r"no progress in 1 s waiting for datasets to describe"):
        query.result()
    assert child.returncode == -9


@pytest.mark.usefixtures("in_child", "quick_stall")
def test_a_child_that_keeps_working_is_waited_for(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """datasets walking a large folder for longer than the stall time, all the while using CPU: its answer counts."""
    body = (
        "import time\n"
        "end = time.process_time() + 2.5\n"
        "while time.process_time() < end: pass\n"
        "raise ValueError('walked it')\n"
    )
    fake_datasets(tmp_path, body, monkeypatch)
    caplog.set_level("INFO", logger=dataset_info.__name__)
    statuses: list[str] = []
    with pytest.raises(ValueError, match="walked it"):
        dataset_info.SplitQuery(str(tiny_dataset), "train").result(StartUp(waiting=statuses.append))
    assert "still waiting for datasets to describe" in caplog.text
    assert statuses and all(s.startswith(f"waiting for datasets to describe {tiny_dataset} (") for s in statuses)


@pytest.mark.usefixtures("in_child")
def test_a_stop_gives_up_the_wait_for_a_working_child(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    query, child = query_with_child(BUSY_DATASETS, tiny_dataset, tmp_path, monkeypatch)
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()
    t = time.monotonic()
    with pytest.raises(dataset_info.DatasetInfoError, match=r"stopped while waiting for datasets to describe"):
        query.result(StartUp(stop))
    assert time.monotonic() - t < 10
    assert child.returncode == -9


def test_cpu_seconds_counts_a_process_work() -> None:
    before = dataset_info.cpu_seconds(os.getpid())
    assert before is not None
    end = time.process_time() + 0.2
    while time.process_time() < end:
        pass
    after = dataset_info.cpu_seconds(os.getpid())
    assert after is not None and after >= before + 0.15
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert dataset_info.cpu_seconds(child.pid) is None  # reaped: nothing left to read


@pytest.mark.usefixtures("in_child")
def test_a_child_that_fails_says_what_it_wrote(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = "import os, sys\nsys.stderr.buffer.write(b'\\xff\\xfe broken install\\n')\nsys.stderr.flush()\nos._exit(3)\n"
    fake_datasets(tmp_path, body, monkeypatch)
    query = dataset_info.SplitQuery(str(tiny_dataset), "train")
    for _ in range(2):  # asked again (a source entered twice), the same answer
        with pytest.raises(dataset_info.DatasetInfoError, match=r"\(exit 3\): \ufffd\ufffd broken install"):
            query.result()


@pytest.mark.usefixtures("in_child")
def test_a_child_that_prints_nothing_is_a_clear_error(tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dataset_info, "__name__", "no.such.module")
    with pytest.raises(dataset_info.DatasetInfoError, match=r"could not describe .*No module named"):
        dataset_info.SplitQuery(str(tiny_dataset), "train").result()


REPLAY_WITHOUT_DATASETS = """
import json, sys
from eyed.config import ConfigError, SourceConfig
from eyed.sources.replay import ReplaySource
from eyed.types import StartUp
with ReplaySource(SourceConfig(dataset=sys.argv[1], split="train", loop=False)) as src:
    truths = [frame.truth for frame in src.frames()]
    names = src.class_names
print(json.dumps({"truths": truths, "names": names, "skipped": src.skipped,
                  "imported": sorted(m for m in ("datasets", "pandas", "torch") if m in sys.modules)}))
"""


def replay_in_a_fresh_process(folder: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    out = subprocess.run(
        [sys.executable, "-c", REPLAY_WITHOUT_DATASETS, str(folder)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def test_a_replay_of_local_shards_never_imports_datasets_or_pandas(tiny_dataset: Path) -> None:
    result = replay_in_a_fresh_process(tiny_dataset)
    assert result["imported"] == []
    # The class names came from the ClassLabel feature the child read: labels 0..9 cycling, record 5 corrupt.
    assert result["names"] == CIFAR10
    assert result["truths"] == [CIFAR10[i % 10] for i in range(12) if i != 5]
    assert result["skipped"] == 1


def test_a_replay_of_an_image_folder_never_imports_datasets_or_pandas(tmp_path: Path) -> None:
    for i, label in enumerate(["ship", "frog", "ship"]):
        (tmp_path / "train" / label).mkdir(parents=True, exist_ok=True)
        (tmp_path / "train" / label / f"{i}.png").write_bytes(png(synthetic_images(1, seed=i)[0]))
    (tmp_path / "train" / "frog" / "7.jpg").write_bytes(b"broken")
    result = replay_in_a_fresh_process(tmp_path)
    assert result["imported"] == []
    assert result["names"] == ["frog", "ship"]
    assert result["truths"] == ["frog", "ship", "ship"]
    assert result["skipped"] == 1
