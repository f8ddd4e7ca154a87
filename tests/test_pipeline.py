"""The pipeline with a real classifier and publisher, fed from memory: inline (replay) and threaded (live)."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import zmq

from eyed import pipeline as pipeline_module
from eyed.config import ModelConfig, PublishConfig, SourceConfig
from eyed.model import load_classifier
from eyed.pipeline import DriftWatch, Pipeline
from eyed.publisher import Publisher
from eyed.sources.base import Pacer
from eyed.sources.capture import CaptureSource
from eyed.sources.memory import MemorySource
from eyed.types import Frame, Prediction
from tests.conftest import synthetic_images
from tests.sources.test_capture import LoopingCapture
from tests.test_publisher import await_subscriptions


@contextlib.contextmanager
def subscribed(
    tmp_path: Path, publisher: type[Publisher] = Publisher, topics: bytes = b""
) -> Iterator[tuple[Publisher, zmq.Socket[Any]]]:
    """A real publisher, and a SUB socket on it that keeps every event until read."""
    endpoint = f"ipc://{tmp_path}/pipe.sock"
    ctx = zmq.Context()
    with publisher(PublishConfig(endpoint=endpoint), ctx) as pub:
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, topics)
        sub.setsockopt(zmq.RCVHWM, 0)
        sub.connect(endpoint)
        # Not wait_for_subscribers(1): a reader of heartbeats alone is no subscriber the daemon waits for.
        await_subscriptions(pub)
        pub.wait_for_subscribers(0, 10)  # done waiting: the publisher stops watching connections
        try:
            yield pub, sub
        finally:
            sub.close(linger=0)
    ctx.term()


def receive(sub: zmq.Socket[Any], timeout_ms: int) -> dict[str, Any] | None:
    """The next event's payload, or None after ``timeout_ms`` without one."""
    return json.loads(sub.recv_multipart()[1]) if sub.poll(timeout_ms) else None


def run_pipeline(
    tiny_onnx: Path, tmp_path: Path, source: Any, batch: int = 1, classifier: Any = None, workers: int = 1
) -> list[dict[str, Any]]:
    classifier = classifier or load_classifier(ModelConfig(onnx=tiny_onnx, batch=batch))
    events = []
    with subscribed(tmp_path) as (pub, sub):
        pipeline = Pipeline(source, classifier, pub, batch=batch, workers=workers, heartbeat_s=3600)
        pipeline.start()
        assert pipeline.done.wait(30)
        assert pipeline.join(5)
        while (event := receive(sub, 2000)) is not None:
            events.append(event)
            if event.get("state") in ("finished", "failed"):
                break
    return events


@pytest.mark.parametrize(("batch", "workers"), [(1, 1), (4, 1), (1, 2), (3, 3)])
def test_every_frame_is_classified_in_order(tiny_onnx: Path, tmp_path: Path, batch: int, workers: int) -> None:
    images = synthetic_images(10, seed=1, size=40)
    source = MemorySource(images, [f"t{i}" for i in range(10)])
    events = run_pipeline(tiny_onnx, tmp_path, source, batch, workers=workers)
    labels = [e for e in events if e["type"] == "label"]
    assert [e["seq"] for e in labels] == list(range(10))
    assert [e["frame"] for e in labels] == list(range(10))
    assert [e["truth"] for e in labels] == [f"t{i}" for i in range(10)]
    assert events[-1]["state"] == "finished" and events[-1]["frames"] == 10


def test_batched_predictions_equal_single_ones(tiny_onnx: Path, tmp_path: Path) -> None:
    images = synthetic_images(8, seed=2, size=32)
    one = [e for e in run_pipeline(tiny_onnx, tmp_path, MemorySource(images), 1) if e["type"] == "label"]
    four = [e for e in run_pipeline(tiny_onnx, tmp_path, MemorySource(images), 4) if e["type"] == "label"]
    assert [e["class_id"] for e in one] == [e["class_id"] for e in four]
    assert np.allclose([e["score"] for e in one], [e["score"] for e in four], atol=1e-4)


