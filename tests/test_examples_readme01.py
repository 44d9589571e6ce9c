"""examples/tensorcom01/readme_commands.py: every command of the tensorcom 0.1 README (the image server, the
training loop, more publishers with braces, the three tools, the ipc transport) runs here as the README types it."""

from __future__ import annotations

import random
import socket
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "examples" / "tensorcom01" / "readme_commands.py"


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive ports that are free on 127.0.0.1 now."""
    for _ in range(200):
        first = random.randrange(20000, 60000 - count)
        probes = [socket.socket() for _ in range(count)]
        try:
            for offset, probe in enumerate(probes):
                probe.bind(("127.0.0.1", first + offset))
            return first
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    raise AssertionError("no run of free ports found")


def test_the_0_1_readme_commands_run(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--port", str(free_ports(4)), "--folder", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert out.rstrip().endswith("all README commands ran"), out
    assert "batch 3: xs uint8 [64, 224, 224, 3] ys int64 [64]" in out  # the training loop, tcp and ipc
    assert "batch 8: xs uint8" in out  # over the four publishers
    ready = [line.split()[1:] for line in out.splitlines() if line.strip().startswith("ready zsub://")]
    assert [len(urls) for urls in ready] == [1, 4]  # one publisher, then four
    assert (tmp_path / "tensorshow.png").stat().st_size > 0
