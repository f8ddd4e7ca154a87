"""Local parquet shards read a batch at a time: row order, skipping by row counts, unreadable shards and row
groups."""

from __future__ import annotations

import contextlib
import os
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eyed.sources import parquet as parquet_module
from eyed.sources.base import pace_listener
from eyed.sources.parquet import MAX_BATCH_ROWS, ParquetRows, UnreadableRows, batch_rows
from tests.conftest import synthetic_images, write_parquet_dataset


def write_rows(path: Path, start: int, count: int, group_rows: int) -> str:
    """``count`` rows numbered from ``start`` in row groups of ``group_rows``; a ``blob`` column beside."""
    table = pa.table({"n": list(range(start, start + count)), "blob": [b"x" * 50] * count})
    pq.write_table(table, path, row_group_size=group_rows)
    return str(path)


@pytest.fixture
def shards(tmp_path: Path) -> list[str]:
    """Rows 0-24 in three files (groups of 4, 5 and 3 rows), row 10 alone in the second file's first group."""
    return [
        write_rows(tmp_path / "a.parquet", 0, 10, 4),
        write_rows(tmp_path / "b.parquet", 10, 9, 5),
        write_rows(tmp_path / "c.parquet", 19, 6, 3),
    ]


@pytest.mark.parametrize("skip", [0, 1, 3, 4, 9, 10, 11, 15, 19, 24, 25, 40])
def test_rows_in_order_from_any_skip(shards: list[str], skip: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Batches of 2 rows: skips land inside batches, on their edges, and on group and file edges.
    monkeypatch.setattr(parquet_module, "batch_rows", lambda metadata: 2)
    rows = ParquetRows(shards, ["n"], skip=skip)
    assert [r["n"] for r in rows] == list(range(skip, 25))
    assert [r["n"] for r in rows] == list(range(skip, 25))  # again: each pass starts over


def test_only_the_columns_asked_for(shards: list[str]) -> None:
    assert next(iter(ParquetRows(shards, ["blob"]))) == {"blob": b"x" * 50}


def test_an_unreadable_shard_is_reported_and_passed_over(shards: list[str], tmp_path: Path) -> None:
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not a parquet file" * 10)
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"m": [1, 2]}), other)  # no column n
    failures: list[tuple[str, str, int | None]] = []

    def on_error(path: str, exc: Exception) -> None:
        assert isinstance(exc, UnreadableRows) and exc.group is None
        failures.append((path, type(exc.__cause__).__name__, exc.rows))

    rows = ParquetRows([shards[0], str(broken), shards[1], str(other), shards[2]], ["n"], skip=2, on_error=on_error)
    # The skip is counted in readable files only: what an unreadable one holds is unknown.
    assert [r["n"] for r in rows] == list(range(2, 25))
    # The records lost: unknown for a file whose footer cannot be read, all of them for one that lacks the column.
    assert failures == [(str(broken), "ArrowInvalid", None), (str(other), "KeyError", 2)]


def test_without_a_handler_an_unreadable_shard_raises(tmp_path: Path) -> None:
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet")
    with pytest.raises(pa.ArrowInvalid):
        list(ParquetRows([str(broken)], ["n"]))


def test_batches_hold_about_a_megabyte(tmp_path: Path) -> None:
    small = pq.ParquetFile(write_rows(tmp_path / "small.parquet", 0, 3000, 3000)).metadata
    assert batch_rows(small) == MAX_BATCH_ROWS
    big = tmp_path / "big.parquet"
    pq.write_table(pa.table({"blob": [os.urandom(300_000) for _ in range(8)]}), big)
    assert batch_rows(pq.ParquetFile(big).metadata) == 3
    huge = tmp_path / "huge.parquet"
    pq.write_table(pa.table({"blob": [os.urandom(1_300_000) for _ in range(2)]}), huge)
    assert batch_rows(pq.ParquetFile(huge).metadata) == 1


def corrupt_group(path: str, group: int) -> None:
    """Overwrite column ``n``'s data in row group ``group`` with bytes that are no parquet page."""
    chunk = pq.ParquetFile(path).metadata.row_group(group).column(0)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(b"\xff" * chunk.total_compressed_size)


Failure = tuple[str, int | None, int | None]  # a file, its row group (None: the rest of the file), rows lost


def collecting(failures: list[Failure]) -> Any:
    """An ``on_error`` that notes what it is told in ``failures``."""

    def on_error(path: str, exc: Exception) -> None:
        assert isinstance(exc, UnreadableRows)
        failures.append((path, exc.group, exc.rows))

    return on_error


