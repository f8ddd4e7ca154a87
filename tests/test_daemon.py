"""The real daemon in a subprocess, a real SUB socket, tiny generated model and data."""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from eyed.cli import EXIT_CONFIG, EXIT_UNAVAILABLE
from eyed.config import available_cores, load_settings
from eyed.sources.memory import MemorySource
from eyed.subscriber import Subscriber
from tests.conftest import BUSY_DATASETS, CIFAR10, fake_datasets_package, synthetic_images
from tests.daemon_helpers import NotifyListener, collect, finish, reaped, start_daemon
from tests.fake_hub import FakeHub, cifar10_repo


@pytest.mark.parametrize("workers", [0, 3])
def test_replay_publishes_one_event_per_frame_and_finishes(
    base: dict[str, object], endpoint: str, workers: int
) -> None:
    proc = start_daemon({**base, "model.workers": workers})
    events = collect(endpoint)
    code, err = finish(proc)
    assert code == 0, err
    labels = [p for t, p in events if p["type"] == "label"]
    # 12 records, record 5 corrupt: 11 events, seq without gaps, dataset order kept.
    assert [p["seq"] for p in labels] == list(range(11))
    assert [p["truth"] for p in labels] == [CIFAR10[i % 10] for i in range(12) if i != 5]
    first = labels[0]
    assert {t for t, _ in events} == {"label.tiny", "health.tiny"}
    for key in (
        "schema",
        "type",
        "source",
        "seq",
        "ts",
        "label",
        "class_id",
        "score",
        "topk",
        "coarse",
        "truth",
        "latency_ms",
        "model",
        "backend",
    ):
        assert key in first, key
    assert first["schema"] == 1 and first["backend"] == "onnx"
    assert len(first["topk"]) == 5
    assert first["topk"][0]["label"] == first["label"] and first["topk"][0]["class_id"] == first["class_id"]
    assert first["coarse"]["label"] in CIFAR10
    assert first["latency_ms"] >= 0
    final = events[-1][1]
    assert final["type"] == "health" and final["state"] == "finished"
    assert final["frames"] == 11 and final["skipped"] == 1 and final["errors"] == 0
    assert "spinning=on" in err  # replay at fps 0: throughput
    # By default one worker per core, one onnxruntime thread each; the events above came in order either way.
    model = load_settings(None, [f"model.workers={workers}"]).runtime_model()
    assert model.workers == (workers or available_cores())
    assert f"workers={model.workers} threads={model.threads or 'default'}" in err


def test_sigterm_stops_a_looping_replay_cleanly(base: dict[str, object], endpoint: str) -> None:
    proc = start_daemon({**base, "source.loop": True, "source.fps": 100})
    seen: list[int] = []
    with Subscriber(endpoint, ("label.",)) as sub:
        while len(seen) < 30:
            seen.append(sub.receive(30)[1]["seq"])
    proc.send_signal(signal.SIGTERM)
    t = time.monotonic()
    code, err = finish(proc, timeout_s=15)
    assert code == 0, err
    assert time.monotonic() - t < 15
    assert seen == list(range(seen[0], seen[0] + 30))
    assert "done:" in err
    assert "spinning=off" in err  # a paced source leaves the cores idle between frames


def test_sigterm_while_datasets_walks_a_large_folder_exits_cleanly(
    base: dict[str, object], tmp_path: Path, tiny_dataset: Path
) -> None:
    """The daemon waits for a dataset_info child as long as it works; a stop ends that wait and the child."""
    proc = start_daemon(base, PYTHONPATH=fake_datasets_package(tmp_path, BUSY_DATASETS))
    assert proc.stderr is not None
    lines: list[str] = []
    while not any("warm-up took" in line for line in lines):  # the next step enters the source: the wait
        line = proc.stderr.readline()
        assert line, "".join(lines)
        lines.append(line)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc, timeout_s=15)
    assert code == 0, "".join(lines) + err
    assert "stopped before the first frame" in err
    children = [cmdline for cmdline in proc_cmdlines() if "eyed.sources.dataset_info" in cmdline]
    assert not [c for c in children if str(tiny_dataset) in c]


