"""eyed export --int8 on the tiny generated model and dataset; the daemon's classifier runs the result."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from eyed.cli import main
from eyed.config import ModelConfig
from eyed.model.onnx_backend import OnnxClassifier
from eyed.model.quantize import (
    FLOAT_STEM_CONVS,
    GROUP_NODE,
    META_QUANTIZATION,
    PIXEL_GROUP,
    aligned_weight_scales,
    float_nodes,
    fold_input_stage,
    grid_step,
    group_columns_weight,
    group_pixel_columns,
    quantize_int8,
    reads_pixels,
)
from tests.conftest import dequantized_weights, synthetic_images


def _export_int8(out: Path, dataset: Path, checkpoint: Path, onnx_file: Path, *extra: str) -> Path:
    args = ["--set", f"source.dataset={dataset}", "--set", "source.split=train"]
    args += ["--set", f"model.id={checkpoint}", "--set", f"model.onnx={onnx_file}"]
    assert main(["export", "--int8", *args, "--output", str(out), "--calibration", "6", "--check", "8", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def int8_file(tiny_dataset: Path, tiny_checkpoint: Path, tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("int8") / "tiny-int8.onnx"
    return _export_int8(out, tiny_dataset, tiny_checkpoint, tiny_onnx, "--target-cpu", "x86_64")


def test_int8_export_records_calibration_and_check(int8_file: Path, tiny_dataset: Path) -> None:
    meta = {p.key: p.value for p in onnx.load(str(int8_file)).metadata_props}
    record = json.loads(meta[META_QUANTIZATION])
    assert record["calibration"]["frames"] == 6 and record["calibration"]["dataset"] == str(tiny_dataset)
    # 12 records, the 6th corrupt: records 0-6 give the 6 calibration frames, the other 5 are checked.
    assert record["check"]["skip"] == 7 and record["check"]["frames"] == 5
    assert 0.0 <= record["check"]["top1_agreement"] <= 1.0
    assert "eyed.labels" in meta and "eyed.preprocess" in meta  # still runs without torch


def _int8_args(dataset: Path, checkpoint: Path, onnx_file: Path) -> list[str]:
    return [
        "--set", f"source.dataset={dataset}", "--set", "source.split=train",
        "--set", f"model.id={checkpoint}", "--set", f"model.onnx={onnx_file}",
    ]  # fmt: skip


def test_a_failed_int8_export_leaves_the_file_that_was_there(
    tiny_dataset: Path, tiny_checkpoint: Path, tiny_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Quantised, checked and labelled under a temporary name: a failure (or Ctrl-C) in the accuracy check
    neither leaves an INT8 file without its record nor replaces a good file."""
    from eyed.model import quantize

    out = tmp_path / "m8.onnx"
    out.write_bytes(b"the previous export")

    def interrupted(*args: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(quantize, "check_accuracy", interrupted)
    args = _int8_args(tiny_dataset, tiny_checkpoint, tiny_onnx)
    assert main(["export", "--int8", *args, "--output", str(out), "--calibration", "4", "--check", "4"]) == 130
    assert out.read_bytes() == b"the previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["m8.onnx"]  # no temporary file left behind


def test_an_int8_export_checks_its_input_and_its_source_first(
    int8_file: Path,
    tiny_dataset: Path,
    tiny_checkpoint: Path,
    tiny_onnx: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "again.onnx"
    # An INT8 file quantised again would not load; it is refused, and nothing is written.
    args = _int8_args(tiny_dataset, tiny_checkpoint, int8_file)
    assert main(["export", "--int8", *args, "--output", str(out), "--calibration", "4"]) == 78
    assert "already an INT8 export" in capsys.readouterr().err and not out.exists()
    # 11 frames leave none for the check after 11 calibration frames: said before quantising, not after.
    args = _int8_args(tiny_dataset, tiny_checkpoint, tiny_onnx)
    assert main(["export", "--int8", *args, "--output", str(out), "--calibration", "11"]) == 69
    assert "leave none for the accuracy check" in capsys.readouterr().err and not out.exists()
    # The --int8 options mean nothing without it: a usage error, not a float export that ignores them.
    with pytest.raises(SystemExit) as exc:
        main(["export", *args, "--output", str(out), "--calibration", "4", "--float-stem"])
    assert exc.value.code == 2 and "--calibration, --float-stem: only with --int8" in capsys.readouterr().err


def test_an_int8_export_without_the_onnx_package_names_the_extra(
    tiny_dataset: Path,
    tiny_onnx: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # an onnx-only install (a Pi) has onnxruntime, not onnx
    args = [
        "--set",
        f"source.dataset={tiny_dataset}",
        "--set",
        "source.split=train",
        "--set",
        f"model.onnx={tiny_onnx}",
    ]
    assert main(["export", "--int8", *args, "--output", str(tmp_path / "m8.onnx")]) == 69
    assert "pip install 'eyed[int8]'" in capsys.readouterr().err


def _quantized_convs(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The convolutions that take their weight as int8, through a DequantizeLinear."""
    int8_init = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.INT8}
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int8_init}
    return [n for n in graph.node if n.op_type in ("Conv", "Gemm") and n.input[1] in dequantized]


def test_int8_graph_is_static_qdq_reading_the_pixels_with_float_logits(int8_file: Path, tiny_onnx: Path) -> None:
    model = onnx.load(str(int8_file))
    graph = model.graph
    ops = Counter(n.op_type for n in graph.node)
    convs = Counter(n.op_type for n in onnx.load(str(tiny_onnx)).graph.node)["Conv"]
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    assert ops["DynamicQuantizeLinear"] == 0 and ops["ConvInteger"] == 0  # static, not dynamic
    # Every convolution runs in 8 bits, the first one on the uint8 pixels themselves: the float input stage
    # (cast, scale, shift) and the quantisation of its output are gone.
    assert len([n for n in _quantized_convs(graph) if n.op_type == "Conv"]) == convs
    assert reads_pixels(model)
    assert ops["Cast"] == ops["Mul"] == ops["Sub"] == 0
    # The classifier runs in 8 bits (int8 weights) but its logits stay float: nothing quantises them.
    gemm = next(n for n in graph.node if n.op_type == "Gemm")
    assert gemm in _quantized_convs(graph)
    assert not [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == gemm.output[0]]
    consumers = [n.op_type for n in graph.node if gemm.output[0] in n.input]
    assert consumers == ["Softmax"]
    record = json.loads(next(p.value for p in model.metadata_props if p.key == META_QUANTIZATION))
    assert record["float_stem"] is False and record["float_nodes"].startswith("none before")
    assert "four columns at a time" in record["float_nodes"] and record["target_cpu"] == "x86_64"


def test_a_file_for_an_arm_board_reads_the_pixels_one_column_at_a_time(
    tiny_dataset: Path, tiny_checkpoint: Path, tiny_onnx: Path, tmp_path: Path
) -> None:
    """onnxruntime's ARM64 kernels gain nothing from grouped columns (they need 64 input channels for their
    fast path), so a file made for one keeps the plain first convolution, whatever machine exports it."""
    out = _export_int8(tmp_path / "arm.onnx", tiny_dataset, tiny_checkpoint, tiny_onnx, "--target-cpu", "aarch64")
    model = onnx.load(str(out))
    assert reads_pixels(model) and GROUP_NODE not in {n.name for n in model.graph.node}
    record = json.loads(next(p.value for p in model.metadata_props if p.key == META_QUANTIZATION))
    assert record["target_cpu"] == "aarch64" and "one column at a time" in record["float_nodes"]


def test_float_stem_keeps_the_input_stage_and_the_first_convolutions_in_float(
    tiny_dataset: Path, tiny_checkpoint: Path, tiny_onnx: Path, tmp_path: Path
) -> None:
    out = _export_int8(tmp_path / "stem.onnx", tiny_dataset, tiny_checkpoint, tiny_onnx, "--float-stem")
    model = onnx.load(str(out))
    convs = Counter(n.op_type for n in onnx.load(str(tiny_onnx)).graph.node)["Conv"]
    quantized = [n for n in _quantized_convs(model.graph) if n.op_type == "Conv"]
    assert len(quantized) == convs - FLOAT_STEM_CONVS
    assert not reads_pixels(model)
    assert Counter(n.op_type for n in model.graph.node)["Cast"] == 1  # the float input stage
    record = json.loads(next(p.value for p in model.metadata_props if p.key == META_QUANTIZATION))
    assert record["float_stem"] is True and f"first {FLOAT_STEM_CONVS} convolutions" in record["float_nodes"]


def _run(model: Path | bytes, pixels: np.ndarray, outputs: list[str] | None = None) -> list[np.ndarray]:
    import onnxruntime as ort

    source = model if isinstance(model, bytes) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    feeds: dict[str, np.ndarray] = {"pixels": pixels}
    if any(i.name == "k" for i in session.get_inputs()):  # an exported classifier, not a single layer
        feeds["k"] = np.array([1], dtype=np.int64)
    return session.run(outputs, feeds)


def _logits(model: Path | bytes, pixels: np.ndarray) -> np.ndarray:
    return _run(model, pixels, ["logits"])[0]


def _set_normalisation(model: onnx.ModelProto, mean: np.ndarray, std: np.ndarray) -> None:
    """The exported input stage's constants for this mean and std (pixels / 255, then normalised)."""
    for init in model.graph.initializer:
        if init.name in ("scale", "shift"):
            value = 1 / (255 * std) if init.name == "scale" else mean / std
            init.CopyFrom(onnx.numpy_helper.from_array(value.reshape(1, 3, 1, 1).astype(np.float32), init.name))


@pytest.mark.parametrize("per_channel", [False, True])
def test_folding_the_input_stage_keeps_the_float_model(tiny_onnx: Path, tmp_path: Path, per_channel: bool) -> None:
    """The folded stage computes s * (pixels - z); the first convolution makes up the difference."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = tmp_path / "pre.onnx"
    quant_pre_process(str(tiny_onnx), str(pre), skip_symbolic_shape=True)  # what quantize_int8 folds
    model = onnx.load(str(pre))
    mean, std = np.array([0.5, 0.5, 0.5]), np.array([0.5, 0.5, 0.5])
    if per_channel:  # one scale per channel (ImageNet's std)
        std = np.array([0.229, 0.224, 0.225])
        _set_normalisation(model, mean, std)
    first_conv = next(n for n in model.graph.node if n.op_type == "Conv").output[0]
    model.graph.output.append(onnx.ValueInfoProto(name=first_conv))
    original = model.SerializeToString()
    stage = fold_input_stage(model)
    assert stage is not None
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    assert np.allclose(inits["eyed_folded_scale"], stage.scale)
    assert np.allclose(inits["eyed_folded_shift"], stage.scale * stage.zero_point)
    assert stage.zero_point in (127, 128)  # the pixel value that normalises to about 0
    assert "scale" not in inits and "shift" not in inits  # replaced, not left for onnxruntime to warn about
    pixels = np.stack(synthetic_images(4, seed=2, size=OnnxClassifier(ModelConfig(onnx=tiny_onnx)).input_shape[0]))
    (a, conv_a), (b, conv_b) = (_run(m, pixels, ["logits", first_conv]) for m in (original, model.SerializeToString()))
    # The first convolution's output is the same but where its padding (bottom row, right column) now reads
    # pixel z instead of normalised 0.
    assert np.abs(conv_a - conv_b)[:, :, :-1, :-1].max() < 1e-5 * np.abs(conv_a).max()
    assert 0 < np.abs(conv_a - conv_b).max() < 0.01 * np.abs(conv_a).max()
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()
    assert fold_input_stage(onnx.load(str(tiny_onnx))) is None  # unfolded Pad between the stage and the conv


def test_an_input_stage_whose_padding_would_move_is_not_folded(tiny_onnx: Path, tmp_path: Path) -> None:
    """ImageNet's per-channel mean has no pixel value that normalises to 0 on all channels: folding would make
    the first convolution's padding read up to 0.18 instead of 0, so the stage stays and is quantised."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = tmp_path / "pre.onnx"
    quant_pre_process(str(tiny_onnx), str(pre), skip_symbolic_shape=True)
    model = onnx.load(str(pre))
    _set_normalisation(model, np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225]))
    before = model.SerializeToString()
    assert fold_input_stage(model) is None
    assert model.SerializeToString() == before
    imagenet = tmp_path / "imagenet.onnx"
    onnx.save(model, str(imagenet))
    fp32 = OnnxClassifier(ModelConfig(onnx=imagenet))
    calibration = np.stack([fp32.prepare(img) for img in synthetic_images(8, seed=4)])
    assert not reads_pixels(onnx.load(str(quantize_int8(imagenet, tmp_path / "int8.onnx", calibration))))


def test_the_dropped_input_stage_was_the_identity(tiny_onnx: Path, tmp_path: Path, monkeypatch) -> None:
    """Quantising the folded stage gives back the pixels, so removing it changes no output bit."""
    import eyed.model.quantize as quantize

    fp32 = OnnxClassifier(ModelConfig(onnx=tiny_onnx))
    calibration = np.stack([fp32.prepare(img) for img in synthetic_images(16, seed=4)])
    dropped = quantize_int8(tiny_onnx, tmp_path / "dropped.onnx", calibration)
    monkeypatch.setattr(quantize, "drop_input_stage", lambda model, stage: None)
    kept = quantize_int8(tiny_onnx, tmp_path / "kept.onnx", calibration)
    assert reads_pixels(onnx.load(str(dropped))) and not reads_pixels(onnx.load(str(kept)))
    pixels = np.random.default_rng(0).integers(0, 256, (8, *fp32.input_shape), dtype=np.uint8)
    pixels[0], pixels[1] = 0, 255  # the ends of the range
    assert np.array_equal(_logits(dropped, pixels), _logits(kept, pixels))


def test_grouping_the_pixel_columns_changes_no_output_bit(tiny_onnx: Path, tmp_path: Path) -> None:
    fp32 = OnnxClassifier(ModelConfig(onnx=tiny_onnx))
    calibration = np.stack([fp32.prepare(img) for img in synthetic_images(16, seed=4)])
    grouped = quantize_int8(tiny_onnx, tmp_path / "grouped.onnx", calibration, group_columns=True)
    plain = quantize_int8(tiny_onnx, tmp_path / "plain.onnx", calibration, group_columns=False)
    assert GROUP_NODE in {n.name for n in onnx.load(str(grouped)).graph.node}
    assert GROUP_NODE not in {n.name for n in onnx.load(str(plain)).graph.node}
    assert reads_pixels(onnx.load(str(grouped))) and reads_pixels(onnx.load(str(plain)))
    pixels = np.random.default_rng(0).integers(0, 256, (8, *fp32.input_shape), dtype=np.uint8)
    pixels[0], pixels[1] = 0, 255
    names = ["logits", "probs", "top_scores", "top_ids"]
    for a, b in zip(_run(grouped, pixels, names), _run(plain, pixels, names), strict=True):
        assert np.array_equal(a, b)


def _single_conv(
    width: int, kernel: tuple[int, int], pads: list[int], strides: list[int], seed: int, per_channel: bool = True
) -> onnx.ModelProto:
    """pixels (NHWC uint8) -> Transpose -> DequantizeLinear -> Conv -> QuantizeLinear: the first convolution of a
    quantised graph whose input stage was dropped, with random int8 weights and per-channel (or one) scales."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    out_ch, (kh, kw) = 5, kernel
    consts: dict[str, np.ndarray] = {
        "x_scale": np.array(0.02, np.float32),
        "x_zero": np.array(127, np.uint8),
        "w": rng.integers(-127, 128, (out_ch, 3, kh, kw)).astype(np.int8),
        "w_scale": rng.uniform(0.001, 0.01, out_ch).astype(np.float32),
        "w_zero": np.zeros(out_ch, np.int8),
        "b": rng.integers(-5000, 5000, out_ch).astype(np.int32),
        "y_scale": np.array(0.5, np.float32),
        "y_zero": np.array(100, np.uint8),
    }
    consts["b_scale"] = (consts["x_scale"] * consts["w_scale"]).astype(np.float32)
    consts["b_zero"] = np.zeros(out_ch, np.int32)
    if not per_channel:  # one scale and zero point per tensor, no axis
        for name in ("w_scale", "w_zero", "b_scale", "b_zero"):
            consts[name] = consts[name][:1].reshape(())
    axis: dict[str, Any] = {"axis": 0} if per_channel else {}
    nodes = [
        helper.make_node("Transpose", ["pixels"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("DequantizeLinear", ["nchw", "x_scale", "x_zero"], ["x"]),
        helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wf"], **axis),
        helper.make_node("DequantizeLinear", ["b", "b_scale", "b_zero"], ["bf"], **axis),
        helper.make_node("Conv", ["x", "wf", "bf"], ["y"], kernel_shape=list(kernel), pads=pads, strides=strides),
        helper.make_node("QuantizeLinear", ["y", "y_scale", "y_zero"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "first_conv",
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["batch", 12, width, 3])],
        [helper.make_tensor_value_info("out", TensorProto.UINT8, ["batch", out_ch, "height", "width"])],
        [numpy_helper.from_array(v, k) for k, v in consts.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    ("kernel", "pads", "strides"),
    [
        ((3, 3), [0, 0, 1, 1], [2, 2]),  # TensorFlow's SAME for an even size, as MobileNetV2 exports it
        ((3, 3), [1, 1, 1, 1], [2, 2]),
        ((5, 5), [2, 2, 2, 2], [1, 2]),
        ((3, 2), [1, 0, 0, 0], [2, 2]),
        ((1, 7), [0, 3, 0, 3], [3, 2]),
    ],
)
@pytest.mark.parametrize("per_channel", [True, False])
def test_a_convolution_over_grouped_pixel_columns_is_the_same_convolution(
    kernel: tuple[int, int], pads: list[int], strides: list[int], per_channel: bool
) -> None:
    """Bit-identical where onnxruntime runs the 8-bit kernels (its default optimisation level, as here)."""
    model = _single_conv(16, kernel, pads, strides, seed=sum(kernel) + sum(pads), per_channel=per_channel)
    original = model.SerializeToString()
    assert group_pixel_columns(model)
    onnx.checker.check_model(model)
    pixels = np.random.default_rng(1).integers(0, 256, (3, 12, 16, 3), dtype=np.uint8)
    pixels[0] = 255  # saturates some outputs
    (a,), (b,) = (_run(m, pixels) for m in (original, model.SerializeToString()))
    assert a.shape == b.shape and np.array_equal(a, b)
    assert len(np.unique(a)) > 10  # not a saturated, constant output


def test_columns_are_grouped_only_where_the_shape_allows_it() -> None:
    def shared_weight_scale(model: onnx.ModelProto) -> None:  # another node reads the weights' scale
        model.graph.node.append(onnx.helper.make_node("Identity", ["w_scale"], ["w_scale_copy"]))

    def per_channel_output(model: onnx.ModelProto) -> None:  # one output scale per channel
        scale = next(i for i in model.graph.initializer if i.name == "y_scale")
        scale.CopyFrom(onnx.numpy_helper.from_array(np.full(5, 0.5, np.float32), "y_scale"))

    cases = [
        (14, [2, 2], [1, 1, 1, 1], None),  # width not a multiple of 4
        (16, [2, 1], [1, 1, 1, 1], None),  # horizontal stride 1
        (12, [2, 2], [0, 0, 0, 0], None),  # an odd output width (5): no whole pairs of phases
        (16, [2, 2], [1, 1, 1, 1], shared_weight_scale),
        (16, [2, 2], [1, 1, 1, 1], per_channel_output),
    ]
    for width, strides, pads, change in cases:
        model = _single_conv(width, (3, 3), pads, strides, seed=0)
        if change is not None:
            change(model)
        before = model.SerializeToString()
        assert not group_pixel_columns(model), (width, strides, pads, change)
        assert model.SerializeToString() == before


def test_grouped_weights_put_each_tap_where_its_pixel_lands() -> None:
    weight = np.arange(1, 1 + 2 * 3 * 1 * 3).reshape(2, 3, 1, 3)  # (O, C, kh, kw), no zero tap
    grouped, pad_left = group_columns_weight(weight, left=0)
    # Output column 2q reads pixels 4q..4q+2 (group q, slots 0-2); 2q+1 reads 4q+2..4q+4 (slots 2-3, group q+1).
    assert grouped.shape == (2 * 2, PIXEL_GROUP * 3, 1, 2) and pad_left == 0
    for kx, (phase, slot, group) in enumerate([(0, 0, 0), (0, 1, 0), (0, 2, 0)]):
        assert np.array_equal(grouped[phase * 2 : phase * 2 + 2, slot * 3 : slot * 3 + 3, :, group], weight[..., kx])
    for kx, (slot, group) in enumerate([(2, 0), (3, 0), (0, 1)]):
        assert np.array_equal(grouped[2:, slot * 3 : slot * 3 + 3, :, group], weight[..., kx])
    assert np.count_nonzero(grouped) == 2 * weight.size  # every tap once per phase, nothing else
    _, pad_left = group_columns_weight(weight, left=1)  # reads pixel -1: one group of padding on the left
    assert pad_left == 1


def test_onnxruntime_runs_the_grouped_convolution_on_the_pixels_in_place(int8_file: Path, tmp_path: Path) -> None:
    """What makes grouping pay: after onnxruntime's layout optimisations the grouped convolution reads the
    reshaped pixels directly, with no transpose of the image before or after it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(str(int8_file), options, providers=["CPUExecutionProvider"])
    nodes = list(onnx.load(str(tmp_path / "optimised.onnx")).graph.node)
    reshape = next(n for n in nodes if n.op_type == "Reshape" and n.input[0] == "pixels")
    readers = [n for n in nodes if reshape.output[0] in n.input]
    assert [n.op_type for n in readers] == ["QLinearConv"], readers
    after = [n for n in nodes if readers[0].output[0] in n.input]
    assert [n.op_type for n in after] == ["Reshape"], after  # ungrouped without a transpose


@pytest.mark.parametrize("leading", [0, 9])
def test_float_nodes_are_the_input_stage_leading_convs_and_the_postprocessing(tiny_onnx: Path, leading: int) -> None:
    nodes = list(onnx.load(str(tiny_onnx)).graph.node)
    kept = float_nodes(onnx.load(str(tiny_onnx)), leading)
    first_quantised = [i for i, n in enumerate(nodes) if n.op_type == "Conv"][leading]
    head = next(i for i, n in enumerate(nodes) if n.op_type == "Gemm")
    tail = [n.name for n in nodes[head + 1 :]]
    assert [nodes[head + 1].op_type, nodes[head + 2].op_type] == ["Softmax", "TopK"]  # the graph's postprocessing
    assert kept == [n.name for n in nodes[:first_quantised]] + tail
    assert sum(nodes[i].op_type == "Conv" for i in range(first_quantised)) == leading


def test_the_daemon_classifier_runs_the_int8_file(int8_file: Path, tiny_onnx: Path) -> None:
    int8 = OnnxClassifier(ModelConfig(onnx=int8_file))
    fp32 = OnnxClassifier(ModelConfig(onnx=tiny_onnx))
    batch = np.stack([int8.prepare(img) for img in synthetic_images(4, seed=9)])
    a, b = int8.logits(batch), fp32.logits(batch)
    assert a.shape == b.shape
    # Quantised, so not equal; but the same function: close relative to the logits' spread.
    assert not np.array_equal(a, b)
    assert np.abs(a - b).mean() < 0.25 * np.abs(b - b.mean()).mean() + 1e-3
    preds = int8.predict(batch)
    assert len(preds) == 4 and all(abs(float(p.probs.sum()) - 1) < 1e-4 for p in preds)


def snap_to_grid(w: np.ndarray, levels: int = 254) -> np.ndarray:
    """``w`` moved to the nearest points of a per-tensor 8-bit grid through zero (as a dequantised checkpoint)."""
    step = (float(w.max()) - float(w.min())) / levels
    return (np.round(w.astype(np.float64) / step) * step).astype(np.float32)


def test_grid_step_finds_a_dequantised_tensor_and_rejects_float_weights() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.1, (16, 8, 3, 3)).astype(np.float32)
    assert grid_step(w) is None
    assert grid_step(np.zeros((4, 4), np.float32)) is None
    snapped = snap_to_grid(w)
    step = grid_step(snapped)
    assert step is not None and np.isclose(step, (float(w.max()) - float(w.min())) / 254, rtol=1e-5)
    assert np.allclose(snapped / step, np.round(snapped / step), atol=1e-3)


