"""Charts for people, drawn with matplotlib: the histograms of ``tensorstat --plot`` and the rates over time of
``tensormon --plot``.

matplotlib comes with the ``tools`` extra and is imported on first use, without pyplot (no window, no global
state), so the programs' start-up and ``--help`` never load it. Every chart has labelled axes with ticks across the
whole range, and histogram bars stand apart: a gap between bins, one bar per value where each bin holds one integer
(class labels), with a tick under each when there are few.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tensorcom.errors import ConfigError

__all__ = [
    "INSTALL_HINT",
    "PANEL_HEIGHT",
    "WIDTH",
    "Histogram",
    "RateSeries",
    "draw_histograms",
    "draw_rates",
    "histogram_figure",
    "rate_figure",
    "require_matplotlib",
]

INSTALL_HINT = "pip install 'tensorcom[tools]'"
WIDTH = 8.0
"""Inches across every chart."""
PANEL_HEIGHT = 2.6
"""Inches down each panel (one histogram, or one kind of rate)."""
DPI = 100
BAR_COLOUR = "#3465a4"
BAR_FILL = 0.84
"""The share of a bin its bar covers: the rest is the gap that keeps neighbouring bars apart."""
MAX_VALUE_TICKS = 25
"""At most this many values get a tick each under a histogram of one integer per bin; more get evenly spaced ticks."""


def require_matplotlib() -> Any:
    """matplotlib's ``Figure`` class, or a ConfigError saying how to install matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ConfigError(
            f"drawing charts needs matplotlib, which is not installed: {INSTALL_HINT}"
        ) from error
    return Figure


@dataclass(frozen=True)
class Histogram:
    """The counts of equal bins from ``low`` to ``high`` (the outer bin edges), with a title and an x-axis label.

    ``discrete``: each bin holds one integer value (bins of width 1 starting at an integer), so each bar stands
    on its value. Values at the edges of a bin are drawn at its left edge otherwise.
    """

    title: str
    counts: Sequence[int]
    low: float
    high: float
    xlabel: str = "value"
    discrete: bool = False

    def __post_init__(self) -> None:
        if len(self.counts) and not self.high > self.low:
            raise ConfigError(
                f"a histogram's high edge must be > its low edge. Found: {self.low} to {self.high}"
            )
        if any(count < 0 for count in self.counts):
            raise ConfigError(f"histogram counts must be >= 0. Found: {list(self.counts)[:10]}")
        if self.discrete and (self.high - self.low != len(self.counts) or self.low != math.floor(self.low)):
            raise ConfigError(
                f"a discrete histogram has one bin per integer: high - low must equal its {len(self.counts)} "
                f"bins and low must be an integer. Found: {self.low} to {self.high}"
            )


@dataclass(frozen=True)
class RateSeries:
    """One line of a rate chart: figures (``values``) at the times they were measured (``seconds`` from the
    start); ``name`` goes in the legend."""

    name: str
    seconds: Sequence[float]
    values: Sequence[float]

    def __post_init__(self) -> None:
        if len(self.seconds) != len(self.values):
            raise ConfigError(
                f"a rate series needs one time per value. Found {len(self.seconds)} times, {len(self.values)} values"
            )


def _figure(panels: int) -> tuple[Any, list[Any]]:
    figure_class = require_matplotlib()
    figure = figure_class(figsize=(WIDTH, PANEL_HEIGHT * panels), dpi=DPI, layout="constrained")
    axes = figure.subplots(panels, 1, squeeze=False)[:, 0]
    return figure, list(axes)


def _save(figure: Any, path: str | os.PathLike[str]) -> None:
    try:
        figure.savefig(path, format="png", dpi=DPI, facecolor="white")
    except OSError as error:
        raise ConfigError(f"cannot write {os.fspath(path)!r}: {error}") from error


def _style(axes: Any, title: str, xlabel: str, ylabel: str) -> None:
    axes.set_title(title, loc="left", fontsize=10)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.spines[["top", "right"]].set_visible(False)
    axes.grid(axis="y", color="#dddddd", linewidth=0.8)
    axes.set_axisbelow(True)


def _draw_histogram(axes: Any, histogram: Histogram) -> None:
    from matplotlib.ticker import MaxNLocator

    _style(axes, histogram.title, histogram.xlabel, "count")
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    counts = np.asarray(histogram.counts, dtype=np.float64)
    if counts.size == 0 or counts.max() <= 0:
        axes.text(0.5, 0.5, "no finite values", transform=axes.transAxes, ha="center", va="center")
        axes.set_yticks([])
        return
    if histogram.discrete:
        values = histogram.low + np.arange(counts.size)
        axes.bar(values, counts, width=BAR_FILL, color=BAR_COLOUR)
        axes.set_xlim(histogram.low - 0.5, histogram.high - 0.5)
        if counts.size <= MAX_VALUE_TICKS:
            axes.set_xticks(values)
        else:
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        width = (histogram.high - histogram.low) / counts.size
        lefts = histogram.low + width * np.arange(counts.size)
        gap = width * (1 - BAR_FILL) / 2
        axes.bar(lefts + gap, counts, width=width * BAR_FILL, align="edge", color=BAR_COLOUR)
        axes.set_xlim(histogram.low, histogram.high)
    axes.set_ylim(0, counts.max() * 1.08)


def histogram_figure(histograms: Sequence[Histogram]) -> Any:
    """A matplotlib ``Figure`` of the histograms, one panel under the other."""
    if not histograms:
        raise ConfigError("nothing to plot: no histograms given")
    figure, panels = _figure(len(histograms))
    for axes, histogram in zip(panels, histograms, strict=True):
        _draw_histogram(axes, histogram)
    return figure


def draw_histograms(histograms: Sequence[Histogram], path: str | os.PathLike[str]) -> None:
    """Write the histograms to the PNG file ``path``, one panel under the other."""
    _save(histogram_figure(histograms), path)


def rate_figure(charts: Mapping[str, Sequence[RateSeries]], *, title: str = "") -> Any:
    """A matplotlib ``Figure`` with one panel per entry of ``charts`` (its key is the y-axis label, e.g.
    "batches/s"): a line per series over time, with a legend when there are several."""
    if not charts:
        raise ConfigError("nothing to plot: no rates given")
    figure, panels = _figure(len(charts))
    for number, (axes, (label, series)) in enumerate(zip(panels, charts.items(), strict=True)):
        _style(axes, title if number == 0 else "", "seconds since start", label)
        for line in series:
            axes.plot(line.seconds, line.values, marker="o", markersize=3, linewidth=1.5, label=line.name)
        axes.set_ylim(bottom=0)
        axes.set_xlim(left=0)
        if len(series) > 1:
            axes.legend(fontsize=8, loc="best")
    return figure


def draw_rates(
    charts: Mapping[str, Sequence[RateSeries]], path: str | os.PathLike[str], *, title: str = ""
) -> None:
    """Write :func:`rate_figure` to the PNG file ``path``."""
    _save(rate_figure(charts, title=title), path)