HANDLER_UNDER_LOCK = """
import os, signal, threading, time
from eyed.daemon import signals_set
stop, reload = threading.Event(), threading.Event()
before = signal.getsignal(signal.SIGTERM)
before_hup = signal.getsignal(signal.SIGHUP)
with signals_set(threading.Event(), threading.Event()):
    pass
# No stop came: the old handlers are back as they were.
print(signal.getsignal(signal.SIGTERM) is before and signal.getsignal(signal.SIGHUP) is before_hup)
with signals_set(stop, reload) as signals:
    # The locks Event.set takes, held as the main thread holds stop's inside stop.wait(): a handler that took one
    # would wait for it here for good.
    with stop._cond, reload._cond:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGHUP)
        deadline = time.monotonic() + 5
        while not (signals.stop_requested and signals.reload_requested) and time.monotonic() < deadline:
            time.sleep(0.01)
        handled = signals.stop_requested and signals.reload_requested
    print(handled, stop.wait(5), reload.wait(5), signal.getsignal(signal.SIGTERM) is not before)
# After a stop, the stop signals and SIGHUP stay ignored: a second stop or a reload must not kill the teardown.
ignored = (signal.SIG_IGN, signal.SIG_IGN, signal.SIG_IGN)
print(tuple(signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)) == ignored)
"""


def test_signal_handlers_take_no_lock() -> None:
    """A signal lands while the main thread holds the locks of ``stop`` and ``reload``: the handlers only set
    flags, the events are set once the locks are free, and the old handlers come back afterwards (as ignored,
    once a stop came)."""
    import sys

    try:
        out = subprocess.run(
            [sys.executable, "-c", HANDLER_UNDER_LOCK], capture_output=True, text=True, timeout=20, check=True
        ).stdout.split()
    except subprocess.TimeoutExpired:
        pytest.fail("a signal handler deadlocked the main thread on a lock it held")
    assert out == ["True"] * 6


SLOW_EXPORT = """
import sys, time
import torch.onnx

real = torch.onnx.export


def slow_export(*args, **kwargs):
    real(*args, **kwargs)  # the temporary file is written
    print("EXPORT WRITTEN", file=sys.stderr, flush=True)
    time.sleep(60)  # and the export goes on, as a full-size model's does on a Pi


torch.onnx.export = slow_export
from eyed.cli import main

sys.exit(main(["run"]))
"""


