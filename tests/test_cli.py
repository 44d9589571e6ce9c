"""The `tensorcom` command and `serve-synthetic`: help, the demo, and clean one-line errors."""

from __future__ import annotations

import importlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq
from click.testing import CliRunner
from helpers import StartProcess, children_of, environment, serve_args, wait_ready, wait_until_gone

import tensorcom
from tensorcom.cli import main
from tensorcom.cli.main import DEMO_READY_TIMEOUT
from tensorcom.client import Connection
from tensorcom_servers.synthetic import main as serve_synthetic


def test_demo_prints_a_throughput_line() -> None:
    """`tensorcom demo` runs a server process, receives in order, and reports batches/s and GB/s."""
    result = CliRunner().invoke(main, ["demo", "--seconds", "1", "-b", "8", "--size", "32"])
    assert result.exit_code == 0, result.output
    match = re.search(
        r"received (\d+) batches of \(8, 32, 32, 3\).*: ([\d.]+) batches/s, ([\d.]+) GB/s", result.output
    )
    assert match, result.output
    assert int(match.group(1)) > 0 and float(match.group(2)) > 0


def test_demo_with_a_tcp_server_url_connects_to_the_url_the_server_prints() -> None:
    """--url takes the server's URL (zpub, port 0); the client subscribes to the zsub URL of its ready line and
    receives in order (from whichever batch it joins at)."""
    result = CliRunner().invoke(
        main, ["demo", "--seconds", "0.5", "-b", "4", "--size", "8", "--url", "zpub://127.0.0.1:0"]
    )
    assert result.exit_code == 0, result.output
    assert re.search(r"client: Connection\('zsub://127\.0\.0\.1:\d+'\)", result.output), result.output
    assert re.search(r"received \d+ batch(es)? of \(4, 8, 8, 3\)", result.output), result.output


def test_demo_needs_seconds_above_zero_and_survives_a_short_run() -> None:
    """--seconds 0 is refused as a usage error (exit 2); a very short run still receives one batch and reports it."""
    refused = CliRunner().invoke(main, ["demo", "--seconds", "0"])
    assert refused.exit_code == 2 and "--seconds" in refused.output
    short = CliRunner().invoke(main, ["demo", "--seconds", "1e-9", "-b", "2", "--size", "4"])
    assert short.exit_code == 0, short.output
    assert "received 1 batch of (2, 4, 4, 3)" in short.output


@pytest.mark.parametrize(
    "url, found",
    [
        ("zpull://127.0.0.1:7880", "a client's URL (its server side is zpush://)"),
        ("zrsub+ipc:///tmp/x", "a client's URL (its server side is zrpub://)"),
        ("zrep://127.0.0.1:7880", "a request server's URL"),
        ("zpub://127.0.0.1:{1,2}", "2 URLs"),
        ("zpub+inproc://demo", "inproc, which cannot reach another process"),
        ("zfoo://127.0.0.1:1", "unknown scheme 'zfoo'"),
    ],
    ids=["client-pull", "client-sub", "request-server", "two-urls", "inproc", "unknown-scheme"],
)
def test_demo_refuses_a_url_its_server_cannot_send_on(url: str, found: str) -> None:
    """A client URL, a request URL, several URLs or inproc are refused before any server starts (exit 2), with a
    message that says the server's stream URL is expected."""
    result = CliRunner().invoke(main, ["demo", "--url", url])
    assert result.exit_code == 2
    assert "Invalid value for '--url'" in result.output and found in result.output
    assert "server's URL: one stream URL it sends on" in result.output
    assert "server:" not in result.output


def test_demo_shows_why_its_server_failed(tmp_path: Path) -> None:
    """When the server cannot bind (the address is taken), the demo ends at once with the server's own error
    instead of waiting for batches."""
    with zmq.Context() as context, context.socket(zmq.PUB) as taken:
        taken.setsockopt(zmq.LINGER, 0)
        taken.bind("tcp://127.0.0.1:0")
        address = taken.getsockopt_string(zmq.LAST_ENDPOINT).replace("tcp://", "zpub://")
        started = time.monotonic()
        result = CliRunner().invoke(main, ["demo", "--seconds", "1", "--url", address])
    assert result.exit_code == 1
    assert "the demo server exited with code 2" in result.output
    assert "Address already in use" in result.output
    assert time.monotonic() - started < DEMO_READY_TIMEOUT


def test_help_explains_the_commands() -> None:
    """--help lists the demo and explains serve-synthetic's options."""
    assert "demo" in CliRunner().invoke(main, ["--help"]).output
    output = CliRunner().invoke(serve_synthetic, ["--help"]).output
    for option in ("--batch-size", "--count", "--queue", "URLS"):
        assert option in output


