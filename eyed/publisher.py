"""The one PUB socket: multipart ``[topic, json]`` messages, never pixels.

It is an XPUB socket so that it can see subscriptions arrive: ``wait_for_subscribers`` returns once that many
peers have connected and subscribed, which is what defeats ZeroMQ's slow-joiner effect in replay runs. What
that wait watches (a monitor socket, every subscription message) is turned off once it is over: unread, it
would pile up with every connection a client or a port scan makes, and ZeroMQ stops sending when the monitor's
queue is full. Used by one thread only (ZeroMQ sockets are not thread-safe).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, TypeVar

import numpy as np
import orjson
import zmq
from zmq.utils.monitor import recv_monitor_message

from eyed.config import ConfigError, PublishConfig, endpoint_ipv6
from eyed.curve import CurveError, CurveServer, check_server_keys

logger = logging.getLogger(__name__)


_P = TypeVar("_P", bound="Publisher")
HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
# The largest message a subscriber may send: a subscription is a topic prefix ("label.door"). A peer sending
# more is disconnected by ZeroMQ, so nobody can park megabytes in the daemon.
MAX_INBOUND_BYTES = 4096
# How often, at most, subscriptions to new topics are read and dropped once nobody waits for them.
DISCARD_EVERY_S = 1.0


class PublishError(Exception):
    """The publisher could not start (bind failed, subscribers never came)."""


@contextlib.contextmanager
def _curve_config_errors() -> Iterator[None]:
    # An unusable key file is the configuration's fault: exit 78, which systemd does not restart.
    try:
        yield
    except CurveError as exc:
        raise ConfigError(f"publish.curve_secret_key / publish.curve_clients: {exc}") from exc


def check_curve(cfg: PublishConfig) -> int | None:
    """The CURVE key files as the publisher reads them at start, without starting anything: the number of
    allowed client keys (None without CURVE), or ConfigError with the daemon's own message."""
    if cfg.curve_secret_key is None or cfg.curve_clients is None:
        return None
    with _curve_config_errors():
        return check_server_keys(cfg.curve_secret_key, cfg.curve_clients)


def bind_error(endpoint: str, exc: zmq.ZMQError) -> Exception:
    """What a failed bind means: EINVAL is an endpoint ZeroMQ cannot parse, which no restart cures
    (ConfigError, exit 78); the rest (EADDRINUSE, ENODEV, a missing ipc folder) may heal (PublishError, 69)."""
    message = f"publish.endpoint {endpoint}: cannot bind: {exc}"
    return ConfigError(message) if exc.errno == errno.EINVAL else PublishError(message)


def check_ipc_free(endpoint: str) -> None:
    """PublishError if another process listens on an ipc:// endpoint's socket file: ZeroMQ would delete the
    file and bind anyway, leaving that process running but out of reach. A stale file (nobody listening, as
    after a crash) is left for ZeroMQ to replace."""
    transport, _, path = endpoint.partition("://")
    if transport != "ipc" or path.startswith("@") or not os.path.exists(path):
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        # A listener that does not accept (a wedged process) would block a connect for ever; with a timeout,
        # Linux says EAGAIN at once for its full backlog. Either way the path is held.
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (TimeoutError, BlockingIOError):
            pass
        except OSError:
            return
    raise PublishError(f"publish.endpoint {endpoint}: in use by another process (is eyed already running?)")


