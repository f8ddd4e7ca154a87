"""eyed finetune on a tiny generated model and dataset: checkpoint, ONNX, determinism, the daemon runs it."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from eyed import finetune as ft
from eyed.cli import main
from eyed.config import ModelConfig
from eyed.model import load_classifier
from tests.conftest import CIFAR10, png, synthetic_images, write_parquet_dataset
from tests.daemon_helpers import collect, finish, start_daemon

COARSE = ["vehicle", "animal", "other"]


def coloured_images(n: int) -> list[np.ndarray]:
    """Noisy images whose dominant colour cycles red, green, blue."""
    rng = np.random.default_rng(0)
    images = []
    for i in range(n):
        img = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
        img[..., i % 3] += 180
        images.append(img)
    return images


def cycle(values: Sequence[int], n: int = 60) -> list[int | None]:
    """``values`` repeated over n records: one label per colour."""
    return [values[i % len(values)] for i in range(n)]


@pytest.fixture(scope="module")
def coloured_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 noisy images in three colour-coded classes (airplane: red, bird: green, ship: blue)."""
    return write_parquet_dataset(
        tmp_path_factory.mktemp("coloured"), coloured_images(60), [(0, 2, 8)[i % 3] for i in range(60)]
    )


def write_shard(folder: Path, images: list[np.ndarray], columns: dict[str, tuple[list[str], list[int | None]]]) -> Path:
    """One parquet shard: ``img`` plus a ClassLabel column per entry of ``columns`` (names, values; None and -1
    are the hub's "no label")."""
    from datasets import ClassLabel, Dataset, Features, Image

    data: dict[str, list[Any]] = {"img": [{"bytes": png(img), "path": None} for img in images]}
    features: dict[str, Any] = {"img": Image()}
    for name, (names, values) in columns.items():
        data[name] = values
        features[name] = ClassLabel(names=names)
    folder.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(data, features=Features(features)).to_parquet(str(folder / "train-00000-of-00001.parquet"))
    return folder


def predicted(output: Path, images: list[np.ndarray]) -> list[str]:
    """The fine-tuned model's top label for each image."""
    classifier = load_classifier(ModelConfig(onnx=output / "model.onnx"))
    return [p.top.label for p in classifier.predict(np.stack([classifier.prepare(img) for img in images]))]


def run(dataset: Path, checkpoint: Path, output: Path, cache: Path, *extra: str) -> int:
    return main(
        [
            "finetune",
            "--set", f"source.dataset={dataset}",
            "--set", "source.split=train",
            "--set", f"model.id={checkpoint}",
            "--set", f"model.cache_dir={cache}",
            "--output", str(output),
            "--epochs", "50",
            *extra,
        ]
    )  # fmt: skip


def finetune(dataset: Path, checkpoint: Path, output: Path, cache: Path, *extra: str) -> dict[str, Any]:
    assert run(dataset, checkpoint, output, cache, *extra) == 0
    report: dict[str, Any] = json.loads((output / "finetune.json").read_text())
    return report


