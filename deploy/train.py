"""An example training rank fed by tensorcom zreq servers; the Slurm, Kubernetes and torchrun recipes all run it.

    python train.py --servers 'zreq://cpu{1,2}:7880' [--checkpoint ckpt.json] [--steps N] [--distributed]
    python train.py --servers-dns tensorcom-data.default.svc.cluster.local:7880 ...

Rank and world size come from torch.distributed (``--distributed``, under torchrun), else from $RANK and
$WORLD_SIZE, else 0 and 1. Every rank saves ``connection.state()`` in its checkpoint (it is the same on every rank
of a synchronous job); a restarted job, with any number of servers and any world size, continues the epoch from it.
CURVE keys, if any, come from $TENSORCOM_CLIENT_KEY and $TENSORCOM_SERVER_PUBLIC_KEY.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tensorcom import Connection, Timeout


def urls_from_dns(name: str, port: int) -> list[str]:
    """One zreq URL per address of ``name``: a headless Service resolves to the IPs of all its ready pods."""
    addresses = sorted({str(info[4][0]) for info in socket.getaddrinfo(name, port, proto=socket.IPPROTO_TCP)})
    if not addresses:
        raise SystemExit(f"error: {name} resolves to no address")
    return [
        f"zreq://[{address}]:{port}" if ":" in address else f"zreq://{address}:{port}"
        for address in addresses
    ]


def load_checkpoint(path: Path | None) -> dict[str, Any]:
    if path is None or not path.exists():
        return {}
    return dict(json.loads(path.read_text()))


def save_checkpoint(path: Path, checkpoint: dict[str, Any]) -> None:
    """Write atomically: a job killed mid-write keeps the previous checkpoint."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(checkpoint))
    os.replace(temporary, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--servers", help="zreq URLs of the data servers (braces expand).")
    source.add_argument("--servers-dns", metavar="NAME:PORT", help="A DNS name listing every server (k8s).")
    parser.add_argument("--seed", type=int, default=0, help="Data order seed: the same on every rank.")
    parser.add_argument("--steps", type=int, default=None, help="Stop after this many batches in total.")
    parser.add_argument("--checkpoint", type=Path, default=None, help="JSON file to resume from and save to.")
    parser.add_argument("--save-every", type=int, default=100, help="Batches between checkpoints.")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="Seconds without a batch before giving up."
    )
    parser.add_argument("--distributed", action="store_true", help="Join torch.distributed (under torchrun).")
    args = parser.parse_args(argv)

    if args.distributed:
        import torch.distributed

        torch.distributed.init_process_group("gloo")  # use "nccl" for GPU tensors
    if args.servers_dns:
        name, _, port = args.servers_dns.rpartition(":")
        urls: str | list[str] = urls_from_dns(name, int(port))
    else:
        urls = args.servers
    rank = int(os.environ.get("RANK", 0))
    checkpoint = load_checkpoint(args.checkpoint)
    step = int(checkpoint.get("step", 0))
    started = time.monotonic()
    try:
        with Connection(
            urls, seed=args.seed, state=checkpoint.get("loader"), timeout=args.timeout
        ) as connection:
            for _images, _labels in connection:
                # the forward and backward pass go here
                step += 1
                if args.checkpoint is not None and step % args.save_every == 0 and rank == 0:
                    save_checkpoint(args.checkpoint, {"step": step, "loader": connection.state()})
                if args.steps is not None and step >= args.steps:
                    break
            if args.checkpoint is not None and rank == 0:
                save_checkpoint(args.checkpoint, {"step": step, "loader": connection.state()})
            last = connection.last
    except Timeout as error:
        print(f"rank {rank}: {error}", file=sys.stderr)
        return 4
    seconds = time.monotonic() - started
    print(
        f"rank {rank}: step {step}, epoch {last.epoch}, last batch from {last.endpoint or 'nowhere'}, "
        f"{seconds:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
