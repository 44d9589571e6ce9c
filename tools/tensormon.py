"""tensormon: live throughput of the servers behind one or more URLs (batches/s, samples/s, MB/s, latency, stall)."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Protocol

import click

from tensorcom.cli import TensorcomCommand
from tensorcom.errors import Timeout
from tensorcom.monitoring.throughput import MonitorReport, ThroughputMonitor, count_samples, format_seconds
from tensorcom_tools._connect import connection_options, open_connection


class Display(Protocol):
    def interval(self, report: MonitorReport, elapsed: float) -> None: ...
    def summary(self, report: MonitorReport) -> None: ...
    def close(self) -> None: ...


def _summary_lines(report: MonitorReport) -> list[str]:
    total = report.total
    lines = [
        f"summary: {total.describe()} over {total.seconds:.2f} s, {total.samples} samples, "
        f"{total.nbytes / 1e6:.2f} MB, first batch after {format_seconds(report.first_batch)}"
    ]
    if len(report.servers) > 1:
        lines += [f"  {address}: {server.describe()}" for address, server in report.servers.items()]
    if report.position:
        lines.append("  last " + ", ".join(f"{name} {value}" for name, value in report.position.items()))
    return lines


class PlainDisplay:
    """One line per interval (and one per server when there are several): for logs and pipes."""

    def interval(self, report: MonitorReport, elapsed: float) -> None:
        click.echo(f"{elapsed:8.1f} s  {report.total.describe()}")
        if len(report.servers) > 1:
            for address, server in report.servers.items():
                click.echo(f"  {address}: {server.describe()}")

    def summary(self, report: MonitorReport) -> None:
        for line in _summary_lines(report):
            click.echo(line)

    def close(self) -> None:
        pass


class JsonDisplay:
    """One JSON object per line: ``"type": "interval"`` every interval, ``"type": "summary"`` at the end."""

    def interval(self, report: MonitorReport, elapsed: float) -> None:
        click.echo(json.dumps({**report.to_dict(), "elapsed_s": elapsed}))

    def summary(self, report: MonitorReport) -> None:
        click.echo(json.dumps(report.to_dict()))

    def close(self) -> None:
        pass


class LiveDisplay:
    """A table that rich redraws in place on a terminal, one row per server and one for all of them."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.live import Live

        self._console = Console()
        self._live = Live(self._table(None, 0.0), console=self._console, auto_refresh=False)
        self._live.start()

    @staticmethod
    def _table(report: MonitorReport | None, elapsed: float) -> Any:
        from rich.table import Table

        table = Table(title=f"tensormon  {elapsed:.1f} s", title_justify="left")
        for heading in ("server", "batches", "batches/s", "samples/s", "MB/s", "latency", "p99", "stall"):
            table.add_column(heading, justify="left" if heading == "server" else "right")
        if report is None:
            return table
        rows = list(report.servers.items()) if len(report.servers) > 1 else []
        for name, figures in [*rows, ("all", report.total)]:
            table.add_row(
                name,
                str(figures.batches),
                f"{figures.batches_per_second:.1f}",
                f"{figures.samples_per_second:.1f}",
                f"{figures.megabytes_per_second:.1f}",
                format_seconds(figures.latency_median),
                format_seconds(figures.latency_p99),
                f"{figures.stall_fraction:.0%}",
            )
        return table

    def interval(self, report: MonitorReport, elapsed: float) -> None:
        self._live.update(self._table(report, elapsed), refresh=True)

    def summary(self, report: MonitorReport) -> None:
        self.close()
        for line in _summary_lines(report):
            self._console.print(line, highlight=False, markup=False, soft_wrap=True)

    def close(self) -> None:
        if self._live.is_started:
            self._live.stop()


@click.command(cls=TensorcomCommand)
@connection_options
@click.option(
    "-n",
    "--count",
    type=click.IntRange(min=1),
    default=None,
    help="Stop after this many batches (default: Ctrl-C).",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Seconds between reports (a report is made when a batch arrives after the interval is over).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines: one per interval, then a summary.")
@click.option(
    "--live/--no-live", default=None, help="Redraw a table in place (default: when stdout is a terminal)."
)
@click.option(
    "--compute",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Seconds of simulated training work after each batch, so stall shows what such a rank would wait.",
)
def main(
    urls: tuple[str, ...],
    timeout: float,
    seed: int | None,
    rank: int | None,
    world_size: int | None,
    count: int | None,
    interval: float,
    as_json: bool,
    live: bool | None,
    compute: float,
) -> None:
    """Receive batches from URLS and report throughput until Ctrl-C or --count batches, then a summary.

    Figures: batches/s, samples/s (the first dimension of a batch's first array), MB/s, the latency between batches
    (median and 99th percentile), and stall, the share of time spent waiting for a batch; per server when URLS
    name several (e.g. zrpull://host:788{0..3}).
    """
    with open_connection(urls, timeout, seed=seed, rank=rank, world_size=world_size) as connection:
        display: Display
        if as_json:
            display = JsonDisplay()
        elif live if live is not None else sys.stdout.isatty():
            display = LiveDisplay()
        else:
            display = PlainDisplay()
        monitor = ThroughputMonitor()
        next_report = monitor.started + interval
        try:
            while count is None or monitor.batches < count:
                started = time.monotonic()
                batch = connection.recv()
                arrived = time.monotonic()
                last = connection.last
                nbytes = getattr(last, "nbytes", None)
                monitor.record(
                    getattr(last, "endpoint", "") or "?",
                    count_samples(batch),
                    sum(getattr(a, "nbytes", 0) for a in batch) if nbytes is None else nbytes,
                    arrived - started,
                    now=arrived,
                    step=_integer(getattr(last, "step", None)),
                    epoch=_integer(getattr(last, "epoch", None)),
                )
                if compute:
                    time.sleep(compute)
                if arrived >= next_report:
                    display.interval(monitor.interval(arrived), arrived - monitor.started)
                    next_report = arrived + interval
        except KeyboardInterrupt:
            pass
        except Timeout:
            if monitor.batches:  # the stream stopped: still show what came through, then the error
                display.summary(monitor.summary())
            raise
        finally:
            display.close()
        display.summary(monitor.summary())


def _integer(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


if __name__ == "__main__":
    main()
