"""``eyed bench``: the daemon's path against a bare onnxruntime loop (and the seed study's transformers loop),
on the same frames, in one run, so the ratios mean something on a shared, noisy machine.

- bare onnxruntime: ``session.run`` on tensors preprocessed beforehand, one frame per call on the threads the
  daemon gives one call at a time (``model.threads``, else the cores this process may use: an affinity mask
  or a CPU quota counts, as for the daemon), fetching the logits only: the obvious loop.
- bare onnxruntime, N frames at once: the same calls from one Python thread per core, on a session with one
  intra-op thread, which is how the daemon runs at fps 0: the runtime's limit on this machine.
- daemon path: the real pipeline (resize, inference, events, the configured drift monitor, XPUB socket) fed
  from memory, with the model options the daemon takes for a replay at fps 0 (``Settings.runtime_model``) and
  the configured publish options (an ipc socket in a temporary folder instead of ``publish.endpoint``; CURVE
  with temporary keys), with a SUB client in another process receiving every event (it takes its share of the
  cores: a client that drained its queue every 50 ms instead of waking per event measured the same), and with
  no client at all.
- transformers loop: ``AutoImageProcessor`` + ``AutoModelForImageClassification`` in eager PyTorch, one PIL
  image at a time, as in the seed study; loaded and warmed up before the rounds.

Every path keeps its session, publisher and subscriber for the whole run, and the paths take turns in short
rounds (reversed every other round), so the two sides of a ratio are measured seconds apart: a burst of load
from another process on the machine then hits both alike instead of one path in particular.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import platform
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

import eyed.config
from eyed.config import ConfigError, ModelConfig, PublishConfig, Settings, resolved_threads
from eyed.model import ModelLoadError, load_classifier
from eyed.model.checkpoint import names_recorded, same_checkpoint
from eyed.model.export import INPUT_NAME, K_NAME, META_MODEL_ID, OUTPUT_NAME
from eyed.model.onnx_backend import OnnxClassifier, open_session
from eyed.outputs import MissingExtra
from eyed.pipeline import DriftWatch, Pipeline
from eyed.publisher import Publisher
from eyed.sources import open_recorded
from eyed.sources.memory import MemorySource

logger = logging.getLogger(__name__)

# Frames the transformers loop runs, untimed, before the rounds: its first call takes seconds (torch's lazy
# initialisation), which would otherwise count as one slow frame of the first round.
SEED_WARMUP = 3


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


def bare_model(settings: Settings) -> ModelConfig:
    """The model options of the bare loop, one call at a time: the configured ones, with ``model.threads = 0``
    resolved as the daemon resolves it for one call at a time (the cores this process may use).

    Left at 0, onnxruntime would count every core of the host, not those an affinity mask or a CPU quota
    leaves this process, and on a restricted host the bare loop would run on more threads than the daemon may.
    """
    m = settings.model
    if m.threads:
        return m
    return m.model_copy(update={"threads": resolved_threads(eyed.config.available_cores(), 1)})


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


def _receive(endpoint: str, conn: Any, curve: tuple[Path, Path] | None = None) -> None:
    """In a separate process: receive label events until the end message, then send back their latencies.
    ``curve``: (this subscriber's secret key file, the publisher's public key file) when CURVE is on.

    Raw payloads are kept and parsed only at the end, so the subscriber takes as little CPU as it can from
    the pipeline it is measuring (this machine has two cores).
    """
    import zmq

    from eyed.curve import apply_client

    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"label.")  # END included
    if curve is not None:
        apply_client(sock, *curve)
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


def bench_publish(cfg: PublishConfig, folder: Path) -> tuple[PublishConfig, tuple[Path, Path] | None]:
    """The configured publish section for the benchmark's socket, and the SUB's CURVE keys (its secret key
    file, the server's public key file) when CURVE is on.

    The endpoint becomes an ipc socket in ``folder``: the configured one may be a running daemon's. With CURVE
    configured, a temporary server key pair and one client pair, its public key the only one allowed, are
    made in ``folder``: the daemon's secret key may be readable by the service alone (a systemd credential),
    and the handshake and encryption cost the same with any keys. Everything else (hwm, linger, ipc_mode,
    heartbeats) stays as configured.
    """
    update: dict[str, Any] = {"endpoint": f"ipc://{folder}/bench.sock"}
    if cfg.curve_secret_key is None:
        return cfg.model_copy(update=update), None
    from eyed.curve import create_keys

    server_public, server_secret = create_keys(folder / "server", "bench-daemon")
    client_public, client_secret = create_keys(folder / "client", "bench-sub")
    clients = folder / "clients"
    clients.mkdir()
    shutil.copy(client_public, clients)
    update |= {"curve_secret_key": server_secret, "curve_clients": clients}
    return cfg.model_copy(update=update), (client_secret, server_public)


def daemon_includes(settings: Settings) -> dict[str, Any]:
    """The configured features that the benchmark's daemon path runs as the daemon would."""
    drift, publish = settings.drift, settings.publish
    return {
        "drift": drift.window_text() if drift.active() else None,
        "drift_reference": str(drift.reference) if drift.active() and drift.reference is not None else None,
        "curve": publish.curve_secret_key is not None,
        "hwm": publish.hwm,
        "heartbeat_s": publish.heartbeat_s,
    }


def includes_text(includes: dict[str, Any]) -> str:
    if includes["drift"] is None:
        drift = "no drift monitor (drift off)"
    else:
        against = includes["drift_reference"] or "the first windows, as it learns its reference"
        drift = f"the drift monitor (windows of {includes['drift']}, against {against})"
    curve = "CURVE (temporary keys)" if includes["curve"] else "no CURVE (not configured)"
    return (
        f"daemon path includes: {drift}; {curve}; publish.hwm {includes['hwm']}, heartbeats every "
        f"{includes['heartbeat_s']:g} s; on an ipc socket in a temporary folder, not publish.endpoint"
    )


class DaemonPath:
    """The pipeline from frames in memory to published events, with the drift monitor and the publish options
    the configuration gives the daemon. One publisher (and, with ``subscriber``, one SUB socket in another
    process, taking its share of this machine's two cores) serves every round; each round runs a fresh pipeline
    over the frames. On exit the subscriber must have received every event (unless ``publish.hwm`` could have
    dropped some, as the daemon would)."""

    def __init__(
        self,
        classifier: OnnxClassifier,
        images: list[np.ndarray],
        subscriber: bool,
        *,
        settings: Settings,
        workers: int = 1,
    ) -> None:
        self.classifier = classifier
        self.images = images
        self.subscriber = subscriber
        self.settings = settings
        self.workers = workers
        self.drift: DriftWatch | None = None
        self._stack = contextlib.ExitStack()
        self._labels = 0

    def __enter__(self) -> DaemonPath:
        from eyed.daemon import build_drift

        try:
            # One monitor for every round, as the daemon keeps one for its life: its windows run on across rounds.
            self.drift = build_drift(self.settings, self.classifier)
            tmp = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="eyed-bench-")))
            publish, curve = bench_publish(self.settings.publish, tmp)
            self.pub = self._stack.enter_context(_RecordingPublisher(publish))
            if self.subscriber:
                self._start_receiver(curve)
        except BaseException:
            self._stack.close()
            raise
        return self

    def _start_receiver(self, curve: tuple[Path, Path] | None) -> None:
        import multiprocessing

        mp = multiprocessing.get_context("spawn")
        self._results, child = mp.Pipe(duplex=False)
        self._receiver = mp.Process(target=_receive, args=(self.pub.endpoint, child, curve), daemon=True)
        self._receiver.start()
        self._stack.callback(self._stop_receiver)
        self.pub.wait_for_subscribers(1, 60)

    def _stop_receiver(self) -> None:
        self._receiver.join(10)
        if self._receiver.is_alive():
            self._receiver.terminate()
            self._receiver.join(5)

    def __call__(self, batch: int) -> dict[str, Any]:
        pipeline = Pipeline(
            MemorySource(self.images),
            self.classifier,
            self.pub,
            batch=batch,
            workers=self.workers,
            heartbeat_s=self.settings.publish.heartbeat_s,
            drift=self.drift,
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
                    self._missed(len(received))
        finally:
            self._stack.close()

    def _missed(self, received: int) -> None:
        hwm = self.settings.publish.hwm
        # A round sends len(self.images) events, and the subscriber drains its queue while the other paths take
        # their turns: a queue that holds a whole round cannot have dropped any, so a loss is a fault.
        if hwm >= len(self.images):
            raise RuntimeError(f"bench: the subscriber received {received} of {self._labels} events")
        logger.warning(
            "bench: the subscriber received %d of %d events: publish.hwm %d dropped the rest, as the daemon would",
            received,
            self._labels,
            hwm,
        )


class SeedLoop:
    """The seed study's loop: AutoImageProcessor + eager transformers model, one PIL image at a time.

    Loaded and warmed up (``SEED_WARMUP`` frames, untimed) when made, so a model that cannot load is known before
    the rounds and the first frame's seconds of set-up are not measured. Each call then runs the next
    ``per_call`` frames, going round them, so the loop takes its turn in every round, as the other paths do.
    ModelLoadError when the checkpoint cannot be loaded; ImportError without torch and transformers.
    """

    name = "transformers loop (seed)"

    def __init__(self, model_id: str, images: list[np.ndarray], per_call: int) -> None:
        import torch
        from PIL import Image
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        from eyed.model.checkpoint import resolve_checkpoint

        folder = resolve_checkpoint(model_id)
        try:
            self.processor = AutoImageProcessor.from_pretrained(folder)
            self.model = AutoModelForImageClassification.from_pretrained(folder).eval()
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"model.id {model_id}: transformers cannot load {folder}: {exc}") from exc
        self._no_grad = torch.no_grad
        self.images = [Image.fromarray(img) for img in images]
        self.per_call = per_call
        self._next = 0
        for image in self.images[:SEED_WARMUP]:
            self._classify(image)

    def _classify(self, image: Any) -> int:
        with self._no_grad():
            return int(self.model(**self.processor(image, return_tensors="pt")).logits.argmax(-1))

    def __call__(self) -> dict[str, Any]:
        lat = []
        t0 = time.perf_counter()
        for _ in range(self.per_call):
            image = self.images[self._next % len(self.images)]
            self._next += 1
            s = time.perf_counter()
            self._classify(image)
            lat.append((time.perf_counter() - s) * 1000)
        return summarise(self.name, lat, time.perf_counter() - t0, self.per_call)


