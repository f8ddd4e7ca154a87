"""Replay a labelled image dataset as a synthetic camera, streamed (no full download). Parquet shards, local or
a hub dataset's, are read by ``eyed.sources.parquet`` and a local image folder's files are decoded here
(datasets, in a child process, finds the split's files, labels and features: ``eyed.sources.dataset_info``);
other hub datasets, csv and image folders whose metadata has columns besides a label are streamed by
datasets."""

from __future__ import annotations

import gc
import logging
import os
import platform
import re
import sys
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import cv2
import numpy as np

from eyed.config import ConfigError, SourceConfig
from eyed.sources.base import Pacer, SourceError, to_rgb, wait_announced
from eyed.sources.dataset_info import (
    DatasetInfoError,
    LocalImages,
    SplitQuery,
    UnknownSplit,
    check_split,
    keep_torch_out,
)
from eyed.sources.parquet import ParquetRows, UnreadableRows, in_background, prepare_hub_reading, wait_for
from eyed.types import Frame, StartUp

logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ("img", "image", "images", "pixel_values")
LABEL_COLUMNS = ("label", "labels", "fine_label", "coarse_label")
# How many times in a row datasets' reader may fail before a pass ends there: each failure is read on after the
# record it failed on (datasets decoding a corrupt file of a hub image folder fails its whole iterator).
READER_FAILURES_IN_A_ROW = 10
# Pauses before reading on after the 1st, 2nd, ... failure in a row (the last repeats): a corrupt file fails once
# and is read past at once; a network that went away fails each time, and gets about 40 s to come back.
READER_RETRY_S = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
# Threads datasets decodes images with once a pass is read on after a failure: its own default.
DATASETS_DECODE_THREADS = 32
# The truth an event carries is a class name, a class index or a short string: a label, never a column's
# contents. Longer strings (a caption, an encoded file) are cut to this many characters.
MAX_TRUTH_CHARS = 200
# datasets' Value dtypes a label column may have (integers and strings); a ClassLabel is one too. Any other
# feature (Image, Audio, binary, a struct, a list...) could carry pixels or anything else into every event.
LABEL_DTYPES = re.compile(r"u?int(8|16|32|64)|(large_)?string")
# How OpenCV decodes a replayed image: 3 channels (grey and alpha dropped as to_rgb would drop them), 16-bit and
# float kept for to_rgb to scale, and the EXIF Orientation applied, as datasets (PIL) and transformers apply it:
# IMREAD_UNCHANGED ignores it, and a phone's photo would be classified (and fine-tuned on) on its side. The same
# pixels as IMREAD_UNCHANGED and to_rgb for every PNG (all 50,000 of CIFAR-10's, byte for byte).
IMREAD_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH


def decode_image(value: Any) -> np.ndarray | None:
    """An RGB uint8 (H, W, 3) array from an undecoded ``datasets.Image`` value; None if it is not an image.

    datasets decodes the files of a hub image folder itself, whatever the cast to ``Image(decode=False)`` says:
    a PIL image is converted as it is.
    """
    data: bytes | None = None
    if isinstance(value, dict):
        data = value.get("bytes")
        if data is None and value.get("path"):
            try:
                data = Path(value["path"]).read_bytes()
            except OSError:
                return None
    elif isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif type(value).__module__.startswith("PIL."):
        try:
            return pil_to_rgb(value)
        except (OSError, ValueError):  # PIL decodes lazily: a broken file fails here
            return None
    if not data:
        return None
    # imdecode returns None on bytes that are not a supported image, and raises for one whose header claims
    # more pixels than OPENCV_IO_MAX_IMAGE_PIXELS (eyed/__init__.py): both are a record to skip.
    buffer = np.frombuffer(data, dtype=np.uint8)
    try:
        img = cv2.imdecode(buffer, IMREAD_FLAGS)
        if img is None:
            # What OpenCV cannot turn into 3 channels as it decodes (a one-channel float or 32-bit TIFF) it still
            # decodes as it is, without orientation; to_rgb scales it.
            img = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
        if img is None or img.size == 0:
            return None
        return to_rgb(img)
    except cv2.error as exc:
        logger.debug("image not decoded: %s", str(exc).strip().splitlines()[-1])
        return None


