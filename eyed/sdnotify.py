"""systemd's notify protocol without a dependency: one datagram per message to ``$NOTIFY_SOCKET``.

``READY=1`` once the model is warm and the publisher bound, ``WATCHDOG=1`` while the pipeline makes progress,
``STATUS=`` with a one-line summary, ``STOPPING=1`` on shutdown. Outside systemd (no ``NOTIFY_SOCKET``) every
call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from types import TracebackType

logger = logging.getLogger(__name__)


class Notifier:
    """Sends notify messages; ``watchdog_s`` is the interval systemd expects pings at (None: no watchdog)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = self._address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_s = self._watchdog(env)
        self._sock: socket.socket | None = None

    @staticmethod
    def _address(raw: str) -> str | bytes | None:
        if not raw:
            return None
        if raw.startswith("@"):  # abstract namespace socket
            return b"\0" + raw[1:].encode()
        if raw.startswith("/"):
            return raw
        logger.warning("NOTIFY_SOCKET=%r is not a unix socket path; notifications disabled", raw)
        return None

    @staticmethod
    def _watchdog(env: Mapping[str, str]) -> float | None:
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if not usec:
            return None
        # systemd sets WATCHDOG_PID to the main process; a child that inherited the variables must not ping.
        if pid and pid != str(os.getpid()):
            return None
        try:
            value = int(usec)
        except ValueError:
            logger.warning("WATCHDOG_USEC=%r is not an integer; watchdog disabled", usec)
            return None
        return value / 1e6 if value > 0 else None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def __enter__(self) -> Notifier:
        if self.address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` (e.g. "READY=1", "STATUS=...") as one message; False if not sent."""
        if self._sock is None or self.address is None:
            return False
        message = "\n".join(f.replace("\n", " ") for f in fields).encode("utf-8")
        try:
            self._sock.sendto(message, self.address)
        except OSError as exc:  # systemd gone or socket full: never fatal for the daemon
            logger.debug("sd_notify failed: %s", exc)
            return False
        return True
