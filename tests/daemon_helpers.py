"""Run the real daemon as a subprocess and collect its events with a real SUB socket."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from eyed.subscriber import Subscriber


def daemon_env(settings: dict[str, Any], **extra: str) -> dict[str, str]:
    """The environment for ``eyed run``: ``{"source.limit": 5}`` becomes ``EYED_SOURCE__LIMIT=5``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EYED_")}
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_DATASETS_OFFLINE"] = "1"
    for key, value in settings.items():
        section, field = key.split(".")
        env[f"EYED_{section.upper()}__{field.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    env.update(extra)
    return env


@contextlib.contextmanager
def journal_stream() -> Iterator[tuple[IO[str], dict[str, str]]]:
    """A file to hand a child as its stderr, and the environment systemd sets when a service's stderr is the
    journal: JOURNAL_STREAM naming that very stream (device:inode). Read it back after the child is gone."""
    with tempfile.TemporaryFile("w+", encoding="utf-8") as stream:
        st = os.fstat(stream.fileno())
        yield stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def start_daemon(
    settings: dict[str, Any],
    *args: str,
    cwd: Path | None = None,
    command: Sequence[str] | None = None,
    **extra: str,
) -> subprocess.Popen[str]:
    """``eyed run *args`` (or ``command``, a script that runs it its own way) with ``settings`` in its
    environment."""
    return subprocess.Popen(
        [*(command or [sys.executable, "-m", "eyed", "run"]), *args],
        env=daemon_env(settings, **extra),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def collect(
    endpoint: str, until_type: str = "health", until_state: str = "finished", timeout_s: float = 60.0
) -> list[tuple[str, dict[str, Any]]]:
    """Subscribe to everything on ``endpoint`` until a health event with ``until_state`` (or time out)."""
    events: list[tuple[str, dict[str, Any]]] = []
    deadline = time.monotonic() + timeout_s
    with Subscriber(endpoint) as sub:
        while time.monotonic() < deadline:
            try:
                topic, payload = sub.receive(max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                break
            events.append((topic, payload))
            if payload.get("type") == until_type and payload.get("state") == until_state:
                break
    return events


def finish(proc: subprocess.Popen[str], timeout_s: float = 30.0) -> tuple[int, str]:
    """Wait for the daemon to exit; returns (exit code, stderr)."""
    try:
        _, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"daemon did not exit within {timeout_s} s; stderr:\n{err}") from None
    return proc.returncode, err


@contextlib.contextmanager
def reaped(proc: subprocess.Popen[str], listener: NotifyListener) -> Iterator[subprocess.Popen[str]]:
    """``proc``, killed if a failed assertion leaves it running, and ``listener`` closed, on the way out."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        listener.close()


class NotifyListener:
    """A bound AF_UNIX datagram socket collecting (monotonic time, fields) of every message."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, list[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode().split("\n")))

    def fields(self) -> list[str]:
        return [f for _, fs in list(self.messages) for f in fs]

    def wait_for(self, field: str, timeout_s: float, after: float = 0.0) -> float:
        """The time ``field`` was first received at or after ``after`` (monotonic); waits up to ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for t, fs in list(self.messages):
                if field in fs and t >= after:
                    return t
            time.sleep(0.02)
        raise AssertionError(f"no {field} within {timeout_s} s; got {self.fields()}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
