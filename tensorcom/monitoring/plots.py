"""Histograms drawn with Pillow, one panel per batch position stacked top to bottom: ``tensorstat --plot``.

Each panel has a title line, bars filling the plot area (the tallest bar reaches its top), and the range of values
under the x axis. Pillow is imported on first use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from tensorcom.errors import ConfigError
from tensorcom.monitoring.grids import require_pillow

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["PANEL_HEIGHT", "PANEL_WIDTH", "PLOT_BOX", "BarChart", "draw_bar_charts"]

PANEL_WIDTH = 480
PANEL_HEIGHT = 180
PLOT_BOX = (
    56,
    22,
    PANEL_WIDTH - 12,
    PANEL_HEIGHT - 22,
)  # left, top, right, bottom of the bars' area in a panel
BAR_COLOUR = (52, 101, 164)


@dataclass(frozen=True)
class BarChart:
    """The counts of equal bins, a title, and the smallest and largest values to write under the axis."""

    title: str
    counts: Sequence[int]
    low: float
    high: float


def _number(value: float) -> str:
    return f"{value:.6g}"


def draw_bar_charts(charts: Sequence[BarChart]) -> Image.Image:
    """Draw the charts as PANEL_WIDTH x PANEL_HEIGHT panels, one under the other, on white."""
    pillow = require_pillow()
    from PIL import ImageDraw

    if not charts:
        raise ConfigError("nothing to plot: no charts given")
    picture = pillow.new("RGB", (PANEL_WIDTH, PANEL_HEIGHT * len(charts)), (255, 255, 255))
    draw = ImageDraw.Draw(picture)
    left, top, right, bottom = PLOT_BOX
    for index, chart in enumerate(charts):
        offset = index * PANEL_HEIGHT
        draw.text((4, offset + 4), chart.title, fill=(0, 0, 0))
        draw.line(
            [(left - 1, offset + top), (left - 1, offset + bottom), (right, offset + bottom)], fill=(0, 0, 0)
        )
        counts = np.asarray(chart.counts, dtype=np.float64)
        peak = float(counts.max()) if counts.size else 0.0
        draw.text((4, offset + top), _number(peak), fill=(0, 0, 0))
        draw.text((left, offset + bottom + 4), _number(chart.low), fill=(0, 0, 0))
        high = _number(chart.high)
        draw.text((right - draw.textlength(high), offset + bottom + 4), high, fill=(0, 0, 0))
        if peak <= 0:
            continue
        width = (right - left) / counts.size
        for bar, count in enumerate(counts):
            if count <= 0:
                continue
            height = max(1, round((bottom - top) * count / peak))
            x0 = left + round(bar * width)
            x1 = max(x0, left + round((bar + 1) * width) - 1)
            draw.rectangle([x0, offset + bottom - height, x1, offset + bottom - 1], fill=BAR_COLOUR)
    return picture
