"""eyed.config and ``eyed check-config``: defaults, TOML, environment, overrides, errors naming the field."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from eyed.cli import EXIT_CONFIG, EXIT_OK, main
from eyed.config import (
    ConfigError,
    Settings,
    SourceConfig,
    connect_endpoint,
    dump_settings,
    load_settings,
    redact_url,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No EYED_ variable from the outer environment may leak into these tests."""
    for name in list(os.environ):
        if name.upper().startswith("EYED_"):
            monkeypatch.delenv(name)


def write_toml(folder: Path, text: str) -> Path:
    path = folder / "eyed.toml"
    path.write_text(text, encoding="utf-8")
    return path


# Defaults


def test_defaults() -> None:
    s = load_settings()
    assert s.source.kind == "replay"
    assert s.source.dataset == "uoft-cs/cifar10"
    assert s.source.split == "test"
    assert s.source.limit == 0
    assert s.model.id == "google/mobilenet_v2_1.0_224"
    assert s.model.backend == "onnx"
    assert s.model.onnx is None
    assert s.model.topk == 5
    assert s.publish.endpoint == "tcp://127.0.0.1:5556"
    assert s.publish.wait_subscribers == 0


# Sources of values and their precedence


def test_toml_file(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        '[source]\nlimit = 12\nsplit = "train"\nloop = true\n\n[model]\ntopk = 3\nbackend = "torch"\n',
    )
    s = load_settings(path)
    assert (s.source.limit, s.source.split, s.source.loop) == (12, "train", True)
    assert (s.model.topk, s.model.backend) == (3, "torch")
    # Untouched fields keep their defaults.
    assert s.source.dataset == "uoft-cs/cifar10"
    assert s.publish.endpoint == "tcp://127.0.0.1:5556"


def test_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EYED_SOURCE__LIMIT", "7")
    monkeypatch.setenv("EYED_PUBLISH__WAIT_SUBSCRIBERS", "1")
    s = load_settings()
    assert s.source.limit == 7
    assert s.publish.wait_subscribers == 1
    assert s.source.split == "test"


def test_precedence_overrides_env_toml_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_toml(tmp_path, '[source]\nlimit = 3\nskip = 4\nsplit = "train"\nfps = 2.5\n')
    monkeypatch.setenv("EYED_SOURCE__LIMIT", "7")
    monkeypatch.setenv("EYED_SOURCE__SKIP", "8")
    s = load_settings(path, ["source.limit=9"])
    assert s.source.limit == 9  # override beats env and file
    assert s.source.skip == 8  # env beats file
    assert s.source.split == "train"  # file beats default
    assert s.source.fps == 2.5
    # Without the override, the environment wins over the file.
    assert load_settings(path).source.limit == 7


def test_override_parsing_errors() -> None:
    with pytest.raises(ConfigError, match=re.escape("section.field=value")):
        load_settings(None, ["source.limit"])


# Errors name the field


def test_unknown_key_in_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape("source.bogus")):
        load_settings(write_toml(tmp_path, "[source]\nbogus = 1\n"))


def test_unknown_section_in_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="bogus"):
        load_settings(write_toml(tmp_path, "[bogus]\nx = 1\n"))


def test_unknown_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EYED_SOURCE__BOGUS", "1")
    with pytest.raises(ConfigError, match=re.escape("source.bogus")):
        load_settings()


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("source.limit=-1", "source.limit"),
        ("source.limit=abc", "source.limit"),
        ("model.backend=tensorflow", "model.backend"),
        ("publish.endpoint=http://x", "publish.endpoint"),
        ("model.topk=0", "model.topk"),
        ("source.id=has space", "source.id"),
        ("model.spinning=sometimes", "model.spinning"),
        ("model.graph_optimization=max", "model.graph_optimization"),
        ("drift.window_s=0", "drift.window_s"),
        ("drift.window_s=7200", "drift.window_s"),
    ],
)
def test_bad_values_name_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, [override])
    assert field in str(info.value)


def test_bad_value_in_toml_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape("source.limit")):
        load_settings(write_toml(tmp_path, "[source]\nlimit = -1\n"))


@pytest.mark.parametrize(
    ("overrides", "spinning"),
    [
        ([], "on"),  # replay as fast as the model goes: throughput
        (["source.fps=15"], "off"),  # paced replay
        (["source.kind=file", "source.url=/tmp/clip.avi"], "on"),
        (["source.kind=file", "source.url=/tmp/clip.avi", "source.fps=30"], "off"),
        (["source.kind=rtsp", "source.url=rtsp://cam/stream"], "off"),  # a camera: idle cores between frames
        (["source.kind=webcam", "source.device=0"], "off"),
        (["source.kind=webcam", "source.device=0", "model.spinning=on"], "on"),  # an explicit choice stands
        (["model.spinning=off"], "off"),
    ],
)
def test_auto_spinning_follows_the_source(overrides: list[str], spinning: str) -> None:
    settings = load_settings(None, overrides)
    assert settings.runtime_model().spinning == spinning
    assert settings.model.spinning == ("auto" if not any("spinning" in o for o in overrides) else spinning)


