"""Drift monitoring wired into the real daemon: eyed profile, drift.<id> events at a real SUB socket, and
eyed drift-report on what a subscriber recorded. Tiny generated model and data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from eyed.cli import EXIT_CONFIG, main
from eyed.drift import load_reference
from eyed.model.labels import load_priors
from tests.conftest import CIFAR10, synthetic_images, write_parquet_dataset
from tests.daemon_helpers import collect, finish, start_daemon

PAYLOAD_FIELDS = {"schema", "type", "source", "seq", "ts", "window", "n", "status", "metrics", "fired"}


@pytest.fixture(scope="module")
def clean_and_dark(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """40 varied images, and the same images darkened to a third (a lens going dark, night falling)."""
    images = synthetic_images(40, seed=11)
    labels = [i % 10 for i in range(40)]
    clean = write_parquet_dataset(tmp_path_factory.mktemp("clean"), images, labels)
    dark = [(img.astype(np.float32) * 0.3).astype(np.uint8) for img in images]
    return clean, write_parquet_dataset(tmp_path_factory.mktemp("dark"), dark, labels)


@pytest.fixture(scope="module")
def reference(clean_and_dark: tuple[Path, Path], tiny_checkpoint: Path, tiny_onnx: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "reference.json"
    args = ["--set", f"source.dataset={clean_and_dark[0]}", "--set", "source.split=train"]
    args += ["--set", f"model.id={tiny_checkpoint}", "--set", f"model.onnx={tiny_onnx}"]
    assert main(["profile", *args, "--output", str(out)]) == 0
    return out


def test_a_profile_too_short_to_calibrate_is_refused_and_replaces_nothing(
    reference: Path, clean_and_dark: tuple[Path, Path], tiny_onnx: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """39 frames: a reference the daemon refuses to start with (exit 78) must not overwrite a good one."""
    good = reference.read_bytes()
    args = ["--set", f"source.dataset={clean_and_dark[0]}", "--set", "source.split=train", "--set", "source.limit=39"]
    assert main(["profile", *args, "--set", f"model.onnx={tiny_onnx}", "--output", str(reference)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"{reference} not written" in err and "too few to calibrate" in err, err
    assert reference.read_bytes() == good


def settings(dataset: Path, onnx: Path, endpoint: str, **extra: object) -> dict[str, object]:
    return {
        "source.dataset": dataset,
        "source.split": "train",
        "source.id": "shelf",
        "source.loop": True,
        "source.limit": 200,
        "model.onnx": onnx,
        "publish.endpoint": endpoint,
        "publish.wait_subscribers": 1,
        "drift.window": 40,
        **extra,
    }


def test_profile_is_a_drift_reference_and_a_priors_file(reference: Path) -> None:
    ref = load_reference(reference)
    assert ref.frames == 40 and ref.coarse_classes == tuple(CIFAR10)
    assert "brightness" in ref.histograms
    priors = load_priors(str(reference), "cifar10", tuple(CIFAR10))  # model.coarse_priors can point at it
    assert priors is not None and priors.sum() == pytest.approx(1.0, abs=1e-4)
    text = reference.read_text()
    assert len(text) < 200_000  # statistics and counts, not images


def test_profile_estimates_priors_with_the_correction_off(
    clean_and_dark: tuple[Path, Path], tiny_checkpoint: Path, tiny_onnx: Path, tmp_path: Path
) -> None:
    out = tmp_path / "reference.json"
    args = ["--set", f"source.dataset={clean_and_dark[0]}", "--set", "source.split=train"]
    args += ["--set", f"model.id={tiny_checkpoint}", "--set", f"model.onnx={tiny_onnx}"]
    assert main(["profile", *args, "--set", "model.coarse_priors=none", "--output", str(out)]) == 0
    priors = load_priors(str(out), "cifar10", tuple(CIFAR10))
    assert priors is not None and priors.sum() == pytest.approx(1.0, abs=1e-4)


def test_daemon_without_reference_learns_then_monitors(
    clean_and_dark: tuple[Path, Path], tiny_onnx: Path, endpoint: str
) -> None:
    proc = start_daemon(settings(clean_and_dark[0], tiny_onnx, endpoint, **{"drift.enabled": True}))
    events = collect(endpoint)
    code, err = finish(proc)
    assert code == 0, err
    drift = [p for t, p in events if t == "drift.shelf"]
    labels = [p for t, p in events if t == "label.shelf"]
    assert [p["seq"] for p in labels] == list(range(200))  # drift work never costs a label event
    assert [p["window"] for p in drift] == list(range(5)) and all(p["n"] == 40 for p in drift)
    for p in drift:
        assert set(p) >= PAYLOAD_FIELDS and p["type"] == "drift" and p["schema"] == 1
        assert p["reference"] == "self"
    # The first drift.learn_windows (4) windows become the reference; the fifth is compared with them.
    assert [p["learning"] for p in drift] == [True] * 4 + [False]
    assert drift[-1]["status"] == "ok" and drift[-1]["metrics"], json.dumps(drift[-1])
    assert "the first 4 windows" in err  # the log says there is no reference file


def test_daemon_detects_darkening_against_a_profile(
    clean_and_dark: tuple[Path, Path], tiny_onnx: Path, reference: Path, endpoint: str, tmp_path: Path
) -> None:
    proc = start_daemon(settings(clean_and_dark[1], tiny_onnx, endpoint, **{"drift.reference": reference}))
    events = collect(endpoint)
    code, err = finish(proc)
    assert code == 0, err
    drift = [p for t, p in events if t == "drift.shelf"]
    assert len(drift) == 5 and all(p["reference"] == "file" and not p["learning"] for p in drift)
    # Two windows over the drift threshold in a row (drift.consecutive) before the status says drift.
    assert drift[0]["status"] == "warn" and drift[1]["status"] == "drift"
    assert "psi_brightness" in drift[0]["fired"]
    assert "status=drift" in err  # one structured log line per window
    # eyed drift-report draws what a subscriber recorded (eyed subscribe --json lines).
    recorded = tmp_path / "drift.jsonl"
    recorded.write_text("".join(json.dumps({"topic": t, **p}) + "\n" for t, p in events))
    png = tmp_path / "drift.png"
    assert main(["drift-report", "--events", str(recorded), "--reference", str(reference), "--output", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_an_unreadable_reference_is_a_config_error(tiny_dataset: Path, tiny_onnx: Path, endpoint: str) -> None:
    proc = start_daemon(settings(tiny_dataset, tiny_onnx, endpoint, **{"drift.reference": "/nonexistent/ref.json"}))
    code, err = finish(proc)
    assert code == EXIT_CONFIG
    assert "drift.reference /nonexistent/ref.json: cannot read" in err
    assert "drift reference" not in err  # said once, not twice
    assert "warm-up" not in err and "publishing on" not in err  # found before the model loads


def test_drift_report_says_what_is_wrong_with_its_inputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], reference: Path
) -> None:
    png = str(tmp_path / "d.png")
    assert main(["drift-report", "--events", str(tmp_path / "nope.jsonl"), "--output", png]) == 1
    assert "--events" in capsys.readouterr().err
    garbage = tmp_path / "g.jsonl"
    garbage.write_text("{oops\n")
    assert main(["drift-report", "--events", str(garbage), "--output", png]) == 1
    assert "g.jsonl:1" in capsys.readouterr().err
    no_window = tmp_path / "w.jsonl"
    no_window.write_text('{"topic": "drift.cam", "type": "drift", "source": "cam", "status": "ok"}\n')
    assert main(["drift-report", "--events", str(no_window), "--output", png]) == 1  # not a KeyError traceback
    assert "w.jsonl:1: a drift event without a window number" in capsys.readouterr().err
    missing = str(tmp_path / "nope.json")
    assert main(["drift-report", "--events", str(garbage), "--reference", missing, "--output", png]) == EXIT_CONFIG
    assert "drift.reference" in capsys.readouterr().err


def test_daemon_windows_in_seconds(clean_and_dark: tuple[Path, Path], tiny_onnx: Path, endpoint: str) -> None:
    """drift.window_s on a replay paced at 100 fps: each window closes with its first frame half a second
    after its start, whatever its frame count, and is judged with thresholds calibrated for its size."""
    cfg = settings(clean_and_dark[0], tiny_onnx, endpoint, **{"drift.enabled": True, "drift.window_s": 0.5})
    del cfg["drift.window"]
    cfg |= {"drift.learn_windows": 2, "source.fps": 100, "source.limit": 300}
    proc = start_daemon(cfg)
    events = collect(endpoint)
    code, err = finish(proc)
    assert code == 0, err
    drift = [p for t, p in events if t == "drift.shelf"]
    assert len(drift) >= 3 and [p["learning"] for p in drift[:3]] == [True, True, False]
    assert all(p["span_s"] >= 0.5 and p["n"] >= 20 for p in drift)
    assert sum(p["n"] for p in drift) <= 300
    judged = drift[2]
    assert judged["metrics"] and set(judged["thresholds"]) == set(judged["metrics"])
    assert "windows of 0.5 s" in err and "thresholds calibrated for windows of" in err


def test_profile_blocks_hold_a_window_in_seconds(
    tiny_checkpoint: Path,
    tiny_onnx: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`eyed profile` with drift.window_s keeps blocks as long as such a window at the profiled frame rate:
    0.1 s at 200 fps is 21 frames. (The reservoir is shrunk so 400 frames are more than it keeps.) The
    frames are read at full speed and stand for a stream at source.fps; source.loop is ignored."""
    from eyed.drift import reference as reference_module

    monkeypatch.setattr(reference_module, "RESERVOIR", 60)
    dataset = write_parquet_dataset(tmp_path / "data", synthetic_images(400, seed=3), [i % 10 for i in range(400)])
    out = tmp_path / "reference.json"
    args = ["--set", f"source.dataset={dataset}", "--set", "source.split=train"]
    args += ["--set", f"model.id={tiny_checkpoint}", "--set", f"model.onnx={tiny_onnx}"]
    # At 200 fps, 400 frames would take 2 s paced; a looping source would never end.
    args += ["--set", "source.loop=true", "--set", "source.fps=200"]
    assert main(["profile", *args, "--set", "drift.window_s=0.1", "--output", str(out)]) == 0
    ref = load_reference(out)
    assert ref.frames == 400 and ref.blocks is not None
    block = ref.reservoir.shape[0] // 4  # four blocks: 4 x 21 rows are more than the 60 of RESERVOIR
    assert block == 21 and ref.reservoir.shape[0] == 4 * block
    assert all(length % block == 0 for _, length in ref.blocks)  # adjacent blocks merge into one run


