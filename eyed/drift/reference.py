"""The reference profile: what in-domain frames look like, summarised without pixels and without labels.

A profile holds, for one model on one stream: histograms of every per-frame statistic (bin edges from the
stream's own quantiles), the predicted-class distributions (coarse labels; the most frequent fine classes plus
"other"), a sample of the per-frame rows in blocks of consecutive frames (so thresholds can be calibrated later
on windows like the live ones, see :func:`sample_blocks`), and re-estimated coarse-label priors. Written as
JSON under a top-level ``"priors"`` key too, the profile file is also a priors file for ``model.coarse_priors``.

The coarse labels counted are the plain group sums (:class:`eyed.drift.stats.StatsExtractor`), which no
``model.coarse_priors`` changes, so a profile serves under any priors, its own included. The preprocessing
a profile was made under is recorded, as input statistics and fine classes shift with it: the daemon
refuses a profile made under other preprocessing (:func:`check_small_input`, :func:`check_preprocess_spec`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np

from eyed.config import DEFAULT_WINDOW, MIN_WINDOW, DriftConfig
from eyed.drift.stats import FIELDS, NUMERIC_STATS, FrameStats, kept
from eyed.model.labels import CoarseMapper, estimate_priors

# Schema 2 stores where the sample's blocks lie in the stream; schema 3 counts coarse labels as plain group
# sums and records the preprocessing. Schemas 1 and 2 are still read when their coarse counts mean the same
# (see reference_from_dict).
SCHEMA = 3
KIND = "eyed-drift-reference"
BINS = 10
RESERVOIR = 5000
# Frames per sampled block: the default drift window, so a calibration window fits inside one block.
BLOCK = DEFAULT_WINDOW
# What the coarse counts count (schema 3), for people reading the file.
COARSE_LABEL = "the group with the most probability mass, without prior correction (the same under any priors)"


@dataclass(frozen=True)
class Histogram:
    """Counts over bins ``(-inf, e0], (e0, e1], ..., (e_last, inf)``: ``len(counts) == len(edges) + 1``.

    Right-closed bins put a point mass at the low end (no clipping, a still scene: many exact zeros) into one
    bin of its own instead of smearing it over the first quantile bins.
    """

    edges: np.ndarray
    counts: np.ndarray

    def count(self, values: np.ndarray) -> np.ndarray:
        """Counts of the finite ``values`` over this histogram's bins."""
        return hist_counts(values, self.edges)


def hist_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    values = values[np.isfinite(values)]
    return np.bincount(np.searchsorted(edges, values, side="left"), minlength=len(edges) + 1)


def quantile_edges(values: np.ndarray, bins: int = BINS) -> np.ndarray:
    """Inner bin edges at the ``bins``-quantiles of the finite ``values`` (ties merged), plus one just below
    their minimum and one at their maximum; empty if none.

    The outer two give a value below or above everything in the reference a bin of its own, empty in the
    reference: without them a statistic that is constant in the reference (a still scene without sensor noise)
    has a single edge, and a window at half the light falls into the same bin as the reference, PSI 0.
    Profiles written before these edges keep the edges they hold.
    """
    values = values[np.isfinite(values)]
    if values.size == 0:
        return np.zeros(0)
    # Below the most negative float is -inf, which no profile may hold as an edge: left out below.
    with np.errstate(over="ignore"):
        below = np.nextafter(values.min(), -np.inf)
    edges = np.concatenate([[below], np.quantile(values, np.arange(1, bins) / bins), [values.max()]])
    return np.unique(edges[np.isfinite(edges)])


def fine_index(fine_ids: Sequence[int], top1: np.ndarray) -> np.ndarray:
    """Position of each top-1 class id in ``fine_ids``; ``len(fine_ids)`` (other) when it is not there."""
    other = len(fine_ids)
    size = max(fine_ids, default=-1) + 1
    lookup = np.full(size + 1, other, dtype=np.int64)
    lookup[list(fine_ids)] = np.arange(other)
    ids = top1.astype(np.int64)
    return lookup[np.where((ids >= 0) & (ids < size), ids, size)]