@pytest.mark.parametrize(
    ("overrides", "batch"),
    [
        ([], 8),  # replay at fps 0: frames are always waiting
        (["source.kind=file", "source.url=/tmp/clip.avi"], 8),
        (["source.fps=10"], 1),  # paced: a batch of 8 would hold the first frame 0.7 s
        (["source.kind=file", "source.url=/tmp/clip.avi", "source.fps=30"], 1),
        (["source.kind=rtsp", "source.url=rtsp://cam/stream"], 1),
    ],
)
def test_batching_only_where_frames_wait(overrides: list[str], batch: int) -> None:
    settings = load_settings(None, [*overrides, "model.batch=8"])
    assert settings.runtime_model().batch == batch


@pytest.mark.parametrize(
    ("machine", "cores", "overrides", "workers", "threads"),
    [
        (2, 2, [], 2, 1),  # replay at fps 0: a frame per core, one onnxruntime thread each
        (4, 4, [], 4, 1),
        (1, 1, [], 1, 1),  # one core: one call on one thread
        (4, 1, [], 1, 1),  # a quota of one CPU on four: one call on one thread, not the runtime's four
        (4, 4, ["model.threads=2"], 2, 2),  # threads set: workers fill the remaining cores
        (2, 2, ["model.threads=2"], 1, 2),  # the old way, one frame on two threads
        (4, 4, ["model.workers=2"], 2, 2),  # workers set: the cores shared among them
        (2, 2, ["model.workers=1"], 1, 2),
        (2, 2, ["model.backend=torch"], 1, 0),  # torch's threads are process-wide: one call at a time
        (8, 2, ["model.backend=torch"], 1, 2),  # ... on the cores it may use
        (6, 6, ['model.providers=["CUDAExecutionProvider", "CPUExecutionProvider"]'], 1, 6),  # a Jetson: unmeasured
        (2, 2, ["source.kind=file", "source.url=/tmp/clip.avi"], 2, 1),
        (2, 2, ["source.fps=10"], 1, 2),  # paced: one frame at a time on every core is the lowest latency
        (8, 2, ["source.fps=10"], 1, 2),  # ... on every core it may use
        (2, 2, ["source.fps=10", "model.workers=2"], 1, 2),
        (2, 2, ["source.kind=rtsp", "source.url=rtsp://cam/stream", "model.workers=3"], 1, 2),
    ],
)
def test_workers_only_where_frames_wait(
    monkeypatch: pytest.MonkeyPatch, machine: int, cores: int, overrides: list[str], workers: int, threads: int
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: machine)
    monkeypatch.setattr("eyed.config.available_cores", lambda: cores)
    model = load_settings(None, overrides).runtime_model()
    assert (model.workers, model.threads) == (workers, threads)


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["model.workers=1"],
        ["source.fps=10"],
        ["source.kind=rtsp", "source.url=rtsp://cam/stream"],
        ["source.kind=webcam", "source.device=0"],
        ['model.providers=["CUDAExecutionProvider", "CPUExecutionProvider"]'],
    ],
)
@pytest.mark.parametrize("cores", [1, 3, 64])
def test_onnxruntime_always_gets_a_thread_count(
    monkeypatch: pytest.MonkeyPatch, overrides: list[str], cores: int
) -> None:
    """With intra_op_num_threads 0, onnxruntime pins its threads to cores itself, which the unit's
    SystemCallFilter=~@resources refuses (an ERROR in the journal at every start): model.threads=0 always
    becomes a count, the cores shared among the workers, on a machine that has them all too."""
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setattr("eyed.config.available_cores", lambda: cores)
    settings = load_settings(None, overrides)
    for model in (settings.runtime_model(), settings.full_speed_model()):
        assert model.threads >= 1
        assert model.threads * model.workers <= max(cores, model.workers)
    assert settings.model.threads == 0  # the settings themselves (and bench's bare loop) keep the default


