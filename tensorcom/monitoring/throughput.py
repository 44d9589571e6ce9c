"""Throughput statistics of a receiving client: what ``tensormon`` measures and reports.

A :class:`ThroughputMonitor` is told about every batch as it arrives (which server sent it, its size in samples and
bytes, and how long the client waited for it) and produces :class:`MonitorReport` s: one per reporting interval,
and a summary over the whole run. Every figure exists for all servers together and for each server alone.

- *latency* is the time between two consecutive batches (from any server for the total, from the same server for a
  server's own figure); the time to the very first batch is reported separately as ``first_batch``.
- *stall* is the time the client spent waiting inside ``recv``: with no work between batches it equals the
  latency; with a simulated training step it is what a rank would lose waiting for data.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["MonitorReport", "ThroughputMonitor", "ThroughputReport", "count_samples", "format_seconds"]

_LATENCY_SAMPLES = 100_000


def count_samples(batch: Sequence[Any]) -> int:
    """The samples in a batch: the first dimension of its first array (1 for a scalar, 0 for an empty batch)."""
    if len(batch) == 0:
        return 0
    shape: tuple[int, ...] = tuple(getattr(batch[0], "shape", ()))
    return int(shape[0]) if len(shape) else 1


@dataclass(frozen=True)
class ThroughputReport:
    """Batches, samples and bytes received over ``seconds``, with the latency and stall figures of that time."""

    seconds: float
    batches: int
    samples: int
    nbytes: int
    latency_median: float | None
    latency_p99: float | None
    stall: float

    @property
    def batches_per_second(self) -> float:
        return self.batches / self.seconds if self.seconds > 0 else 0.0

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    @property
    def megabytes_per_second(self) -> float:
        return self.nbytes / 1e6 / self.seconds if self.seconds > 0 else 0.0

    @property
    def stall_fraction(self) -> float:
        """The share of the time spent waiting for batches (0 to 1)."""
        return min(1.0, self.stall / self.seconds) if self.seconds > 0 else 0.0

    def describe(self) -> str:
        """One line for people: counts, rates, latency median and p99, and the share of time stalled."""
        return (
            f"{self.batches} batches {self.batches_per_second:.1f}/s  {self.samples_per_second:.1f} samples/s  "
            f"{self.megabytes_per_second:.1f} MB/s  latency {format_seconds(self.latency_median)} "
            f"(p99 {format_seconds(self.latency_p99)})  stall {self.stall_fraction:.0%}"
        )

    def describe_rates(self) -> str:
        """The rates, latency and stall of :meth:`describe` without the counts (for an interval, whose counts are
        shown as totals so far)."""
        return (
            f"{self.batches_per_second:.1f} batches/s  {self.samples_per_second:.1f} samples/s  "
            f"{self.megabytes_per_second:.1f} MB/s  latency {format_seconds(self.latency_median)} "
            f"(p99 {format_seconds(self.latency_p99)})  stall {self.stall_fraction:.0%}"
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready figures (rates per second, times in seconds)."""
        return {
            "seconds": self.seconds,
            "batches": self.batches,
            "samples": self.samples,
            "bytes": self.nbytes,
            "batches_per_s": self.batches_per_second,
            "samples_per_s": self.samples_per_second,
            "mb_per_s": self.megabytes_per_second,
            "latency_median_s": self.latency_median,
            "latency_p99_s": self.latency_p99,
            "stall_s": self.stall,
            "stall_fraction": self.stall_fraction,
        }


@dataclass(frozen=True)
class MonitorReport:
    """Figures for all servers together (``total``) and for each server by its endpoint address (``servers``)."""

    kind: str
    total: ThroughputReport
    servers: dict[str, ThroughputReport]
    first_batch: float | None = None
    position: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``type`` ("interval" or "summary"), the total's figures, then ``servers``."""
        result: dict[str, Any] = {"type": self.kind, **self.total.to_dict()}
        result["first_batch_s"] = self.first_batch
        result.update(self.position)
        result["servers"] = {address: report.to_dict() for address, report in self.servers.items()}
        return result


