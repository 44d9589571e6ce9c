"""A training-rank stand-in for multi-host tests: receive batches and print one JSON object per line.

    python netns_client.py URL... [--count N] [--pause-at STEP ...] [zreq options] [--sleep S] [--announce]

Per batch: ``{"batch": k, "step", "epoch", "server", "labels", "digest"}`` (``digest``: SHA-256 of every array's
dtype, shape and bytes, as :func:`digest` computes it in the test process). After the batch numbered by
``--pause-at`` it prints ``{"paused": k}`` and waits for a line on stdin, so a test can change the network at a
known point; ``--timeout-after-pause`` then replaces ``--timeout``, so that a short timeout under test does not also
time the start-up. With ``--announce`` it first prints ``{"connected": true}`` once its sockets are open. It ends
with ``{"done": count}``, or ``{"error": "Timeout", "message": ...}`` when ``recv`` times out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from tensorcom import Connection, Timeout


def digest(batch: Sequence[Any]) -> str:
    """SHA-256 over the dtype, shape and bytes of every array of a batch."""
    sha = hashlib.sha256()
    for array in batch:
        array = np.ascontiguousarray(array)
        sha.update(f"{array.dtype.str}{array.shape}".encode())
        sha.update(array.tobytes())
    return sha.hexdigest()


def emit(**record: Any) -> None:
    print(json.dumps(record), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("urls", nargs="+")
    parser.add_argument("--count", type=int, default=None, help="Batches to receive (default: one epoch).")
    parser.add_argument("--pause-at", type=int, action="append", default=[])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--prefetch", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--timeout-after-pause", type=float, default=None)
    parser.add_argument("--announce", action="store_true", help='Print {"connected": true} once connected.')
    parser.add_argument("--heartbeat", type=float, default=0.2)
    parser.add_argument("--dead-after", type=float, default=1.0)
    parser.add_argument("--sleep", type=float, default=0.0, help="Seconds of 'training' after each batch.")
    args = parser.parse_args(argv)
    zreq = all(url.startswith("zreq") for url in args.urls)
    options: dict[str, Any] = {"timeout": args.timeout}
    if zreq:
        options.update(
            seed=args.seed,
            rank=args.rank,
            world_size=args.world_size,
            prefetch=args.prefetch,
            heartbeat=args.heartbeat,
            dead_after=args.dead_after,
        )
    received = 0
    try:
        with Connection(args.urls, **options) as connection:
            if args.announce:
                emit(connected=True)
            while args.count is None or received < args.count:
                try:
                    batch = connection.recv()
                except StopIteration:
                    break
                emit(
                    batch=received,
                    step=connection.last.step,
                    epoch=connection.last.epoch,
                    server=connection.last.endpoint,
                    labels=np.asarray(batch[1]).tolist(),
                    digest=digest(batch),
                )
                if received in args.pause_at:
                    emit(paused=received)
                    sys.stdin.readline()
                    if args.timeout_after_pause is not None:
                        connection.timeout = args.timeout_after_pause
                received += 1
                if args.sleep:
                    time.sleep(args.sleep)
    except Timeout as error:
        emit(error="Timeout", message=str(error), received=received)
        return 4
    emit(done=received)
    return 0


if __name__ == "__main__":
    sys.exit(main())
