"""tensorstat: statistics of every array position over the next batches from one or more URLs."""

from __future__ import annotations

import json

import click
import numpy as np

from tensorcom.cli import TensorcomCommand, check_output_path, version_option
from tensorcom.monitoring.plots import Histogram, draw_histograms, require_matplotlib
from tensorcom.monitoring.statistics import ArrayStatistics, BatchStatistics
from tensorcom_tools._connect import HELP_OPTIONS, connection_options, open_connection, refused_option

PLOT_SAMPLES = 200_000
SHOWN_CLASSES = 20


def _number(value: float | int | None) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.6g}"


def describe(position: int, statistics: ArrayStatistics) -> list[str]:
    """Lines for people about one position: dtypes, shapes, figures, and the classes of a label array."""
    dtypes = ", ".join(statistics.dtypes)
    shapes = ", ".join(f"{shape} x{n}" for shape, n in statistics.shapes.items())
    lines = [
        f"[{position}] {dtypes}  shapes {shapes}",
        f"    min {_number(statistics.minimum)}  max {_number(statistics.maximum)}  "
        f"mean {_number(statistics.mean)}  std {_number(statistics.std)}  "
        f"nan {statistics.nan}  inf {statistics.inf}  ({statistics.elements} values)",
    ]
    if statistics.is_labels and statistics.classes is not None:
        classes = statistics.classes
        if len(classes) <= SHOWN_CLASSES:
            shown = " ".join(f"{label}:{n}" for label, n in sorted(classes.items()))
        else:
            common = " ".join(f"{label}:{n}" for label, n in classes.most_common(10))
            counts = classes.values()
            shown = f"most common {common} ...; {min(counts)} to {max(counts)} per class"
        lines.append(f"    classes ({len(classes)} distinct): {shown}")
    return lines


def histograms(statistics: BatchStatistics) -> list[Histogram]:
    """One histogram per position: label counts for label arrays, values (a sample of them) otherwise; integer
    values in bins of one value each get a bar on each value."""
    result = []
    for position, figures in enumerate(statistics.positions):
        counts, low, high = figures.histogram()
        shapes = ", ".join(str(shape) for shape in figures.shapes)
        what = "class counts" if figures.is_labels else "values"
        discrete = isinstance(figures.minimum, int) and high - low == len(counts) > 0
        result.append(
            Histogram(
                f"[{position}] {', '.join(figures.dtypes)} {shapes}: {what}",
                counts.tolist(),
                low,
                high,
                xlabel="label" if figures.is_labels else "value",
                discrete=discrete,
            )
        )
    return result


@click.command(cls=TensorcomCommand, context_settings=HELP_OPTIONS)
@version_option("tensorstat")
@connection_options()
@click.option(
    "-c",
    "-n",
    "--count",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Batches to read. -c is tensorcom 0.1's spelling.",
)
@click.option(
    "-b",
    "--unbatched",
    is_flag=True,
    help="Each message is one sample, not a batch (tensorcom 0.1's -b): a batch axis is added, so labels sent as "
    "single numbers are counted as classes.",
)
@refused_option(
    "-r",
    "--raw",
    reason="tensorcom 0.1 printed only the throughput with it; for that use tensormon -c N URL...",
    help="tensorcom 0.1's throughput-only mode: refused, use tensormon -c N.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON document.")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write a histogram of each position to this PNG file (needs matplotlib: pip install 'tensorcom[tools]').",
)
def main(
    urls: tuple[str, ...],
    timeout: float,
    seed: int | None,
    rank: int | None,
    world_size: int | None,
    count: int,
    unbatched: bool,
    as_json: bool,
    plot: str | None,
) -> None:
    """Read --count batches from URLS and report, per array position: dtype, shapes, min, max, mean, std, NaN and
    Inf counts (figures over the finite values), and the class histogram of 1-D integer (label) arrays.

    With no URLS it reads zsub://127.0.0.1:7880, as tensorcom 0.1 did; several URLS (or a brace URL) are read
    together. tensorcom 0.1's flags: -c N (--count), -b (--unbatched); -r is refused.
    """
    if plot:  # before reading: a bad path or a missing matplotlib fails at once
        check_output_path(plot, "--plot")
        require_matplotlib()
    statistics = BatchStatistics(sample_limit=PLOT_SAMPLES if plot else 0)
    with open_connection(urls, timeout, seed=seed, rank=rank, world_size=world_size) as connection:
        for _ in range(count):
            batch = connection.recv()
            statistics.update([np.asarray(array)[np.newaxis] for array in batch] if unbatched else batch)
    if as_json:
        click.echo(json.dumps(statistics.to_dict(), allow_nan=False))
    else:
        click.echo(f"{statistics.batches} batches")
        for position, figures in enumerate(statistics.positions):
            for line in describe(position, figures):
                click.echo(line)
    if plot:
        draw_histograms(histograms(statistics), plot)
        click.echo(f"wrote {plot}: {len(statistics.positions)} histograms", err=as_json)


if __name__ == "__main__":
    main()