def test_an_explicit_thread_count_stands(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("eyed.config.available_cores", lambda: 8)
    assert load_settings(None, ["model.threads=3", "source.fps=10"]).runtime_model().threads == 3


@pytest.mark.parametrize(
    ("overrides", "workers"),
    [
        (["source.fps=10"], 2),  # a paced replay is measured (eval, bench) at full speed, as at fps 0
        (["source.kind=file", "source.url=/tmp/clip.avi", "source.fps=30"], 2),
        (["source.fps=10", "model.backend=torch"], 1),
    ],
)
def test_full_speed_model_is_the_daemons_at_fps_0(
    monkeypatch: pytest.MonkeyPatch, overrides: list[str], workers: int
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr("eyed.config.available_cores", lambda: 2)
    settings = load_settings(None, [*overrides, "model.batch=8"])
    assert settings.runtime_model().workers == 1
    model = settings.full_speed_model()
    assert (model.workers, model.batch, model.spinning) == (workers, 8, "on")
    assert settings.source.fps > 0  # the settings themselves keep their pace


def test_a_cgroup_cpu_quota_caps_the_cores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from eyed.config import available_cores, cgroup_cpu_quota

    root = tmp_path / "cgroup"
    (root / "system.slice" / "eyed.service").mkdir(parents=True)
    membership = tmp_path / "self-cgroup"
    membership.write_text("0::/system.slice/eyed.service\n")
    assert cgroup_cpu_quota(root, membership) is None  # no cpu.max anywhere: no limit
    (root / "cpu.max").write_text("max 100000\n")
    (root / "system.slice" / "cpu.max").write_text("250000 100000\n")
    assert cgroup_cpu_quota(root, membership) == 2.5  # a parent's limit applies to the service
    (root / "system.slice" / "eyed.service" / "cpu.max").write_text("50000 100000\n")
    assert cgroup_cpu_quota(root, membership) == 0.5  # the tightest one wins
    membership.write_text("12:cpu,cpuacct:/\n")  # cgroup v1: not read
    assert cgroup_cpu_quota(root, membership) is None
    monkeypatch.setattr("eyed.config.cgroup_cpu_quota", lambda: 0.5)
    assert available_cores() == 1  # half a CPU still runs one worker
    monkeypatch.setattr("eyed.config.cgroup_cpu_quota", lambda: 1000.0)
    assert available_cores() == len(os.sched_getaffinity(0))


def test_available_cores_follows_the_affinity_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    from eyed.config import available_cores

    monkeypatch.setattr("eyed.config.cgroup_cpu_quota", lambda: None)  # whatever cgroup the tests run in

    assert available_cores() == len(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        assert available_cores() == 1
    finally:
        os.sched_setaffinity(0, before)


@pytest.mark.parametrize(
    ("endpoint", "problem"),
    [
        ("tcp://127.0.0.1:notaport", "port 'notaport'"),
        ("tcp://:5556", "tcp://HOST:PORT"),
        ("tcp://host:99999", "port '99999'"),
        ("tcp://127.0.0.1:65536", "port '65536'"),
        ("tcp://127.0.0.1", "tcp://HOST:PORT"),
        ("tcp://127.0.0.1:-1", "port '-1'"),
        ("tcp://127.0.0.1:*x", "port '*x'"),
        ("tcp://300.1.1.1:5556", "host '300.1.1.1'"),
        ("tcp://::1:5556", "in brackets"),
        ("tcp://[::1:5556", "host '[::1'"),
        ("tcp://[not-v6]:5556", "host '[not-v6]'"),
        ("tcp://eth0;x:5556", "host 'eth0;x'"),
        ("tcp://", "nothing after tcp://"),
        ("ipc://", "nothing after ipc://"),
        ("ipc://*", "ipc://* (a random path ZeroMQ picks)"),
        (f"ipc:///run/{'x' * 110}.sock", "longer than 107 bytes"),
        ("http://x", "expected tcp://HOST:PORT"),
        ("127.0.0.1:5556", "expected tcp://HOST:PORT"),
    ],
)
def test_a_malformed_endpoint_is_a_config_error(endpoint: str, problem: str) -> None:
    """ZeroMQ would only refuse these at bind, after the model loaded, as a failure systemd restarts."""
    with pytest.raises(ConfigError, match=re.escape(problem)) as info:
        load_settings(None, [f"publish.endpoint={endpoint}"])
    assert "publish.endpoint" in str(info.value)


@pytest.mark.parametrize(
    "endpoint",
    [
        "tcp://127.0.0.1:5556",
        "tcp://*:5556",
        "tcp://0.0.0.0:5556",
        "tcp://127.0.0.1:*",
        "tcp://127.0.0.1:0",  # ZeroMQ's other spelling of any free port
        "tcp://[::1]:5556",
        "tcp://[::]:*",
        "tcp://[fe80::1%eth0]:5556",
        "tcp://eth0:5556",
        "tcp://br-lan.100:5556",
        "tcp://localhost:5556",
        "ipc:///run/eyed/events.sock",
        "ipc://events.sock",
        "ipc://@eyed-events",
        "inproc://events",
    ],
)
def test_well_formed_endpoints_pass(endpoint: str) -> None:
    assert load_settings(None, [f"publish.endpoint={endpoint}"]).publish.endpoint == endpoint


def test_model_cache_dir_defaults_to_the_units_cache_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """systemd passes the unit's CacheDirectory= on as $CACHE_DIRECTORY: that is model.cache_dir's default, which
    a cache_dir in the TOML file still beats (the unit's EYED_MODEL__CACHE_DIR used to beat the file), and
    `eyed check-config` shows the value in effect."""
    monkeypatch.delenv("CACHE_DIRECTORY", raising=False)
    assert load_settings().model.cache_dir == Path("~/.cache/eyed").expanduser()
    monkeypatch.setenv("CACHE_DIRECTORY", "/var/cache/eyed")
    assert load_settings().model.cache_dir == Path("/var/cache/eyed")
    monkeypatch.setenv("CACHE_DIRECTORY", "/var/cache/eyed:/var/cache/other")  # several: the first
    assert load_settings().model.cache_dir == Path("/var/cache/eyed")
    config = write_toml(tmp_path, f'[model]\ncache_dir = "{tmp_path / "mine"}"\n')
    assert load_settings(config).model.cache_dir == tmp_path / "mine"
    monkeypatch.setenv("EYED_MODEL__CACHE_DIR", str(tmp_path / "env"))  # the environment beats the file, as ever
    assert load_settings(config).model.cache_dir == tmp_path / "env"
    monkeypatch.delenv("EYED_MODEL__CACHE_DIR")
    assert main(["check-config"]) == EXIT_OK
    assert tomllib.loads(capsys.readouterr().out)["model"]["cache_dir"] == "/var/cache/eyed"
    assert main(["check-config", "--config", str(config)]) == EXIT_OK
    assert tomllib.loads(capsys.readouterr().out)["model"]["cache_dir"] == str(tmp_path / "mine")


def test_check_config_refuses_an_execution_provider_onnxruntime_lacks(capsys: pytest.CaptureFixture[str]) -> None:
    """`eyed run` exits 78 for it: check-config says so before the service starts."""
    pytest.importorskip("onnxruntime")
    code, err = check_config({"model.providers": '["CUDAExecutionProvider", "CPUExecutionProvider"]'}, capsys)
    if code == EXIT_OK:  # an onnxruntime with CUDA: nothing to refuse here
        import onnxruntime

        assert "CUDAExecutionProvider" in onnxruntime.get_available_providers()
        return
    assert code == EXIT_CONFIG
    assert "model.providers: CUDAExecutionProvider not available in this onnxruntime build" in err


def test_shutdown_fits_in_the_units_stop_timeout(tmp_path: Path) -> None:
    """systemd kills eyed TimeoutStopSec=20 s after SIGTERM: the pipeline's bound plus the publisher's linger
    must end before that."""
    assert load_settings(None, ["daemon.shutdown_timeout_s=13", "publish.linger_ms=3900"])
    with pytest.raises(ConfigError) as info:  # 17 s, and 3 s for the source and the model to close
        load_settings(write_toml(tmp_path, "[daemon]\nshutdown_timeout_s = 13\n[publish]\nlinger_ms = 4000\n"))
    assert "daemon.shutdown_timeout_s" in str(info.value) and "publish.linger_ms" in str(info.value)
    assert "TimeoutStopSec" in str(info.value)
    with pytest.raises(ConfigError, match=re.escape("daemon.shutdown_timeout_s")):
        load_settings(None, ["daemon.shutdown_timeout_s=30", "publish.linger_ms=0"])
    with pytest.raises(ConfigError, match=re.escape("publish.linger_ms")):
        load_settings(None, ["daemon.shutdown_timeout_s=1", "publish.linger_ms=60000"])


def test_the_stop_budget_matches_the_shipped_unit() -> None:
    from eyed.config import UNIT_STOP_TIMEOUT_S

    unit = (ROOT / "systemd" / "eyed.service").read_text(encoding="utf-8")
    assert f"TimeoutStopSec={UNIT_STOP_TIMEOUT_S:g}\n" in unit


def test_cross_field_rule() -> None:
    with pytest.raises(ConfigError, match=re.escape("model.onnx")):
        load_settings(None, ["model.onnx=/tmp/m.onnx", "model.backend=torch"])


def test_a_drift_window_in_frames_or_in_seconds_not_both(tmp_path: Path) -> None:
    assert load_settings(None, ["drift.window_s=10"]).drift.window_text() == "10 s"
    assert load_settings(None, ["drift.window=500"]).drift.window_text() == "500 frames"
    assert load_settings().drift.window_text() == "250 frames"
    # eyed eval --vs re-validates a dump of the settings: one window set stays one window set.
    from eyed.evaluate import apply_overrides

    assert apply_overrides(load_settings(None, ["drift.window_s=10"]), ["model.topk=3"]).drift.window_s == 10
    with pytest.raises(ConfigError, match=re.escape("drift.window (frames) or drift.window_s (seconds)")):
        load_settings(write_toml(tmp_path, "[drift]\nwindow = 500\nwindow_s = 10\n"))


def test_a_learned_reference_is_bounded_in_frames(tmp_path: Path) -> None:
    """The monitor keeps every frame it learns from until learning ends: learn_windows x window frames."""
    on = "drift.enabled=true"
    assert load_settings(None, [on, "drift.window=20000", "drift.learn_windows=5"]).drift.learn_windows == 5
    with pytest.raises(ConfigError, match=r"drift.learn_windows x drift.window is 120000 frames, more than the 100000"):
        load_settings(None, [on, "drift.window=20000", "drift.learn_windows=6"])
    # Nothing is learned with drift off: a configuration valid before stays valid.
    assert load_settings(None, ["drift.window=20000", "drift.learn_windows=6"]).drift.learn_windows == 6
    with pytest.raises(ConfigError, match=re.escape("drift.learn_windows")):
        load_settings(None, ["drift.window_s=10", "drift.learn_windows=1000000"])
    # Learned frames only: with a reference file, learn_windows is not used.
    ref = tmp_path / "ref.json"
    ref.write_text("{}")
    settings = load_settings(None, [f"drift.reference={ref}", "drift.window=20000", "drift.learn_windows=6"])
    assert settings.drift.learn_windows == 6


def test_a_list_option_takes_a_json_array_on_the_command_line() -> None:
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert load_settings(None, [f"model.providers={json.dumps(providers)}"]).model.providers == providers
    with pytest.raises(ConfigError, match=re.escape("model.providers")):
        load_settings(None, ["model.providers=[CUDA"])
    assert load_settings(None, ["source.dataset=[cam]/data"]).source.dataset == "[cam]/data"


@pytest.mark.parametrize(
    "argv",
    [
        ["export", "--int8", "--output", "/tmp/never.onnx", "--calibration", "0"],
        ["export", "--int8", "--output", "/tmp/never.onnx", "--calibration", "-5"],
        ["export", "--int8", "--output", "/tmp/never.onnx", "--check", "-1"],
        ["bench", "--frames", "0"],
        ["bench", "--batch", "0"],
        ["eval", "--skip", "-1"],
        ["subscribe", "--count", "-1"],
        ["finetune", "--output", "/tmp/never", "--epochs", "0"],
    ],
)
def test_command_line_counts_are_checked(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and argv[-2] in capsys.readouterr().err


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="no such file"):
        load_settings(missing)


def test_unreadable_config_file_is_a_config_error(capsys: pytest.CaptureFixture[str]) -> None:
    # A file that exists but cannot be read (as eyed.toml mode 0600 is for the unit's DynamicUser): reading
    # /proc/self/mem fails with EIO, even for root. Exit 78, so systemd does not restart it in a loop.
    assert main(["check-config", "--config", "/proc/self/mem"]) == EXIT_CONFIG
    assert "cannot read it" in capsys.readouterr().err


def test_misspelt_section_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EYED_SORCE__LIMIT", "5")
    with pytest.raises(ConfigError, match="EYED_SORCE__LIMIT: unknown section 'sorce'"):
        load_settings()


def test_environment_variables_that_are_not_settings_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EYED_SHARED", "/somewhere")  # the tests' own variable: no section delimiter
    monkeypatch.setenv("eyed_source__limit", "5")  # matched case-insensitively, as pydantic-settings does
    assert load_settings().source.limit == 5


def test_toml_syntax_error(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[source\nlimit = \n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(path) in str(info.value)


def test_failed_load_does_not_leak_the_toml_file(tmp_path: Path) -> None:
    """The TOML path is class state during construction only; the next load must not see it."""
    with pytest.raises(ConfigError):
        load_settings(write_toml(tmp_path, "[source]\nlimit = -1\n"))
    assert load_settings().source.limit == 0


# resolved_id


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, "cifar10-test"),
        ({"id": "cam_1"}, "cam_1"),
        ({"dataset": "/data/my cifar/", "split": "train"}, "my-cifar-train"),
        ({"dataset": "./local", "split": "train[:10%]"}, "local-train-10"),
        ({"dataset": "/", "split": "test"}, "replay-test"),
        ({"kind": "webcam", "device": 0}, "webcam-0"),
        ({"kind": "webcam", "device": "/dev/video2"}, "webcam-video2"),
        ({"kind": "file", "url": "/videos/shelf cam.mp4"}, "shelf-cam"),
        ({"kind": "rtsp", "url": "rtsp://user:secret@10.0.0.5:554/stream1"}, "rtsp-10-0-0-5-554-stream1"),
    ],
)
def test_resolved_id(kwargs: dict[str, object], expected: str) -> None:
    resolved = SourceConfig(**kwargs).resolved_id()
    assert resolved == expected
    assert re.fullmatch(r"[A-Za-z0-9_\-]+", resolved)


def test_resolved_id_never_empty() -> None:
    resolved = SourceConfig(dataset="/data/カメラ", split="テスト").resolved_id()
    assert re.fullmatch(r"[A-Za-z0-9_\-]+", resolved)


# dump_settings


def _round_trip(settings: Settings, folder: Path) -> Settings:
    text = dump_settings(settings)
    tomllib.loads(text)  # valid TOML
    return load_settings(write_toml(folder, text))


def test_dump_round_trips_defaults(tmp_path: Path) -> None:
    s = load_settings()
    assert _round_trip(s, tmp_path) == s


def test_dump_round_trips_non_defaults(tmp_path: Path) -> None:
    s = load_settings(
        None,
        [
            "source.id=cam1",
            "source.loop=true",
            "source.fps=12.5",
            'source.dataset=/data/café "quoted" \\ back',
            "model.onnx=/models/m.onnx",
            "model.topk=3",
            "publish.endpoint=ipc:///tmp/eyed.sock",
            "log.level=DEBUG",
            "drift.window_s=10",
        ],
    )
    back = _round_trip(s, tmp_path)
    assert back == s
    assert back.source.dataset == '/data/café "quoted" \\ back'


def test_dump_round_trips_non_bmp_characters(tmp_path: Path) -> None:
    s = load_settings(None, ["source.dataset=/data/\U0001f4f7cam"])
    assert _round_trip(s, tmp_path) == s


# The CLI


def test_cli_check_config_prints_effective_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_toml(tmp_path, '[source]\nlimit = 42\nid = "front-door"\n\n[model]\ntopk = 2\n')
    assert main(["check-config", "--config", str(path), "--set", "model.topk=4"]) == EXIT_OK
    out, err = capsys.readouterr()
    printed = tomllib.loads(out)
    assert printed["source"]["limit"] == 42
    assert printed["source"]["id"] == "front-door"
    assert printed["model"]["topk"] == 4
    assert printed["publish"]["endpoint"] == "tcp://127.0.0.1:5556"
    assert "front-door" in err


def test_cli_check_config_invalid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_toml(tmp_path, '[publish]\nendpoint = "http://x"\n')
    assert main(["check-config", "--config", str(path)]) == EXIT_CONFIG
    out, err = capsys.readouterr()
    assert out == ""
    assert "publish.endpoint" in err


def test_cli_check_config_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(tmp_path / "nope.toml")]) == EXIT_CONFIG
    assert "nope.toml" in capsys.readouterr().err


