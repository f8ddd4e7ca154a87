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
import stat
import time
from collections.abc import Callable, Iterator, Sequence
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
# Subscription messages ZeroMQ takes in from one peer at a time. It moves them into a queue of its own, with no
# limit, whenever this socket is used; with the default (1000), a client subscribing and unsubscribing without
# pause grew that queue by megabytes a second, faster than the drains below read it. A subscriber that sends
# more (a few dozen topics at once) is only slowed down: the rest follow as the queue is read.
INBOUND_HWM = 16
# What one read of pending (un)subscriptions may take, at most: a client that subscribes and unsubscribes
# without pause must not keep the publishing thread reading them (an unbounded read held one send for as long as
# such a flood lasted, labels and heartbeats with it). What is left is read at the next send.
DRAIN_MAX_MESSAGES = 1000
DRAIN_BUDGET_S = 0.001
# How often, at most, a drain cut short by its budget is logged.
DRAIN_WARN_EVERY_S = 60.0
# Handshake failures the monitor reports while the wait for subscribers watches (CURVE on), by their ZMTP
# error code. A refused key is logged by the allow-list itself (EVENT_HANDSHAKE_FAILED_AUTH).
_HANDSHAKE_FAILURES: dict[int, str] = {
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "its handshake does not decrypt (a wrong server key?)",
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "it does not use CURVE",
}


# What an XPUB socket's first byte of a subscription message means: subscribe, unsubscribe.
SUBSCRIPTION_CHANGE = {b"\x01": 1, b"\x00": -1}


# Label and drift events of any source: what a subscription is judged by when the publisher is not told the
# topics of its own source's events.
ANY_SOURCE_EVENTS = (b"label.", b"drift.")


def wants_events(prefix: bytes, topics: tuple[bytes, ...] | None = None) -> bool:
    """Whether a subscription to topic ``prefix`` lets in events on ``topics`` (the daemon's own label and drift
    topics); with None, label or drift events of any source."""
    if topics is None:
        return any(topic.startswith(prefix) or prefix.startswith(topic) for topic in ANY_SOURCE_EVENTS)
    return any(topic.startswith(prefix) for topic in topics)


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


def ipc_socket_path(endpoint: str) -> str | None:
    """The file an ipc:// endpoint binds, if there is one already; ConfigError if it is not a socket.

    ZeroMQ deletes whatever is at the path before it binds: a configuration file or a model named by mistake
    would be lost without a word (a folder fails the bind, which no restart cures either)."""
    transport, _, path = endpoint.partition("://")
    if transport != "ipc" or path.startswith("@"):  # @: Linux's abstract namespace, no file
        return None
    try:
        mode = os.lstat(path).st_mode
    except OSError:  # not there (the usual case), or not reachable: the bind says what is wrong
        return None
    if not stat.S_ISSOCK(mode):
        kind = "folder" if stat.S_ISDIR(mode) else "symbolic link" if stat.S_ISLNK(mode) else "file"
        raise ConfigError(
            f"publish.endpoint {endpoint}: {path} is a {kind}, not a socket; binding would delete it "
            "(choose a path of its own, such as /run/eyed/events.sock)"
        )
    return path