def seed_loop(settings: Settings, fp32: OnnxClassifier, images: list[np.ndarray], rounds: int) -> SeedLoop | str:
    """The transformers loop on ``model.id``, its frames spread over ``rounds``; or why it cannot run, warned.

    It must run the model that ``model.onnx`` was exported from, or its ratio compares two models.
    """
    model_id = settings.model.id
    exported = fp32.session.get_modelmeta().custom_metadata_map.get(META_MODEL_ID)
    if exported is not None and not same_checkpoint(exported, model_id):
        reason = f"model.onnx {fp32.path} was exported from {exported}, not from model.id {model_id}"
    else:
        try:
            return SeedLoop(model_id, images, per_call=math.ceil(len(images) / rounds))
        except ImportError:
            reason = "torch/transformers not installed"
        except ModelLoadError as exc:
            reason = str(exc)
    logger.warning("transformers loop skipped: %s", reason)
    return reason


def calibration_inputs(settings: Settings) -> dict[str, Any]:
    """What an INT8 file quantised for the benchmark depends on, besides the FP32 file and the method: the
    frames it is calibrated on, how they are fitted to the model, and the CPU its layout is chosen for."""
    src = settings.source
    where = src.dataset if src.kind == "replay" else str(src.url)
    local = Path(where).expanduser()
    if local.exists():  # a relative path names another folder from another working directory
        where = str(local.resolve())
    return {
        "kind": src.kind,
        "source": where,
        "split": src.split,
        "skip": src.skip,
        "image_column": src.image_column,
        "small_input": settings.model.small_input,
        "target_cpu": platform.machine().lower(),
    }


