"""systemd notification against a real unix datagram socket as NOTIFY_SOCKET."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from eyed.config import load_settings
from eyed.logs import JournalFormatter
from eyed.sdnotify import Notifier
from tests.conftest import BUSY_DATASETS, fake_datasets_package
from tests.daemon_helpers import NotifyListener, daemon_env, finish, journal_stream


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    lst = NotifyListener(tmp_path / "notify.sock")
    yield lst
    lst.close()


class DaemonThread:
    """``eyed.daemon.run`` in a thread of this process, notifying ``listener`` (with a watchdog, if given)."""

    def __init__(
        self, settings: Any, listener: NotifyListener, monkeypatch: pytest.MonkeyPatch, watchdog_usec: int = 0
    ) -> None:
        import eyed.daemon

        monkeypatch.setenv("NOTIFY_SOCKET", str(listener.path))
        if watchdog_usec:
            monkeypatch.setenv("WATCHDOG_USEC", str(watchdog_usec))
            monkeypatch.delenv("WATCHDOG_PID", raising=False)
        self.stop = threading.Event()
        self.result: list[int] = []
        self._thread = threading.Thread(
            target=lambda: self.result.append(eyed.daemon.run(settings, self.stop)), daemon=True
        )
        self._thread.start()

    def end(self) -> list[int]:
        """Stop it; what ``run`` returned ([] if it did not return within 15 s)."""
        self.stop.set()
        self._thread.join(15)
        return self.result


def test_notifier_reads_the_environment_like_systemd_sets_it() -> None:
    pid = str(os.getpid())
    n = Notifier({"NOTIFY_SOCKET": "/run/x.sock", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": pid})
    assert n.address == "/run/x.sock" and n.watchdog_s == 2.0
    assert Notifier({"NOTIFY_SOCKET": "@abstract"}).address == b"\0abstract"
    # The variables were meant for another process (a parent that spawned us): no pings from here.
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}).watchdog_s is None
    assert Notifier({}).enabled is False and Notifier({}).watchdog_s is None
    with Notifier({}) as quiet:
        assert quiet.notify("READY=1") is False


def test_ready_watchdog_status_then_stopping_after_sigterm(
    listener: NotifyListener, tiny_dataset: Path, tiny_onnx: Path, endpoint: str
) -> None:
    env = daemon_env(
        {
            "source.dataset": tiny_dataset,
            "source.split": "train",
            "source.loop": True,
            "source.fps": 50,
            "model.onnx": tiny_onnx,
            "publish.endpoint": endpoint,
            "publish.heartbeat_s": 0.5,
        },
        NOTIFY_SOCKET=str(listener.path),
        WATCHDOG_USEC="1000000",
    )
    # As systemd does: WATCHDOG_PID is the service's main pid (exec keeps the shell's pid).
    proc = subprocess.Popen(
        ["sh", "-c", f'WATCHDOG_PID=$$ exec "{sys.executable}" -m eyed run'],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ready = listener.wait_for("READY=1", 60)
    time.sleep(2.5)
    pings = [t for t, fs in listener.messages if "WATCHDOG=1" in fs and t > ready]
    assert len(pings) >= 3, listener.fields()
    assert max(b - a for a, b in zip([ready, *pings], pings, strict=False)) < 1.0  # within WATCHDOG_USEC
    assert any(f.startswith("STATUS=live:") and "fps" in f for f in listener.fields())
    first_watchdog = next(i for i, f in enumerate(listener.fields()) if f == "WATCHDOG=1")
    assert listener.fields().index("READY=1") < first_watchdog
    # SIGHUP is a reload, not the end: RELOADING=1, then READY=1 again, and the daemon keeps going.
    proc.send_signal(signal.SIGHUP)
    reloading = listener.wait_for("RELOADING=1", 5)
    assert any(f.startswith("MONOTONIC_USEC=") for _, fs in listener.messages for f in fs)
    listener.wait_for("READY=1", 5, after=reloading)
    time.sleep(1.0)
    assert proc.poll() is None
    assert any("WATCHDOG=1" in fs and t > reloading for t, fs in listener.messages)
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc, timeout_s=15)
    assert code == 0, err
    listener.wait_for("STOPPING=1", 5)
    assert "SIGHUP: nothing to reload without CURVE" in err


class HangingClassifier:
    """The real tiny classifier, except that predict blocks forever after ``after`` calls (a hung runtime)."""

    def __init__(self, inner: Any, after: int) -> None:
        self.inner, self.after = inner, after
        self.name, self.backend = inner.name, inner.backend
        self.prepare, self.input_shape = inner.prepare, inner.input_shape
        self.calls = 0
        self.hung = threading.Event()
        self.release = threading.Event()

    def predict(self, batch: np.ndarray) -> Any:
        self.calls += 1
        if self.calls > self.after:
            self.hung.set()
            self.release.wait(30)
        return self.inner.predict(batch)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def looped_replay(tiny_dataset: Path, tiny_onnx: Path, endpoint: str) -> list[str]:
    """Overrides for a looped replay of the tiny dataset through the tiny model."""
    return [
        f"source.dataset={tiny_dataset}",
        "source.split=train",
        "source.loop=true",
        f"model.onnx={tiny_onnx}",
        f"publish.endpoint={endpoint}",
    ]


def test_watchdog_pings_stop_when_the_inference_loop_is_stuck(
    listener: NotifyListener, looped_replay: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import eyed.daemon
    from eyed.model import load_classifier

    settings = load_settings(None, [*looped_replay, "source.fps=50"])
    hanging = HangingClassifier(load_classifier(settings.model), after=20)
    monkeypatch.setattr(eyed.daemon, "load_classifier", lambda cfg: hanging)
    daemon = DaemonThread(settings, listener, monkeypatch, watchdog_usec=400_000)
    listener.wait_for("READY=1", 30)
    assert hanging.hung.wait(30)
    hung_at = time.monotonic()
    before = [t for t, fs in listener.messages if "WATCHDOG=1" in fs and t < hung_at]
    assert len(before) >= 2
    time.sleep(1.5)
    # Pings may go on for at most one watchdog window after the loop's last turn, then must stop.
    late = [t for t, fs in listener.messages if "WATCHDOG=1" in fs and t > hung_at + 0.5]
    assert late == []
    hanging.release.set()
    assert daemon.end() == [0]
    listener.wait_for("STOPPING=1", 5)


def test_watchdog_keeps_pinging_while_a_slow_pace_waits(
    listener: NotifyListener, looped_replay: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replay paced slower than the watchdog (a frame every 4 s, WatchdogSec=2) waits on purpose between
    frames: systemd must not take that for a hang and kill it."""
    settings = load_settings(None, [*looped_replay, "source.fps=0.25", "publish.heartbeat_s=0.5"])
    daemon = DaemonThread(settings, listener, monkeypatch, watchdog_usec=2_000_000)
    ready = listener.wait_for("READY=1", 30)
    time.sleep(9.0)  # the first frame at once, then two waits of 4 s
    assert daemon.end() == [0]
    pings = [t for t, fs in listener.messages if "WATCHDOG=1" in fs and ready < t < ready + 9.0]
    # Pings every second (half the watchdog); without counting the wait, none for 4 s.
    assert max(b - a for a, b in zip([ready, *pings], pings, strict=False)) < 2.0, pings
    # It was pacing, not stuck: frames went on coming.
    statuses = [f.split()[1] for f in listener.fields() if f.startswith("STATUS=live:")]
    assert max(int(n) for n in statuses) >= 2, listener.fields()


