"""eyed bench's paths measured as the daemon runs, and the benchmark scripts' own plumbing, on the tiny
generated model and dataset."""

from __future__ import annotations

import importlib
import json
import platform
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import pytest

import eyed.bench
from eyed.bench import SEED_WARMUP, bare_model, int8_model
from eyed.cli import main
from eyed.config import load_settings
from eyed.model.export import META_MODEL_ID
from eyed.model.onnx_backend import OnnxClassifier
from eyed.model.quantize import META_QUANTIZATION, export_int8

ROOT = Path(__file__).resolve().parent.parent
# A quick run: every path, one round over two frames.
QUICK = ["--frames", "2", "--passes", "1", "--rounds", "1", "--batch", "1", "--json"]


@pytest.fixture
def overrides(tiny_dataset: Path, tiny_checkpoint: Path, tiny_onnx: Path, tmp_path: Path) -> list[str]:
    return [
        "--set", f"source.dataset={tiny_dataset}",
        "--set", "source.split=train",
        "--set", f"model.id={tiny_checkpoint}",
        "--set", f"model.onnx={tiny_onnx}",
        "--set", f"model.cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip


@pytest.fixture
def one_core(monkeypatch: pytest.MonkeyPatch) -> None:
    """One core for this process (taskset -c 0): the daemon path runs one worker, and there is no "frames at
    once" loop."""
    monkeypatch.setattr("eyed.config.available_cores", lambda: 1)


def settings_of(overrides: list[str], *more: str) -> Any:
    return load_settings(None, [*overrides[1::2], *more])


def bench(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any], str]:
    capsys.readouterr()
    code = main(["bench", *args])
    out, err = capsys.readouterr()
    return code, json.loads(out) if code == 0 else {}, err


def onnx_from(model_id: str, src: Path, dst: Path) -> Path:
    """A copy of ``src`` that says it was exported from ``model_id``."""
    import onnx

    proto = onnx.load(str(src))
    for prop in proto.metadata_props:
        if prop.key == META_MODEL_ID:
            prop.value = model_id
    onnx.save(proto, str(dst))
    return dst


# --- the bare loop's threads --------------------------------------------------------------------------------


@pytest.mark.usefixtures("one_core")
@pytest.mark.parametrize(("threads", "expected"), [(0, 1), (3, 3)])
def test_the_bare_loop_runs_on_the_cores_this_process_may_use(
    overrides: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    threads: int,
    expected: int,
) -> None:
    """With model.threads 0, one core left to this process (taskset, CPUQuota=) means one thread, as the daemon
    takes, not onnxruntime's count of the host's cores; a configured count is kept."""
    opened: list[Any] = []
    real_open = eyed.bench.open_session

    def spy(path: Path, cfg: Any) -> Any:
        opened.append(session := real_open(path, cfg))
        return session

    monkeypatch.setattr(eyed.bench, "open_session", spy)
    code, report, _ = bench(
        [*overrides, "--set", f"model.threads={threads}", "--no-int8", "--seed-frames", "0", *QUICK], capsys
    )
    assert code == 0
    assert report["daemon"]["workers"] == 1  # one core: no "frames at once" loop, only the bare one
    assert [s.get_session_options().intra_op_num_threads for s in opened] == [expected]
    assert report["threads"] == expected
    assert f"bare onnxruntime: {expected} thread(s)" in report["text"]