def test_a_paced_source_has_its_window_size_calibrated_at_start_up(
    clean_and_dark: tuple[Path, Path], reference: Path, tiny_onnx: Path
) -> None:
    """drift.window_s with source.fps: the daemon calibrates for that rate's window size before it starts."""
    from eyed.config import load_settings
    from eyed.daemon import build_drift
    from eyed.drift.monitor import size_bucket
    from eyed.model.onnx_backend import OnnxClassifier

    overrides = [f"source.dataset={clean_and_dark[0]}", "source.split=train", f"model.onnx={tiny_onnx}"]
    overrides += ["drift.enabled=true", "drift.window_s=0.5", f"drift.reference={reference}"]
    for fps, sizes in (("100", {size_bucket(51)}), ("0", set())):
        cfg = load_settings(None, [*overrides, f"source.fps={fps}"])
        watch = build_drift(cfg, OnnxClassifier(cfg.model))
        assert watch is not None and set(watch.monitor._calibrations) == sizes


def offline_drift(*overrides: str) -> list[dict[str, object]]:
    """The drift windows `eyed drift-report` computes from a run of the source (eyed.evaluate.run_drift)."""
    from eyed.config import load_settings
    from eyed.evaluate import run_drift

    return run_drift(load_settings(None, ["source.split=train", "drift.window=40", *overrides]))