class FirstCallOvertaken:
    """The real classifier, except that its first call returns only after a later one has returned, and it
    notes how many calls were in flight at once."""

    def __init__(self, classifier: Any) -> None:
        self.inner = classifier
        self.name, self.backend, self.input_shape = classifier.name, classifier.backend, classifier.input_shape
        self.prepare = classifier.prepare
        self.lock = threading.Lock()
        self.calls = self.in_flight = self.most_in_flight = 0
        self.later_returned = threading.Event()
        self.overtaken = False

    def predict(self, batch: np.ndarray) -> list[Any]:
        with self.lock:
            call, self.calls = self.calls, self.calls + 1
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            preds = self.inner.predict(batch)
            if call == 0:
                self.overtaken = self.later_returned.wait(10)
            return preds
        finally:
            with self.lock:
                self.in_flight -= 1
            if call > 0:
                self.later_returned.set()

    def close(self) -> None:
        self.inner.close()


def test_workers_classify_at_once_and_publish_in_frame_order(tiny_onnx: Path, tmp_path: Path) -> None:
    """Two workers: the second batch is done before the first, and its events still wait for the first's."""
    images = synthetic_images(12, seed=3, size=36)
    classifier = FirstCallOvertaken(load_classifier(ModelConfig(onnx=tiny_onnx, threads=1)))
    events = run_pipeline(tiny_onnx, tmp_path, MemorySource(images), batch=2, classifier=classifier, workers=2)
    assert classifier.overtaken and classifier.most_in_flight == 2
    labels = [e for e in events if e["type"] == "label"]
    assert [e["frame"] for e in labels] == list(range(12))
    assert [e["seq"] for e in labels] == list(range(12))
    alone = [e for e in run_pipeline(tiny_onnx, tmp_path, MemorySource(images)) if e["type"] == "label"]
    assert [e["class_id"] for e in labels] == [e["class_id"] for e in alone]
    assert np.allclose([e["score"] for e in labels], [e["score"] for e in alone], atol=1e-5)
    assert events[-1]["state"] == "finished" and events[-1]["frames"] == 12


class FirstCallHeld(FirstCallOvertaken):
    """The real classifier, except that its first call returns only once ``release`` is set."""

    def __init__(self, classifier: Any) -> None:
        super().__init__(classifier)
        self.release = threading.Event()

    def predict(self, batch: np.ndarray) -> list[Any]:
        with self.lock:
            call, self.calls = self.calls, self.calls + 1
        if call == 0:
            self.release.wait(30)
        return self.inner.predict(batch)


def test_a_stuck_batch_holds_the_other_workers_back_soon(tiny_onnx: Path, tmp_path: Path) -> None:
    """Batches done after a stuck one wait in memory for it, so the others stop taking frames 2 x workers
    tickets ahead; once it comes out, everything follows in order."""
    classifier = FirstCallHeld(load_classifier(ModelConfig(onnx=tiny_onnx, threads=1)))
    result: list[list[dict[str, Any]]] = []
    source = MemorySource(synthetic_images(20, seed=4))
    runner = threading.Thread(
        target=lambda: result.append(run_pipeline(tiny_onnx, tmp_path, source, classifier=classifier, workers=2))
    )
    runner.start()
    try:
        deadline = time.monotonic() + 10
        while classifier.calls < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)  # time enough for the other 15 calls, were they allowed
        # The held call is ticket 0 or, when the second worker called first, ticket 1: then ticket 0 goes out
        # and one more ticket is allowed. Either way 4 tickets at most after the oldest not yet out.
        assert classifier.calls in (4, 5)
    finally:
        classifier.release.set()
        runner.join(30)
    labels = [e for e in result[0] if e["type"] == "label"]
    assert [e["frame"] for e in labels] == list(range(20))
    assert [e["seq"] for e in labels] == list(range(20))


class FailsOnCall:
    """The real classifier, except that call ``bad`` raises (or every call for which ``bad(call)`` is true)."""

    def __init__(self, classifier: Any, bad: int | Callable[[int], bool]) -> None:
        self.inner, self.calls = classifier, 0
        self.fails = bad if callable(bad) else bad.__eq__
        self.name, self.backend, self.input_shape = classifier.name, classifier.backend, classifier.input_shape
        self.prepare = classifier.prepare
        self.lock = threading.Lock()

    def predict(self, batch: np.ndarray) -> list[Any]:
        with self.lock:
            call, self.calls = self.calls, self.calls + 1
        if self.fails(call):
            raise RuntimeError("onnxruntime: bad allocation")
        return self.inner.predict(batch)

    def close(self) -> None:
        self.inner.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failed_inference_costs_its_batch_only(tiny_onnx: Path, tmp_path: Path, workers: int) -> None:
    classifier = FailsOnCall(load_classifier(ModelConfig(onnx=tiny_onnx)), bad=1)
    source = MemorySource(synthetic_images(8))
    events = run_pipeline(tiny_onnx, tmp_path, source, batch=2, classifier=classifier, workers=workers)
    labels = [e for e in events if e["type"] == "label"]
    assert len(labels) == 6 and [e["seq"] for e in labels] == list(range(6))
    # Which batch failed depends on which worker called first; the frames around it are all there, in order.
    frames = [e["frame"] for e in labels]
    assert frames == sorted(frames) and len(set(range(8)) - set(frames)) == 2
    assert events[-1]["errors"] == 2 and events[-1]["frames"] == 6 and events[-1]["state"] == "finished"


