"""``eyed export --int8``: static post-training quantisation of an exported model with onnxruntime's tools.

QDQ format, weights signed 8-bit per output channel, activations unsigned 8-bit per tensor, ranges from
min/max with a moving average over calibration batches (a single bright outlier frame then cannot stretch a
range for all the others). Not dynamic quantisation: onnxruntime's dynamic mode quantises MatMul/Gemm only and
leaves the convolutions, which are nearly all of MobileNetV2's work, in float.

Weights that already lie on an 8-bit grid (a checkpoint dequantised from a quantisation-aware-trained model, as
the reference MobileNetV2 is) get per-channel scales aligned to that grid, so they are quantised exactly
instead of being rounded a second time; see ``aligned_weight_scales``.

The first convolution reads the uint8 pixels as they are. The exported graph's input stage (transpose, cast,
scale, shift) is folded into that convolution's weights and bias, so quantising its output gives back the
pixels exactly, and the stage is dropped (see ``fold_input_stage``): no rounding of the input, and none of the
float ops and layout changes that a float input stage or stem needs around the 8-bit layers. It then reads them
four columns at a time, which onnxruntime's fast 8-bit kernel can run (see ``group_pixel_columns``). What follows
the classifier layer stays float: the layer itself runs in 8 bits but writes float logits, because the coarse
label sums the probability mass of up to 120 fine classes, so the long tail of small logits matters, and
8-bit logits would flatten it. ``--float-stem`` keeps the first three convolutions in float instead (slower,
closer to FP32's fine class; see FLOAT_STEM_CONVS).
The calibration set and an accuracy check against the float model on frames not used for calibration are
recorded in the file's metadata, so ``eyed`` and a person can see how the file was made.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eyed.config import ConfigError, Settings
from eyed.model.checkpoint import ModelLoadError
from eyed.model.export import INPUT_NAME, K_NAME
from eyed.outputs import MissingExtra, OutputError, refuse_overwriting, staged
from eyed.progress import progress
from eyed.sources import SourceError, describe, no_frames, open_recorded
from eyed.sources.replay import local_dataset

logger = logging.getLogger(__name__)

META_QUANTIZATION = "eyed.quantization"
# Bumped when the quantisation method changes, so that cached INT8 files (eyed bench) are made again.
METHOD_VERSION = "7"  # 7: a short last calibration batch is left out (calibration_frames)
CALIBRATION_BATCH = 8
# ``--float-stem``: MobileNetV2's stem (the first three convolutions, at 112x112) stays float. In 8 bits the
# stem's depthwise output (32 channels on one per-tensor uint8 range) is the noisiest step of the model, so a
# float stem keeps FP32's top-1 class on more frames (88% against 81%); coarse accuracy is the same either way,
# and the float stem with the layout changes around it is slower. benchmarks/int8_tradeoff.py measures both.
FLOAT_STEM_CONVS = 3
# How far (in normalised units) a folded input stage may move what convolution padding reads: a little more
# than one 8-bit step of an input normalised to [-1, 1] (2/255). MobileNetV2's padding moves by half a step.
PAD_TOLERANCE = 0.01
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


@dataclass(frozen=True)
class Prepared:
    """Prepared frames read in one pass, their truths, and for each frame the records read up to it (a corrupt
    record is read but gives no frame)."""

    tensors: np.ndarray
    truths: list[str | None]
    records: list[int]


def _prepared(settings: Settings, prepare: Any, limit: int) -> Prepared:
    """Up to ``limit`` prepared frames from record ``source.skip`` on, written into one array as they come."""
    src = settings.source
    tensors = np.empty((limit, *prepare.shape), dtype=np.uint8)  # pages beyond the frames read stay untouched
    truths: list[str | None] = []
    records: list[int] = []
    with open_recorded(src.model_copy(update={"limit": limit})) as source:
        for frame in progress(source.frames(), "frames", limit):
            prepare(frame.image, out=tensors[len(truths)])
            truths.append(frame.truth)
            records.append(len(truths) + source.skipped)
    if not truths:
        raise no_frames(src)
    return Prepared(tensors[: len(truths)], truths, records)


def calibration_frames(frames: int) -> int:
    """How many of ``frames`` calibration frames are used: whole batches of CALIBRATION_BATCH, when there is at
    least one. The moving average weighs each batch's min and max alike, so a short last batch (1 frame of 9)
    would count as much as a full one."""
    return frames - frames % CALIBRATION_BATCH if frames >= CALIBRATION_BATCH else frames


def float_nodes(model: Any, leading_convs: int = 0) -> list[str]:
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


@dataclass(frozen=True)
class InputStage:
    """The exported graph's input stage after ``fold_input_stage``: quantising ``normalised`` with ``scale``
    and ``zero_point`` gives back the pixels of ``pixels_nchw`` exactly, so ``drop_input_stage`` can remove
    the ``removed`` nodes and that quantisation."""

    pixels_nchw: str  # Transpose(pixels): uint8, NCHW
    removed: tuple[str, ...]  # Cast, Mul, Sub
    normalised: str  # the Sub's output, which the first convolution reads
    scale: float
    zero_point: int


def fold_input_stage(model: Any) -> InputStage | None:
    """Rewrite the input stage ``Sub(Mul(Cast(Transpose(pixels)), a), b)`` of an exported graph in place so
    that it computes ``s * (pixels - z)`` (one scale ``s``, one integer ``z``), with the difference folded
    into the first convolution: its weights take ``a / s`` per input channel and its bias the constant part.

    Quantised with scale ``s`` and zero point ``z``, that stage is the identity on uint8 pixels, so the
    8-bit convolution can read them directly. ``z`` is the pixel value that normalises to about 0; only
    convolution padding sees a different value, ``a * z - b`` instead of 0: 0.004 for MobileNetV2's mean
    and std of 0.5, but up to 0.18 for ImageNet's per-channel mean, which is more than PAD_TOLERANCE.
    Returns None, leaving the model as it was, when the graph does not start that way or the padding would
    move that far.
    """
    from onnx import numpy_helper

    nodes = list(model.graph.node)
    inits = {i.name: i for i in model.graph.initializer}

    def only_consumer(tensor: str, op: str) -> Any:
        users = [n for n in nodes if tensor in n.input]
        return users[0] if len(users) == 1 and users[0].op_type == op else None

    def constant(node: Any, data: str) -> np.ndarray | None:
        other = [i for i in node.input if i != data]
        return numpy_helper.to_array(inits[other[0]]) if len(other) == 1 and other[0] in inits else None

    chain: list[Any] = [next((n for n in nodes if n.op_type == "Transpose" and list(n.input) == [INPUT_NAME]), None)]
    for op in ("Cast", "Mul", "Sub", "Conv"):
        chain.append(chain[-1] and only_consumer(chain[-1].output[0], op))
    transpose, cast, mul, sub, conv = chain
    if conv is None or sub.input[0] != mul.output[0] or conv.input[0] != sub.output[0] or conv.input[1] not in inits:
        return None
    if any(a.name == "group" and a.i != 1 for a in conv.attribute):
        return None
    a, b = constant(mul, cast.output[0]), constant(sub, mul.output[0])
    weight = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
    channels = weight.shape[1]
    if a is None or b is None or a.size not in (1, channels) or b.size not in (1, channels):
        return None
    a = np.broadcast_to(a.astype(np.float64).ravel(), channels)
    b = np.broadcast_to(b.astype(np.float64).ravel(), channels)
    if not (a > 0).all():
        return None
    scale = float(np.float32(a.max()))
    zero_point = int(np.clip(np.round(np.mean(b / a)), 0, 255))
    padding = float(np.abs(a * zero_point - b).max())
    if padding > PAD_TOLERANCE:
        logger.info("input stage not folded: convolution padding would read %.3f instead of 0", padding)
        return None
    if not _stage_is_exact(scale, zero_point):
        return None
    bias = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if len(conv.input) > 2 else 0.0
    bias = bias + (weight * (a * zero_point - b)[None, :, None, None]).sum(axis=(1, 2, 3))
    weight = weight * (a / scale)[None, :, None, None]

    def put(name: str, value: np.ndarray) -> str:
        # New names, so that any other node reading the old constants keeps them.
        unique = f"eyed_folded_{name}"
        model.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), unique))
        return unique

    mul.input[1 if mul.input[0] == cast.output[0] else 0] = put("scale", np.array(scale))
    sub.input[1] = put("shift", np.array(scale * zero_point))
    conv.input[1] = put("weight", weight)
    if len(conv.input) > 2:
        conv.input[2] = put("bias", np.asarray(bias))
    else:
        conv.input.append(put("bias", np.asarray(bias)))
    _drop_unused_initializers(model)
    return InputStage(
        pixels_nchw=transpose.output[0],
        removed=(cast.name, mul.name, sub.name),
        normalised=sub.output[0],
        scale=scale,
        zero_point=zero_point,
    )


def _stage_is_exact(scale: float, zero_point: int) -> bool:
    """Whether float32 ``x * s - s * z``, quantised with ``s`` and ``z`` (rounding half to even), is ``x`` for
    every uint8 ``x``: it is by a wide margin, as ``x - z`` is an integer, but the graph surgery relies on it."""
    s = np.float32(scale)
    x = np.arange(256, dtype=np.float32)
    v = x * s - np.float32(scale * zero_point)
    return bool(np.array_equal(np.clip(np.rint(v / s) + zero_point, 0, 255), x))


def drop_input_stage(model: Any, stage: InputStage) -> None:
    """Remove the folded input stage and its QuantizeLinear from a quantised graph in place: what read the
    quantised pixels reads ``stage.pixels_nchw``. Raises ValueError when the quantiser did not give the stage
    exactly ``stage``'s scale and zero point."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    quantize = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == stage.normalised]
    if len(quantize) != 1:
        raise ValueError(f"expected one QuantizeLinear of {stage.normalised}, found {len(quantize)}")
    q = quantize[0]
    scale, zero_point = (numpy_helper.to_array(inits[name]) for name in q.input[1:3])
    if zero_point.dtype != np.uint8 or float(scale) != np.float32(stage.scale) or int(zero_point) != stage.zero_point:
        raise ValueError(f"the input stage was quantised with {float(scale)}, {zero_point!r}, not as folded")
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name == q.output[0]:
                node.input[i] = stage.pixels_nchw
    kept = [n for n in model.graph.node if n.name not in {*stage.removed, q.name}]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    _drop_unused_initializers(model)