def pil_to_rgb(image: Any) -> np.ndarray:
    """An RGB uint8 array from a PIL image, scaled as :func:`to_rgb` scales what OpenCV decodes from its file.

    PIL's convert("RGB") clips the wide modes (16-bit, 32-bit integer, float) at 255 instead of scaling them.
    """
    mode = str(image.mode)
    if not (mode.startswith("I;16") or mode in ("I", "F")):
        return np.asarray(image.convert("RGB"))
    pixels = np.asarray(image)
    pixels = pixels.astype(pixels.dtype.newbyteorder("="))  # I;16B is big-endian; to_rgb checks for uint16
    if mode == "I" and pixels.size and pixels.min() >= 0 and pixels.max() <= 65535:
        # How older Pillow opens a 16-bit PNG, which OpenCV decodes as uint16.
        pixels = pixels.astype(np.uint16)
    return to_rgb(pixels)


def local_dataset(name: str) -> Path | None:
    """``source.dataset`` as a local folder (resolved), or None when it names a hub dataset."""
    local = Path(name).expanduser()
    return local.resolve() if local.exists() else None


def looks_like_a_path(name: str) -> bool:
    """A ``source.dataset`` that can only be meant as a local folder (a hub id never starts so)."""
    return name.startswith((".", "/", "~"))


def release_arrow_memory() -> None:
    """Arrow allocates through jemalloc with no decay, so memory freed after each batch goes back at once.

    Arrow picks its default pool once, from ARROW_DEFAULT_MEMORY_POOL, when it is first used (importing
    datasets does): the parquet reader takes some buffers from that pool whatever ``pyarrow.set_memory_pool``
    says. So the variable is set before then, when it still can be. Against pyarrow's default (mimalloc, which
    keeps what it once held), 7 MB less peak RSS for a replay daemon on the CIFAR-10 shards. Decay 0 hands
    freed pages back at once (jemalloc's default keeps them for a second). When datasets reads a whole row
    group (a hub dataset), jemalloc also grows its image column in place where the C library's allocator
    copies it at each doubling. Where pyarrow has no jemalloc (``arrow_pool_backend``: ARM64, a Raspberry Pi)
    Arrow uses the C library's allocator; a pool the user chose is left alone.
    """
    if "ARROW_DEFAULT_MEMORY_POOL" in os.environ:
        return
    if "pyarrow" not in sys.modules:
        os.environ["ARROW_DEFAULT_MEMORY_POOL"] = arrow_pool_backend()
    import pyarrow

    try:
        pool = pyarrow.jemalloc_memory_pool()
        pyarrow.jemalloc_set_decay_ms(0)
    except NotImplementedError:
        pool = pyarrow.system_memory_pool()
    pyarrow.set_memory_pool(pool)


def arrow_pool_backend(machine: str | None = None) -> str:
    """The pool to ask Arrow for before it can be asked what it has. pyarrow's wheels build jemalloc in on
    x86-64 Linux only (not on ARM64, a Raspberry Pi's, nor on macOS or Windows). Asked for it there, Arrow
    prints "Unsupported backend 'jemalloc'" to stderr and falls back on mimalloc, which keeps what it once
    held; the C library's allocator returns it."""
    machine = machine or platform.machine()
    return "jemalloc" if sys.platform.startswith("linux") and machine.lower() in ("x86_64", "amd64") else "system"


