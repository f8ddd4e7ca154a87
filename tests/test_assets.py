"""Integration on the real checkpoint and CIFAR-10 shards in $EYED_SHARED (skipped when absent)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np
import pytest

from eyed.cli import EXIT_SOFTWARE
from eyed.config import ModelConfig, SourceConfig, load_settings
from eyed.model import load_classifier
from eyed.model.export import ensure_onnx
from eyed.sources import open_recorded
from tests.conftest import dequantized_weights
from tests.daemon_helpers import NotifyListener, collect, finish, reaped, start_daemon

pytestmark = pytest.mark.assets


@pytest.fixture(scope="module")
def real_onnx(real_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_onnx(str(real_model), tmp_path_factory.mktemp("cache"))


def real_frames(real_cifar: Path, skip: int, limit: int) -> list[np.ndarray]:
    with open_recorded(SourceConfig(dataset=str(real_cifar), split="train", skip=skip, limit=limit)) as src:
        return [f.image for f in src.frames()]


def test_torch_and_onnx_agree_on_top1(real_model: Path, real_onnx: Path, real_cifar: Path) -> None:
    onnx = load_classifier(ModelConfig(id=str(real_model), onnx=real_onnx))
    torch = load_classifier(ModelConfig(id=str(real_model), backend="torch"))
    batch = np.stack([onnx.prepare(img) for img in real_frames(real_cifar, 0, 64)])
    a, b = onnx.predict(batch), torch.predict(batch)
    agree = sum(x.top.class_id == y.top.class_id for x, y in zip(a, b, strict=True))
    assert agree == len(batch)
    assert np.allclose([x.top.score for x in a], [y.top.score for y in b], atol=1e-3)
    assert [x.coarse.label for x in a] == [y.coarse.label for y in b]  # type: ignore[union-attr]


def test_coarse_accuracy_on_held_out_images(real_model: Path, real_onnx: Path, real_cifar: Path) -> None:
    """A regression guard on the mapping, the priors and the preprocessing (73% on the last 5,000)."""
    from eyed.evaluate import run_eval

    settings = load_settings(
        None,
        [
            f"source.dataset={real_cifar}",
            "source.split=train",
            "source.skip=49000",
            "source.limit=1000",
            f"model.id={real_model}",
            f"model.onnx={real_onnx}",
        ],
    )
    report = run_eval(settings)
    acc = report["accuracies"]
    assert report["frames"] == 1000
    assert acc["corrected"] >= 0.68, acc
    # The correction must beat the plain group sum by a wide margin, or it is not doing its job.
    assert acc["corrected"] - acc["group-sum"] >= 0.10, acc


def test_int8_export_keeps_the_checkpoints_weights_and_its_accuracy(
    real_model: Path, real_onnx: Path, real_cifar: Path, tmp_path: Path
) -> None:
    """The reference weights lie on 8-bit grids: `eyed export --int8` must keep them as they are (onnxruntime's
    default scales move nearly all of them and cost 2-3 points), and stay within a point or two of FP32."""
    import onnx

    from eyed.model.quantize import export_int8, grid_step, group_columns_weight

    settings = load_settings(
        None,
        [f"source.dataset={real_cifar}", "source.split=train", f"model.id={real_model}", f"model.onnx={real_onnx}"],
    )
    record = export_int8(settings, tmp_path / "m8.onnx", calibration=64, check=1000, target_cpu="x86_64")
    fp32 = onnx.load(str(real_onnx)).graph
    originals = {i.name: onnx.numpy_helper.to_array(i) for i in fp32.initializer}
    # The first convolution's weights were folded with the input stage, times a / s = 1: the same values,
    # arranged to read four pixel columns at a time. MobileNetV2 pads that convolution as TensorFlow's SAME,
    # which at 224 pixels pads nothing on the left.
    first = originals[next(n for n in fp32.node if n.op_type == "Conv").input[1]]
    originals["eyed_folded_weight"] = group_columns_weight(first, left=0)[0]
    exact = total = 0
    for name, w in dequantized_weights(tmp_path / "m8.onnx").items():
        step = grid_step(originals[name])
        assert step is not None, name  # every quantised weight of this checkpoint is a grid weight
        exact += int((np.abs(w - originals[name]) < 1e-3 * step).sum())
        total += w.size
    assert total > 3_000_000 and exact / total > 0.9, (exact, total)
    check = record["check"]
    assert check["frames"] == 1000 and check["coarse_agreement"] >= 0.9, check
    assert abs(check["coarse_accuracy_int8"] - check["coarse_accuracy_fp32"]) <= 0.02, check


def test_daemon_on_real_assets_delivers_every_event(real_model: Path, real_cifar: Path, tmp_path: Path) -> None:
    """The issue's acceptance run: EYED_ env vars only, an independent SUB client receives every event."""
    from tests.conftest import free_port

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    settings = {
        "source.dataset": real_cifar,
        "source.split": "train",
        "source.limit": 500,
        "model.id": real_model,
        "model.cache_dir": tmp_path,
        "publish.endpoint": endpoint,
        "publish.wait_subscribers": 1,
        "publish.wait_timeout_s": 120,
    }
    proc = start_daemon(settings)
    events = collect(endpoint, timeout_s=180)
    code, err = finish(proc, timeout_s=60)
    assert code == 0, err
    labels = [p for _, p in events if p["type"] == "label"]
    assert [p["seq"] for p in labels] == list(range(500))
    assert all(p["truth"] for p in labels)
    hits = sum(p["coarse"]["label"] == p["truth"] for p in labels)
    assert hits / 500 >= 0.6
    assert events[-1][1]["state"] == "finished" and events[-1][1]["frames"] == 500


def test_a_shutdown_that_times_out_inside_onnxruntime_exits_70(
    real_model: Path, real_onnx: Path, real_cifar: Path, endpoint: str, tmp_path: Path
) -> None:
    """daemon.shutdown_timeout_s exists for a worker stuck in native inference. With one still inside
    onnxruntime (two workers on batches of 32, a bound of 50 ms), the interpreter's teardown freed the session
    under it and the process died of SIGABRT, not the documented exit 70."""
    listener = NotifyListener(tmp_path / "notify.sock")
    settings = {
        "source.dataset": real_cifar,
        "source.split": "train",
        "model.id": real_model,
        "model.onnx": real_onnx,
        "model.batch": 32,
        "model.workers": 2,
        "daemon.shutdown_timeout_s": 0.05,
        "publish.endpoint": endpoint,
        "publish.wait_subscribers": 0,
    }
    proc = start_daemon(settings, NOTIFY_SOCKET=str(listener.path))
    with reaped(proc, listener):
        listener.wait_for("READY=1", 120)
        time.sleep(1.5)  # well into the run: both workers busy
        proc.send_signal(signal.SIGTERM)
        code, err = finish(proc, timeout_s=60)
    assert code == EXIT_SOFTWARE, err
    assert "pipeline still running after 0.05 s" in err
    assert "terminate called" not in err