def class_counts(index: np.ndarray, k: int) -> np.ndarray:
    """Counts of the class indices 0..k-1; negative indices (no label) are left out."""
    index = index[index >= 0].astype(np.int64)
    return np.bincount(index, minlength=k)[:k]


@dataclass(frozen=True)
class Reference:
    """An in-memory reference profile; :func:`load_reference` reads one, :meth:`write` writes one."""

    frames: int
    model: str
    source: str
    created: float
    coarse_classes: tuple[str, ...]
    coarse_counts: np.ndarray  # (len(coarse_classes),)
    fine_ids: tuple[int, ...]  # the most frequent top-1 classes, most frequent first
    fine_labels: tuple[str, ...]  # their names ("" when unknown), for people reading the file
    fine_counts: np.ndarray  # (len(fine_ids) + 1,): the last bin is every other class
    histograms: Mapping[str, Histogram]  # one per NUMERIC_STATS with at least one finite value
    reservoir: np.ndarray = field(repr=False)  # (n, len(FIELDS)) rows of the blocks below, in stream order
    priors: Mapping[str, float] | None = None  # coarse class -> prior, estimated without labels
    # (first frame, length) of each run of consecutive stream frames in the reservoir, in order; the lengths
    # add up to its rows. None: a schema 1 profile whose rows were drawn one by one from a longer stream.
    blocks: tuple[tuple[int, int], ...] | None = None
    # {"small_input": model.small_input, "spec": the classifier's PreprocessSpec as a dict}, see
    # preprocess_record; None when unknown (a learned reference, a profile from before schema 3).
    preprocess: Mapping[str, Any] | None = None

    def fine_index(self, top1: np.ndarray) -> np.ndarray:
        """Index into ``fine_counts`` of each top-1 class id (``len(fine_ids)`` = other)."""
        return fine_index(self.fine_ids, top1)

    def column(self, name: str) -> np.ndarray:
        """One column of the reservoir."""
        return self.reservoir[:, FIELDS.index(name)]

    def summary(self) -> dict[str, float]:
        """Mean of each numeric statistic over the reservoir (NaN-free), for people and charts."""
        out = {}
        for name in NUMERIC_STATS:
            col = self.column(name)
            col = col[np.isfinite(col)]
            if col.size:
                out[name] = float(col.mean())
        return out

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            # A reference read from a schema 1 file without blocks is written back as one.
            "schema": SCHEMA if self.blocks is not None else 1,
            "kind": KIND,
            "frames": self.frames,
            "model": self.model,
            "source": self.source,
            "created": self.created,
            "coarse": {
                "classes": list(self.coarse_classes),
                "counts": _ints(self.coarse_counts),
                "label": COARSE_LABEL,
            },
            "fine": {
                "ids": list(self.fine_ids),
                "labels": list(self.fine_labels),
                "counts": _ints(self.fine_counts),
            },
            "histograms": {
                name: {"edges": [float(e) for e in h.edges], "counts": _ints(h.counts)}
                for name, h in self.histograms.items()
            },
            "reservoir": {
                "size": int(self.reservoir.shape[0]),
                "columns": {name: _column_json(name, self.reservoir[:, i]) for i, name in enumerate(FIELDS)},
            },
        }
        if self.blocks is not None:
            data["reservoir"]["blocks"] = [[int(start), int(length)] for start, length in self.blocks]
        if self.preprocess is not None:
            data["preprocess"] = _plain(self.preprocess)
        if self.priors is not None:
            data["priors_method"] = (
                "mean coarse group mass over this stream, refined so each class wins the argmax equally often "
                "(eyed.model.labels.estimate_priors); no labels used"
            )
            data["priors"] = {c: float(v) for c, v in self.priors.items()}
        return data

    def write(self, path: Path) -> Path:
        """Write the profile as JSON (no pixels: statistics and class counts only)."""
        path.write_text(json.dumps(self.to_dict(), separators=(",", ":")) + "\n", encoding="utf-8")
        return path


