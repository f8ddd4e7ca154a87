"""``eyed eval``, ``priors``, ``profile`` and ``drift``: accuracy on a labelled replay source, label-free prior
estimation, the drift reference and offline drift windows, all run through :class:`eyed.offline.OfflineRunner`."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from eyed.config import MIN_WINDOW, ConfigError, Settings
from eyed.model.labels import estimate_priors, save_priors
from eyed.model.postprocess import softmax
from eyed.offline import OfflineRunner
from eyed.outputs import pyplot, save_figure, staged
from eyed.progress import progress
from eyed.sources import describe, no_frames, open_recorded
from eyed.types import Frame, Prediction

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


def predictions(
    settings: Settings, runner: OfflineRunner, *, paced: bool = False
) -> Iterator[tuple[list[Frame], list[Prediction]]]:
    """(frames, predictions) batches over one pass of the configured source (at ``source.fps`` if ``paced``,
    else at full speed), with a progress bar on a terminal."""
    with open_recorded(settings.source, paced=paced) as src:
        for batch in _batches(progress(src.frames(), "frames", settings.source.limit), BATCH):
            yield batch, runner.predict(batch)


def run_priors(settings: Settings, output: Path) -> np.ndarray:
    """Mean group mass of the model's outputs over the configured source; written to ``output``."""
    with OfflineRunner(settings) as runner:
        mapper = runner.classifier.post.mapper  # type: ignore[attr-defined]
        if mapper is None or mapper.native:
            raise ConfigError(
                f"{runner.classifier.name}: its labels do not map to model.coarse ({settings.model.coarse}) through "
                "groups of fine classes, so there are no priors to estimate"
            )
        n = 0

        def probs() -> Iterator[np.ndarray]:
            nonlocal n
            for frames, preds in predictions(settings, runner):
                n += len(frames)
                yield np.stack([p.probs for p in preds])

        try:
            priors = estimate_priors(mapper, probs())
        except ValueError:
            if n == 0:  # the empty stream it cannot estimate from
                raise no_frames(settings.source) from None
            raise
        # What ran: the model id recorded in model.onnx when that is set, not model.id.
        model_name = runner.classifier.name
    meta = {
        "space": settings.model.coarse,
        "model": model_name,
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


class _Scorer:
    """One model's predictions over an eval stream, in its own label space (coarse for ImageNet models)."""

    def __init__(self, runner: OfflineRunner, settings: Settings) -> None:
        self.settings = settings
        self.runner = runner
        post = runner.classifier.post  # type: ignore[attr-defined]
        self.mapper = post.mapper
        self.classes = list(self.mapper.classes) if self.mapper is not None else list(post.labels)
        self.index = {c: i for i, c in enumerate(self.classes)}
        self.truths: list[int] = []
        self.preds: dict[str, list[np.ndarray]] = {"corrected": [], "group-sum": [], "top-1 lookup": []}
        self.unknown = 0
        self.seconds = 0.0  # preprocessing and inference only, so models compare on their own cost
        self.frames = 0
        if self.mapper is not None:
            self._fine_group = self.mapper.membership.argmax(axis=1)
            self._fine_mapped = self.mapper.membership.any(axis=1)

    def add(self, frames: list[Frame]) -> None:
        t0 = time.perf_counter()
        probs = softmax(self.runner.logits(frames))
        self.seconds += time.perf_counter() - t0
        self.frames += len(frames)
        keep = [i for i, f in enumerate(frames) if f.truth in self.index]
        self.unknown += len(frames) - len(keep)
        if not keep:
            return
        p = probs[keep]
        self.truths.extend(self.index[str(frames[i].truth)] for i in keep)
        if self.mapper is None:
            self.preds["corrected"].append(p.argmax(axis=1))
            return
        self.preds["corrected"].append(self.mapper.scores(p).argmax(axis=1))
        if self.mapper.native:  # one label per class: no priors, and the other two ways agree with it
            return
        self.preds["group-sum"].append(self.mapper.scores(p, corrected=False).argmax(axis=1))
        top = p.argmax(axis=1)
        # A top-1 class outside every group counts as wrong: that is what a lookup-only system would report.
        self.preds["top-1 lookup"].append(np.where(self._fine_mapped[top], self._fine_group[top], -1))

    def report(self) -> dict[str, Any]:
        model = self.settings.model
        if self.frames == 0:
            raise no_frames(self.settings.source)
        if not self.truths:
            shown = ", ".join(self.classes[:10]) + (", ..." if len(self.classes) > 10 else "")
            raise ConfigError(
                f"eyed eval needs a labelled source: none of the {self.frames} frames of "
                f"{describe(self.settings.source)} had a label among {self.runner.classifier.name}'s classes ({shown})"
            )
        y = np.asarray(self.truths)
        results = {name: np.concatenate(v) for name, v in self.preds.items() if v}
        acc = {name: float((v == y).mean()) for name, v in results.items()}
        main = results["corrected"]
        per_class = {c: float((main[y == i] == i).mean()) if (y == i).any() else None for c, i in self.index.items()}
        cm = confusion(y, np.clip(main, 0, len(self.classes) - 1), len(self.classes))
        # A model trained on the coarse classes (eyed finetune) has an identity mapping: its labels are native.
        native = self.mapper is None or self.mapper.native
        space = "native" if native else "coarse"
        backend = self.runner.classifier.backend
        # The torch backend runs model.id whatever model.onnx says.
        name = f"{model.onnx if model.onnx and backend == 'onnx' else model.id} ({backend})"
        fps = self.frames / max(self.seconds, 1e-9)
        src = self.settings.source
        lines = [f"model {name}, {space} labels, {len(y)} frames from {describe(src)} (skip {src.skip})"]
        if self.mapper is not None and not self.mapper.native:
            lines.append(f"priors: {model.coarse_priors}")
            lines += [f"  accuracy {k:<13} {v:.4f}" for k, v in acc.items()]
        lines.append("per class: " + ", ".join(f"{c} {v:.3f}" for c, v in per_class.items() if v is not None))
        lines.append(format_confusion(cm, self.classes))
        if self.unknown:
            lines.append(f"{self.unknown} frames had a truth outside the label space and were not scored")
        lines.append(f"{self.runner.workers} frame(s) at once, {fps:.1f} frames/s (resizing and inference)")
        return {
            # What ran: the model id recorded in model.onnx when that is set, not model.id.
            "model": self.runner.classifier.name,
            "onnx": str(model.onnx) if model.onnx and backend == "onnx" else None,
            "name": name,
            "backend": backend,
            "space": space,
            "frames": len(y),
            # Frames whose truth is not among ``classes``: read, but not in ``frames`` nor any figure.
            "unscored": self.unknown,
            "accuracy": acc["corrected"],
            "accuracies": acc,
            "per_class": per_class,
            "classes": self.classes,
            "confusion": cm.tolist(),
            "fps": fps,
            "workers": self.runner.workers,
            "text": "\n".join(lines),
            "line": f"accuracy={acc['corrected']:.4f} fps={fps:.1f} frames={len(y)} space={space}",
        }


def run_eval(
    settings: Settings, skip: int = 0, vs: list[list[str]] | None = None, png: Path | None = None
) -> dict[str, Any]:
    """Accuracy of the configured model on the configured labelled source and, for each override list in ``vs``,
    of that variant of it (e.g. ``model.onnx=int8.onnx``) on the very same frames, decoded once.

    fps counts preprocessing and inference of each model only, not decoding the shared frames.
    """
    if skip:
        settings = settings.model_copy(update={"source": settings.source.model_copy(update={"skip": skip})})
    variants = [settings] + [apply_overrides(settings, overrides) for overrides in vs or []]
    with contextlib.ExitStack() as stack:
        scorers = [_Scorer(stack.enter_context(OfflineRunner(v)), v) for v in variants]
        with open_recorded(settings.source) as src:  # one pass at full speed
            frames = _labelled(progress(src.frames(), "frames", settings.source.limit), settings)
            for batch in _batches(frames, BATCH):
                for scorer in scorers:
                    scorer.add(batch)
        reports = [scorer.report() for scorer in scorers]
    main, others = reports[0], reports[1:]
    text = [r["text"] for r in reversed(reports)]  # the configured model last, next to its final line
    for other in others:
        diff = other["accuracy"] - main["accuracy"]
        text.append(f"vs {other['name']}: {other['line']} ({diff * 100:+.2f} points)")
    if png is not None:
        draw_confusions(reports, png)
        text.append(f"confusion matrices: {png}")
    text.append(main["line"])
    return {**main, "vs": others, "text": "\n".join(text)}


def _labelled(frames: Iterator[Frame], settings: Settings) -> Iterator[Frame]:
    """``frames``, until one without a label: ConfigError then, at once, rather than after reading an unlabelled
    source to its end."""
    for n, frame in enumerate(frames):
        if frame.truth is None:
            raise ConfigError(
                f"eyed eval needs a labelled source: frame {n + 1} of {describe(settings.source)} has no label "
                "(source.label_column names the column, when it is not found by itself)"
            )
        yield frame


def apply_overrides(settings: Settings, overrides: list[str]) -> Settings:
    """A copy of ``settings`` with ``section.field=value`` overrides, validated like the command line's.

    A variant is another model on the same frames, so only ``model.*`` options may change. One that sets
    ``model.id`` without ``model.onnx`` is that checkpoint: a ``model.onnx`` of the configuration (which the
    onnx backend would run instead) is cleared.
    """
    from eyed.config import ConfigError, parse_override

    data = settings.model_dump()
    fields: set[str] = set()
    for text in overrides:
        path, value = parse_override(text)
        if len(path) != 2 or path[0] not in data or path[1] not in data[path[0]]:
            raise ConfigError(f"--vs {text}: unknown option {'.'.join(path)}")
        if path[0] != "model":
            raise ConfigError(
                f"--vs {text}: a variant can change model.* options only; every variant is scored on the frames "
                f"of the configuration's own source ({describe(settings.source)}), so evaluate another "
                f"{'.'.join(path)} with a run of its own (--set {'.'.join(path)}=...)"
            )
        data[path[0]][path[1]] = value
        fields.add(path[1])
    if "id" in fields and "onnx" not in fields:
        data["model"]["onnx"] = None
    try:
        return Settings.model_validate(data)
    except ValueError as exc:
        raise ConfigError(f"--vs {' '.join(overrides)}: {exc}") from None


def draw_confusions(reports: list[dict[str, Any]], path: Path) -> Path:
    """One row-normalised confusion matrix per model, side by side, as a PNG."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(reports), figsize=(6 * len(reports), 5.5), squeeze=False)
    for ax, r in zip(axes[0], reports, strict=True):
        m = np.asarray(r["confusion"], dtype=np.float64)
        m = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
        ax.imshow(m, cmap="Blues", vmin=0, vmax=1)
        ticks = range(len(r["classes"]))
        ax.set_xticks(ticks, r["classes"], rotation=60, ha="right", fontsize=8)
        ax.set_yticks(ticks, r["classes"], fontsize=8)
        for (i, j), v in np.ndenumerate(m):
            if v >= 0.01:
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v > 0.5 else "black")
        ax.set_xlabel("predicted")
        ax.set_ylabel("truth")
        ax.set_title(f"{Path(r['name']).name[:40]}\naccuracy {r['accuracy']:.3f}, {r['frames']} frames", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def run_profile(settings: Settings, output: Path) -> dict[str, Any]:
    """``eyed profile``: the drift reference of the configured source and model, written to ``output``.

    The profile also holds coarse-label priors estimated on the same frames (no labels used), so
    ``model.coarse_priors`` can point at it too: its coarse counts are group sums, which no priors change. It
    records the preprocessing (``model.small_input`` and the model's spec), which the daemon checks.
    """
    with OfflineRunner(settings) as runner:
        return _profile(settings, runner, output)


def _profile(settings: Settings, runner: OfflineRunner, output: Path) -> dict[str, Any]:
    from eyed.drift import ProfileBuilder, StatsExtractor
    from eyed.drift.monitor import calibration_size
    from eyed.drift.reference import preprocess_record, preprocess_spec, profile_blocks

    post = runner.classifier.post  # type: ignore[attr-defined]
    mapper = post.mapper
    coarse = tuple(mapper.classes) if mapper is not None else ()
    extractor = StatsExtractor(coarse, mapper=mapper)
    src = settings.source
    builder = ProfileBuilder(
        coarse,
        top_classes=settings.drift.top_classes,
        # A native model (trained on the coarse classes) has no priors to estimate; an ImageNet model run with
        # model.coarse_priors = "none" still gets them, so the profile can serve as its priors file later.
        mapper=mapper if mapper is not None and not mapper.native else None,
        labels=list(post.labels),
        model=runner.classifier.name,
        source=f"{src.kind}:{src.dataset if src.kind == 'replay' else src.url or src.device}",
        preprocess=preprocess_record(settings.model.small_input, preprocess_spec(runner.classifier)),
    )
    first = last = 0.0
    for frames, preds in predictions(settings, runner):
        first = frames[0].t_in if builder.frames == 0 else first
        last = frames[-1].t_in
        stats = [extractor(f.image, p) for f, p in zip(frames, preds, strict=True)]
        builder.add_many(stats, np.stack([p.probs for p in preds]) if builder.mapper is not None else None)
    if builder.frames == 0:
        raise no_frames(src)
    # Blocks that hold a window, so calibration windows fit inside them (eyed.drift.reference.sample_blocks).
    # The frames were read at full speed: with source.fps set, they stand for a stream at that rate.
    seconds = (builder.frames - 1) / src.fps if src.fps > 0 else last - first
    builder.block, builder.reservoir_size = profile_blocks(settings.drift, builder.frames, seconds)
    if settings.drift.window_s is not None:
        logger.info(
            "drift: the profile keeps blocks of %d consecutive frames, what a window of %s held at %.1f frames/s; "
            "a live stream at a higher rate makes longer windows than that, and its thresholds come out too tight",
            builder.block,
            settings.drift.window_text(),
            (builder.frames - 1) / seconds if seconds > 0 else 0.0,
        )
    reference = builder.build()
    try:  # what the daemon refuses to start with must not replace a reference it could use
        calibration_size(MIN_WINDOW, reference.reservoir.shape[0])
    except ValueError as exc:
        raise ConfigError(f"{output} not written: {exc} (source.limit?)") from None
    with staged(output) as tmp:
        reference.write(tmp)
    logger.info("drift reference from %d frames written to %s", reference.frames, output)
    return {"output": str(output), "frames": reference.frames, "priors": reference.priors}


def run_drift(settings: Settings) -> list[dict[str, Any]]:
    """The drift payloads the daemon would publish for the configured source, computed offline."""
    from eyed.daemon import build_drift
    from eyed.drift import window_payload

    if not settings.drift.active():
        settings = settings.model_copy(update={"drift": settings.drift.model_copy(update={"enabled": True})})
    source = settings.source.resolved_id()
    payloads: list[dict[str, Any]] = []
    with OfflineRunner(settings) as runner:
        watch = build_drift(settings, runner.classifier)
        assert watch is not None
        # Paced: windows in seconds (drift.window_s) are measured on the frames' arrival times.
        for frames, preds in predictions(settings, runner, paced=True):
            for frame, pred in zip(frames, preds, strict=True):
                report = watch.observe(frame, pred)
                if report is not None:
                    payloads.append(window_payload(report, source, len(payloads), time.time()))
    return payloads
