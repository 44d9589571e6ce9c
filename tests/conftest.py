"""Shared fixtures: real server processes on local sockets, with teardown that never leaves one behind."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import factories
import pytest
from helpers import MakeSocket, Processes, StartProcess, TrackedContext, close_and_term, serve
from reliability import Keys

from tensorcom.server.request import RequestServer


@pytest.fixture
def start_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartProcess]:
    """Start real child processes (``python ARGS``, stderr to a log shown when a wait fails); on teardown terminate
    each and join it within a time limit (then kill)."""
    processes = Processes(tmp_path_factory.mktemp("stderr"))
    yield processes.start
    processes.stop()


@pytest.fixture
def context() -> Iterator[TrackedContext]:
    """A zmq context for the test; on teardown its sockets are closed with linger=0 and term() has a time limit
    (the test fails naming the sockets still open instead of hanging)."""
    made = TrackedContext()
    yield made
    close_and_term(made)


@pytest.fixture
def socket(context: TrackedContext) -> MakeSocket:
    """Make a socket of the test's context: ``socket(zmq.PUSH)``; closed with linger=0 on teardown."""
    return context.socket


@pytest.fixture
def synthetic_server(start_process: StartProcess) -> StartProcess:
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


@pytest.fixture
def request_server(start_process: StartProcess) -> Callable[..., tuple[subprocess.Popen[bytes], str]]:
    """Start `tensorcom serve FACTORY` as a real process (factories from tests/factories.py) with each OPTION as
    ``-o OPTION``, and return it with its zreq URL once it prints that it is ready."""

    def start(
        factory: str, *options: str, workers: int = 1, port: int = 0
    ) -> tuple[subprocess.Popen[bytes], str]:
        pairs = [word for option in options for word in ("-o", option)]
        return serve(start_process, factory, *pairs, workers=workers, port=port)

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


@pytest.fixture
def serving() -> Iterator[Callable[..., RequestServer]]:
    """Start a RequestServer in a thread of this process: ``serving(url="zrep://127.0.0.1:0", factory=
    factories.small, **options) -> server``; each is stopped and its thread joined at teardown."""
    started: list[tuple[RequestServer, threading.Thread]] = []

    def start(
        url: str = "zrep://127.0.0.1:0", factory: Any = factories.small, **options: Any
    ) -> RequestServer:
        server = RequestServer(factory, url, **options)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        started.append((server, thread))
        return server

    yield start
    for server, thread in started:
        server.stop()
        thread.join(timeout=30)
