"""``eyed finetune``: a new classification head for the target domain, trained on the device's own CPU.

The ImageNet backbone stays frozen. Its pooled features are extracted once through onnxruntime (with the
daemon's own preprocessing, so training sees what inference will see) and cached on disk. A linear softmax head
is then trained on them with L-BFGS, which takes seconds. The result is saved as a Hugging Face checkpoint with
the new labels in ``id2label``, plus its ONNX export, and runs in the daemon like any other model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eyed.config import ConfigError, Settings, SourceConfig
from eyed.model.checkpoint import (
    TORCH_INSTALL,
    ModelLoadError,
    files_fingerprint,
    fingerprint,
    read_checkpoint,
    recorded_id,
    resolve_checkpoint,
)
from eyed.model.export import FEATURES_FORMAT, export_onnx
from eyed.model.onnx_backend import open_session
from eyed.model.preprocess import Preprocessor, PreprocessSpec
from eyed.outputs import refuse_overwriting, staged, staged_folder
from eyed.progress import progress
from eyed.sources import no_frames, open_recorded
from eyed.sources.replay import local_dataset

logger = logging.getLogger(__name__)

# What a cached .npz holds, or how its frames were read (2: skip counts, 3: unreadable, 4: image folders follow
# EXIF orientation); bump when that changes.
CACHE_FORMAT = 4
# The order of the counts in a cached .npz. "unreadable": reads the dataset reader ended early (a shard it could
# not read, the network gone); what came before it is kept, but never cached.
SKIP_REASONS = ("corrupt", "unlabelled", "unknown_label", "unreadable")


@dataclass(frozen=True)
class FinetuneOptions:
    output: Path
    epochs: int = 300  # L-BFGS iterations over the whole (cached) feature set
    weight_decay: float = 3e-3  # best of 1e-4..1e-2 on a validation split of CIFAR-10 (README)
    val_fraction: float = 0.1
    flip: bool = True  # also train on horizontally flipped copies
    seed: int = 0
    batch: int = 64

    def __post_init__(self) -> None:
        # Checked here, before the long feature extraction, rather than after it.
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"--val-fraction {self.val_fraction}: must be at least 0 and below 1")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"--weight-decay {self.weight_decay}: must be a number, 0 or more")


@dataclass(frozen=True)
class Features:
    x: np.ndarray  # (N, D) pooled backbone features
    x_flip: np.ndarray | None  # (N, D) of the mirrored images, or None
    y: np.ndarray  # (N,) class indices
    classes: list[str]
    skipped: dict[str, int] = field(default_factory=dict)  # frames not in x, by reason (SKIP_REASONS)


class _Rows:
    """A float32 (n, D) matrix that grows in place as batches of rows arrive.

    A list of batches concatenated at the end would hold the features twice at that moment (three times with
    a cast). ``ndarray.resize`` reallocates, which for arrays this large moves pages (mremap on Linux) instead
    of copying them; growing by a quarter keeps the spare tail small, since resize zero-fills it.
    """

    def __init__(self) -> None:
        self.data = np.empty((0, 0), dtype=np.float32)
        self.n = 0

    def append(self, rows: np.ndarray) -> None:
        if not self.data.size:
            self.data = np.empty((max(4 * len(rows), 1), rows.shape[1]), dtype=np.float32)
        end = self.n + len(rows)
        if end > len(self.data):
            self.data.resize((max(end, len(self.data) * 5 // 4), self.data.shape[1]), refcheck=False)
        self.data[self.n : end] = rows
        self.n = end

    def array(self) -> np.ndarray:
        """The rows so far, without the spare capacity (no copy)."""
        self.data.resize((self.n, self.data.shape[1]), refcheck=False)
        return self.data


def dataset_fingerprint(path: Path) -> str:
    """A short hash of a local dataset's files: it changes when a shard is rewritten.

    Hidden folders (.git, .cache) hold no split data, and git or the hub client may touch them at any time.
    """
    if path.is_file():
        return files_fingerprint(path.parent, [path], 16)
    files = [
        p for p in path.rglob("*") if p.is_file() and not any(x.startswith(".") for x in p.relative_to(path).parts)
    ]
    return files_fingerprint(path, files, 16)


def _dataset_identity(dataset: str) -> list[str]:
    """What names the dataset's content: a local path, resolved as the replay source does, with its
    fingerprint; else the hub id."""
    local = local_dataset(dataset)
    return [str(local), dataset_fingerprint(local)] if local is not None else [dataset]


def _cache_key(settings: Settings, src: SourceConfig, folder: Path, flip: bool, spec: PreprocessSpec) -> str:
    """Everything that decides which frames are read, their labels and their features."""
    fields = ("split", "skip", "limit", "image_column", "label_column")  # loop and fps are always off
    parts = {
        # The preprocessing as eyed reads it now: the checkpoint's files alone do not say (crop_pct and resample
        # were once ignored).
        "backbone": [str(folder), fingerprint(folder), settings.model.small_input, FEATURES_FORMAT, spec.to_dict()],
        "dataset": _dataset_identity(src.dataset),
        "source": {k: getattr(src, k) for k in fields},
        "flip": flip,
        "cache": CACHE_FORMAT,
    }
    return hashlib.sha256(json.dumps(parts, default=str, sort_keys=True).encode()).hexdigest()[:16]


def extract_features(settings: Settings, batch: int = 64, flip: bool = True) -> Features:
    """Pooled features of every labelled frame of the configured source, cached under ``model.cache_dir``."""
    # open_recorded reads the source once and unpaced whatever loop and fps say (a loop would put copies of
    # validation images into training); they are set so here too, so that they do not change the cache key.
    src = settings.source.model_copy(update={"loop": False, "fps": 0.0})
    folder = resolve_checkpoint(settings.model.id)
    # Read as export and the daemon read it (a setting eyed does not reproduce is refused here too).
    _, spec = read_checkpoint(folder, settings.model.id)
    cache = settings.model.cache_dir.expanduser()
    path = cache / "features" / f"{_cache_key(settings, src, folder, flip, spec)}.npz"
    if path.is_file():
        logger.info("using cached features %s", path)
        return _load(path, flip)
    backbone = cache / "onnx" / f"{folder.name}-{fingerprint(folder)}-features-v{FEATURES_FORMAT}.onnx"
    if not backbone.is_file():
        export_onnx(str(folder), backbone, features=True)
    session = open_session(backbone, settings.model)
    features = _extract(src, session, Preprocessor(spec, settings.model.small_input), batch, flip)
    if features.skipped["unreadable"]:
        # Cached, a passing failure (a hub dataset over a flaky network) would shrink every later run too.
        logger.warning("the dataset reader failed part-way: these features are not cached")
    else:
        _save(path, features)
    return features


def _extract(src: SourceConfig, session: Any, prepare: Preprocessor, batch: int, flip: bool) -> Features:
    """Runs the backbone over the labelled frames, a full batch at a time; counts the frames it leaves out."""
    buffer = np.empty((batch, *prepare.shape), dtype=np.uint8)
    xs, flips = _Rows(), (_Rows() if flip else None)
    truths: list[str] = []
    skipped = dict.fromkeys(SKIP_REASONS, 0)
    with open_recorded(src) as source:
        names = getattr(source, "class_names", None)
        known = set(names) if names else None
        for frame in progress(source.frames(), "features", src.limit, "image"):
            if frame.truth is None:
                skipped["unlabelled"] += 1
                continue
            if known is not None and frame.truth not in known:
                # e.g. -1, the hub's "no label" (the replay source passes an unknown value on as text)
                skipped["unknown_label"] += 1
                continue
            prepare(frame.image, out=buffer[len(truths) % batch])
            truths.append(frame.truth)
            if len(truths) % batch == 0:
                _embed(session, buffer, xs, flips)
        if len(truths) % batch:
            _embed(session, buffer[: len(truths) % batch], xs, flips)
        skipped["unreadable"] = getattr(source, "reader_failures", 0)
        skipped["corrupt"] = source.skipped - skipped["unreadable"]
    if any(skipped.values()):
        logger.warning(
            "left out %d corrupt records, %d frames without a label and %d with a label not among the classes; "
            "the reader stopped early %d time(s)",
            skipped["corrupt"],
            skipped["unlabelled"],
            skipped["unknown_label"],
            skipped["unreadable"],
        )
    if not truths:
        if skipped["unlabelled"] or skipped["unknown_label"]:
            raise ConfigError(f"eyed finetune needs a labelled source: {src.dataset} had none (left out: {skipped})")
        raise no_frames(src, f" (left out: {skipped})")
    classes = list(names) if names else sorted(set(truths))
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[t] for t in truths], dtype=np.int64)
    return Features(xs.array(), flips.array() if flips else None, y, classes, skipped)


def _embed(session: Any, pixels: np.ndarray, xs: _Rows, flips: _Rows | None) -> None:
    xs.append(session.run(None, {"pixels": pixels})[0])
    if flips is not None:
        # Mirroring the crop equals cropping the mirror: the crop is centred.
        flips.append(session.run(None, {"pixels": np.ascontiguousarray(pixels[:, :, ::-1])})[0])


def _save(path: Path, features: Features) -> None:
    with staged(path) as tmp:
        np.savez(
            tmp,
            x=features.x,
            x_flip=features.x_flip if features.x_flip is not None else np.zeros((0,), np.float32),
            y=features.y,
            classes=np.array(features.classes),
            skipped=np.array([features.skipped[k] for k in SKIP_REASONS], dtype=np.int64),
        )


def _load(path: Path, flip: bool) -> Features:
    data = np.load(path, allow_pickle=False)
    skipped = dict(zip(SKIP_REASONS, (int(v) for v in data["skipped"]), strict=True))
    classes = [str(c) for c in data["classes"]]
    return Features(data["x"], data["x_flip"] if flip else None, data["y"], classes, skipped)


def split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, validation) index arrays."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = round(n * val_fraction)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _standardised(views: list[np.ndarray], rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``rows`` of every view stacked in one float32 array and standardised in place; with its mean and std.

    Gathering each view, concatenating them and standardising out of place would hold the training set three
    or four times over (1.2 GB of peak RSS for 45,000 images with flip, not 0.4 GB), for the same values bit
    for bit.
    """
    n = len(rows)
    x = np.empty((n * len(views), views[0].shape[1]), dtype=np.float32)
    for i, view in enumerate(views):
        # mode="raise" would gather into a temporary copy first; the indices come from split().
        np.take(view, rows, axis=0, out=x[i * n : (i + 1) * n], mode="clip")
    mean = x.mean(axis=0)
    x -= mean
    # The sums of x.std(axis=0), without its temporary copy of x.
    std = np.sqrt(np.einsum("ij,ij->j", x, x) / len(x)) + 1e-6
    x /= std
    return x, mean, std