@pytest.fixture
def curve_files(tmp_path: Path) -> dict[str, str]:
    """A daemon key pair and an allow-list folder holding one subscriber's public key."""
    from eyed.curve import create_keys

    _, secret = create_keys(tmp_path / "server", "eyed")
    clients = tmp_path / "clients"
    create_keys(clients, "dashboard")
    (clients / "dashboard.key_secret").unlink()
    return {"publish.curve_secret_key": str(secret), "publish.curve_clients": str(clients)}


def check_config(settings: dict[str, str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["check-config", *(arg for k, v in settings.items() for arg in ("--set", f"{k}={v}"))])
    return code, capsys.readouterr().err


def test_check_config_reads_the_files_the_daemon_reads(
    tmp_path: Path, curve_files: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    from eyed.model.labels import load_group_map, save_priors

    classes, _ = load_group_map("cifar10")
    priors = tmp_path / "priors.json"
    save_priors(priors, classes, np.full(len(classes), 0.1), {})
    code, err = check_config({**curve_files, "model.coarse_priors": str(priors)}, capsys)
    assert code == EXIT_OK, err
    assert "publish.curve_clients allows 1 subscriber key(s)" in err


def test_check_config_leaves_a_systemd_credential_to_the_service(
    curve_files: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """LoadCredential= puts the secret key under /run/credentials only while the service runs: checked before
    the first start it is not there yet, and the daemon reads it when it is."""
    key = "/run/credentials/eyed.service/curve.key_secret"
    code, err = check_config({**curve_files, "publish.curve_secret_key": key}, capsys)
    assert code == EXIT_OK, err
    assert "publish.curve_secret_key is a systemd credential" in err
    # Anywhere else, a missing key is the error run would give.
    code, err = check_config({**curve_files, "publish.curve_secret_key": "/nope/eyed.key_secret"}, capsys)
    assert code == EXIT_CONFIG


@pytest.mark.parametrize(
    ("change", "field", "problem"),
    [
        ({"publish.curve_secret_key": "{tmp}/missing.key_secret"}, "publish.curve_secret_key", "cannot read"),
        ({"publish.curve_secret_key": "{tmp}/clients/dashboard.key"}, "publish.curve_secret_key", "no secret key"),
        ({"publish.curve_clients": "{tmp}/nowhere"}, "publish.curve_clients", "no such folder"),
        ({"publish.curve_clients": "{tmp}/broken"}, "publish.curve_clients", "cannot read the client keys"),
        ({"drift.reference": "{tmp}/missing.json"}, "drift.reference", "cannot read"),
        ({"drift.reference": "{tmp}/broken/bad.key"}, "drift.reference", "not JSON"),
        ({"drift.reference": "{tmp}/other.json"}, "drift.reference", "not a drift reference"),
        ({"model.coarse_priors": "{tmp}/missing.json"}, "model.coarse_priors", "No such file"),
        ({"model.coarse_priors": "{tmp}/cat.json"}, "model.coarse_priors", "no prior for airplane"),
    ],
)
def test_check_config_refuses_files_the_daemon_would_refuse(
    tmp_path: Path,
    curve_files: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    change: dict[str, str],
    field: str,
    problem: str,
) -> None:
    """`eyed run` exits 78 on each of these (install.sh relies on check-config to say so first)."""
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "bad.key").write_text("not a certificate\n")
    (tmp_path / "other.json").write_text('{"kind": "something else", "schema": 1}\n')
    (tmp_path / "cat.json").write_text('{"priors": {"cat": 0.5}}\n')
    settings = curve_files if field.startswith("publish.") else {}
    code, err = check_config({**settings, **{k: v.format(tmp=tmp_path) for k, v in change.items()}}, capsys)
    assert code == EXIT_CONFIG, err
    assert field in err and problem in err


def test_check_config_leaves_a_reference_alone_when_drift_is_off(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # As the daemon does: with drift.enabled = false it never reads drift.reference.
    code, err = check_config({"drift.reference": str(tmp_path / "missing.json"), "drift.enabled": "false"}, capsys)
    assert code == EXIT_OK, err


def test_console_script_exit_code() -> None:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("EYED_")}
    result = subprocess.run(
        [sys.executable, "-m", "eyed", "check-config", "--set", "source.limit=abc"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == EXIT_CONFIG == 78
    assert "source.limit" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "rtsp"}, "source.url is required"),
        ({"kind": "rtsp", "url": "http://cam/stream"}, "must start with rtsp://"),
        ({"kind": "file"}, "source.url is required"),
        ({"kind": "webcam"}, "source.device is required"),
        ({"kind": "webcam", "device": 0, "reconnect_initial_s": 5, "reconnect_max_s": 1}, "reconnect_initial_s"),
    ],
)
def test_camera_fields_are_checked(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SourceConfig(**kwargs)


def test_rtsp_source_id_never_contains_credentials() -> None:
    cfg = SourceConfig(kind="rtsp", url="rtsp://admin:hunter2@cam.local/live")
    assert "hunter2" not in cfg.resolved_id() and "admin" not in cfg.resolved_id()
    # Cameras that take them in the query or the path: the id (every topic, event and log line) keeps the
    # other items, which tell an NVR's channels apart, and the host as written.
    ids = [
        (
            "rtsp://10.0.0.5:554/cam/realmonitor?channel=1&user=admin&password=hunter2",
            "rtsp-10-0-0-5-554-cam-realmonitor-channel-1",
        ),
        (
            "rtsp://10.0.0.5:554/cam/realmonitor?channel=2&subtype=0",
            "rtsp-10-0-0-5-554-cam-realmonitor-channel-2-subtype-0",
        ),
        (
            "rtsp://10.0.0.5/live?token=abc123#x",
            "rtsp-10-0-0-5-live",
        ),
        (
            "rtsp://192.168.1.10/user=admin&password=hunter2&channel=1&stream=0.sdp?",
            "rtsp-192-168-1-10-channel-1-stream-0-sdp",
        ),
        (
            "rtsp://u:p@ss@Garage-Cam.local/stream1",
            "rtsp-Garage-Cam-local-stream1",
        ),
        # Cameras' CGI spellings of user and password.
        (
            "rtsp://cam.local:554/cam/realmonitor?channel=1&usr=admin&pw=Hunter2",
            "rtsp-cam-local-554-cam-realmonitor-channel-1",
        ),
        (
            "rtsp://cam.local/videostream.cgi?usr=admin&pwd=Hunter2&resolution=32",
            "rtsp-cam-local-videostream-cgi-resolution-32",
        ),
        (
            "rtsp://cam.local/live?loginuse=admin&psw=Hunter2&stream=1",
            "rtsp-cam-local-live-stream-1",
        ),
    ]
    assert [(url, SourceConfig(kind="rtsp", url=url).resolved_id()) for url, _ in ids] == ids


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("rtsp://admin:hunter2@cam.local/live?token=s3cr3t", "live"),
        ("https://me:pw@videos.example/shelf.mp4?sig=abc", "shelf"),
        ("/videos/password=x/shelf.mp4", "shelf"),
        # Plain paths keep the ids they had: '#', ':' and '@' are characters of a file name there.
        ("/data/cam#2.mp4", "cam-2"),
        ("/data/run#3/video.mp4", "video"),
        ("cam:front.mp4", "cam-front"),
        ("me@cam.mp4", "me-cam"),
    ],
)
def test_a_file_source_id_never_contains_credentials(url: str, expected: str) -> None:
    """kind = file takes a URL too (an rtsp:// given by mistake, a stream FFmpeg reads): its secrets went into
    the id, so into every topic and log line."""
    assert SourceConfig(kind="file", url=url).resolved_id() == expected