def test_aligned_scales_are_one_step_unless_a_channel_reaches_past_127_steps(tiny_onnx: Path) -> None:
    model = onnx.load(str(tiny_onnx))
    weights = {i.name: i for i in model.graph.initializer}
    conv = next(n for n in model.graph.node if n.op_type == "Conv" and n.input[1] in weights)
    assert aligned_weight_scales(model) == {}  # trained in float: onnxruntime's own scales
    shape = onnx.numpy_helper.to_array(weights[conv.input[1]]).shape
    step = 0.01
    q = np.random.default_rng(1).integers(-100, 55, shape)
    q[0].flat[0], q[0].flat[1] = -200, 54  # channel 0 reaches 200 steps; the tensor spans 254
    q[1].flat[0] = -128  # one step too far for int8's symmetric [-127, 127]
    weights[conv.input[1]].CopyFrom(onnx.numpy_helper.from_array((q * step).astype(np.float32), conv.input[1]))
    channels = aligned_weight_scales(model)[conv.input[1]]
    assert channels[0]["axis"] == 0 and len(channels) == shape[0]
    assert np.isclose(channels[0]["scale"], 200 * step / 127) and np.isclose(channels[1]["scale"], 128 * step / 127)
    assert all(np.isclose(c["scale"], step) and c["zero_point"] == 0 for c in channels[2:])