def test_sigterm_during_a_first_start_export_exits_at_once_leaving_no_file(
    base: dict[str, object], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """Loading the model looks at no stop flag; a stop must not wait for a long export (systemd's
    TimeoutStopSec would SIGKILL), and the half-written export must not stay in the cache."""
    import sys

    settings = {k: v for k, v in base.items() if k != "model.onnx"}
    settings.update({"model.id": tiny_checkpoint, "model.cache_dir": tmp_path / "cache"})
    listener = NotifyListener(tmp_path / "notify.sock")
    proc = start_daemon(settings, command=[sys.executable, "-c", SLOW_EXPORT], NOTIFY_SOCKET=str(listener.path))
    with reaped(proc, listener):
        assert proc.stderr is not None
        lines: list[str] = []
        while not any("EXPORT WRITTEN" in line for line in lines):
            line = proc.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
        exports = tmp_path / "cache" / "onnx"
        assert [p.suffixes[-2:] for p in exports.iterdir()] == [[".tmp", ".onnx"]]  # stopped half-way through
        proc.send_signal(signal.SIGTERM)
        t = time.monotonic()
        code, err = finish(proc, timeout_s=15)
        assert code == 0, "".join(lines) + err
        assert time.monotonic() - t < 10  # not the export's tens of seconds (interpreter teardown included)
        assert "stopped before the first frame" in err and "Traceback" not in err
        listener.wait_for("STOPPING=1", 5)
        assert "READY=1" not in listener.fields()
        assert list(exports.iterdir()) == []


def proc_cmdlines() -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:  # not a process, or gone since
            continue
    return found


@pytest.mark.parametrize(
    ("key", "value", "field"),
    [
        ("source.limit", "-3", "source.limit"),
        ("model.backend", "tensorflow", "model.backend"),
        ("source.bogus", "1", "source.bogus"),
        ("publish.endpoint", "http://nope", "publish.endpoint"),
    ],
)
def test_invalid_config_exits_78_naming_the_field(base: dict[str, object], key: str, value: str, field: str) -> None:
    code, err = finish(start_daemon({**base, key: value}))
    assert code == EXIT_CONFIG
    assert field in err


def test_missing_priors_file_exits_78(base: dict[str, object], tmp_path: Path) -> None:
    code, err = finish(start_daemon({**base, "model.coarse_priors": tmp_path / "nope.json"}))
    assert code == EXIT_CONFIG
    assert "model.coarse_priors" in err and "Traceback" not in err


def test_model_that_cannot_load_exits_69(base: dict[str, object], tmp_path: Path) -> None:
    settings = {k: v for k, v in base.items() if k != "model.onnx"}
    code, err = finish(start_daemon({**settings, "model.id": tmp_path / "no-such-model"}))
    assert code == EXIT_UNAVAILABLE
    assert "no-such-model" in err


def test_offline_hub_id_gives_a_clear_message(base: dict[str, object], tmp_path: Path) -> None:
    settings = {k: v for k, v in base.items() if k != "model.onnx"}
    code, err = finish(start_daemon({**settings, "model.cache_dir": tmp_path}))
    assert code == EXIT_UNAVAILABLE
    assert "cannot reach the hub for google/mobilenet_v2_1.0_224" in err
    assert "set model.id to a local checkpoint" in err


def test_offline_hub_dataset_gives_a_clear_message(base: dict[str, object]) -> None:
    """The dataset is asked of the hub in datasets' child process; its error reaches the user as it was."""
    settings = {k: v for k, v in base.items() if k not in ("source.dataset", "source.split")}
    code, err = finish(start_daemon(settings))
    assert code == EXIT_UNAVAILABLE
    assert "cannot reach the hub for dataset uoft-cs/cifar10 (ConnectionError: " in err
    assert "OfflineModeIsEnabled" in err and "Traceback" not in err


def start_online(settings: dict[str, object], hub: FakeHub, home: Path) -> subprocess.Popen[str]:
    """The daemon, loading from ``hub`` (the tests' environment is otherwise offline), its cache in ``home``."""
    return start_daemon(
        settings, HF_ENDPOINT=hub.endpoint, HF_HOME=str(home), HF_HUB_OFFLINE="0", HF_DATASETS_OFFLINE="0"
    )


def test_the_defaults_load_the_model_and_stream_the_dataset_from_the_hub(
    tiny_checkpoint: Path, tiny_dataset: Path, endpoint: str, tmp_path: Path
) -> None:
    """What a user with a network runs: no model or dataset named, so google/mobilenet_v2_1.0_224 and
    uoft-cs/cifar10 (test split) come from the hub, here a local stand-in (HF_ENDPOINT), without a line per HTTP
    request in the log."""
    repo = cifar10_repo(tmp_path / "cifar10", {"test": [tiny_dataset / "train-00000-of-00001.parquet"]})
    repos = {("model", "google/mobilenet_v2_1.0_224"): tiny_checkpoint, ("dataset", "uoft-cs/cifar10"): repo}
    settings = {
        "model.cache_dir": tmp_path / "cache",
        "publish.endpoint": endpoint,
        "publish.wait_subscribers": 1,
        "publish.wait_timeout_s": 120,
    }
    with FakeHub(repos) as hub:
        proc = start_online(settings, hub, tmp_path / "hf")
        events = collect(endpoint, timeout_s=120)
        code, err = finish(proc)
    assert code == 0, err
    labels = [p for _, p in events if p["type"] == "label"]
    assert [p["truth"] for p in labels] == [CIFAR10[i % 10] for i in range(12) if i != 5]
    assert {p["source"] for p in labels} == {"cifar10-test"}
    assert labels[0]["model"] == "google/mobilenet_v2_1.0_224"
    assert any("/google/mobilenet_v2_1.0_224/resolve/" in r for r in hub.requests)
    assert any("/datasets/uoft-cs/cifar10/resolve/" in r for r in hub.requests)
    assert any(r.startswith("GET /_storage/") for r in hub.requests)  # the weights, from "storage"
    assert "HTTP Request" not in err


def test_sigterm_while_the_hub_has_stalled_exits_cleanly(
    base: dict[str, object], tiny_dataset: Path, endpoint: str, tmp_path: Path
) -> None:
    """A replay from the hub whose network stalls waits on a request that huggingface_hub would retry for up to
    83 s; a stop meanwhile exits 0 within daemon.shutdown_timeout_s (not 70 after it)."""
    repo = cifar10_repo(tmp_path / "cifar10", {"train": [tiny_dataset / "train-00000-of-00001.parquet"]})
    settings = {**base, "source.dataset": "uoft-cs/cifar10", "source.loop": True, "source.fps": 50}
    with FakeHub({("dataset", "uoft-cs/cifar10"): repo}) as hub:
        proc = start_online(settings, hub, tmp_path / "hf")
        with Subscriber(endpoint, ("label.",)) as sub:
            for _ in range(3):
                sub.receive(60)
            hub.stall()
            with pytest.raises(TimeoutError):  # the pass buffered in memory ends; the next one waits on the hub
                while True:
                    sub.receive(3)
        proc.send_signal(signal.SIGTERM)
        code, err = finish(proc, timeout_s=60)
    assert code == 0, err
    assert "done:" in err and "Traceback" not in err


def test_waiting_for_subscribers_times_out_clearly(base: dict[str, object]) -> None:
    code, err = finish(start_daemon({**base, "publish.wait_timeout_s": 0.5}))
    assert code == EXIT_UNAVAILABLE
    assert "publish.wait_subscribers=1" in err


def test_a_reader_of_another_sources_labels_is_not_waited_for(base: dict[str, object], endpoint: str) -> None:
    """publish.wait_subscribers counts readers of this daemon's own label (or drift) topic only."""
    proc = start_daemon({**base, "publish.wait_timeout_s": 2})
    with Subscriber(endpoint, ("label.another-camera",)) as sub:
        code, err = finish(proc)
        with pytest.raises(TimeoutError):
            sub.receive(0.1)
    assert code == EXIT_UNAVAILABLE and "only 0 subscriber" in err, err


@pytest.mark.parametrize("ending", ["stopped", "failed"])
def test_subscribers_hear_the_wait_for_others_and_how_it_ended(
    base: dict[str, object], endpoint: str, ending: str
) -> None:
    """publish.wait_subscribers=2 and one subscriber: it hears `waiting` heartbeats, then `stopped` (SIGTERM)
    or `failed` (the wait timed out), where it used to hear nothing at all."""
    settings = {**base, "publish.wait_subscribers": 2, "publish.wait_timeout_s": 30 if ending == "stopped" else 3}
    proc = start_daemon(settings)
    states: list[str] = []
    with Subscriber(endpoint, ("health.",)) as sub:
        while len(states) < 3:
            states.append(sub.receive(20)[1]["state"])
        if ending == "stopped":
            proc.send_signal(signal.SIGTERM)
        while states[-1] == "waiting":
            states.append(sub.receive(20)[1]["state"])
    code, err = finish(proc)
    assert set(states[:-1]) == {"waiting"} and states[-1] == ending, states
    assert code == (0 if ending == "stopped" else EXIT_UNAVAILABLE), err


def test_onnx_backend_exports_once_into_the_cache(
    base: dict[str, object], tiny_checkpoint: Path, tmp_path: Path, endpoint: str
) -> None:
    settings = {k: v for k, v in base.items() if k != "model.onnx"}
    settings.update({"model.id": tiny_checkpoint, "model.cache_dir": tmp_path, "publish.wait_subscribers": 0})
    code, err = finish(start_daemon(settings), timeout_s=120)
    assert code == 0, err
    exported = list((tmp_path / "onnx").glob("*.onnx"))
    assert len(exported) == 1 and "exporting" in err
    mtime = exported[0].stat().st_mtime_ns
    code, err = finish(start_daemon(settings), timeout_s=120)
    assert code == 0, err
    assert "using cached export" in err and "exporting" not in err
    assert exported[0].stat().st_mtime_ns == mtime


def test_torch_backend_runs_the_same_feed(base: dict[str, object], tiny_checkpoint: Path, endpoint: str) -> None:
    settings = {k: v for k, v in base.items() if k != "model.onnx"}
    proc = start_daemon({**settings, "model.id": tiny_checkpoint, "model.backend": "torch"})
    events = collect(endpoint, timeout_s=120)
    code, err = finish(proc, timeout_s=60)
    assert code == 0, err
    labels = [p for _, p in events if p["type"] == "label"]
    assert len(labels) == 11 and {p["backend"] for p in labels} == {"torch"}


def test_eyed_subscribe_prints_events_as_json(base: dict[str, object], endpoint: str) -> None:
    import json
    import subprocess
    import sys

    proc = start_daemon(base)
    sub = subprocess.run(
        [
            sys.executable,
            "-m",
            "eyed",
            "subscribe",
            "--endpoint",
            endpoint,
            "--topic",
            "label.",
            "--count",
            "4",
            "--json",
            "--timeout",
            "60",
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    code, err = finish(proc)
    assert sub.returncode == 0, sub.stderr
    assert code == 0, err
    lines = [json.loads(line) for line in sub.stdout.splitlines()]
    assert [e["seq"] for e in lines] == [0, 1, 2, 3]
    assert all(e["topic"] == "label.tiny" and e["type"] == "label" for e in lines)


def test_eyed_health_exits_0_on_a_live_heartbeat_and_1_without(base: dict[str, object], endpoint: str) -> None:
    import subprocess
    import sys

    def health(timeout: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "eyed", "health", "--endpoint", endpoint, "--timeout", timeout],
            capture_output=True,
            text=True,
            timeout=60,
        )

    quiet = health("1")
    assert quiet.returncode == 1 and "no live heartbeat" in quiet.stderr
    proc = start_daemon({**base, "publish.wait_subscribers": 0, "source.loop": True, "source.fps": 20})
    try:
        alive = health("20")
        assert alive.returncode == 0, alive.stderr
        assert "state=live" in alive.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        code, err = finish(proc)
    assert code == 0, err


FREED_BLOCK_PROBE = """
import ctypes, re, sys
from eyed.daemon import pin_mmap_threshold
pinned = pin_mmap_threshold() if sys.argv[1] == "pin" else False
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def rss_kib():
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\\s+(\\d+)", f.read()).group(1))
before = rss_kib()
for _ in range(2):  # the first free raises glibc's threshold; the second block then comes from the heap
    block = libc.malloc(8 << 20)
    ctypes.memset(block, 1, 8 << 20)
    libc.free(block)
print(pinned, rss_kib() - before)
"""


def freed_block_probe(mode: str, **env: str) -> tuple[bool, int]:
    """(whether the threshold was pinned, KiB of RSS kept after two 8 MB blocks were freed)."""
    import os
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", FREED_BLOCK_PROBE, mode], env=clean | env, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0] == "True", int(out[1])


def test_a_freed_large_block_goes_back_to_the_system() -> None:
    """What onnxruntime frees while it builds a session, or arrow after a row group, is returned to the
    system: with glibc's own threshold it stays in the heap (the probe tells the two apart)."""
    assert freed_block_probe("pin") == (True, pytest.approx(0, abs=1024))
    assert freed_block_probe("leave")[1] > 6 * 1024


def test_a_users_malloc_setting_wins() -> None:
    assert freed_block_probe("pin", MALLOC_MMAP_THRESHOLD_=str(1 << 20))[0] is False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signals_that_keep_coming_still_exit_0(
    base: dict[str, object], tmp_path: Path, signum: signal.Signals
) -> None:
    """systemd (or a user pressing Ctrl-C again) may send another stop signal while the first one's shutdown
    runs, or during the interpreter's teardown after it: the exit stays 0, not death by that signal (-15) or
    130. Signals every 20 ms until the process is gone, so every stage of the shutdown gets some."""
    listener = NotifyListener(tmp_path / "notify.sock")
    settings = {**base, "publish.wait_subscribers": 0, "source.loop": True, "source.fps": 50}
    proc = start_daemon(settings, NOTIFY_SOCKET=str(listener.path))
    with reaped(proc, listener):
        listener.wait_for("READY=1", 60)
        time.sleep(0.3)
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            proc.send_signal(signum)
            time.sleep(0.02)
        code, err = finish(proc)
    assert code == 0, err
    assert "done:" in err and "Traceback" not in err


def test_reloads_as_a_replay_ends_still_exit_0(base: dict[str, object], tmp_path: Path) -> None:
    """A `systemctl reload` (SIGHUP) that lands while the daemon leaves (a finished replay's teardown) must not
    turn exit 0 into death by SIGHUP. Signals every 20 ms from READY until the process is gone."""
    listener = NotifyListener(tmp_path / "notify.sock")
    proc = start_daemon({**base, "publish.wait_subscribers": 0, "source.fps": 50}, NOTIFY_SOCKET=str(listener.path))
    with reaped(proc, listener):
        listener.wait_for("READY=1", 60)
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            proc.send_signal(signal.SIGHUP)
            time.sleep(0.02)
        code, err = finish(proc)
    assert code == 0, err
    assert "done: 11 frames" in err and "Traceback" not in err


def curve_allow_list(tmp_path: Path) -> tuple[dict[str, str], Path, tuple[Path, Path]]:
    """CURVE settings for the daemon, its allow-list folder, and an allowed subscriber's (secret, server) keys."""
    from eyed.curve import create_keys

    server_pub, server_secret = create_keys(tmp_path / "server", "eyed")
    allowed_pub, allowed_secret = create_keys(tmp_path / "allowed", "dashboard")
    clients = tmp_path / "clients"
    clients.mkdir()
    (clients / allowed_pub.name).write_bytes(allowed_pub.read_bytes())
    settings = {"publish.curve_secret_key": str(server_secret), "publish.curve_clients": str(clients)}
    return settings, clients, (allowed_secret, server_pub)


RELOAD_RAISES = """
import sys
import eyed.publisher


def broken_reload(self):
    raise IndexError("list index out of range")  # what pyzmq's certificate parser raised on a malformed line


eyed.publisher.Publisher.reload_clients = broken_reload
from eyed.cli import main

sys.exit(main(["run"]))
"""


@pytest.mark.parametrize("failure", ["malformed key file", "reload raises IndexError"])
def test_a_reload_that_fails_keeps_the_daemon_running(
    base: dict[str, object], endpoint: str, tmp_path: Path, failure: str
) -> None:
    """SIGHUP, and reading the allow-list fails: with a key file whose ``public-key`` line has no '=' (pyzmq's
    parser raised IndexError on it, where other damage is a ValueError), or with a reload that raises something
    no one foresaw. An error in the log, READY=1, events still going out, and SIGTERM still a clean exit 0:
    it used to take the daemon down mid-inference."""
    import sys

    listener = NotifyListener(tmp_path / "notify.sock")
    settings = {**base, "publish.wait_subscribers": 0, "source.loop": True, "source.fps": 20}
    if failure == "malformed key file":
        curve, clients, allowed = curve_allow_list(tmp_path)
        settings.update(curve)
        argv = None  # eyed run
    else:
        allowed = None
        argv = [sys.executable, "-c", RELOAD_RAISES]
    proc = start_daemon(settings, command=argv, NOTIFY_SOCKET=str(listener.path))
    with reaped(proc, listener):
        listener.wait_for("READY=1", 60)
        if failure == "malformed key file":
            (clients / "bad.key").write_text('metadata\ncurve\n    public-key: "x"\n')
        proc.send_signal(signal.SIGHUP)
        listener.wait_for("READY=1", 10, after=listener.wait_for("RELOADING=1", 10))
        time.sleep(1.0)
        assert proc.poll() is None, finish(proc)[1]
        with Subscriber(endpoint, ("label.",), allowed) as sub:
            seqs = [sub.receive(20)[1]["seq"] for _ in range(3)]
        assert seqs == list(range(seqs[0], seqs[0] + 3))
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        code, err = finish(proc)
        listener.wait_for("STOPPING=1", 5)
    assert code == 0, err
    assert "SIGHUP: " in err and "the previous allow-list stays in force" in err


def test_reload_now_survives_any_exception(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Whatever a reload raises, not only CurveError, is logged as an error and READY=1 still follows."""
    from eyed.daemon import reload_now
    from eyed.sdnotify import Notifier

    class BrokenPublisher:
        def reload_clients(self) -> int | None:
            raise RuntimeError("nobody saw this coming")

    listener = NotifyListener(tmp_path / "notify.sock")
    try:
        with Notifier({"NOTIFY_SOCKET": str(listener.path)}) as notifier:
            reload = threading.Event()
            reload.set()
            with caplog.at_level(logging.ERROR, logger="eyed.daemon"):
                reload_now(reload, notifier, BrokenPublisher())  # type: ignore[arg-type]
            listener.wait_for("READY=1", 5, after=listener.wait_for("RELOADING=1", 5))
    finally:
        listener.close()
    assert "RuntimeError: nobody saw this coming" in caplog.text
    assert "previous allow-list stays in force" in caplog.text
    assert not reload.is_set()


def inference_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("eyed-infer") and t.is_alive()]


def test_an_exception_in_the_main_loop_ends_the_workers_before_closing_what_they_use(
    tiny_dataset: Path, tiny_onnx: Path, endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever escapes the main thread's loop (here from the supervisor's tick) unwinds run()'s ExitStack:
    the inference workers are stopped and joined first, with STOPPING=1 and a last health event, and only then
    do the publisher and the model close. Closed under running workers, they made the workers fail, and
    onnxruntime could abort the process."""
    import eyed.daemon
    from eyed.config import load_settings
    from eyed.publisher import Publisher

    closed: list[tuple[str, list[str]]] = []

    class RecordingPublisher(Publisher):
        def __exit__(self, *exc: Any) -> None:
            closed.append(("publisher", inference_threads()))
            super().__exit__(*exc)

    real_load = eyed.daemon.load_classifier

    def load(cfg: Any) -> Any:
        classifier = real_load(cfg)
        real_close = classifier.close

        def close() -> None:
            closed.append(("classifier", inference_threads()))
            real_close()

        monkeypatch.setattr(classifier, "close", close)
        return classifier

    ticks = [0]

    def failing_tick(self: Any, waiting: bool = False) -> None:
        ticks[0] += 1
        if ticks[0] == 3:
            raise RuntimeError("tick failed")

    monkeypatch.setattr(eyed.daemon, "Publisher", RecordingPublisher)
    monkeypatch.setattr(eyed.daemon, "load_classifier", load)
    monkeypatch.setattr(eyed.daemon.Supervisor, "tick", failing_tick)
    monkeypatch.setattr(eyed.daemon.Supervisor, "tick_s", 0.2)
    listener = NotifyListener(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(listener.path))
    settings = load_settings(
        None,
        [
            f"source.dataset={tiny_dataset}",
            "source.split=train",
            "source.loop=true",
            "source.id=tiny",
            f"model.onnx={tiny_onnx}",
            "model.workers=2",
            f"publish.endpoint={endpoint}",
            "publish.heartbeat_s=0.2",
        ],
    )
    raised: list[BaseException] = []

    def target() -> None:
        try:
            eyed.daemon.run(settings)
        except BaseException as exc:
            raised.append(exc)

    try:
        with Subscriber(endpoint, ("health.",)) as sub:
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            thread.join(30)
            assert not thread.is_alive()
            states = []
            with contextlib.suppress(TimeoutError):
                while True:
                    states.append(sub.receive(0.5)[1]["state"])
        assert [str(e) for e in raised] == ["tick failed"]
        assert closed == [("publisher", []), ("classifier", [])]
        assert "live" in states and states[-1] == "stopped", states
        listener.wait_for("STOPPING=1", 5)
    finally:
        listener.close()


def test_a_cache_dir_outside_the_units_cache_folder_is_warned_about(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The unit no longer overrides model.cache_dir: a file that sets it elsewhere would fail its first export
    under ProtectSystem=strict, and says so at start instead of only failing."""
    from eyed.config import load_settings
    from eyed.daemon import note_cache_outside_unit

    unit = tmp_path / "var-cache-eyed"
    unit.mkdir()
    monkeypatch.setenv("CACHE_DIRECTORY", str(unit))
    with caplog.at_level(logging.WARNING, logger="eyed.daemon"):
        note_cache_outside_unit(load_settings(None, []))  # the default: the unit's folder
        note_cache_outside_unit(load_settings(None, [f"model.cache_dir={unit}/sub"]))
        assert not caplog.records
        note_cache_outside_unit(load_settings(None, ["model.cache_dir=~/.cache/eyed"]))
    assert len(caplog.records) == 1 and "outside the service's cache folder" in caplog.records[0].message


# A pipeline failure must be exit 1: with 0, the unit's Restart=on-failure would leave the service down.
class BrokenSource(MemorySource):
    def frames(self, stop: threading.Event | None = None) -> Any:
        yield from list(super().frames(stop))[:3]
        raise OSError("camera unplugged")


def test_a_pipeline_failure_exits_1(tiny_onnx: Path, endpoint: str, monkeypatch: Any) -> None:
    import eyed.daemon

    monkeypatch.setattr(eyed.daemon, "open_source", lambda cfg, startup: BrokenSource(synthetic_images(5)))
    settings = load_settings(None, [f"model.onnx={tiny_onnx}", f"publish.endpoint={endpoint}"])
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(eyed.daemon.run(settings)), daemon=True)
    t.start()
    t.join(60)
    assert result == [1]
