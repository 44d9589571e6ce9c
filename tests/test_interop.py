"""Live interoperability with tensorcom 0.1 (run by `make interop`, which installs it in its own environment)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tensorcom import Connection, Server, codec

sys.path.insert(0, str(Path(__file__).parent / "interop"))
from tc01_peer import batch, check  # noqa: E402

PEER = str(Path(__file__).parent / "interop" / "tc01_peer.py")
ORIGINAL = os.environ.get("TENSORCOM_01_PYTHON")
pytestmark = pytest.mark.skipif(
    not ORIGINAL, reason="set TENSORCOM_01_PYTHON (make interop) to run against 0.1"
)


def run_original(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ORIGINAL), PEER, *args], capture_output=True, text=True, timeout=60)


def test_original_server_feeds_our_connection() -> None:
    """Batches sent by tensorcom 0.1's Connection arrive intact in ours."""
    with Connection("zpull://127.0.0.1:0", timeout=30) as connection:
        port = connection.endpoints[0].rsplit(":", 1)[1]
        result: list[subprocess.CompletedProcess[str]] = []
        thread = threading.Thread(
            target=lambda: result.append(run_original("serve", f"zpush://127.0.0.1:{port}", "3"))
        )
        thread.start()
        for i in range(3):
            check(connection.recv(), i)
        thread.join(timeout=60)
    assert result[0].returncode == 0, result[0].stderr


def test_our_server_feeds_the_original_connection() -> None:
    """tensorcom 0.1's Connection reads our Server's batches."""
    server = Server((batch(i) for i in range(3)), "zrpush://127.0.0.1:0", linger=30)
    port = server.endpoints[0].rsplit(":", 1)[1]
    process = subprocess.Popen([str(ORIGINAL), PEER, "receive", f"zrpull://127.0.0.1:{port}", "3"])
    assert server.run() == 3
    assert process.wait(timeout=60) == 0


def test_files_cross_both_ways(tmp_path: Path) -> None:
    """0.1 reads our files in the original framing; we read its files; it refuses (not misreads) aligned ones."""
    theirs = tmp_path / "theirs.ten"
    assert run_original("save", str(theirs)).returncode == 0
    check(codec.load(theirs), 7)
    ours = tmp_path / "ours.ten"
    codec.save(ours, batch(7), aligned=False)
    assert run_original("load", str(ours)).returncode == 0
    codec.save(ours, batch(7))
    refused = run_original("load", str(ours))
    assert refused.returncode != 0 and "ok" not in refused.stdout