def _accuracy(x: np.ndarray, y: np.ndarray, rows: np.ndarray, w: np.ndarray, b: np.ndarray) -> float:
    """The head's accuracy on ``rows`` of ``x``, a slice at a time rather than with a copy of all of them."""
    hits = 0
    for start in range(0, len(rows), 8192):
        part = rows[start : start + 8192]
        hits += int(((x[part] @ w.T + b).argmax(1) == y[part]).sum())
    return hits / len(rows)


def train_head(features: Features, opts: FinetuneOptions) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """A linear softmax head (weights (C, D), bias (C,)) on the features, and its validation metrics."""
    import torch

    torch.manual_seed(opts.seed)
    train_idx, val_idx = split(len(features.y), opts.val_fraction, opts.seed)
    if not len(train_idx):
        raise ConfigError(
            f"--val-fraction {opts.val_fraction} holds out all {len(features.y)} images: none left to train on"
        )
    views = [features.x] if features.x_flip is None else [features.x, features.x_flip]
    # Standardise for a well-conditioned problem, then fold the scaling back into the head, so the saved
    # classifier takes the backbone's raw features.
    x_train, mean, std = _standardised(views, train_idx)
    xt = torch.from_numpy(x_train)
    yt = torch.from_numpy(np.tile(features.y[train_idx], len(views)))
    n_classes, dim = len(features.classes), xt.shape[1]
    head = torch.nn.Linear(dim, n_classes, dtype=torch.float32)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    optimiser = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=opts.epochs, history_size=20,
                                  line_search_fn="strong_wolfe")  # fmt: skip

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(xt), yt) + opts.weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    t = time.perf_counter()
    optimiser.step(closure)
    train_s = time.perf_counter() - t
    with torch.no_grad():
        loss = float(torch.nn.functional.cross_entropy(head(xt), yt))
    w = head.weight.detach().numpy() / std
    b = head.bias.detach().numpy() - w @ mean
    metrics: dict[str, Any] = {"train_images": len(train_idx), "val_images": len(val_idx), "loss": loss}
    metrics["train_s"] = round(train_s, 2)
    metrics["train_accuracy"] = _accuracy(features.x, features.y, train_idx, w, b)
    if len(val_idx):
        metrics["val_accuracy"] = _accuracy(features.x, features.y, val_idx, w, b)
    return w.astype(np.float32), b.astype(np.float32), metrics


