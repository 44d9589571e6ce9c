"""Encode and decode cost of one batch against its size: decoding makes views of the received frames, so its cost
should stay flat from 64 KB to 96 MB, while a decoder that copies grows with the bytes.

Each batch is ``uint8`` images plus 64 ``int64`` labels (the transport benchmark's batches, and a 96 MB one). Its
frames are what a client holds after a receive: the header as bytes and the data as a ``zmq.Frame``. Measured per
size, in microseconds per batch (medians over rounds, each the mean of a timed loop):

- encode: ``codec.encode`` of the arrays (headers remembered, data frames are views);
- decode: ``codec.decode`` of the frames, the header already seen (every batch of a stream after the first);
- decode, new header: the same with the parsed-header cache emptied first (the first batch of a stream);
- decode .ten buffer: ``codec.decode_buffer`` of the batch as one aligned buffer (a ``.ten`` file, shared memory);
- copy: ``np.copy`` of the decoded arrays, what a decoder that copied would add.

    python benchmarks/bench_codec.py [--quick] [--repeat N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_transport import batch_of_shape  # noqa: E402

from tensorcom import codec  # noqa: E402

SHAPES = {"64KB": (64, 32, 32), "9.6MB": (64, 3, 224, 224), "96MB": (640, 3, 224, 224)}
OPERATIONS = ("encode", "decode", "decode, new header", "decode .ten buffer", "copy")
TIMED_S = {False: 0.2, True: 0.05}  # seconds per timed loop (full, quick)


def make_arrays(size: str) -> list[np.ndarray]:
    return list(batch_of_shape(SHAPES[size]))


def received_frames(arrays: list[np.ndarray]) -> list[Any]:
    """The frames a client holds after receiving ``arrays``: headers as bytes, data as zmq frames."""
    frames = codec.encode(arrays)
    return [bytes(f) if i % 2 == 0 else zmq.Frame(bytes(f)) for i, f in enumerate(frames)]


def _fresh_decode(frames: list[Any]) -> list[np.ndarray]:
    codec._header_cache.clear()
    return codec.decode(frames)


def operations(arrays: list[np.ndarray]) -> dict[str, Callable[[], Any]]:
    frames = received_frames(arrays)
    buffer = codec.encode_buffer(arrays)
    decoded = codec.decode(frames)
    return {
        "encode": lambda: codec.encode(arrays),
        "decode": lambda: codec.decode(frames),
        "decode, new header": lambda: _fresh_decode(frames),
        "decode .ten buffer": lambda: codec.decode_buffer(buffer),
        "copy": lambda: [np.copy(a) for a in decoded],
    }


def time_us(function: Callable[[], Any], seconds: float) -> float:
    """Mean microseconds per call over a loop of about ``seconds`` (at least 3 calls)."""
    function()  # warm: allocations, caches
    calls, started = 0, time.perf_counter()
    while True:
        function()
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds and calls >= 3:
            return elapsed / calls * 1e6


def measure(quick: bool = False, repeat: int | None = None) -> list[dict[str, Any]]:
    """One row per batch size: the median microseconds of each operation, and every round's figures."""
    repeat = repeat or (2 if quick else 5)
    batches = {size: make_arrays(size) for size in SHAPES}
    prepared = {size: operations(arrays) for size, arrays in batches.items()}
    samples: dict[str, dict[str, list[float]]] = {size: {op: [] for op in OPERATIONS} for size in SHAPES}
    for round_number in range(repeat):
        print(f"codec round {round_number + 1}/{repeat}", file=sys.stderr)
        for size, ops in prepared.items():  # sizes and operations alternate within each round
            for name in OPERATIONS:
                samples[size][name].append(time_us(ops[name], TIMED_S[quick]))
    rows = []
    for size in SHAPES:
        nbytes = sum(a.nbytes for a in batches[size])
        rows.append(
            {
                "group": "codec",
                "case": f"codec {size}",
                "size": size,
                "nbytes": nbytes,
                **{f"{name}_us": statistics.median(samples[size][name]) for name in OPERATIONS},
                "samples": samples[size],
            }
        )
    return rows


def decode_growth(rows: list[dict[str, Any]]) -> float:
    """Decode time of the largest batch over that of the smallest (1.0: flat in batch size)."""
    by_size = sorted(rows, key=lambda r: r["nbytes"])
    return float(by_size[-1]["decode_us"] / by_size[0]["decode_us"])


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| batch | bytes | " + " | ".join(f"{name} µs" for name in OPERATIONS) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in OPERATIONS) + " |",
    ]
    for r in rows:
        figures = " | ".join(_us(r[f"{name}_us"]) for name in OPERATIONS)
        lines.append(f"| {r['size']} | {r['nbytes']:,} | {figures} |")
    return "\n".join(lines)


def _us(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="shorter timed loops and 2 rounds: a few seconds"
    )
    parser.add_argument("--repeat", type=int, default=None, help="rounds (default 5, quick 2); medians shown")
    parser.add_argument("--json", metavar="FILE", help="also write the rows to FILE as JSON")
    args = parser.parse_args()
    if args.repeat is not None and args.repeat < 1:
        parser.error(f"--repeat must be >= 1. Found: {args.repeat}")
    rows = measure(args.quick, args.repeat)
    if args.json:
        Path(args.json).write_text(json.dumps(rows))
    print(format_table(rows))
    print()
    print(f"decode, largest batch / smallest batch: {decode_growth(rows):.2f} (1.00: flat in batch size)")


if __name__ == "__main__":
    main()
