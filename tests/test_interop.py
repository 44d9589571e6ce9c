"""Live interoperability with tensorcom 0.1 (run by `make interop`, which installs it in its own environment)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import factories
import pytest
from helpers import StartProcess, wait_ready
from imagenet_fixtures import make_image_folder, start_image_server

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


# -- an unchanged tensorcom 0.1 client against our default servers ----------------------------------------------------


def original_loop(url: str, count: int) -> subprocess.Popen[str]:
    """tensorcom 0.1's README loop, ``for xs, ys in Connection(url, epoch=...)``, over ``count`` batches."""
    return subprocess.Popen(
        [str(ORIGINAL), PEER, "loop", url, str(count)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def loop_output(process: subprocess.Popen[str]) -> list[list[Any]]:
    """The 0.1 loop's lines (shape, dtype, labels), once it has ended well."""
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    return [json.loads(line) for line in out.splitlines() if line.startswith("[")]


@pytest.mark.parametrize("server_binds", [False, True], ids=["zpush", "zrpush"])
def test_the_original_reads_a_default_pipeline_server_over_ipc(tmp_path: Path, server_binds: bool) -> None:
    """A pipeline server with default options (metadata on, shared memory on) sends 2 MB batches over ipc; 0.1's
    loop unpacks exactly (xs, ys) from each, the same batches the pipeline made."""
    url = f"ipc://{tmp_path}/s"
    server_url, client_url = (
        (f"zrpush+{url}", f"zrpull+{url}") if server_binds else (f"zpush+{url}", f"zpull+{url}")
    )
    process = original_loop(client_url, 4)
    server = Server(factories.big, server_url, seed=3, linger=30, send_timeout=60)
    thread = threading.Thread(target=server.run, kwargs={"count": 4})
    thread.start()
    lines = loop_output(process)
    thread.join(timeout=60)
    expected = factories.big(seed=3, rank=0, world_size=1)
    labels = [next(expected)[1].tolist() for _ in range(4)]
    assert lines == [[[2, 1 << 20], "uint8", batch_labels] for batch_labels in labels]


def test_the_original_readme_loop_runs_against_a_default_image_server(
    tmp_path: Path, start_process: StartProcess
) -> None:
    """The 0.1 README: `serve-imagenet-dir -d DIR -b 64 zpub://...` (here a small batch and image size, every other
    flag at its default) and `for xs, ys in tensorcom.Connection("zsub://...", epoch=1000000)` in 0.1."""
    folder = make_image_folder(tmp_path / "images", corrupt=False)
    _, url = start_image_server(
        start_process,
        "imagenet_dir",
        tmp_path / "server.log",
        "-d",
        str(folder),
        "-b",
        "4",
        "--size",
        "16",
        url="zpub://127.0.0.1:0",
    )
    lines = loop_output(original_loop(url, 5))
    assert len(lines) == 5
    for shape, dtype, labels in lines:
        assert (shape, dtype) == ([4, 16, 16, 3], "uint8")
        assert len(labels) == 4 and set(labels) <= {0, 1, 2}


def test_the_original_receives_every_batch_of_brace_publishers_once(
    tmp_path: Path, start_process: StartProcess
) -> None:
    """The 0.1 README's "more publishers": `serve-imagenet-dir ... zpub://127.0.0.1:788{0..3}`-style braces start
    one publisher each, and 0.1's client of the same brace URL reads their batches."""
    folder = make_image_folder(tmp_path / "images", corrupt=False)
    process = start_process(
        "-m",
        "tensorcom_servers.imagenet_dir",
        *("-d", str(folder), "-b", "2", "--size", "8", "-w", "0", "--seed", "4", "--no-augment"),
        f"zpub+ipc://{tmp_path}/p{{0..2}}",
        stdout=subprocess.PIPE,
        stderr_log=tmp_path / "server.log",
    )
    assert wait_ready(process).endswith("/p0")
    lines = loop_output(original_loop(f"zsub+ipc://{tmp_path}/p{{0..2}}", 6))
    assert len(lines) == 6 and all(shape == [2, 8, 8, 3] for shape, _, _ in lines)