REPORT = "finetune.json"  # written last: a checkpoint folder without it is one a run did not finish


def save_checkpoint(
    model_id: str, output: Path, w: np.ndarray, b: np.ndarray, classes: list[str], *, name: str | None = None
) -> Path:
    """The backbone with the new head, as a Hugging Face checkpoint in ``output``; returns its ONNX export,
    which records ``name`` (default: ``output``) as its model id."""
    import torch
    from transformers import AutoModelForImageClassification

    folder = resolve_checkpoint(model_id)
    model = AutoModelForImageClassification.from_pretrained(folder)
    model.classifier = torch.nn.Linear(w.shape[1], len(classes))
    with torch.no_grad():
        model.classifier.weight.copy_(torch.from_numpy(w))
        model.classifier.bias.copy_(torch.from_numpy(b))
    model.config.num_labels = len(classes)
    model.config.id2label = dict(enumerate(classes))
    model.config.label2id = {c: i for i, c in enumerate(classes)}
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    shutil.copy(folder / "preprocessor_config.json", output / "preprocessor_config.json")
    return export_onnx(str(output), output / "model.onnx", name=name)


def run_finetune(settings: Settings, opts: FinetuneOptions) -> dict[str, Any]:
    """Extract (or reuse) features, train the head, save checkpoint and ONNX; returns a report."""
    refuse_base_checkpoint(settings.model.id, opts.output)
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise ModelLoadError(f"eyed finetune needs the torch extra ({TORCH_INSTALL}) and the replay extra") from exc
    t0 = time.perf_counter()
    features = extract_features(settings, opts.batch, opts.flip)
    extract_s = time.perf_counter() - t0
    w, b, metrics = train_head(features, opts)
    # The whole checkpoint is written in a temporary folder and moved in at the end, so a failed export leaves
    # the folder as it was, not a new head beside the last run's model.onnx and report.
    with staged_folder(opts.output, last=REPORT) as staging:
        # Its absolute path: as typed, a relative one names another folder from the daemon's working directory,
        # and the onnx backend would warn that model.onnx came from another checkpoint than model.id.
        name = str(opts.output.expanduser().resolve())
        save_checkpoint(settings.model.id, staging, w, b, features.classes, name=name)
        report = _report(settings, opts, features, metrics, extract_s, time.perf_counter() - t0)
        (staging / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report


def refuse_base_checkpoint(model_id: str, output: Path) -> None:
    """OutputError when --output is the model.id folder: the new head would replace the base checkpoint's (its
    ImageNet classes lost). A hub id is not looked up: its snapshot is no folder a user names."""
    local = Path(model_id).expanduser()
    if local.is_dir():
        refuse_overwriting(output, local, "the base checkpoint (model.id)")


def _report(
    settings: Settings,
    opts: FinetuneOptions,
    features: Features,
    metrics: dict[str, Any],
    extract_s: float,
    wall_s: float,
) -> dict[str, Any]:
    local = local_dataset(settings.source.dataset)
    return {
        # Absolute paths for local folders: the report says what was trained from wherever it is read.
        "base_model": recorded_id(settings.model.id),
        "dataset": str(local) if local is not None else settings.source.dataset,
        "split": settings.source.split,
        "skip": settings.source.skip,
        "limit": settings.source.limit,
        # Every record read counts, those left out too: eval --skip this for images training never saw. Not
        # known after a shard the reader could not read (it counts once, whatever its records).
        "next_skip": None
        if features.skipped["unreadable"]
        else settings.source.skip + len(features.y) + sum(features.skipped.values()),
        "classes": features.classes,
        "skipped": features.skipped,
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
        "features_s": round(extract_s, 1),
        "wall_s": round(wall_s, 1),
        **metrics,
        "onnx": str(opts.output / "model.onnx"),
    }
