"""The `tensorcom` command and `serve-synthetic`: help, the demo, and clean one-line errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from tensorcom.cli import main
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


def test_help_explains_the_commands() -> None:
    """--help lists the demo and explains serve-synthetic's options."""
    assert "demo" in CliRunner().invoke(main, ["--help"]).output
    output = CliRunner().invoke(serve_synthetic, ["--help"]).output
    for option in ("--batch-size", "--count", "--queue", "URLS"):
        assert option in output


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
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        process.wait(timeout=2)
    except subprocess.TimeoutExpired:
        process.terminate()
    _, errors = process.communicate(timeout=20)
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
