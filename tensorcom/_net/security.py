"""CURVE authentication and encryption: key files, environment variables, and the ZAP authenticator.

A tensorcom server holds a CURVE key pair and an allow-list of client public keys; a client holds its own key pair
and the server's public key. Traffic is then encrypted, and the server's ZAP handler accepts only clients whose
public key is on the list. The roles follow tensorcom's, not the sockets': a stream server that connects to a
binding client (``zpush`` → ``zpull``) is still the CURVE server.

Key files are those of ``zmq.auth`` (``NAME.key`` holds a public key, ``NAME.key_secret`` both keys), written by
``tensorcom keygen DIR``::

    DIR/server.key_secret     the server's key pair          server_key=         $TENSORCOM_SERVER_KEY
    DIR/server.key            the server's public key        server_public_key=  $TENSORCOM_SERVER_PUBLIC_KEY
    DIR/clients/NAME.key      client public keys (allowed)   client_keys=        $TENSORCOM_CLIENT_KEYS
    DIR/NAME.key_secret       a client's key pair            client_key=         $TENSORCOM_CLIENT_KEY

An argument wins over its environment variable; without either, sockets are plain (no CURVE). Configuring half of
a side (a server key without an allow-list, a client key without the server's public key) is an error.
"""

from __future__ import annotations

import logging
import os
import stat
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import zmq

from tensorcom._net.ratelog import RateLimitedLog
from tensorcom.errors import ConfigError, SecurityError

__all__ = [
    "CLIENT_KEYS_ENV",
    "CLIENT_KEY_ENV",
    "SERVER_KEY_ENV",
    "SERVER_PUBLIC_KEY_ENV",
    "Authenticator",
    "ClientKeys",
    "ServerKeys",
    "client_keys_from",
    "generate_keys",
    "handshake_error",
    "is_loopback",
    "server_keys_from",
]

log = logging.getLogger(__name__)

SERVER_KEY_ENV = "TENSORCOM_SERVER_KEY"
CLIENT_KEYS_ENV = "TENSORCOM_CLIENT_KEYS"
CLIENT_KEY_ENV = "TENSORCOM_CLIENT_KEY"
SERVER_PUBLIC_KEY_ENV = "TENSORCOM_SERVER_PUBLIC_KEY"

KeyPath = Union[str, "os.PathLike[str]"]

_REPORT_EVERY = 10.0
_ZAP_DOMAIN = "tensorcom"


@dataclass(frozen=True)
class ServerKeys:
    """A server's CURVE key pair and the client public keys (Z85) it accepts."""

    public: bytes
    secret: bytes
    allowed: frozenset[bytes]
    allow_list: str

    def __repr__(self) -> str:  # never print a secret key
        return f"ServerKeys(public={self.public.decode()!r}, allowed={len(self.allowed)} keys from {self.allow_list!r})"

    def apply(self, socket: zmq.Socket[Any]) -> None:
        """Make ``socket`` a CURVE server (before it binds or connects)."""
        socket.setsockopt(zmq.CURVE_SERVER, 1)
        socket.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
        socket.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        socket.setsockopt(zmq.ZAP_DOMAIN, _ZAP_DOMAIN.encode())


@dataclass(frozen=True)
class ClientKeys:
    """A client's CURVE key pair and the public key of the servers it talks to (all Z85)."""

    public: bytes
    secret: bytes
    server_public: bytes

    def __repr__(self) -> str:
        return f"ClientKeys(public={self.public.decode()!r}, server={self.server_public.decode()!r})"

    def apply(self, socket: zmq.Socket[Any]) -> None:
        """Make ``socket`` a CURVE client of the server whose public key this holds."""
        socket.setsockopt(zmq.CURVE_SERVERKEY, self.server_public)
        socket.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        socket.setsockopt(zmq.CURVE_SECRETKEY, self.secret)


def _setting(value: KeyPath | None, variable: str, environ: Mapping[str, str] | None) -> str | None:
    if value is not None and str(value) != "":
        return os.fspath(value)
    found = (os.environ if environ is None else environ).get(variable, "")
    return found or None


def _load(path: str, what: str, variable: str) -> tuple[bytes, bytes | None]:
    import zmq.auth

    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read {what} from {path!r} (argument or ${variable}): {error}") from None
    for name, key in (("public", public), ("secret", secret)):
        if key is not None and not _is_z85_key(key):
            raise ConfigError(
                f"{what} in {path!r} (argument or ${variable}) has a malformed {name} key: a CURVE key is 40 Z85 "
                "characters (make new files with `tensorcom keygen`)"
            )
    return public, secret


def _is_z85_key(key: bytes) -> bool:
    """Whether ``key`` is a CURVE key as ZeroMQ takes it: 40 characters of Z85 that decode to 32 bytes."""
    from zmq.utils import z85

    try:
        return len(key) == 40 and len(z85.decode(key)) == 32
    except (ValueError, KeyError, TypeError, struct.error):
        return False


