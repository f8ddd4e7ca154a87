"""What a dataset (a local folder or a hub id) holds for one split, as datasets sees it: its parquet files and
features, or the image files of a local image folder with their labels.

eyed reads parquet shards itself (``eyed.sources.parquet``, with pyarrow; a hub dataset's by range requests)
and decodes an image folder's files itself (OpenCV); it needs datasets only to find a split's files, their
labels and the features (which column is the image, the class names). Importing datasets also imports pandas
and much else: about 65-75 MB of resident memory, a third of a replay daemon's. So unless this process has
already imported datasets, a child process asks it and exits, and the daemon never holds it. An image
folder's listing (one line per image) goes into a temporary file, so a large folder costs the daemon no
memory either.

    python -m eyed.sources.dataset_info DATASET SPLIT LISTING_FD   # prints the answer as JSON
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from eyed.sources.parquet import is_hub_file, opened_shard
from eyed.types import StartUp

# datasets' image-folder features that eyed reads itself: images, with a label (from class folders or a metadata
# file) or without. A metadata file that adds other columns (captions, boxes) leaves the folder to datasets.
IMAGE_FOLDER_COLUMNS = ("image", "label")

LISTING_CHUNK_BYTES = 1 << 16

logger = logging.getLogger(__name__)

# A child that has used no CPU time for this long is stuck (a hung network mount, say). One that keeps working is
# waited for as long as datasets takes to walk the folder (about 2,000 image files a second here, fewer on a
# small board), so a large folder makes a slow start rather than a refused one. Where the child's CPU time
# cannot be read (no /proc), this bounds the whole wait. Importing datasets alone takes 1-3 s on a small board.
CHILD_STALL_S = 120.0
CHILD_POLL_S = 1.0
# How often a long wait says that it is still going.
CHILD_REPORT_S = 30.0


class DatasetInfoError(Exception):
    """datasets could not read the folder (a ValueError or ImportError in the child is raised as such)."""


class UnknownSplit(ValueError):
    """The dataset has no split of that name: ``source.split`` is wrong, which no restart mends."""


RAISED_AS: dict[str, type[Exception]] = {
    "ValueError": ValueError,
    "ImportError": ImportError,
    "UnknownSplit": UnknownSplit,
}


def check_split(builder: Any, split: str) -> None:
    """UnknownSplit unless ``split`` is one of the splits ``builder`` (datasets') found data files for; nothing
    where it found none (datasets then has its say when the split is read)."""
    data_files = getattr(builder.config, "data_files", None)
    if not data_files:
        return
    splits = [str(name) for name in data_files]
    if split not in splits:
        raise UnknownSplit(f"no split {split!r} (it has {', '.join(splits)})")


@dataclass(frozen=True)
class ParquetSplit:
    """A split's parquet files (local paths, or a hub dataset's ``hf://`` URLs), and its features in
    ``datasets.Features.to_dict()`` form."""

    files: list[str]
    features: dict[str, Any]


class Listing:
    """The binary file an image folder's listing is written to and read from; closed when the last of its
    holders (the query, the replay's rows) lets go of it."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file = file
        weakref.finalize(self, file.close)

    @classmethod
    def temporary(cls) -> Listing:
        return cls(tempfile.TemporaryFile())


@dataclass(frozen=True)
class LocalImages:
    """An image folder's split: ``count`` images listed in ``listing``, one JSON ``[path, label]`` line each, in
    datasets' order, and the features (``image``, and ``label`` from class folders or a metadata file)."""

    listing: Listing
    count: int
    features: dict[str, Any]

    def rows(self, image_column: str, label_column: str | None, skip: int = 0) -> ImageRows:
        return ImageRows(self, image_column, label_column, skip)


class ImageRows:
    """The listed images as records like datasets' with undecoded images (``{"path": ..., "bytes": None}``),
    from record ``skip`` on; iterable many times, each pass at its own place in the listing."""

    def __init__(self, images: LocalImages, image_column: str, label_column: str | None, skip: int) -> None:
        self.images = images
        self.image_column, self.label_column = image_column, label_column
        self.skip = skip

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i, line in enumerate(self._lines()):
            if i < self.skip:
                continue
            path, label = json.loads(line)
            record: dict[str, Any] = {self.image_column: {"path": path, "bytes": None}}
            if self.label_column:
                record[self.label_column] = label
            yield record

    def _lines(self) -> Iterator[bytes]:
        # pread, not the file's own position, which every pass (and the child) would share.
        fd, offset, rest, left = self.images.listing.file.fileno(), 0, b"", self.images.count
        while left:
            chunk = os.pread(fd, LISTING_CHUNK_BYTES, offset)
            if not chunk:
                raise EOFError(f"the image listing ends {left} images short of {self.images.count}")
            offset += len(chunk)
            *lines, rest = (rest + chunk).split(b"\n")
            yield from lines[:left]
            left -= min(left, len(lines))


def keep_torch_out() -> None:
    """datasets imports torch for every streaming dataset when it is installed, only to offer torch DataLoader
    integration that eyed never uses: ~300 MB of RSS and seconds of start-up. The flag is read at use."""
    import datasets

    if "torch" not in sys.modules:
        datasets.config.TORCH_AVAILABLE = False


def parquet_files(builder: Any, split: str) -> list[str] | None:
    """The files of ``split`` when ``builder`` is datasets' parquet builder on local files or on a hub
    repository's (``hf://`` URLs pinned to a commit); None otherwise.

    Image folders, csv and other remote storage stay with datasets' streaming. UnknownSplit for a split the
    dataset lacks.
    """
    try:
        from datasets.packaged_modules.parquet.parquet import ParquetConfig
    except ImportError:  # a datasets that moved it: its own streaming still works
        return None
    if not isinstance(builder.config, ParquetConfig) or not builder.config.data_files:
        return None
    check_split(builder, split)
    splits = {str(name): files for name, files in builder.config.data_files.items()}
    files = [str(f) for f in splits[split]]
    if files and (all(is_hub_file(f) for f in files) or all(Path(f).is_file() for f in files)):
        return files
    return None


def list_images(builder: Any, split: str, listing: IO[bytes]) -> tuple[int, dict[str, Any]] | None:
    """Write ``split``'s images to ``listing`` when ``builder`` is datasets' image-folder builder on local
    files with no column but the image and a label: how many, and the features. None otherwise (other
    metadata, archives, other builders), and datasets then streams the folder. ValueError for a split the
    folder lacks."""
    try:
        from datasets import Image
        from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
    except ImportError:  # a datasets that moved it: its own streaming still works
        return None
    if not isinstance(builder, ImageFolder):
        return None
    ds = builder.as_streaming_dataset(split=split)
    features = ds.features
    if features is None or set(features) - set(IMAGE_FOLDER_COLUMNS) or not isinstance(features.get("image"), Image):
        return None
    count = 0
    # The walk for labels already ran (as_streaming_dataset): listing the paths adds about 16 us an image.
    for record in ds.cast_column("image", Image(decode=False)):
        image = record["image"]
        if image.get("bytes") is not None or not image.get("path") or not Path(image["path"]).is_file():
            return None  # an image inside an archive: only datasets can open it
        listing.write(json.dumps([image["path"], record.get("label")]).encode() + b"\n")
        count += 1
    listing.flush()
    return count, features.to_dict()


def scan(dataset: str, split: str, listing: Listing) -> ParquetSplit | LocalImages | None:
    """In this process: ``dataset``'s parquet files for ``split`` and their features, or the images of a
    local folder (listed into ``listing``); None if it is neither (datasets then streams it)."""
    import pyarrow.parquet as pq
    from datasets import Features, load_dataset_builder

    keep_torch_out()
    builder = load_dataset_builder(dataset)
    check_split(builder, split)
    files = parquet_files(builder, split)
    if files is None:
        if not Path(dataset).is_dir():  # a hub dataset of images: datasets decodes those itself, so it streams them
            return None
        listing.file.seek(0)
        listing.file.truncate()
        listed = list_images(builder, split, listing.file)
        return LocalImages(listing, *listed) if listed is not None else None
    features = builder.info.features
    if not features:
        with opened_shard(files[0]) as source:
            features = Features.from_arrow_schema(pq.read_schema(source))
    return ParquetSplit(files, features.to_dict())


def answer_of(found: ParquetSplit | LocalImages | None) -> dict[str, Any]:
    """What the child prints for ``found`` (``result`` turns it back)."""
    if isinstance(found, ParquetSplit):
        return {"files": found.files, "features": found.features}
    if isinstance(found, LocalImages):
        return {"files": None, "images": found.count, "features": found.features}
    return {"files": None}


def datasets_imported() -> bool:
    return "datasets" in sys.modules


class SplitQuery:
    """:func:`scan`, started now and answered by :meth:`result`: in a child process unless datasets is already
    imported here (then it costs nothing more), so that the child's seconds overlap the caller's own start-up.

    Errors come back as UnknownSplit (a ValueError), ValueError (a shard that is not parquet), ImportError (no
    datasets) or DatasetInfoError.
    """

    def __init__(self, dataset: str, split: str) -> None:
        self.dataset, self.split = dataset, split
        self._answer: dict[str, Any] | None = None
        self._child: subprocess.Popen[bytes] | None = None
        self._listing = Listing.temporary()
        if not datasets_imported():
            # Files, not pipes: a long answer (thousands of shards) or a chatty stderr never blocks the child
            # while no one reads yet. They live until the answer is read or the query dropped (_stop).
            self._out = tempfile.TemporaryFile()  # noqa: SIM115
            self._err = tempfile.TemporaryFile()  # noqa: SIM115
            fd = self._listing.file.fileno()
            cmd = [sys.executable, "-m", __name__, dataset, split, str(fd)]
            self._child = subprocess.Popen(cmd, stdout=self._out, stderr=self._err, pass_fds=(fd,))
            # A query dropped unanswered (a source never entered: the model failed to load) stops its child.
            self._finalizer = weakref.finalize(self, _stop, self._child, self._out, self._err)

    def result(self, startup: StartUp | None = None) -> ParquetSplit | LocalImages | None:
        """The answer. While the child works, ``startup`` hears how long it has been waiting, and its ``stop``,
        set, gives up the wait (a daemon told to stop while datasets walks a large folder): DatasetInfoError."""
        if self._child is None:
            return scan(self.dataset, self.split, self._listing)
        answer = self._answer = self._answer or self._wait(startup or StartUp())
        if "error" in answer:
            raise RAISED_AS.get(answer["error"], DatasetInfoError)(answer["message"])
        if answer["files"] is not None:
            return ParquetSplit(answer["files"], answer["features"])
        if "images" in answer:
            return LocalImages(self._listing, answer["images"], answer["features"])
        return None

    def _wait(self, startup: StartUp) -> dict[str, Any]:
        """The child's answer; a failure of the child itself becomes an answer too, so it is given every time."""
        assert self._child is not None
        given_up = wait_while_working(self._child, f"datasets to describe {self.dataset}", startup)
        if given_up is not None:
            self.cancel()
            return {"error": "", "message": given_up}
        out, err = _read(self._out), _read(self._err)
        self.cancel()  # closes the files
        try:
            answer: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        except (IndexError, ValueError):
            message = (
                f"datasets could not describe {self.dataset} (exit {self._child.returncode}): {err.strip()[-1000:]}"
            )
            return {"error": "", "message": message}
        return answer

    def cancel(self) -> None:
        """Stop a child whose answer is no longer wanted (and close its output; the listing stays open)."""
        if self._child is not None:
            self._finalizer()


def wait_while_working(child: subprocess.Popen[bytes], what: str, startup: StartUp) -> str | None:
    """Wait for ``what`` (``child``) while it keeps using CPU time: None once it has exited, else why the wait
    was given up: ``startup.stop`` was set, or the child used no CPU time for CHILD_STALL_S (where that cannot
    be read, CHILD_STALL_S passed). Every CHILD_REPORT_S a long wait logs, and tells ``startup``, that it is
    still going."""
    start = progress_at = time.monotonic()
    used = cpu_seconds(child.pid)
    reported = 0
    while True:
        try:
            child.wait(timeout=CHILD_POLL_S)
            return None
        except subprocess.TimeoutExpired:
            pass
        if startup.stop.is_set():
            return f"stopped while waiting for {what}"
        now, now_used = time.monotonic(), cpu_seconds(child.pid)
        if now_used is not None and (used is None or now_used > used):
            used, progress_at = now_used, now
        if now - progress_at >= CHILD_STALL_S:
            return f"no progress in {CHILD_STALL_S:g} s waiting for {what}"
        if (waited := int((now - start) // CHILD_REPORT_S)) > reported:
            reported = waited
            logger.info("still waiting for %s (%.0f s, %.0f s of CPU)", what, now - start, used or 0.0)
            startup.waiting(f"waiting for {what} ({now - start:.0f} s)")


def cpu_seconds(pid: int) -> float | None:
    """The user and system CPU time process ``pid`` has used so far; None where /proc cannot tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the command name (which may hold spaces and parentheses): state is field 3, utime 14, stime 15.
    fields = stat.rpartition(")")[2].split()
    try:
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (IndexError, ValueError, OSError):
        return None


def _stop(child: subprocess.Popen[bytes], *files: IO[bytes]) -> None:
    if child.poll() is None:
        child.kill()
        child.wait()
    for f in files:
        f.close()


def _read(f: IO[bytes]) -> str:
    f.seek(0)
    return f.read().decode("utf-8", errors="replace")


def main(argv: list[str]) -> int:
    dataset, split, fd = argv
    listing = Listing(os.fdopen(int(fd), "wb"))
    try:
        answer = answer_of(scan(dataset, split, listing))
    except (ValueError, ImportError) as exc:
        if isinstance(exc, UnknownSplit):
            kind = "UnknownSplit"
        else:
            kind = "ValueError" if isinstance(exc, ValueError) else "ImportError"
        answer = {"error": kind, "message": str(exc)}
    except Exception as exc:
        answer = {"error": type(exc).__name__, "message": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
