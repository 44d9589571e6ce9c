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


def test_worker_targets_compare_serve_w1_with_raw_and_w2_with_w1() -> None:
    """`serve -w 1` ("zreq 1 worker") gets 0.9x raw at 9.6 MB and 0.7x at 64 KB; `-w 2` over `-w 1` at least 1."""
    rows = [
        transport_row("raw pyzmq", "tcp", "9.6MB", [100, 100, 100]),
        transport_row("zreq 1 worker", "tcp", "9.6MB", [88, 91, 95]),
        transport_row("zreq 2 workers", "tcp", "9.6MB", [92, 91, 90]),
        transport_row("raw pyzmq", "ipc", "64KB", [20_000, 10_000, 20_000]),
        transport_row("zreq 1 worker", "ipc", "64KB", [13_000, 7_000, 15_000]),
        transport_row("zreq 2 workers", "ipc", "64KB", [12_000, 8_000, 15_000]),
    ]
    targets = {r["case"]: r for r in suite.target_rows(rows)}
    assert targets["zreq 1 worker / raw pyzmq, 9.6 MB (tcp)"]["ratio"] == pytest.approx(0.91)
    assert targets["zreq 1 worker / raw pyzmq, 9.6 MB (tcp)"]["met"] is True
    small = targets["zreq 1 worker / raw pyzmq, 64 KB (ipc)"]  # rounds .65, .7, .75
    assert (
        small["ratio"] == pytest.approx(0.7)
        and small["target"] == pytest.approx(0.7)
        and small["met"] is True
    )
    # -w 2 / -w 1 pairs the rounds: 92/88, 91/91, 90/95 -> median 1.0: met
    assert targets["zreq 2 workers / zreq 1 worker, 9.6 MB (tcp)"]["ratio"] == pytest.approx(1.0)
    assert targets["zreq 2 workers / zreq 1 worker, 9.6 MB (tcp)"]["met"] is True
    slower = [*rows[:2], transport_row("zreq 2 workers", "tcp", "9.6MB", [80, 90, 94])]
    worse = {r["case"]: r for r in suite.target_rows(slower)}["zreq 2 workers / zreq 1 worker, 9.6 MB (tcp)"]
    assert worse["ratio"] == pytest.approx(90 / 91) and worse["met"] is False
    assert "zreq 1 worker / raw pyzmq, 64 KB (tcp)" not in targets  # not measured over tcp here


def images_row(workers: int, vs_torchvision: float | None) -> dict[str, Any]:
    row: dict[str, Any] = {"group": "images", "workers": workers, "vs_dataloader": 1.2}
    if vs_torchvision is not None:
        row["vs_torchvision"] = vs_torchvision
    return row


def test_images_targets_compare_with_the_torchvision_pipeline_at_each_worker_count() -> None:
    """serve-imagenet-dir over the torchvision pipeline at 1 and 2 workers, target 2; older rows have none."""
    rows = [images_row(2, 2.4), images_row(1, 1.6), {"group": "images-profile", "workers": 1}]
    targets = suite.target_rows([], None, None, rows)
    assert [(r["case"], r["met"]) for r in targets] == [
        ("serve-imagenet-dir / torchvision pipeline, img/s (1 worker)", False),
        ("serve-imagenet-dir / torchvision pipeline, img/s (2 workers)", True),
    ]
    assert suite.target_rows([], None, None, [images_row(1, None)]) == []


def calls_rows() -> list[dict[str, Any]]:
    rows = []
    for case, processes in (
        ("raw pyzmq", ("client", "sender")),
        ("zreq 1 worker", ("client", "front end", "worker")),
    ):
        for process in (*processes, "all processes"):
            count = 100.0 if process == "all processes" else 50.0
            rows.append(
                {
                    "group": "calls",
                    "case": case,
                    "size": "64KB",
                    "transport": "tcp",
                    "process": process,
                    "python_calls_per_batch": count,
                    "c_calls_per_batch": count / 2,
                    "syscalls_per_batch": None if case == "raw pyzmq" else count / 4,
                    "zmq_thread_syscalls_per_batch": None if case == "raw pyzmq" else 3.0,
                }
            )
    return rows


def test_markdown_renders_the_calls_part_without_targets() -> None:
    """The calls part is a table of its own (totals in bold, "—" where perf could not count) and adds no target."""
    result = {
        "quick": True,
        "machine": {"date": "d", "cores": 2, "cpu": "c", "python": "3.11", "libzmq": "4.3.5", "versions": {}},
        "calls": calls_rows(),
        "targets": [],
    }
    text = suite.markdown(result)
    assert "### Calls per batch" in text
    assert "| 64KB | tcp | zreq 1 worker | **all processes** | **100** | 50 | **25** | 3.0 |" in text
    assert "| 64KB | tcp | raw pyzmq | sender | 50 | 25 | — | — |" in text
    assert suite.target_rows([], None, None, None) == []


def test_call_counter_counts_the_calls_between_start_and_stop(tmp_path: Path) -> None:
    """The counter inside each process counts Python and C function calls in its window and writes them."""
    import bench_calls

    def step(value: int) -> int:
        return abs(value)

    counter = bench_calls.CallCounter("client", tmp_path)
    step(1)  # before the window: not counted
    counter.start()
    for value in range(1000):
        step(value)
    counter.stop()
    step(2)  # after: not counted
    (written,) = tmp_path.glob("client-*.json")
    counts = __import__("json").loads(written.read_text())
    assert 1000 <= counts["python_calls"] < 1010
    assert 1000 <= counts["c_calls"] < 1010  # abs()
    assert sys.getprofile() is None


def test_perf_output_is_split_by_process_and_main_thread() -> None:
    """perf stat --per-thread lines add up per process: main thread (tid = pid) apart from its other threads."""
    import bench_calls

    text = "\n".join(
        [
            "# started on Sat Dec  5 06:35:21 2026",
            "",
            "python-100,40,,raw_syscalls:sys_enter,9460848,100.00,,",
            "ZMQbg/IO/0-101,25,,raw_syscalls:sys_enter,9460848,100.00,,",
            "ZMQbg/Reaper-102,1,,raw_syscalls:sys_enter,9460848,100.00,,",
            "python-200,7,,raw_syscalls:sys_enter,3916106,100.00,,Events disabled",
            "python-300,<not counted>,,raw_syscalls:sys_enter,0,0.00,,",
            "python-999,5,,raw_syscalls:sys_enter,1,100.00,,",
        ]
    )
    threads = {100: 100, 101: 100, 102: 100, 200: 200, 300: 300}
    assert bench_calls.parse_perf(text, threads) == {100: (40, 26), 200: (7, 0)}


def test_calls_benchmark_counts_a_raw_transfer() -> None:
    """The calls part end to end, small: raw pyzmq over ipc, a row per process and one for both."""
    import bench_calls

    rows = bench_calls.measure_once("raw pyzmq", "64KB", "ipc", 0.3)
    assert [r["process"] for r in rows] == ["client", "sender", "all processes"]
    client, sender, total = rows
    assert client["python_calls_per_batch"] > 5 and sender["python_calls_per_batch"] > 1
    assert total["python_calls_per_batch"] == pytest.approx(
        client["python_calls_per_batch"] + sender["python_calls_per_batch"]
    )
    if total["syscalls_per_batch"] is not None:  # perf could attach
        assert client["syscalls_per_batch"] > 1 and sender["syscalls_per_batch"] > 1
    assert "| 64KB | ipc | raw pyzmq | **all processes** |" in bench_calls.format_table(rows)