def _check_private(path: str) -> None:
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "secret key file %s is readable by other users (mode %o); chmod 600 it", path, mode & 0o777
        )


def _allowed_keys(location: str) -> frozenset[bytes]:
    path = Path(location)
    if path.is_dir():
        files = sorted(path.glob("*.key"))
    elif path.is_file():
        files = [path]
    else:
        raise ConfigError(
            f"client allow-list {location!r} (argument or ${CLIENT_KEYS_ENV}) is neither a folder of "
            "NAME.key files nor one .key file"
        )
    keys = frozenset(_load(str(file), "a client public key", CLIENT_KEYS_ENV)[0] for file in files)
    if not keys:
        raise ConfigError(
            f"client allow-list {location!r} holds no public key files (*.key); no client could connect"
        )
    return keys


@dataclass(frozen=True)
class _Side:
    """What one side of a CURVE connection configures: its own key pair, and the partner's key(s) it checks."""

    name: str
    key_variable: str
    partner: str
    partner_argument: str
    partner_variable: str


_SERVER = _Side(
    "server", SERVER_KEY_ENV, "the allow-list of client public keys", "client_keys", CLIENT_KEYS_ENV
)
_CLIENT = _Side(
    "client", CLIENT_KEY_ENV, "the server's public key file", "server_public_key", SERVER_PUBLIC_KEY_ENV
)


def _key_pair_and_partner(
    side: _Side, key: KeyPath | None, partner: KeyPath | None, environ: Mapping[str, str] | None
) -> tuple[bytes, bytes, str] | None:
    """One side's public and secret key (from its ``.key_secret`` file) and where its partner setting points; None
    when neither is configured. Half a configuration, or a public key given as the secret file, is a ConfigError."""
    key_file = _setting(key, side.key_variable, environ)
    partner_path = _setting(partner, side.partner_variable, environ)
    if key_file is None and partner_path is None:
        return None
    if key_file is None or partner_path is None:
        missing = (
            f"the {side.name}'s secret key file ({side.name}_key= or ${side.key_variable})"
            if key_file is None
            else f"{side.partner} ({side.partner_argument}= or ${side.partner_variable})"
        )
        raise ConfigError(
            f"CURVE on a {side.name} needs its secret key and {side.partner}; {missing} is missing"
        )
    public, secret = _load(key_file, f"the {side.name}'s secret key", side.key_variable)
    if secret is None:
        raise ConfigError(
            f"{key_file!r} holds a public key only; a {side.name} needs its .key_secret file (${side.key_variable})"
        )
    _check_private(key_file)
    return public, secret, partner_path


def server_keys_from(
    server_key: KeyPath | None = None,
    client_keys: KeyPath | None = None,
    environ: Mapping[str, str] | None = None,
) -> ServerKeys | None:
    """A server's keys from arguments, else from $TENSORCOM_SERVER_KEY and $TENSORCOM_CLIENT_KEYS; None if neither.

    ``server_key`` is the server's ``.key_secret`` file; ``client_keys`` a folder of allowed ``NAME.key`` files (or
    one such file).
    """
    found = _key_pair_and_partner(_SERVER, server_key, client_keys, environ)
    if found is None:
        return None
    public, secret, allow_list = found
    return ServerKeys(public, secret, _allowed_keys(allow_list), allow_list)


def client_keys_from(
    client_key: KeyPath | None = None,
    server_public_key: KeyPath | None = None,
    environ: Mapping[str, str] | None = None,
) -> ClientKeys | None:
    """A client's keys from arguments, else from $TENSORCOM_CLIENT_KEY and $TENSORCOM_SERVER_PUBLIC_KEY; None if
    neither.

    ``client_key`` is the client's ``.key_secret`` file; ``server_public_key`` the server's ``.key`` file.
    """
    found = _key_pair_and_partner(_CLIENT, client_key, server_public_key, environ)
    if found is None:
        return None
    public, secret, server_file = found
    server_public, _ = _load(server_file, "the server's public key", SERVER_PUBLIC_KEY_ENV)
    return ClientKeys(public, secret, server_public)


def generate_keys(folder: KeyPath, clients: Iterable[str] = ("client",), server: bool = True) -> list[Path]:
    """Write a server key pair and client key pairs into ``folder`` (layout in the module docstring).

    Secret files are readable by their owner only. Existing files are never overwritten. Returns the paths written.
    """
    import zmq.auth

    root = Path(folder)
    names = list(clients)
    for name in names:
        if (
            not name
            or not name.replace("-", "").replace("_", "").replace(".", "").isalnum()
            or name == "server"
        ):
            raise ConfigError(
                f"client names are letters, digits, '-', '_' and '.', not 'server'. Found: {name!r}"
            )
    planned = [root / "server.key", root / "server.key_secret"] if server else []
    for name in names:
        planned += [root / "clients" / f"{name}.key", root / f"{name}.key_secret"]
    existing = [str(path) for path in planned if path.exists()]
    if existing:
        raise ConfigError(f"key files already exist (remove them first): {', '.join(existing)}")
    (root / "clients").mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    previous = os.umask(0o077)  # every file is created private: a secret key is never readable by others
    try:
        if server:
            public, secret = zmq.auth.create_certificates(str(root), "server")
            written += [Path(public), Path(secret)]
        for name in names:
            public, secret = zmq.auth.create_certificates(str(root), name)
            moved = root / "clients" / f"{name}.key"
            os.replace(public, moved)
            written += [moved, Path(secret)]
    finally:
        os.umask(previous)
    for path in written:
        if not path.name.endswith(".key_secret"):
            os.chmod(path, 0o644)  # public keys may be shared
    return written


