"""Privacy is a feature: no code path writes or publishes pixels."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import zmq

from eyed.config import PublishConfig
from eyed.pipeline import Pipeline
from eyed.publisher import Publisher
from eyed.sources.memory import MemorySource
from tests.conftest import ROOT, synthetic_images

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


def test_events_carry_no_pixels(tiny_onnx: Path, tmp_path: Path) -> None:
    """Every message the pipeline publishes is small JSON with no array-sized value."""
    from eyed.config import ModelConfig
    from eyed.model import load_classifier

    images = synthetic_images(6, seed=3, size=48)
    classifier = load_classifier(ModelConfig(onnx=tiny_onnx))
    endpoint = f"ipc://{tmp_path}/p.sock"
    ctx = zmq.Context()
    raw: list[list[bytes]] = []
    with Publisher(PublishConfig(endpoint=endpoint), ctx) as pub:
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(endpoint)
        pub.wait_for_subscribers(1, 10)
        pipeline = Pipeline(MemorySource(images, id="priv"), classifier, pub, heartbeat_s=0.01)
        pipeline.start()
        assert pipeline.done.wait(30)
        while sub.poll(2000):
            raw.append(sub.recv_multipart())
            if json.loads(raw[-1][1]).get("state") == "finished":
                break
        sub.close(linger=0)
    ctx.term()
    labels = [m for m in raw if m[0] == b"label.priv"]
    assert len(labels) == 6
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