def int8_model(settings: Settings, fp32: OnnxClassifier, calibration: int = 300) -> Path:
    """The INT8 version of the benchmarked model, quantised once into the cache (calibrated on the source)."""
    from eyed.model.quantize import METHOD_VERSION, export_int8

    # The FP32 file's content and the calibration's inputs are part of the name: a re-exported model.onnx,
    # another source, skip or small_input, or another CPU gets a new INT8 file.
    digest = hashlib.sha256(fp32.path.read_bytes()).hexdigest()[:12]
    inputs = calibration_inputs(settings)
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:12]
    name = f"{fp32.path.stem}-{digest}-int8v{METHOD_VERSION}-c{calibration}-{key}.onnx"
    path = settings.model.cache_dir.expanduser() / "onnx" / name
    if not path.is_file():
        logger.warning("quantising %s to INT8 for the benchmark (once): %s", fp32.path, path)
        model = settings.model.model_copy(update={"onnx": fp32.path})
        try:
            export_int8(
                settings.model_copy(update={"model": model}),
                path,
                calibration=calibration,
                check=0,
                target_cpu=inputs["target_cpu"],
            )
        except MissingExtra as exc:
            raise MissingExtra(f"{exc}; or pass --int8 with a file from `eyed export --int8`, or --no-int8") from exc
    return path


