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
from pathlib import Path

import numpy as np

from eyed.subscriber import Subscriber

ROOT = Path(__file__).resolve().parent.parent


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    shared = Path(os.environ.get("EYED_SHARED", ROOT.parent / "shared"))
    port, endpoint = free_port(), f"tcp://127.0.0.1:{free_port()}"
    server = start_server(port)
    env = dict(os.environ)
    env.update(
        EYED_SOURCE__KIND="rtsp",
        EYED_SOURCE__URL=f"rtsp://127.0.0.1:{port}/test",
        EYED_SOURCE__RECONNECT_INITIAL_S="0.2",
        EYED_SOURCE__RECONNECT_MAX_S="1",
        EYED_MODEL__ID=str(shared / "models" / "mobilenet_v2_1.0_224"),
        EYED_MODEL__CACHE_DIR=str(ROOT / ".cache" / "eyed"),
        EYED_PUBLISH__ENDPOINT=endpoint,
        EYED_PUBLISH__WAIT_SUBSCRIBERS="1",
    )
    daemon = subprocess.Popen([sys.executable, "-m", "eyed", "run"], env=env, stderr=subprocess.DEVNULL)
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
        while not events:
            time.sleep(0.1)
        time.sleep(args.seconds)
        server.kill()
        server.wait()
        time.sleep(2)
        restarted = time.monotonic()
        server = start_server(port)
        while not any(t > restarted for t, _ in events):
            time.sleep(0.05)
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