class _Tally:
    """Running sums for one server (or all) over one span of time."""

    def __init__(self, keep: int, rng: random.Random) -> None:
        self.batches = 0
        self.samples = 0
        self.nbytes = 0
        self.stall = 0.0
        self.latencies: list[float] = []
        self._seen_latencies = 0
        self._keep = keep
        self._rng = rng

    def add(self, samples: int, nbytes: int, waited: float, latency: float | None) -> None:
        self.batches += 1
        self.samples += samples
        self.nbytes += nbytes
        self.stall += waited
        if latency is None:
            return
        self._seen_latencies += 1
        if len(self.latencies) < self._keep:
            self.latencies.append(latency)
        else:  # reservoir sampling keeps the percentiles of a long run unbiased in bounded memory
            slot = self._rng.randrange(self._seen_latencies)
            if slot < self._keep:
                self.latencies[slot] = latency

    def report(self, seconds: float) -> ThroughputReport:
        median = p99 = None
        if self.latencies:
            median, p99 = (float(v) for v in np.percentile(self.latencies, [50, 99]))
        return ThroughputReport(seconds, self.batches, self.samples, self.nbytes, median, p99, self.stall)


class ThroughputMonitor:
    """Accumulate arrival statistics of batches, per server and in all, for interval reports and a summary.

    Args:
        clock: a monotonic clock in seconds (``time.monotonic``); the monitor's start is the time it is created.
        latency_samples: latencies kept per tally for percentiles; beyond it a uniform sample is kept.
    """

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, latency_samples: int = _LATENCY_SAMPLES
    ) -> None:
        self._clock = clock
        self._keep = latency_samples
        self._rng = random.Random(0)
        self.started = clock()
        self._window_started = self.started
        self.first_batch: float | None = None
        self.position: dict[str, int] = {}
        self._last_arrival: dict[str | None, float] = {}
        self._total = self._new_tallies()
        self._window = self._new_tallies()

    def _new_tallies(self) -> dict[str | None, _Tally]:
        return {None: _Tally(self._keep, self._rng)}

    @property
    def batches(self) -> int:
        """Batches recorded since the start."""
        return self._total[None].batches

    def record(
        self,
        endpoint: str,
        samples: int,
        nbytes: int,
        waited: float,
        *,
        now: float | None = None,
        step: int | None = None,
        epoch: int | None = None,
    ) -> None:
        """Count one batch from ``endpoint`` that arrived at ``now`` after the client waited ``waited`` seconds.

        ``step`` and ``epoch`` (where the protocol tells them) are shown as the latest position in the stream.
        """
        arrived = self._clock() if now is None else now
        if self.first_batch is None:
            self.first_batch = arrived - self.started
        for name, value in (("step", step), ("epoch", epoch)):
            if value is not None:
                self.position[name] = int(value)
        for key in (None, endpoint):
            previous = self._last_arrival.get(key)
            latency = None if previous is None else arrived - previous
            self._last_arrival[key] = arrived
            for tallies in (self._total, self._window):
                if key not in tallies:
                    tallies[key] = _Tally(self._keep, self._rng)
                tallies[key].add(samples, nbytes, waited, latency)

    def _report(self, kind: str, tallies: dict[str | None, _Tally], seconds: float) -> MonitorReport:
        servers = {key: tally.report(seconds) for key, tally in tallies.items() if key is not None}
        return MonitorReport(
            kind, tallies[None].report(seconds), servers, self.first_batch, dict(self.position)
        )

    def interval(self, now: float | None = None) -> MonitorReport:
        """Figures since the previous interval report (or the start); starts the next interval."""
        now = self._clock() if now is None else now
        report = self._report("interval", self._window, max(now - self._window_started, 0.0))
        self._window = self._new_tallies()
        self._window_started = now
        return report

    def summary(self, now: float | None = None) -> MonitorReport:
        """Figures since the start."""
        now = self._clock() if now is None else now
        return self._report("summary", self._total, max(now - self.started, 0.0))


def format_seconds(value: float | None) -> str:
    """A duration for people: '12.3 ms', '1.50 s', or '-' when unknown."""
    if value is None or math.isnan(value):
        return "-"
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"
