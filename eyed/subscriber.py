"""A SUB client for eyed's events, used by ``eyed subscribe``, ``eyed health`` and the tests."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from eyed.config import endpoint_ipv6
from eyed.curve import apply_client

# ZeroMQ's poll takes its timeout in milliseconds as a C int: about 24.8 days.
MAX_TIMEOUT_S = (2**31 - 1) // 1000
MONITOR_READ_EVERY_S = 1.0
# What the connection's monitor reports until the first event: enough to say why none came.
WATCHED = (
    zmq.EVENT_CONNECTED
    | zmq.EVENT_CONNECT_RETRIED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


class Subscriber:
    """Connects to ``endpoint`` and receives ``(topic, payload)``; ``receive`` raises TimeoutError.

    ``curve`` = (this subscriber's NAME.key_secret, the daemon's public NAME.key) for a daemon with CURVE on.
    A message that is not an event (not a topic and a JSON object: another program's publisher on the endpoint)
    is skipped and counted in ``malformed``; ``first_malformed`` says what the first one was.
    """

    def __init__(self, endpoint: str, topics: tuple[str, ...] = ("",), curve: tuple[Path, Path] | None = None) -> None:
        self.endpoint = endpoint
        self.topics = topics
        self.curve = curve
        self.context: zmq.Context[Any] = zmq.Context()
        self.socket: zmq.Socket[Any] | None = None
        self.malformed = 0
        self.first_malformed: str | None = None
        self.problem: str | None = None  # why no event may have come, as far as the connection tells
        self._monitor: zmq.Socket[Any] | None = None
        self._connected = False

    def __enter__(self) -> Subscriber:
        sock = self.context.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 100000)
        if endpoint_ipv6(self.endpoint):
            sock.setsockopt(zmq.IPV6, 1)
        for topic in self.topics:
            sock.setsockopt_string(zmq.SUBSCRIBE, topic)
        try:
            if self.curve is not None:
                apply_client(sock, *self.curve)
            self._monitor = sock.get_monitor_socket(WATCHED)
            sock.connect(self.endpoint)
        except BaseException:
            self.socket = sock
            self._close()
            raise
        self.socket = sock
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._close()

    def _close(self) -> None:
        self._stop_watching()
        if self.socket is not None:
            self.socket.close(linger=0)
            self.socket = None
        self.context.term()

    def _stop_watching(self) -> None:
        """After the first event, the connection's story is told: a monitor left unread would fill up and hold
        back ZeroMQ's I/O thread."""
        if self._monitor is None:
            return
        if self.socket is not None:
            self.socket.disable_monitor()
        self._monitor.close(linger=0)
        self._monitor = None

    def _read_monitor(self) -> None:
        """Update :attr:`problem` from what the connection went through since the last look."""
        while self._monitor is not None and self._monitor.poll(0):
            message = recv_monitor_message(self._monitor)
            self._note(message["event"], message["value"])

    def _note(self, event: int, value: int) -> None:
        curve = self.curve is not None
        if event == zmq.EVENT_CONNECTED:
            self._connected = True
            self.problem = None
        elif event == zmq.EVENT_CONNECT_RETRIED and not self._connected:
            self.problem = "nothing accepts connections there (is the daemon running, with this publish.endpoint?)"
        elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.problem = None
        elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            self.problem = (
                "the daemon refused this subscriber's CURVE key: put its public key (NAME.key) in the daemon's "
                "publish.curve_clients folder, then reload the daemon"
            )
        elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            self.problem = (
                "the daemon does not use CURVE: leave out --curve-key and --server-key"
                if curve
                else "the daemon uses CURVE: give --curve-key and --server-key"
            )
        elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            self.problem = f"the handshake failed (ZMTP protocol error {value:#x})"
        elif event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and self.problem is None:
            self.problem = (
                "the CURVE handshake failed: is --server-key the daemon's public key?"
                if curve
                else "the handshake failed: does the daemon use CURVE (--curve-key and --server-key)?"
            )

    def receive(self, timeout_s: float) -> tuple[str, dict[str, Any]]:
        """The next event; TimeoutError when none arrives within ``timeout_s``."""
        assert self.socket is not None, "Subscriber used outside its context manager"
        # poll waits for ever on a negative timeout and overflows past MAX_TIMEOUT_S.
        if not (math.isfinite(timeout_s) and 0 <= timeout_s <= MAX_TIMEOUT_S):
            raise ValueError(f"timeout {timeout_s!r} s: expected 0 to {MAX_TIMEOUT_S} s")
        deadline = time.monotonic() + timeout_s
        while True:
            left = max(0.0, deadline - time.monotonic())
            # While the monitor runs, it is read at least every second: left unread, it would fill.
            wait = min(left, MONITOR_READ_EVERY_S) if self._monitor is not None else left
            if self.socket.poll(int(wait * 1000), zmq.POLLIN):
                event = parse_event(self.socket.recv_multipart())
                if isinstance(event, tuple):
                    self._stop_watching()
                    self.problem = None
                    return event
                self.malformed += 1
                self.first_malformed = self.first_malformed or event
                continue
            self._read_monitor()
            if wait >= left:
                break
        problem = f": {self.problem}" if self.problem else ""
        raise TimeoutError(f"no event from {self.endpoint} within {timeout_s:g} s{problem}")


def parse_event(parts: list[bytes]) -> tuple[str, dict[str, Any]] | str:
    """(topic, payload) from one message, or what is wrong with it."""
    if len(parts) != 2:
        return f"a message of {len(parts)} parts, not 2 (topic, JSON)"
    try:
        topic, payload = parts[0].decode("utf-8"), json.loads(parts[1])
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError both are
        return f"a message that is not a topic and JSON ({exc})"
    if not isinstance(payload, dict):
        return f"topic {topic!r}: a payload that is not a JSON object"
    return topic, payload