def skip_undecoded(ds: Any, records: int, images: bool) -> Any:
    """datasets' ``ds.skip(records)``, with the records skipped never decoded.

    Recent datasets (5.2 here) decodes images in a threaded step that a plain skip comes after: each record
    skipped would be fetched and decoded, and a corrupt one would fail the skip as it failed the pass.
    """
    if records == 0:
        return ds
    if not ds.features or not hasattr(ds, "decode"):  # nothing to decode, or a datasets that decodes on output
        return ds.skip(records)
    undecoded = ds.decode(False).skip(records)
    return undecoded.decode(True, num_threads=DATASETS_DECODE_THREADS if images else 0)


def _type(spec: Any) -> str | None:
    """The feature type in a ``Features.to_dict()`` entry: "Image", "ClassLabel", "Value"..."""
    return spec.get("_type") if isinstance(spec, dict) else None


def not_a_label(spec: Any) -> str | None:
    """What a column of feature ``spec`` (a ``Features.to_dict()`` entry) holds when it cannot be a label: "Image",
    "Value(binary)", "a struct", "a list"...; None for a ClassLabel, an integer or a string, or an unknown type
    (None: no features to go by; what reaches :meth:`ReplaySource._truth` is checked there)."""
    if spec is None:
        return None
    if isinstance(spec, list):  # datasets' shorthand for a list of its one element's feature
        return "a list"
    if not isinstance(spec, dict):
        return repr(spec)
    kind = _type(spec)
    if kind is None:  # a dict of features: a struct
        return "a struct"
    if kind == "ClassLabel":
        return None
    if kind == "Value":
        dtype = str(spec.get("dtype"))
        return None if LABEL_DTYPES.fullmatch(dtype) else f"Value({dtype})"
    return str(kind)


def not_an_image(spec: Any) -> str | None:
    """What a column of feature ``spec`` holds when it cannot hold images (:func:`decode_image` reads an Image,
    binary files or a struct of their bytes and path): "Value(string)" (file names, say), "ClassLabel"...; None
    where it can, or with no features to go by."""
    if spec is None or (isinstance(spec, dict) and _type(spec) is None):  # a struct may be {bytes, path}
        return None
    kind = _type(spec)
    if kind == "Image":
        return None
    if kind == "Value":
        dtype = str(spec.get("dtype"))
        return None if dtype in ("binary", "large_binary") else f"Value({dtype})"
    return "a list" if isinstance(spec, list) else str(kind)