# How many pixel columns ``group_pixel_columns`` hands the first convolution as one: with 3 (or 1) colour
# channels that is 12 (or 4) input channels, a multiple of 4, which onnxruntime's fast symmetric 8-bit
# convolution kernel needs; with 3 it runs im2col and a general GEMM instead, nearly three times slower.
PIXEL_GROUP = 4
GROUP_NODE = "eyed_group_columns"  # the Reshape that groups them
# CPUs (``platform.machine()``) for which ``eyed export --int8`` groups the pixel columns. ARM64's symmetric
# 8-bit convolution kernels need at least 64 input channels, so there the grouped convolution would fall back to
# a general GEMM with 2.7 times the multiply-adds of the plain one (64 x 72 against 2 x 32 x 27 per output pair).
GROUPING_CPUS = ("x86_64", "amd64")


def groups_pixel_columns(cpu: str) -> bool:
    """Whether an INT8 file for ``cpu`` (a ``platform.machine()`` name) reads the pixels PIXEL_GROUP columns at a
    time: only where onnxruntime's kernels gain from it."""
    return cpu.lower() in GROUPING_CPUS


def group_columns_weight(weight: np.ndarray, left: int) -> tuple[np.ndarray, int]:
    """The weight (O, C, kh, kw) of a convolution with horizontal stride 2 and ``left`` columns of padding,
    rearranged for the same convolution over PIXEL_GROUP pixel columns at a time (``group_pixel_columns``):
    (P x O, PIXEL_GROUP x C, kh, span) with P = PIXEL_GROUP / 2 output phases, and the left padding, in
    groups, that it needs. Taps that no original tap maps to are 0."""
    out_ch, in_ch, kh, kw = weight.shape
    phases = PIXEL_GROUP // 2
    # Output column P*q + phase reads pixel column 2 * (P*q + phase) - left + kx = PIXEL_GROUP*q + t:
    # group q + t // PIXEL_GROUP, slot t % PIXEL_GROUP within it.
    taps = [(phase, kx, 2 * phase - left + kx) for phase in range(phases) for kx in range(kw)]
    first = min(t // PIXEL_GROUP for _, _, t in taps)
    span = max(t // PIXEL_GROUP for _, _, t in taps) - first + 1
    grouped = np.zeros((phases * out_ch, PIXEL_GROUP * in_ch, kh, span), dtype=weight.dtype)
    for phase, kx, t in taps:
        slot = t % PIXEL_GROUP
        rows, cols = slice(phase * out_ch, (phase + 1) * out_ch), slice(slot * in_ch, (slot + 1) * in_ch)
        grouped[rows, cols, :, t // PIXEL_GROUP - first] = weight[:, :, :, kx]
    return grouped, -first


def group_pixel_columns(model: Any) -> bool:
    """Make the quantised first convolution read the pixels PIXEL_GROUP columns at a time; True when done.

    Reshaping the NHWC pixels (N, H, W, C) to (N, H, W/4, 4C) moves no data. Over that view, a convolution
    with horizontal stride 2 becomes one with stride 1 and two output phases (even and odd output columns)
    as 2 x O output channels (``group_columns_weight``); its NHWC output (N, H', W'/2, 2O) reshapes, again
    without moving data, to the original (N, H', W', O). Every product is the same integer product as before
    (taps that fall outside the original kernel get weight 0) and padding reads the same zero point, so the
    outputs are bit-identical wherever onnxruntime runs the graph with its 8-bit kernels (graph optimisation
    ``extended`` or ``all``; at ``basic`` or ``disabled`` it runs the convolutions in float, in another summation
    order); onnxruntime (at ``all``) cancels the layout transposes around it. On this project's CPU
    (AVX-512 VNNI) MobileNetV2's first convolution went from 160-180 us to 65-70 us. Returns False, leaving
    the model as it was, unless the first convolution reads the pixels directly (a folded input stage) with
    horizontal stride 2 and the pixel width is a multiple of PIXEL_GROUP.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    nodes = list(graph.node)
    inits = {i.name: i for i in graph.initializer}

    def consumers(tensor: str) -> list[Any]:
        return [n for n in nodes if tensor in n.input]

    def attr(node: Any, name: str, default: Any) -> Any:
        found = next((a for a in node.attribute if a.name == name), None)
        return default if found is None else helper.get_attribute_value(found)

    transpose = next((n for n in nodes if n.op_type == "Transpose" and list(n.input) == [INPUT_NAME]), None)
    if transpose is None or list(attr(transpose, "perm", [])) != [0, 3, 1, 2]:
        return False
    chain = [transpose]
    for op in ("DequantizeLinear", "Conv", "QuantizeLinear"):
        users = consumers(chain[-1].output[0])
        if len(users) != 1 or users[0].op_type != op:
            return False
        chain.append(users[0])
    _, dq, conv, quant = chain
    weight_dq = next((n for n in nodes if n.op_type == "DequantizeLinear" and n.output[0] == conv.input[1]), None)
    bias_dq = next((n for n in nodes if len(conv.input) > 2 and n.output[0] == conv.input[2]), None)
    if weight_dq is None or bias_dq is None or bias_dq.op_type != "DequantizeLinear":
        return False
    own = [*weight_dq.input, *bias_dq.input]
    if not all(name in inits and len(consumers(name)) == 1 for name in own):
        return False  # constants shared with another node would change under it
    if quant.input[1] not in inits or numpy_helper.to_array(inits[quant.input[1]]).size != 1:
        return False  # one output scale for all channels, so for every phase
    pixels = next((i for i in graph.input if i.name == INPUT_NAME), None)
    if pixels is None:
        return False
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in pixels.type.tensor_type.shape.dim]
    if len(dims) != 4 or not all(dims[1:]) or dims[2] % PIXEL_GROUP:
        return False
    _, height, width, channels = dims
    weight = numpy_helper.to_array(inits[weight_dq.input[0]])
    out_ch, in_ch, kh, kw = weight.shape
    top, left, bottom, right = attr(conv, "pads", [0, 0, 0, 0])
    stride_h, stride_w = attr(conv, "strides", [1, 1])
    if (
        in_ch != channels
        or attr(conv, "group", 1) != 1
        or list(attr(conv, "dilations", [1, 1])) != [1, 1]
        or attr(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
        or stride_w != 2
    ):
        return False
    out_w = (width + left + right - kw) // 2 + 1
    out_h = (height + top + bottom - kh) // stride_h + 1
    phases = PIXEL_GROUP // 2
    if out_w % phases:
        return False
    grouped, pad_left = group_columns_weight(weight, left)
    span = grouped.shape[3]
    groups = width // PIXEL_GROUP
    pad_right = out_w // phases - groups - pad_left + span - 1
    if pad_right < 0:
        return False

    def put(name: str, value: np.ndarray) -> None:
        inits[name].CopyFrom(numpy_helper.from_array(value, name))

    put(weight_dq.input[0], grouped)
    put(bias_dq.input[0], np.tile(numpy_helper.to_array(inits[bias_dq.input[0]]), phases))  # the same each phase
    for node in (weight_dq, bias_dq):
        if attr(node, "axis", 1) != 0:
            continue  # one scale and zero point for the whole tensor: they serve every phase as they are
        for name in node.input[1:]:
            value = numpy_helper.to_array(inits[name])
            if value.ndim == 1 and len(value) == out_ch:  # one per output channel
                put(name, np.tile(value, phases))
    shape = {"kernel_shape": [kh, span], "strides": [stride_h, 1], "pads": [top, pad_left, bottom, pad_right]}
    kept_attributes = [a for a in conv.attribute if a.name not in shape]
    del conv.attribute[:]
    conv.attribute.extend([*kept_attributes, *(helper.make_attribute(k, v) for k, v in shape.items())])

    grouped_in, phased = f"{INPUT_NAME}_grouped", f"{quant.output[0]}_phased"
    graph.initializer.extend(
        [
            numpy_helper.from_array(
                np.array([-1, height, groups, PIXEL_GROUP * channels], np.int64), "eyed_grouped_shape"
            ),
            numpy_helper.from_array(np.array([-1, out_h, out_w, out_ch], np.int64), "eyed_ungrouped_shape"),
        ]
    )
    restored = quant.output[0]
    quant.output[0] = phased
    transpose.input[0] = grouped_in
    before = [helper.make_node("Reshape", [INPUT_NAME, "eyed_grouped_shape"], [grouped_in], name=GROUP_NODE)]
    after = [
        helper.make_node("Transpose", [phased], [f"{phased}_nhwc"], name="eyed_phases_nhwc", perm=[0, 2, 3, 1]),
        helper.make_node(
            "Reshape", [f"{phased}_nhwc", "eyed_ungrouped_shape"], [f"{restored}_nhwc"], name="eyed_ungroup"
        ),
        helper.make_node("Transpose", [f"{restored}_nhwc"], [restored], name="eyed_ungrouped_nchw", perm=[0, 3, 1, 2]),
    ]
    at = nodes.index(quant) + 1
    del graph.node[:]
    graph.node.extend([*before, *nodes[:at], *after, *nodes[at:]])
    # Shapes recorded for the tensors whose shape changed would contradict the new graph.
    changed = {transpose.output[0], dq.output[0], conv.output[0], weight_dq.output[0], bias_dq.output[0]}
    kept = [v for v in graph.value_info if v.name not in changed]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    return True


def _drop_unused_initializers(model: Any) -> None:
    # onnxruntime warns about each unused initializer at every session start.
    used = {name for n in model.graph.node for name in n.input}
    for init in [i for i in model.graph.initializer if i.name not in used]:
        model.graph.initializer.remove(init)


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
    leading_convs: int = 0,
    align_weights: bool = True,
    fold_input: bool = True,
    group_columns: bool | None = None,
) -> Path:
    """Write the static INT8 (QDQ) version of ``fp32`` to ``output``, calibrated on prepared uint8 frames.

    With no ``leading_convs`` left float, the input stage is folded into the first convolution
    (``fold_input_stage``) unless ``fold_input`` is false, and then reads the pixels four columns at a time
    (``group_pixel_columns``) if ``group_columns`` says so; by default, when this machine's CPU gains from it
    (``groups_pixel_columns``). The options exist for benchmarks/int8_tradeoff.py, which measures the choices,
    and for tests.
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

    calibration = calibration[: calibration_frames(len(calibration))]

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
        written = Path(tmp) / "int8.onnx"
        model = onnx.load(str(pre))
        stage = fold_input_stage(model) if fold_input and leading_convs == 0 else None
        overrides = aligned_weight_scales(model) if align_weights else {}
        if stage is not None:
            onnx.save(model, str(pre))
            # The scale and zero point that make quantising the folded stage the identity on the pixels.
            overrides[stage.normalised] = [
                {"scale": np.array(stage.scale, np.float32), "zero_point": np.array(stage.zero_point, np.uint8)}
            ]
        elif fold_input and leading_convs == 0:
            logger.warning("the input stage cannot be folded into the first convolution: its output is quantised")
        quantize_static(
            str(pre),
            str(written),
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
                "TensorQuantOverrides": overrides,
                "OpTypesToExcludeOutputQuantization": ["Gemm", "MatMul"],  # float logits
            },
        )
        if stage is not None:
            quantised = onnx.load(str(written))
            drop_input_stage(quantised, stage)
            group = groups_pixel_columns(platform.machine()) if group_columns is None else group_columns
            if group and not group_pixel_columns(quantised):
                logger.info(
                    "the first convolution reads the pixels one column at a time (its shape does not allow more)"
                )
            onnx.save(quantised, str(written))
        shutil.move(written, output)  # the temporary folder may be on another filesystem
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


def reads_pixels(model: Any) -> bool:
    """Whether the quantised graph's first convolution reads the uint8 pixels directly (a folded input stage)."""
    pixels = {INPUT_NAME} | {
        n.output[0] for n in model.graph.node if n.op_type == "Reshape" and n.input[0] == INPUT_NAME
    }
    transposed = {n.output[0] for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in pixels}
    return any(n.op_type == "DequantizeLinear" and n.input[0] in transposed for n in model.graph.node)


def _refuse_replacing(output: Path, fp32: Path) -> None:
    """OutputError when ``output`` is the FP32 file itself: the INT8 file would replace the only float model,
    which a device without torch cannot export again."""
    refuse_overwriting(output, fp32, "the FP32 model being quantised (model.onnx)")


def _dataset_name(dataset: str) -> str:
    """``source.dataset`` as recorded: a local folder or file as its absolute path, a hub id as it is."""
    local = local_dataset(dataset)
    return str(local) if local is not None else dataset


def export_int8(
    settings: Settings,
    output: Path,
    calibration: int = 300,
    check: int = 500,
    float_stem: bool = False,
    target_cpu: str | None = None,
) -> dict[str, Any]:
    """Quantise the configured model, calibrated on ``calibration`` frames of the configured source, checked on
    the ``check`` frames after them; returns what was recorded in the file's metadata. ``float_stem`` keeps the
    first FLOAT_STEM_CONVS convolutions in float. ``target_cpu`` (``platform.machine()`` of the device the file
    is for; default this machine's) decides whether the first convolution reads the pixels four columns at a
    time (GROUPING_CPUS): the file runs anywhere either way, only its speed differs."""
    if settings.model.onnx is not None:
        _refuse_replacing(output, settings.model.onnx)  # before the export, the frames and the minutes of work
    try:
        import onnx
        import onnxruntime.quantization  # noqa: F401
    except ImportError as exc:
        raise MissingExtra(f"quantising to INT8 needs the int8 extra (pip install 'eyed[int8]'): {exc}") from exc

    from eyed.model.onnx_backend import OnnxClassifier

    fp32 = OnnxClassifier(settings.model)  # exports model.id to the cache first when model.onnx is unset
    try:
        _refuse_replacing(output, fp32.path)  # the cached export, when model.onnx is unset
        if META_QUANTIZATION in fp32.session.get_modelmeta().custom_metadata_map:
            raise ConfigError(
                f"model.onnx {fp32.path} is already an INT8 export: quantise the float one (unset model.onnx, or "
                "set it to the file `eyed export` wrote)"
            )
    except (ConfigError, OutputError):
        fp32.close()
        raise
    src = settings.source
    logger.info("calibrating on %d frames of %s:%s from record %d", calibration, src.dataset, src.split, src.skip)
    t0 = time.monotonic()
    # One pass: the check's frames are the ones after the calibration frames, so the two never overlap, and a
    # source too short for both fails here, before the quantisation's minutes.
    frames = _prepared(settings, fp32.prepare, calibration + check)
    cal = frames.tensors[:calibration]
    used = calibration_frames(len(cal))
    if used < len(cal):
        logger.info("calibrating on %d of the %d frames: whole batches of %d only", used, len(cal), CALIBRATION_BATCH)
    if check > 0 and len(frames.truths) <= calibration:
        raise SourceError(
            f"{describe(src)}: {len(frames.truths)} frame(s) from record {src.skip} on leave none for "
            f"the accuracy check after {calibration} calibration frames (--check 0 skips the check)"
        )
    cpu = (target_cpu or platform.machine()).lower()
    # Quantised, checked and labelled under a temporary name: an interrupted or failed export leaves no file
    # without its record, nor replaces a good one.
    with staged(output) as staging:
        quantize_int8(
            fp32.path,
            staging,
            cal,
            leading_convs=FLOAT_STEM_CONVS if float_stem else 0,
            group_columns=groups_pixel_columns(cpu),
        )
        seconds = time.monotonic() - t0
        proto = onnx.load(str(staging))
        if reads_pixels(proto):
            columns = "four columns" if any(n.name == GROUP_NODE for n in proto.graph.node) else "one column"
            head = (
                f"none before the classifier's output (the first convolution reads the uint8 pixels, {columns} at a "
                "time)"
            )
        elif float_stem:
            head = f"input normalisation, first {FLOAT_STEM_CONVS} convolutions, the classifier's output"
        else:
            head = "input normalisation, the classifier's output"
        record: dict[str, Any] = {
            "method_version": METHOD_VERSION,
            "method": "static QDQ, per-channel int8 weights (grid-aligned where the weights lie on an 8-bit grid), "
            "uint8 activations, min/max with moving average",
            "float_stem": float_stem,
            "target_cpu": cpu,
            "float_nodes": f"{head} and what follows it (softmax, top-k)",
            # Absolute: a relative path names another file from another working directory (eyed bench
            # compares it with the FP32 file it benchmarks).
            "from": str(fp32.path.resolve()),
            "calibration": {
                "dataset": _dataset_name(src.dataset),
                "split": src.split,
                "skip": src.skip,
                "frames": used,
                "small_input": settings.model.small_input,
            },
            "seconds": round(seconds, 1),
        }
        # Loading it is the check that onnxruntime runs the file, even with no accuracy check.
        int8 = OnnxClassifier(settings.model.model_copy(update={"onnx": staging}))
        if check > 0:
            result = check_accuracy(fp32, int8, frames.tensors[calibration:], frames.truths[calibration:])
            record["check"] = {"skip": src.skip + frames.records[calibration - 1], **asdict(result)}
        int8.close()
        fp32.close()
        proto.metadata_props.add(key=META_QUANTIZATION, value=json.dumps(record))
        onnx.save(proto, str(staging))
    logger.info("INT8 model written to %s: %s", output, json.dumps(record.get("check", {})))
    return record
