"""CurveZMQ for workers and clients: key files, socket options and the client allow-list.

Key files are pyzmq's (``zmq.auth``) certificate format: ``NAME.key`` holds a public key,
``NAME.key_secret`` holds the public and the secret key of the same pair. A worker names its
secret key file and a directory of the ``*.key`` files of the clients it serves; a client
names its own secret key file and the worker's public key file.

Curve encrypts every byte after the handshake and authenticates both ends: the client knows
it talks to the holder of the worker's secret key, and the worker's ZAP handler (pyzmq's
:class:`~zmq.auth.thread.ThreadAuthenticator`) admits only clients whose public key is in the
allow-list. A refused client sees no connection at all; the worker logs its key.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from tandem.runtime.errors import ConfigError

_KEY_CHARS = 40  # a 32-byte Curve key in Z85
_MAX_DENIED_KEYS = 1024  # distinct refused keys remembered for log throttling


def generate_keypair(
    directory: str | Path, name: str = "worker", *, force: bool = False
) -> tuple[Path, Path]:
    """Write ``DIR/NAME.key`` (public) and ``DIR/NAME.key_secret`` (mode 0600); returns their
    paths. Refuses to overwrite an existing pair unless ``force``."""
    if not name or Path(name).name != name or name.startswith("."):
        raise ConfigError(f"key name {name!r} must be a plain file name such as 'worker'")
    d = Path(directory)
    public, secret = d / f"{name}.key", d / f"{name}.key_secret"
    existing = [str(p) for p in (public, secret) if p.exists()]
    if existing and not force:
        raise ConfigError(
            f"{' and '.join(existing)} already exist; replace them with --force (force=True)"
        )
    d.mkdir(parents=True, exist_ok=True)
    # The secret file exists with mode 0600 before pyzmq writes the key into it.
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.close(fd)
    os.chmod(secret, 0o600)
    zmq.auth.create_certificates(d, name)
    return public, secret


def _read_key_file(path: str | Path) -> tuple[bytes, bytes | None]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such key file (make a pair with `tandem keys generate DIR`)")
    try:
        public, secret = zmq.auth.load_certificate(p)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{p}: not a ZeroMQ key file ({e})") from None
    for key in (public, secret):
        if key is not None and not _is_z85_key(key):
            raise ConfigError(f"{p}: not a ZeroMQ key file (a key is not 40 Z85 characters)")
    return public, secret


def _is_z85_key(key: bytes) -> bool:
    try:
        return len(key) == _KEY_CHARS and len(z85.decode(key)) == 32
    except (ValueError, KeyError, IndexError):
        return False


def load_public_key(path: str | Path) -> bytes:
    """The Z85 public key in a ``.key`` (or ``.key_secret``) file."""
    return _read_key_file(path)[0]


def load_secret_key(path: str | Path) -> tuple[bytes, bytes]:
    """``(public, secret)`` Z85 keys from a ``.key_secret`` file."""
    public, secret = _read_key_file(path)
    if secret is None:
        raise ConfigError(
            f"{path}: holds only a public key; this needs the secret key file of the pair "
            "(NAME.key_secret, written by `tandem keys generate`)"
        )
    return public, secret


def configure_server(sock: zmq.Socket, secret_key_path: str | Path) -> bytes:
    """Make ``sock`` a Curve server (call before bind); returns its Z85 public key."""
    public, secret = load_secret_key(secret_key_path)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
    return public


@dataclass(frozen=True)
class ClientKeys:
    """A client's key pair and the worker's public key (Z85), loaded once, applied to each
    socket the client opens."""

    public_key: bytes
    secret_key: bytes
    server_key: bytes

    @classmethod
    def load(
        cls, client_secret_key_path: str | Path, server_public_key_path: str | Path
    ) -> ClientKeys:
        public, secret = load_secret_key(client_secret_key_path)
        return cls(public, secret, load_public_key(server_public_key_path))

    def apply(self, sock: zmq.Socket) -> None:
        """Set the Curve client options (call before connect)."""
        sock.curve_secretkey = self.secret_key
        sock.curve_publickey = self.public_key
        sock.curve_serverkey = self.server_key


class ClientAllowList:
    """pyzmq's Curve credentials callback: the public keys of ``DIR/*.key``. The directory is
    read again when its mtime changes, so adding or removing a key file takes effect for the
    next connection, without a restart. A refused key is logged at WARNING with its Z85 text
    (the 1st, 2nd, 4th, 8th... time for each key: a client retrying is one story)."""

    def __init__(self, directory: str | Path, log: logging.Logger) -> None:
        self.directory = Path(directory)
        self.log = log
        self.denied = 0
        self._denied_per_key: dict[bytes, int] = {}
        self._mtime = -1
        self.keys: set[bytes] = set()
        self._reload()

    def _reload(self) -> None:
        try:
            mtime = self.directory.stat().st_mtime_ns
            if mtime == self._mtime:
                return
            keys = set(zmq.auth.load_certificates(self.directory))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{self.directory}: cannot read allowed client keys: {e}") from None
        self._mtime, self.keys = mtime, keys

    def callback(self, domain: str, key: bytes) -> bool:
        try:
            self._reload()
        except ConfigError as e:  # the directory went away: keep the keys last read
            self.log.error("%s", e.message)
        if key in self.keys:
            return True
        self.denied += 1
        if len(self._denied_per_key) >= _MAX_DENIED_KEYS:
            self._denied_per_key.clear()
        n = self._denied_per_key[key] = self._denied_per_key.get(key, 0) + 1
        if n & (n - 1) == 0:
            self.log.warning(
                "refused a client with unknown Curve key %s (%d time%s; allowed keys are in %s)",
                key.decode("ascii", "replace"),
                n,
                "" if n == 1 else "s",
                self.directory,
                extra={"client_key": key.decode("ascii", "replace")},
            )
        return False


def start_authenticator(
    ctx: zmq.Context, allowed_clients_dir: str | Path, log: logging.Logger
) -> tuple[ThreadAuthenticator, ClientAllowList]:
    """Start the ZAP handler for every Curve server socket of ``ctx`` (before they bind), with
    the allow-list of ``allowed_clients_dir``. Stop it after those sockets are closed: a
    Curve socket with no ZAP handler admits any client."""
    allow = ClientAllowList(allowed_clients_dir, log)
    if not allow.keys:
        log.warning("no client keys (*.key) in %s: every client will be refused", allow.directory)
    auth = ThreadAuthenticator(ctx, log=logging.getLogger("zmq.auth"))
    auth.start()
    auth.configure_curve_callback(domain="*", credentials_provider=allow)
    return auth, allow


_LOCAL_TRANSPORTS = ("ipc", "inproc")


def is_loopback(endpoint: str) -> bool:
    """Whether a bind endpoint is reachable from this host only: ``ipc://``, ``inproc://``, or
    TCP on a loopback address (``127.0.0.0/8``, ``::1``, ``localhost``)."""
    transport, sep, rest = endpoint.partition("://")
    if not sep:
        return False
    if transport in _LOCAL_TRANSPORTS:
        return True
    if transport != "tcp":
        return False
    host = urlsplit(f"//{rest}").hostname  # strips the port and the IPv6 brackets
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # an interface name or "*": not loopback for sure
        return False