PROGRAMS = {
    "tensorcom": "tensorcom.cli.main",
    "tensormon": "tensorcom_tools.tensormon",
    "tensorshow": "tensorcom_tools.tensorshow",
    "tensorstat": "tensorcom_tools.tensorstat",
    "serve-synthetic": "tensorcom_servers.synthetic",
    "serve-imagenet-dir": "tensorcom_servers.imagenet_dir",
    "serve-imagenet-shards": "tensorcom_servers.imagenet_shards",
}


@pytest.mark.parametrize("program", list(PROGRAMS), ids=list(PROGRAMS))
def test_every_program_prints_its_version(program: str) -> None:
    """PROGRAM --version prints the program's name and tensorcom's version, and exits 0."""
    command = importlib.import_module(PROGRAMS[program]).main
    result = CliRunner().invoke(command, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output == f"{program} {tensorcom.__version__}\n"


def test_bad_url_is_one_clean_line_with_exit_code() -> None:
    """A bad URL ends serve-synthetic with one 'Error:' line and exit code 2, no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "tensorcom_servers.synthetic", "zpull://127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "Error: 'zpull://127.0.0.1:0': a stream Server cannot use a zpull (PULL) socket; "
        "expected one of PUB, PUSH socket types"
    ]


def test_sigterm_stops_a_serving_server_cleanly(tmp_path: Path) -> None:
    """serve-synthetic exits 0 on SIGTERM while blocked waiting for a client."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tensorcom_servers.synthetic", "-q", f"zrpush+ipc://{tmp_path}/s"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stdout.readline().startswith("ready ")  # its SIGTERM handler is in place from here on
    process.terminate()
    _, errors = process.communicate(timeout=60)
    assert process.returncode == 0
    assert "Traceback" not in errors


def test_import_tensorcom_pulls_in_neither_torch_nor_zmq_until_used() -> None:
    """`import tensorcom` loads neither torch nor zmq; the codec, URLs and pipeline never need zmq."""
    code = (
        "import sys, tensorcom, tensorcom.codec, tensorcom.urls, tensorcom.pipeline\n"
        "print('torch' in sys.modules, 'zmq' in sys.modules)\n"
        "tensorcom.Connection\n"
        "print('torch' in sys.modules, 'zmq' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.split() == ["False", "False", "False", "True"]


def test_public_names_are_sorted_and_importable() -> None:
    """tensorcom.__all__ is sorted and every name in it resolves."""
    import tensorcom

    assert tensorcom.__all__ == sorted(tensorcom.__all__)
    for name in tensorcom.__all__:
        assert getattr(tensorcom, name) is not None


# tensorcom serve: shutdown ---------------------------------------------------------------------------------------


def _worker_pids(pid: int) -> list[int]:
    """The worker processes of a request server: its children started by multiprocessing's spawn."""
    found = []
    for child in children_of(pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as cmdline:
                if b"spawn_main" in cmdline.read():
                    found.append(child)
        except FileNotFoundError:
            pass
    return found


def _serve_slowly(
    start_process: StartProcess, log: Path, workers: int = 2
) -> tuple[subprocess.Popen[bytes], str]:
    """`tensorcom serve` of 2 MB batches that take about a second each, in a process group of its own."""
    args = serve_args("factories:big", "-o", "delay=0.5", "--drain", "60", workers=workers)
    process = start_process(
        *args, stdout=subprocess.PIPE, env=environment(), start_new_session=True, stderr_log=log
    )
    return process, wait_ready(process)


def test_sigterm_to_the_process_group_restarts_no_worker(start_process: StartProcess, tmp_path: Path) -> None:
    """SIGTERM to the process group of `tensorcom serve -w 2` with requests in flight (the workers die of it too):
    the server exits 0 within the drain time, without restarting a worker or warning that one died."""
    log = tmp_path / "serve.stderr"
    process, url = _serve_slowly(start_process, log)
    with Connection(url, timeout=60) as connection:
        connection.recv()  # both workers are up; the next steps are being computed
        workers = _worker_pids(process.pid)
        assert len(workers) == 2
        os.killpg(process.pid, signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    errors = log.read_text()
    assert "restarting" not in errors and "died" not in errors and "Traceback" not in errors, errors
    assert wait_until_gone(workers, 20) == []


def test_a_worker_killed_by_sigterm_alone_is_restarted(start_process: StartProcess, tmp_path: Path) -> None:
    """A worker killed by SIGTERM while the server is not stopping is restarted (with a warning) and the stream goes
    on: the wait for a group SIGTERM to reach the front end does not stop supervision."""
    log = tmp_path / "serve.stderr"
    process, url = _serve_slowly(start_process, log, workers=1)
    with Connection(url, timeout=60) as connection:
        connection.recv()
        (worker,) = _worker_pids(process.pid)
        os.kill(worker, signal.SIGTERM)
        steps = [connection.last.step]
        for _ in range(3):
            connection.recv()
            steps.append(connection.last.step)
    assert steps == [0, 1, 2, 3]
    assert process.poll() is None
    assert "restarting it" in log.read_text()
