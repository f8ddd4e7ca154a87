"""``eyed eval`` and ``eyed priors``: accuracy on a labelled replay source, and label-free prior estimation."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from eyed.config import Settings
from eyed.model import load_classifier
from eyed.model.labels import estimate_priors, save_priors
from eyed.model.postprocess import softmax
from eyed.sources import open_recorded
from eyed.types import Classifier, Frame

logger = logging.getLogger(__name__)

BATCH = 32


def _batches(frames: Iterator[Frame], size: int) -> Iterator[list[Frame]]:
    batch: list[Frame] = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def classify_stream(settings: Settings, classifier: Classifier) -> Iterator[tuple[list[Frame], np.ndarray]]:
    """(frames, probabilities) batches over the configured source, with a progress line on stderr."""
    total = settings.source.limit
    done = 0
    with open_recorded(settings.source) as src:
        for batch in _batches(src.frames(), BATCH):
            tensors = np.stack([classifier.prepare(f.image) for f in batch])
            yield batch, softmax(classifier.logits(tensors))  # type: ignore[attr-defined]
            done += len(batch)
            if sys.stderr.isatty():
                print(f"\r{done}{'/' + str(total) if total else ''} frames", end="", file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        print(file=sys.stderr)


def run_priors(settings: Settings, output: Path) -> np.ndarray:
    """Mean group mass of the model's outputs over the configured source; written to ``output``."""
    classifier = load_classifier(settings.model)
    mapper = classifier.post.mapper  # type: ignore[attr-defined]
    if mapper is None:
        raise ValueError(f"{settings.model.id} has no coarse mapping: nothing to estimate")
    n = 0

    def probs() -> Iterator[np.ndarray]:
        nonlocal n
        for frames, p in classify_stream(settings, classifier):
            n += len(frames)
            yield p

    priors = estimate_priors(mapper, probs())
    meta = {
        "space": settings.model.coarse,
        "model": settings.model.id,
        "dataset": settings.source.dataset,
        "split": settings.source.split,
        "skip": settings.source.skip,
        "frames": n,
        "small_input": settings.model.small_input,
        "method": "mean group mass, refined so each class wins the argmax equally often; no labels used",
    }
    save_priors(output, mapper.classes, priors, meta)
    logger.info("priors from %d frames written to %s", n, output)
    return priors


def confusion(truth: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    m = np.zeros((k, k), dtype=np.int64)
    np.add.at(m, (truth, pred), 1)
    return m


def format_confusion(m: np.ndarray, classes: list[str]) -> str:
    short = [c[:6] for c in classes]
    lines = ["truth \\ pred " + " ".join(f"{c:>6}" for c in short)]
    for name, row in zip(classes, m, strict=True):
        lines.append(f"{name[:12]:<12} " + " ".join(f"{v:>6d}" for v in row))
    return "\n".join(lines)


def run_eval(settings: Settings, skip: int = 0) -> dict[str, Any]:
    """Accuracy of the configured model on the configured labelled source (coarse space for ImageNet models)."""
    if skip:
        settings = settings.model_copy(update={"source": settings.source.model_copy(update={"skip": skip})})
    classifier = load_classifier(settings.model)
    post = classifier.post  # type: ignore[attr-defined]
    mapper = post.mapper
    classes = list(mapper.classes) if mapper is not None else list(post.labels)
    index = {c: i for i, c in enumerate(classes)}
    fine_group = mapper.membership.argmax(axis=1) if mapper is not None else None
    fine_mapped = mapper.membership.any(axis=1) if mapper is not None else None
    truths: list[int] = []
    preds: dict[str, list[np.ndarray]] = {"corrected": [], "group-sum": [], "top-1 lookup": []}
    unknown = 0
    t0 = time.perf_counter()
    n = 0
    for frames, probs in classify_stream(settings, classifier):
        n += len(frames)
        keep = [i for i, f in enumerate(frames) if f.truth in index]
        unknown += len(frames) - len(keep)
        if not keep:
            continue
        p = probs[keep]
        truths.extend(index[frames[i].truth] for i in keep)
        if mapper is None:
            preds["corrected"].append(p.argmax(axis=1))
            continue
        preds["corrected"].append(mapper.scores(p).argmax(axis=1))
        preds["group-sum"].append(mapper.scores(p, corrected=False).argmax(axis=1))
        top = p.argmax(axis=1)
        assert fine_mapped is not None and fine_group is not None
        # A top-1 class outside every group counts as wrong: that is what a lookup-only system would report.
        preds["top-1 lookup"].append(np.where(fine_mapped[top], fine_group[top], -1))
    wall = time.perf_counter() - t0
    if not truths:
        raise ValueError("no frame had a ground-truth label in the model's label space")
    y = np.asarray(truths)
    results = {name: np.concatenate(v) for name, v in preds.items() if v}
    acc = {name: float((v == y).mean()) for name, v in results.items()}
    main = results["corrected"]
    per_class = {c: float((main[y == i] == i).mean()) if (y == i).any() else None for c, i in index.items()}
    cm = confusion(y, np.clip(main, 0, len(classes) - 1), len(classes))
    space = "coarse" if mapper is not None else "native"
    lines = [
        f"model {settings.model.id} ({classifier.backend}), {space} labels, {len(y)} frames "
        f"from {settings.source.dataset}:{settings.source.split} (skip {settings.source.skip})",
    ]
    if mapper is not None:
        lines.append(f"priors: {settings.model.coarse_priors}")
        lines += [f"  accuracy {name:<13} {value:.4f}" for name, value in acc.items()]
    lines.append("per class: " + ", ".join(f"{c} {v:.3f}" for c, v in per_class.items() if v is not None))
    lines.append(format_confusion(cm, classes))
    if unknown:
        lines.append(f"{unknown} frames had a truth outside the label space and were not scored")
    fps = n / wall
    lines.append(f"accuracy={acc['corrected']:.4f} fps={fps:.1f} frames={len(y)} space={space}")
    return {
        "model": settings.model.id,
        "backend": classifier.backend,
        "space": space,
        "frames": len(y),
        "accuracy": acc["corrected"],
        "accuracies": acc,
        "per_class": per_class,
        "classes": classes,
        "confusion": cm.tolist(),
        "fps": fps,
        "text": "\n".join(lines),
    }
