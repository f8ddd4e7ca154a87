"""``eyed bench``: the daemon's path against a bare onnxruntime loop (and the seed study's transformers loop),
on the same frames, in one run, so the ratios mean something on a shared, noisy machine.

- bare onnxruntime: ``session.run`` on tensors preprocessed beforehand, one frame per call on all of the
  runtime's threads, fetching the logits only: the obvious loop.
- bare onnxruntime, N frames at once: the same calls from one Python thread per core, on a session with one
  intra-op thread, which is how the daemon runs at fps 0: the runtime's limit on this machine.
- daemon path: the real pipeline (resize, inference, events, XPUB socket) fed from memory, with the model
  options the daemon takes for a replay at fps 0 (``Settings.runtime_model``), with a SUB client in another
  process receiving every event (it takes its share of the cores: a client that drained its queue every 50 ms
  instead of waking per event measured the same), and with no client at all.
- transformers loop: ``AutoImageProcessor`` + ``AutoModelForImageClassification`` in eager PyTorch, one PIL
  image at a time, as in the seed study.

Every path keeps its session, publisher and subscriber for the whole run, and the paths take turns in short
rounds (reversed every other round), so the two sides of a ratio are measured seconds apart: a burst of load
from another process on the machine then hits both alike instead of one path in particular.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from eyed.config import ModelConfig, PublishConfig, Settings
from eyed.model import load_classifier
from eyed.model.export import INPUT_NAME, K_NAME, OUTPUT_NAME
from eyed.model.onnx_backend import OnnxClassifier, open_session
from eyed.outputs import MissingExtra
from eyed.pipeline import Pipeline
from eyed.publisher import Publisher
from eyed.sources import open_recorded
from eyed.sources.memory import MemorySource

logger = logging.getLogger(__name__)


def load_frames(settings: Settings, n: int) -> tuple[list[np.ndarray], list[str | None]]:
    """The first ``n`` frames of the configured source, decoded, in memory."""
    cfg = settings.source.model_copy(update={"limit": n})
    images, truths = [], []
    with open_recorded(cfg) as src:
        for frame in src.frames():
            images.append(frame.image)
            truths.append(frame.truth)
    if not images:
        raise RuntimeError("the configured source gave no frames")
    return images, truths


def summarise(name: str, latencies_ms: list[float], wall_s: float, n: int) -> dict[str, Any]:
    lat = np.asarray(latencies_ms)
    return {
        "name": name,
        "frames": n,
        "fps": n / wall_s,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "latencies_ms": latencies_ms,  # pooled over rounds by pool_rounds, then dropped
    }


class BareLoop:
    """``session.run`` alone, batch 1, on tensors preprocessed beforehand, fetching only the logits (the daemon
    also fetches the graph's softmax and top-k). With ``at_once`` > 1, that many Python threads share the frames
    and call the one session at the same time (onnxruntime releases the GIL while it runs). A round goes
    ``passes`` times over the frames. The session is opened and warmed once, so every round measures steady
    state."""

    def __init__(self, path: Path, cfg: ModelConfig, tensors: list[np.ndarray], at_once: int = 1, passes: int = 1):
        self.session: Any = open_session(path, cfg)
        self.at_once = at_once
        feeds = [{INPUT_NAME: t[None], K_NAME: np.array([1], dtype=np.int64)} for t in tensors]
        for feed in feeds[:10]:
            self.session.run([OUTPUT_NAME], feed)
        self.feeds = feeds * passes

    def _loop(self, feeds: Iterator[dict[str, np.ndarray]], lock: threading.Lock, lat: list[float]) -> None:
        """Run the next frame until none is left; with others, each takes the next frame as it comes free, as
        the daemon's workers do."""
        run, fetch = self.session.run, [OUTPUT_NAME]
        while True:
            with lock:
                feed = next(feeds, None)
            if feed is None:
                return
            s = time.perf_counter()
            run(fetch, feed)
            lat.append((time.perf_counter() - s) * 1000)

    def __call__(self) -> dict[str, Any]:
        lat: list[float] = []
        feeds, lock = iter(self.feeds), threading.Lock()
        t0 = time.perf_counter()
        if self.at_once == 1:
            self._loop(feeds, lock, lat)
        else:
            threads = [threading.Thread(target=self._loop, args=(feeds, lock, lat)) for _ in range(self.at_once)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
        name = "bare onnxruntime" + (f", {self.at_once} frames at once" if self.at_once > 1 else "")
        return summarise(name, lat, time.perf_counter() - t0, len(self.feeds))


END = "label.bench-end"  # topic of the last message the benchmark publishes: the subscriber then reports back


def _receive(endpoint: str, conn: Any) -> None:
    """In a separate process: receive label events until the end message, then send back their latencies.

    Raw payloads are kept and parsed only at the end, so the subscriber takes as little CPU as it can from
    the pipeline it is measuring (this machine has two cores).
    """
    import json

    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"label.")  # END included
    sock.connect(endpoint)
    end = END.encode()
    payloads: list[bytes] = []
    # A blocking receive with no timeout (the other paths' rounds may take minutes on a small board): the
    # END message ends it, and the parent terminates this process if that never comes.
    while True:
        topic, payload = sock.recv_multipart()
        if topic == end:
            break
        payloads.append(payload)
    sock.close(linger=0)
    ctx.term()
    conn.send([json.loads(p)["latency_ms"] for p in payloads])
    conn.close()


class _RecordingPublisher(Publisher):
    """Keeps each label event's latency."""

    def __init__(self, cfg: PublishConfig) -> None:
        super().__init__(cfg)
        self.latencies: list[float] = []

    def send(self, topic: str, payload: dict[str, Any]) -> None:
        super().send(topic, payload)
        if payload["type"] == "label":
            self.latencies.append(payload["latency_ms"])


class DaemonPath:
    """The pipeline from frames in memory to published events. One publisher (and, with ``subscriber``, one
    SUB socket in another process, taking its share of this machine's two cores) serves every round; each
    round runs a fresh pipeline over the frames. On exit the subscriber must have received every event."""

    def __init__(
        self, classifier: OnnxClassifier, images: list[np.ndarray], subscriber: bool, workers: int = 1
    ) -> None:
        self.classifier = classifier
        self.images = images
        self.subscriber = subscriber
        self.workers = workers
        self._stack = contextlib.ExitStack()
        self._labels = 0

    def __enter__(self) -> DaemonPath:
        import multiprocessing

        tmp = self._stack.enter_context(tempfile.TemporaryDirectory(prefix="eyed-bench-"))
        self.pub = self._stack.enter_context(_RecordingPublisher(PublishConfig(endpoint=f"ipc://{tmp}/bench.sock")))
        if self.subscriber:
            mp = multiprocessing.get_context("spawn")
            self._results, child = mp.Pipe(duplex=False)
            self._receiver = mp.Process(target=_receive, args=(self.pub.endpoint, child), daemon=True)
            self._receiver.start()
            self._stack.callback(self._stop_receiver)
            try:
                self.pub.wait_for_subscribers(1, 60)
            except BaseException:
                self._stack.close()
                raise
        return self

    def _stop_receiver(self) -> None:
        self._receiver.join(10)
        if self._receiver.is_alive():
            self._receiver.terminate()
            self._receiver.join(5)

    def __call__(self, batch: int) -> dict[str, Any]:
        pipeline = Pipeline(
            MemorySource(self.images), self.classifier, self.pub, batch=batch, workers=self.workers, heartbeat_s=3600
        )
        before = len(self.pub.latencies)
        t0 = time.perf_counter()
        pipeline.start()
        pipeline.done.wait()
        wall = time.perf_counter() - t0
        if pipeline.failure is not None:
            raise RuntimeError(f"bench: the pipeline failed: {pipeline.failure}")
        latencies = self.pub.latencies[before:]
        self._labels += len(latencies)
        name = "daemon path" + (" -> SUB process" if self.subscriber else ", no subscriber")
        if batch > 1:
            name += f", batch {batch}"
        return summarise(name, latencies, wall, len(self.images))

    def __exit__(self, *exc: object) -> None:
        try:
            if self.subscriber:
                self.pub.send(END, {"type": END})
                received = self._results.recv() if self._results.poll(60) else []
                if len(received) != self._labels and exc[0] is None:
                    raise RuntimeError(f"bench: the subscriber received {len(received)} of {self._labels} events")
        finally:
            self._stack.close()


def bench_seed(model_id: str, images: list[np.ndarray]) -> dict[str, Any]:
    """The seed study's loop: AutoImageProcessor + eager transformers model, one PIL image at a time."""
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from eyed.model.checkpoint import resolve_checkpoint

    folder = resolve_checkpoint(model_id)
    processor = AutoImageProcessor.from_pretrained(folder)
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    pil = [Image.fromarray(img) for img in images]
    lat = []
    t0 = time.perf_counter()
    for im in pil:
        s = time.perf_counter()
        with torch.no_grad():
            logits = model(**processor(im, return_tensors="pt")).logits
        int(logits.argmax(-1))
        lat.append((time.perf_counter() - s) * 1000)
    return summarise("transformers loop (seed)", lat, time.perf_counter() - t0, len(pil))


def int8_model(settings: Settings, fp32: OnnxClassifier, calibration: int = 300) -> Path:
    """The INT8 version of the benchmarked model, quantised once into the cache (calibrated on the source)."""
    from eyed.model.quantize import METHOD_VERSION, export_int8

    # The FP32 file's content is part of the name: a re-exported or replaced model.onnx gets a new INT8 file.
    digest = hashlib.sha256(fp32.path.read_bytes()).hexdigest()[:12]
    name = f"{fp32.path.stem}-{digest}-int8v{METHOD_VERSION}-c{calibration}.onnx"
    path = settings.model.cache_dir.expanduser() / "onnx" / name
    if not path.is_file():
        logger.warning("quantising %s to INT8 for the benchmark (once): %s", fp32.path, path)
        model = settings.model.model_copy(update={"onnx": fp32.path})
        try:
            export_int8(settings.model_copy(update={"model": model}), path, calibration=calibration, check=0)
        except MissingExtra as exc:
            raise MissingExtra(f"{exc}; or pass --int8 with a file from `eyed export --int8`, or --no-int8") from exc
    return path


def run_bench(
    settings: Settings,
    frames: int = 200,
    seed_frames: int = 100,
    batch: int = 8,
    rounds: int = 8,
    passes: int = 3,
    int8: Path | None = None,
    with_int8: bool = True,
) -> dict[str, Any]:
    """Measure every path on the same frames in alternating rounds; returns rows, ratios and a text table.

    Each precision (FP32, and INT8 unless ``with_int8`` is false: the file ``int8``, else one quantised into
    the cache) runs the bare loop and the daemon's path. fps is the median over rounds; each ratio is the
    median of the per-round ratios, so a slow spell on a shared machine hits both sides of a ratio alike.
    Latencies are pooled over all rounds.

    Each round goes ``passes`` times over the ``frames`` decoded frames (as references: no more memory). The
    daemon runs for hours, so the rounds should measure its steady state: a fresh pipeline per round spends
    about one frame's time filling up and one draining, a fixed cost that weighed 1-3% on a 200-frame INT8
    round, two to three times what it weighed on FP32's longer one, and so understated INT8/FP32.
    """
    if settings.model.backend != "onnx":
        settings = settings.model_copy(update={"model": settings.model.model_copy(update={"backend": "onnx"})})
    images, _ = load_frames(settings, frames)
    # The daemon's options for this source at fps 0 (workers, threads per call, spinning); the bare loop
    # keeps the configured ones (by default one call at a time on all cores).
    daemon_cfg = settings.full_speed_model()
    at_once = daemon_cfg.workers
    fp32 = load_classifier(daemon_cfg)
    assert isinstance(fp32, OnnxClassifier)
    models = {"fp32": fp32}
    if with_int8:
        path = int8 or int8_model(settings, fp32)
        models["int8"] = OnnxClassifier(daemon_cfg.model_copy(update={"onnx": path}))
    tensors = [fp32.prepare(img) for img in images]
    runs: dict[str, list[dict[str, Any]]] = {}
    with contextlib.ExitStack() as stack:
        paths: list[tuple[str, Callable[[], dict[str, Any]]]] = []
        for precision, classifier in models.items():
            paths.append((precision, BareLoop(classifier.path, settings.model, tensors, passes=passes)))
            if at_once > 1:
                paths.append((precision, BareLoop(classifier.path, daemon_cfg, tensors, at_once, passes)))
            sub = stack.enter_context(DaemonPath(classifier, images * passes, subscriber=True, workers=at_once))
            alone = stack.enter_context(DaemonPath(classifier, images * passes, subscriber=False, workers=at_once))
            sub(1)  # the pipeline's first frames warm its session up, as BareLoop's do
            paths += [(precision, functools.partial(sub, 1)), (precision, functools.partial(alone, 1))]
            if batch > 1:
                paths.append((precision, functools.partial(sub, batch)))
        for r in range(rounds):
            # Reversed every other round, so a trend in the machine's load favours no path.
            for precision, measure in paths if r % 2 == 0 else paths[::-1]:
                row = measure()
                row["name"] = f"{precision} {row['name']}"
                runs.setdefault(row["name"], []).append(row)
    rows = [pool_rounds(name, rs) for name, rs in runs.items()]

    def ratio(a: str, b: str) -> float:
        return statistics.median(x["fps"] / y["fps"] for x, y in zip(runs[a], runs[b], strict=True))

    daemon = "daemon path -> SUB process"
    parallel = f"bare onnxruntime, {at_once} frames at once"
    ratios: dict[str, float] = {}
    for p in models:
        ratios[f"{p} daemon/bare"] = ratio(f"{p} {daemon}", f"{p} bare onnxruntime")
        ratios[f"{p} daemon (no subscriber)/bare"] = ratio(f"{p} daemon path, no subscriber", f"{p} bare onnxruntime")
        if at_once > 1:
            ratios[f"{p} daemon/{parallel}"] = ratio(f"{p} {daemon}", f"{p} {parallel}")
        if batch > 1:
            ratios[f"{p} daemon batch {batch}/daemon batch 1"] = ratio(f"{p} {daemon}, batch {batch}", f"{p} {daemon}")
    if "int8" in models:
        ratios["int8/fp32 bare"] = ratio("int8 bare onnxruntime", "fp32 bare onnxruntime")
        if at_once > 1:
            ratios[f"int8/fp32 {parallel}"] = ratio(f"int8 {parallel}", f"fp32 {parallel}")
        ratios["int8/fp32 daemon"] = ratio(f"int8 {daemon}", f"fp32 {daemon}")
    if seed_frames > 0:
        try:
            seed = bench_seed(settings.model.id, images[:seed_frames])
        except ImportError:
            logger.warning("torch/transformers not installed: transformers loop skipped")
        else:
            rows.append(pool_rounds(seed["name"], [seed]))
            for p in models:
                ratios[f"{p} daemon/transformers"] = (
                    next(r for r in rows if r["name"] == f"{p} {daemon}")["fps"] / (seed["fps"])
                )
    for classifier in models.values():
        classifier.close()
    lines = [f"{'path':<43} {'frames':>7} {'fps':>9} {'p50 ms':>8} {'p99 ms':>8}"]
    lines += [
        f"{r['name']:<43} {r['frames']:>7} {r['fps']:>9.1f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f}" for r in rows
    ]
    lines += [f"{name}: {value:.2f}x" for name, value in ratios.items()]
    lines.append(
        f"daemon path: {at_once} worker(s), {daemon_cfg.threads or 'default'} onnxruntime thread(s) each; "
        f"bare onnxruntime: {settings.model.threads or 'default'} thread(s)"
    )
    lines.append(
        f"{rounds} alternating rounds of {passes} x {len(images)} frames; fps = median over rounds, ratio = median of "
        "per-round ratios; latency of the daemon path = frame in to event published (includes queueing)"
    )
    return {
        "model": settings.model.id,
        "onnx": {p: str(c.path) for p, c in models.items()},
        "threads": settings.model.threads,
        "daemon": {"workers": at_once, "threads": daemon_cfg.threads, "spinning": daemon_cfg.spinning},
        "rounds": rounds,
        "passes": passes,
        "rows": rows,
        "ratios": ratios,
        "text": "\n".join(lines),
    }


def pool_rounds(name: str, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One row for a path: fps is the median over rounds, latency percentiles are over every frame."""
    lat = np.concatenate([np.asarray(r["latencies_ms"]) for r in rounds])
    return {
        "name": name,
        "frames": sum(r["frames"] for r in rounds),
        "fps": statistics.median(r["fps"] for r in rounds),
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "fps_per_round": [round(r["fps"], 1) for r in rounds],
    }
