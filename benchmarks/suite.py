"""The benchmark suite: every benchmark in one run, written to benchmarks/results/ as JSON, markdown and a plot.

    python benchmarks/suite.py            # make bench: the full run (several minutes)
    python benchmarks/suite.py --quick    # make bench-quick: about two minutes

Parts: transport (bench_transport.py), pipeline (bench_pipeline.py) and, where present, the loader
(bench_loader.py). Each reports ratios measured side by side in this one run; absolute figures on shared machines
drift by ±30 %, ratios much less. The results name the machine they were taken on.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

TARGETS = {
    "zreq (credit 4) / raw pyzmq, 9.6 MB": 0.90,
    "stream / raw pyzmq, 9.6 MB": 0.95,
    "stream / tensorcom 0.1, 9.6 MB": 1.8,
    "stream / DataLoader(2 workers), 9.6 MB": 2.0,
    "stream / raw pyzmq, 64 KB": 0.70,
}


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
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def pipeline_rows(quick: bool) -> list[dict[str, Any]]:
    """Rows from bench_pipeline.py (run as a script: its worker functions must be importable as __main__)."""
    command = [sys.executable, str(HERE / "bench_pipeline.py"), *(["--quick"] if quick else [])]
    output = subprocess.run(command, capture_output=True, text=True, check=True, timeout=1200).stdout
    rows = []
    for line in output.splitlines():
        fields = line.split()
        if len(fields) == 6 and fields[0] in ("light", "heavy"):
            rows.append(
                {
                    "group": "pipeline",
                    "case": f"DistributedBatchedMap, {fields[0]} work, {fields[1]} workers",
                    "items_per_s": float(fields[3]),
                    "dataloader_items_per_s": float(fields[4]),
                    "vs_dataloader": float(fields[5]),
                }
            )
    return rows


def ratio(rows: list[dict[str, Any]], case: str, baseline: str, size: str, transport: str) -> float | None:
    values = {
        r["case"]: r["batches_per_s"]
        for r in rows
        if r.get("size") == size and r.get("transport") == transport
    }
    if baseline == "DataLoader 2 workers":
        values[baseline] = next(
            (r["batches_per_s"] for r in rows if r.get("size") == size and r["case"] == baseline),
            float("nan"),
        )
    if case in values and baseline in values:
        return values[case] / values[baseline]
    return None


def target_rows(transport: list[dict[str, Any]]) -> list[dict[str, Any]]:
    checks = [
        ("zreq (credit 4) / raw pyzmq, 9.6 MB", "zreq credit 4", "raw pyzmq", "9.6MB"),
        ("stream / raw pyzmq, 9.6 MB", "stream", "raw pyzmq", "9.6MB"),
        ("stream / tensorcom 0.1, 9.6 MB", "stream", "tensorcom 0.1", "9.6MB"),
        ("stream / DataLoader(2 workers), 9.6 MB", "stream", "DataLoader 2 workers", "9.6MB"),
        ("stream / raw pyzmq, 64 KB", "stream", "raw pyzmq", "64KB"),
    ]
    rows = []
    for name, case, baseline, size in checks:
        for transport_name in ("ipc", "tcp"):
            value = ratio(transport, case, baseline, size, transport_name)
            if value is not None:
                target = TARGETS[name]
                rows.append(
                    {
                        "group": "targets",
                        "case": f"{name} ({transport_name})",
                        "ratio": value,
                        "target": target,
                        "met": value >= target,
                    }
                )
    return rows


def markdown(result: dict[str, Any]) -> str:
    from bench_transport import format_table

    m = result["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    lines = [
        f"Measured {m['date']} on {m['cores']} cores ({m['cpu']}), Python {m['python']}, libzmq {m['libzmq']}, "
        f"{versions}{' (quick run)' if result['quick'] else ''}.",
        "",
        "### Targets",
        "",
        "| ratio | measured | target | met |",
        "| --- | ---: | ---: | --- |",
    ]
    for r in result["targets"]:
        lines.append(
            f"| {r['case']} | {r['ratio']:.2f} | {r['target']:.2f} | {'yes' if r['met'] else 'no'} |"
        )
    lines += ["", "### Transport", "", format_table(result["transport"]), "", "### Pipeline", ""]
    lines += ["| case | items/s | DataLoader items/s | ratio |", "| --- | ---: | ---: | ---: |"]
    for r in result["pipeline"]:
        lines.append(
            f"| {r['case']} | {r['items_per_s']:.0f} | {r['dataloader_items_per_s']:.0f} | {r['vs_dataloader']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["transport"] if r["size"] == "9.6MB"]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    figure, axis = plt.subplots(figsize=(9, 4.5))
    width = 0.4
    for offset, transport in ((-width / 2, "ipc"), (width / 2, "tcp")):
        values = [
            next(
                (
                    r["gb_per_s"]
                    for r in rows
                    if r["case"] == c and (r["transport"] == transport or c.startswith("DataLoader"))
                ),
                0.0,
            )
            for c in cases
        ]
        axis.bar([i + offset for i in range(len(cases))], values, width, label=transport)
    axis.set_xticks(range(len(cases)), cases, rotation=25, ha="right")
    axis.set_ylabel("GB/s (9.6 MB batches)")
    axis.set_title(
        f"Transport throughput, one sender and one receiver process ({result['machine']['cores']} cores)"
    )
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer batches and one repeat (about two minutes)"
    )
    args = parser.parse_args()
    import bench_transport

    print("transport ...", file=sys.stderr)
    with contextlib.redirect_stdout(io.StringIO()):
        transport = bench_transport.measure(args.quick)
    print("pipeline ...", file=sys.stderr)
    result = {
        "quick": args.quick,
        "machine": machine(),
        "transport": transport,
        "pipeline": pipeline_rows(args.quick),
        "targets": target_rows(transport),
    }
    RESULTS.mkdir(exist_ok=True)
    name = "quick" if args.quick else "latest"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    (RESULTS / f"{name}.md").write_text(markdown(result))
    plot(result, RESULTS / f"{name}.png")
    print(markdown(result))
    print(f"wrote {RESULTS / name}.json, .md, .png", file=sys.stderr)


if __name__ == "__main__":
    main()
