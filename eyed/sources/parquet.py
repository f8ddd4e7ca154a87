"""Rows of parquet shards, local or a hub dataset's, read a few pages at a time with pyarrow (for the replay
source)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from eyed.sources.base import announce_wait, wait_announced

logger = logging.getLogger(__name__)

PAGE_BUFFER_BYTES = 1 << 20
# Rows per batch are chosen so a batch holds about this much: CIFAR-10's 2.3 KB records come 464 at a time,
# a shard of 5 MB photos one at a time.
BATCH_BYTES = 1 << 20
MAX_BATCH_ROWS = 1024
HUB_PREFIX = "hf://"
# A hub shard is read by requests of this many bytes, one block ahead of pyarrow (HubFile): 4 MB held, where
# huggingface_hub's own cache held up to 6 (1 MB asked for by pyarrow, and 5 more ahead of it). Against 4 MB
# blocks, the first rows come sooner and a slow link keeps up better (benchmarks/hub_link.py).
HUB_BLOCK_BYTES = 2 << 20
# A read of fewer bytes than this away from the blocks being read (a small column, a footer) is asked for as it
# is, and the blocks of the large column are kept.
HUB_SIDE_READ_BYTES = 256 << 10
# huggingface_hub retries each request 5 times (a timeout, a server error) before it fails: 23 s of waits, up to
# 83 s with its 10 s timeout on each attempt when the network has stalled. A hub shard whose reading still
# fails on the way (not on what it read) is opened again after each of these waits, and read on from the row
# it reached: a network that comes back within minutes costs a pause, not the rest of the shard (datasets' own
# streaming, which eyed's reader replaces for parquet, retries its reads for about 100 s).
HUB_RESUME_WAITS_S = (5.0, 10.0, 20.0, 40.0, 60.0)
# Where the exceptions of a failed request come from (huggingface_hub 1 used httpx, 2 uses httpx2).
TRANSPORT_MODULES = {"httpx", "httpcore", "httpx2", "httpcore2", "huggingface_hub"}
# How often a reader waiting for the network looks whether the replay is being stopped.
STOP_POLL_S = 0.05
# How long a request is waited for as a deliberate wait, announced to the daemon's watchdog (pace_listener): longer
# than huggingface_hub's retries take on a stalled network (83 s, above). A request held longer is taken as hung,
# and the watchdog may act on it.
HUB_REQUEST_ANNOUNCED_S = 100.0
# How far ahead each announcement of a request's wait reaches: it is made again at every look for a stop, so a
# request that ends early leaves the watchdog at most this much overstated.
HUB_REQUEST_ANNOUNCE_AHEAD_S = 1.0


class ReadingStopped(Exception):
    """A hub request given up on because the replay is being stopped (the request goes on in its own thread)."""


def is_hub_file(path: str) -> bool:
    """``path`` names a file of a hub repository, as datasets resolves a hub dataset's data files."""
    return path.startswith(HUB_PREFIX)


def prepare_hub_reading() -> None:
    """Import what reading a hub shard takes (huggingface_hub's file system, pyarrow's parquet reader: about
    0.3 s here) ahead of the first read; ImportError without huggingface_hub."""
    import huggingface_hub.hf_file_system  # noqa: F401
    import pyarrow.parquet  # noqa: F401


def interrupted(exc: Exception) -> bool:
    """Whether reading failed on the way, in the network or at the hub (a timeout, a lost connection, a
    server error), rather than on the file itself (not parquet, a missing column, a file that is gone)."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(status, int):
        return status >= 500 or status in (408, 429)  # what huggingface_hub itself retries
    transport = {cls.__module__.partition(".")[0] for cls in type(exc).__mro__} & TRANSPORT_MODULES
    return bool(transport) or isinstance(exc, (ConnectionError, TimeoutError))


def _sleep(seconds: float) -> bool:
    # Announced as a replay's own pause is (ReplaySource._pause), though no one stops it.
    return wait_announced(time.monotonic() + seconds, threading.Event())


@dataclass
class Background:
    """A call running in a daemon thread of its own, which a caller waiting for a stop can leave to itself (a
    network request cannot be interrupted). For a hub file's request, ``start`` is its first byte, or None."""

    start: int | None = None
    done: threading.Event = field(default_factory=threading.Event)
    outcome: tuple[bool, Any] = (False, None)  # (succeeded, what it returned or raised)


