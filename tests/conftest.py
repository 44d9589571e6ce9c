"""Shared fixtures: real server processes on local sockets, with teardown that never leaves one behind."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from reliability import Keys

SERVER_STOP_SECONDS = 10


@pytest.fixture
def start_process() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start real child processes; on teardown terminate each and join it within a time limit (then kill)."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(*args: str, **options: object) -> subprocess.Popen[bytes]:
        process = subprocess.Popen([sys.executable, *args], **options)  # type: ignore[call-overload]
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(timeout=SERVER_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=SERVER_STOP_SECONDS)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def synthetic_server(
    start_process: Callable[..., subprocess.Popen[bytes]],
) -> Callable[..., subprocess.Popen[bytes]]:
    """Start ``serve-synthetic`` (small batches by default) as a real process sending on the given URLs."""

    def start(
        *urls: str, batch_size: int = 4, size: int = 8, count: int | None = None
    ) -> subprocess.Popen[bytes]:
        args = ["-m", "tensorcom_servers.synthetic", "-q", "-b", str(batch_size), "--size", str(size)]
        if count is not None:
            args += ["-n", str(count)]
        return start_process(*args, *urls)

    return start


@pytest.fixture
def ipc_url(tmp_path: Path) -> Callable[[str, str], str]:
    """Build an ipc URL for a scheme under the test's temporary folder."""

    def make(scheme: str, name: str = "socket") -> str:
        return f"{scheme}+ipc://{tmp_path / name}"

    return make


TESTS = Path(__file__).parent


@pytest.fixture
def request_server(
    start_process: Callable[..., subprocess.Popen[bytes]],
) -> Callable[..., tuple[subprocess.Popen[bytes], str]]:
    """Start `tensorcom serve FACTORY` as a real process (factories from tests/factories.py) and return it with
    its zreq URL once it prints that it is ready."""

    def start(
        factory: str, *options: str, workers: int = 1, port: int = 0
    ) -> tuple[subprocess.Popen[bytes], str]:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
        args = [
            "-m",
            "tensorcom.cli",
            "serve",
            factory,
            "-q",
            "--bind",
            f"zrep://127.0.0.1:{port}",
            "-w",
            str(workers),
        ]
        for option in options:
            args += ["-o", option]
        process = start_process(*args, stdout=subprocess.PIPE, env=env)
        assert process.stdout is not None
        line = process.stdout.readline().decode().split()
        assert line[:1] == [b"ready".decode()], f"server did not start: {line}"
        return process, line[1].replace("tcp://", "zreq://")

    return start


@pytest.fixture
def no_key_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset the TENSORCOM_* CURVE key variables, so that only what a test sets applies (here and in its children)."""
    from tensorcom._net.security import CLIENT_KEY_ENV, CLIENT_KEYS_ENV, SERVER_KEY_ENV, SERVER_PUBLIC_KEY_ENV

    for name in (SERVER_KEY_ENV, CLIENT_KEYS_ENV, CLIENT_KEY_ENV, SERVER_PUBLIC_KEY_ENV):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    """CURVE key files from `tensorcom keygen` under the test's temporary folder (see reliability.Keys)."""
    return Keys(tmp_path / "keys")