def test_a_profile_serves_as_reference_and_priors_file_at_once(
    clean_and_dark: tuple[Path, Path], tiny_checkpoint: Path, tiny_onnx: Path, tmp_path: Path
) -> None:
    """The README's workflow: profile with the correction off, then run with the same file as drift.reference
    and as model.coarse_priors. The drift coarse column is the group with the most mass, which no priors
    change, so the very frames profiled make a window identical to the profile; the prior-corrected labels
    counted before moved with the priors, and reported drift on them."""
    out = tmp_path / "reference.json"
    args = ["--set", f"source.dataset={clean_and_dark[0]}", "--set", "source.split=train"]
    args += ["--set", f"model.id={tiny_checkpoint}", "--set", f"model.onnx={tiny_onnx}"]
    assert main(["profile", *args, "--set", "model.coarse_priors=none", "--output", str(out)]) == 0
    model = [f"source.dataset={clean_and_dark[0]}", f"model.onnx={tiny_onnx}", f"drift.reference={out}"]
    for priors in ("none", str(out), "builtin"):
        (window,) = offline_drift(*model, f"model.coarse_priors={priors}")
        metrics = window["metrics"]
        assert isinstance(metrics, dict) and metrics["js_coarse"] == 0 and metrics["js_fine"] == 0, (priors, window)
        assert window["status"] == "ok", (priors, window)


