"""ZeroMQ CURVE for the event socket: keys, the daemon's server side and a subscriber's client side.

With ``publish.curve_secret_key`` set, the PUB socket only completes handshakes with subscribers whose public
key is in ``publish.curve_clients``, and everything on the wire is encrypted. pyzmq's ThreadAuthenticator
does the checking (ZAP); this module only wires keys to sockets. Key files are ZeroMQ's own certificate
format (``zmq.auth``): ``NAME.key`` holds the public key, ``NAME.key_secret`` both keys.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

logger = logging.getLogger(__name__)


class CurveError(Exception):
    """A key file is missing or unreadable."""


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


def load_keys(path: Path, *, secret: bool) -> tuple[bytes, bytes | None]:
    """(public, secret) from a certificate file; CurveError naming the file when it is unusable."""
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise CurveError(f"{path}: cannot read a ZeroMQ certificate: {exc}") from exc
    if secret and secret_key is None:
        raise CurveError(f"{path}: holds no secret key (give the NAME.key_secret file written by `eyed keys`)")
    return public, secret_key


def _client_folder(clients: Path) -> Path:
    if not clients.is_dir():
        raise CurveError(f"{clients}: no such folder of client public keys")
    return clients


def read_clients(clients: Path) -> frozenset[bytes]:
    """The public keys in an allow-list folder; CurveError when the folder or any key in it cannot be read."""
    try:
        return frozenset(zmq.auth.load_certificates(clients))
    except (OSError, ValueError) as exc:
        raise CurveError(f"{clients}: cannot read the client keys: {exc}") from exc


def check_server_keys(secret_key: Path, clients: Path) -> int:
    """What :class:`CurveServer` reads when it starts, with no thread or socket (``eyed check-config``): the
    number of allowed keys, or CurveError with the message the daemon would give."""
    load_keys(secret_key, secret=True)
    return len(read_clients(_client_folder(clients)))


class _AllowList:
    """The keys the authenticator asks about (pyzmq's ``configure_curve_callback`` protocol). Replacing the set
    is atomic, so a reload never leaves the authenticator thread with half a list."""

    def __init__(self) -> None:
        self.keys: frozenset[bytes] = frozenset()

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.keys


class CurveServer:
    """Makes a socket a CURVE server that accepts only the public keys found in ``clients``."""

    def __init__(self, context: zmq.Context[Any], secret_key: Path, clients: Path) -> None:
        self.public, self.secret = load_keys(secret_key, secret=True)
        self.clients = _client_folder(clients)
        self._allowed = _AllowList()
        self._auth = ThreadAuthenticator(context)

    def start(self) -> CurveServer:
        """Start the authenticator thread with the allow-list as it is now (CurveError when it is unreadable)."""
        self.reload()
        self._auth.start()
        self._auth.configure_curve_callback(domain="*", credentials_provider=self._allowed)
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
        """Before bind: the socket's own keys, and the server role."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True


def apply_client(sock: zmq.Socket[Any], secret_key: Path, server_key: Path) -> None:
    """Before connect: a subscriber's own key pair and the daemon's public key."""
    public, secret = load_keys(secret_key, secret=True)
    server_public, _ = load_keys(server_key, secret=False)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = server_public