def test_a_failure_on_every_frame_is_logged_once_then_counted(
    tiny_onnx: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A traceback per failed frame flooded the journal (240 lines a second from a 30 fps camera): the first
    failure is logged in full, the next ones as a count at most once a minute, and the recovery in one line."""
    classifier = FailsOnCall(load_classifier(ModelConfig(onnx=tiny_onnx)), bad=lambda call: call < 30)
    with caplog.at_level(logging.INFO, logger="eyed.pipeline"):
        events = run_pipeline(tiny_onnx, tmp_path, MemorySource(synthetic_images(40)), classifier=classifier)
    assert events[-1]["state"] == "finished" and (events[-1]["errors"], events[-1]["frames"]) == (30, 10)
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(failures) == 1 and failures[0].exc_info is not None, [r.getMessage() for r in failures]
    assert failures[0].getMessage() == "inference failed on frame(s) 0-0; skipped"
    assert "inference failed: works again after 30 frame(s) skipped" in caplog.messages


def test_a_repeated_failure_is_counted_in_the_log_at_most_once_a_period(
    tiny_onnx: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline_module, "REPEAT_LOG_EVERY_S", 0.0)
    classifier = FailsOnCall(load_classifier(ModelConfig(onnx=tiny_onnx)), bad=lambda call: call < 3)
    with caplog.at_level(logging.ERROR, logger="eyed.pipeline"):
        run_pipeline(tiny_onnx, tmp_path, MemorySource(synthetic_images(5)), classifier=classifier)
    assert [r.getMessage() for r in caplog.records] == [
        "inference failed on frame(s) 0-0; skipped",
        "inference failed again: 1 more frame(s) skipped (last: on frame(s) 1-1)",
        "inference failed again: 1 more frame(s) skipped (last: on frame(s) 2-2)",
    ]


def test_a_source_none_of_whose_frames_can_be_classified_fails_for_a_restart(
    tiny_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model that fails on every frame, for ever, left a daemon counting errors and looking live."""
    monkeypatch.setattr(pipeline_module, "NOTHING_CLASSIFIED_GIVE_UP_S", 0.2)
    classifier = FailsOnCall(load_classifier(ModelConfig(onnx=tiny_onnx)), bad=lambda call: True)
    events = run_pipeline(tiny_onnx, tmp_path, MemorySource(synthetic_images(4) * 50_000), classifier=classifier)
    assert events[-1]["state"] == "failed" and events[-1]["frames"] == 0


def test_frames_that_are_classified_now_and_then_keep_the_pipeline_going(
    tiny_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With no grace at all, any two failed batches in a row would end it: one in two fails, none in a row.
    monkeypatch.setattr(pipeline_module, "NOTHING_CLASSIFIED_GIVE_UP_S", 0.0)
    classifier = FailsOnCall(load_classifier(ModelConfig(onnx=tiny_onnx)), bad=lambda call: call % 2 == 1)
    events = run_pipeline(tiny_onnx, tmp_path, MemorySource(synthetic_images(40)), classifier=classifier)
    assert events[-1]["state"] == "finished" and (events[-1]["errors"], events[-1]["frames"]) == (20, 20)


class SlowFailingPublisher(Publisher):
    """Its first label event takes a while and then fails, as a socket error would: by then the other worker
    has handed in the batches after it and is held back."""

    def __init__(self, cfg: PublishConfig, context: Any) -> None:
        super().__init__(cfg, context)
        self.labels = 0

    def send(self, topic: str, payload: dict[str, Any]) -> None:
        if payload["type"] == "label":
            self.labels += 1
            if self.labels == 1:
                time.sleep(0.5)
                raise zmq.ZMQError(zmq.EAGAIN, "send failed")
        super().send(topic, payload)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failure_while_publishing_ends_every_worker(tiny_onnx: Path, tmp_path: Path, workers: int) -> None:
    classifier = load_classifier(ModelConfig(onnx=tiny_onnx, threads=1))
    with subscribed(tmp_path, SlowFailingPublisher, b"health.") as (pub, sub):
        pipeline = Pipeline(MemorySource(synthetic_images(50)), classifier, pub, workers=workers, heartbeat_s=3600)
        pipeline.start()
        assert pipeline.done.wait(10) and pipeline.join(5)
        states = []
        while (event := receive(sub, 1000)) is not None:
            states.append(event["state"])
    assert isinstance(pipeline.failure, zmq.ZMQError)
    assert states[-1] == "failed" and states.count("failed") == 1


class EndlessSource(MemorySource):
    def frames(self, stop: threading.Event | None = None) -> Iterator[Frame]:
        i = 0
        while stop is None or not stop.is_set():
            yield Frame(self.images[i % len(self.images)], i, 0.0, time.perf_counter())
            i += 1


def test_stop_ends_every_worker_and_loses_no_event(tiny_onnx: Path, tmp_path: Path) -> None:
    classifier = load_classifier(ModelConfig(onnx=tiny_onnx, threads=1))
    with subscribed(tmp_path) as (pub, sub):
        pipeline = Pipeline(EndlessSource(synthetic_images(5)), classifier, pub, batch=2, workers=3, heartbeat_s=3600)
        pipeline.start()
        labels: list[dict[str, Any]] = []
        while len(labels) < 30 and (event := receive(sub, 10_000)) is not None:
            labels += [event] if event["type"] == "label" else []
        pipeline.stop.set()
        assert pipeline.join(5)
        last = None
        while last is None and (event := receive(sub, 2000)) is not None:
            labels += [event] if event["type"] == "label" else []
            last = event if event.get("state") == "stopped" else None
    assert last is not None
    assert [e["seq"] for e in labels] == list(range(len(labels)))
    assert [e["frame"] for e in labels] == list(range(len(labels)))
    assert last["frames"] == len(labels) >= 30


class BrokenSource(MemorySource):
    def frames(self, stop: threading.Event | None = None) -> Iterator[Frame]:
        yield from list(super().frames(stop))[:3]
        raise OSError("camera unplugged")


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_source_ends_in_state_failed(tiny_onnx: Path, tmp_path: Path, workers: int) -> None:
    events = run_pipeline(tiny_onnx, tmp_path, BrokenSource(synthetic_images(5)), workers=workers)
    labels = [e for e in events if e["type"] == "label"]
    assert len(labels) == 3
    assert events[-1]["type"] == "health" and events[-1]["state"] == "failed"


@pytest.mark.parametrize("workers", [1, 2])
def test_a_frame_that_cannot_be_resized_is_skipped_and_counted(tiny_onnx: Path, tmp_path: Path, workers: int) -> None:
    images = synthetic_images(4)
    images.insert(2, np.zeros((0, 0, 3), dtype=np.uint8))  # a zero-size read
    events = run_pipeline(tiny_onnx, tmp_path, MemorySource(images), workers=workers)
    labels = [e for e in events if e["type"] == "label"]
    assert [e["frame"] for e in labels] == [0, 1, 3, 4]
    assert [e["seq"] for e in labels] == [0, 1, 2, 3]
    assert events[-1]["errors"] == 1 and events[-1]["state"] == "finished"


class NaNOnFrame:
    """The real classifier, except that frame ``bad`` (by call order) comes out with NaN scores."""

    def __init__(self, classifier: Any, bad: int) -> None:
        self.inner, self.bad, self.calls = classifier, bad, 0
        self.name, self.backend, self.input_shape = classifier.name, classifier.backend, classifier.input_shape
        self.prepare = classifier.prepare

    def predict(self, batch: np.ndarray) -> list[Any]:
        preds = self.inner.predict(batch)
        self.calls += 1
        if self.calls - 1 == self.bad:
            nan = float("nan")
            preds = [
                dataclasses.replace(p, topk=tuple(dataclasses.replace(s, score=nan) for s in p.topk)) for p in preds
            ]
        return preds

    def close(self) -> None:
        self.inner.close()


def test_non_finite_scores_are_skipped_and_counted(tiny_onnx: Path, tmp_path: Path) -> None:
    """A model output that JSON cannot carry costs its own event, not the daemon."""
    classifier = NaNOnFrame(load_classifier(ModelConfig(onnx=tiny_onnx)), bad=1)
    events = run_pipeline(tiny_onnx, tmp_path, MemorySource(synthetic_images(4)), classifier=classifier)
    labels = [e for e in events if e["type"] == "label"]
    assert [e["frame"] for e in labels] == [0, 2, 3]
    assert [e["seq"] for e in labels] == [0, 1, 2]
    assert events[-1]["errors"] == 1 and events[-1]["frames"] == 3 and events[-1]["state"] == "finished"


def test_text_that_is_not_utf8_goes_out_repaired(tiny_onnx: Path, tmp_path: Path) -> None:
    """An image folder's class name in Latin-1 ("caf\\xe9", which Python reads with a surrogate) made the encoder
    raise a TypeError that ended the worker (exit 1, errors still 0). The frame's event goes out, with U+FFFD."""
    truth = b"caf\xe9".decode("utf-8", "surrogateescape")
    events = run_pipeline(tiny_onnx, tmp_path, MemorySource(synthetic_images(3), [truth, "plain", truth]))
    labels = [e for e in events if e["type"] == "label"]
    assert [e["truth"] for e in labels] == ["caf\ufffd", "plain", "caf\ufffd"]
    assert events[-1]["errors"] == 0 and events[-1]["frames"] == 3 and events[-1]["state"] == "finished"


def test_an_event_json_cannot_carry_costs_that_event_only(
    tiny_onnx: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever the encoder refuses is a ValueError: counted in errors and logged as what it is (not as the
    model's non-finite scores), and the next frames go on."""
    truths: list[Any] = [None, 2**70, None, None]  # an integer JSON (orjson) cannot carry
    with caplog.at_level("ERROR", logger="eyed.pipeline"):
        events = run_pipeline(tiny_onnx, tmp_path, MemorySource(synthetic_images(4), truths))
    labels = [e for e in events if e["type"] == "label"]
    assert [e["frame"] for e in labels] == [0, 2, 3]
    assert [e["seq"] for e in labels] == [0, 1, 2]
    assert events[-1]["errors"] == 1 and events[-1]["frames"] == 3 and events[-1]["state"] == "finished"
    assert "frame 1: no label event" in caplog.text and "64-bit" in caplog.text and "non-finite" not in caplog.text


class SlowlyPacedSource(MemorySource):
    """Endless, paced as a replay is at a low source.fps: by a real Pacer, stopped by the pipeline's ``stop``."""

    def __init__(self, images: list[np.ndarray], fps: float) -> None:
        super().__init__(images)
        self.fps = fps

    def frames(self, stop: threading.Event | None = None) -> Iterator[Frame]:
        pacer = Pacer(self.fps, stop)
        i = 0
        while pacer.wait():
            yield Frame(self.images[i % len(self.images)], i, time.time(), time.perf_counter())
            i += 1


def test_a_wait_on_the_sources_pace_counts_as_progress(tiny_onnx: Path, tmp_path: Path) -> None:
    """What the watchdog is fed on: a worker waiting for a slowly paced source's next frame is alive."""
    classifier = load_classifier(ModelConfig(onnx=tiny_onnx))
    with subscribed(tmp_path) as (pub, sub):
        pipeline = Pipeline(SlowlyPacedSource(synthetic_images(2), fps=0.5), classifier, pub, heartbeat_s=3600)
        pipeline.start()
        while (event := receive(sub, 10_000)) is not None and event["type"] != "label":
            pass
        assert event is not None
        time.sleep(1.0)  # into the 2 s wait for the next frame
        now = time.monotonic()
        assert now - pipeline.counters.last_progress > 0.8  # no batch published meanwhile
        assert pipeline.counters.alive_at(now) == now
        assert pipeline.counters.paced_until > now
        pipeline.stop.set()
        assert pipeline.join(5)
    assert pipeline.failure is None


def test_heartbeats_keep_time_while_a_paced_source_waits(tiny_onnx: Path, tmp_path: Path) -> None:
    """A frame every 4 s, a heartbeat every 0.5 s: the heartbeats go out while the worker waits for the
    next frame, not once per frame, or `eyed health` would take a working daemon for a dead one."""
    classifier = load_classifier(ModelConfig(onnx=tiny_onnx))
    with subscribed(tmp_path, topics=b"health.") as (pub, sub):
        pipeline = Pipeline(SlowlyPacedSource(synthetic_images(2), fps=0.25), classifier, pub, heartbeat_s=0.5)
        pipeline.start()
        times: list[float] = []
        while len(times) < 6 and (event := receive(sub, 10_000)) is not None:
            assert event["state"] == "live"
            times.append(time.monotonic())
        pipeline.stop.set()
        assert pipeline.join(5)
    assert pipeline.failure is None
    # Five gaps inside the first frame's 4 s wait: about 0.5 s each, none near the frame period.
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) == 5 and max(gaps) < 2.0, gaps


def test_a_pace_wait_does_not_spin_while_another_worker_publishes(tiny_onnx: Path) -> None:
    """That worker beats when due; the waiting one sleeps to its frame's time, not to an overdue beat."""
    classifier = load_classifier(ModelConfig(onnx=tiny_onnx))
    pipeline = Pipeline(MemorySource(synthetic_images(2)), classifier, Publisher(PublishConfig()), workers=2)
    pipeline._publishing = True
    assert pipeline._paced(time.monotonic() + 1) is None


def test_a_live_source_goes_one_frame_at_a_time(tiny_onnx: Path) -> None:
    camera = MemorySource(synthetic_images(2))
    camera.live = True
    classifier = load_classifier(ModelConfig(onnx=tiny_onnx))
    pipeline = Pipeline(camera, classifier, Publisher(PublishConfig()), batch=8, workers=3)
    assert (pipeline.batch, pipeline.workers) == (1, 1)


def test_a_camera_with_a_limit_finishes_like_a_replay(tiny_onnx: Path, tmp_path: Path) -> None:
    camera = LoopingCapture(synthetic_images(3, size=40))
    cfg = SourceConfig(kind="webcam", device=0, limit=5, freeze_diff=0)
    with CaptureSource(cfg, opener=lambda _cfg: camera) as source:
        events = run_pipeline(tiny_onnx, tmp_path, source)
    assert [e["seq"] for e in events if e["type"] == "label"] == list(range(5))
    assert events[-1]["state"] == "finished" and events[-1]["frames"] == 5


def test_frames_are_frozen() -> None:
    frame = Frame(np.zeros((2, 2, 3), np.uint8), 0, 0.0, 0.0)
    with pytest.raises(AttributeError):
        frame.index = 1  # type: ignore[misc]


# A drift statistic that fails is counted in the health errors: drift must not stop unseen.
class FailingExtractor:
    def __call__(self, image: np.ndarray, pred: Prediction) -> Any:
        raise ValueError("odd frame")


def run_with_drift(tiny_onnx: Path, tmp_path: Path, drift: Any) -> tuple[Pipeline, list[dict[str, Any]]]:
    """Four frames through a pipeline with ``drift`` watching; the pipeline and the events up to the last one."""
    classifier = load_classifier(ModelConfig(onnx=tiny_onnx))
    events = []
    with subscribed(tmp_path) as (pub, sub):
        pipeline = Pipeline(MemorySource(synthetic_images(4)), classifier, pub, heartbeat_s=3600, drift=drift)
        pipeline.start()
        assert pipeline.join(30)
        while (event := receive(sub, 2000)) is not None:
            events.append(event)
            if event.get("state") == "finished":
                break
    return pipeline, events


def test_a_failing_drift_statistic_is_counted(tiny_onnx: Path, tmp_path: Path) -> None:
    _, events = run_with_drift(tiny_onnx, tmp_path, DriftWatch(FailingExtractor(), None))  # type: ignore[arg-type]
    assert len([e for e in events if e["type"] == "label"]) == 4
    assert events[-1]["state"] == "finished" and events[-1]["errors"] == 4


class EveryFrameAWindow:
    """A drift watch that closes a window on every frame."""

    def observe(self, frame: Frame, pred: Prediction) -> Any:
        return SimpleNamespace(window=frame.index)


def test_a_drift_event_json_cannot_carry_costs_that_event_only(
    tiny_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("eyed.drift.window_payload", lambda report, *_: {"metrics": {"psi": float("nan")}})
    pipeline, events = run_with_drift(tiny_onnx, tmp_path, EveryFrameAWindow())
    assert pipeline.failure is None
    assert len([e for e in events if e["type"] == "label"]) == 4
    assert events[-1]["state"] == "finished" and events[-1]["errors"] == 4