def _ints(values: np.ndarray) -> list[int]:
    return [int(v) for v in values]


def _column_json(name: str, values: np.ndarray) -> list[Any]:
    if name in ("top1", "coarse"):
        return [int(v) for v in values]
    # Six significant digits keep the reservoir a few hundred kB; the extractor measures to no more (kept).
    return [None if not math.isfinite(v) else kept(v) for v in values.tolist()]


def load_reference(path: Path) -> Reference:
    """Read a profile written by :meth:`Reference.write`; ValueError says what is wrong with a bad file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"drift.reference {path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError:
        raise ValueError(f"drift.reference {path}: not a drift reference (not UTF-8 text)") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"drift.reference {path}: not JSON ({exc})") from exc
    try:
        return reference_from_dict(data)
    except ValueError as exc:
        raise ValueError(f"drift.reference {path}: {exc}") from exc


def reference_from_dict(data: Any) -> Reference:
    """Validate and convert the JSON form; ValueError names the first problem and the field it is in.

    Every number a metric reads is checked (finite edges, counts that are whole and not negative, class
    indices in range): a bad one would not fail loudly later, it would leave a metric unable to fire.
    """
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    if data.get("kind") != KIND:
        raise ValueError(f"not a drift reference (kind {data.get('kind')!r}, expected {KIND!r})")
    schema = data.get("schema")
    if schema not in (1, 2, SCHEMA):
        raise ValueError(f"unsupported schema {schema!r} (this eyed reads schemas 1 to {SCHEMA})")
    if schema < SCHEMA and data.get("priors") is not None:
        # Such a profile was made with an ImageNet model's mapping (a profile holds priors only then), and its
        # coarse counts are labels after the prior correction in force when it was made: compared with group
        # sums they would report drift on in-domain frames.
        raise ValueError(
            f"a schema {schema} profile from an older eyed, whose coarse counts depend on the model.coarse_priors "
            "it was made with; drift now counts coarse labels the same under any priors: run `eyed profile` again"
        )
    missing = [key for key in ("frames", "coarse", "fine", "histograms", "reservoir") if key not in data]
    if missing:
        raise ValueError(f"missing key {missing[0]!r}")
    with _section("coarse"):
        coarse_classes = tuple(str(c) for c in data["coarse"]["classes"])
        coarse_counts = _counts(data["coarse"]["counts"])  # all 0: no frame had a coarse label
        if coarse_counts.shape != (len(coarse_classes),):
            raise ValueError("counts and classes differ in length")
    with _section("fine"):
        fine = data["fine"]
        fine_ids = _class_ids(fine["ids"])
        fine_labels = tuple(str(s) for s in fine.get("labels", [""] * len(fine_ids)))
        fine_counts = _counts(fine["counts"], positive_sum=True)
        if fine_counts.shape != (len(fine_ids) + 1,) or len(fine_labels) != len(fine_ids):
            raise ValueError("needs one count per id plus 'other', and one label per id")
    histograms = {}
    if not isinstance(data["histograms"], dict):
        raise ValueError("histograms: not an object of statistic: histogram")
    for name, h in data["histograms"].items():
        with _section(f"histograms.{name}"):
            if name not in NUMERIC_STATS:
                raise ValueError("unknown statistic")
            edges = np.asarray(h["edges"], dtype=np.float64)
            if edges.ndim != 1 or not np.all(np.isfinite(edges)):
                raise ValueError("edges must be a list of finite numbers")
            counts = _counts(h["counts"], positive_sum=True)
            if counts.shape != (edges.size + 1,) or np.any(np.diff(edges) <= 0):
                raise ValueError("needs increasing edges and one more count than edges")
            histograms[name] = Histogram(edges, counts)
    with _section("reservoir"):
        columns = data["reservoir"]["columns"]
        absent = [name for name in FIELDS if name not in columns]
        if absent:
            raise ValueError(f"missing columns {', '.join(absent)}")
        arrays = [
            np.asarray([math.nan if v is None else v for v in columns[name]], dtype=np.float64) for name in FIELDS
        ]
        if len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 1 or arrays[0].size == 0:
            raise ValueError("empty, or columns of different lengths")
        reservoir = np.column_stack(arrays)
        _check_class_column("top1", arrays[FIELDS.index("top1")], 0, None)
        _check_class_column("coarse", arrays[FIELDS.index("coarse")], -1, len(coarse_classes) - 1)
    with _section("metadata"):
        frames = data["frames"]
        if not is_int(frames) or frames < 1:
            raise ValueError(f"frames must be a whole number of at least 1, not {frames!r}")
        if frames < reservoir.shape[0]:
            raise ValueError("frames is smaller than the reservoir")
    blocks: tuple[tuple[int, int], ...] | None
    if schema == 1:
        # Schema 1 kept every frame of a short stream (one block) and a uniform sample of a longer one, whose
        # rows are far apart: the monitor then warns that its thresholds are too tight.
        blocks = ((0, reservoir.shape[0]),) if frames == reservoir.shape[0] else None
    else:
        with _section("reservoir.blocks"):
            blocks = tuple((int(s), int(n)) for s, n in data["reservoir"]["blocks"])
            _check_blocks(blocks, reservoir.shape[0], frames)
    priors = None
    if data.get("priors") is not None:
        with _section("priors"):
            values = dict(data["priors"])
            if not all(is_number(v) and math.isfinite(v) and v > 0 for v in values.values()):
                raise ValueError("priors must be positive finite numbers")
            priors = {str(c): float(v) for c, v in values.items()}
    preprocess = None
    if data.get("preprocess") is not None:
        with _section("preprocess"):
            preprocess = _preprocess(data["preprocess"])
    with _section("metadata"):
        return Reference(
            frames=frames,
            model=str(data.get("model", "")),
            source=str(data.get("source", "")),
            created=float(data.get("created", 0.0)),
            coarse_classes=coarse_classes,
            coarse_counts=coarse_counts,
            fine_ids=fine_ids,
            fine_labels=fine_labels,
            fine_counts=fine_counts,
            histograms=histograms,
            reservoir=reservoir,
            priors=priors,
            blocks=blocks,
            preprocess=preprocess,
        )


def _check_blocks(blocks: Sequence[tuple[int, int]], rows: int, frames: int) -> None:
    end = 0
    for start, length in blocks:
        if length <= 0 or start < end:
            raise ValueError("needs non-empty blocks in stream order, not overlapping")
        end = start + length
    if end > frames:
        raise ValueError("a block ends after the last frame")
    if sum(length for _, length in blocks) != rows:
        raise ValueError("the block lengths do not add up to the reservoir's rows")


def is_int(value: Any) -> TypeGuard[int]:
    """A JSON integer (json gives bool for true/false, which int would take)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A JSON number (not true/false)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _counts(values: Any, *, positive_sum: bool = False) -> np.ndarray:
    """Counts as a profile stores them: whole numbers, none negative, adding up to more than 0 if asked."""
    if not isinstance(values, list) or not all(is_int(v) for v in values):
        raise ValueError("counts must be a list of whole numbers")
    counts = np.asarray(values, dtype=np.int64)
    if np.any(counts < 0):
        raise ValueError(f"counts must not be negative (found {int(counts.min())})")
    if positive_sum and counts.sum() <= 0:
        raise ValueError("counts add up to 0")
    return counts


