"""The benchmark suite: every benchmark in one run, written to benchmarks/results/ as JSON, markdown and a plot.

    python benchmarks/suite.py            # make bench: the full run (several minutes, 2 quiet cores)
    python benchmarks/suite.py --quick    # make bench-quick: about 3 minutes
    python benchmarks/suite.py --quick --parts transport images   # some parts only (results still written)

Parts, each run by its own script in its own process (``--json``) and rendered as its own table and plot panel:

- transport (bench_transport.py): raw pyzmq, a shared-memory ring, stream and zreq with and without the
  shared-memory fast path (``TENSORCOM_SHM=0``), zreq servers with 1 and 2 worker processes (what
  ``tensorcom serve -w 1`` and ``-w 2`` run), tensorcom 0.1, DataLoader;
- pipeline (bench_pipeline.py): DistributedBatchedMap and PipelineBuilder against DataLoader on the same function;
  Join's memory and build time with sources of 10**6 to 10**8 samples;
- images (bench_imagenet.py): serve-imagenet-dir against the standard torchvision pipeline (ImageFolder +
  RandomResizedCrop + DataLoader) and against DataLoader running our decode, at 1 and 2 worker processes;
- loader (bench_loader.py): SwiftLoader against DataLoader, throughput and start-up;
- codec (bench_codec.py): encode and decode microseconds per batch from 64 KB to 96 MB (flat: views, no copies);
- fanin (bench_fanin.py): N = 1, 2, 4 sender processes into one client over tcp, stream and zreq (one worker per
  server) against raw pyzmq N -> 1, with the client's CPU seconds per GB;
- calls (bench_calls.py): Python calls and system calls per batch in each process of a zreq server with one worker
  and of raw pyzmq, 64 KB and 9.6 MB over tcp and ipc (reported, no target).

Each part measures its cases side by side, in alternating rounds so drift hits all alike, and reports medians;
ratios are medians of the ratios within a round. Absolute figures on shared machines drift by ±30 %, ratios much
less. The JSON keeps every sample; the results name the machine they were taken on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

PARTS = {
    "transport": "bench_transport.py",
    "pipeline": "bench_pipeline.py",
    "images": "bench_imagenet.py",
    "loader": "bench_loader.py",
    "codec": "bench_codec.py",
    "fanin": "bench_fanin.py",
    "calls": "bench_calls.py",
}
QUICK_REPEAT = {"transport": 2, "pipeline": 2, "images": 1, "loader": 2, "codec": 2, "fanin": 2, "calls": 1}
PART_TIMEOUT_S = 1800

# threshold of each target (None: reported, no target); "client CPU" is an upper bound, the rest lower bounds
TARGETS: dict[str, float | None] = {
    "zreq (credit 4) / raw pyzmq, 9.6 MB": 0.90,
    "stream / raw pyzmq, 9.6 MB": 0.95,
    "stream / tensorcom 0.1, 9.6 MB": 1.8,
    "zreq (credit 4) / tensorcom 0.1, 9.6 MB": 1.8,
    "stream / DataLoader(2 workers), 9.6 MB": 2.0,
    "stream / raw pyzmq, 64 KB": 0.70,
    "zreq shm / shm ring, 9.6 MB": 0.6,
    "zreq shm / DataLoader(2 workers), 9.6 MB": 3.0,
    "zreq 1 worker / raw pyzmq, 9.6 MB": 0.90,
    "zreq 1 worker / raw pyzmq, 64 KB": 0.70,
    "zreq 2 workers / zreq 1 worker, 9.6 MB": 1.0,
    "zreq 2 workers / zreq 1 worker, 64 KB": 1.0,
    "zreq credit 4 / raw pyzmq, 64 KB": 0.70,
    "stream / tensorcom 0.1, 64 KB": None,
    "stream queue 32 / raw pyzmq, 64 KB": None,
    "stream queue 32 / tensorcom 0.1, 64 KB": None,
    "client CPU s/GB, best same-host case, 9.6 MB": 0.05,
    "decode time, 96 MB batch / 64 KB batch": 1.5,
    "stream, N servers / raw pyzmq N -> 1, 9.6 MB": 0.9,
    "zreq 1 worker, N servers / raw pyzmq N -> 1, 9.6 MB": 0.9,
    "client CPU s/GB, N servers / 1 server": 1.2,
    "serve-imagenet-dir / torchvision pipeline, img/s": 2.0,
}
AT_MOST = {
    "client CPU s/GB, best same-host case, 9.6 MB",
    "decode time, 96 MB batch / 64 KB batch",
    "client CPU s/GB, N servers / 1 server",
}
FANIN_CASES = {  # fan-in case -> the name of its ratio target
    "stream": "stream, N servers / raw pyzmq N -> 1, 9.6 MB",
    "zreq 1 worker": "zreq 1 worker, N servers / raw pyzmq N -> 1, 9.6 MB",
}

# (target, case, baseline, batch size, transports): "zreq shm" is zreq credit 4 over ipc as configured by default
RATIO_CHECKS = [
    ("zreq (credit 4) / raw pyzmq, 9.6 MB", "zreq credit 4", "raw pyzmq", "9.6MB", ("ipc", "tcp")),
    ("stream / raw pyzmq, 9.6 MB", "stream", "raw pyzmq", "9.6MB", ("ipc", "tcp")),
    ("stream / tensorcom 0.1, 9.6 MB", "stream", "tensorcom 0.1", "9.6MB", ("ipc", "tcp")),
    ("zreq (credit 4) / tensorcom 0.1, 9.6 MB", "zreq credit 4", "tensorcom 0.1", "9.6MB", ("ipc", "tcp")),
    ("stream / DataLoader(2 workers), 9.6 MB", "stream", "DataLoader 2 workers", "9.6MB", ("ipc", "tcp")),
    ("stream / raw pyzmq, 64 KB", "stream", "raw pyzmq", "64KB", ("ipc", "tcp")),
    ("zreq shm / shm ring, 9.6 MB", "zreq credit 4", "shm ring", "9.6MB", ("ipc",)),
    ("zreq shm / DataLoader(2 workers), 9.6 MB", "zreq credit 4", "DataLoader 2 workers", "9.6MB", ("ipc",)),
    ("zreq 1 worker / raw pyzmq, 9.6 MB", "zreq 1 worker", "raw pyzmq", "9.6MB", ("ipc", "tcp")),
    ("zreq 1 worker / raw pyzmq, 64 KB", "zreq 1 worker", "raw pyzmq", "64KB", ("ipc", "tcp")),
    ("zreq 2 workers / zreq 1 worker, 9.6 MB", "zreq 2 workers", "zreq 1 worker", "9.6MB", ("ipc", "tcp")),
    ("zreq 2 workers / zreq 1 worker, 64 KB", "zreq 2 workers", "zreq 1 worker", "64KB", ("ipc", "tcp")),
    ("zreq credit 4 / raw pyzmq, 64 KB", "zreq credit 4", "raw pyzmq", "64KB", ("ipc", "tcp")),
    ("stream / tensorcom 0.1, 64 KB", "stream", "tensorcom 0.1", "64KB", ("ipc", "tcp")),
    ("stream queue 32 / raw pyzmq, 64 KB", "stream queue 32", "raw pyzmq", "64KB", ("ipc", "tcp")),
    ("stream queue 32 / tensorcom 0.1, 64 KB", "stream queue 32", "tensorcom 0.1", "64KB", ("ipc", "tcp")),
]
SAME_HOST_CASES = ("stream", "zreq credit 1", "zreq credit 2", "zreq credit 4", "zreq 1 worker")


def machine() -> dict[str, Any]:
    versions = {}
    for name in ("tensorcom", "numpy", "pyzmq", "torch"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    import zmq

    return {
        "cores": os.cpu_count(),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "libzmq": zmq.zmq_version(),
        "versions": versions,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_at_start": os.getloadavg()[0],
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def run_part(part: str, quick: bool, repeat: int | None) -> tuple[list[dict[str, Any]], float]:
    """Rows of one part, from its script run in a fresh process; and the seconds it took."""
    repeat = repeat or (QUICK_REPEAT[part] if quick else None)
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / f"{part}.json"
        command = [sys.executable, str(HERE / PARTS[part]), "--json", str(output)]
        command += ["--quick"] if quick else []
        command += ["--repeat", str(repeat)] if repeat else []
        started = time.perf_counter()
        subprocess.run(command, stdout=subprocess.DEVNULL, check=True, timeout=PART_TIMEOUT_S)
        return json.loads(output.read_text()), time.perf_counter() - started


# targets


def _row(rows: list[dict[str, Any]], case: str, size: str, transport: str) -> dict[str, Any] | None:
    """The transport row of ``case``; same-host baselines (ring, DataLoader) match any transport."""
    for r in rows:
        if r["case"] == case and r["size"] == size and r["transport"] in (transport, "shm"):
            return r
    return None


def paired_ratio(row: dict[str, Any], baseline: dict[str, Any]) -> float:
    """Median of the per-round ratios of batches/s (the ratio of medians where the rounds do not pair up)."""
    mine = [s["batches_per_s"] for s in row.get("samples", [])]
    theirs = [s["batches_per_s"] for s in baseline.get("samples", [])]
    if mine and len(mine) == len(theirs):
        return statistics.median(a / b for a, b in zip(mine, theirs, strict=True))
    return float(row["batches_per_s"] / baseline["batches_per_s"])


def _target_row(name: str, case: str, value: float) -> dict[str, Any]:
    target = TARGETS[name]
    met = None if target is None else (value <= target if name in AT_MOST else value >= target)
    return {
        "group": "targets",
        "target_name": name,
        "case": case,
        "ratio": value,
        "target": target,
        "met": met,
    }


def target_rows(
    transport: list[dict[str, Any]],
    codec: list[dict[str, Any]] | None = None,
    fanin: list[dict[str, Any]] | None = None,
    images: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    rows = []
    for name, case, baseline, size, transports in RATIO_CHECKS:
        for transport_name in transports:
            mine, theirs = (
                _row(transport, case, size, transport_name),
                _row(transport, baseline, size, transport_name),
            )
            if mine is not None and theirs is not None and mine["transport"] == transport_name:
                rows.append(_target_row(name, f"{name} ({transport_name})", paired_ratio(mine, theirs)))
    same_host = [
        r
        for r in transport
        if r["size"] == "9.6MB" and r["transport"] == "ipc" and r["case"] in SAME_HOST_CASES
    ]
    if same_host:
        best = min(same_host, key=lambda r: r["client_cpu_s_per_gb"])
        name = "client CPU s/GB, best same-host case, 9.6 MB"
        rows.append(_target_row(name, f"{name} ({best['case']}, ipc)", best["client_cpu_s_per_gb"]))
    if codec:
        import bench_codec

        name = "decode time, 96 MB batch / 64 KB batch"
        rows.append(_target_row(name, name, bench_codec.decode_growth(codec)))
    return rows + fanin_target_rows(fanin or []) + images_target_rows(images or [])


def images_target_rows(images: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """serve-imagenet-dir over the standard torchvision pipeline at each worker count (rows of runs before the
    torchvision baseline have no such ratio and no target row)."""
    name = "serve-imagenet-dir / torchvision pipeline, img/s"
    return [
        _target_row(
            name, f"{name} ({r['workers']} worker{'s' if r['workers'] != 1 else ''})", r["vs_torchvision"]
        )
        for r in sorted(images, key=lambda r: r["workers"])
        if r.get("group") == "images" and "vs_torchvision" in r
    ]


def fanin_target_rows(fanin: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each tensorcom case at each N against raw pyzmq with the same N; its client CPU per GB at the largest N over
    its cost with one server (flat in N: at most the target)."""
    rows = []
    for case, name in FANIN_CASES.items():
        mine = sorted((r for r in fanin if r["case"] == case), key=lambda r: r["senders"])
        for row in mine:
            rows.append(_target_row(name, f"{name} (N = {row['senders']}, tcp)", row["vs_raw"]))
        if len(mine) > 1:
            name_cpu = "client CPU s/GB, N servers / 1 server"
            growth = mine[-1]["client_cpu_s_per_gb"] / mine[0]["client_cpu_s_per_gb"]
            label = f"{name_cpu} ({case}, N = {mine[-1]['senders']} / {mine[0]['senders']})"
            rows.append(_target_row(name_cpu, label, growth))
    return rows