def test_grid_weights_are_quantised_exactly(tiny_onnx: Path, tmp_path: Path) -> None:
    """A checkpoint dequantised from 8 bits keeps its weights through INT8 export; ORT's own scales round them."""
    model = onnx.load(str(tiny_onnx))
    originals = {}
    for init in model.graph.initializer:
        w = onnx.numpy_helper.to_array(init)
        if w.ndim == 4 and w.shape[0] > 1:  # convolution weights
            step = float(np.abs(w).max()) / 127
            q = np.round(w / step)
            q.flat[0], q.flat[1] = -127, 127  # a grid of 254 steps that no channel reaches past
            w = (q * step).astype(np.float32)
            originals[init.name] = w
            init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
    snapped = tmp_path / "snapped.onnx"
    onnx.save(model, str(snapped))
    first_weight = next(n for n in model.graph.node if n.op_type == "Conv").input[1]
    fp32 = OnnxClassifier(ModelConfig(onnx=snapped))
    calibration = np.stack([fp32.prepare(img) for img in synthetic_images(8, seed=3)])

    def worst_error(align: bool) -> float:
        out = quantize_int8(
            snapped, tmp_path / f"int8-{align}.onnx", calibration, align_weights=align, group_columns=False
        )
        quantized = dequantized_weights(out)
        # The first convolution's weights were folded with the input stage (times a / s = 1: the same values).
        quantized[first_weight] = quantized.pop("eyed_folded_weight")
        assert quantized.keys() >= originals.keys(), originals.keys() - quantized.keys()  # every conv quantised
        return max(float(np.abs(quantized[k] - originals[k]).max() / grid_step(originals[k])) for k in originals)

    assert worst_error(align=True) < 1e-3  # exactly the same weights
    assert worst_error(align=False) > 0.05  # onnxruntime's max/127 grid moves them by a fraction of a step