def damage_page_header(path: Path, group: int, column: int) -> None:
    """Overwrite the page header of column ``column`` in row group ``group``: that group cannot be read."""
    chunk = pq.ParquetFile(path).metadata.row_group(group).column(column)
    with open(path, "r+b") as f:
        f.seek(chunk.dictionary_page_offset or chunk.data_page_offset)
        f.write(b"\xff" * 64)


def damaged_shard(path: Path) -> pa.Table:
    """Rows 0-39 (``n``, a random ``blob``) in row groups of 10, group 1 (rows 10-19) with its blob column's page
    header damaged; returns the table as written."""
    table = pa.table({"n": list(range(40)), "blob": [os.urandom(200) for _ in range(40)]})
    pq.write_table(table, path, row_group_size=10, compression="none")
    damage_page_header(path, 1, 1)
    return table


def test_a_damaged_row_group_costs_its_own_records_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One damaged page header (the review's case: a CIFAR shard is one 10,000-record row group) used to end the
    whole file, intact row groups after it too, and to count as one record. Batches are smaller than the row
    groups here, as a CIFAR shard's 455-record batches are."""
    monkeypatch.setattr(parquet_module, "batch_rows", lambda metadata: 3)
    damaged = tmp_path / "train-00000-of-00002.parquet"
    table = damaged_shard(damaged)
    healthy = write_rows(tmp_path / "train-00001-of-00002.parquet", 40, 5, 5)
    failures: list[Failure] = []
    rows = ParquetRows([str(damaged), healthy], ["n", "blob"], on_error=collecting(failures))
    got = list(rows)
    assert [r["n"] for r in got] == [*range(0, 10), *range(20, 45)]  # every intact group, in order
    assert [r["blob"] for r in got[:30]] == table["blob"].to_pylist()[:10] + table["blob"].to_pylist()[20:]
    assert failures == [(str(damaged), 1, 10)]  # the damaged group's records, told once


@pytest.mark.parametrize("skip", [0, 2, 5, 8, 9, 12])
def test_a_damaged_row_group_and_the_skip(shards: list[str], skip: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Records passed over by ``skip`` are not counted as lost with a damaged group, and a group the skip passes
    over entirely is never read."""
    monkeypatch.setattr(parquet_module, "batch_rows", lambda metadata: 2)
    corrupt_group(shards[0], 1)  # rows 4-7
    failures: list[Failure] = []
    got = [r["n"] for r in ParquetRows(shards, ["n"], skip=skip, on_error=collecting(failures))]
    assert got == [n for n in range(skip, 25) if not 4 <= n < 8]
    lost = len(range(max(skip, 4), 8))
    assert failures == ([(shards[0], 1, lost)] if lost else [])


@contextlib.contextmanager
def failing_group(
    monkeypatch: pytest.MonkeyPatch, path: str, group: int, after: int, error: Exception, once: bool = False
) -> Iterator[list[Exception]]:
    """Reading row group ``group`` of ``path`` raises ``error`` after ``after`` batches, as a damaged page far
    into the group, or a network gone away, would; with ``once``, only the first time (a network back after an
    outage). Yields the errors raised so far."""
    raised: list[Exception] = []

    def fail() -> Any:
        raised.append(error)
        raise error

    class Failing(pq.ParquetFile):
        def __init__(self, source: Any, **kwargs: Any) -> None:
            super().__init__(source, **kwargs)
            self.source = source

        def iter_batches(self, **kwargs: Any) -> Iterator[Any]:
            batches = super().iter_batches(**kwargs)
            if self.source != path or kwargs.get("row_groups") != [group] or (once and raised):
                return batches
            return (b if i < after else fail() for i, b in enumerate(batches))

    with monkeypatch.context() as patch:
        patch.setattr(pq, "ParquetFile", Failing)
        yield raised


def test_records_given_before_a_row_group_failed_are_not_counted_lost(
    shards: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(parquet_module, "batch_rows", lambda metadata: 2)
    failures: list[Failure] = []
    with failing_group(monkeypatch, shards[1], 0, 1, OSError("Couldn't deserialize thrift")):  # rows 10-14
        got = [r["n"] for r in ParquetRows(shards, ["n"], skip=3, on_error=collecting(failures))]
    assert got == [n for n in range(3, 25) if not 12 <= n < 15]  # 10 and 11 came in the group's first batch
    assert failures == [(shards[1], 0, 3)]


@pytest.mark.parametrize("skip", [2, 5, 12])
def test_a_shard_given_up_midway_leaves_the_next_one_its_own_skip(
    shards: list[str], skip: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hub shard whose reading still fails on the way after every wait (none here) is given up from there on,
    its records left counted as lost. Having failed once rows were given, or while rows were still being passed
    over, it has used up what it could of ``skip``: the next shard is not cut by the same rows again."""
    monkeypatch.setattr(parquet_module, "batch_rows", lambda metadata: 2)
    monkeypatch.setattr(parquet_module, "HUB_RESUME_WAITS_S", ())
    monkeypatch.setattr(parquet_module, "is_hub_file", lambda path: True)
    monkeypatch.setattr(parquet_module, "opened_shard", lambda path, pause: contextlib.nullcontext(path))
    failures: list[Failure] = []
    with failing_group(monkeypatch, shards[0], 1, 0, ConnectionError("network unreachable")):  # rows 4-7
        got = [r["n"] for r in ParquetRows(shards, ["n"], skip=skip, on_error=collecting(failures))]
    assert [n for n in got if n >= 10] == list(range(max(skip, 10), 25))
    assert [n for n in got if n < 10] == list(range(skip, 4))  # what the first shard gave before it was given up
    assert failures == ([(shards[0], None, 10 - max(skip, 4))] if skip < 10 else [])


def test_a_hub_shard_read_on_after_an_outage_passes_a_damaged_row_group_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A damaged row group's records count as passed: reading on after an outage later in the shard starts
    after them, so no record comes twice and the damaged group is told of once. Without this, leaving them
    uncounted went unseen: records went out twice (..., 20, 21, 20, 21, 22, ...) and the group was skipped twice."""
    monkeypatch.setattr(parquet_module, "batch_rows", lambda metadata: 3)
    local = tmp_path / "train-00000-of-00001.parquet"
    damaged_shard(local)
    hub_path = "hf://datasets/acme/shards@main/train-00000-of-00001.parquet"

    @contextlib.contextmanager
    def opened_shard(path: str, pause: Any = None) -> Iterator[str]:
        assert path == hub_path
        yield str(local)  # the hub file's bytes, as HubFile would read them

    monkeypatch.setattr(parquet_module, "opened_shard", opened_shard)
    failures: list[Failure] = []
    rows = ParquetRows([hub_path], ["n", "blob"], on_error=collecting(failures), pause=lambda seconds: True)
    with failing_group(monkeypatch, str(local), 2, 1, ConnectionError("the hub went away"), once=True) as raised:
        got = [r["n"] for r in rows]
    assert raised  # the outage happened, in row group 2 (rows 20-29), after its first batch
    assert got == [*range(0, 10), *range(20, 40)]
    assert failures == [(hub_path, 1, 10)]


@pytest.mark.parametrize(
    ("status", "retried"),
    [(500, True), (503, True), (408, True), (429, True), (404, False), (401, False)],
)
def test_a_hub_answer_worth_retrying_is_an_interruption(status: int, retried: bool) -> None:
    """What huggingface_hub itself retries (a server error, a timeout, too many requests) is read on after a
    wait; a missing or forbidden file is the shard's own fault. Without this, a rate-limited (429) shard given
    up and counted as skipped went unseen."""
    exc = OSError(f"the hub answered {status}")
    exc.response = types.SimpleNamespace(status_code=status)  # type: ignore[attr-defined]
    assert parquet_module.interrupted(exc) is retried


def damaged_dataset(folder: Path) -> Path:
    """12 CIFAR-like records in row groups of 4, group 1 (records 4-7) with its image column's page header
    damaged."""
    write_parquet_dataset(folder, synthetic_images(12), [i % 10 for i in range(12)], rows_per_group=4)
    shard = next(folder.glob("*.parquet"))
    images = pq.ParquetFile(shard).metadata.schema.to_arrow_schema().get_field_index("img")
    damage_page_header(shard, 1, images)  # the struct's first leaf: img.bytes
    return folder


def test_a_replay_counts_a_damaged_row_groups_records_as_skipped(tmp_path: Path) -> None:
    from eyed.config import SourceConfig
    from eyed.sources.replay import ReplaySource

    dataset = damaged_dataset(tmp_path / "ds")
    images = synthetic_images(12)
    with ReplaySource(SourceConfig(dataset=str(dataset), split="train")) as src:
        frames = list(src.frames())
    assert len(frames) == 8
    for frame, i in zip(frames, [0, 1, 2, 3, 8, 9, 10, 11], strict=True):
        assert np.array_equal(frame.image, images[i])
    assert src.skipped == 4


class HubBytes:
    """What huggingface_hub's file system gives HubFile (by monkeypatch): one file's bytes, by range request.
    A request from an offset in ``lost_at`` fails as a lost connection; ``ignore_range`` sends the whole file;
    each request takes ``delay_s``."""

    def __init__(self, content: bytes) -> None:
        self.content = content
        self.lost_at: set[int] = set()
        self.ignore_range = False
        self.delay_s = 0.0
        self.asked: list[tuple[int, int]] = []

    def open(self, path: str, mode: str, cache_type: str) -> HubBytes.File:
        return HubBytes.File(self)

    def __call__(self) -> HubBytes:  # HfFileSystem()
        return self

    class File:
        def __init__(self, hub: HubBytes) -> None:
            self.hub, self.size, self.closed = hub, len(hub.content), False

        def _fetch_range(self, start: int, end: int) -> bytes:
            self.hub.asked.append((start, end))
            time.sleep(self.hub.delay_s)
            if start in self.hub.lost_at:
                raise ConnectionError(f"lost at {start}")
            return self.hub.content if self.hub.ignore_range else self.hub.content[start:end]

        def close(self) -> None:
            self.closed = True


@pytest.fixture
def hub_bytes(monkeypatch: pytest.MonkeyPatch) -> HubBytes:
    import huggingface_hub

    served = HubBytes(bytes(range(256)) * 100)  # 25,600 bytes: six blocks and a bit
    monkeypatch.setattr(huggingface_hub, "HfFileSystem", served)
    monkeypatch.setattr(parquet_module, "HUB_BLOCK_BYTES", 4096)
    monkeypatch.setattr(parquet_module, "HUB_SIDE_READ_BYTES", 1024)
    return served


def test_a_hub_file_reads_exactly_what_is_asked_for(hub_bytes: HubBytes) -> None:
    """Seeks anywhere (from the start, here, the end), reads across blocks and past the end, all and none."""
    rng = np.random.default_rng(0)
    content = hub_bytes.content
    with parquet_module.HubFile("hf://datasets/x/y/f.parquet") as f:
        for _ in range(500):
            whence = int(rng.integers(0, 3))
            offset = int(rng.integers(-len(content), 0)) if whence == 2 else int(rng.integers(0, len(content) + 10))
            if whence == 1:
                offset = int(rng.integers(-f.tell(), len(content) - f.tell() + 10))
            at = f.seek(offset, whence)
            size = int(rng.choice([-1, 0, 1, 100, 1023, 1024, 4095, 4096, 4097, 9000]))
            data = f.read(size)
            assert data == content[at : None if size < 0 else at + size]
            assert f.tell() == at + len(data)


def test_a_failed_read_ahead_is_dropped_unless_its_bytes_are_wanted(hub_bytes: HubBytes) -> None:
    hub_bytes.lost_at = {4096}  # the block read ahead of the first one
    with parquet_module.HubFile("hf://datasets/x/y/f.parquet") as f:
        assert f.read(100) == hub_bytes.content[:100]
        f.seek(20000)
        assert f.read(100) == hub_bytes.content[20000:20100]  # elsewhere: the failure is not this read's
        f.seek(200)
        with pytest.raises(ConnectionError, match="lost at 4096") as failed:
            f.read(4000)  # into the block that failed
    assert parquet_module.interrupted(failed.value)  # so the shard is opened again and read on from the row
    assert (4096, 8192) in hub_bytes.asked


def test_a_hub_answer_that_ignored_the_range_is_an_error(hub_bytes: HubBytes) -> None:
    hub_bytes.ignore_range = True
    with parquet_module.HubFile("hf://datasets/x/y/f.parquet") as f, pytest.raises(OSError, match="sent 25600"):
        f.read(100)


def test_a_hub_request_waited_for_is_announced(hub_bytes: HubBytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub retries a request through an outage for up to 83 s, longer than a daemon's watchdog waits:
    the wait is announced to the thread's pace listener, a little ahead each time, for HUB_REQUEST_ANNOUNCED_S
    (after which a request is taken as hung)."""
    monkeypatch.setattr(parquet_module, "HUB_REQUEST_ANNOUNCED_S", 0.4)
    hub_bytes.delay_s = 0.8
    heard: list[float] = []
    with parquet_module.HubFile("hf://datasets/x/y/f.parquet") as f, pace_listener(heard.append):
        asked = time.monotonic()
        assert f.read(100) == hub_bytes.content[:100]
    assert heard, "a request waited for was not announced"
    assert all(asked < until <= asked + 0.4 + 0.1 for until in heard)  # never past the bound
    assert heard == sorted(heard) and len(heard) < 0.4 / parquet_module.STOP_POLL_S + 2
