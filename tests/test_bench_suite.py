"""The benchmark suite's arithmetic: targets from measured rows, the codec part, and the rendered report.

The figures themselves are measured by ``make bench``; these tests check what the suite computes from them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_codec  # noqa: E402
import suite  # noqa: E402


def transport_row(
    case: str, transport: str, size: str, rates: list[float], cpu: float = 0.1
) -> dict[str, Any]:
    return {
        "group": "transport",
        "case": case,
        "transport": transport,
        "size": size,
        "batches_per_s": sorted(rates)[len(rates) // 2],
        "client_cpu_s_per_gb": cpu,
        "samples": [{"batches_per_s": rate} for rate in rates],
    }


def codec_row(size: str, nbytes: int, decode_us: float) -> dict[str, Any]:
    return {"case": f"codec {size}", "size": size, "nbytes": nbytes, "decode_us": decode_us}


def test_ratios_pair_rounds_so_drift_cancels() -> None:
    # round 2 ran on a machine twice as slow for both cases: the per-round ratios are 2, 2, 2
    mine = transport_row("stream", "tcp", "9.6MB", [200, 100, 220])
    theirs = transport_row("raw pyzmq", "tcp", "9.6MB", [100, 50, 110])
    assert suite.paired_ratio(mine, theirs) == pytest.approx(2.0)
    # rounds that do not pair up: ratio of the medians
    unpaired = {**theirs, "samples": theirs["samples"][:2]}
    assert suite.paired_ratio(mine, unpaired) == pytest.approx(200 / 100)


def test_targets_from_rows() -> None:
    rows = [
        transport_row("raw pyzmq", "tcp", "9.6MB", [100, 100, 100]),
        transport_row("stream", "tcp", "9.6MB", [90, 94, 99]),
        transport_row("zreq credit 4", "tcp", "9.6MB", [95, 95, 95]),
        transport_row("stream", "ipc", "9.6MB", [300, 300, 300], cpu=0.02),
        transport_row("zreq credit 4", "ipc", "9.6MB", [400, 400, 400], cpu=0.08),
    ]
    codec = [codec_row("64KB", 66_048, 2.0), codec_row("96MB", 96_338_432, 4.0)]
    targets = {r["case"]: r for r in suite.target_rows(rows, codec)}
    stream = targets["stream / raw pyzmq, 9.6 MB (tcp)"]
    assert stream["ratio"] == pytest.approx(0.94)
    assert stream["met"] is False  # below 0.95
    assert targets["zreq (credit 4) / raw pyzmq, 9.6 MB (tcp)"]["met"] is True
    assert "stream / raw pyzmq, 9.6 MB (ipc)" not in targets  # no ipc baseline measured
    cpu = targets["client CPU s/GB, best same-host case, 9.6 MB (stream, ipc)"]
    assert cpu["ratio"] == pytest.approx(0.02) and cpu["met"] is True  # an upper bound: lower is better
    growth = targets["decode time, 96 MB batch / 64 KB batch"]
    assert growth["ratio"] == pytest.approx(2.0) and growth["met"] is False


def test_codec_part_rows_and_growth(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_codec, "SHAPES", {"small": (4, 8, 8), "large": (64, 64, 64)})
    monkeypatch.setattr(bench_codec, "TIMED_S", {False: 0.001, True: 0.001})
    rows = bench_codec.measure(quick=True, repeat=2)
    assert [r["size"] for r in rows] == ["small", "large"]
    assert rows[1]["nbytes"] == 64**3 + 64 * 8
    for r in rows:
        assert all(len(r["samples"][name]) == 2 for name in bench_codec.OPERATIONS)
        assert all(r[f"{name}_us"] > 0 for name in bench_codec.OPERATIONS)
    assert bench_codec.decode_growth(rows) == pytest.approx(rows[1]["decode_us"] / rows[0]["decode_us"])
    table = bench_codec.format_table(rows)
    assert table.count("\n") == 3 and "| large | 262,656 |" in table


def test_codec_frames_decode_to_the_arrays() -> None:
    arrays = bench_codec.make_arrays("64KB")
    frames = bench_codec.received_frames(arrays)
    decoded = bench_codec.operations(arrays)["decode"]()
    assert [type(f).__name__ for f in frames] == ["bytes", "Frame", "bytes", "Frame"]
    assert all((a == b).all() for a, b in zip(decoded, arrays, strict=True))


def test_markdown_names_every_part_and_target() -> None:
    rows = [
        transport_row("raw pyzmq", "tcp", "9.6MB", [100, 100]),
        transport_row("stream", "tcp", "9.6MB", [97, 97]),
    ]
    codec = [codec_row("64KB", 66_048, 2.0), codec_row("96MB", 96_338_432, 2.1)]
    for r in codec:
        r.update({f"{name}_us": r["decode_us"] for name in bench_codec.OPERATIONS})
    result = {
        "quick": True,
        "machine": {
            "date": "2026-12-01 00:00 UTC",
            "cores": 2,
            "cpu": "test cpu",
            "python": "3.11",
            "libzmq": "4.3.5",
            "versions": {},
        },
        "transport": rows,
        "codec": codec,
        "targets": suite.target_rows(rows, codec),
    }
    for r in rows:
        r.update(
            {
                "gb_per_s": 1.0,
                "vs_raw": 1.0,
                "client_peak_rss_mb": 1.0,
                "server_peak_rss_mb": 1.0,
                "via_shm": 0,
            }
        )
    text = suite.markdown(result)
    assert "### Codec" in text and "### Transport" in text
    assert "| stream / raw pyzmq, 9.6 MB (tcp) | 0.97 | ≥ 0.95 | yes |" in text
    assert "| decode time, 96 MB batch / 64 KB batch | 1.050 | ≤ 1.500 | yes |" in text


def fanin_row(case: str, senders: int, vs_raw: float, cpu: float) -> dict[str, Any]:
    return {"case": case, "senders": senders, "vs_raw": vs_raw, "client_cpu_s_per_gb": cpu}


def test_fanin_targets_compare_each_n_with_raw_and_cpu_with_one_server() -> None:
    """Each tensorcom case at each N gets a ratio target; its CPU per GB at the largest N over N = 1 an upper bound."""
    rows = [
        fanin_row("raw pyzmq", 1, 1.0, 0.2),
        fanin_row("raw pyzmq", 4, 1.0, 0.3),
        fanin_row("stream", 1, 0.97, 0.20),
        fanin_row("stream", 4, 0.93, 0.22),
        fanin_row("zreq 1 worker", 1, 0.95, 0.20),
        fanin_row("zreq 1 worker", 4, 0.80, 0.30),
    ]
    targets = {r["case"]: r for r in suite.target_rows([], None, rows)}
    assert targets["stream, N servers / raw pyzmq N -> 1, 9.6 MB (N = 4, tcp)"]["met"] is True
    assert targets["zreq 1 worker, N servers / raw pyzmq N -> 1, 9.6 MB (N = 4, tcp)"]["met"] is False
    flat = targets["client CPU s/GB, N servers / 1 server (stream, N = 4 / 1)"]
    assert flat["ratio"] == pytest.approx(1.1) and flat["met"] is True  # an upper bound
    assert targets["client CPU s/GB, N servers / 1 server (zreq 1 worker, N = 4 / 1)"]["met"] is False
    assert not any("(raw pyzmq" in name for name in targets)  # the baseline has no target of its own


def test_fanin_benchmark_measures_two_stream_senders() -> None:
    """The fan-in part's code path end to end, small: two stream servers into one client, and its table row."""
    import bench_fanin

    row = bench_fanin.measure_once("stream", 2, 10)
    assert row["batches_per_s"] > 0 and row["client_cpu_s_per_gb"] > 0 and row["io_threads"] == 1
    rows = [{**row, "case": "stream", "senders": 2, "vs_raw": 1.0, "cpu_vs_one_sender": 1.0}]
    assert "| 2 | stream | 1 |" in bench_fanin.format_table(rows)