def _activation_scales(path: Path) -> dict[str, float]:
    graph = onnx.load(str(path)).graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    return {n.input[0]: float(inits[n.input[1]]) for n in graph.node if n.op_type == "QuantizeLinear"}


def test_every_calibration_batch_counts(tiny_onnx: Path, tmp_path: Path) -> None:
    """Ranges come from all calibration frames, not only the last batches: onnxruntime's
    CalibMaxIntermediateOutputs silently dropped the earlier ones, so changing the first batch changed nothing."""
    fp32 = OnnxClassifier(ModelConfig(onnx=tiny_onnx))
    frames = np.stack([fp32.prepare(img) for img in synthetic_images(48, seed=5)])
    bright = frames.copy()
    bright[:8] = 255 - bright[:8] // 8  # only the first batch differs
    a = _activation_scales(quantize_int8(tiny_onnx, tmp_path / "a.onnx", frames))
    b = _activation_scales(quantize_int8(tiny_onnx, tmp_path / "b.onnx", bright))
    assert a.keys() == b.keys() and len(a) > 5
    assert sum(not np.isclose(a[k], b[k], rtol=1e-4) for k in a) > len(a) // 2


def test_a_short_last_calibration_batch_is_left_out(tiny_onnx: Path, tmp_path: Path) -> None:
    """The moving average weighs every batch's min and max alike: a ninth frame alone in its batch counted as
    much as the eight before it together. It is left out when there is a full batch."""
    from eyed.model.quantize import CALIBRATION_BATCH, calibration_frames

    assert [calibration_frames(n) for n in (1, 6, 8, 9, 15, 16, 300)] == [1, 6, 8, 8, 8, 16, 296]
    fp32 = OnnxClassifier(ModelConfig(onnx=tiny_onnx))
    frames = np.stack([fp32.prepare(img) for img in synthetic_images(CALIBRATION_BATCH, seed=6)])
    outlier = np.full((1, *frames.shape[1:]), 255, dtype=np.uint8)  # a white frame stretches every range
    full = _activation_scales(quantize_int8(tiny_onnx, tmp_path / "full.onnx", frames))
    longer = _activation_scales(quantize_int8(tiny_onnx, tmp_path / "longer.onnx", np.concatenate([frames, outlier])))
    assert full == longer