def is_loopback(address: str) -> bool:
    """Whether a zmq address can only be reached from this host (ipc, inproc, or tcp on a loopback address)."""
    transport, _, rest = address.partition("://")
    if transport not in ("tcp", "ws", "wss"):
        return True
    host = rest.rsplit(":", 1)[0].strip("[]")
    if ";" in host:  # tcp://source;destination: the destination is what counts
        host = host.rsplit(";", 1)[1]
    return host == "localhost" or host == "::1" or host.startswith("127.")


class _Refusals:
    """Log refused connections as warnings, at most one line per (place, reason) every ten seconds."""

    def __init__(self) -> None:
        self._log = RateLimitedLog(log, logging.WARNING, _REPORT_EVERY)

    def note(self, where: str, reason: str) -> None:
        self._log.note((where, reason), "refused a client on %s: %s", where, reason)


refusals = _Refusals()


class _AllowList:
    """The ZAP credentials check: a client's public key must be on the server's allow-list."""

    def __init__(self, keys: ServerKeys, where: str) -> None:
        self.keys = keys
        self.where = where

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys.allowed:
            log.debug("accepted CURVE client %s on %s", key.decode(), self.where)
            return True
        refusals.note(
            self.where, f"its public key {key.decode()} is not in the allow-list {self.keys.allow_list}"
        )
        return False


class Authenticator:
    """The ZAP handler of one zmq context: a thread that checks CURVE clients against an allow-list.

    It must be stopped (:meth:`stop`) before its context is terminated.
    """

    def __init__(self, context: zmq.Context[Any], keys: ServerKeys, where: str) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        self._allow_list = _AllowList(keys, where)
        self._thread: Any = ThreadAuthenticator(context, log=logging.getLogger(f"{__name__}.zap"))
        self._thread.start()
        self._thread.configure_curve_callback(domain=_ZAP_DOMAIN, credentials_provider=self._allow_list)
        log.info("CURVE on %s: %d client keys allowed from %s", where, len(keys.allowed), keys.allow_list)

    @property
    def where(self) -> str:
        """Where the refusals it logs happened (the URLs until the sockets are bound, then their addresses)."""
        return self._allow_list.where

    @where.setter
    def where(self, value: str) -> None:
        self._allow_list.where = value

    def stop(self) -> None:
        if self._thread is not None:
            self._thread.stop()
            self._thread = None


_FAILED = {
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "no detail",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "auth",
}
HANDSHAKE_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | sum(_FAILED)
_UNDETAILED_LIMIT = 3


def describe_handshake_failure(event: int, value: int, curve: bool, curve_server: bool = False) -> str:
    """What a failed handshake (a monitor event and its value) most likely means, from this side's settings."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH and curve_server:
        return f"our allow-list refused the peer's public key (ZAP status {value})"
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return f"the peer refused our credentials (ZAP status {value}): is our public key on its allow-list?"
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        return (
            "the peer does not use CURVE (a plain server or client?) while we do"
            if curve
            else "the peer requires CURVE keys and we have none"
        )
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
        return "the handshake could not be decrypted: does the client have the wrong server public key?"
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return f"ZMTP protocol error {value:#x} during the handshake"
    return (
        "the peer closed the connection during the handshake: wrong server public key, or it expects plain "
        "connections?"
        if curve
        else "the peer closed the connection during the handshake: does it require CURVE keys?"
    )


def handshake_error(
    address: str, failures: list[tuple[int, int]], curve: bool, curve_server: bool = False
) -> SecurityError | None:
    """The error a client raises for the failed handshakes seen on one of its connections, if they are conclusive.

    A refusal (auth) or a protocol mismatch is conclusive at once; handshakes that merely fail without detail (what a
    client with a wrong server key or without CURVE sees) are conclusive when they repeat, so a server that dies in
    the middle of one handshake is not mistaken for a security problem.
    """
    if not failures:
        return None
    conclusive = [f for f in failures if f[0] != zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL]
    if not conclusive and len(failures) < _UNDETAILED_LIMIT:
        return None
    event, value = (conclusive or failures)[-1]
    mode = "CURVE" if curve else "plain"
    reason = describe_handshake_failure(event, value, curve, curve_server)
    return SecurityError(f"handshake with {address} failed (this side is {mode}): {reason}")
