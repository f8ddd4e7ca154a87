"""eyed export --int8 on the tiny generated model and dataset; the daemon's classifier runs the result."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from eyed.cli import main
from eyed.config import ModelConfig
from eyed.model.onnx_backend import OnnxClassifier
from eyed.model.quantize import FLOAT_LEADING_CONVS, META_QUANTIZATION, float_nodes
from tests.conftest import synthetic_images


@pytest.fixture(scope="module")
def int8_file(tiny_dataset: Path, tiny_checkpoint: Path, tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("int8") / "tiny-int8.onnx"
    args = ["--set", f"source.dataset={tiny_dataset}", "--set", "source.split=train"]
    args += ["--set", f"model.id={tiny_checkpoint}", "--set", f"model.onnx={tiny_onnx}"]
    assert main(["export", "--int8", *args, "--output", str(out), "--calibration", "6", "--check", "8"]) == 0
    return out


def test_int8_export_records_calibration_and_check(int8_file: Path, tiny_dataset: Path) -> None:
    meta = {p.key: p.value for p in onnx.load(str(int8_file)).metadata_props}
    record = json.loads(meta[META_QUANTIZATION])
    assert record["calibration"]["frames"] == 6 and record["calibration"]["dataset"] == str(tiny_dataset)
    # 12 records, the 6th corrupt: records 0-6 give the 6 calibration frames, the other 5 are checked.
    assert record["check"]["skip"] == 7 and record["check"]["frames"] == 5
    assert 0.0 <= record["check"]["top1_agreement"] <= 1.0
    assert "eyed.labels" in meta and "eyed.preprocess" in meta  # still runs without torch


def test_int8_graph_is_static_qdq_with_float_input_stage_and_head(int8_file: Path, tiny_onnx: Path) -> None:
    graph = onnx.load(str(int8_file)).graph
    ops = Counter(n.op_type for n in graph.node)
    convs = Counter(n.op_type for n in onnx.load(str(tiny_onnx)).graph.node)["Conv"]
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    assert ops["DynamicQuantizeLinear"] == 0 and ops["ConvInteger"] == 0  # static, not dynamic
    # Every convolution after the leading float ones takes its weight as int8, through a DequantizeLinear.
    int8_init = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.INT8}
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int8_init}
    quantized_convs = [n for n in graph.node if n.op_type == "Conv" and n.input[1] in dequantized]
    assert len(quantized_convs) == convs - FLOAT_LEADING_CONVS
    gemm = next(n for n in graph.node if n.op_type == "Gemm")
    producers = {o: n.op_type for n in graph.node for o in n.output}
    assert all(producers.get(i) != "DequantizeLinear" for i in gemm.input[1:])  # the head kept float weights


@pytest.mark.parametrize("leading", [0, 9])
def test_float_nodes_are_the_input_stage_leading_convs_and_the_classifier(tiny_onnx: Path, leading: int) -> None:
    nodes = list(onnx.load(str(tiny_onnx)).graph.node)
    kept = float_nodes(onnx.load(str(tiny_onnx)), leading)
    first_quantised = [i for i, n in enumerate(nodes) if n.op_type == "Conv"][leading]
    head = next(i for i, n in enumerate(nodes) if n.op_type == "Gemm")
    tail = [n.name for n in nodes[head:]]
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