class ReplaySource:
    """Streams ``source.dataset`` / ``source.split``; a corrupt record is skipped and counted."""

    live = False

    def __init__(self, cfg: SourceConfig, startup: StartUp | None = None) -> None:
        self.cfg = cfg
        # For entering, which may wait minutes for datasets to walk a large local folder.
        self._startup = startup
        self.id = cfg.resolved_id()
        self.skipped = 0
        # Shards the reader could not read (also in skipped): passed over, or through datasets, ending the pass.
        self.reader_failures = 0
        self.delivered = 0
        self._dataset: Any = None
        # The dataset from record ``source.skip + n`` on, for reading on after a reader failure; None where the
        # reader deals with its own failures.
        self._reopen: Callable[[int], Any] | None = None
        self._pass_failed = False  # the last pass was ended by READER_FAILURES_IN_A_ROW failures
        self._image_col = ""
        self._label_col: str | None = None
        self._names: list[str] | None = None
        self._warned_truth = False  # about a label column whose values are not labels (logged once)
        self._open_frames: weakref.WeakSet[Generator[Frame, None, None]] = weakref.WeakSet()
        # The stop of the pass being read, which also cuts short a wait to read a hub shard again.
        self._reading_stop = threading.Event()
        # Asked now (of a child process), so datasets' seconds overlap what the daemon loads before the source.
        self._local = local_dataset(cfg.dataset)
        self._query: SplitQuery | None = None
        if self._local is not None or not looks_like_a_path(cfg.dataset):
            self._query = SplitQuery(str(self._local or cfg.dataset), cfg.split)

    def __enter__(self) -> ReplaySource:
        self._dataset = self._open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # datasets' iterables hold the parquet scan in reference cycles, so a pass left unfinished (a
        # source.limit, a stopped daemon) is otherwise freed by the garbage collector at interpreter exit. An
        # Arrow I/O thread then drops the last reference to the Python file the scan read from, cannot take
        # the GIL any more, and the process aborts ("terminate called without an active exception", exit 134):
        # one run in six on a loaded machine. Freed here, the same happens while the interpreter is alive.
        for frames in list(self._open_frames):
            try:
                frames.close()
            except ValueError:  # running in another thread: a pipeline that did not stop in time; leave it
                logger.warning("replay source closed while its frames are still being read")
        self._dataset = self._reopen = None
        if self._query is not None:
            self._query.cancel()
        gc.collect()

    def _open(self) -> Any:
        name, local = self.cfg.dataset, self._local
        if local is None and looks_like_a_path(name):
            raise SourceError(f"source.dataset {name}: no such folder")
        try:
            release_arrow_memory()
            if local is None:
                # A third of a second (pyarrow's too), spent while the child asks the hub, not after.
                prepare_hub_reading()
            found = self._query.result(self._startup) if self._query is not None else None
            ds: Any = None
            if found is not None:
                features = found.features
            else:
                ds = self._stream(str(local) if local is not None else name)
                features = ds.features.to_dict() if ds.features else {}
        except ImportError as exc:
            raise SourceError(f"the replay source needs the replay extra (pip install 'eyed[replay]'): {exc}") from exc
        except UnknownSplit as exc:  # the dataset was read: the field is wrong, and a restart cannot mend it
            raise ConfigError(f"source.split {self.cfg.split}: source.dataset {name} has {exc}") from None
        except ValueError as exc:  # a first shard that is not parquet, and the like
            raise SourceError(f"source.dataset {name}: {exc}") from exc
        except Exception as exc:  # offline hub, missing repo: the same advice for both
            if local is not None:
                raise SourceError(f"source.dataset {name}: cannot read it: {exc}") from exc
            # The child's error arrives as "Kind: message"; an error raised here has only its kind said.
            detail = str(exc).splitlines()[0][:300] if isinstance(exc, DatasetInfoError) else type(exc).__name__
            raise SourceError(
                f"cannot reach the hub for dataset {name} ({detail}): set source.dataset to a local folder of parquet "
                "shards"
            ) from exc
        self._image_col = self.cfg.image_column or self._detect(features, IMAGE_COLUMNS, "image")
        self._label_col = self.cfg.label_column or self._detect_label(features)
        keep = [c for c in (self._image_col, self._label_col) if c]
        if features and (missing := [c for c in keep if c not in features]):
            field = "source.image_column" if missing[0] == self._image_col else "source.label_column"
            raise ConfigError(
                f"{field} {missing[0]}: source.dataset {name} has no such column (it has {', '.join(features)})"
            )
        if self._image_col and (kind := not_an_image(features.get(self._image_col))):
            raise ConfigError(
                f"source.image_column {self._image_col}: its feature is {kind}, not an image (an Image, or binary "
                "image files)"
            )
        if self._label_col and (kind := not_a_label(features.get(self._label_col))):
            # Its values would go out as the truth of every label event: an image column's would carry the frame.
            raise ConfigError(
                f"source.label_column {self._label_col}: its feature is {kind}, not a label (a ClassLabel, an "
                "integer or a string)"
            )
        if self._label_col and _type(features.get(self._label_col)) == "ClassLabel":
            self._names = list(features[self._label_col]["names"])
        logger.info(
            "replaying %s split %s (image column %r, label column %r)",
            name,
            self.cfg.split,
            self._image_col,
            self._label_col,
        )
        if isinstance(found, LocalImages):
            return found.rows(self._image_col, self._label_col, self.cfg.skip)
        if found is not None:
            return ParquetRows(found.files, keep, self.cfg.skip, self._unreadable, self._pause)
        self._reopen = lambda position: self._streamed(ds, features, keep, position)
        return self._streamed(ds, features, keep, 0)

    def _streamed(self, ds: Any, features: dict[str, Any], keep: list[str], position: int) -> Any:
        """datasets' stream ``ds`` from record ``source.skip + position`` on, reduced to the columns eyed reads."""
        from datasets import Image

        images = self._image_col in features
        ds = skip_undecoded(ds, self.cfg.skip + position, images)
        # Decode with OpenCV ourselves: faster than PIL, and a corrupt record becomes a counted skip instead of
        # an exception inside the dataset iterator (where datasets lets us: a hub image folder it decodes itself).
        if images:
            ds = ds.cast_column(self._image_col, Image(decode=False))
        if features:
            ds = ds.select_columns(keep)
        return ds

    def _stream(self, name: str) -> Any:
        """datasets' streaming dataset for what eyed does not read itself (csv, a hub dataset of images...)."""
        from datasets import load_dataset_builder

        keep_torch_out()
        split = self.cfg.split
        stop = self._startup.stop if self._startup is not None else threading.Event()

        def open_split() -> Any:
            # What load_dataset(streaming=True) does, with an unknown split told apart from other failures.
            builder = load_dataset_builder(name)
            check_split(builder, split)
            return builder.as_streaming_dataset(split=split)

        # Asked in a thread of its own: on a stalled network huggingface_hub retries for minutes, and a daemon
        # told to stop meanwhile cannot wait for that.
        job = in_background(open_split, "eyed-replay-open")
        # DatasetInfoError, as a stop while the child process describes the dataset gives.
        return wait_for(job, stop.is_set, DatasetInfoError(f"stopped while waiting for datasets to load {name}"))

    def _pause(self, seconds: float) -> bool:
        """Wait ``seconds`` before reading a hub shard again; False if the replay was stopped meanwhile. Announced
        to the thread's pace listener: a daemon waiting out a network outage (up to a minute at a time) is not
        hung, and its watchdog must not kill it for that."""
        return wait_announced(time.monotonic() + seconds, self._reading_stop)

    def _unreadable(self, path: str, exc: Exception) -> None:
        # A damaged row group costs its own records (parquet.UnreadableRows), each counted; a shard given up
        # whole counts once, as the README says.
        lost = exc.rows if isinstance(exc, UnreadableRows) and exc.group is not None else None
        self.skipped += 1 if lost is None else lost
        self.reader_failures += 1
        then = "the next shard" if lost is None else "the next row group"
        logger.error("cannot read %s, going on with %s: %s", path, then, exc)

    @staticmethod
    def _detect(features: dict[str, Any], candidates: tuple[str, ...], what: str) -> str:
        for col, spec in features.items():
            if _type(spec) == "Image":
                return str(col)
        for col in candidates:
            if col in features:
                return col
        if not features:
            return candidates[0]
        raise ConfigError(f"source.image_column: no {what} column among {', '.join(features)}: set it")

    @staticmethod
    def _detect_label(features: dict[str, Any]) -> str | None:
        """A ClassLabel column, else the first of LABEL_COLUMNS that can be a label: a segmentation dataset's
        "label" is a mask (an Image), whose bytes must not go out as the truth."""
        for col, spec in features.items():
            if _type(spec) == "ClassLabel":
                return str(col)
        return next((c for c in LABEL_COLUMNS if c in features and not not_a_label(features[c])), None)

    @property
    def class_names(self) -> list[str] | None:
        """The dataset's class names in label order (from its ClassLabel feature), if it has them."""
        return self._names

    def _truth(self, record: dict[str, Any]) -> str | None:
        """The record's label as an event carries it: a class name, an integer, or a string of at most
        MAX_TRUTH_CHARS; None for anything else (bytes, a dict, a list: a column that is no label, whose type
        the dataset's features did not tell), so that no event carries a column's contents."""
        if not self._label_col:
            return None
        value = record.get(self._label_col)
        if value is None:
            return None
        if isinstance(value, (int, np.integer)):
            if self._names is not None and 0 <= value < len(self._names):
                return self._names[int(value)]
            return str(int(value))
        if isinstance(value, str):
            return value[:MAX_TRUTH_CHARS]
        if not self._warned_truth:
            self._warned_truth = True
            logger.warning(
                "source.label_column %s holds %s values, not labels: events carry no truth",
                self._label_col,
                type(value).__name__,
            )
        return None

    def _records(self) -> Iterator[dict[str, Any]]:
        """Records of one pass. A record the reader itself cannot parse is counted and read on after, where the
        reader can be (datasets'); a reader that cannot, or fails READER_FAILURES_IN_A_ROW times, ends the pass."""
        self._pass_failed = False
        it = iter(self._dataset)
        position = failed = 0  # records of this pass read or failed on; failures since the last record read
        while True:
            try:
                record = next(it)
            except StopIteration:
                return
            except Exception as exc:  # a broken record or shard: count it rather than crash
                self.skipped += 1
                self.reader_failures += 1
                position, failed = position + 1, failed + 1
                if self._reopen is None or failed >= READER_FAILURES_IN_A_ROW:
                    logger.error("dataset reader failed, ending this pass: %s", exc)
                    self._pass_failed = self._reopen is not None
                    return
                logger.error("dataset reader failed on record %d, reading on after it: %s", position - 1, exc)
                if not self._pause(READER_RETRY_S[min(failed, len(READER_RETRY_S)) - 1]):
                    return
                it = iter(self._reopen(position))
                continue
            position, failed = position + 1, 0
            yield record

    def frames(self, stop: threading.Event | None = None) -> Iterator[Frame]:
        """Frames in dataset order, paced to ``source.fps``, until the end (or ``source.limit``)."""
        frames = self._frames(stop)
        self._open_frames.add(frames)  # for __exit__
        return frames

    def _frames(self, stop: threading.Event | None) -> Generator[Frame, None, None]:
        if self._dataset is None:
            raise RuntimeError("ReplaySource used outside its context manager")
        limit = self.cfg.limit
        pacer = Pacer(self.cfg.fps, stop)
        self._reading_stop = pacer.stop
        while True:
            produced_this_pass = 0
            for record in self._records():
                image = decode_image(record.get(self._image_col))
                if image is None:
                    self.skipped += 1
                    logger.warning("skipped corrupt record (%d so far)", self.skipped)
                    continue
                if not pacer.wait():
                    return
                produced_this_pass += 1
                yield Frame(image, self.delivered, time.time(), time.perf_counter(), self._truth(record))
                self.delivered += 1
                if limit and self.delivered >= limit:
                    return
            if pacer.stop.is_set():
                return
            if self.cfg.loop and self._pass_failed:
                # Another pass would end at the same place: the same first frames, for ever. A failure, not an
                # end: under systemd the daemon is restarted, by which time a network that went away may be back.
                raise SourceError(
                    f"the dataset reader failed {READER_FAILURES_IN_A_ROW} times in a row; not looping over the "
                    "same first frames"
                )
            if self.delivered == 0:
                # Not an end of the replay to report as done (exit 0, and the service stays down looking fine).
                from eyed.sources import no_frames

                skipped = (
                    f" ({self.skipped} record(s) skipped, none readable as an image in {self._image_col!r})"
                    if self.skipped
                    else ""
                )
                raise no_frames(self.cfg, skipped)
            if not self.cfg.loop:
                return
            if produced_this_pass == 0:
                # The dataset changed under a looping replay (its shards replaced or damaged): looping on would
                # spin through records that give nothing, for ever. A failure, so systemd restarts the daemon.
                raise SourceError(
                    f"a pass over the looping replay gave no frame ({self.skipped} record(s) skipped so far); "
                    "the dataset changed since the first pass"
                )
            logger.info("replay reached the end after %d frames; looping", self.delivered)