def test_bare_model_resolves_threads_as_the_daemon_does_for_one_call(
    overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_of(overrides)
    monkeypatch.setattr("eyed.config.available_cores", lambda: 3)
    assert bare_model(settings).threads == 3
    paced = settings.model_copy(update={"source": settings.source.model_copy(update={"fps": 5.0})})
    assert bare_model(settings).threads == paced.runtime_model().threads  # the daemon, one call at a time


# --- the cached INT8 file ----------------------------------------------------------------------------------


def calibration_of(path: Path) -> dict[str, Any]:
    classifier = OnnxClassifier(settings_of([]).model.model_copy(update={"onnx": path}))
    record: dict[str, Any] = json.loads(classifier.session.get_modelmeta().custom_metadata_map[META_QUANTIZATION])
    classifier.close()
    return {**record["calibration"], "target_cpu": record["target_cpu"]}


def test_a_cached_int8_file_is_made_again_when_its_calibration_would_differ(
    overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_of(overrides)
    fp32 = OnnxClassifier(settings.model)
    first = int8_model(settings, fp32, calibration=4)
    made = first.stat().st_mtime_ns
    assert int8_model(settings, fp32, calibration=4) == first and first.stat().st_mtime_ns == made  # reused
    skipped = int8_model(settings_of(overrides, "source.skip=2"), fp32, calibration=4)
    fitted = int8_model(settings_of(overrides, "model.small_input=checkpoint"), fp32, calibration=4)
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    arm = int8_model(settings, fp32, calibration=4)
    assert len({first, skipped, fitted, arm}) == 4
    assert calibration_of(skipped)["skip"] == 2
    assert calibration_of(fitted)["small_input"] == "checkpoint"
    assert calibration_of(arm)["target_cpu"] == "aarch64"
    assert first.stat().st_mtime_ns == made  # and the first one left as it was


# --- the daemon path's configured features -----------------------------------------------------------------


def test_the_daemon_path_runs_the_configured_drift_monitor_and_curve(
    overrides: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from eyed.curve import CurveServer, create_keys
    from eyed.pipeline import DriftWatch

    monkeypatch.setattr("eyed.config.available_cores", lambda: 2)
    # The configured keys need not be readable: the benchmark makes its own pair of each.
    _, secret = create_keys(tmp_path / "server", "eyed")
    create_keys(tmp_path / "clients", "dashboard")
    observed: list[int] = []
    curve: list[int] = []
    observe, apply = DriftWatch.observe, CurveServer.apply

    def counted_observe(self: DriftWatch, *args: Any) -> Any:
        observed.append(1)
        return observe(self, *args)

    def counted_apply(self: CurveServer, sock: Any) -> None:
        curve.append(1)
        apply(self, sock)

    monkeypatch.setattr(DriftWatch, "observe", counted_observe)
    monkeypatch.setattr(CurveServer, "apply", counted_apply)
    config = [
        "--set", "drift.enabled=true",
        "--set", "drift.window=20",
        "--set", f"publish.curve_secret_key={secret}",
        "--set", f"publish.curve_clients={tmp_path / 'clients'}",
        "--set", "publish.hwm=500",
    ]  # fmt: skip
    args = ["--frames", "8", "--passes", "3", "--rounds", "2", "--batch", "1", "--seed-frames", "0", "--json"]
    code, report, _ = bench([*overrides, *config, "--no-int8", *args], capsys)
    assert code == 0  # and the SUB process, a CURVE client, received every event
    daemon_rows = [r for r in report["rows"] if "daemon path" in r["name"]]
    assert len(daemon_rows) == 2
    # Every frame through either daemon path, the warm-up's included, went through the drift statistics.
    assert len(observed) == sum(r["frames"] for r in daemon_rows) + 8 * 3
    assert len(curve) == 2  # both publishers are CURVE servers
    assert report["daemon_includes"] == {
        "drift": "20 frames",
        "drift_reference": None,
        "curve": True,
        "hwm": 500,
        "heartbeat_s": 5.0,
    }
    line = next(x for x in report["text"].splitlines() if x.startswith("daemon path includes: "))
    assert "the drift monitor (windows of 20 frames" in line and "CURVE (temporary keys)" in line
    assert "publish.hwm 500" in line


def test_the_daemon_path_says_what_it_leaves_out(overrides: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, report, _ = bench([*overrides, "--no-int8", "--seed-frames", "0", *QUICK], capsys)
    assert code == 0
    line = next(x for x in report["text"].splitlines() if x.startswith("daemon path includes: "))
    assert "no drift monitor (drift off)" in line and "no CURVE (not configured)" in line


# --- the transformers loop ---------------------------------------------------------------------------------


@pytest.mark.usefixtures("one_core")
def test_the_transformers_loop_is_skipped_when_model_onnx_is_another_model(
    overrides: list[str], tiny_checkpoint: Path, tiny_onnx: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A hub id the file was not exported from: not looked up at all (no network here).
    other = [*overrides, "--set", "model.id=google/mobilenet_v2_1.0_224", "--no-int8"]
    code, report, err = bench([*other, "--seed-frames", "2", *QUICK], capsys)
    assert code == 0
    assert "transformers loop skipped" in err and f"exported from {tiny_checkpoint}, not from model.id google/" in err
    assert report["seed"]["skipped"].startswith(f"model.onnx {tiny_onnx} was exported from ")
    assert [r["name"] for r in report["rows"]] == [
        "fp32 bare onnxruntime",
        "fp32 daemon path -> SUB process",
        "fp32 daemon path, no subscriber",
    ]
    assert not any("transformers" in name for name in report["ratios"])


@pytest.mark.usefixtures("one_core")
@pytest.mark.parametrize("files", [(), ("config.json", "preprocessor_config.json")])
def test_a_transformers_model_that_cannot_load_costs_only_its_own_loop(
    overrides: list[str],
    tiny_checkpoint: Path,
    tiny_onnx: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    files: tuple[str, ...],
) -> None:
    """A checkpoint folder without its weights (as a hub snapshot that never finished downloading), or with
    nothing at all: the model.onnx exported from it still runs, the transformers loop is skipped."""
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    for name in files:
        (folder / name).write_bytes((tiny_checkpoint / name).read_bytes())
    onnx = onnx_from(str(folder), tiny_onnx, tmp_path / "model.onnx")
    args = [*overrides, "--set", f"model.id={folder}", "--set", f"model.onnx={onnx}", "--no-int8"]
    code, report, err = bench([*args, "--seed-frames", "2", *QUICK], capsys)
    assert code == 0
    assert f"transformers loop skipped: model.id {folder}" in err
    assert len(report["rows"]) == 3 and report["ratios"]["fp32 daemon/bare"] > 0
    assert report["seed"]["skipped"].startswith(f"model.id {folder}")


@pytest.fixture
def model_calls() -> Iterator[list[str]]:
    """The transformers model's calls (the whole model, not its layers), as they happen."""
    import torch

    calls: list[str] = []

    def hook(module: Any, args: Any, output: Any) -> None:
        if type(module).__name__.endswith("ForImageClassification"):
            calls.append(type(module).__name__)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def test_the_transformers_loop_is_warmed_up_and_takes_a_turn_in_every_round(
    overrides: list[str], capsys: pytest.CaptureFixture[str], model_calls: list[str]
) -> None:
    args = ["--frames", "8", "--passes", "1", "--rounds", "3", "--batch", "1", "--seed-frames", "6", "--json"]
    code, report, _ = bench([*overrides, "--no-int8", *args], capsys)
    assert code == 0
    seed = report["rows"][-1]
    assert seed["name"] == "transformers loop (seed)"
    # Two of the six frames in each of the three rounds, after the untimed warm-up frames.
    assert len(seed["fps_per_round"]) == 3 and seed["frames"] == 6
    assert len(model_calls) == SEED_WARMUP + 6
    assert report["seed"] == {"frames_per_round": 2}
    assert report["ratios"]["fp32 daemon/transformers"] > 0


# --- --int8 ------------------------------------------------------------------------------------------------


def test_bench_refuses_an_int8_file_that_is_not_one(
    overrides: list[str], tiny_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = bench([*overrides, "--int8", str(tiny_onnx), "--seed-frames", "0", *QUICK], capsys)
    assert code == 78
    assert err.startswith(f"eyed: --int8 {tiny_onnx}: no {META_QUANTIZATION} record")
    code, _, err = bench([*overrides, "--int8", str(tmp_path / "none.onnx"), *QUICK], capsys)
    assert code == 78 and err.strip() == f"eyed: --int8 {tmp_path / 'none.onnx'}: no such file"


def test_bench_warns_when_the_int8_file_was_quantised_from_another_model(
    overrides: list[str], tiny_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other.onnx"
    other.write_bytes(tiny_onnx.read_bytes())
    int8 = tmp_path / "other-int8.onnx"
    export_int8(settings_of(overrides, f"model.onnx={other}"), int8, calibration=4, check=0)
    code, report, err = bench([*overrides, "--int8", str(int8), "--seed-frames", "0", *QUICK], capsys)
    assert code == 0 and report["onnx"]["int8"] == str(int8)
    assert f"--int8 {int8} was quantised from {other}, not from the FP32 model benchmarked ({tiny_onnx})" in err
    # Quantised from the benchmarked file itself: no warning.
    own = tmp_path / "own-int8.onnx"
    export_int8(settings_of(overrides), own, calibration=4, check=0)
    code, _, err = bench([*overrides, "--int8", str(own), "--seed-frames", "0", *QUICK], capsys)
    assert code == 0 and "quantised from" not in err


def with_origin(path: Path, origin: str) -> Path:
    """``path`` rewritten to say it was quantised from ``origin`` (as an older eyed recorded it: as typed)."""
    import onnx

    proto = onnx.load(str(path))
    for prop in proto.metadata_props:
        if prop.key == META_QUANTIZATION:
            prop.value = json.dumps({**json.loads(prop.value), "from": origin})
    onnx.save(proto, str(path))
    return path


def test_an_int8_file_quantised_from_a_relative_path_is_recognised_from_elsewhere(
    overrides: list[str],
    tiny_onnx: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The record said "from": "fp32.onnx" (as typed); benchmarked from another working directory, eyed bench
    warned that INT8/FP32 compared two different models."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    fp32 = work / "fp32.onnx"
    fp32.write_bytes(tiny_onnx.read_bytes())
    monkeypatch.chdir(work)
    export_int8(settings_of(overrides, "model.onnx=fp32.onnx"), Path("fp32-int8.onnx"), calibration=4, check=0)
    monkeypatch.chdir(elsewhere)
    args = [*overrides, "--set", f"model.onnx={fp32}", "--seed-frames", "0", *QUICK]
    code, _, err = bench([*args, "--int8", str(work / "fp32-int8.onnx")], capsys)
    assert code == 0 and "quantised from" not in err, err
    # A file an older eyed wrote, "from" relative to where it ran: taken as the file whose name it ends with.
    old = with_origin(work / "fp32-int8.onnx", "fp32.onnx")
    code, _, err = bench([*args, "--int8", str(old)], capsys)
    assert code == 0 and "quantised from" not in err, err
    with_origin(old, "models/other.onnx")
    code, _, err = bench([*args, "--int8", str(old)], capsys)
    assert code == 0 and f"--int8 {old} was quantised from models/other.onnx, not from the FP32 model" in err


@pytest.mark.parametrize("int8_option", ["--no-int8", "--int8"])
def test_bench_refuses_an_int8_file_as_model_onnx(
    overrides: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], int8_option: str
) -> None:
    """With --no-int8 every row said fp32 for an INT8 model, without a word; with --int8, INT8/FP32 compared the
    INT8 file with itself."""
    int8 = tmp_path / "m8.onnx"
    export_int8(settings_of(overrides), int8, calibration=4, check=0)
    given = [int8_option] if int8_option == "--no-int8" else [int8_option, str(int8)]
    code, _, err = bench([*overrides, "--set", f"model.onnx={int8}", *given, "--seed-frames", "0", *QUICK], capsys)
    assert code == 78
    assert err.startswith(f"eyed: model.onnx {int8} is an INT8 export (`eyed export --int8`), not an FP32 model")


# --- the benchmark scripts ---------------------------------------------------------------------------------


@pytest.fixture
def script(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], ModuleType]:
    """Imports a benchmark script as it runs: a top-level module, its siblings importable beside it."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$EYED_SHARED set to a folder of its own, and a working directory where configs/replay.toml's relative
    paths would name nothing."""
    shared = tmp_path / "assets"
    monkeypatch.setenv("EYED_SHARED", str(shared))
    monkeypatch.chdir(tmp_path)
    return shared


class Stop(Exception):
    """Ends a benchmark's main() once it has built what a test looks at."""


def test_extra_workers_runs_the_assets_in_eyed_shared(
    script: Callable[[str], ModuleType], elsewhere: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra_workers = script("extra_workers")

    def load_frames(settings: Any, n: int) -> Any:
        raise Stop(settings)

    monkeypatch.setattr(extra_workers, "load_frames", load_frames)
    monkeypatch.setattr(sys, "argv", ["extra_workers.py"])
    with pytest.raises(Stop) as stopped:
        extra_workers.main()
    settings = stopped.value.args[0]
    assert settings.source.dataset == str(elsewhere / "data" / "cifar10")
    assert settings.model.id == str(elsewhere / "models" / "mobilenet_v2_1.0_224")
    assert settings.model.cache_dir == ROOT / ".cache" / "eyed"
    assert settings.source.limit == 1000  # the rest from configs/replay.toml


def test_arm64_exports_the_assets_in_eyed_shared(script: Callable[[str], ModuleType], elsewhere: Path) -> None:
    arm64 = script("arm64_qemu")
    config = arm64.export_config(elsewhere)
    assert config[:2] == ["--config", str(ROOT / "configs" / "replay.toml")]
    sets = dict(item.split("=", 1) for item in config[3::2])
    assert sets == {
        "source.dataset": str(elsewhere / "data" / "cifar10"),
        "model.id": str(elsewhere / "models" / "mobilenet_v2_1.0_224"),
        "model.cache_dir": str(ROOT / ".cache" / "eyed"),
    }
    assert set(config[2::2]) == {"--set"}


def test_rtsp_latency_stops_waiting_when_the_daemon_exits(script: Callable[[str], ModuleType]) -> None:
    rtsp = script("rtsp_latency")
    code = "import sys; print('eyed: model.onnx /nope.onnx: no such file', file=sys.stderr); sys.exit(69)"
    daemon = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    tail = rtsp.StderrTail(daemon)
    with pytest.raises(RuntimeError, match=r"exited 69 before the first event:\neyed: model.onnx /nope.onnx"):
        rtsp.wait_until(lambda: False, daemon, tail, 60, "the first event")


def test_rtsp_latency_stops_waiting_at_its_deadline(script: Callable[[str], ModuleType]) -> None:
    rtsp = script("rtsp_latency")
    code = "import sys, time; print('waiting for subscribers', file=sys.stderr, flush=True); time.sleep(60)"
    daemon = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    try:
        tail = rtsp.StderrTail(daemon)
        with pytest.raises(TimeoutError, match=r"the first event did not come within 0\.5 s"):
            rtsp.wait_until(lambda: False, daemon, tail, 0.5, "the first event")
        assert tail.text() == "waiting for subscribers"
    finally:
        daemon.kill()
        daemon.wait()


def test_startup_rss_keeps_its_sockets_in_its_own_folder(
    script: Callable[[str], ModuleType], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    startup_rss = script("startup_rss")
    endpoints = []

    def one_run(env: dict[str, str], endpoint: str) -> dict[str, Any]:
        endpoints.append(endpoint)
        assert env["EYED_PUBLISH__ENDPOINT"] == endpoint
        return {"first_event_s": 1.0, "peak_rss_mb": 100.0, "imported": []}

    monkeypatch.setattr(startup_rss, "one_run", one_run)
    startup_rss.measure("replay", {}, 2, tmp_path)
    assert endpoints == [f"ipc://{tmp_path}/replay-0.sock", f"ipc://{tmp_path}/replay-1.sock"]


def test_frame_parallel_counts_the_frames_it_ran(
    script: Callable[[str], ModuleType], monkeypatch: pytest.MonkeyPatch
) -> None:
    frame_parallel = script("frame_parallel")
    clock = SimpleNamespace(now=0.0, runs=0)

    def run(outputs: list[str], feed: dict[str, Any]) -> None:
        clock.runs += 1
        clock.now += 1.0  # one second a frame: frames/s is 1 when every frame asked for is counted once

    monkeypatch.setattr(frame_parallel, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    assert frame_parallel.fps(SimpleNamespace(run=run), [{}], 7, 2) == 1.0
    assert clock.runs == 7  # 7 frames on 2 workers: 4 and 3, none dropped


def test_hub_link_reads_as_many_records_as_the_readme_says(script: Callable[[str], ModuleType]) -> None:
    hub_link = script("hub_link")
    readme = (ROOT / "README.md").read_text()
    said = re.search(r"benchmarks/hub_link\.py` replays ([\d,]+) records", readme)
    assert said is not None and int(said[1].replace(",", "")) == hub_link.ROWS
    assert f"[--rows {hub_link.ROWS}]" in (hub_link.__doc__ or "")


def test_a_lost_event_is_an_error_unless_publish_hwm_could_have_dropped_it(
    tiny_onnx: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Counted against one round's events, not the run's: the run's 10,200 events against the default hwm of
    10,000 turned every loss into a warning that blamed hwm."""
    images = [np.zeros((8, 8, 3), dtype=np.uint8)] * 200
    for hwm, lost_is_error in ((10_000, True), (100, False)):
        settings = load_settings(None, [f"publish.hwm={hwm}"])
        classifier = OnnxClassifier(settings.model.model_copy(update={"onnx": tiny_onnx}))
        path = eyed.bench.DaemonPath(classifier, images, True, settings=settings)
        path._labels = 10_200
        if lost_is_error:
            with pytest.raises(RuntimeError, match="received 10199 of 10200"):
                path._missed(10_199)
        else:
            path._missed(10_199)
            assert "publish.hwm 100 dropped the rest" in caplog.text