def _class_ids(values: Any) -> tuple[int, ...]:
    """Fine class ids: distinct whole numbers, none negative."""
    if not isinstance(values, list) or not all(is_int(v) and v >= 0 for v in values):
        raise ValueError("ids must be a list of class ids (whole numbers, none negative)")
    if len(set(values)) != len(values):
        raise ValueError(f"ids must be distinct, {sorted({v for v in values if values.count(v) > 1})} repeat")
    return tuple(values)


def _check_class_column(name: str, values: np.ndarray, low: int, high: int | None) -> None:
    """A reservoir column of class indices: whole numbers from ``low`` to ``high`` (no upper bound if None)."""
    ok = np.isfinite(values) & (values == np.floor(values)) & (values >= low)
    if high is not None:
        ok &= values <= high
    if not ok.all():
        row = int(np.argmin(ok))
        value = "null" if math.isnan(values[row]) else f"{values[row]:g}"
        allowed = f"from {low} to {high}" if high is not None else f"of {low} or more"
        raise ValueError(f"column {name}: row {row} is {value}, needs a whole number {allowed}")


def _preprocess(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict) or not isinstance(data.get("small_input"), str):
        raise ValueError('needs an object with "small_input" (a string) and "spec"')
    spec = data.get("spec")
    if spec is not None and not isinstance(spec, dict):
        raise ValueError('"spec" must be an object or null')
    return {"small_input": data["small_input"], "spec": spec}


