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
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eyed.config import Settings
from eyed.model.checkpoint import ModelLoadError, fingerprint, resolve_checkpoint
from eyed.model.export import FEATURES_FORMAT, export_onnx
from eyed.model.onnx_backend import open_session
from eyed.model.preprocess import Preprocessor, PreprocessSpec
from eyed.progress import progress
from eyed.sources import open_recorded

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneOptions:
    output: Path
    epochs: int = 300  # L-BFGS iterations over the whole (cached) feature set
    weight_decay: float = 3e-3  # best of 1e-4..1e-2 on a validation split of CIFAR-10 (README)
    val_fraction: float = 0.1
    flip: bool = True  # also train on horizontally flipped copies
    seed: int = 0
    batch: int = 64


@dataclass(frozen=True)
class Features:
    x: np.ndarray  # (N, D) pooled backbone features
    x_flip: np.ndarray | None  # (N, D) of the mirrored images, or None
    y: np.ndarray  # (N,) class indices
    classes: list[str]


def _cache_key(settings: Settings, folder: Path, flip: bool) -> str:
    src = settings.source
    parts = [str(folder), fingerprint(folder), src.dataset, src.split, src.skip, src.limit, settings.model.small_input]
    return hashlib.sha256(json.dumps([*parts, flip, FEATURES_FORMAT], default=str).encode()).hexdigest()[:16]


def extract_features(settings: Settings, batch: int = 64, flip: bool = True) -> Features:
    """Pooled features of every labelled frame of the configured source, cached under ``model.cache_dir``."""
    folder = resolve_checkpoint(settings.model.id)
    cache = settings.model.cache_dir.expanduser()
    path = cache / "features" / f"{_cache_key(settings, folder, flip)}.npz"
    if path.is_file():
        logger.info("using cached features %s", path)
        data = np.load(path, allow_pickle=False)
        return Features(data["x"], data["x_flip"] if flip else None, data["y"], [str(c) for c in data["classes"]])
    backbone = cache / "onnx" / f"{folder.name}-{fingerprint(folder)}-features-v{FEATURES_FORMAT}.onnx"
    if not backbone.is_file():
        export_onnx(str(folder), backbone, features=True)
    session = open_session(backbone, settings.model)
    spec = PreprocessSpec.from_hf(json.loads((folder / "preprocessor_config.json").read_text()))
    prepare = Preprocessor(spec, settings.model.small_input)
    buffer = np.empty((batch, *prepare.shape), dtype=np.uint8)
    xs: list[np.ndarray] = []
    flips: list[np.ndarray] = []
    truths: list[str] = []
    n = 0
    with open_recorded(settings.source) as source:
        frames = progress(source.frames(), "features", settings.source.limit, "image")
        while True:
            chunk = [f for _, f in zip(range(batch), frames, strict=False) if f.truth is not None]
            if not chunk:
                break
            for i, f in enumerate(chunk):
                prepare(f.image, out=buffer[i])
            xs.append(session.run(None, {"pixels": buffer[: len(chunk)]})[0])
            if flip:
                # Mirroring the crop equals cropping the mirror: the crop is centred.
                flipped = np.ascontiguousarray(buffer[: len(chunk), :, ::-1])
                flips.append(session.run(None, {"pixels": flipped})[0])
            truths.extend(str(f.truth) for f in chunk)
            n += len(chunk)
        names = getattr(source, "class_names", None)
    if not truths:
        raise ValueError(f"{settings.source.dataset}: no labelled frames to train on")
    classes = list(names) if names else sorted(set(truths))
    index = {c: i for i, c in enumerate(classes)}
    features = Features(
        np.concatenate(xs).astype(np.float32),
        np.concatenate(flips).astype(np.float32) if flip else None,
        np.array([index[t] for t in truths], dtype=np.int64),
        classes,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(
        tmp,
        x=features.x,
        x_flip=features.x_flip if features.x_flip is not None else np.zeros((0,), np.float32),
        y=features.y,
        classes=np.array(classes),
    )
    tmp.replace(path)
    return features


def split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, validation) index arrays."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = round(n * val_fraction)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def train_head(features: Features, opts: FinetuneOptions) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """A linear softmax head (weights (C, D), bias (C,)) on the features, and its validation metrics."""
    import torch

    torch.manual_seed(opts.seed)
    train_idx, val_idx = split(len(features.y), opts.val_fraction, opts.seed)
    x_train = features.x[train_idx]
    y_train = features.y[train_idx]
    if features.x_flip is not None:
        x_train = np.concatenate([x_train, features.x_flip[train_idx]])
        y_train = np.concatenate([y_train, y_train])
    # Standardise for a well-conditioned problem, then fold the scaling back into the head, so the saved
    # classifier takes the backbone's raw features.
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0) + 1e-6
    xt = torch.from_numpy((x_train - mean) / std)
    yt = torch.from_numpy(y_train)
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
    metrics["train_accuracy"] = float(((features.x[train_idx] @ w.T + b).argmax(1) == features.y[train_idx]).mean())
    if len(val_idx):
        pred = (features.x[val_idx] @ w.T + b).argmax(1)
        metrics["val_accuracy"] = float((pred == features.y[val_idx]).mean())
    return w.astype(np.float32), b.astype(np.float32), metrics


def save_checkpoint(model_id: str, output: Path, w: np.ndarray, b: np.ndarray, classes: list[str]) -> Path:
    """The backbone with the new head, as a Hugging Face checkpoint in ``output``; returns its ONNX export."""
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
    return export_onnx(str(output), output / "model.onnx")


def run_finetune(settings: Settings, opts: FinetuneOptions) -> dict[str, Any]:
    """Extract (or reuse) features, train the head, save checkpoint and ONNX; returns a report."""
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise ModelLoadError("eyed finetune needs the torch extra (pip install 'eyed[torch,replay]')") from exc
    t0 = time.perf_counter()
    features = extract_features(settings, opts.batch, opts.flip)
    extract_s = time.perf_counter() - t0
    w, b, metrics = train_head(features, opts)
    onnx_path = save_checkpoint(settings.model.id, opts.output, w, b, features.classes)
    report = {
        "base_model": settings.model.id,
        "dataset": settings.source.dataset,
        "split": settings.source.split,
        "skip": settings.source.skip,
        "limit": settings.source.limit,
        "classes": features.classes,
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
        "features_s": round(extract_s, 1),
        "wall_s": round(time.perf_counter() - t0, 1),
        **metrics,
        "onnx": str(onnx_path),
    }
    (opts.output / "finetune.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