def _quantised_from(record: str) -> str | None:
    """The FP32 file an ``eyed.quantization`` record says it was quantised from, if it says."""
    try:
        origin = json.loads(record).get("from")
    except (ValueError, AttributeError):
        return None
    return origin if isinstance(origin, str) else None


def refuse_int8_as_fp32(fp32: OnnxClassifier) -> None:
    """ConfigError (closing ``fp32``) when the file benchmarked as FP32 is an INT8 export: every row would
    say fp32, and with --int8 INT8/FP32 would compare two INT8 files."""
    from eyed.model.quantize import META_QUANTIZATION

    record = fp32.session.get_modelmeta().custom_metadata_map.get(META_QUANTIZATION)
    if record is None:
        return
    fp32.close()
    origin = _quantised_from(record)
    float_file = f" ({origin}, by its record)" if origin is not None else ""
    raise ConfigError(
        f"model.onnx {fp32.path} is an INT8 export (`eyed export --int8`), not an FP32 model: set model.onnx to "
        f"the float file it was quantised from{float_file}, and give this one as --int8 to compare the two"
    )


def given_int8(path: Path, cfg: ModelConfig, fp32: OnnxClassifier) -> OnnxClassifier:
    """The ``--int8`` file, opened with ``cfg``: ConfigError unless ``eyed export --int8`` wrote it (its
    ``eyed.quantization`` record); a warning when it was quantised from another file than ``fp32``'s."""
    from eyed.model.quantize import META_QUANTIZATION

    if not path.is_file():
        raise ConfigError(f"--int8 {path}: no such file")
    int8 = OnnxClassifier(cfg.model_copy(update={"onnx": path}))
    record = int8.session.get_modelmeta().custom_metadata_map.get(META_QUANTIZATION)
    if record is None:
        int8.close()
        raise ConfigError(
            f"--int8 {path}: no {META_QUANTIZATION} record in its metadata, so not a file `eyed export --int8` "
            "wrote (a float export?): give an INT8 export, or leave --int8 out to quantise model.onnx into the cache"
        )
    origin = _quantised_from(record)
    # names_recorded: files written by an older eyed hold "from" as it was typed, perhaps relative.
    if origin is None or not names_recorded(origin, fp32.path):
        logger.warning(
            "--int8 %s was quantised from %s, not from the FP32 model benchmarked (%s): INT8/FP32 compares two "
            "different models",
            path,
            origin or "an unrecorded file",
            fp32.path,
        )
    return int8


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
    Latencies are pooled over all rounds. The transformers loop runs the first ``seed_frames`` frames, a
    slice of them in each round.

    Each round goes ``passes`` times over the ``frames`` decoded frames (as references: no more memory). The
    daemon runs for hours, so the rounds should measure its steady state: a fresh pipeline per round spends
    about one frame's time filling up and one draining, a fixed cost that weighed 1-3% on a 200-frame INT8
    round, two to three times what it weighed on FP32's longer one, and so understated INT8/FP32.
    """
    if settings.model.backend != "onnx":
        settings = settings.model_copy(update={"model": settings.model.model_copy(update={"backend": "onnx"})})
    images, _ = load_frames(settings, frames)
    # The daemon's options for this source at fps 0 (workers, threads per call, spinning); the bare loop
    # takes those of one call at a time (by default on all the cores this process may use).
    daemon_cfg = settings.full_speed_model()
    bare_cfg = bare_model(settings)
    at_once = daemon_cfg.workers
    fp32 = load_classifier(daemon_cfg)
    assert isinstance(fp32, OnnxClassifier)
    refuse_int8_as_fp32(fp32)
    models = {"fp32": fp32}
    if with_int8:
        if int8 is not None:
            models["int8"] = given_int8(int8, daemon_cfg, fp32)
        else:
            models["int8"] = OnnxClassifier(daemon_cfg.model_copy(update={"onnx": int8_model(settings, fp32)}))
    # Before the rounds: a transformers model that cannot load is skipped, and no measurement is lost.
    seed = seed_loop(settings, fp32, images[:seed_frames], rounds) if seed_frames > 0 else "--seed-frames 0"
    tensors = [fp32.prepare(img) for img in images]
    includes = daemon_includes(settings)
    runs: dict[str, list[dict[str, Any]]] = {}
    with contextlib.ExitStack() as stack:
        for classifier in models.values():
            stack.callback(classifier.close)
        # (stable key for --json, measurement); the key stays the same whatever the cores, workers and --batch,
        # which the row's name for people spells out.
        paths: list[tuple[str, Callable[[], dict[str, Any]]]] = []
        for precision, classifier in models.items():
            paths.append((f"{precision} bare", BareLoop(classifier.path, bare_cfg, tensors, passes=passes)))
            if at_once > 1:
                paths.append(
                    (f"{precision} bare at once", BareLoop(classifier.path, daemon_cfg, tensors, at_once, passes))
                )
            daemon_path = functools.partial(DaemonPath, classifier, images * passes, settings=settings, workers=at_once)
            sub = stack.enter_context(daemon_path(subscriber=True))
            alone = stack.enter_context(daemon_path(subscriber=False))
            sub(1)  # the pipeline's first frames warm its session up, as BareLoop's do
            paths += [
                (f"{precision} daemon", functools.partial(sub, 1)),
                (f"{precision} daemon no subscriber", functools.partial(alone, 1)),
            ]
            if batch > 1:
                paths.append((f"{precision} daemon batched", functools.partial(sub, batch)))
        if isinstance(seed, SeedLoop):
            paths.append(("transformers", seed))
        for r in range(rounds):
            # Reversed every other round, so a trend in the machine's load favours no path.
            for key, measure in paths if r % 2 == 0 else paths[::-1]:
                row = measure()
                precision = key.split()[0] if key != "transformers" else ""
                row["name"] = f"{precision} {row['name']}".strip()
                runs.setdefault(key, []).append(row)
    rows = [{"key": key, **pool_rounds(rs[0]["name"], rs)} for key, rs in runs.items()]

    def ratio(a: str, b: str) -> float:
        return statistics.median(x["fps"] / y["fps"] for x, y in zip(runs[a], runs[b], strict=True))

    # (stable key, name for people, value)
    parallel = f"bare onnxruntime, {at_once} frames at once"
    ratios: list[tuple[str, str, float]] = []
    for p in models:
        ratios.append((f"{p} daemon/bare", f"{p} daemon/bare", ratio(f"{p} daemon", f"{p} bare")))
        no_sub = ratio(f"{p} daemon no subscriber", f"{p} bare")
        ratios.append((f"{p} daemon no subscriber/bare", f"{p} daemon (no subscriber)/bare", no_sub))
        if at_once > 1:
            ratios.append(
                (f"{p} daemon/bare at once", f"{p} daemon/{parallel}", ratio(f"{p} daemon", f"{p} bare at once"))
            )
        if batch > 1:
            batched = ratio(f"{p} daemon batched", f"{p} daemon")
            ratios.append((f"{p} daemon batched/daemon", f"{p} daemon batch {batch}/daemon batch 1", batched))
    if "int8" in models:
        ratios.append(("int8/fp32 bare", "int8/fp32 bare", ratio("int8 bare", "fp32 bare")))
        if at_once > 1:
            ratios.append(
                ("int8/fp32 bare at once", f"int8/fp32 {parallel}", ratio("int8 bare at once", "fp32 bare at once"))
            )
        ratios.append(("int8/fp32 daemon", "int8/fp32 daemon", ratio("int8 daemon", "fp32 daemon")))
    if isinstance(seed, SeedLoop):
        for p in models:
            ratios.append(
                (f"{p} daemon/transformers", f"{p} daemon/transformers", ratio(f"{p} daemon", "transformers"))
            )
    lines = [f"{'path':<43} {'frames':>7} {'fps':>9} {'p50 ms':>8} {'p99 ms':>8}"]
    lines += [
        f"{r['name']:<43} {r['frames']:>7} {r['fps']:>9.1f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f}" for r in rows
    ]
    lines += [f"{name}: {value:.2f}x" for _, name, value in ratios]
    lines.append(
        f"daemon path: {at_once} worker(s), {daemon_cfg.threads} onnxruntime thread(s) each; "
        f"bare onnxruntime: {bare_cfg.threads} thread(s); {eyed.config.available_cores()} core(s) for this process"
    )
    lines.append(includes_text(includes))
    if isinstance(seed, SeedLoop):
        lines.append(
            f"transformers loop: {seed.per_call} of its {len(seed.images)} frames a round, after {SEED_WARMUP} "
            "untimed warm-up frames"
        )
    else:
        lines.append(f"transformers loop skipped: {seed}")
    lines.append(
        f"{rounds} alternating rounds of {passes} x {len(images)} frames; fps = median over rounds, ratio = median of "
        "per-round ratios; latency of the daemon path = frame in to event published (includes queueing)"
    )
    return {
        "model": settings.model.id,
        "onnx": {p: str(c.path) for p, c in models.items()},
        "threads": bare_cfg.threads,
        "daemon": {"workers": at_once, "threads": daemon_cfg.threads, "spinning": daemon_cfg.spinning},
        "daemon_includes": includes,
        "seed": {"frames_per_round": seed.per_call} if isinstance(seed, SeedLoop) else {"skipped": seed},
        "rounds": rounds,
        "passes": passes,
        "batch": batch,
        "rows": rows,
        # Keys that do not change with the cores, workers ("at once": daemon.workers frames) or --batch.
        "ratios": {key: value for key, _, value in ratios},
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
