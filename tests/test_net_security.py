"""CURVE: key files and variables, allowed and refused clients on every socket kind, encryption on the wire."""

from __future__ import annotations

import functools
import logging
import os
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import factories
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import StartProcess, assert_same_batches, serve
from reliability import Keys, reference

from tensorcom import ConfigError, Connection, SecurityError, Server, Timeout
from tensorcom._net.security import client_keys_from, is_loopback, server_keys_from
from tensorcom.cli import main

pytestmark = pytest.mark.usefixtures("no_key_variables")


def authenticator_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if type(thread).__name__ == "AuthenticationThread"]


# keys


def test_keygen_writes_the_documented_layout_with_private_secrets(tmp_path: Path) -> None:
    """`tensorcom keygen DIR` writes the server pair, client pairs with public keys under clients/, 0600 secrets."""
    result = CliRunner().invoke(main, ["keygen", str(tmp_path / "k"), "--client", "a", "--client", "b"])
    assert result.exit_code == 0, result.output
    names = sorted(str(p.relative_to(tmp_path / "k")) for p in (tmp_path / "k").rglob("*") if p.is_file())
    assert names == [
        "a.key_secret",
        "b.key_secret",
        "clients/a.key",
        "clients/b.key",
        "server.key",
        "server.key_secret",
    ]
    for secret in (tmp_path / "k").glob("*.key_secret"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert "export TENSORCOM_SERVER_KEY=" in result.output and "TENSORCOM_SERVER_PUBLIC_KEY" in result.output
    again = CliRunner().invoke(main, ["keygen", str(tmp_path / "k"), "--client", "a"])
    assert again.exit_code == 2 and "already exist" in again.output
    more = CliRunner().invoke(main, ["keygen", str(tmp_path / "k"), "--no-server", "--client", "c"])
    assert more.exit_code == 0 and (tmp_path / "k" / "clients" / "c.key").exists()


def test_keys_come_from_arguments_or_environment(keys: Keys) -> None:
    """Arguments win; the TENSORCOM_* variables are the fallback; nothing configured means plain (None)."""
    environ = {
        "TENSORCOM_SERVER_KEY": str(keys.server_secret),
        "TENSORCOM_CLIENT_KEYS": str(keys.allowed),
        "TENSORCOM_CLIENT_KEY": str(keys.alice),
        "TENSORCOM_SERVER_PUBLIC_KEY": str(keys.server_public),
    }
    server = server_keys_from(environ=environ)
    client = client_keys_from(environ=environ)
    assert server is not None and client is not None
    assert client.server_public == server.public and client.public in server.allowed
    assert server_keys_from(environ={}) is None and client_keys_from(environ={}) is None
    other = client_keys_from(client_key=keys.mallory, environ=environ)
    assert other is not None and other.public not in server.allowed
    assert "secret" not in repr(server).lower().replace("secretkey", "")


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda k: server_keys_from(server_key=k.server_secret, environ={}), "TENSORCOM_CLIENT_KEYS"),
        (lambda k: server_keys_from(client_keys=k.allowed, environ={}), "TENSORCOM_SERVER_KEY"),
        (lambda k: client_keys_from(client_key=k.alice, environ={}), "TENSORCOM_SERVER_PUBLIC_KEY"),
        (lambda k: server_keys_from(k.server_public, k.allowed, environ={}), "public key only"),
        (lambda k: client_keys_from(k.alice, k.alice.parent / "missing.key", environ={}), "missing.key"),
        (lambda k: server_keys_from(k.server_secret, k.alice.parent / "nowhere", environ={}), "nowhere"),
    ],
    ids=[
        "no-allow-list",
        "no-server-key",
        "no-server-public",
        "public-as-secret",
        "missing-file",
        "no-folder",
    ],
)
def test_incomplete_or_wrong_key_settings_are_config_errors(
    keys: Keys, call: Callable[[Keys], object], message: str
) -> None:
    """Half a key configuration, or a file that is not what it should be, is a ConfigError naming what is wrong."""
    with pytest.raises(ConfigError, match=message):
        call(keys)