def check_ipc_free(endpoint: str) -> None:
    """PublishError if another process listens on an ipc:// endpoint's socket file: ZeroMQ would delete the
    file and bind anyway, leaving that process running but out of reach. A stale socket (nobody listening, as
    after a crash) is left for ZeroMQ to replace; anything else at the path is refused (:func:`ipc_socket_path`)."""
    path = ipc_socket_path(endpoint)
    if path is None:
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

    Text that is not valid UTF-8 (a class folder's name in Latin-1, which Python reads with surrogates) goes out
    with U+FFFD in place of what cannot be encoded: the event still says what it should, bar a character.
    Anything else JSON cannot carry raises ValueError, like a non-finite number: a TypeError from orjson would
    end the publishing thread instead of costing one event.
    """
    if not _finite(payload):
        raise ValueError("event payload holds a NaN or infinite number, which JSON cannot carry")
    try:
        return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    except orjson.JSONEncodeError as exc:
        error = exc
    # Only now: valid payloads, every one of them, pay nothing for the repair.
    repaired = _valid_text(payload)
    if repaired is not payload:
        try:
            return orjson.dumps(repaired, option=orjson.OPT_SERIALIZE_NUMPY)
        except orjson.JSONEncodeError as exc:
            error = exc
    raise ValueError(f"event payload cannot be encoded as JSON: {error}") from error


# Texts already reported as repaired, so that a class name seen in every frame is logged once; bounded, so that
# texts that differ every time cannot grow it for ever.
_REPAIRED: set[str] = set()
_REPAIRED_MAX = 256


def _valid_text(value: Any) -> Any:
    """``value`` with every string (dict keys too) made valid UTF-8; the very object when nothing changed."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return _repair(value)
        return value
    if isinstance(value, dict):
        items = [(_valid_text(k), _valid_text(v)) for k, v in value.items()]
        if all(k is k0 and v is v0 for (k, v), (k0, v0) in zip(items, value.items(), strict=True)):
            return value
        return dict(items)
    if isinstance(value, list | tuple):
        parts = [_valid_text(v) for v in value]
        if all(p is v for p, v in zip(parts, value, strict=True)):
            return value
        return parts
    return value


def _repair(text: str) -> str:
    try:
        # Surrogates that stand for bytes (surrogateescape, as Python reads file names): the bytes again, so a
        # UTF-8 name read under a C locale comes back whole, and one U+FFFD for each byte that is not UTF-8.
        repaired = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # other lone surrogates
        repaired = "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)
    if text not in _REPAIRED and len(_REPAIRED) < _REPAIRED_MAX:
        _REPAIRED.add(text)
        logger.warning("event text %r is not valid UTF-8: sent as %r", text, repaired)
    return repaired


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

    def __init__(
        self, cfg: PublishConfig, context: zmq.Context[Any] | None = None, event_topics: Sequence[str] | None = None
    ) -> None:
        """``event_topics``: the topics of the label and drift events it will send, so that the wait for
        subscribers counts only those who will get them (a subscriber to another camera's labels is not one)."""
        self.cfg = cfg
        self._event_topics = None if event_topics is None else tuple(t.encode("utf-8") for t in event_topics)
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.socket: zmq.Socket[Any] | None = None
        self._monitor: zmq.Socket[Any] | None = None
        self.sent = 0
        self.peers = 0
        self._failed_pending = 0
        self.subscriptions = 0
        self.event_subscriptions = 0
        self.endpoint = cfg.endpoint
        self._curve: CurveServer | None = None
        self._next_discard = 0.0
        self._backlog = False  # the last drain was cut short by its budget
        self._drains_cut = 0  # drains cut short since the last warning about it
        self._next_drain_warning = 0.0
        self._waiting = False  # in wait_for_subscribers (whose tick may send health events)

    def __enter__(self: _P) -> _P:
        self._curve = self._start_curve()
        try:
            sock = self._bind()
        except BaseException:
            # Nothing may outlive a failed start: the authenticator is a thread on this context.
            self._stop_curve()
            if self._own_context:
                self.context.term()
            raise
        self.socket = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT) or self.cfg.endpoint
        self._set_ipc_mode()
        logger.info("publishing on %s", self.endpoint)
        return self

    def _bind(self) -> zmq.Socket[Any]:
        """The XPUB socket, set up and bound; closed again if anything fails."""
        sock = self.context.socket(zmq.XPUB)
        try:
            if self._curve is not None:
                with _curve_config_errors():
                    self._curve.apply(sock)
            sock.setsockopt(zmq.SNDHWM, self.cfg.hwm)
            sock.setsockopt(zmq.LINGER, self.cfg.linger_ms)
            sock.setsockopt(zmq.MAXMSGSIZE, MAX_INBOUND_BYTES)
            sock.setsockopt(zmq.RCVHWM, INBOUND_HWM)
            # Every subscription message reaches us, duplicates included, so counting them counts subscribers
            # (until the wait for them is over).
            sock.setsockopt(zmq.XPUB_VERBOSE, 1)
            if endpoint_ipv6(self.cfg.endpoint):
                sock.setsockopt(zmq.IPV6, 1)
            # Watch handshakes from before bind, so a subscriber that connects before anyone waits still counts.
            self._monitor = sock.get_monitor_socket(
                zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | HANDSHAKE_FAILED
            )
            check_ipc_free(self.cfg.endpoint)
            try:
                sock.bind(self.cfg.endpoint)
            except zmq.ZMQError as exc:
                raise bind_error(self.cfg.endpoint, exc) from exc
        except BaseException:
            self._close(sock)
            raise
        return sock

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
            self.drain_subscriptions()
            # A drain cut short by its budget goes on at the next send: left for a second, a flood would pile
            # up in ZeroMQ's queue of subscription messages, which has no limit.
            self._next_discard = now if self._backlog else now + DISCARD_EVERY_S
        # XPUB without XPUB_NODROP never raises EAGAIN: a full queue drops per subscriber instead.
        self.socket.send_multipart([topic.encode("utf-8"), encode(payload)], flags=zmq.NOBLOCK)
        self.sent += 1

    def _drain_monitor(self) -> None:
        assert self._monitor is not None
        # Bounded like drain_subscriptions: a burst of connections must not keep the wait from its ticks.
        for _ in range(DRAIN_MAX_MESSAGES):
            if not self._monitor.poll(0):
                break
            message = recv_monitor_message(self._monitor)
            event = message["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.peers += 1
            elif event & HANDSHAKE_FAILED:
                # A failed handshake (a CURVE client whose key is refused; it does not retry) is followed by
                # a disconnect that is not a peer leaving; the monitor does not say which connection an event
                # is about, so the next disconnect is set against it. Only handshakes that succeeded count.
                self._failed_pending += 1
                self._handshake_failed(event, message["value"])
            elif event == zmq.EVENT_DISCONNECTED:
                if self._failed_pending:
                    self._failed_pending -= 1
                else:
                    self.peers -= 1

    def _handshake_failed(self, event: int, value: int) -> None:
        """Log a subscriber CURVE turned away before its key was checked (rate-limited). Only while the wait for
        subscribers watches: a monitor kept for this afterwards would block ZeroMQ's I/O thread once full."""
        if self._curve is None or event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:  # AUTH: the allow-list logs it
            return
        if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            reason = _HANDSHAKE_FAILURES.get(value, f"ZMTP protocol error {value:#x}")
        else:
            # NO_DETAIL: the connection went before the handshake was through. A subscriber without CURVE is
            # either this or a mechanism mismatch, depending on which side sees the other's greeting first.
            reason = "a connection closed during its handshake (a subscriber without CURVE? a port scan?)"
        self._curve.refusals.refused(reason)

    def drain_subscriptions(self) -> int:
        """Read pending (un)subscription messages; returns the net count of new subscriptions. Those that let in
        this daemon's label or drift events (``event_topics``) are also counted in ``event_subscriptions``: the
        wait for subscribers counts only them (an ``eyed health`` probe, subscribed to heartbeats alone, or a
        subscriber to another camera's labels, is no reader a replay should wait for).

        At most DRAIN_MAX_MESSAGES of them or DRAIN_BUDGET_S per call: the rest waits for the next call."""
        assert self.socket is not None
        net = 0
        deadline = time.monotonic() + DRAIN_BUDGET_S
        self._backlog = True
        for n in range(DRAIN_MAX_MESSAGES):
            try:
                # recv, not poll then recv: one call per message, and every poll makes ZeroMQ take in more from
                # the peers (a flood's backlog grew faster that way).
                msg = self.socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                self._backlog = False
                break
            change = SUBSCRIPTION_CHANGE.get(msg[:1], 0)
            net += change
            if wants_events(msg[1:], self._event_topics):
                self.event_subscriptions += change
            if n % 32 == 31 and time.monotonic() >= deadline:
                break
        self.subscriptions += net
        if self._backlog:
            self._drain_cut_short()
        return net

    def _drain_cut_short(self) -> None:
        self._drains_cut += 1
        now = time.monotonic()
        if now < self._next_drain_warning:
            return
        self._next_drain_warning = now + DRAIN_WARN_EVERY_S
        logger.warning(
            "subscription messages come in faster than they are read (%d read(s) cut short since the last such "
            "warning): a subscriber (un)subscribing without pause? Events still go out",
            self._drains_cut,
        )
        self._drains_cut = 0

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
            if self._curve is not None:
                self._curve.refusals.flush()

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
            if self.peers >= count and self.event_subscriptions >= count:
                break
            if stop is not None and stop.is_set():
                return
            if tick is not None:
                tick()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PublishError(
                    f"publish.wait_subscribers={count}: only {min(self.peers, self.event_subscriptions)} subscriber(s) "
                    f"on {self.endpoint} after publish.wait_timeout_s={timeout_s:g}"
                )
            poller.poll(int(min(remaining, 0.2) * 1000))
        logger.info("%d subscriber(s) connected", self.peers)