def _plain(value: Any) -> Any:
    """``value`` as JSON gives it back (lists for tuples), so a recorded value compares with a live one."""
    return json.loads(json.dumps(value))


def preprocess_spec(classifier: object) -> dict[str, Any] | None:
    """The preprocessing spec a classifier runs (its ``prepare.spec``, eyed.model.preprocess.PreprocessSpec) as
    a dict; None for a classifier that does not say."""
    spec = getattr(getattr(classifier, "prepare", None), "spec", None)
    to_dict = getattr(spec, "to_dict", None)
    return _plain(to_dict()) if callable(to_dict) else None


def preprocess_record(small_input: str, spec: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a profile records of the preprocessing it was made under: ``model.small_input`` and the
    classifier's preprocessing spec (size, crop, mean, std; None when the classifier does not say)."""
    return {"small_input": small_input, "spec": None if spec is None else _plain(dict(spec))}


def check_small_input(reference: Reference, small_input: str) -> None:
    """ValueError naming ``model.small_input`` when the reference was profiled under another setting: it
    changes the model's input for frames smaller than the crop, and with it the fine classes and confidences."""
    made = reference.preprocess.get("small_input") if reference.preprocess is not None else None
    if made is not None and made != small_input:
        raise ValueError(
            f"profiled with model.small_input = {made!r}, this configuration has {small_input!r}: set "
            f"model.small_input = {made!r}, or run `eyed profile` again with {small_input!r}"
        )


def check_preprocess_spec(reference: Reference, spec: Mapping[str, Any], model: str) -> None:
    """ValueError when the reference was profiled with a model that prepares its input differently (other
    size, crop, mean or std): its class and confidence distributions do not hold for this one."""
    made = reference.preprocess.get("spec") if reference.preprocess is not None else None
    if made is not None and _plain(made) != _plain(dict(spec)):
        raise ValueError(
            f"profiled with a model whose preprocessing is {_plain(made)}, while {model} (model.id / model.onnx) "
            f"has {_plain(dict(spec))}: run `eyed profile` again with this model"
        )


def sample_blocks(frames: int, size: int, block: int, rng: np.random.Generator) -> tuple[tuple[int, int], ...]:
    """(first frame, length) of the runs of consecutive frames a profile of ``frames`` frames keeps, at most
    ``size`` frames in all, in stream order; adjacent blocks are merged into one run.

    Why blocks: thresholds are calibrated on windows taken from this sample, and they must vary as much as live
    windows do. A camera's neighbouring frames show the same scene, so a live window of 250 frames holds one or
    two scenes. A sample of single frames from a long stream puts frames far apart side by side: a window of
    them mixes many scenes, varies far less than a live window, and the thresholds come out too tight (the
    longer the reference, the tighter). Blocks at least a window long keep a live window's contiguity, and the
    total stays ``size`` rows however long the stream.

    Why one block at a random place in each of ``size // block`` equal stretches of the stream, not blocks
    drawn anywhere: the few blocks that fit then cover the whole reference (morning to evening) instead of
    possibly bunching in one part of it, while the random offsets keep them unbiased.
    """
    if frames <= size:
        return ((0, frames),) if frames > 0 else ()
    block = max(1, min(block, size))
    k = size // block
    edges = np.arange(k + 1, dtype=np.int64) * frames // k  # each stretch is longer than a block: frames > size
    runs: list[tuple[int, int]] = []
    for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True):
        start = int(rng.integers(lo, hi - block + 1))
        if runs and sum(runs[-1]) == start:
            runs[-1] = (runs[-1][0], runs[-1][1] + block)
        else:
            runs.append((start, block))
    return tuple(runs)