def in_background(call: Callable[[], Any], name: str, start: int | None = None) -> Background:
    """Start ``call`` in a daemon thread named ``name``."""
    job = Background(start)

    def run() -> None:
        try:
            job.outcome = (True, call())
        except BaseException as exc:  # handed to the waiter, or dropped with the call
            job.outcome = (False, exc)
        finally:
            job.done.set()

    threading.Thread(target=run, name=name, daemon=True).start()
    return job


def wait_for(job: Background, stopped: Callable[[], bool], error: Exception) -> Any:
    """What ``job`` returned (what it raised is raised here); ``error`` once ``stopped()``, looked at every
    STOP_POLL_S."""
    while not job.done.wait(STOP_POLL_S):
        if stopped():
            raise error
    ok, value = job.outcome
    if not ok:
        raise value
    return value


class HubFile:
    """A hub file for pyarrow, read by range requests of HUB_BLOCK_BYTES, the next block asked for while pyarrow
    works through the one before. Each request runs in a daemon thread while the caller waits for it or for a
    stop (``pause(0)`` False, when ReadingStopped is raised).

    The block read ahead hides the network's round trips and transfer behind the inference on the rows already
    read, as far as the link keeps up. And huggingface_hub retries a request for up to 83 s on a stalled network:
    a daemon told to stop would otherwise wait for that past its shutdown bound. A request given up on is left
    to end in its thread, which does not hold up the process's exit; it runs in Python, not under pyarrow, so an
    interpreter that exits meanwhile stops it cleanly. pyarrow calls a file from one thread at a time; after a
    stop the file serves nothing more.
    """

    def __init__(self, path: str, pause: Callable[[float], bool] = _sleep) -> None:
        from huggingface_hub import HfFileSystem

        self._pause = pause
        # fsspec keeps one instance per thread that asks for one: made here, not once per request thread.
        fs = HfFileSystem()
        self._file = self._wait(self._start(None, lambda: fs.open(path, "rb", cache_type="none")))
        self.size = int(self._file.size)
        self._pos = 0
        self._block_start, self._block = 0, b""
        self._ahead: Background | None = None  # the block after ``_block``

    def _start(self, start: int | None, request: Callable[[], Any]) -> Background:
        if not self._pause(0):
            raise ReadingStopped("the replay is being stopped")
        return in_background(request, "eyed-hub-request", start)

    def _wait(self, job: Background) -> Any:
        """What ``job`` returned; what it raised is raised here. The wait is announced to the thread's pace
        listener for up to HUB_REQUEST_ANNOUNCED_S: huggingface_hub retrying through an outage holds a request
        for up to 83 s, longer than a daemon's watchdog (WatchdogSec=30) would wait for a frame."""
        announced_until = time.monotonic() + HUB_REQUEST_ANNOUNCED_S

        def stopped() -> bool:
            if (now := time.monotonic()) < announced_until:
                announce_wait(min(announced_until, now + HUB_REQUEST_ANNOUNCE_AHEAD_S))
            return not self._pause(0)

        return wait_for(job, stopped, ReadingStopped("the replay is being stopped"))

    def _fetch(self, start: int, end: int) -> Background:
        def request() -> bytes:
            # fsspec's hook for a file's bytes (AbstractBufferedFile._fetch_range): one range request, with no
            # position of the file's own, so a small read can go while the block ahead is on its way.
            data: bytes = self._file._fetch_range(start, end)
            if len(data) != end - start:  # a server or proxy that ignored the range: not these bytes
                raise OSError(f"the hub sent {len(data)} bytes for bytes {start}-{end - 1}")
            return data

        return self._start(start, request)

    def read(self, size: int = -1) -> bytes:
        end = self.size if size < 0 else min(self.size, self._pos + size)
        parts: list[bytes | memoryview] = []
        while self._pos < end:
            if not self._block_start <= self._pos < self._block_start + len(self._block):
                if self._ahead is not None and self._ahead.start == self._pos:
                    job = self._ahead
                elif self._ahead is not None and end - self._pos < HUB_SIDE_READ_BYTES:
                    # A small read away from a stream of blocks (a small column's pages, a footer): read as it is,
                    # and the block read ahead is kept for when pyarrow comes back to it.
                    parts.append(self._wait(self._fetch(self._pos, end)))
                    self._pos = end
                    break
                else:
                    job = self._fetch(self._pos, min(self.size, max(end, self._pos + HUB_BLOCK_BYTES)))
                self._block_start, self._block, self._ahead = self._pos, self._wait(job), None
            offset = self._pos - self._block_start
            piece = memoryview(self._block)[offset : offset + end - self._pos]  # one copy, by the join
            parts.append(piece)
            self._pos += len(piece)
        following = self._block_start + len(self._block)
        if self._block and self._ahead is None and following < self.size and self._pause(0):
            self._ahead = self._fetch(following, min(self.size, following + HUB_BLOCK_BYTES))
        return b"".join(parts)

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = {0: 0, 1: self._pos, 2: self.size}[whence] + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    @property
    def closed(self) -> bool:
        return bool(self._file.closed)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        self._block, self._ahead = b"", None
        self._file.close()  # a request still on its way (read ahead, or given up on) ends on its own

    def __enter__(self) -> HubFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def opened_shard(path: str, pause: Callable[[float], bool] = _sleep) -> Iterator[Any]:
    """``path`` for pyarrow: a local path as it is; a hub file as a :class:`HubFile`, which reads what pyarrow
    asks for by HTTP range requests (a few MB ahead), each retried by huggingface_hub on a timeout or a server
    error, and each given up on when ``pause(0)`` says the replay is being stopped."""
    if not is_hub_file(path):
        yield path
        return
    with HubFile(path, pause) as file:
        yield file


