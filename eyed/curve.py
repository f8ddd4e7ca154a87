"""ZeroMQ CURVE for the event socket: keys, the daemon's server side and a subscriber's client side.

With ``publish.curve_secret_key`` set, the PUB socket only completes handshakes with subscribers whose public
key is in ``publish.curve_clients``, and everything on the wire is encrypted. pyzmq's ThreadAuthenticator
does the checking (ZAP); this module only wires keys to sockets. Key files are ZeroMQ's own certificate
format (``zmq.auth``): ``NAME.key`` holds the public key, ``NAME.key_secret`` both keys.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

logger = logging.getLogger(__name__)

# A CURVE key in a certificate file: 32 bytes, written as 40 Z85 characters.
KEY_BYTES = 32
KEY_CHARS = 40
# Refused handshakes are logged at most this often per reason; a subscriber with the wrong server key retries
# ten times a second, and a log line for each would bury everything else.
REFUSED_LOG_EVERY_S = 60.0


class CurveError(Exception):
    """A key file is missing, unreadable or holds no valid key."""


def create_keys(folder: Path, name: str) -> tuple[Path, Path]:
    """Write a new key pair as ``folder/NAME.key`` (public, to hand out) and ``NAME.key_secret`` (kept, 0600)."""
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    existing = [str(p) for p in (public, secret) if p.exists()]
    if existing:  # a second run must not silently replace the key every subscriber trusts
        raise CurveError(f"{', '.join(existing)} already exist(s): remove it first to make a new pair")
    folder.mkdir(parents=True, exist_ok=True)
    old = os.umask(0o077)  # the secret is never readable by others, not even between writing and chmod
    try:
        zmq.auth.create_certificates(folder, name)
    finally:
        os.umask(old)
    os.chmod(public, 0o644)
    return public, secret


def _check_key(path: Path, what: str, key: bytes) -> None:
    """CurveError unless ``key`` is 40 Z85 characters that decode to 32 bytes. libzmq would refuse anything
    else only when the key is set on a socket (EINVAL), and an allow-list entry not at all: it would just
    never match."""
    if not key:
        raise CurveError(f"{path}: the {what} is empty")
    try:
        valid = len(key) == KEY_CHARS and len(z85.decode(key)) == KEY_BYTES
    except Exception:  # z85.decode: KeyError for a character outside Z85, struct.error for an overflow
        valid = False
    if not valid:
        # A secret key, even a broken one, is never echoed into a log.
        shown = f" {key.decode('ascii', 'replace')!r}" if what == "public key" else ""
        why = f"{len(key)} characters" if len(key) != KEY_CHARS else "not valid Z85"
        raise CurveError(
            f"{path}: the {what}{shown} is not a CURVE key, which is {KEY_CHARS} Z85 characters: {why} "
            "(a truncated or hand-edited copy?)"
        )


def load_keys(path: Path, *, secret: bool) -> tuple[bytes, bytes | None]:
    """(public, secret) from a certificate file; CurveError naming the file when it is unusable.

    With ``secret``, the file must hold a secret key too, and the public key must be the secret key's own."""
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise CurveError(f"{path}: cannot read a ZeroMQ certificate: {exc}") from exc
    except Exception as exc:
        # pyzmq's parser raises whatever it happens to hit (IndexError for a key line without "="). A bad file
        # is the configuration's fault all the same: never a crash, nor, on SIGHUP, the end of a running daemon.
        raise CurveError(
            f'{path}: cannot read a ZeroMQ certificate (key lines read `public-key = "..."`): '
            f"{type(exc).__name__}: {exc}"
        ) from exc
    _check_key(path, "public key", public)
    if not secret:
        return public, secret_key
    if secret_key is None:
        raise CurveError(f"{path}: holds no secret key (give the NAME.key_secret file written by `eyed keys`)")
    _check_key(path, "secret key", secret_key)
    try:
        own_public = zmq.curve_public(secret_key)
    except zmq.ZMQError as exc:  # checked above, so it should not; but never anything but a CurveError
        raise CurveError(f"{path}: ZeroMQ refuses the secret key: {exc}") from exc
    if own_public != public:
        # Subscribers hold the public key: one that is not the secret's own makes every handshake fail.
        raise CurveError(f"{path}: the public key is not the secret key's own (a file pieced together?)")
    return public, secret_key


