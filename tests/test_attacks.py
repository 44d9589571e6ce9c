"""The attacks harness (benchmarks/attacks.py, `make attacks`) is an instrument: these tests check that it measures.

One test runs the real harness, at a small scale, on rows that are fixed on main (a zpub subscriber that stops
reading is cut after stall_timeout; a stream client allocates only for bytes that arrive; a malformed CURVE key is a
ConfigError) and checks its verdicts. The others feed its judging code made-up figures that must fail, so that a
harness that called everything "bounded" would not pass.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import attacks  # noqa: E402


@pytest.mark.timeout(240)
def test_the_harness_finds_the_fixed_rows_bounded(tmp_path: Path) -> None:
    """A stalled subscriber beside a good one, hostile headers to a stream client and malformed CURVE keys, at a
    small scale: each row bounded or refused, memory within 200 MB, the good client exact at ≥ 25 % of its rate."""
    report = tmp_path / "attacks.json"
    rows = "stalled-subscriber,announced-parts,bad-curve-key"
    command = [sys.executable, str(BENCHMARKS / "attacks.py"), "--only", rows, "--scale", "0.2"]
    command += ["--json", str(report), "--time-limit", "100"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=230)
    assert finished.returncode == 0, finished.stderr[-3000:]
    found: dict[str, dict[str, Any]] = {row["name"]: row for row in json.loads(report.read_text())["rows"]}
    assert list(found) == rows.split(",")
    shown = finished.stderr[-3000:]
    for name in ("stalled-subscriber", "announced-parts"):
        row = found[name]
        assert row["ok"] and row["verdict"] == "bounded", shown
        assert row["rss_peak_mb"] - row["rss_before_mb"] <= attacks.RSS_BOUND_MB, shown
        assert row["rss_after_mb"] - row["rss_before_mb"] <= attacks.RSS_BOUND_MB, shown
        assert row["good"]["exact"], shown
    stalled = found["stalled-subscriber"]["good"]
    assert stalled["share"] >= attacks.RATE_SHARE, shown
    assert 1.5 < stalled["longest_gap"] < 10, (
        shown
    )  # it waited for the stalled one (stall_timeout 2 s), not forever
    parts = found["announced-parts"]
    assert parts["sent_bytes"] > 100_000 and "DecodeError" in parts["outcome"], shown
    key = found["bad-curve-key"]
    assert key["ok"] and key["verdict"] == "refused", shown
    assert key["outcome"].count("ConfigError") == 2 and "HANG" not in key["outcome"], shown


def records(times: list[float], steps: list[int], digests: list[str] | None = None) -> dict[str, Any]:
    """What a good client process writes: a batch's time, step and digest each."""
    wanted = attacks.reference(max(steps) + 1)
    found = digests or [wanted[step] for step in steps]
    return {"records": [[t, s, d] for t, s, d in zip(times, steps, found, strict=True)], "error": None}


def test_the_judge_computes_rates_waits_and_exactness() -> None:
    """100 batches/s for 2 s, then 20/s during the attack window: share 0.2, longest wait 0.05 s, exact."""
    before = [i / 100 for i in range(200)]
    during = [2 + i / 20 for i in range(1, 41)]
    times = before + during
    good = attacks.judge_client(records(times, list(range(len(times)))), start=2.0, end=4.0)
    assert good.exact and good.batches == 240
    assert good.rate_before == pytest.approx(100, rel=0.02)
    assert good.rate_during == pytest.approx(20, rel=0.02)
    assert good.share == pytest.approx(0.2, rel=0.03)
    assert good.longest_gap == pytest.approx(0.05)
    assert not good.ok  # under 25 % of its rate


def test_the_judge_catches_a_wrong_a_missing_and_a_late_batch() -> None:
    """A batch that differs from the reference, a step skipped, and a 3 s wait are each caught."""
    times = [i / 10 for i in range(30)]
    steps = list(range(30))
    wrong = attacks.reference(30)
    wrong[12] = wrong[13]
    assert not attacks.judge_client(records(times, steps, wrong), 1.0, 3.0).exact
    skipped = attacks.judge_client(records(times[:-1], steps[:15] + steps[16:]), 1.0, 3.0)
    assert not skipped.exact and "missing" in skipped.note
    late = attacks.judge_client(records([*times[:20], 5.0], steps[:21]), 1.0, 5.0)
    assert late.exact and late.longest_gap == pytest.approx(3.1)


@pytest.mark.parametrize(
    ("figures", "problem"),
    [
        ({"rss_before_mb": 50.0, "rss_peak_mb": 300.0, "rss_after_mb": 60.0}, "RSS +250 MB at peak"),
        ({"rss_before_mb": 50.0, "rss_peak_mb": 240.0, "rss_after_mb": 240.0}, ""),
        ({"rss_before_mb": 50.0, "rss_peak_mb": 60.0, "rss_after_mb": 60.0, "growing": "grows"}, "grows"),
    ],
    ids=["peak", "within", "growing"],
)
def test_the_verdict_follows_the_200_mb_bound(figures: dict[str, Any], problem: str) -> None:
    """Growth past 200 MB, or memory still growing with the volume sent, is NOT bounded; +190 MB is bounded."""
    outcome = attacks.Outcome(name="x", **figures)
    outcome.judge()
    assert outcome.ok == (not problem)
    assert problem in outcome.verdict and outcome.verdict.startswith("NOT" if problem else "bounded")


def test_attack_sockets_reach_only_this_host(tmp_path: Path) -> None:
    """The harness refuses to open a socket to any address but 127.0.0.1 or ipc."""
    run = attacks.Run(scale=1.0, rss_cap=100.0, folder=tmp_path)
    try:
        with pytest.raises(ValueError, match="127.0.0.1 or ipc only"):
            run.socket(attacks.zmq.DEALER, "tcp://10.0.0.1:7880")
    finally:
        run.close()
