"""Rows of local parquet shards, read a few pages at a time with pyarrow (for the replay source)."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

PAGE_BUFFER_BYTES = 1 << 20
# Rows per batch are chosen so a batch holds about this much: CIFAR-10's 2.3 KB records come 464 at a time,
# a shard of 5 MB photos one at a time.
BATCH_BYTES = 1 << 20
MAX_BATCH_ROWS = 1024


def batch_rows(metadata: Any) -> int:
    """Rows per batch for a file with this ``pyarrow.parquet.FileMetaData`` (about BATCH_BYTES uncompressed)."""
    groups = [metadata.row_group(i) for i in range(metadata.num_row_groups)]
    per_row = sum(g.total_byte_size for g in groups) / max(1, metadata.num_rows)
    return int(max(1, min(MAX_BATCH_ROWS, BATCH_BYTES // max(1.0, per_row))))


class ParquetRows:
    """The rows of ``files`` as dicts of ``columns``, in file order, from row ``skip`` on; iterable many times.

    datasets' parquet builder scans a whole row group at a time (pyarrow.dataset), and CIFAR-10's shards are
    one 10,000-row group each: their 22 MB image column stays in memory while the group is replayed, and twice
    over while one shard follows another. ``pyarrow.parquet`` reads the pages a batch needs. Skipped rows are
    passed over by the files' row counts, unread. A file that cannot be read (or lacks a column) goes to
    ``on_error`` and the rows go on with the next file.
    """

    def __init__(
        self,
        files: Sequence[str],
        columns: Sequence[str],
        skip: int = 0,
        on_error: Callable[[str, Exception], None] | None = None,
    ) -> None:
        self.files = list(files)
        self.columns = list(columns)
        self.skip = skip
        self.on_error = on_error

    def __iter__(self) -> Iterator[dict[str, Any]]:
        to_skip = self.skip
        for path in self.files:
            try:
                to_skip = yield from self._file_rows(path, to_skip)
            except Exception as exc:  # a broken or foreign shard: reported, and the others still replay
                if self.on_error is None:
                    raise
                self.on_error(path, exc)

    def _file_rows(self, path: str, to_skip: int) -> Generator[dict[str, Any], None, int]:
        """Rows of one file after ``to_skip`` rows; returns how many rows are still to skip after it."""
        import pyarrow.parquet as pq

        with pq.ParquetFile(path, buffer_size=PAGE_BUFFER_BYTES, pre_buffer=False) as reader:
            meta = reader.metadata
            # pyarrow would leave a column it does not find out of the rows without a word.
            if missing := [c for c in self.columns if c not in reader.schema_arrow.names]:
                raise KeyError(f"no column {missing[0]!r}")
            if to_skip >= meta.num_rows:
                return to_skip - meta.num_rows
            groups: list[int] = []
            for i in range(meta.num_row_groups):
                rows = meta.row_group(i).num_rows
                if not groups and to_skip >= rows:
                    to_skip -= rows
                else:
                    groups.append(i)
            for batch in reader.iter_batches(
                batch_size=batch_rows(meta), row_groups=groups, columns=self.columns, use_threads=False
            ):
                if to_skip >= batch.num_rows:
                    to_skip -= batch.num_rows
                    continue
                if to_skip:
                    batch, to_skip = batch.slice(to_skip), 0
                yield from batch.to_pylist()
        return 0
