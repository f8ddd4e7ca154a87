"""A SUB client for eyed's events, used by ``eyed subscribe``, ``eyed health`` and the tests."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import zmq

from eyed.config import endpoint_ipv6
from eyed.curve import apply_client

# ZeroMQ's poll takes its timeout in milliseconds as a C int: about 24.8 days.
MAX_TIMEOUT_S = (2**31 - 1) // 1000


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
            sock.connect(self.endpoint)
        except BaseException:
            sock.close(linger=0)
            self.context.term()
            raise
        self.socket = sock
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.socket is not None:
            self.socket.close(linger=0)
            self.socket = None
        self.context.term()

    def receive(self, timeout_s: float) -> tuple[str, dict[str, Any]]:
        """The next event; TimeoutError when none arrives within ``timeout_s``."""
        assert self.socket is not None, "Subscriber used outside its context manager"
        # poll waits for ever on a negative timeout and overflows past MAX_TIMEOUT_S.
        if not (math.isfinite(timeout_s) and 0 <= timeout_s <= MAX_TIMEOUT_S):
            raise ValueError(f"timeout {timeout_s!r} s: expected 0 to {MAX_TIMEOUT_S} s")
        deadline = time.monotonic() + timeout_s
        while self.socket.poll(max(0, int((deadline - time.monotonic()) * 1000)), zmq.POLLIN):
            parts = self.socket.recv_multipart()
            event = parse_event(parts)
            if isinstance(event, tuple):
                return event
            self.malformed += 1
            self.first_malformed = self.first_malformed or event
        raise TimeoutError(f"no event from {self.endpoint} within {timeout_s:g} s")


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
