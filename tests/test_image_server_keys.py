"""CURVE keys and SIGTERM drain for the image servers (serve-imagenet-dir, serve-imagenet-shards) and the key
options of the monitoring tools: real server processes, key files from `tensorcom keygen`, 127.0.0.1 and ipc only."""

from __future__ import annotations

import re
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import StartProcess, assert_same_batches, wait_until
from imagenet_fixtures import make_image_folder, make_shards, start_image_server
from reliability import Keys

from tensorcom import Connection, SecurityError
from tensorcom.datasets.imagenet import directory_pipeline
from tensorcom_servers import imagenet_dir, imagenet_shards
from tensorcom_tools import tensormon, tensorshow, tensorstat

pytestmark = pytest.mark.usefixtures("no_key_variables")

SIZE = 16
BATCH = 4


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images", corrupt=False)


def image_server(
    start_process: StartProcess, folder: Path, log_file: Path, *args: str, drain: float = 0, **options: Any
) -> tuple[subprocess.Popen[bytes], str]:
    """serve-imagenet-dir on ``folder`` with small batches and inline decoding, plus ``args``. ``drain`` is 0
    unless a test is about draining, so that teardown's SIGTERM stops the server at once."""
    common = ("-d", str(folder), "-b", str(BATCH), "--size", str(SIZE), "-w", "0", "--drain", str(drain))
    return start_image_server(start_process, "imagenet_dir", log_file, *common, *args, **options)


def reference(folder: Path, seed: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The first ``count`` batches of the folder's pipeline for ``seed``, computed in this process."""
    with directory_pipeline(directory=str(folder), seed=seed, batch_size=BATCH, size=SIZE) as pipeline:
        return [next(pipeline) for _ in range(count)]


@pytest.mark.parametrize("keys_by", ["option", "variable"])
def test_keyed_image_server_serves_an_allowed_client_its_exact_stream(
    folder: Path,
    tmp_path: Path,
    start_process: StartProcess,
    keys: Keys,
    monkeypatch: pytest.MonkeyPatch,
    keys_by: str,
) -> None:
    """serve-imagenet-dir with keys by --server-key/--client-keys, or by $TENSORCOM_SERVER_KEY/$TENSORCOM_CLIENT_KEYS,
    sends an allowed client (keys by argument, or by $TENSORCOM_CLIENT_KEY/$TENSORCOM_SERVER_PUBLIC_KEY) the same
    batches as the in-process pipeline."""
    log_file = tmp_path / "server.log"
    if keys_by == "option":
        _, url = image_server(start_process, folder, log_file, *keys.serve_args())
        client = keys.client()
    else:
        _, url = image_server(start_process, folder, log_file, env=keys.server_variables())
        for name, value in keys.client_variables().items():
            monkeypatch.setenv(name, value)
        client = {}
    with Connection(url, seed=5, timeout=30, **client) as connection:
        received = [connection.recv() for _ in range(4)]
    assert_same_batches(received, reference(folder, seed=5, count=4))


@pytest.mark.parametrize("client", ["plain", "mallory"], ids=["no-key", "key-not-allowed"])
def test_keyed_image_server_refuses_a_client_without_an_allowed_key(
    folder: Path, tmp_path: Path, start_process: StartProcess, keys: Keys, client: str
) -> None:
    """A client with no key, or with a key not on the allow-list, gets SecurityError and no batch; the server logs
    the refusal."""
    log_file = tmp_path / "server.log"
    _, url = image_server(start_process, folder, log_file, env=keys.server_variables())
    options = keys.client("mallory") if client == "mallory" else {}
    with pytest.raises(SecurityError, match=re.escape(url.split("//")[1])):
        Connection(url, seed=5, timeout=30, **options)
    with Connection(url, seed=5, timeout=30, **keys.client()) as connection:  # the server goes on
        connection.recv()
    # the server logs refusals when it next looks at its peers (every 0.25 s)
    assert wait_until(lambda: "refused a client" in log_file.read_text()), log_file.read_text()


def test_keyed_shard_server_in_stream_mode(
    folder: Path, tmp_path: Path, start_process: StartProcess, keys: Keys, ipc_url: Callable[..., str]
) -> None:
    """serve-imagenet-shards sends its stream to an allowed client and refuses a plain one (stream sockets)."""
    pattern = make_shards(folder, tmp_path / "shards", per_shard=4)
    start_image_server(
        start_process,
        "imagenet_shards",
        tmp_path / "server.log",
        *("-s", pattern, "-b", str(BATCH), "--size", str(SIZE), "-w", "0", "--seed", "3"),
        *keys.serve_args(),
        url=ipc_url("zpub"),
    )
    with Connection(ipc_url("zsub"), timeout=30) as plain, pytest.raises(SecurityError):
        plain.recv()
    with Connection(ipc_url("zsub"), timeout=30, **keys.client()) as connection:
        images, labels = connection.recv()
    assert images.shape == (BATCH, SIZE, SIZE, 3) and labels.shape == (BATCH,)


def test_sigterm_drains_a_keyed_image_server(
    folder: Path, tmp_path: Path, start_process: StartProcess, keys: Keys
) -> None:
    """SIGTERM makes a zrep image server answer the requests it holds (a client's prefetch), then exit 0."""
    log_file = tmp_path / "server.log"
    process, url = image_server(start_process, folder, log_file, *keys.serve_args(), drain=5)
    with Connection(url, seed=1, timeout=30, **keys.client()) as connection:
        connection.recv()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    log = log_file.read_text()
    assert "draining: finishing" in log and "drained" in log and "drain time over" not in log


SERVER_OPTIONS = (
    "--server-key",
    "--client-keys",
    "$TENSORCOM_SERVER_KEY",
    "$TENSORCOM_CLIENT_KEYS",
    "--drain",
)
CLIENT_OPTIONS = (
    "--client-key",
    "--server-public-key",
    "$TENSORCOM_CLIENT_KEY",
    "$TENSORCOM_SERVER_PUBLIC_KEY",
)


@pytest.mark.parametrize(
    "program, options",
    [
        (imagenet_dir, SERVER_OPTIONS),
        (imagenet_shards, SERVER_OPTIONS),
        (tensormon, CLIENT_OPTIONS),
        (tensorshow, CLIENT_OPTIONS),
        (tensorstat, CLIENT_OPTIONS),
    ],
    ids=["serve-imagenet-dir", "serve-imagenet-shards", "tensormon", "tensorshow", "tensorstat"],
)
def test_help_lists_the_key_options(program: Any, options: tuple[str, ...]) -> None:
    """--help of the image servers lists --server-key/--client-keys, their variables and --drain; that of every
    monitoring tool --client-key/--server-public-key and their variables."""
    result = CliRunner().invoke(program.main, ["--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert [option for option in options if option not in result.output] == []


def test_tool_takes_client_keys_from_the_variables(
    folder: Path, tmp_path: Path, start_process: StartProcess, keys: Keys
) -> None:
    """tensorstat with only $TENSORCOM_CLIENT_KEY/$TENSORCOM_SERVER_PUBLIC_KEY set reads a keyed image server."""
    _, url = image_server(start_process, folder, tmp_path / "server.log", *keys.serve_args())
    result = CliRunner().invoke(tensorstat.main, [url, "-n", "2", "--seed", "1"], env=keys.client_variables())
    assert result.exit_code == 0, result.output
    assert result.output.startswith("2 batches")
