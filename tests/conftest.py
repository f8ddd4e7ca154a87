"""Shared fixtures: tiny generated checkpoints and datasets, free endpoints, and the real assets (optional)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def shared_dir() -> Path:
    """The real assets folder: $EYED_SHARED, default ../shared beside the checkout."""
    return Path(os.environ.get("EYED_SHARED", ROOT.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def shared() -> Path:
    """Skip the test cleanly when the real assets are absent."""
    folder = shared_dir()
    if not (folder / "models" / "mobilenet_v2_1.0_224" / "config.json").is_file():
        pytest.skip(f"real assets not found in {folder} (set EYED_SHARED)")
    return folder


@pytest.fixture(scope="session")
def real_model(shared: Path) -> Path:
    return shared / "models" / "mobilenet_v2_1.0_224"


@pytest.fixture(scope="session")
def real_cifar(shared: Path) -> Path:
    return shared / "data" / "cifar10"


def imagenet_like_labels() -> list[str]:
    """Background, every label string of the shipped CIFAR-10 map, then fillers: an ImageNet-like label space."""
    from eyed.model.labels import load_group_map

    _, groups = load_group_map("cifar10")
    mapped = [label for members in groups.values() for label in members]
    return ["background", *mapped, *(f"unmapped class {i}" for i in range(20))]


def make_checkpoint(folder: Path, labels: list[str], seed: int = 0) -> Path:
    """A tiny MobileNetV2 checkpoint (random weights) that takes 32x32 crops, saved like a hub checkpoint."""
    import torch
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    torch.manual_seed(seed)
    config = MobileNetV2Config(
        depth_multiplier=0.35,
        image_size=32,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    model = MobileNetV2ForImageClassification(config).eval()
    # transformers initialises convolutions with std 0.02: after 50 layers every feature is ~1e-26. He
    # initialisation keeps the random features alive, so a head trained on them (eyed finetune) can learn.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    model.save_pretrained(folder)
    preprocessor = {
        "do_resize": True,
        "size": {"shortest_edge": 40},
        "do_center_crop": True,
        "crop_size": {"height": 32, "width": 32},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "image_processor_type": "MobileNetV2ImageProcessor",
        "resample": 2,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny-ckpt"), imagenet_like_labels())


@pytest.fixture(scope="session")
def tiny_onnx(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from eyed.model.export import export_onnx

    return export_onnx(str(tiny_checkpoint), tmp_path_factory.mktemp("tiny-onnx") / "tiny.onnx")


def png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def synthetic_images(n: int, seed: int = 0, size: int = 32) -> list[np.ndarray]:
    """Smooth random RGB images (not noise: closer to photos for preprocessing comparisons)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        out.append(cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC))
    return out


def write_parquet_dataset(
    folder: Path,
    images: list[np.ndarray],
    labels: list[int],
    corrupt: tuple[int, ...] = (),
    rows_per_group: int | None = None,
) -> Path:
    """A folder with one parquet shard in the layout of uoft-cs/cifar10 (``img`` Image, ``label`` ClassLabel).

    Records whose index is in ``corrupt`` get bytes that are not an image. ``rows_per_group`` makes row groups
    of that many rows (datasets' default: one group of up to 100 images).
    """
    from datasets import ClassLabel, Dataset, Features, Image

    records = [
        {"bytes": b"\x89PNG\r\n\x1a\n this is not an image" if i in corrupt else png(img), "path": None}
        for i, img in enumerate(images)
    ]
    features = Features({"img": Image(), "label": ClassLabel(names=CIFAR10)})
    ds = Dataset.from_dict({"img": records, "label": labels}, features=features)
    folder.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(folder / "train-00000-of-00001.parquet"), batch_size=rows_per_group)
    return folder


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 generated images, labels 0..9 cycling, record 5 corrupt."""
    images = synthetic_images(12)
    return write_parquet_dataset(
        tmp_path_factory.mktemp("tiny-data"), images, [i % 10 for i in range(12)], corrupt=(5,)
    )


def fake_datasets_package(folder: Path, body: str) -> str:
    """A ``datasets`` package in ``folder`` that does ``body`` when imported; put the returned folder first on
    PYTHONPATH of the process (a dataset_info child) that should import it."""
    (folder / "datasets").mkdir()
    (folder / "datasets" / "__init__.py").write_text(body)
    return str(folder)


# A datasets "walking a large folder": busy for up to a minute, so a test that fails leaves no child burning.
BUSY_DATASETS = "import time\nend = time.process_time() + 60\nwhile time.process_time() < end: pass\n"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def endpoint() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


@pytest.fixture
def base(tiny_dataset: Path, tiny_onnx: Path, endpoint: str) -> dict[str, object]:
    """Settings for `eyed run` on the tiny dataset and model, waiting for one subscriber on ``endpoint``."""
    return {
        "source.dataset": tiny_dataset,
        "source.split": "train",
        "source.id": "tiny",
        "model.onnx": tiny_onnx,
        "publish.endpoint": endpoint,
        "publish.wait_subscribers": 1,
        "publish.wait_timeout_s": 30,
        "publish.heartbeat_s": 0.5,
    }


def dequantized_weights(path: Path) -> dict[str, np.ndarray]:
    """Each int8 weight of a QDQ file, dequantised, by the name of the float weight it replaced."""
    import onnx

    graph = onnx.load(str(path)).graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    out = {}
    for n in graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].dtype == np.int8:
            q, scale = inits[n.input[0]].astype(np.float64), inits[n.input[1]].astype(np.float64)
            out[n.input[0].removesuffix("_quantized")] = q * scale.reshape((-1,) + (1,) * (q.ndim - 1))
    return out