def batch_rows(metadata: Any) -> int:
    """Rows per batch for a file with this ``pyarrow.parquet.FileMetaData`` (about BATCH_BYTES uncompressed)."""
    groups = [metadata.row_group(i) for i in range(metadata.num_row_groups)]
    per_row = sum(g.total_byte_size for g in groups) / max(1, metadata.num_rows)
    return int(max(1, min(MAX_BATCH_ROWS, BATCH_BYTES // max(1.0, per_row))))


class UnreadableRows(Exception):
    """What :class:`ParquetRows` tells its ``on_error`` of: records of a file it could not read and passed over.

    ``rows`` is how many records that cost (None if unknown: a file whose footer could not be read), ``group``
    the row group they were in, or None when the rest of the file was given up. The failure itself is
    ``__cause__``; the message is its message, after the row group's place in the file for a row group."""

    def __init__(self, cause: Exception, rows: int | None, group: int | None = None, where: str = "") -> None:
        super().__init__(f"{where}: {cause}" if where else str(cause))
        self.rows, self.group = rows, group
        self.__cause__ = cause


@dataclass
class FileProgress:
    """How far the reading of one file got: the rows it gave, the rows of row groups it could not read (passed
    over), and its row count once its footer was read."""

    read: int = 0
    rows: int | None = None
    lost: int = 0

    @property
    def passed(self) -> int:
        """Rows behind, after those skipped: given, or lost with a row group that could not be read."""
        return self.read + self.lost

    def skip_after(self, to_skip: int) -> int:
        """What is left of ``to_skip`` (rows still to pass over when this file began) for the next file, when
        this one failed: nothing once it got past the skip; else less its row count, where that is known."""
        if self.passed:
            return 0
        return max(0, to_skip - self.rows) if self.rows is not None else to_skip

    def left(self, to_skip: int) -> int | None:
        """Rows of the file after the first ``to_skip`` not yet passed: what giving it up costs (None: unknown)."""
        return None if self.rows is None else max(0, self.rows - to_skip - self.passed)


class ParquetRows:
    """The rows of ``files`` as dicts of ``columns``, in file order, from row ``skip`` on; iterable many times.

    datasets' parquet builder scans a whole row group at a time (pyarrow.dataset), and CIFAR-10's shards are
    one 10,000-row group each: their 22 MB image column stays in memory while the group is replayed, and twice
    over while one shard follows another. ``pyarrow.parquet`` reads the pages a batch needs. Skipped rows are
    passed over by the files' row counts, unread. A file that cannot be read (or lacks a column) goes to
    ``on_error`` and the rows go on with the next file. Files may be local paths or a hub dataset's ``hf://``
    files, which are streamed (no shard is downloaded whole or written to disk) and read on from the row reached
    when the network fails for a while (HUB_RESUME_WAITS_S). ``pause(seconds)`` waits before that (announced
    to the thread's pace listener, as :func:`~eyed.sources.base.wait_announced` does, so a daemon's watchdog
    sees a wait, not a hang); False from it (the replay is being stopped) ends the rows there, and so does False
    from ``pause(0)``, asked before each file.
    """

    def __init__(
        self,
        files: Sequence[str],
        columns: Sequence[str],
        skip: int = 0,
        on_error: Callable[[str, Exception], None] | None = None,
        pause: Callable[[float], bool] | None = None,
    ) -> None:
        self.files = list(files)
        self.columns = list(columns)
        self.skip = skip
        self.on_error = on_error
        self.pause = pause or _sleep

    def __iter__(self) -> Iterator[dict[str, Any]]:
        to_skip = self.skip
        for path in self.files:
            if not self.pause(0):  # stopped: a shard given up on while stopping is not followed by the next
                return
            progress = FileProgress()
            try:
                left = yield from self._resumed_rows(path, to_skip, progress)
                if left is None:
                    return
                to_skip = left
            except Exception as exc:  # a broken or foreign shard: reported, and the others still replay
                if self.on_error is None:
                    raise
                self.on_error(path, UnreadableRows(exc, progress.left(to_skip)))
                to_skip = progress.skip_after(to_skip)

    def _resumed_rows(
        self, path: str, to_skip: int, progress: FileProgress
    ) -> Generator[dict[str, Any], None, int | None]:
        """:meth:`_file_rows`, opened again where it failed if ``path`` is a hub file: after each of
        HUB_RESUME_WAITS_S in turn, counted again from the first once a row has been read. Returns None if a
        pause was cut short."""
        waits = HUB_RESUME_WAITS_S if is_hub_file(path) else ()
        failures = 0
        while True:
            rows = self._file_rows(path, to_skip + progress.passed, progress)
            while True:
                try:
                    row = next(rows)
                except StopIteration as end:
                    left: int = end.value
                    return left
                except Exception as exc:
                    if not self.pause(0):  # being stopped, perhaps what ended the request: not the shard's fault
                        return None
                    if not interrupted(exc) or failures >= len(waits):
                        raise
                    wait, failures = waits[failures], failures + 1
                    at = to_skip + progress.passed
                    logger.warning("reading %s failed at row %d (%s); reading on in %g s", path, at, exc, wait)
                    if not self.pause(wait):
                        return None
                    break
                progress.read, failures = progress.read + 1, 0
                yield row

    def _file_rows(self, path: str, to_skip: int, progress: FileProgress) -> Generator[dict[str, Any], None, int]:
        """Rows of one file after ``to_skip`` rows; returns how many rows are still to skip after it."""
        import pyarrow.parquet as pq

        with (
            opened_shard(path, self.pause) as source,
            pq.ParquetFile(source, buffer_size=PAGE_BUFFER_BYTES, pre_buffer=False) as reader,
        ):
            meta = reader.metadata
            progress.rows = meta.num_rows
            # pyarrow would leave a column it does not find out of the rows without a word.
            if missing := [c for c in self.columns if c not in reader.schema_arrow.names]:
                raise KeyError(f"no column {missing[0]!r}")
            if to_skip >= meta.num_rows:
                return to_skip - meta.num_rows
            size = batch_rows(meta)
            first = 0  # the row group's first row in the file
            for group in range(meta.num_row_groups):
                rows = meta.row_group(group).num_rows
                if to_skip >= rows:
                    to_skip -= rows
                else:
                    yield from self._group_rows(path, reader, group, (first, rows), to_skip, size, progress)
                    to_skip = 0
                first += rows
        return 0

    def _group_rows(
        self, path: str, reader: Any, group: int, span: tuple[int, int], to_skip: int, size: int, progress: FileProgress
    ) -> Generator[dict[str, Any], None, None]:
        """Rows of row group ``group`` (``span``: its first row in the file, and its row count) after ``to_skip``,
        ``size`` at a time. If the group cannot be read, the rows of it not yet given go to ``on_error`` (as
        passed over) and the rows end there; unless there is no ``on_error``, the replay is being stopped or a
        hub file's reading failed on the way (it is opened again where it was: ``_resumed_rows``)."""
        first, rows = span
        given = 0
        skipping = to_skip
        batches: Iterator[Any] | None = None
        while True:
            try:
                if batches is None:
                    batches = iter(
                        reader.iter_batches(
                            batch_size=size, row_groups=[group], columns=self.columns, use_threads=False
                        )
                    )
                batch = next(batches, None)
                if batch is None:
                    return
                if skipping >= batch.num_rows:
                    skipping -= batch.num_rows
                    continue
                if skipping:
                    batch, skipping = batch.slice(skipping), 0
                records = batch.to_pylist()
            except Exception as exc:
                if self.on_error is None or not self.pause(0) or (is_hub_file(path) and interrupted(exc)):
                    raise
                lost = rows - to_skip - given
                progress.lost += lost
                where = f"row group {group} (rows {first}-{first + rows - 1}), {lost} of its rows not read"
                self.on_error(path, UnreadableRows(exc, lost, group, where))
                return
            for record in records:
                given += 1
                yield record
