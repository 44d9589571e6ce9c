"""Lines a peer can make repeat are logged at most once per key and period, with a count of those left out."""

from __future__ import annotations

import logging

import pytest

from tensorcom._net import ratelog
from tensorcom._net.ratelog import RateLimitedLog


def test_a_flood_of_one_line_is_logged_once_per_period(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [100.0]
    monkeypatch.setattr(ratelog.time, "monotonic", lambda: now[0])
    logger = logging.getLogger("test.ratelog")
    limited = RateLimitedLog(logger, logging.WARNING, every=10.0)
    with caplog.at_level(logging.WARNING, logger="test.ratelog"):
        logged = [limited.note("client gone", "dropping replies to %s", "a") for _ in range(1000)]
        limited.note("other", "another line")
        now[0] += 10.0
        limited.note("client gone", "dropping replies to %s", "a")
    assert logged.count(True) == 1
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "dropping replies to a",
        "another line",
        "dropping replies to a (999 more like it since the last report)",
    ]


def test_keys_chosen_by_peers_do_not_grow_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr(ratelog.time, "monotonic", lambda: now[0])
    limited = RateLimitedLog(logging.getLogger("test.ratelog.keys"), every=1.0)
    for key in range(20_000):
        now[0] += 0.01
        limited.note(key, "x")
    assert len(limited._seen) <= 4097
