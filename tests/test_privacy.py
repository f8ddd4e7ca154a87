"""Privacy is a feature: no code path writes or publishes pixels."""

from __future__ import annotations

import ast
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from eyed.config import ConfigError, PublishConfig, SourceConfig
from eyed.pipeline import Pipeline
from eyed.publisher import Publisher
from eyed.sources.memory import MemorySource
from eyed.sources.replay import ReplaySource
from eyed.types import Source
from tests.conftest import ROOT, png, synthetic_images

# Calls that write images or raw arrays somewhere. eyed has no reason to make any of them.
FORBIDDEN_CALLS = {
    "imwrite",
    "imencode",
    "VideoWriter",
    "tofile",
    "save",
    "savez",
    "savez_compressed",
    "dump",
}
# Writers that store model data, never pixels: exported and quantised ONNX models (weights) and fine-tuning's
# cache of pooled backbone features (1280 floats per image, from which the image cannot be rebuilt).
ALLOWED = {("export.py", "save"), ("quantize.py", "save"), ("finetune.py", "savez")}


def test_no_module_calls_an_image_or_array_writer() -> None:
    offenders = []
    for path in sorted((ROOT / "eyed").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name in FORBIDDEN_CALLS and (path.name, name) not in ALLOWED:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}()")
    assert offenders == []


def published(source: Source, onnx: Path, tmp_path: Path) -> list[list[bytes]]:
    """Every message the pipeline publishes for ``source``, through a real socket, until it finishes."""
    from eyed.config import ModelConfig
    from eyed.model import load_classifier

    classifier = load_classifier(ModelConfig(onnx=onnx))
    endpoint = f"ipc://{tmp_path}/p.sock"
    ctx = zmq.Context()
    raw: list[list[bytes]] = []
    with Publisher(PublishConfig(endpoint=endpoint), ctx) as pub:
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(endpoint)
        pub.wait_for_subscribers(1, 10)
        pipeline = Pipeline(source, classifier, pub, heartbeat_s=0.01)
        pipeline.start()
        assert pipeline.done.wait(30)
        while sub.poll(2000):
            raw.append(sub.recv_multipart())
            if json.loads(raw[-1][1]).get("state") == "finished":
                break
        sub.close(linger=0)
    ctx.term()
    return raw


def assert_no_pixels(raw: list[list[bytes]], images: list[np.ndarray], files: Sequence[bytes] = ()) -> None:
    """Each message is small JSON with no array-sized value, and holds no run of an image's pixels or of an
    image file's bytes (``files``), whether raw or as the text str() would make of them."""
    smallest_image = min(img.nbytes for img in images)
    for _topic, payload in raw:
        assert len(payload) < smallest_image // 2, "a message the size of an image"
        decoded = json.loads(payload)

        def check(value: object) -> None:
            if isinstance(value, list):
                assert len(value) <= 100, "an array-like value in an event"
                for v in value:
                    check(v)
            elif isinstance(value, dict):
                for v in value.values():
                    check(v)
            elif isinstance(value, str):
                assert len(value) < 1000

        check(decoded)
        # Nothing in the payload equals a run of the image's bytes either.
        for img in images:
            assert img.tobytes()[:64] not in payload
        for data in files:
            assert data[:16] not in payload and repr(data[:16])[2:-1].encode() not in payload
            assert b"PNG" not in payload and b"IHDR" not in payload


def test_events_carry_no_pixels(tiny_onnx: Path, tmp_path: Path) -> None:
    """Every message the pipeline publishes is small JSON with no array-sized value."""
    images = synthetic_images(6, seed=3, size=48)
    raw = published(MemorySource(images, id="priv"), tiny_onnx, tmp_path)
    labels = [m for m in raw if m[0] == b"label.priv"]
    assert len(labels) == 6
    assert_no_pixels(raw, images)


def image_labelled_dataset(folder: Path) -> tuple[Path, list[np.ndarray], list[bytes]]:
    """A segmentation dataset as the hub has them: ``image``, and a ``label`` column that is an image too (a mask
    of the same size); the folder, its images and its label files."""
    from datasets import Dataset, Features, Image

    images = synthetic_images(4, seed=31, size=48)
    label_files = [png(m) for m in synthetic_images(4, seed=32, size=48)]
    ds = Dataset.from_dict(
        {
            "image": [{"bytes": png(img), "path": None} for img in images],
            "label": [{"bytes": data, "path": None} for data in label_files],
        },
        features=Features({"image": Image(), "label": Image()}),
    )
    folder.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(folder / "train-00000-of-00001.parquet"))
    return folder, images, label_files


def test_a_label_column_of_images_never_reaches_an_event(tiny_onnx: Path, tmp_path: Path) -> None:
    """The replay's truth goes out in every label event. A column of images (a segmentation dataset's "label")
    is not taken for the label, so the events carry no truth rather than the file (the frame could be rebuilt
    from it)."""
    folder, images, label_files = image_labelled_dataset(tmp_path / "seg")
    with ReplaySource(SourceConfig(dataset=str(folder), split="train", id="seg")) as source:
        raw = published(source, tiny_onnx, tmp_path)
    labels = [json.loads(m[1]) for m in raw if m[0] == b"label.seg"]
    assert len(labels) == 4
    assert_no_pixels(raw, images, [png(img) for img in images] + label_files)
    assert all(event["truth"] is None for event in labels)


@pytest.mark.parametrize("column", ["label", "image"])
def test_a_label_column_set_to_images_is_refused_at_start(tmp_path: Path, column: str) -> None:
    """source.label_column set to a column of images (the mask, or the picture itself by mistake): the start is
    refused as a configuration error, and no frame is read."""
    folder, _, _ = image_labelled_dataset(tmp_path / "seg")
    cfg: dict[str, Any] = {"dataset": str(folder), "split": "train", "label_column": column}
    with pytest.raises(ConfigError, match=f"source.label_column {column}: its feature is Image, not a label"):
        ReplaySource(SourceConfig(**cfg)).__enter__()