def profile_blocks(cfg: DriftConfig, frames: int, seconds: float) -> tuple[int, int]:
    """(frames per block, reservoir rows) for a profile of ``frames`` frames over ``seconds`` that windows of
    ``cfg`` will be calibrated on.

    A block must hold a window: ``cfg.window`` frames, or with ``cfg.window_s`` the frames that many seconds
    held in the profiled stream (a profile made at fps 0 runs faster than a camera, so its blocks come out
    longer than needed, which only costs spread). At most RESERVOIR frames; the reservoir keeps four blocks at
    least, so long windows do not leave one block to stand for the whole stream.
    """
    if cfg.window_s is None:
        block = cfg.window_frames
    elif seconds > 0:
        block = min(RESERVOIR, max(MIN_WINDOW, math.ceil((frames - 1) / seconds * cfg.window_s) + 1))
    else:
        block = RESERVOIR  # no times (a single frame): blocks as long as they can be
    return block, min(4 * RESERVOIR, max(RESERVOIR, 4 * block))


@contextmanager
def _section(name: str) -> Iterator[None]:
    """Re-raise any conversion error inside one part of the file as a ValueError that names the part."""
    try:
        yield
    except KeyError as exc:
        raise ValueError(f"{name}: missing key {exc}") from None
    except (TypeError, ValueError, AttributeError, OverflowError) as exc:  # Overflow: an int past int64
        raise ValueError(f"{name}: {exc}") from None