def encode(payload: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON; NaN and infinities are refused, as JSON has no such values.

    orjson, because the standard library's encoder cost 20-40 us per label event in the daemon's loop (cold
    caches right after an inference), a few percent of an INT8 frame; orjson with the check below costs a
    few. orjson itself would write a non-finite float as null, hence the check. numpy scalars are accepted
    (and checked) like Python floats and ints.
    """
    if not _finite(payload):
        raise ValueError("event payload holds a NaN or infinite number, which JSON cannot carry")
    return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)


# Types that hold no float.
_PLAIN = frozenset({str, int, bool, type(None)})


def _finite(payload: dict[str, Any]) -> bool:
    # Plain types are passed over by identity first: a label event holds about 30 values, most of them strings
    # and ints, and isinstance checks against every kind made this walk 7 us of the encoder's 7.2 (now 3).
    stack: list[Any] = [payload]
    while stack:
        value = stack.pop()
        if type(value) in _PLAIN:
            continue
        if isinstance(value, float | np.floating):
            if not math.isfinite(value):
                return False
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list | tuple):
            stack.extend(value)
        elif isinstance(value, np.ndarray) and value.dtype.kind in "fc" and not np.isfinite(value).all():
            return False
    return True


class Publisher:
    """Owns the socket. ``send`` never blocks: past ``publish.hwm`` queued messages, ZeroMQ drops the newest ones
    for that subscriber only (others are unaffected). The publisher cannot count those drops; subscribers see
    them as gaps in ``seq``.
    """

    def __init__(self, cfg: PublishConfig, context: zmq.Context[Any] | None = None) -> None:
        self.cfg = cfg
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.socket: zmq.Socket[Any] | None = None
        self._monitor: zmq.Socket[Any] | None = None
        self.sent = 0
        self.peers = 0
        self._failed_pending = 0
        self.subscriptions = 0
        self.endpoint = cfg.endpoint
        self._curve: CurveServer | None = None
        self._next_discard = 0.0
        self._waiting = False  # in wait_for_subscribers (whose tick may send health events)

    def __enter__(self: _P) -> _P:
        self._curve = self._start_curve()
        sock = self.context.socket(zmq.XPUB)
        if self._curve is not None:
            self._curve.apply(sock)
        sock.setsockopt(zmq.SNDHWM, self.cfg.hwm)
        sock.setsockopt(zmq.LINGER, self.cfg.linger_ms)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_INBOUND_BYTES)
        # Every subscription message reaches us, duplicates included, so counting them counts subscribers
        # (until the wait for them is over).
        sock.setsockopt(zmq.XPUB_VERBOSE, 1)
        if endpoint_ipv6(self.cfg.endpoint):
            sock.setsockopt(zmq.IPV6, 1)
        # Watch handshakes from before bind, so a subscriber that connects before anyone waits still counts.
        self._monitor = sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | HANDSHAKE_FAILED
        )
        try:
            check_ipc_free(self.cfg.endpoint)
            sock.bind(self.cfg.endpoint)
        except (zmq.ZMQError, PublishError) as exc:
            self._close(sock)
            self._stop_curve()
            raise (bind_error(self.cfg.endpoint, exc) if isinstance(exc, zmq.ZMQError) else exc) from exc
        self.socket = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT) or self.cfg.endpoint
        self._set_ipc_mode()
        logger.info("publishing on %s", self.endpoint)
        return self

    def _set_ipc_mode(self) -> None:
        """Give an ipc:// socket file ``publish.ipc_mode``. It is created with the process's umask (the unit's
        0027), and connecting takes write permission: other users' subscribers, which a tcp endpoint on the
        loopback lets in, would be shut out. An abstract socket (``ipc://@name``) has no file."""
        transport, _, path = self.cfg.endpoint.partition("://")
        if transport != "ipc" or path.startswith("@"):
            return
        mode = int(self.cfg.ipc_mode, 8)
        try:
            os.chmod(path, mode)
        except OSError as exc:
            logger.warning("publish.ipc_mode: cannot make %s %04o: %s", path, mode, exc)

    def _start_curve(self) -> CurveServer | None:
        cfg = self.cfg
        if cfg.curve_secret_key is None or cfg.curve_clients is None:
            return None
        with _curve_config_errors():
            return CurveServer(self.context, cfg.curve_secret_key, cfg.curve_clients).start()

    def reload_clients(self) -> int | None:
        """Read the CURVE allow-list again (SIGHUP); the number of allowed keys, or None without CURVE."""
        return self._curve.reload() if self._curve is not None else None

    def _stop_curve(self) -> None:
        if self._curve is not None:
            self._curve.stop()
            self._curve = None

    def _close(self, sock: zmq.Socket[Any]) -> None:
        self._stop_watching(sock)
        sock.close(linger=self.cfg.linger_ms)

    def _stop_watching(self, sock: zmq.Socket[Any]) -> None:
        """The wait for subscribers is over: no more monitor events, and subscriptions reach us only for topics
        no one had subscribed to, which ``send`` reads and drops now and then."""
        if self._monitor is None:
            return
        sock.disable_monitor()
        self._monitor.close(linger=0)
        self._monitor = None
        if not sock.closed:
            sock.setsockopt(zmq.XPUB_VERBOSE, 0)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.socket is not None:
            self._close(self.socket)
            self.socket = None
        self._stop_curve()
        if self._own_context:
            self.context.term()

    def send(self, topic: str, payload: dict[str, Any]) -> None:
        """Send one event without blocking."""
        assert self.socket is not None, "Publisher used outside its context manager"
        if self._monitor is not None and not self._waiting:  # an event before any wait: nobody will wait
            self._stop_watching(self.socket)
        if not self._waiting and (now := time.monotonic()) >= self._next_discard:
            self._next_discard = now + DISCARD_EVERY_S
            self.drain_subscriptions()
        # XPUB without XPUB_NODROP never raises EAGAIN: a full queue drops per subscriber instead.
        self.socket.send_multipart([topic.encode("utf-8"), encode(payload)], flags=zmq.NOBLOCK)
        self.sent += 1

    def _drain_monitor(self) -> None:
        assert self._monitor is not None
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.peers += 1
            elif event & HANDSHAKE_FAILED:
                # A failed handshake (a CURVE client whose key is refused; it does not retry) is followed by
                # a disconnect that is not a peer leaving; the monitor does not say which connection an event
                # is about, so the next disconnect is set against it. Only handshakes that succeeded count.
                self._failed_pending += 1
            elif event == zmq.EVENT_DISCONNECTED:
                if self._failed_pending:
                    self._failed_pending -= 1
                else:
                    self.peers -= 1

    def drain_subscriptions(self) -> int:
        """Read pending (un)subscription messages; returns the net count of new subscriptions."""
        assert self.socket is not None
        net = 0
        while self.socket.poll(0, zmq.POLLIN):
            msg = self.socket.recv()
            if msg[:1] == b"\x01":
                net += 1
            elif msg[:1] == b"\x00":
                net -= 1
        self.subscriptions += net
        return net

    def wait_for_subscribers(
        self, count: int, timeout_s: float, stop: Any = None, tick: Callable[[], None] | None = None
    ) -> None:
        """Block until ``count`` peers have connected and subscribed; PublishError after ``timeout_s``.

        ``stop`` (a threading.Event) ends the wait early without an error; ``tick`` is called a few times a
        second meanwhile (the daemon pings systemd's watchdog from it).
        """
        assert self.socket is not None
        if count > 0 and self._monitor is None:
            raise RuntimeError("wait_for_subscribers: once, before the first event")
        self._waiting = True
        try:
            self._wait(count, timeout_s, stop, tick)
        finally:
            self._waiting = False
            self._stop_watching(self.socket)

    def _wait(self, count: int, timeout_s: float, stop: Any, tick: Callable[[], None] | None) -> None:
        if count <= 0:
            return
        assert self.socket is not None and self._monitor is not None
        deadline = time.monotonic() + timeout_s
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        logger.info("waiting for %d subscriber(s) on %s", count, self.endpoint)
        while True:
            self._drain_monitor()
            self.drain_subscriptions()
            if self.peers >= count and self.subscriptions >= count:
                break
            if stop is not None and stop.is_set():
                return
            if tick is not None:
                tick()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PublishError(
                    f"publish.wait_subscribers={count}: only {min(self.peers, self.subscriptions)} subscriber(s) "
                    f"on {self.endpoint} after publish.wait_timeout_s={timeout_s:g}"
                )
            poller.poll(int(min(remaining, 0.2) * 1000))
        logger.info("%d subscriber(s) connected", self.peers)