def test_the_calibration_record_counts_the_frames_used(
    tiny_dataset: Path, tiny_checkpoint: Path, tiny_onnx: Path, tmp_path: Path
) -> None:
    # (The later --calibration and --check win over _export_int8's.)
    out = _export_int8(
        tmp_path / "m8.onnx", tiny_dataset, tiny_checkpoint, tiny_onnx, "--calibration", "9", "--check", "2"
    )
    record = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}[META_QUANTIZATION])
    # 9 frames read (records 0-9, the 6th corrupt), 8 used; the check's frames still come after all 9.
    assert record["calibration"]["frames"] == 8
    assert record["check"]["skip"] == 10 and record["check"]["frames"] == 2


def test_an_int8_export_refuses_to_replace_its_fp32_input(
    tiny_dataset: Path,
    tiny_checkpoint: Path,
    tiny_onnx: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--output = model.onnx replaced the only float model with its INT8 version (exit 0); a device without
    torch could not export it again. Refused before any frame is read, however the two paths are written."""
    from eyed.model import quantize

    def no_work(*args: Any) -> None:
        raise AssertionError("frames were read before the output was refused")

    monkeypatch.setattr(quantize, "_prepared", no_work)
    fp32 = tmp_path / "same.onnx"
    fp32.write_bytes(tiny_onnx.read_bytes())
    (tmp_path / "link.onnx").symlink_to(fp32)
    monkeypatch.chdir(tmp_path)
    for output, model_onnx in ((fp32, fp32), (Path("same.onnx"), fp32), (Path("link.onnx"), Path("same.onnx"))):
        capsys.readouterr()
        args = _int8_args(tiny_dataset, tiny_checkpoint, model_onnx)
        assert main(["export", "--int8", *args, "--output", str(output), "--calibration", "4"]) == 73, output
        err = capsys.readouterr().err
        assert f"cannot write {output}: it is {model_onnx}, the FP32 model being quantised" in err, err
    assert fp32.read_bytes() == tiny_onnx.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.onnx", "same.onnx"]


def test_int8_metadata_records_absolute_paths(
    tiny_dataset: Path, tiny_checkpoint: Path, tiny_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As typed, a relative model.onnx or dataset named another file from another working directory, and eyed
    bench warned that the INT8 file came from another model."""
    import os

    work = tmp_path / "work"
    work.mkdir()
    (work / "fp32.onnx").write_bytes(tiny_onnx.read_bytes())
    monkeypatch.chdir(work)
    dataset = Path(os.path.relpath(tiny_dataset, work))
    out = _export_int8(Path("m8.onnx"), dataset, tiny_checkpoint, Path("fp32.onnx"))
    record = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}[META_QUANTIZATION])
    assert record["from"] == str(work / "fp32.onnx")
    assert record["calibration"]["dataset"] == str(tiny_dataset)
