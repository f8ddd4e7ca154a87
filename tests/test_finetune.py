"""eyed finetune on a tiny generated model and dataset: checkpoint, ONNX, determinism, the daemon runs it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from eyed.cli import main
from eyed.config import ModelConfig
from eyed.model import load_classifier
from tests.conftest import CIFAR10, synthetic_images, write_parquet_dataset
from tests.daemon_helpers import collect, finish, start_daemon


@pytest.fixture(scope="module")
def coloured_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 noisy images in three colour-coded classes (airplane: red, bird: green, ship: blue)."""
    rng = np.random.default_rng(0)
    images, labels = [], []
    for i in range(60):
        cls = i % 3
        img = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
        img[..., cls] += 180
        images.append(img)
        labels.append((0, 2, 8)[cls])
    return write_parquet_dataset(tmp_path_factory.mktemp("coloured"), images, labels)


def finetune(dataset: Path, checkpoint: Path, output: Path, cache: Path, *extra: str) -> dict[str, Any]:
    code = main(
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
    assert code == 0
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
    # Another seed draws another validation split: a different head.
    finetune(coloured_dataset, tiny_checkpoint, tmp_path / "c", cache, "--seed", "1", "--no-flip")
    c = load_file(str(tmp_path / "c" / "model.safetensors"))
    assert not np.array_equal(a["classifier.weight"], c["classifier.weight"])


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
