"""``eyed export --int8``: static post-training quantisation of an exported model with onnxruntime's tools.

QDQ format, weights signed 8-bit per output channel, activations unsigned 8-bit per tensor, ranges from
min/max with a moving average over calibration batches (a single bright outlier frame then cannot stretch a
range for all the others). Not dynamic quantisation: onnxruntime's dynamic mode quantises MatMul/Gemm only and
leaves the convolutions, which are nearly all of MobileNetV2's work, in float.

Weights that already lie on an 8-bit grid (a checkpoint dequantised from a quantisation-aware-trained model, as
the reference MobileNetV2 is) get per-channel scales aligned to that grid, so they are quantised exactly
instead of being rounded a second time; see ``aligned_weight_scales``.

Some parts stay in float on purpose: the input stage (uint8 pixels -> normalised floats, a handful of cheap
element-wise ops), the first convolutions (see FLOAT_LEADING_CONVS), and what follows the classifier layer.
The classifier layer itself runs in 8 bits but writes float logits: the coarse label sums the probability mass
of up to 120 fine classes, so the long tail of small logits matters, and 8-bit logits would flatten it.
The calibration set and an accuracy check against the float model on frames not used for calibration are
recorded in the file's metadata, so ``eyed`` and a person can see how the file was made.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eyed.config import Settings
from eyed.model.checkpoint import ModelLoadError
from eyed.model.export import INPUT_NAME, K_NAME
from eyed.progress import progress
from eyed.sources import open_recorded

logger = logging.getLogger(__name__)

META_QUANTIZATION = "eyed.quantization"
# Bumped when the quantisation method changes, so that cached INT8 files (eyed bench) are made again.
METHOD_VERSION = "4"
CALIBRATION_BATCH = 8
# MobileNetV2's stem (the first three convolutions, at 112x112) stays float. It is not for coarse accuracy
# (with grid-aligned weights everything quantised is within 0.1 points of FP32) but for speed: an 8-bit
# convolution over 3 input channels is slower than the float one here. Keeping only the first one float is as
# fast, but the whole stem keeps FP32's top-1 class on more frames (88% against 80%).
# benchmarks/int8_tradeoff.py measures the choices.
FLOAT_LEADING_CONVS = 3
# A weight is taken to lie on a grid when every value is within this fraction of a step of a grid point.
GRID_TOLERANCE = 0.01


@dataclass(frozen=True)
class AccuracyCheck:
    """The INT8 model against the float one on the same frames (not used for calibration)."""

    frames: int
    top1_agreement: float  # same fine class
    coarse_agreement: float | None  # same coarse label
    coarse_accuracy_fp32: float | None  # against the dataset's labels, when it has them
    coarse_accuracy_int8: float | None


def _prepared(settings: Settings, prepare: Any, skip: int, limit: int) -> tuple[np.ndarray, list[str | None], int]:
    """Up to ``limit`` prepared frames from record ``skip`` on, their truths, and the records read (a corrupt
    record is read but gives no frame, so the next part of the stream starts after it)."""
    cfg = settings.source.model_copy(update={"skip": skip, "limit": limit, "fps": 0.0, "loop": False})
    images, truths = [], []
    with open_recorded(cfg) as source:
        for frame in progress(source.frames(), "frames", limit):
            images.append(prepare(frame.image))
            truths.append(frame.truth)
        records = len(images) + source.skipped
    if not images:
        raise ValueError(f"{settings.source.dataset}: no frames after skipping {skip}")
    return np.stack(images), truths, records


def float_nodes(model: Any, leading_convs: int = FLOAT_LEADING_CONVS) -> list[str]:
    """Names of the nodes left in float: the input stage and the first ``leading_convs`` convolutions (every
    node before the first quantised one), and everything after the final Gemm/MatMul (softmax, top-k)."""
    nodes = list(model.graph.node)
    convs = [i for i, n in enumerate(nodes) if n.op_type == "Conv"]
    if not convs:
        raise ModelLoadError("the model has no convolution: not a model eyed knows how to quantise")
    first_quantised = convs[min(leading_convs, len(convs) - 1)]
    keep = [n.name for n in nodes[:first_quantised]]
    last = max((i for i, n in enumerate(nodes) if n.op_type in ("Gemm", "MatMul")), default=len(nodes))
    keep += [n.name for n in nodes[last + 1 :]]
    return keep


def grid_step(weight: np.ndarray) -> float | None:
    """The step of the uniform grid through zero that every value of ``weight`` lies on, when the tensor spans
    254 or 255 steps of it (8 bits, narrow or full range), i.e. when it was dequantised from per-tensor 8-bit
    integers; None for weights trained in float."""
    w = weight.astype(np.float64)
    low, high = float(w.min()), float(w.max())
    if not high > low:
        return None
    for levels in (254, 255):
        step = (high - low) / levels
        q = w / step
        if float(np.abs(q - np.round(q)).max()) < GRID_TOLERANCE:
            return step
    return None


def aligned_weight_scales(model: Any) -> dict[str, list[dict[str, Any]]]:
    """onnxruntime ``TensorQuantOverrides`` that quantise grid weights (see ``grid_step``) exactly.

    onnxruntime's default per-channel symmetric scale, max|w|/127, puts a second, finer grid over the first one
    and rounds every weight again: with the reference checkpoint (dequantised uint8 weights) that cost 2.2-2.8
    points of coarse accuracy. A scale of exactly one step keeps the integers; a channel whose values reach
    further than 127 steps from zero (a few percent here; int8's symmetric range ends at 127) keeps the default
    scale. Zero points stay 0, because onnxruntime's fast 8-bit convolution kernels need symmetric weights: the
    asymmetric per-tensor scheme the weights came from would be exact everywhere but ran slower than FP32.
    """
    from onnx import numpy_helper

    weights = {i.name: i for i in model.graph.initializer}
    overrides: dict[str, list[dict[str, Any]]] = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2 or node.input[1] not in weights:
            continue
        w = numpy_helper.to_array(weights[node.input[1]])
        step = grid_step(w)
        if step is None:
            continue
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        axis = 1 if node.op_type == "Gemm" and not trans_b else 0
        reach = np.abs(np.moveaxis(w.astype(np.float64), axis, 0).reshape(w.shape[axis], -1)).max(axis=1)
        channels: list[dict[str, Any]] = [
            {"scale": np.float32(step if r <= (127 + GRID_TOLERANCE) * step else r / 127), "zero_point": 0}
            for r in reach
        ]
        channels[0]["axis"] = axis
        overrides[node.input[1]] = channels
    return overrides


def quantize_int8(
    fp32: Path,
    output: Path,
    calibration: np.ndarray,
    leading_convs: int = FLOAT_LEADING_CONVS,
    align_weights: bool = True,
) -> Path:
    """Write the static INT8 (QDQ) version of ``fp32`` to ``output``, calibrated on prepared uint8 frames.

    ``leading_convs`` and ``align_weights`` exist for benchmarks/int8_tradeoff.py, which measures the choices.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            starts = range(0, len(calibration), CALIBRATION_BATCH)
            self._batches = iter(
                progress((calibration[i : i + CALIBRATION_BATCH] for i in starts), "calibration", len(starts), "batch")
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {INPUT_NAME: batch, K_NAME: np.array([1], dtype=np.int64)}

    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="eyed-quant-") as tmp:
        # Shape inference and constant folding first, as onnxruntime recommends: it folds the exported
        # graph's explicit Pad nodes into the convolutions, so every Conv becomes one QLinearConv.
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        staged = Path(tmp) / "int8.onnx"
        model = onnx.load(str(pre))
        quantize_static(
            str(pre),
            str(staged),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=float_nodes(model, leading_convs),
            extra_options={
                # Not CalibMaxIntermediateOutputs: onnxruntime (1.32) drops the batches collected so far each
                # time that count is reached, without computing their ranges (onnxruntime issue 18893), so
                # only the last few batches would count. The calibrator keeps only each batch's per-tensor
                # min and max, a few kB, so all of them fit.
                "CalibMovingAverage": True,
                "TensorQuantOverrides": aligned_weight_scales(model) if align_weights else {},
                "OpTypesToExcludeOutputQuantization": ["Gemm", "MatMul"],  # float logits
            },
        )
        shutil.move(staged, output)  # the temporary folder may be on another filesystem
    return output


def check_accuracy(fp32: Any, int8: Any, tensors: np.ndarray, truths: list[str | None]) -> AccuracyCheck:
    """Compare two classifiers (``OnnxClassifier``) on the same prepared frames."""
    from eyed.model.postprocess import softmax

    def probs(classifier: Any) -> np.ndarray:
        return np.concatenate([softmax(classifier.logits(tensors[i : i + 32])) for i in range(0, len(tensors), 32)])

    pa, pb = probs(fp32), probs(int8)
    mapper = fp32.post.mapper
    coarse_agree = acc_a = acc_b = None
    if mapper is not None:
        ca, cb = mapper.scores(pa).argmax(axis=1), mapper.scores(pb).argmax(axis=1)
        coarse_agree = float((ca == cb).mean())
        index = {c: i for i, c in enumerate(mapper.classes)}
        known = [i for i, t in enumerate(truths) if t in index]
        if known:
            y = np.array([index[str(truths[i])] for i in known])
            acc_a, acc_b = float((ca[known] == y).mean()), float((cb[known] == y).mean())
    return AccuracyCheck(
        frames=len(tensors),
        top1_agreement=float((pa.argmax(axis=1) == pb.argmax(axis=1)).mean()),
        coarse_agreement=coarse_agree,
        coarse_accuracy_fp32=acc_a,
        coarse_accuracy_int8=acc_b,
    )


def export_int8(settings: Settings, output: Path, calibration: int = 300, check: int = 500) -> dict[str, Any]:
    """Quantise the configured model, calibrated on ``calibration`` frames of the configured source, checked on
    the ``check`` frames after them; returns what was recorded in the file's metadata."""
    import onnx

    from eyed.model.onnx_backend import OnnxClassifier

    fp32 = OnnxClassifier(settings.model)  # exports model.id to the cache first when model.onnx is unset
    src = settings.source
    logger.info("calibrating on %d frames of %s:%s from record %d", calibration, src.dataset, src.split, src.skip)
    t0 = time.monotonic()
    cal, _, records = _prepared(settings, fp32.prepare, src.skip, calibration)
    quantize_int8(fp32.path, output, cal)
    seconds = time.monotonic() - t0
    record: dict[str, Any] = {
        "method_version": METHOD_VERSION,
        "method": "static QDQ, per-channel int8 weights (grid-aligned where the weights lie on an 8-bit grid), "
        "uint8 activations, min/max with moving average",
        "float_nodes": f"input normalisation, first {FLOAT_LEADING_CONVS} convolutions, the classifier's output "
        "and what follows it (softmax, top-k)",
        "from": str(fp32.path),
        "calibration": {
            "dataset": src.dataset,
            "split": src.split,
            "skip": src.skip,
            "frames": len(cal),
            "small_input": settings.model.small_input,
        },
        "seconds": round(seconds, 1),
    }
    if check > 0:
        tensors, truths, _ = _prepared(settings, fp32.prepare, src.skip + records, check)
        int8 = OnnxClassifier(settings.model.model_copy(update={"onnx": output}))
        result = check_accuracy(fp32, int8, tensors, truths)
        int8.close()
        record["check"] = {"skip": src.skip + records, **asdict(result)}
    fp32.close()
    proto = onnx.load(str(output))
    proto.metadata_props.add(key=META_QUANTIZATION, value=json.dumps(record))
    onnx.save(proto, str(output))
    logger.info("INT8 model written to %s: %s", output, json.dumps(record.get("check", {})))
    return record