def test_an_rtsp_url_that_cannot_be_parsed_is_a_config_error() -> None:
    for url in ("rtsp://admin:hunter2@[fe80::1/live", "rtsp://cam.local:abc/live"):
        with pytest.raises(ValueError, match=r"source\.url is not a valid URL"):
            SourceConfig(kind="rtsp", url=url)


SECRET_URL = "rtsp://admin:hunter2@10.0.0.5:554/live?channel=1&password=hunter2&token=abc123"


def test_redact_url_hides_the_password_and_secret_query_values() -> None:
    redacted = redact_url(SECRET_URL)
    assert redacted == "rtsp://admin:***@10.0.0.5:554/live?channel=1&password=***&token=***"
    assert redact_url("rtsp://cam.local/live") == "rtsp://cam.local/live"
    assert redact_url("rtsp://user@cam.local/live?a") == "rtsp://user@cam.local/live?a"
    # In the path (XMEye cameras), in a password holding an @, behind a mistyped scheme, in a malformed URL.
    assert (
        redact_url("rtsp://cam/user=admin&password=hunter2&channel=1") == "rtsp://cam/user=admin&password=***&channel=1"
    )
    assert redact_url("rtsp://admin:p@ss@cam/live") == "rtsp://admin:***@cam/live"
    for name in ("pw", "pwd", "psw", "passwd"):
        assert (
            redact_url(f"rtsp://cam/live?usr=admin&{name}=Hunter2&ch=1") == f"rtsp://cam/live?usr=admin&{name}=***&ch=1"
        )
    assert redact_url("rtsp//admin:hunter2@cam/live") == "rtsp//admin:***@cam/live"
    assert redact_url("rtsp://admin:hunter2@[fe80::1/live") == "rtsp://admin:***@[fe80::1/live"
    # Endpoints and paths without secrets stay as written.
    for text in ("ipc:///run/eyed/events.sock", "ipc://@eyed-events", "tcp://*:5556", "tcp://[::1]:5556", "/data/x"):
        assert redact_url(text) == text