# markdown


def _targets_table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["(no transport, codec, fanin or images part in this run)"]
    lines = ["| ratio | measured | target | met |", "| --- | ---: | ---: | --- |"]
    for r in rows:
        at_most = r.get("target_name") in AT_MOST
        value = f"{r['ratio']:.3f}" if at_most else f"{r['ratio']:.2f}"
        if r["target"] is None:
            target, met = "report", "—"
        else:
            target = f"≤ {r['target']:.3f}" if at_most else f"≥ {r['target']:.2f}"
            met = "yes" if r["met"] else "no"
        lines.append(f"| {r['case']} | {value} | {target} | {met} |")
    return lines


def markdown(result: dict[str, Any]) -> str:
    import bench_transport

    m = result["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    seconds = ", ".join(f"{part} {s:.0f} s" for part, s in result.get("seconds", {}).items())
    lines = [
        f"Measured {m['date']} on {m['cores']} cores ({m['cpu']}), Python {m['python']}, libzmq {m['libzmq']}, "
        f"{versions}{' (quick run)' if result['quick'] else ''}. Load average at the start "
        f"{m.get('load_average_at_start', float('nan')):.2f}; the run took {result.get('total_s', 0):.0f} s "
        f"({seconds}).",
        "",
        "### Targets",
        "",
        *_targets_table(result.get("targets", [])),
        "",
        '"zreq shm" is zreq with credit 4 over ipc as configured by default (the shared-memory fast path where it '
        'applies); "zreq 1 worker" and "zreq 2 workers" are request servers as `tensorcom serve -w 1` and `-w 2` '
        "run them (workers reply to the client directly), read with credit 4; the client-CPU row names the "
        "same-host case with the least client CPU per GB.",
    ]
    if result.get("transport"):
        lines += [
            "",
            "### Transport",
            "",
            "One sender and one receiver process; the receiver touches one byte per 4 KB page of every batch. "
            '"(no shm)": TENSORCOM_SHM=0 in the sender (and its workers) and the receiver. "shm ring": the '
            f"same-host ceiling, batches copied into a {bench_transport.RING_SLOTS}-slot ring in /dev/shm, slot "
            'numbers over zmq. "client maps /dev/shm": the receiver had a shared-memory file mapped.',
            "",
            bench_transport.format_table(result["transport"]),
        ]
    for part, title, note in (
        (
            "pipeline",
            "Pipeline",
            "Items/s of the same function; PipelineBuilder runs it in threads. Then Join at corpus scale.",
        ),
        ("images", "Images", None),
        (
            "loader",
            "Loader",
            "Samples/s in a second epoch (the steady state); start = seconds from construction to the first batch, and "
            "SwiftLoader's over DataLoader's.",
        ),
        (
            "codec",
            "Codec",
            "Microseconds per batch (images + 64 int64 labels), one process; decoding makes views of the received "
            'frames, "copy" is what copying the arrays out would add.',
        ),
        (
            "fanin",
            "Fan-in",
            "N sender processes into one client over loopback tcp, 9.6 MB batches; ratios to raw pyzmq N -> 1 in "
            "the same round. Client CPU per GB is the receiving process's own time (its ZeroMQ I/O threads "
            "included); the last column is that cost turned into 100 GbE (12.5 GB/s) servers per client core.",
        ),
        (
            "calls",
            "Calls per batch",
            "Per batch received, in each process of the transfer (no target): Python calls (functions and C "
            "functions, as cProfile counts them) from a sys.setprofile counter started inside each process, and "
            "system calls from perf stat (raw_syscalls) on all its threads, in a window of their own. The client "
            "loop (views, one byte touched per 4 KB page) is the same in every case. Over ipc the zreq worker "
            "hands 9.6 MB batches over in shared memory, as configured by default.",
        ),
    ):
        if result.get(part):
            module = __import__(PARTS[part].removesuffix(".py"))
            if part == "images":
                note = module.describe(result[part]) + "."
            lines += ["", f"### {title}", "", note or "", "", module.format_table(result[part])]
    return "\n".join(lines) + "\n"


# plot


def _transport_panel(axis: Any, rows: list[dict[str, Any]]) -> None:
    rows = [r for r in rows if r["size"] == "9.6MB"]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    width = 0.4
    for offset, transport, label in (
        (-width / 2, "ipc", "ipc"),
        (width / 2, "tcp", "tcp"),
        (0.0, "shm", "same host"),
    ):
        positions, values = [], []
        for number, case in enumerate(cases):
            value = next(
                (r["gb_per_s"] for r in rows if r["case"] == case and r["transport"] == transport), None
            )
            if value is not None:
                positions.append(number + offset)
                values.append(value)
        if values:
            axis.bar(positions, values, width, label=label)
    axis.set_xticks(range(len(cases)), cases, rotation=25, ha="right")
    axis.set_ylabel("GB/s")
    axis.set_title("Transport, 9.6 MB batches, one sender and one receiver process")
    axis.legend()


def _grouped(
    axis: Any, labels: list[str], series: dict[str, list[float]], ylabel: str, title: str, one: bool = False
) -> None:
    width = 0.8 / len(series)
    for number, (name, values) in enumerate(series.items()):
        offset = (number - (len(series) - 1) / 2) * width
        axis.bar([i + offset for i in range(len(labels))], values, width, label=name)
    if one:
        axis.axhline(1.0, color="grey", linewidth=1, linestyle="--")
    axis.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.legend(fontsize="small")


def _pipeline_panel(axis: Any, rows: list[dict[str, Any]]) -> None:
    # Join's rows (group "join") are a table of their own
    rows = [r for r in rows if r.get("group", "pipeline") == "pipeline"]
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    labels = list(dict.fromkeys(f"{r['workload']}, {r['workers']} w" for r in rows))
    series = {
        stage: [
            next(
                r["vs_dataloader"]
                for r in rows
                if r["stage"] == stage and f"{r['workload']}, {r['workers']} w" == label
            )
            for label in labels
        ]
        for stage in stages
    }
    _grouped(
        axis, labels, series, "items/s ÷ DataLoader's", "Pipeline vs DataLoader (same function)", one=True
    )


def _images_panel(axis: Any, rows: list[dict[str, Any]]) -> None:
    labels = [f"{r['workers']} worker{'s' if r['workers'] != 1 else ''}" for r in rows]
    rows = [r for r in rows if r.get("group", "images") == "images"]
    labels = [f"{r['workers']} worker{'s' if r['workers'] != 1 else ''}" for r in rows]
    series = {"serve-imagenet-dir": [r["images_per_s"] for r in rows]}
    if all("torchvision_images_per_s" in r for r in rows):
        series["torchvision pipeline"] = [r["torchvision_images_per_s"] for r in rows]
    series["DataLoader, our decode"] = [r["dataloader_images_per_s"] for r in rows]
    _grouped(axis, labels, series, "images/s", "Images: decode + augment, same JPEGs")


def _loader_panel(axis: Any, rows: list[dict[str, Any]]) -> None:
    labels = [f"{r['workload']}, {r['workers']} w" for r in rows]
    series = {
        "SwiftLoader": [r["swift_samples_per_s"] for r in rows],
        "DataLoader": [r["dataloader_samples_per_s"] for r in rows],
    }
    _grouped(axis, labels, series, "samples/s", "SwiftLoader vs DataLoader")


def _fanin_panel(axis: Any, rows: list[dict[str, Any]]) -> None:
    labels = [f"N = {n}" for n in dict.fromkeys(r["senders"] for r in rows)]
    cases = [c for c in dict.fromkeys(r["case"] for r in rows) if c != "raw pyzmq"]
    series = {
        case: [r["vs_raw"] for r in rows if r["case"] == case and f"N = {r['senders']}" in labels]
        for case in cases
    }
    _grouped(
        axis, labels, series, "batches/s ÷ raw pyzmq N -> 1", "Fan-in: N servers into one client", one=True
    )


def _calls_panel(axis: Any, rows: list[dict[str, Any]]) -> None:
    totals = [r for r in rows if r.get("process") == "all processes"]
    labels = list(dict.fromkeys(f"{r['size']} {r['transport']}" for r in totals))
    series = {
        case: [
            next(
                (
                    r["python_calls_per_batch"]
                    for r in totals
                    if r["case"] == case and label == f"{r['size']} {r['transport']}"
                ),
                0.0,
            )
            for label in labels
        ]
        for case in dict.fromkeys(r["case"] for r in totals)
    }
    _grouped(axis, labels, series, "Python calls per batch, all processes", "Calls per batch")


def _codec_panel(axis: Any, rows: list[dict[str, Any]]) -> None:
    labels = [r["size"] for r in rows]
    series = {"decode": [r["decode_us"] for r in rows], "copy instead": [r["copy_us"] for r in rows]}
    _grouped(axis, labels, series, "µs per batch (log)", "Decode cost against batch size")
    axis.set_yscale("log")


PANELS: dict[str, Callable[[Any, list[dict[str, Any]]], None]] = {
    "pipeline": _pipeline_panel,
    "images": _images_panel,
    "loader": _loader_panel,
    "codec": _codec_panel,
    "fanin": _fanin_panel,
    "calls": _calls_panel,
}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plt.figure(figsize=(22, 10))
    grid = figure.add_gridspec(2, len(PANELS), height_ratios=[1.2, 1])
    if result.get("transport"):
        _transport_panel(figure.add_subplot(grid[0, :]), result["transport"])
    for column, (part, panel) in enumerate(PANELS.items()):
        if result.get(part):
            panel(figure.add_subplot(grid[1, column]), result[part])
    m = result["machine"]
    figure.suptitle(
        f"tensorcom benchmarks, {m['date']}, {m['cores']} cores{' (quick run)' if result['quick'] else ''}"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer batches and rounds (about 3 minutes)")
    parser.add_argument("--repeat", type=int, default=None, help="rounds in every part (median shown)")
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS), help="parts to run")
    parser.add_argument(
        "--render",
        action="store_true",
        help="only render the markdown and plot again (and recompute the targets) from the JSON of the last run",
    )
    args = parser.parse_args()
    if args.render:
        name = "quick" if args.quick else "latest"
        saved = json.loads((RESULTS / f"{name}.json").read_text())
        # target definitions may have changed since the run: recompute them from the rows
        if any(part in saved for part in ("transport", "codec", "fanin", "images")):
            saved["targets"] = target_rows(
                saved.get("transport", []), saved.get("codec"), saved.get("fanin"), saved.get("images")
            )
            (RESULTS / f"{name}.json").write_text(json.dumps(saved, indent=1))
        (RESULTS / f"{name}.md").write_text(markdown(saved))
        plot(saved, RESULTS / f"{name}.png")
        print(markdown(saved))
        return
    started = time.perf_counter()
    result: dict[str, Any] = {"quick": args.quick, "machine": machine(), "seconds": {}}
    for part in PARTS:
        if part in args.parts:
            print(f"{part} ...", file=sys.stderr)
            result[part], result["seconds"][part] = run_part(part, args.quick, args.repeat)
    result["targets"] = target_rows(
        result.get("transport", []), result.get("codec"), result.get("fanin"), result.get("images")
    )
    result["total_s"] = time.perf_counter() - started
    RESULTS.mkdir(exist_ok=True)
    name = "quick" if args.quick else "latest"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    (RESULTS / f"{name}.md").write_text(markdown(result))
    plot(result, RESULTS / f"{name}.png")
    print(markdown(result))
    print(f"wrote {RESULTS / name}.json, .md, .png in {result['total_s']:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