def _warn_if_exposed(path: Path) -> None:
    """A warning when others than the daemon's user can read its secret key: whoever reads it can pose as the
    daemon to every subscriber. Not an error: a group-readable key may be on purpose."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return  # load_keys has just read it; a race with a rename is not worth an error here
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        who = " and ".join(w for w, bit in (("its group", stat.S_IRGRP), ("others", stat.S_IROTH)) if mode & bit)
        logger.warning(
            "CURVE: the secret key %s is readable by %s (mode %04o): whoever reads it can pose as this daemon; "
            "chmod 600 it",
            path,
            who,
            mode,
        )


def _client_folder(clients: Path) -> Path:
    if not clients.is_dir():
        raise CurveError(f"{clients}: no such folder of client public keys")
    return clients


def read_clients(clients: Path) -> frozenset[bytes]:
    """The public keys in an allow-list folder: every ``*.key`` in it but hidden files, as pyzmq's
    ``load_certificates`` picks them. CurveError naming the file when the folder, or any key in it, cannot be
    read or is not a valid key: pyzmq would drop an empty key silently and take a truncated one."""
    try:
        names = sorted(n for n in os.listdir(clients) if n.endswith(".key") and not n.startswith("."))
    except OSError as exc:  # an unreadable folder is not an empty one
        raise CurveError(f"{clients}: cannot read the client keys: {exc}") from exc
    keys = set()
    for name in names:
        try:
            public, _ = load_keys(clients / name, secret=False)
        except CurveError as exc:
            raise CurveError(f"cannot read the client keys: {exc}") from exc
        keys.add(public)
    return frozenset(keys)


def check_server_keys(secret_key: Path, clients: Path) -> int:
    """What :class:`CurveServer` reads when it starts, with no thread or socket (``eyed check-config``): the
    number of allowed keys, or CurveError with the message the daemon would give."""
    load_keys(secret_key, secret=True)
    _warn_if_exposed(secret_key)
    return len(read_clients(_client_folder(clients)))


class RefusalLog:
    """Refused handshakes at WARNING, at most once per ``every_s`` per reason, with a count of those left out
    since. pyzmq logs denials at DEBUG only, so an operator whose subscriber has the wrong key saw nothing.
    Called from the authenticator's thread and the publisher's: hence the lock."""

    def __init__(self, every_s: float = REFUSED_LOG_EVERY_S) -> None:
        self.every_s = every_s
        self._lock = threading.Lock()
        self._next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def refused(self, reason: str, detail: str = "") -> None:
        now = time.monotonic()
        with self._lock:
            if now < self._next.get(reason, 0.0):
                self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
                return
            self._next[reason] = now + self.every_s
            suppressed = self._suppressed.pop(reason, 0)
        more = f" ({suppressed} more refused for this reason since the last such warning)" if suppressed else ""
        logger.warning("CURVE: refused a subscriber: %s%s%s", reason, detail, more)

    def flush(self) -> None:
        """Log the refusals left out since their reason's last warning, now rather than with the next one (which,
        for what only the wait for subscribers sees, never comes)."""
        with self._lock:
            pending, self._suppressed = self._suppressed, {}
        for reason, count in pending.items():
            logger.warning("CURVE: refused %d more subscriber(s) since the last warning: %s", count, reason)


class _AllowList:
    """The keys the authenticator asks about (pyzmq's ``configure_curve_callback`` protocol). Replacing the set
    is atomic, so a reload never leaves the authenticator thread with half a list."""

    def __init__(self, clients: Path, refusals: RefusalLog) -> None:
        self.keys: frozenset[bytes] = frozenset()
        self.clients = clients
        self.refusals = refusals

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys:
            return True
        # A public key is no secret: naming it tells the operator which file to add to the folder.
        self.refusals.refused(f"its public key is not in {self.clients}", f": {key.decode('ascii', 'replace')}")
        return False


class CurveServer:
    """Makes a socket a CURVE server that accepts only the public keys found in ``clients``."""

    def __init__(self, context: zmq.Context[Any], secret_key: Path, clients: Path) -> None:
        self.public, self.secret = load_keys(secret_key, secret=True)
        _warn_if_exposed(secret_key)
        self.clients = _client_folder(clients)
        self.refusals = RefusalLog()
        self._allowed = _AllowList(clients, self.refusals)
        self._auth = ThreadAuthenticator(context)

    def start(self) -> CurveServer:
        """Start the authenticator thread with the allow-list as it is now (CurveError when it is unreadable)."""
        self.reload()
        self._auth.start()
        try:
            self._auth.configure_curve_callback(domain="*", credentials_provider=self._allowed)
        except BaseException:
            self._auth.stop()
            raise
        return self

    def stop(self) -> None:
        self._auth.stop()

    def __enter__(self) -> CurveServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reload(self) -> int:
        """Read the allow-list folder again; returns how many keys it holds. It applies to handshakes from now
        on: a subscriber whose key was removed stays connected until it reconnects or the daemon restarts.

        Raises CurveError, keeping the previous list, when the folder or any key in it cannot be read: a
        half-read folder must not silently shut out (or let in) anyone. pyzmq's own ``configure_curve`` only
        logs such an error and keeps going."""
        keys = read_clients(self.clients)
        self._allowed.keys = keys
        if keys:
            logger.info("CURVE: %d allowed client key(s) from %s", len(keys), self.clients)
        else:
            logger.warning("CURVE: no client keys (*.key) in %s: no subscriber can connect", self.clients)
        return len(keys)

    def apply(self, sock: zmq.Socket[Any]) -> None:
        """Before bind: the socket's own keys, and the server role. CurveError should libzmq refuse them (the
        keys were checked when read, so it should not)."""
        try:
            sock.curve_secretkey = self.secret
            sock.curve_publickey = self.public
            sock.curve_server = True
        except zmq.ZMQError as exc:
            raise CurveError(f"the daemon's key pair: ZeroMQ refuses it: {exc}") from exc


def apply_client(sock: zmq.Socket[Any], secret_key: Path, server_key: Path) -> None:
    """Before connect: a subscriber's own key pair and the daemon's public key."""
    public, secret = load_keys(secret_key, secret=True)
    server_public, _ = load_keys(server_key, secret=False)
    try:
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_serverkey = server_public
    except zmq.ZMQError as exc:
        raise CurveError(f"{secret_key} / {server_key}: ZeroMQ refuses the keys: {exc}") from exc