def test_an_invalid_source_section_does_not_print_the_camera_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A whole-section error quotes the section as its input: with the url, the password went to the journal."""
    config = tmp_path / "eyed.toml"
    config.write_text(
        f'[source]\nkind = "rtsp"\nurl = "{SECRET_URL}"\nreconnect_initial_s = 60\nreconnect_max_s = 30\n'
    )
    assert main(["check-config", "--config", str(config)]) == 78
    err = capsys.readouterr().err
    assert "reconnect_initial_s" in err and "10.0.0.5" in err
    assert "hunter2" not in err and "abc123" not in err


def test_check_config_prints_the_url_without_its_password(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "eyed.toml"
    config.write_text(f'[source]\nkind = "rtsp"\nurl = "{SECRET_URL}"\n')
    assert main(["check-config", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert 'url = "rtsp://admin:***@10.0.0.5:554/live?channel=1&password=***&token=***"' in out
    assert "hunter2" not in out


# Clearing options, ~ and malformed overrides


def test_an_empty_value_clears_an_option_the_file_sets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--set model.onnx=` is how to run model.id with a file that names an ONNX file; pydantic alone would read
    "" as the path "." and the run would fail with "model.onnx .: no such file"."""
    config = write_toml(tmp_path, '[model]\nonnx = "m.onnx"\n[drift]\nwindow = 200\n')
    assert load_settings(config).model.onnx == Path("m.onnx")
    cleared = load_settings(config, ["model.onnx=", "drift.window=", "drift.window_s=10"])
    assert cleared.model.onnx is None
    assert (cleared.drift.window, cleared.drift.window_s) == (None, 10.0)
    monkeypatch.setenv("EYED_MODEL__ONNX", "")
    assert load_settings(config).model.onnx is None
    with pytest.raises(ConfigError, match=re.escape("--set drift.window=")):
        load_settings(config, ["drift.window_s=10"])
    # An option that cannot be unset is not silently the working directory.
    with pytest.raises(ConfigError, match=r"model\.cache_dir: .*empty: give a path"):
        load_settings(None, ["model.cache_dir="])