def test_a_slow_but_working_start_asks_systemd_for_more_time(
    listener: NotifyListener,
    tiny_dataset: Path,
    tiny_onnx: Path,
    endpoint: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A replay waiting for datasets to walk a large folder extends the unit's start timeout as it goes; a stop
    ends the wait, cleanly, before READY=1."""
    import eyed.daemon
    from eyed.sources import dataset_info

    settings = load_settings(
        None, [f"source.dataset={tiny_dataset}", f"model.onnx={tiny_onnx}", f"publish.endpoint={endpoint}"]
    )
    monkeypatch.setattr(dataset_info, "datasets_imported", lambda: False)
    monkeypatch.setattr(dataset_info, "CHILD_REPORT_S", 0.3)
    monkeypatch.setenv("PYTHONPATH", fake_datasets_package(tmp_path, BUSY_DATASETS))
    daemon = DaemonThread(settings, listener, monkeypatch)
    extension = f"EXTEND_TIMEOUT_USEC={int(eyed.daemon.START_EXTEND_S * 1e6)}"
    first = listener.wait_for(extension, 30)
    listener.wait_for(extension, 5, after=first + 0.1)  # again, while the wait goes on
    statuses = [f for f in listener.fields() if f.startswith("STATUS=waiting for datasets to describe")]
    assert statuses and all(str(tiny_dataset) in f for f in statuses)
    assert daemon.end() == [0]
    listener.wait_for("STOPPING=1", 5)
    assert "READY=1" not in listener.fields()


def test_journal_formatter_prefixes_every_line_with_the_priority() -> None:
    fmt = JournalFormatter()
    record = logging.LogRecord("eyed.x", logging.ERROR, __file__, 1, "boom %s", ("now",), None)
    assert fmt.format(record) == "<3>eyed.x: boom now"
    try:
        raise ValueError("bad")
    except ValueError:
        record = logging.LogRecord("eyed.x", logging.WARNING, __file__, 1, "oops", (), sys.exc_info())
    lines = fmt.format(record).splitlines()
    assert len(lines) > 2 and all(line.startswith("<4>") for line in lines)


def test_journal_stream_drops_timestamps(tiny_dataset: Path, tiny_onnx: Path, endpoint: str) -> None:
    env = daemon_env(
        {
            "source.dataset": tiny_dataset,
            "source.split": "train",
            "model.onnx": tiny_onnx,
            "publish.endpoint": endpoint,
        },
    )
    with journal_stream() as (stderr, journal):
        proc = subprocess.Popen(
            [sys.executable, "-m", "eyed", "run"], env={**env, **journal}, stdout=subprocess.DEVNULL, stderr=stderr
        )
        code = proc.wait(60)
        stderr.seek(0)
        err = stderr.read()
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.startswith("<")]
    assert any(line.startswith("<6>eyed.pipeline: health source=") for line in lines)
    assert not any(line[:4].isdigit() for line in err.splitlines())


# Only inference progress feeds the watchdog at fps 0 and for cameras (the pace timer did in every other test).
def test_watchdog_keeps_pinging_on_an_unpaced_replay(listener: Any, looped_replay: list[str], monkeypatch: Any) -> None:
    settings = load_settings(None, [*looped_replay, "source.fps=0"])
    daemon = DaemonThread(settings, listener, monkeypatch, watchdog_usec=1_000_000)
    ready = listener.wait_for("READY=1", 30)
    time.sleep(3.5)
    end = time.monotonic()
    assert daemon.end() == [0]
    pings = [t for t, fs in listener.messages if "WATCHDOG=1" in fs and ready < t < end]
    gaps = [b - a for a, b in zip([ready, *pings], [*pings, end], strict=True)]
    # Pings every 0.5 s; 2 s of slack for a loaded machine (the bug stops them for good: 2.7 s, then none).
    assert len(pings) >= 3 and max(gaps) < 2.0, gaps


# A newline in a field would start another notify field (STATUS=...\nWATCHDOG=1).
def test_a_newline_in_a_field_stays_in_that_field(tmp_path: Path) -> None:
    path = tmp_path / "n.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(str(path))
        with Notifier({"NOTIFY_SOCKET": str(path)}) as n:
            assert n.notify("STATUS=a\nWATCHDOG=1")
        assert srv.recv(4096) == b"STATUS=a WATCHDOG=1"
