"""OfflineRunner: recorded frames through the tiny model, one call per batch or a frame per core at once."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from eyed.bench import load_frames
from eyed.config import load_settings
from eyed.offline import OfflineRunner
from eyed.types import Frame


@pytest.fixture
def frames(tiny_dataset: Path, tiny_onnx: Path) -> list[Frame]:
    settings = load_settings(None, [f"source.dataset={tiny_dataset}", "source.split=train", f"model.onnx={tiny_onnx}"])
    return [Frame(image, i, 0.0, 0.0) for i, image in enumerate(load_frames(settings, 11)[0])]


def _runner(
    tiny_dataset: Path, tiny_onnx: Path, cores: int, monkeypatch: pytest.MonkeyPatch, batch: int = 1
) -> OfflineRunner:
    monkeypatch.setattr("eyed.config.available_cores", lambda: cores)
    # A paced replay: the offline commands still run it at full speed, a frame per core.
    overrides = [f"source.dataset={tiny_dataset}", "source.split=train", f"model.onnx={tiny_onnx}", "source.fps=5"]
    return OfflineRunner(load_settings(None, [*overrides, f"model.batch={batch}"]))


def _record_callers(runner: OfflineRunner, method: str) -> set[str]:
    callers: set[str] = set()
    call = getattr(runner.classifier, method)

    def recorded(batch: np.ndarray, call: Any = call) -> Any:
        callers.add(threading.current_thread().name)
        return call(batch)

    setattr(runner.classifier, method, recorded)
    return callers


def test_a_frame_per_core_gives_one_calls_results_in_frame_order(
    tiny_dataset: Path, tiny_onnx: Path, frames: list[Frame], monkeypatch: pytest.MonkeyPatch
) -> None:
    logits: dict[int, np.ndarray] = {}
    top: dict[int, list[int]] = {}
    for cores in (1, 2, 3):
        with _runner(tiny_dataset, tiny_onnx, cores, monkeypatch) as runner:
            assert runner.workers == cores
            pool = [t for t in threading.enumerate() if t.name.startswith("eyed-offline")]
            assert len(pool) == (cores if cores > 1 else 0)  # every worker started up front
            callers = _record_callers(runner, "logits")
            logits[cores] = runner.logits(frames)
            top[cores] = [p.top.class_id for p in runner.predict(frames)]
        # One call for every frame on this thread, or the pool's workers calling.
        if cores == 1:
            assert callers == {threading.current_thread().name}
        else:
            assert callers and all(c.startswith("eyed-offline") for c in callers)
    # Shares of 6 and 5 frames (2 workers), 4, 4 and 3 (3 workers) come back in frame order.
    assert logits[1].shape[0] == 11 and np.ptp(logits[1], axis=0).max() > 0
    for cores in (2, 3):
        np.testing.assert_allclose(logits[cores], logits[1], rtol=1e-4, atol=1e-5)
        assert top[cores] == top[1] == [int(i) for i in logits[1].argmax(axis=1)]


def test_the_runner_stops_its_threads(tiny_dataset: Path, tiny_onnx: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = set(threading.enumerate())
    with _runner(tiny_dataset, tiny_onnx, 2, monkeypatch) as runner:
        runner.logits([Frame(np.zeros((32, 32, 3), np.uint8), 0, 0.0, 0.0)] * 4)
        assert any(t.name.startswith("eyed-offline") for t in threading.enumerate())
    assert not [t for t in set(threading.enumerate()) - before if t.name.startswith("eyed-offline")]


def test_workers_take_model_batch_frames_a_call(
    tiny_dataset: Path, tiny_onnx: Path, frames: list[Frame], monkeypatch: pytest.MonkeyPatch
) -> None:
    with _runner(tiny_dataset, tiny_onnx, 1, monkeypatch) as one:
        expected = one.logits(frames)
    with _runner(tiny_dataset, tiny_onnx, 2, monkeypatch, batch=4) as runner:
        sizes: list[int] = []
        call = runner.classifier.logits

        def recorded(batch: np.ndarray) -> np.ndarray:
            sizes.append(len(batch))
            return call(batch)

        runner.classifier.logits = recorded  # type: ignore[method-assign]
        got = runner.logits(frames)
        assert runner.logits([]).shape == (0, expected.shape[1]) and runner.predict([]) == []
    # Shares of 6 and 5 frames, 4 frames a call: 4 + 2 and 4 + 1.
    assert sorted(sizes) == [1, 2, 4, 4]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_a_failing_worker_fails_the_call_and_leaves_no_thread(
    tiny_dataset: Path, tiny_onnx: Path, frames: list[Frame], monkeypatch: pytest.MonkeyPatch
) -> None:
    before = set(threading.enumerate())
    with pytest.raises(RuntimeError, match="broken model"), _runner(tiny_dataset, tiny_onnx, 2, monkeypatch) as runner:
        call, calls = runner.classifier.logits, itertools.count()

        def broken(batch: np.ndarray) -> np.ndarray:
            if next(calls) == 7:  # in whichever worker makes the eighth call
                raise RuntimeError("broken model")
            return call(batch)

        runner.classifier.logits = broken  # type: ignore[method-assign]
        runner.logits(frames)
    assert not [t for t in set(threading.enumerate()) - before if t.name.startswith("eyed-offline")]