def test_paths_may_start_with_a_tilde(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    config = write_toml(
        tmp_path, '[model]\nonnx = "~/m.onnx"\n[publish]\ncurve_clients = "~/clients"\ncurve_secret_key = "~/k"\n'
    )
    settings = load_settings(config, ["model.cache_dir=~/cache"])
    assert settings.model.onnx == tmp_path / "m.onnx"
    assert settings.publish.curve_clients == tmp_path / "clients"
    assert settings.publish.curve_secret_key == tmp_path / "k"
    assert settings.model.cache_dir == tmp_path / "cache"
    settings.drift.reference = Path("~/ref.json")  # assigned, as eyed drift-report does
    assert settings.drift.reference == tmp_path / "ref.json"


@pytest.mark.parametrize(
    "overrides", [["source=5", "source.limit=1"], ["source.limit=1", "source=5"], ["source.limit.x=1"]]
)
def test_a_value_and_a_section_under_one_name_is_an_error(overrides: list[str]) -> None:
    with pytest.raises(ConfigError, match=r"is a section, not a value|source\.limit"):
        load_settings(None, overrides)


def test_a_section_from_the_environment_that_is_not_json_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EYED_SOURCE", "notjson")
    with pytest.raises(ConfigError) as info:
        load_settings(None)
    assert str(info.value).startswith("environment: ") and '"source"' in str(info.value)
    assert "EYED_<SECTION>" in str(info.value) and "None" not in str(info.value)


@pytest.mark.parametrize(
    ("bound", "reached"),
    [
        ("tcp://*:5556", "tcp://127.0.0.1:5556"),
        ("tcp://0.0.0.0:5556", "tcp://127.0.0.1:5556"),
        ("tcp://[::]:5556", "tcp://[::1]:5556"),
        ("tcp://lo:5556", "tcp://127.0.0.1:5556"),
        ("tcp://10.1.2.3:5556", "tcp://10.1.2.3:5556"),
        ("tcp://board.local:5556", "tcp://board.local:5556"),
        ("ipc:///run/eyed/eyed.sock", "ipc:///run/eyed/eyed.sock"),
    ],
)
def test_subscribers_reach_a_bind_address_through_this_machine(bound: str, reached: str) -> None:
    assert connect_endpoint(bound) == reached


@pytest.mark.parametrize(
    ("bound", "why"),
    [("tcp://*:*", "port \\*"), ("inproc://eyed", "inside the daemon"), ("tcp://x", "tcp://HOST:PORT")],
)
def test_no_subscriber_reaches_some_endpoints(bound: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        connect_endpoint(bound)


@pytest.mark.parametrize("name", ["psi", "js", "ks"])
def test_a_warn_threshold_above_drift_is_a_config_error(name: str) -> None:
    with pytest.raises(ConfigError, match=f"drift.{name}_warn"):
        load_settings(None, [f"drift.{name}_warn=0.3", f"drift.{name}_drift=0.2"])
