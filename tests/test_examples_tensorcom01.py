"""examples/tensorcom01: the tensorcom 0.1 README's training loop, its import line changed, against real servers."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import StartProcess, environment, wait_ready

TRAIN_LOOP = Path(__file__).resolve().parent.parent / "examples" / "tensorcom01" / "train_loop.py"
RUN_SECONDS = 120

# A pipeline server (its batches carry our stream metadata) in a process of its own: python -c PIPELINE_SERVER URL
PIPELINE_SERVER = """
import sys
from factories import small
from tensorcom.server.stream import StreamServer
server = StreamServer(small(seed=1, rank=0, world_size=1, n=10_000, batch_size=4), sys.argv[1], linger=5)
print("ready", *server.client_urls, flush=True)
server.run()
"""


def run_train_loop(url: str, batches: int) -> list[str]:
    """Run the example to its end; the lines it printed (one per batch), failing with its stderr."""
    completed = subprocess.run(
        [sys.executable, str(TRAIN_LOOP), url, str(batches)],
        capture_output=True,
        text=True,
        timeout=RUN_SECONDS,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed.stdout.splitlines()


def test_the_readme_loop_trains_on_a_synthetic_publisher(start_process: StartProcess) -> None:
    """Against serve-synthetic on zpub (the README's kind of server), the loop unpacks `xs, ys` from each of the
    batches it asked for, then stops."""
    process = start_process(
        "-m",
        "tensorcom_servers.synthetic",
        "-q",
        "-b",
        "4",
        "--size",
        "8",
        "zpub://127.0.0.1:0",
        stdout=subprocess.PIPE,
    )
    lines = run_train_loop(wait_ready(process), 7)
    assert lines == [f"batch {i}: xs uint8 [4, 8, 8, 3] ys int64 [4]" for i in range(1, 8)]


@pytest.mark.parametrize("scheme", ["zpub", "zrpush"])
def test_the_readme_loop_sees_just_xs_and_ys_from_a_pipeline_server(
    start_process: StartProcess, scheme: str
) -> None:
    """A pipeline server adds metadata to every batch; the 0.1 loop still unpacks exactly `xs, ys`."""
    process = start_process(
        "-c", PIPELINE_SERVER, f"{scheme}://127.0.0.1:0", stdout=subprocess.PIPE, env=environment()
    )
    lines = run_train_loop(wait_ready(process), 5)
    assert len(lines) == 5
    assert all(re.fullmatch(r"batch \d: xs uint8 \[4, 4, 4, 3\] ys int64 \[4\]", line) for line in lines), (
        lines
    )
