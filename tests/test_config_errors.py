"""Configuration errors are immediate and secure defaults hold (issue 21, items 6 and 7): a malformed CURVE key is a
one-line error from every entry point, never a hang; bad -b and -o values are refused before a server says ready;
secret key files are private from their first byte; servers without keys listen on this host unless told otherwise."""

from __future__ import annotations

import inspect
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import zmq.auth
from helpers import environment
from imagenet_fixtures import make_image_folder

from tensorcom import ConfigError, Connection
from tensorcom._net.security import generate_keys
from tensorcom.server.request import RequestServer
from tensorcom.server.stream import StreamServer

SECONDS = 60  # a hang fails here, long before pytest's own timeout


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    generate_keys(tmp_path / "keys", clients=["trainer"])
    return tmp_path / "keys"


def spoil(path: Path, field: str = "secret-key") -> Path:
    """A copy of a key file whose ``field`` holds a key of the wrong length."""
    lines = []
    for line in path.read_text().splitlines():
        if line.strip().startswith(field):
            line = line.split("=")[0] + '= "tooshort"'
        lines.append(line)
    spoiled = path.with_name("spoiled_" + path.name)
    spoiled.write_text("\n".join(lines) + "\n")
    os.chmod(spoiled, 0o600)
    return spoiled


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=SECONDS, env=environment()
    )


def one_error_line(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "ready" not in result.stdout
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and all(word in lines[0] for word in words), result.stderr
    assert "Traceback" not in result.stderr


def test_a_malformed_client_key_is_a_config_error(keys: Path) -> None:
    with pytest.raises(ConfigError, match="malformed secret key"):
        Connection(
            "zreq://127.0.0.1:9",
            client_key=spoil(keys / "trainer.key_secret"),
            server_public_key=keys / "server.key",
            timeout=5,
        )
    with pytest.raises(ConfigError, match="malformed public key"):
        Connection(
            "zsub://127.0.0.1:9",
            client_key=keys / "trainer.key_secret",
            server_public_key=spoil(keys / "server.key", "public-key"),
            timeout=5,
        )


@pytest.mark.parametrize("kind", [StreamServer, RequestServer])
def test_a_malformed_server_key_is_a_config_error(keys: Path, kind: Any) -> None:
    source = "factories:small" if kind is RequestServer else None
    url = "zrep://127.0.0.1:0" if kind is RequestServer else "zpub://127.0.0.1:0"
    with pytest.raises(ConfigError, match="malformed secret key"):
        kind(source, url, server_key=spoil(keys / "server.key_secret"), client_keys=keys / "clients")


def test_programs_refuse_a_malformed_key_in_one_line(keys: Path) -> None:
    bad = str(spoil(keys / "server.key_secret"))
    one_error_line(
        run("-m", "tensorcom.cli", "serve", "factories:small", "--bind", "zrep://127.0.0.1:0", "--server-key", bad,
            "--client-keys", str(keys / "clients")),
        "malformed",
    )  # fmt: skip
    one_error_line(
        run("-m", "tensorcom_tools.tensormon", "zsub://127.0.0.1:9", "--client-key",
            str(spoil(keys / "trainer.key_secret")), "--server-public-key", str(keys / "server.key"), "-c", "1"),
        "malformed",
    )  # fmt: skip


def test_bad_factory_options_are_refused_before_ready() -> None:
    serve = ["-m", "tensorcom.cli", "serve", "factories:small", "--bind", "zrep://127.0.0.1:0", "-w", "1"]
    one_error_line(run(*serve, "-o", "no_such_option=1"), "no_such_option")
    one_error_line(run(*serve, "-o", "batch_size=0"), "batch_size")


def test_a_zero_batch_size_is_refused_before_ready(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "images", corrupt=False)
    for url in ("zrep://127.0.0.1:0", "zpub://127.0.0.1:0"):
        one_error_line(
            run("-m", "tensorcom_servers.imagenet_dir", "-d", str(folder), "-b", "0", url), "batch"
        )


def test_secret_key_files_are_private_from_their_first_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever the umask, each secret file is private as soon as it exists (seen the moment it is written, before
    any later chmod could fix it); public keys end up readable by others."""
    seen: dict[str, int] = {}
    create = zmq.auth.create_certificates

    def watched(folder: str, name: str) -> tuple[str, str]:
        public, secret = create(folder, name)
        seen[secret] = stat.S_IMODE(os.stat(secret).st_mode)
        return public, secret

    monkeypatch.setattr(zmq.auth, "create_certificates", watched)
    previous = os.umask(0o022)
    try:
        written = generate_keys(tmp_path / "keys", clients=["a", "b"])
    finally:
        os.umask(previous)
    assert len(seen) == 3 and all(mode & 0o077 == 0 for mode in seen.values()), seen
    public = [path for path in written if path.name.endswith(".key")]
    assert public and all(stat.S_IMODE(path.stat().st_mode) == 0o644 for path in public)


def test_servers_without_keys_listen_on_this_host_by_default() -> None:
    """The default URLs of Server, RequestServer and `tensorcom serve` are loopback ones (binding a real server on
    the default port when it is free)."""
    from tensorcom.cli.main import serve

    defaults = [
        inspect.signature(StreamServer).parameters["urls"].default,
        inspect.signature(RequestServer).parameters["urls"].default,
        *next(p.default for p in serve.params if p.name == "urls"),
    ]
    assert all("127.0.0.1" in url for url in defaults), defaults
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", 7880))
        except OSError:
            pytest.skip("port 7880 is in use on this machine")
    server = StreamServer(None, linger=0)
    try:
        assert server.endpoints == ["tcp://127.0.0.1:7880"]
    finally:
        server.close()