def test_finetune_saves_a_cifar10_checkpoint_and_onnx(
    coloured_dataset: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    report = finetune(coloured_dataset, tiny_checkpoint, tmp_path / "ft", tmp_path / "cache")
    config = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert [config["id2label"][str(i)] for i in range(10)] == CIFAR10
    assert report["classes"] == CIFAR10
    assert report["train_images"] == 54 and report["val_images"] == 6
    # Colour is all it takes here, and even a random tiny backbone sees colour.
    assert report["train_accuracy"] >= 0.9
    classifier = load_classifier(ModelConfig(onnx=tmp_path / "ft" / "model.onnx", topk=100))
    assert classifier.post.labels == CIFAR10  # type: ignore[attr-defined]
    # model.topk above the model's 10 classes: the graph's TopK is asked for all 10 (more would fail), best first.
    (pred,) = classifier.predict(np.stack([classifier.prepare(synthetic_images(1, seed=6)[0])]))
    assert sorted(s.class_id for s in pred.topk) == list(range(10))
    assert [s.score for s in pred.topk] == sorted((s.score for s in pred.topk), reverse=True)


def test_finetune_is_deterministic_and_reuses_its_feature_cache(
    coloured_dataset: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    from safetensors.numpy import load_file

    cache = tmp_path / "cache"
    finetune(coloured_dataset, tiny_checkpoint, tmp_path / "a", cache)
    cached = list((cache / "features").glob("*.npz"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    finetune(coloured_dataset, tiny_checkpoint, tmp_path / "b", cache)
    assert cached[0].stat().st_mtime_ns == mtime
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert np.array_equal(a["classifier.weight"], b["classifier.weight"])
    # Another seed (and nothing else) draws another validation split, so another head.
    report = finetune(coloured_dataset, tiny_checkpoint, tmp_path / "c", cache, "--seed", "1")
    assert len(list((cache / "features").glob("*.npz"))) == 1
    c = load_file(str(tmp_path / "c" / "model.safetensors"))
    assert not np.array_equal(a["classifier.weight"], c["classifier.weight"])
    n = report["train_images"] + report["val_images"]
    assert not np.array_equal(ft.split(n, 0.1, 0)[1], ft.split(n, 0.1, 1)[1])


def test_other_preprocessing_is_not_served_from_the_cache(coloured_dataset: Path, tiny_checkpoint: Path) -> None:
    """The features depend on how frames are resized, which the checkpoint's files alone no longer say once eyed
    follows resample (and crop_pct): the cache key holds the preprocessing as eyed reads it."""
    from eyed.config import load_settings
    from eyed.model.checkpoint import read_checkpoint

    settings = load_settings(None, [f"model.id={tiny_checkpoint}", f"source.dataset={coloured_dataset}"])
    _, spec = read_checkpoint(tiny_checkpoint, str(tiny_checkpoint))
    bicubic = dataclasses.replace(spec, resample="bicubic")
    keys = {ft._cache_key(settings, settings.source, tiny_checkpoint, True, s) for s in (spec, bicubic)}
    assert len(keys) == 2


def test_another_skip_is_not_served_from_the_cache(
    coloured_dataset: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """source.skip decides which records are trained on (eyed eval --skip then scores the rest): features cached
    for one skip must not serve another. Without this, a cache key without the skip went unseen: the run trained
    on the wrong records, and eval then scored records the head was trained on."""
    cache = tmp_path / "cache"
    whole = finetune(coloured_dataset, tiny_checkpoint, tmp_path / "whole", cache)
    later = finetune(coloured_dataset, tiny_checkpoint, tmp_path / "later", cache, "--set", "source.skip=30")
    assert whole["train_images"] + whole["val_images"] == 60
    assert later["train_images"] + later["val_images"] == 30
    assert later["next_skip"] == 60


class Echo:
    """An onnxruntime session stand-in whose "features" are the pixels it was given, flattened."""

    def run(self, outputs: object, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        pixels = feeds["pixels"]
        return [pixels.reshape(len(pixels), -1).astype(np.float32)]


def test_the_flip_augmentation_mirrors_left_and_right() -> None:
    """The flipped copies are what a camera mirrored left to right would see, never a scene upside down. The
    colour-coded images the other tests train on look the same either way, so a vertical flip went unseen."""
    pixels = np.random.default_rng(0).integers(0, 256, (3, 4, 6, 3), dtype=np.uint8)
    xs, flips = ft._Rows(), ft._Rows()
    ft._embed(Echo(), pixels, xs, flips)
    assert np.array_equal(xs.array().reshape(pixels.shape), pixels)
    assert np.array_equal(flips.array().reshape(pixels.shape), pixels[:, :, ::-1])


def test_training_never_sees_a_validation_image(tmp_path: Path) -> None:
    # Random labels on random features: a head can only memorise them, so it is right on validation
    # images only by chance (1 in 4), unless it trained on them.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 400), dtype=np.float32)
    y = rng.integers(0, 4, 200)
    features = ft.Features(x, x + rng.normal(0, 0.1, x.shape).astype(np.float32), y, list("abcd"))
    _, _, metrics = ft.train_head(features, ft.FinetuneOptions(tmp_path, epochs=100, val_fraction=0.2))
    assert metrics["train_images"] == 160 and metrics["val_images"] == 40
    assert metrics["train_accuracy"] == 1.0
    assert metrics["val_accuracy"] < 0.5
    for n, fraction, seed in [(200, 0.2, 0), (60, 0.1, 1), (7, 0.5, 2)]:
        train, val = ft.split(n, fraction, seed)
        assert not set(train) & set(val)
        assert sorted([*train, *val]) == list(range(n))


def test_the_daemon_runs_the_finetuned_model_with_native_labels(
    coloured_dataset: Path, tiny_checkpoint: Path, tmp_path: Path, endpoint: str
) -> None:
    finetune(coloured_dataset, tiny_checkpoint, tmp_path / "ft", tmp_path / "cache")
    proc = start_daemon(
        {
            "source.dataset": coloured_dataset,
            "source.split": "train",
            "source.limit": 12,
            "model.id": tmp_path / "ft",
            "model.cache_dir": tmp_path / "cache",
            "publish.endpoint": endpoint,
            "publish.wait_subscribers": 1,
        }
    )
    events = collect(endpoint, timeout_s=120)
    code, err = finish(proc, timeout_s=60)
    assert code == 0, err
    labels = [p for _, p in events if p["type"] == "label"]
    assert len(labels) == 12
    assert all(p["label"] in CIFAR10 and p["coarse"]["label"] == p["label"] for p in labels)
    assert all(p["coarse"]["score"] == pytest.approx(p["score"], abs=1e-5) for p in labels)


def test_another_label_column_is_not_served_from_the_cache(tiny_checkpoint: Path, tmp_path: Path) -> None:
    images = coloured_images(60)
    dataset = write_shard(
        tmp_path / "data", images, {"label": (CIFAR10, cycle((0, 2, 8))), "coarse": (COARSE, cycle((0, 1, 2)))}
    )
    cache = tmp_path / "cache"
    fine = finetune(dataset, tiny_checkpoint, tmp_path / "fine", cache, "--set", "source.label_column=label")
    coarse = finetune(dataset, tiny_checkpoint, tmp_path / "coarse", cache, "--set", "source.label_column=coarse")
    assert fine["classes"] == CIFAR10 and coarse["classes"] == COARSE
    assert predicted(tmp_path / "coarse", images) == [COARSE[i % 3] for i in range(60)]


def test_a_rewritten_shard_is_not_served_from_the_cache(tiny_checkpoint: Path, tmp_path: Path) -> None:
    images = coloured_images(60)
    cache = tmp_path / "cache"
    dataset = write_shard(tmp_path / "data", images, {"label": (CIFAR10, cycle((0, 2, 8)))})
    finetune(dataset, tiny_checkpoint, tmp_path / "before", cache)
    # The same images, the same file name, new labels.
    write_shard(dataset, images, {"label": (CIFAR10, cycle((1, 3, 9)))})
    finetune(dataset, tiny_checkpoint, tmp_path / "after", cache)
    assert predicted(tmp_path / "after", images) == [CIFAR10[(1, 3, 9)[i % 3]] for i in range(60)]


def test_frames_without_a_known_label_are_skipped_and_counted(tiny_checkpoint: Path, tmp_path: Path) -> None:
    labels = cycle((0, 2, 8))
    labels[7] = -1  # the hub's "no label": the replay source passes it on as "-1"
    labels[8] = None
    dataset = write_shard(tmp_path / "data", coloured_images(60), {"label": (CIFAR10, labels)})
    for output in ("a", "b"):  # extracted, then from the cache
        report = finetune(dataset, tiny_checkpoint, tmp_path / output, tmp_path / "cache")
        assert report["train_images"] + report["val_images"] == 58
        assert report["skipped"] == {"corrupt": 0, "unlabelled": 1, "unknown_label": 1, "unreadable": 0}


def test_corrupt_records_are_counted(tiny_checkpoint: Path, tmp_path: Path) -> None:
    dataset = write_parquet_dataset(tmp_path / "data", coloured_images(12), [i % 10 for i in range(12)], corrupt=(5,))
    report = finetune(dataset, tiny_checkpoint, tmp_path / "ft", tmp_path / "cache")
    assert report["train_images"] + report["val_images"] == 11
    assert report["skipped"] == {"corrupt": 1, "unlabelled": 0, "unknown_label": 0, "unreadable": 0}


def test_features_from_a_reader_that_failed_part_way_are_not_cached(tiny_checkpoint: Path, tmp_path: Path) -> None:
    dataset = write_parquet_dataset(tmp_path / "data", coloured_images(12), [i % 10 for i in range(12)])
    (dataset / "train-00000-of-00001.parquet").rename(dataset / "train-00000-of-00002.parquet")
    broken = dataset / "train-00001-of-00002.parquet"
    broken.write_bytes(b"PAR1 not a parquet file" * 10)  # the reader fails on it, after the first shard
    report = finetune(dataset, tiny_checkpoint, tmp_path / "ft", tmp_path / "cache")
    assert report["train_images"] + report["val_images"] == 12
    assert report["skipped"] == {"corrupt": 0, "unlabelled": 0, "unknown_label": 0, "unreadable": 1}
    assert not list((tmp_path / "cache" / "features").glob("*.npz"))
    assert report["next_skip"] is None  # the shard it could not read counts once, whatever its records


def test_a_run_of_unlabelled_records_does_not_end_the_extraction(tiny_checkpoint: Path, tmp_path: Path) -> None:
    # More than a batch (64) of unlabelled records before the labelled ones.
    labels = [None for _ in range(70)] + cycle((0, 2, 8))
    dataset = write_shard(tmp_path / "data", coloured_images(130), {"label": (CIFAR10, labels)})
    report = finetune(dataset, tiny_checkpoint, tmp_path / "ft", tmp_path / "cache")
    assert report["train_images"] + report["val_images"] == 60
    assert report["skipped"]["unlabelled"] == 70


@pytest.mark.timeout(90)
def test_a_looping_source_is_read_once(coloured_dataset: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    # With loop and no limit, extraction would never end; with a limit, copies of validation images would
    # be trained on.
    report = finetune(
        coloured_dataset, tiny_checkpoint, tmp_path / "ft", tmp_path / "cache", "--set", "source.loop=true"
    )
    assert report["train_images"] + report["val_images"] == 60


def test_val_fraction_must_leave_images_to_train_on(
    coloured_dataset: Path, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for fraction in ("1.0", "-0.5", "nan", "0.995"):  # 0.995 of 60 images holds out all 60
        capsys.readouterr()
        code = run(coloured_dataset, tiny_checkpoint, tmp_path / "ft", tmp_path / "cache", "--val-fraction", fraction)
        assert code == 78, fraction
        assert "--val-fraction" in capsys.readouterr().err
    assert not (tmp_path / "ft" / "finetune.json").exists()


def test_weight_decay_must_be_a_number_of_at_least_0(
    coloured_dataset: Path, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for value in ("nan", "-1", "inf"):  # nan trained to NaN logits and exited 0
        capsys.readouterr()
        assert (
            run(coloured_dataset, tiny_checkpoint, tmp_path / "ft", tmp_path / "cache", f"--weight-decay={value}") == 78
        )
        assert "--weight-decay" in capsys.readouterr().err
    assert not (tmp_path / "ft" / "finetune.json").exists()


def test_the_report_says_where_held_out_records_start(
    tiny_dataset: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """--limit counts frames, eval --skip counts records: with a corrupt record among them, the first record
    training did not read is one further than the limit."""
    report = finetune(tiny_dataset, tiny_checkpoint, tmp_path / "ft", tmp_path / "cache", "--limit", "8")
    assert report["train_images"] + report["val_images"] == 8
    assert report["skipped"]["corrupt"] == 1 and report["next_skip"] == 9  # records 0-8, the 6th corrupt


def test_a_failed_export_leaves_the_last_checkpoint_as_it_was(
    coloured_dataset: Path, tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It used to leave the new head's weights beside the last run's model.onnx and finetune.json."""
    out = tmp_path / "ft"
    finetune(coloured_dataset, tiny_checkpoint, out, tmp_path / "cache")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "model.onnx", "finetune.json"} <= set(before)

    def fail(*args: Any, **kwargs: Any) -> Path:
        raise ft.ModelLoadError("export failed")

    monkeypatch.setattr(ft, "export_onnx", fail)
    assert run(coloured_dataset, tiny_checkpoint, out, tmp_path / "cache", "--seed", "1") != 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["cache", "ft"]  # no temporary folder left


def test_the_onnx_export_names_the_checkpoint_folder_not_its_staging_folder(
    coloured_dataset: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ft"
    report = finetune(coloured_dataset, tiny_checkpoint, out, tmp_path / "cache")
    assert report["onnx"] == str(out / "model.onnx")
    assert load_classifier(ModelConfig(onnx=out / "model.onnx")).name == str(out)


def test_finetune_refuses_to_write_over_its_base_checkpoint(
    coloured_dataset: Path,
    tiny_checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--output = model.id replaced the base checkpoint's head (its ImageNet classes) with the new one, exit 0.
    Refused before any work, however the folder is written."""
    base = shutil.copytree(tiny_checkpoint, tmp_path / "base")
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    monkeypatch.chdir(tmp_path)
    for output in (base, Path("base"), Path("./base/")):
        capsys.readouterr()
        assert run(coloured_dataset, base, output, tmp_path / "cache") == 73, output
        err = capsys.readouterr().err
        assert f"cannot write {output}: it is {base}, the base checkpoint (model.id)" in err, err
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before
    assert not (tmp_path / "cache").exists()  # no features extracted


def test_the_onnx_export_records_the_checkpoint_folder_absolute(
    coloured_dataset: Path,
    tiny_checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`--output ft` recorded "ft": run from another working directory with model.id set to the folder, the onnx
    backend warned that model.onnx came from another checkpoint."""
    monkeypatch.chdir(tmp_path)
    dataset, checkpoint = (Path(os.path.relpath(p, tmp_path)) for p in (coloured_dataset, tiny_checkpoint))
    report = finetune(dataset, checkpoint, Path("ft"), tmp_path / "cache")
    monkeypatch.chdir(tmp_path / "cache")
    caplog.clear()
    classifier = load_classifier(ModelConfig(id=str(tmp_path / "ft"), onnx=tmp_path / "ft" / "model.onnx"))
    assert classifier.name == str(tmp_path / "ft")
    assert "was exported from" not in caplog.text
    # The report says what it was trained from wherever it is read, too.
    assert report["base_model"] == str(tiny_checkpoint) and report["dataset"] == str(coloured_dataset)


def test_a_refused_finetune_leaves_no_folder_it_made(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command line makes --output to check it can be written: a refused run left it behind, empty."""
    unlabelled = write_parquet_dataset(tmp_path / "unlabelled", coloured_images(6), [None] * 6)  # type: ignore[list-item]
    coloured = write_parquet_dataset(tmp_path / "coloured", coloured_images(6), [0, 2, 8] * 2)
    cache = tmp_path / "cache"
    assert run(unlabelled, tiny_checkpoint, tmp_path / "new" / "ft", cache) == 78
    assert "needs a labelled source" in capsys.readouterr().err
    assert run(coloured, tiny_checkpoint, tmp_path / "new" / "ft", cache, "--val-fraction", "1") == 78
    assert not (tmp_path / "new").exists()
    # A folder that was there before stays, empty as it was.
    (tmp_path / "mine").mkdir()
    assert run(unlabelled, tiny_checkpoint, tmp_path / "mine", cache) == 78
    assert (tmp_path / "mine").is_dir() and not list((tmp_path / "mine").iterdir())
