"""End-to-end latency (frame read -> event published) and reconnect time of the daemon on a real RTSP stream.

Starts GStreamer's RTSP server on loopback (tests/rtsp_server.py, system Python with python3-gi), runs
`eyed run` on it with the real MobileNetV2 from $EYED_SHARED, records events for a while, kills the server,
restarts it and reports latency p50/p99 and the time from restart to the first new label event.

    .venv/bin/python benchmarks/rtsp_latency.py [--seconds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import numpy as np
from assets import cached_model

from eyed.subscriber import Subscriber

ROOT = Path(__file__).resolve().parent.parent
# How long the daemon may take to its first event (the model loads, the stream opens), and to its first event
# after the server restarts (the reconnect backoff tops out at 1 s here).
FIRST_EVENT_S = 120.0
RECONNECT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(port: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        ["/usr/bin/python3", str(ROOT / "tests" / "rtsp_server.py"), str(port)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


class StderrTail:
    """The last lines a child process writes to stderr, read as they come (a full pipe would block the child)."""

    def __init__(self, proc: subprocess.Popen[str], lines: int = 30) -> None:
        self.lines: deque[str] = deque(maxlen=lines)
        self._reader = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._reader.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        for line in proc.stderr or ():
            self.lines.append(line)

    def text(self, wait_s: float = 0.0) -> str:
        """The lines so far; after the child exited, wait up to ``wait_s`` for the pipe's last ones."""
        self._reader.join(wait_s)
        return "".join(self.lines).rstrip()


def wait_until(
    done: Callable[[], bool], daemon: subprocess.Popen[str], tail: StderrTail, timeout_s: float, what: str
) -> None:
    """Poll ``done`` until it is true; RuntimeError with the daemon's last words if it exits first, TimeoutError
    after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if daemon.poll() is not None:
            raise RuntimeError(f"the daemon exited {daemon.returncode} before {what}:\n{tail.text(wait_s=5)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not come within {timeout_s:g} s; the daemon's last lines:\n{tail.text()}")
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    _, model = cached_model()
    port, endpoint = free_port(), f"tcp://127.0.0.1:{free_port()}"
    server = start_server(port)
    env = {**os.environ, **model}
    env.update(
        EYED_SOURCE__KIND="rtsp",
        EYED_SOURCE__URL=f"rtsp://127.0.0.1:{port}/test",
        EYED_SOURCE__RECONNECT_INITIAL_S="0.2",
        EYED_SOURCE__RECONNECT_MAX_S="1",
        EYED_PUBLISH__ENDPOINT=endpoint,
        EYED_PUBLISH__WAIT_SUBSCRIBERS="1",
    )
    daemon = subprocess.Popen([sys.executable, "-m", "eyed", "run"], env=env, stderr=subprocess.PIPE, text=True)
    tail = StderrTail(daemon)
    events: list[tuple[float, dict[str, object]]] = []
    halt = threading.Event()

    def record() -> None:
        with Subscriber(endpoint, ("label.",)) as sub:
            while not halt.is_set():
                try:
                    events.append((time.monotonic(), sub.receive(0.2)[1]))
                except TimeoutError:
                    continue

    threading.Thread(target=record, daemon=True).start()
    try:
        wait_until(lambda: bool(events), daemon, tail, FIRST_EVENT_S, "the first event")
        time.sleep(args.seconds)
        server.kill()
        server.wait()
        time.sleep(2)
        restarted = time.monotonic()
        server = start_server(port)
        wait_until(
            lambda: any(t > restarted for t, _ in events), daemon, tail, RECONNECT_S, "an event after the restart"
        )
        back = min(t for t, _ in events if t > restarted) - restarted
        time.sleep(3)
    finally:
        halt.set()
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        server.kill()
    lat = np.array([float(e["latency_ms"]) for _, e in events])  # type: ignore[arg-type]
    seqs = [int(e["seq"]) for _, e in events]  # type: ignore[call-overload]
    print(
        json.dumps(
            {
                "events": len(events),
                "seq_gapless": seqs == list(range(len(seqs))),
                "latency_p50_ms": round(float(np.percentile(lat, 50)), 2),
                "latency_p99_ms": round(float(np.percentile(lat, 99)), 2),
                "reconnect_s": round(back, 2),
                "daemon_exit": daemon.returncode,
            }
        )
    )


if __name__ == "__main__":
    main()