def test_loopback_addresses_are_recognised() -> None:
    """Only loopback tcp (and ipc/inproc) count as local; any other host is reachable from the network."""
    local = ["tcp://127.0.0.1:5", "tcp://localhost:5", "tcp://[::1]:5", "ipc:///tmp/x", "inproc://x"]
    remote = ["tcp://0.0.0.0:5", "tcp://*:5", "tcp://10.1.2.3:5", "tcp://eth0:5", "tcp://[::]:5"]
    assert all(is_loopback(address) for address in local)
    assert not any(is_loopback(address) for address in remote)


def test_binding_a_network_address_without_keys_warns(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, keys: Keys
) -> None:
    """A socket bound beyond loopback without CURVE logs a warning; with keys it does not (bound here on 127.0.0.1,
    with the loopback test patched, so nothing listens on the network)."""
    import tensorcom._net.transport

    monkeypatch.setattr(tensorcom._net.transport, "is_loopback", lambda address: False)
    with caplog.at_level(logging.WARNING, logger="tensorcom._net.transport"):
        Connection("zpull://127.0.0.1:0").close()
        assert "without CURVE keys" in caplog.text
        caplog.clear()
        Connection("zpull://127.0.0.1:0", **keys.client()).close()
        assert "without CURVE keys" not in caplog.text


# zreq


@pytest.mark.parametrize("server_keys_by", ["option", "variable"])
def test_zreq_allowed_client_gets_its_exact_stream(
    start_process: StartProcess, keys: Keys, server_keys_by: str
) -> None:
    """A CURVE server (keys by option or by variable) serves an allowed client (keys by variable) bit-identical
    batches."""
    if server_keys_by == "option":
        _, url = serve(start_process, "factories:small", *keys.serve_args(), workers=0)
    else:
        _, url = serve(start_process, "factories:small", workers=0, env=keys.server_variables())
        with pytest.raises(SecurityError):  # proof that the server did take its keys from the variables
            Connection(url, timeout=30)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in keys.client_variables().items():
            patch.setenv(name, value)
        with Connection(url, seed=3, timeout=30) as connection:
            received = list(connection)
    assert_same_batches(received, reference(factories.small, seed=3, rank=0, world_size=1))


@pytest.mark.parametrize(
    "client, message",
    [
        ("mallory", "refused our credentials"),
        ("plain", "requires? CURVE keys"),
        ("wrong-server-key", "wrong server public key"),
    ],
    ids=["key-not-allowed", "no-key", "wrong-server-key"],
)
def test_zreq_refused_clients_get_an_error_and_the_server_logs_it(
    start_process: StartProcess, keys: Keys, client: str, message: str
) -> None:
    """A client with a key not on the list, no key, or the wrong server key gets SecurityError at once (no batch);
    the server logs the refusal and goes on serving allowed clients."""
    process, url = serve(
        start_process, "factories:small", *keys.serve_args(), workers=0, stderr=subprocess.PIPE
    )
    options: dict[str, Any] = {
        "mallory": keys.client("mallory"),
        "plain": {},
        "wrong-server-key": keys.client("alice", server_public=keys.other_server_public),
    }[client]
    started = time.monotonic()
    with pytest.raises(SecurityError, match=message) as raised:
        Connection(url, timeout=30, **options)
    assert time.monotonic() - started < 10
    assert url.split("//")[1] in str(raised.value)
    assert isinstance(raised.value, PermissionError)
    with Connection(url, seed=1, timeout=30, **keys.client()) as connection:
        assert_same_batches(
            [connection.recv()], reference(factories.small, count=1, seed=1, rank=0, world_size=1)
        )
    process.terminate()
    _, stderr = process.communicate(timeout=20)
    assert "refused a client" in stderr.decode()


def test_curve_client_against_a_plain_server_is_a_clear_error(
    start_process: StartProcess, keys: Keys
) -> None:
    """A client that expects CURVE, facing a plain server, raises SecurityError quickly instead of hanging."""
    _, url = serve(start_process, "factories:small", workers=0)
    started = time.monotonic()
    with pytest.raises(SecurityError, match="does not use CURVE|expects plain connections"):
        Connection(url, timeout=30, **keys.client())
    assert time.monotonic() - started < 10


# stream mode


