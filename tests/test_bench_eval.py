"""eyed bench, eyed eval and eyed priors end to end on the tiny generated model and dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eyed.cli import main
from eyed.model.labels import load_priors


@pytest.fixture
def overrides(tiny_dataset: Path, tiny_checkpoint: Path, tiny_onnx: Path) -> list[str]:
    return [
        "--set", f"source.dataset={tiny_dataset}",
        "--set", "source.split=train",
        "--set", f"model.id={tiny_checkpoint}",
        "--set", f"model.onnx={tiny_onnx}",
    ]  # fmt: skip


def test_bench_json_compares_every_path_on_the_same_frames(
    overrides: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["bench", *overrides, "--frames", "8", "--rounds", "2", "--seed-frames", "4", "--batch", "4", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    names = [r["name"] for r in report["rows"]]
    assert names == [
        "bare onnxruntime",
        "daemon path -> SUB process",
        "daemon path, no subscriber",
        "daemon path -> SUB process, batch 4",
        "transformers loop (seed)",
    ]
    for row in report["rows"]:
        assert row["fps"] > 0 and row["p99_ms"] >= row["p50_ms"] > 0
    # 11 frames decode from the 12 records (one is corrupt), 8 are used, twice each for the onnx paths.
    assert [r["frames"] for r in report["rows"]] == [16, 16, 16, 16, 4]
    assert set(report["ratios"]) == {
        "daemon/bare",
        "daemon (no subscriber)/bare",
        "daemon batch 4/daemon batch 1",
        "daemon/transformers",
    }
    assert all(v > 0 for v in report["ratios"].values())


def test_eval_reports_accuracy_and_fps(overrides: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", *overrides]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    last = dict(part.split("=") for part in lines[-1].split())
    assert set(last) == {"accuracy", "fps", "frames", "space"}
    assert 0.0 <= float(last["accuracy"]) <= 1.0 and float(last["fps"]) > 0
    assert last["frames"] == "11" and last["space"] == "coarse"
    assert any("group-sum" in line for line in lines)


def test_eval_json_has_a_consistent_confusion_matrix(overrides: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", *overrides, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    matrix = report["confusion"]
    assert len(matrix) == 10 and all(len(row) == 10 for row in matrix)
    assert sum(map(sum, matrix)) == 11
    assert sum(matrix[i][i] for i in range(10)) / 11 == pytest.approx(report["accuracy"])


def test_priors_are_written_and_loadable(overrides: list[str], tmp_path: Path) -> None:
    out = tmp_path / "priors.json"
    assert main(["priors", *overrides, "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["frames"] == 11 and "no labels" in data["method"]
    classes = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    priors = load_priors(str(out), "cifar10", classes)
    assert priors is not None and priors.sum() == pytest.approx(1.0, abs=1e-5)
