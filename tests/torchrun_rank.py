"""One rank of the multi-rank test, run under `torchrun --nproc_per_node=2` (gloo, CPU).

    torchrun --standalone --nproc_per_node=2 tests/torchrun_rank.py OUTPUT_DIR URL...

Each rank joins the process group, opens a zreq Connection with no rank or world size given (so both come from
torch.distributed), reads its share of one epoch and writes the labels and a digest of every batch to
OUTPUT_DIR/rank-R.json. The ranks also check with an all_gather that their states agree after every step.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch.distributed as dist

from tensorcom import Connection


def main(output: str, *urls: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    batches = []
    with Connection(list(urls), seed=11, timeout=60) as connection:
        if (connection.rank, connection.world_size) != (rank, dist.get_world_size()):
            raise SystemExit(f"rank {rank}: the Connection did not take its rank from torch.distributed")
        for images, labels in connection:
            batches.append(
                {"labels": labels.tolist(), "digest": hashlib.sha256(images.tobytes()).hexdigest()}
            )
            states: list[object] = [None, None]
            dist.all_gather_object(states, connection.state())
            if states[0] != states[1]:
                raise SystemExit(f"rank {rank}: states differ across ranks at step {connection.last.step}")
    Path(output, f"rank-{rank}.json").write_text(json.dumps(batches))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