def serve_thread(server: Server, count: int) -> threading.Thread:
    thread = threading.Thread(target=server.run, args=(count,), daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("scheme", ["zpush-zpull", "zpub-zsub", "zrpush-zrpull"])
def test_stream_modes_carry_curve(keys: Keys, ipc_url: Callable[..., str], scheme: str) -> None:
    """Push/pull, pub/sub, and a server that connects to a binding client all work with CURVE end to end."""
    server_scheme, client_scheme = scheme.split("-")
    batches = [[np.full(3, i, np.int32)] for i in range(5)]
    if (
        server_scheme == "zpush"
    ):  # the client binds, the server connects: the server is still the CURVE server
        connection = Connection(ipc_url(client_scheme), timeout=20, **keys.client())
        server = Server(batches, ipc_url(server_scheme), linger=5, **keys.server())
    else:
        server = Server(batches, ipc_url(server_scheme), linger=5, **keys.server())
        connection = Connection(ipc_url(client_scheme), timeout=20, **keys.client())
    thread = serve_thread(server, 5)
    with connection:
        received = [int(connection.recv()[0][0]) for _ in range(5)]
    thread.join(timeout=20)
    assert received == list(range(5))
    assert not authenticator_threads()


def test_stream_client_with_a_refused_key_gets_nothing(keys: Keys, ipc_url: Callable[..., str]) -> None:
    """A stream client whose key is not allowed raises SecurityError and receives no batch; the server goes on."""
    server = Server(None, ipc_url("zpub"), linger=0, send_timeout=10, **keys.server())
    try:
        with (
            Connection(ipc_url("zsub"), timeout=20, **keys.client("mallory")) as mallory,
            pytest.raises(SecurityError, match="refused our credentials"),
        ):
            mallory.recv()
        with Connection(ipc_url("zsub"), timeout=20, **keys.client()) as alice:
            server.send([np.arange(4)])
            assert alice.recv()[0].tolist() == [0, 1, 2, 3]
    finally:
        server.close()
    assert not authenticator_threads()


def test_a_server_that_connects_to_a_refused_client_raises(keys: Keys, ipc_url: Callable[..., str]) -> None:
    """A stream server that connects to a binding client whose key is not allowed raises SecurityError from send()
    instead of waiting; the client receives nothing."""
    with Connection(ipc_url("zpull"), timeout=0.5, **keys.client("mallory")) as mallory:
        server = Server(None, ipc_url("zpush"), linger=0, send_timeout=20, **keys.server())
        try:
            started = time.monotonic()
            with pytest.raises(SecurityError, match="our allow-list refused the peer's public key"):
                server.send([np.arange(4)])
            assert time.monotonic() - started < 10
        finally:
            server.close()
        with pytest.raises(Exception, match="no batch within"):
            mallory.recv()


def test_stream_server_refuses_a_plain_client_and_logs_it(
    keys: Keys, ipc_url: Callable[..., str], caplog: pytest.LogCaptureFixture
) -> None:
    """A plain client of a CURVE stream server gets SecurityError; the server logs the refusal while it waits."""
    server = Server(None, ipc_url("zrpush"), linger=0, send_timeout=1.5, **keys.server())
    with caplog.at_level(logging.WARNING, logger="tensorcom._net.security"):
        with Connection(ipc_url("zrpull"), timeout=20) as plain, pytest.raises(SecurityError):
            plain.recv()
        with pytest.raises(Exception, match="could not send"):
            server.send([np.arange(4)])
        server.close()
    assert "refused a client on" in caplog.text


def test_seek_control_socket_uses_the_same_keys(keys: Keys, ipc_url: Callable[..., str]) -> None:
    """A CURVE stream server's SEEK control socket accepts the allowed client and refuses another."""
    with Connection(ipc_url("zpull"), timeout=20, **keys.client()) as connection:
        server = Server(  # endless, so that the stream cannot end before the server reads the SEEK
            functools.partial(factories.small, repeating=True),
            ipc_url("zpush"),
            seed=2,
            control=ipc_url("zrep", "c"),
            send_timeout=20,
            linger=0,
            **keys.server(),
        )
        thread = threading.Thread(target=server.run, args=(2000,), daemon=True)
        thread.start()
        first = [connection.recv() for _ in range(3)]
        connection.seek(ipc_url("zreq", "c"), epoch=0)
        again = [connection.recv() for _ in range(3)]
        assert_same_batches(again, first)
        with Connection(ipc_url("zpull", "m"), timeout=30, **keys.client("mallory")) as mallory:
            with pytest.raises(SecurityError, match="refused our credentials"):
                mallory.seek(ipc_url("zreq", "c"), epoch=0)
        connection.timeout = 2
        while thread.is_alive():  # read the rest of its 2000 batches: the server then finishes
            try:
                connection.recv()
            except Timeout:
                continue  # the server is slow, or it has sent its last batch and is closing
    thread.join(timeout=20)
    assert not thread.is_alive()


# encryption on the wire


class Relay:
    """A TCP relay on 127.0.0.1 that records every byte going from the server to the client."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.port = self.listener.getsockname()[1]
        self.captured = bytearray()
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.sockets: list[socket.socket] = []
        self._start(self._accept)

    def _start(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self.threads.append(thread)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [client, upstream]
            self._start(self._pump, client, upstream, False)
            self._start(self._pump, upstream, client, True)

    def _pump(self, source: socket.socket, target: socket.socket, record: bool) -> None:
        while True:
            try:
                data = source.recv(1 << 16)
                if not data:
                    return
                if record:
                    with self.lock:
                        self.captured += data
                target.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.listener.close()
        for item in self.sockets:
            item.close()


@pytest.mark.parametrize("curve", [False, True], ids=["plain", "curve"])
def test_batches_are_encrypted_on_the_wire(keys: Keys, curve: bool) -> None:
    """Through a recording relay, a batch's bytes are visible in plain mode and absent with CURVE."""
    secret = np.frombuffer(b"tensorcom-plaintext-marker-" * 40, np.uint8)
    server = Server(None, "zpub://127.0.0.1:0", linger=0, send_timeout=20, **(keys.server() if curve else {}))
    relay = Relay(int(server.endpoints[0].rsplit(":", 1)[1]))
    try:
        with Connection(
            f"zsub://127.0.0.1:{relay.port}", timeout=20, **(keys.client() if curve else {})
        ) as connection:
            server.send([secret])
            assert connection.recv()[0].tobytes() == secret.tobytes()
    finally:
        server.close()
        relay.close()
    assert (b"tensorcom-plaintext-marker-" in bytes(relay.captured)) is not curve
    assert len(relay.captured) > secret.nbytes


def test_authenticator_thread_stops_with_its_server(keys: Keys, tmp_path: Path) -> None:
    """Closing a CURVE server (stream or request) stops its ZAP thread; nothing is left running."""
    before = len(authenticator_threads())
    stream = Server(None, f"zpush+ipc://{tmp_path}/a", **keys.server())
    request = Server(factories.small, f"zrep+ipc://{tmp_path}/b", workers=0, **keys.server())
    assert len(authenticator_threads()) == before + 2
    stream.close()
    request.close()
    assert len(authenticator_threads()) == before
    assert os.path.exists(keys.server_secret)


def test_programs_take_key_options(
    start_process: StartProcess, keys: Keys, ipc_url: Callable[..., str]
) -> None:
    """serve-synthetic takes --server-key/--client-keys; the tools take --client-key/--server-public-key, and a tool
    whose key is refused ends with one clean error line and SecurityError's exit code."""
    from tensorcom_tools import tensorstat

    start_process(
        "-m", "tensorcom_servers.synthetic", "-q", "-b", "2", "--size", "4", "-n", "3", *keys.serve_args()[:2],
        "--client-keys", str(keys.allowed), ipc_url("zrpush"),
    )  # fmt: skip
    allowed = ["--client-key", str(keys.alice), "--server-public-key", str(keys.server_public)]
    result = CliRunner().invoke(tensorstat.main, [ipc_url("zrpull"), "-n", "3", *allowed])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("3 batches")
    start_process(
        "-m", "tensorcom_servers.synthetic", "-q", "-n", "3", *keys.serve_args(), ipc_url("zrpush", "refusing"),
    )  # fmt: skip
    refused = ["--client-key", str(keys.mallory), "--server-public-key", str(keys.server_public)]
    result = CliRunner().invoke(tensorstat.main, [ipc_url("zrpull", "refusing"), "-n", "1", *refused])
    assert result.exit_code == SecurityError.exit_code
    assert result.output.strip().splitlines()[-1].startswith("Error: handshake with ipc://")