class ProfileBuilder:
    """Accumulates :class:`FrameStats` (and, for priors, the coarse group masses) into a :class:`Reference`.

    Keeps every row (10 floats) and every frame's group masses (10 floats): 80 bytes a frame, 4 MB for 50,000
    frames. The masses are needed because the balanced prior estimate looks at all frames at once; the rows
    let the histograms count the whole stream with edges from its own quantiles. The profile itself keeps
    ``reservoir`` rows at most, in blocks of ``block`` consecutive frames (:func:`sample_blocks`); ``block``
    should be at least the ``drift.window`` the profile will be used with.
    """

    def __init__(
        self,
        coarse_classes: Sequence[str] = (),
        *,
        top_classes: int = 20,
        bins: int = BINS,
        reservoir: int = RESERVOIR,
        block: int = BLOCK,
        mapper: CoarseMapper | None = None,
        labels: Sequence[str] | None = None,
        model: str = "",
        source: str = "",
        seed: int = 0,
        preprocess: Mapping[str, Any] | None = None,
    ) -> None:
        if mapper is not None and coarse_classes and tuple(coarse_classes) != mapper.classes:
            raise ValueError("coarse_classes and the mapper's classes differ")
        self.coarse_classes = tuple(coarse_classes) if coarse_classes else (mapper.classes if mapper else ())
        self.top_classes = top_classes
        self.bins = bins
        self.reservoir_size = reservoir
        self.block = block
        self.mapper = mapper
        self.labels = list(labels) if labels is not None else None
        self.model = model
        self.source = source
        self.seed = seed
        self.preprocess = preprocess  # see preprocess_record
        self._rows = np.empty((1024, len(FIELDS)), dtype=np.float64)
        self._n = 0
        self._masses: list[np.ndarray] = []

    @property
    def frames(self) -> int:
        return self._n

    def add(self, stats: FrameStats, probs: np.ndarray | None = None) -> None:
        """One frame; ``probs`` (its softmax) is required when the builder has a mapper (for priors)."""
        if self.mapper is not None:
            if probs is None:
                raise ValueError("this ProfileBuilder estimates priors: pass each frame's probabilities")
            self._masses.append(np.atleast_2d(self.mapper.masses(probs)))
        self.add_rows(np.asarray([stats], dtype=np.float64))

    def add_many(self, stats: Sequence[FrameStats], probs: np.ndarray | None = None) -> None:
        """A batch of frames; ``probs`` is their (N, classes) softmax, required when the builder has a mapper."""
        if not stats:
            return
        if self.mapper is not None:
            if probs is None or len(probs) != len(stats):
                raise ValueError("this ProfileBuilder estimates priors: pass one probability row per frame")
            self._masses.append(self.mapper.masses(np.atleast_2d(probs)))
        self.add_rows(np.asarray(stats, dtype=np.float64))

    def add_rows(self, rows: np.ndarray) -> None:
        """Several rows at once, each in ``FIELDS`` order (what the monitor's window buffer holds)."""
        rows = np.atleast_2d(rows)
        need = self._n + rows.shape[0]
        if need > self._rows.shape[0]:
            grown = np.empty((max(need, 2 * self._rows.shape[0]), len(FIELDS)), dtype=np.float64)
            grown[: self._n] = self._rows[: self._n]
            self._rows = grown
        self._rows[self._n : need] = rows
        self._n = need

    def build(self, created: float | None = None) -> Reference:
        """The profile of everything added so far; ValueError when nothing was."""
        if self._n == 0:
            raise ValueError("cannot build a drift reference from an empty stream")
        rows = self._rows[: self._n]
        top1 = rows[:, FIELDS.index("top1")].astype(np.int64)
        ids, counts = np.unique(top1, return_counts=True)
        # Most frequent first; equal counts by class id, so the choice does not depend on stream order.
        order = np.lexsort((ids, -counts))[: self.top_classes]
        fine_ids = tuple(int(i) for i in ids[order])
        labels = self.labels
        fine_labels = tuple(labels[i] if labels is not None and 0 <= i < len(labels) else "" for i in fine_ids)
        histograms = {}
        for name in NUMERIC_STATS:
            values = rows[:, FIELDS.index(name)]
            if np.isfinite(values).any():
                edges = quantile_edges(values, self.bins)
                histograms[name] = Histogram(edges, hist_counts(values, edges))
        blocks = sample_blocks(self._n, self.reservoir_size, self.block, np.random.default_rng(self.seed))
        keep = np.concatenate([np.arange(start, start + length) for start, length in blocks])
        priors = None
        if self.mapper is not None and self._masses:
            # estimate_priors wants probability vectors and maps them with mapper.masses; an identity mapper
            # over the coarse classes lets it take the masses kept here, with no change to labels.py.
            k = len(self.mapper.classes)
            identity = CoarseMapper(self.mapper.classes, np.eye(k, dtype=np.float32), None)
            values = estimate_priors(identity, [np.concatenate(self._masses)])
            priors = {c: float(v) for c, v in zip(self.mapper.classes, values, strict=True)}
        return Reference(
            frames=self._n,
            model=self.model,
            source=self.source,
            created=time.time() if created is None else created,
            coarse_classes=self.coarse_classes,
            coarse_counts=class_counts(rows[:, FIELDS.index("coarse")].astype(np.int64), len(self.coarse_classes)),
            fine_ids=fine_ids,
            fine_labels=fine_labels,
            fine_counts=np.bincount(fine_index(fine_ids, top1), minlength=len(fine_ids) + 1),
            histograms=histograms,
            reservoir=rows[keep],
            priors=priors,
            blocks=blocks,
            preprocess=self.preprocess,
        )
