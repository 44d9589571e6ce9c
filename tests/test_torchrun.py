"""Two ranks under torchrun (gloo, CPU) against two zrep servers."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import factories
from helpers import StartServer


def test_two_ranks_under_torchrun_get_disjoint_complete_reference_batches(
    request_server: StartServer, tmp_path: Path
) -> None:
    """Each rank's batches equal the single-process reference for that rank; together they cover the epoch once."""
    urls = [request_server("factories:small", "n=64", workers=1)[1] for _ in range(2)]
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node=2",
            str(Path(__file__).with_name("torchrun_rank.py")),
            str(tmp_path),
            *urls,
        ],
        check=True,
        timeout=180,
        env=env,
        capture_output=True,
    )
    seen: list[int] = []
    for rank in range(2):
        received = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        expected: list[dict[str, Any]] = []
        with factories.small(seed=11, rank=rank, world_size=2, n=64) as pipeline:
            for images, labels in pipeline:
                expected.append(
                    {"labels": labels.tolist(), "digest": hashlib.sha256(images.tobytes()).hexdigest()}
                )
        assert received == expected
        seen += [label for batch in received for label in batch["labels"]]
    assert sorted(seen) == list(range(64))
