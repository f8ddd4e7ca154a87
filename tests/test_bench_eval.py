"""eyed bench, eyed eval and eyed priors end to end on the tiny generated model and dataset."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from eyed.bench import pool_rounds, summarise
from eyed.cli import main
from eyed.config import load_settings
from eyed.evaluate import _Scorer
from eyed.model.labels import CoarseMapper, build_mapper, load_priors
from eyed.types import Frame
from tests.conftest import imagenet_like_labels, synthetic_images, write_parquet_dataset


@pytest.fixture
def overrides(tiny_dataset: Path, tiny_checkpoint: Path, tiny_onnx: Path) -> list[str]:
    return [
        "--set", f"source.dataset={tiny_dataset}",
        "--set", "source.split=train",
        "--set", f"model.id={tiny_checkpoint}",
        "--set", f"model.onnx={tiny_onnx}",
    ]  # fmt: skip


@pytest.mark.parametrize(("cores", "threads", "workers"), [(2, 0, 2), (2, 2, 1)])
def test_bench_json_compares_every_path_on_the_same_frames(
    overrides: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    cores: int,
    threads: int,
    workers: int,
) -> None:
    monkeypatch.setattr("eyed.config.available_cores", lambda: cores)
    args = ["--frames", "8", "--passes", "2", "--rounds", "2", "--seed-frames", "4", "--batch", "4", "--json"]
    code = main(
        ["bench", *overrides, "--set", f"model.cache_dir={tmp_path}", "--set", f"model.threads={threads}", *args]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    # The daemon's path runs as the daemon would on this replay at fps 0.
    assert report["daemon"] == {"workers": workers, "threads": threads or 1, "spinning": "on"}
    assert report["threads"] == (threads or cores)  # the bare loop's, one call at a time on every core
    names = [r["name"] for r in report["rows"]]
    at_once = f"bare onnxruntime, {workers} frames at once"
    paths = ["bare onnxruntime", *([at_once] if workers > 1 else []), "daemon path -> SUB process"]
    paths += ["daemon path, no subscriber", "daemon path -> SUB process, batch 4"]
    assert names == [f"{p} {name}" for p in ("fp32", "int8") for name in paths] + ["transformers loop (seed)"]
    for row in report["rows"]:
        assert row["fps"] > 0 and row["p99_ms"] >= row["p50_ms"] > 0
    # 11 frames decode from the 12 records (one is corrupt), 8 are used: each onnx path goes over them twice in
    # each of two rounds.
    assert report["rounds"] == 2 and report["passes"] == 2
    assert [r["frames"] for r in report["rows"]] == [32] * (2 * len(paths)) + [4]
    # For machines, keys that do not change with the cores, workers or --batch (the names above do).
    keys = ["bare", *(["bare at once"] if workers > 1 else []), "daemon", "daemon no subscriber", "daemon batched"]
    assert [r["key"] for r in report["rows"]] == [f"{p} {k}" for p in ("fp32", "int8") for k in keys] + ["transformers"]
    assert report["batch"] == 4
    expected = {"int8/fp32 bare", "int8/fp32 daemon"}
    for p in ("fp32", "int8"):
        expected |= {f"{p} daemon/bare", f"{p} daemon no subscriber/bare", f"{p} daemon batched/daemon"}
        expected.add(f"{p} daemon/transformers")
        if workers > 1:
            expected.add(f"{p} daemon/bare at once")
    if workers > 1:
        expected.add("int8/fp32 bare at once")
    assert set(report["ratios"]) == expected
    assert all(v > 0 for v in report["ratios"].values())
    # The text names them for people, with the counts.
    assert "fp32 daemon batch 4/daemon batch 1: " in report["text"]
    assert (f"int8/fp32 {at_once}: " in report["text"]) == (workers > 1)
    # The INT8 model was quantised once into the cache, and is a different file from the FP32 one.
    assert Path(report["onnx"]["int8"]).parent == tmp_path / "onnx" and report["onnx"]["int8"] != report["onnx"]["fp32"]


def test_eval_reports_accuracy_and_fps(
    overrides: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("eyed.config.available_cores", lambda: 2)
    assert main(["eval", *overrides]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    last = dict(part.split("=") for part in lines[-1].split())
    assert set(last) == {"accuracy", "fps", "frames", "space"}
    assert 0.0 <= float(last["accuracy"]) <= 1.0 and float(last["fps"]) > 0
    assert last["frames"] == "11" and last["space"] == "coarse"
    assert any("group-sum" in line for line in lines)
    assert any(line.startswith("2 frame(s) at once") for line in lines)


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


def test_eval_compares_variants_on_the_same_frames(
    overrides: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "cm.png"
    code = main(["eval", *overrides, "--vs", "model.coarse_priors=none", "--png", str(png), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    [other] = report["vs"]
    assert other["frames"] == report["frames"] == 11
    # Without priors the variant's corrected accuracy is the main model's group-sum accuracy: same frames.
    assert other["accuracy"] == pytest.approx(report["accuracies"]["group-sum"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_variant_checkpoint_is_run_instead_of_model_onnx(
    overrides: list[str], tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--vs model.id=DIR with model.onnx configured scored model.onnx again (+0.00 points), even for a folder
    that does not exist: the variant is that checkpoint, exported into the cache."""
    cache = ["--set", f"model.cache_dir={tmp_path / 'cache'}"]
    missing = tmp_path / "no-such-checkpoint"
    assert main(["eval", *overrides, *cache, "--vs", f"model.id={missing}"]) == 69
    assert f"model.id {missing}: no such folder" in capsys.readouterr().err
    other = shutil.copytree(tiny_checkpoint, tmp_path / "other")
    assert main(["eval", *overrides, *cache, "--vs", f"model.id={other}", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    [variant] = report["vs"]
    assert (variant["model"], variant["onnx"], variant["name"]) == (str(other), None, f"{other} (onnx)")
    assert report["onnx"] is not None and report["name"].startswith(report["onnx"])
    assert list((tmp_path / "cache" / "onnx").glob("other-*.onnx"))  # exported, as the daemon would
    # Both given: the variant is that file, whatever checkpoint it names.
    assert main(["eval", *overrides, "--vs", f"model.id={other},model.onnx={report['onnx']}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["vs"][0]["onnx"] == report["onnx"]


@pytest.mark.parametrize("option", ["source.dataset", "source.skip", "drift.window"])
def test_a_variant_cannot_change_the_source_or_anything_but_the_model(
    overrides: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str
) -> None:
    """--vs source.dataset=... was scored on the configuration's own frames, under a header naming the other
    dataset."""
    value = tmp_path if option == "source.dataset" else 3
    assert main(["eval", *overrides, "--vs", f"{option}={value}"]) == 78
    assert f"--vs {option}={value}: a variant can change model.* options only" in capsys.readouterr().err


def test_eval_and_priors_record_the_model_that_ran(
    overrides: list[str], tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With model.onnx set, model.id is not what ran: the file's own model id is recorded."""
    elsewhere = [*overrides, "--set", "model.id=some/other-model"]
    assert main(["eval", *elsewhere, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == str(tiny_checkpoint)
    out = tmp_path / "priors.json"
    assert main(["priors", *elsewhere, "--output", str(out)]) == 0
    assert json.loads(out.read_text())["model"] == str(tiny_checkpoint)


def test_eval_rejects_an_unknown_variant_option(overrides: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", *overrides, "--vs", "model.nope=1"]) == 78
    assert "model.nope" in capsys.readouterr().err


def test_latency_percentiles_are_over_every_frame_of_every_round() -> None:
    spiky = summarise("p", [1.0] * 98 + [50.0, 50.0], 1.0, 100)  # its own p99 is a spike
    calm = summarise("p", [1.0] * 100, 1.0, 100)
    row = pool_rounds("p", [spiky, calm])
    assert row["frames"] == 200
    # Two slow frames in 200 are 1% of them: the pooled p99 sits just above the calm frames, not at the spike.
    assert row["p99_ms"] == pytest.approx(float(np.percentile([1.0] * 198 + [50.0] * 2, 99)))
    assert row["p99_ms"] < 2
    assert "latencies_ms" not in row


def test_eval_and_priors_read_a_looping_source_once(
    overrides: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A daemon's configuration (a looping, paced feed) serves eval and priors as it is: each record once."""
    looping = [*overrides, "--set", "source.loop=true", "--set", "source.fps=2"]
    assert main(["eval", *looping, "--set", "source.limit=30", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["frames"] == 11
    out = tmp_path / "priors.json"
    assert main(["priors", *looping, "--output", str(out)]) == 0  # limit 0: would never end
    assert json.loads(out.read_text())["frames"] == 11


def test_eval_says_what_is_missing(overrides: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", *overrides, "--skip", "100"]) == 69
    dataset = overrides[1].removeprefix("source.dataset=")
    assert capsys.readouterr().err.strip() == f"eyed: no frames from {dataset}:train from record 100 on"
    # Labels, but none among the model's classes (CIFAR-10's, and no coarse mapping): said after the run.
    assert main(["eval", *overrides, "--set", "model.coarse=none"]) == 78
    assert "needs a labelled source: none of the 11 frames" in capsys.readouterr().err


def test_eval_refuses_an_unlabelled_source_at_its_first_frame(
    overrides: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """It used to read (and classify) the whole source before saying it needs labels."""
    import eyed.evaluate

    read = 0
    bar = eyed.evaluate.progress

    def counted(frames: Iterable[Frame], *args: Any, **kwargs: Any) -> Iterator[Frame]:
        nonlocal read
        for frame in bar(frames, *args, **kwargs):
            read += 1
            yield frame

    monkeypatch.setattr(eyed.evaluate, "progress", counted)
    unlabelled = write_parquet_dataset(tmp_path / "unlabelled", synthetic_images(40), [None] * 40)  # type: ignore[list-item]
    assert main(["eval", *overrides, "--set", f"source.dataset={unlabelled}"]) == 78
    assert f"needs a labelled source: frame 1 of {unlabelled}:train has no label" in capsys.readouterr().err
    assert read == 1


def test_priors_need_a_model_with_a_coarse_mapping(
    overrides: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "priors.json"
    assert main(["priors", *overrides, "--set", "model.coarse=none", "--output", str(out)]) == 78
    assert "no priors to estimate" in capsys.readouterr().err and not out.exists()


def test_an_output_that_cannot_be_written_fails_before_the_run(
    overrides: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit 73 at once, not a traceback after the run: the source named here does not exist, so a run would
    have failed with 69 first."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    missing = [*overrides, "--set", f"source.dataset={tmp_path / 'nowhere'}"]
    for command in (
        ["priors", "--output", str(blocker / "p.json")],
        ["profile", "--output", str(blocker / "ref.json")],
        ["eval", "--png", str(blocker / "cm.png")],
        ["export", "--output", str(blocker / "m.onnx")],
        ["export", "--int8", "--output", str(tmp_path)],  # a folder
        ["finetune", "--output", str(blocker / "head")],
        ["drift-report", "--output", str(blocker / "d.png")],
    ):
        capsys.readouterr()
        assert main([command[0], *missing, *command[1:]]) == 73, command
        assert capsys.readouterr().err.startswith(f"eyed: cannot write {command[-1]}: "), command
    # A chart in a format matplotlib cannot write is said before the run, too.
    for command in (["eval", "--png", str(tmp_path / "cm.txt")], ["drift-report", "--output", str(tmp_path / "d.doc")]):
        capsys.readouterr()
        assert main([command[0], *missing, *command[1:]]) == 73, command
        err = capsys.readouterr().err
        assert err.startswith(f"eyed: cannot write {command[-1]}: a chart is written as ") and "png" in err, err
    # A missing folder is made, as before.
    out = tmp_path / "new" / "folder" / "priors.json"
    assert main(["priors", *overrides, "--output", str(out)]) == 0 and out.is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["priors.json"]  # no probe or temporary file left


def test_charts_without_matplotlib_say_which_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from eyed.outputs import MissingExtra, pyplot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an install without the report extra has
    with pytest.raises(MissingExtra, match=r"eyed\[report\]"):
        pyplot()


def test_bench_without_the_onnx_package_says_how_to_go_on(
    overrides: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # an onnx-only install (a Pi) has onnxruntime, not onnx
    assert main(["bench", *overrides, "--set", f"model.cache_dir={tmp_path}", "--frames", "2"]) == 69
    err = capsys.readouterr().err
    assert "eyed[int8]" in err and "--no-int8" in err


class _FixedRunner:
    """An OfflineRunner's face for _Scorer: a classifier over ``labels`` (with ``mapper``'s coarse mapping, if
    any) whose logits are one-hot on the given predicted class of each frame, in order."""

    workers = 1

    def __init__(self, labels: list[str], predicted: list[str], mapper: CoarseMapper | None = None) -> None:
        post = SimpleNamespace(mapper=mapper, labels=labels)
        self.classifier = SimpleNamespace(post=post, name="fixed", backend="onnx")
        self._index = {c: i for i, c in enumerate(labels)}
        self._predicted = iter(predicted)

    def logits(self, frames: list[Frame]) -> np.ndarray:
        out = np.zeros((len(frames), len(self._index)), dtype=np.float32)
        for row in out:
            row[self._index[next(self._predicted)]] = 10.0
        return out


def test_the_confusion_matrix_has_truth_rows_and_per_class_is_recall() -> None:
    """Known truths and predictions: a transposed matrix (rows = predictions), or precision in place of recall,
    has the same sum and trace, so only exact figures catch them."""
    labels = ["cat", "dog", "fox"]
    truths = ["cat", "cat", "cat", "dog", "dog", "fox", "unicorn", "unicorn"]
    preds = ["cat", "dog", "dog", "dog", "fox", "fox", "cat", "fox"]
    frames = [Frame(np.zeros((2, 2, 3), np.uint8), i, 0.0, 0.0, truth) for i, truth in enumerate(truths)]
    runner = _FixedRunner(labels, preds)
    scorer = _Scorer(runner, load_settings(None, ["model.coarse=none"]))  # type: ignore[arg-type]
    scorer.add(frames[:5])
    scorer.add(frames[5:])
    report = scorer.report()
    assert report["classes"] == labels
    # confusion[truth][predicted]: of 3 cats, 1 called cat and 2 dog; of 2 dogs, 1 dog and 1 fox; the fox a fox.
    assert report["confusion"] == [[1, 2, 0], [0, 1, 1], [0, 0, 1]]
    # Recall: the share of each truth predicted right (precision would be cat 1, dog 1/3, fox 1/2).
    assert report["per_class"] == {"cat": pytest.approx(1 / 3), "dog": 0.5, "fox": 1.0}
    assert report["accuracy"] == pytest.approx(3 / 6)
    # The two unicorns are outside the label space: in no figure, but counted in the JSON, not only its text.
    assert report["frames"] == 6 and report["unscored"] == 2
    assert "2 frames had a truth outside the label space" in report["text"]


def test_a_top1_class_outside_every_group_counts_as_wrong_for_the_lookup() -> None:
    """The "top-1 lookup" accuracy is what a lookup-only system reports (the baseline the README compares
    against): a top-1 class that no group holds gives no coarse label, so it is wrong, not the first group's
    label. Without this, taking the first group for it went unseen."""
    labels = imagenet_like_labels()
    runner = _FixedRunner(labels, ["unmapped class 0"] * 2, build_mapper(labels, "cifar10", "builtin"))
    scorer = _Scorer(runner, load_settings(None, []))  # type: ignore[arg-type]
    scorer.add([Frame(np.zeros((2, 2, 3), np.uint8), i, 0.0, 0.0, "airplane") for i in range(2)])
    assert scorer.report()["accuracies"]["top-1 lookup"] == 0.0
