"""tensormon: live throughput of the servers behind one or more URLs (batches/s, samples/s, MB/s, latency, stall)."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Protocol

import click

from tensorcom.cli import TensorcomCommand, check_output_path, version_option
from tensorcom.errors import ConfigError, Timeout
from tensorcom.monitoring.plots import RateSeries, draw_rates, require_matplotlib
from tensorcom.monitoring.throughput import (
    MonitorReport,
    ThroughputMonitor,
    ThroughputReport,
    count_samples,
    format_seconds,
)
from tensorcom_tools._connect import HELP_OPTIONS, connection_options, open_connection, refused_option

_IDLE = ThroughputReport(0.0, 0, 0, 0, None, None, 0.0)


class Display(Protocol):
    def interval(self, report: MonitorReport, total: MonitorReport, elapsed: float) -> None: ...
    def summary(self, report: MonitorReport) -> None: ...
    def close(self) -> None: ...


def _rows(
    report: MonitorReport, total: MonitorReport
) -> list[tuple[str, ThroughputReport, ThroughputReport]]:
    """(name, interval figures, figures so far) for each server seen so far, then for all of them when several."""
    rows = [
        (address, report.servers.get(address, _IDLE), so_far) for address, so_far in total.servers.items()
    ]
    if len(rows) != 1:
        rows.append(("all", report.total, total.total))
    return rows


def _summary_lines(report: MonitorReport) -> list[str]:
    total = report.total
    lines = [
        f"summary: {total.describe()} over {total.seconds:.2f} s, {total.samples} samples, "
        f"{total.nbytes / 1e6:.2f} MB, first batch after {format_seconds(report.first_batch)}"
    ]
    lines += [f"  {address}: {server.describe()}" for address, server in report.servers.items()]
    if report.position:
        lines.append("  last " + ", ".join(f"{name} {value}" for name, value in report.position.items()))
    return lines


class PlainDisplay:
    """Lines for logs and pipes: per interval, one per server (and one for all when several), each with the
    batches received so far and the rates of the interval."""

    def interval(self, report: MonitorReport, total: MonitorReport, elapsed: float) -> None:
        rows = _rows(report, total)
        width = max(len(name) for name, _, _ in rows)
        for number, (name, figures, so_far) in enumerate(rows):
            start = f"{elapsed:8.1f} s" if number == 0 else " " * 10
            click.echo(f"{start}  {name:<{width}}  {so_far.batches:>8} batches  {figures.describe_rates()}")

    def summary(self, report: MonitorReport) -> None:
        for line in _summary_lines(report):
            click.echo(line)

    def close(self) -> None:
        pass


class JsonDisplay:
    """One JSON object per line: ``"type": "interval"`` every interval (its figures, plus ``total_batches`` and
    ``total_samples`` so far), ``"type": "summary"`` at the end."""

    def interval(self, report: MonitorReport, total: MonitorReport, elapsed: float) -> None:
        figures = {
            **report.to_dict(),
            "total_batches": total.total.batches,
            "total_samples": total.total.samples,
            "elapsed_s": elapsed,
        }
        click.echo(json.dumps(figures))

    def summary(self, report: MonitorReport) -> None:
        click.echo(json.dumps(report.to_dict()))

    def close(self) -> None:
        pass


class LiveDisplay:
    """A table that rich redraws in place on a terminal: a row per server (its address) and one for all of them
    when there are several; "batches" counts since the start, the rates are those of the last interval."""

    def __init__(self, interval: float) -> None:
        from rich.console import Console
        from rich.live import Live

        self._every = interval
        self._console = Console()
        self._live = Live(self._table(None, None, 0.0), console=self._console, auto_refresh=False)
        self._live.start()

    def _table(self, report: MonitorReport | None, total: MonitorReport | None, elapsed: float) -> Any:
        from rich.table import Table

        seconds = report.total.seconds if report is not None else self._every
        table = Table(
            title=f"tensormon  {elapsed:.1f} s  (rates over the last {seconds:.1f} s)", title_justify="left"
        )
        for heading in ("server", "batches", "batches/s", "samples/s", "MB/s", "latency", "p99", "stall"):
            table.add_column(heading, justify="left" if heading == "server" else "right")
        if report is None or total is None:
            return table
        for name, figures, so_far in _rows(report, total):
            table.add_row(
                name,
                str(so_far.batches),
                f"{figures.batches_per_second:.1f}",
                f"{figures.samples_per_second:.1f}",
                f"{figures.megabytes_per_second:.1f}",
                format_seconds(figures.latency_median),
                format_seconds(figures.latency_p99),
                f"{figures.stall_fraction:.0%}",
            )
        return table

    def interval(self, report: MonitorReport, total: MonitorReport, elapsed: float) -> None:
        self._live.update(self._table(report, total, elapsed), refresh=True)

    def summary(self, report: MonitorReport) -> None:
        self.close()
        for line in _summary_lines(report):
            self._console.print(line, highlight=False, markup=False, soft_wrap=True)

    def close(self) -> None:
        if self._live.is_started:
            self._live.stop()


def rate_charts(history: list[tuple[float, MonitorReport]]) -> dict[str, list[RateSeries]]:
    """batches/s and MB/s over time, per server and for all of them when several, from interval reports taken at
    the given seconds since the start."""
    names: list[str] = []
    for _, report in history:
        names += [name for name in report.servers if name not in names]
    keys: list[str | None] = list(names)
    if len(names) != 1:
        keys.append(None)  # "all"
    charts: dict[str, list[RateSeries]] = {}
    for label, figure in (("batches/s", "batches_per_second"), ("MB/s", "megabytes_per_second")):
        charts[label] = [
            RateSeries(
                "all" if key is None else key,
                [seconds for seconds, _ in history],
                [
                    getattr(report.total if key is None else report.servers.get(key, _IDLE), figure)
                    for _, report in history
                ],
            )
            for key in keys
        ]
    return charts


@click.command(cls=TensorcomCommand, context_settings=HELP_OPTIONS)
@version_option("tensormon")
@connection_options()
@click.option(
    "-c",
    "-n",
    "--count",
    type=click.IntRange(min=1),
    default=None,
    help="Stop after this many batches (default: Ctrl-C). -c is tensorcom 0.1's spelling.",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds between reports (a report is made when a batch arrives after the interval is over). "
    "[default: 1]",
)
@click.option(
    "-r",
    "--report",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Report every N batches instead of every --interval seconds (tensorcom 0.1's -r).",
)
@refused_option(
    "-R",
    "--raw",
    reason="tensorcom 0.1's undecoded mode, which its Connection ignored; here decoding copies nothing, so the "
    "rates already are the transport's: drop -R",
    help="tensorcom 0.1's undecoded mode: refused (0.1 ignored it; decoding here copies nothing), drop it.",
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
@click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    default=None,
    help="At the end, write batches/s and MB/s over time (per interval, per server) to this PNG file.",
)
def main(
    urls: tuple[str, ...],
    timeout: float,
    seed: int | None,
    rank: int | None,
    world_size: int | None,
    count: int | None,
    interval: float | None,
    report: int | None,
    as_json: bool,
    live: bool | None,
    compute: float,
    plot: str | None,
) -> None:
    """Receive batches from URLS and report throughput until Ctrl-C or --count batches, then a summary.

    Figures: batches/s, samples/s (the first dimension of a batch's first array), MB/s, the latency between batches
    (median and 99th percentile), and stall, the share of time spent waiting for a batch. Each line or row names
    a server by its address (zreq: the server's name) and counts the batches received from it so far; the rates
    are those of the last interval. With several servers (several URLS, or e.g. zsub://host:788{0..3}) an "all"
    row adds them up.

    With no URLS it reads zsub://127.0.0.1:7880, as tensorcom 0.1 did. tensorcom 0.1's flags: -c N (--count),
    -r N (a report every N batches); -R is refused.
    """
    if report is not None and interval is not None:
        raise ConfigError(
            "-r/--report and --interval: give one (a report every N batches, or every S seconds)"
        )
    interval = 1.0 if interval is None else interval
    if plot:  # before connecting: a bad path or a missing matplotlib fails at once
        check_output_path(plot, "--plot")
        require_matplotlib()
    history: list[tuple[float, MonitorReport]] = []
    with open_connection(urls, timeout, seed=seed, rank=rank, world_size=world_size) as connection:
        display: Display
        if as_json:
            display = JsonDisplay()
        elif live if live is not None else sys.stdout.isatty():
            display = LiveDisplay(interval)
        else:
            display = PlainDisplay()
        monitor = ThroughputMonitor()
        next_report = monitor.started + interval
        reported = 0
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
                due = monitor.batches - reported >= report if report is not None else arrived >= next_report
                if due:
                    figures = monitor.interval(arrived)
                    history.append((arrived - monitor.started, figures))
                    display.interval(figures, monitor.summary(arrived), arrived - monitor.started)
                    next_report = arrived + interval
                    reported = monitor.batches
        except KeyboardInterrupt:
            pass
        except Timeout:
            if monitor.batches:  # the stream stopped: still show what came through, then the error
                display.summary(monitor.summary())
                if plot:
                    _write_plot(plot, monitor, history, as_json)
            raise
        finally:
            display.close()
        display.summary(monitor.summary())
    if plot:
        _write_plot(plot, monitor, history, as_json)


def _write_plot(
    path: str, monitor: ThroughputMonitor, history: list[tuple[float, MonitorReport]], as_json: bool
) -> None:
    """Draw the rates of every interval, the unfinished last one included, to ``path``."""
    now = time.monotonic()
    last_part = monitor.interval(now)
    if last_part.total.batches or not history:
        history.append((now - monitor.started, last_part))
    total = monitor.summary(now).total
    title = f"tensormon: {total.batches} batches in {total.seconds:.1f} s"
    draw_rates(rate_charts(history), path, title=title)
    click.echo(f"wrote {path}: rates over {len(history)} intervals", err=as_json)


def _integer(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


if __name__ == "__main__":
    main()
