"""CurveZMQ for workers and clients: key files, socket options and the client allow-list.

Key files are pyzmq's (``zmq.auth``) certificate format: ``NAME.key`` holds a public key,
``NAME.key_secret`` holds the public and the secret key of the same pair. A worker names its
secret key file and a directory of the ``*.key`` files of the clients it serves; a client
names its own secret key file and the worker's public key file.

Curve encrypts every byte after the handshake and authenticates both ends: the client knows
it talks to the holder of the worker's secret key, and the worker's ZAP handler (pyzmq's
:class:`~zmq.auth.thread.ThreadAuthenticator`) admits only clients whose public key is in the
allow-list. A refused client sees no connection at all; the worker logs its key. A key
taken off the allow-list stops being served within :data:`REVOCATION_CHECK_S`, on connections
already open too: the worker checks the key of each message's sender
(:meth:`ClientAllowList.admits`) and answers a revoked one
:class:`~tandem.runtime.errors.Unauthorized`.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import stat
import threading
import time
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
# How long a removed or replaced client key may still be served on a connection that was open
# before (see ClientAllowList): the longest time between two looks at the directory.
REVOCATION_CHECK_S = 1.0
_RACY_NS = 2_000_000_000  # a file modified this recently may change again with the same stat


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
    """pyzmq's Curve credentials callback, and the check of each message's sender: the public
    keys of ``DIR/*.key``, read again whenever the directory's content changes (a file added,
    removed, or edited in place: its name, size, mtime, ctime or inode changed), without a
    restart.

    **Time bound.** A key removed or replaced is refused within :data:`REVOCATION_CHECK_S`
    (1 s): a new connection at its handshake (the directory is looked at on every handshake),
    a connection already open at its first message after that (:meth:`admits`, called by the
    worker for every message, looks at the directory at most every ``check_every_s``). A file
    that cannot be read as a key is skipped (logged at ERROR): a bad file never keeps a
    revoked key alive. If the directory itself cannot be read, the keys last read stay.

    A refused key is logged at WARNING with its Z85 text (the 1st, 2nd, 4th, 8th... time for
    each key: a client retrying is one story)."""

    def __init__(
        self,
        directory: str | Path,
        log: logging.Logger,
        *,
        check_every_s: float = REVOCATION_CHECK_S,
    ) -> None:
        self.directory = Path(directory)
        self.log = log
        self.check_every_s = check_every_s
        self.denied = 0
        self._denied_per_key: dict[bytes, int] = {}
        self._lock = threading.Lock()  # the ZAP thread and the worker's loop both reload
        self._signature: tuple[tuple[str, int, int, int, int], ...] | None = None
        self._racy = False  # a file changed too recently for its stat to show the next edit
        self._next_check = 0.0  # time.monotonic() of admits' next look at the directory
        self.keys: frozenset[bytes] = frozenset()
        self.reload()

    def reload(self) -> None:
        """Read the keys again if the directory's content changed. :class:`ConfigError` if
        the directory cannot be read (the keys last read stay)."""
        with self._lock:
            started_ns = time.time_ns()
            try:
                signature = self._scan()
            except OSError as e:
                raise ConfigError(
                    f"{self.directory}: cannot read allowed client keys: {e}"
                ) from None
            if signature == self._signature and not self._racy:
                return
            keys = set()
            for name, *_ in signature:
                try:
                    public, _secret = zmq.auth.load_certificate(self.directory / name)
                except (OSError, ValueError) as e:  # removed meanwhile, or not a key file
                    self.log.error("%s: not a client key, skipped (%s)", self.directory / name, e)
                    continue
                if _is_z85_key(public):
                    keys.add(public)
                else:
                    self.log.error("%s: not a Curve public key, skipped", self.directory / name)
            # As git's index does: a file modified within the clock's granularity of this read
            # could change again with the same stat; read such files again next time.
            self._racy = any(started_ns - mtime < _RACY_NS for _, _, mtime, _, _ in signature)
            self._signature, self.keys = signature, frozenset(keys)

    def _scan(self) -> tuple[tuple[str, int, int, int, int], ...]:
        """(name, size, mtime, ctime, inode) of each ``*.key`` file, by name."""
        out = []
        with os.scandir(self.directory) as it:
            for entry in it:
                if entry.name.endswith(".key") and not entry.name.startswith("."):
                    try:
                        st = entry.stat()
                    except OSError:  # removed since the listing
                        continue
                    if stat.S_ISREG(st.st_mode):
                        out.append(
                            (entry.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
                        )
        return tuple(sorted(out))

    def _reload_logged(self) -> None:
        try:
            self.reload()
        except ConfigError as e:  # the directory went away: keep the keys last read
            self.log.error("%s", e.message)

    def admits(self, key: bytes, now: float) -> bool:
        """Whether a message from the client with Z85 public ``key`` (its connection's
        ``User-Id``, set by the ZAP handler) may be served now (``now``: a
        ``time.monotonic()`` reading); looks at the directory at most every
        ``check_every_s``."""
        if now >= self._next_check:
            self._next_check = now + self.check_every_s
            self._reload_logged()
        return key in self.keys

    def callback(self, domain: str, key: bytes) -> bool:
        """The handshake's check (on the ZAP handler's thread)."""
        self._reload_logged()
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