def test_a_profile_made_under_other_preprocessing_is_refused_at_start(
    tiny_dataset: Path, tiny_onnx: Path, reference: Path, endpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The profile records model.small_input (fit by default); a daemon run with the other setting would see
    other input statistics and fine classes. Exit 78 naming the setting, before the model loads, and from
    check-config too, which reads the reference without the model."""
    cfg = {"drift.reference": reference, "model.small_input": "checkpoint", "publish.wait_subscribers": 0}
    proc = start_daemon(settings(tiny_dataset, tiny_onnx, endpoint, **cfg))
    code, err = finish(proc)
    assert code == EXIT_CONFIG, err
    assert f"drift.reference {reference}: profiled with model.small_input = 'fit'" in err
    assert "warm-up" not in err
    assert (
        main(["check-config", "--set", f"drift.reference={reference}", "--set", "model.small_input=checkpoint"])
        == EXIT_CONFIG
    )
    assert "set model.small_input = 'fit'" in capsys.readouterr().err
    assert main(["check-config", "--set", f"drift.reference={reference}"]) == 0


def test_a_profile_of_a_model_with_other_preprocessing_is_refused_and_another_name_warned(
    clean_and_dark: tuple[Path, Path],
    reference: Path,
    tiny_onnx: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The preprocessing spec (crop, mean, std) needs the model, so it is checked where the monitor is built.
    Another model name is only a warning: an INT8 file of the profiled model carries its name, but a file
    exported under another name may be the same model."""
    from eyed.config import ConfigError, load_settings
    from eyed.daemon import build_drift
    from eyed.model.onnx_backend import OnnxClassifier

    data = json.loads(reference.read_text())
    assert data["schema"] == 3 and data["preprocess"]["small_input"] == "fit"
    edited = tmp_path / "ref.json"
    edited.write_text(
        json.dumps(
            {**data, "preprocess": {**data["preprocess"], "spec": {**data["preprocess"]["spec"], "crop": [64, 64]}}}
        )
    )
    overrides = [f"source.dataset={clean_and_dark[0]}", "source.split=train", f"model.onnx={tiny_onnx}"]
    cfg = load_settings(None, [*overrides, f"drift.reference={edited}"])
    classifier = OnnxClassifier(cfg.model)
    with pytest.raises(
        ConfigError, match=rf"drift.reference {edited}: profiled with a model whose preprocessing .*'crop': \[64, 64\]"
    ):
        build_drift(cfg, classifier)
    edited.write_text(json.dumps({**data, "model": "another-model"}))
    with caplog.at_level("WARNING", logger="eyed.daemon"):
        assert build_drift(cfg, classifier) is not None
    assert f"profiled with model another-model, this run uses {classifier.name}" in caplog.text
    caplog.clear()
    # The same checkpoint folder, as a profile made from another working folder may name it.
    for written in (os.path.relpath(classifier.name), Path(classifier.name).name):
        edited.write_text(json.dumps({**data, "model": written}))
        with caplog.at_level("WARNING", logger="eyed.daemon"):
            assert build_drift(cfg, classifier) is not None
        assert "profiled with model" not in caplog.text, written
    cfg = load_settings(None, [*overrides, f"drift.reference={reference}"])
    with caplog.at_level("WARNING", logger="eyed.daemon"):
        assert build_drift(cfg, classifier) is not None
    assert "profiled with model" not in caplog.text


def test_an_older_profile_with_prior_corrected_coarse_counts_is_a_config_error(
    reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A schema 2 profile of an ImageNet model counted coarse labels after its priors: exit 78, profile again."""
    data = json.loads(reference.read_text())
    old = tmp_path / "old.json"
    old.write_text(json.dumps({**data, "schema": 2}))
    assert main(["check-config", "--set", f"drift.reference={old}"]) == EXIT_CONFIG
    assert "run `eyed profile` again" in capsys.readouterr().err
