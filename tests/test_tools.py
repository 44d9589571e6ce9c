"""tensormon, tensorshow and tensorstat against real server processes sending known content, and the modules behind
them (tensorcom.monitoring.throughput, tensorcom.monitoring.grids, tensorcom.monitoring.statistics, tensorcom.monitoring.plots)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import StartProcess, read_line
from imagenet_fixtures import CLASSES, make_image_folder, start_image_server
from PIL import Image

from tensorcom import codec
from tensorcom.client import Connection
from tensorcom.errors import ConfigError
from tensorcom.monitoring.grids import IMAGENET_MEAN, IMAGENET_STD, load_class_names, to_display_images
from tensorcom.monitoring.plots import DPI, PANEL_HEIGHT, WIDTH, Histogram, histogram_figure, rate_figure
from tensorcom.monitoring.statistics import ArrayStatistics, BatchStatistics
from tensorcom.monitoring.throughput import ThroughputMonitor
from tensorcom_tools import tensormon, tensorshow, tensorstat

Batches = list[list[np.ndarray]]

SERVE_FILES = (
    "import sys\n"
    "from tensorcom import codec, serve\n"
    "serve([codec.load(path) for path in sys.argv[2:]], sys.argv[1], linger=20)\n"
)


@pytest.fixture
def file_server(
    start_process: StartProcess, tmp_path: Path
) -> Callable[[str, Batches], subprocess.Popen[bytes]]:
    """StartProcess a server process that sends the given batches (saved as .ten files) on a URL, then exits."""

    def start(url: str, batches: Batches) -> subprocess.Popen[bytes]:
        paths = []
        for number, batch in enumerate(batches):
            path = tmp_path / f"batch{number}.ten"
            codec.save(path, batch)
            paths.append(str(path))
        return start_process("-c", SERVE_FILES, url, *paths)

    return start


def invoke(program: object, *args: str) -> str:
    """Run a program in process with CliRunner; return its output after checking it succeeded."""
    result = CliRunner().invoke(program, list(args))  # type: ignore[arg-type]
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def read_png(path: Path, mode: str = "RGB") -> np.ndarray:
    """The pixels of a PNG file as an array (rows, columns[, channels])."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert(mode))


# tensormon ------------------------------------------------------------------------------------------------------


def test_tensormon_counts_and_rates_match_what_was_sent(
    synthetic_server: StartProcess, ipc_url: Callable[..., str]
) -> None:
    """--json reports exactly the batches, samples and bytes sent, rates equal to them over the time taken."""
    synthetic_server(ipc_url("zrpush"), count=20, batch_size=4, size=8)
    output = invoke(tensormon.main, ipc_url("zrpull"), "--count", "20", "--json", "--interval", "0.001")
    lines = [json.loads(line) for line in output.splitlines()]
    summary = lines[-1]
    assert summary["type"] == "summary" and all(line["type"] == "interval" for line in lines[:-1])
    assert (summary["batches"], summary["samples"]) == (20, 80)
    assert summary["bytes"] == 20 * (4 * 8 * 8 * 3 + 4 * 8)
    assert summary["mb_per_s"] == pytest.approx(summary["bytes"] / 1e6 / summary["seconds"])
    assert summary["samples_per_s"] == pytest.approx(80 / summary["seconds"])
    assert 0 < summary["latency_median_s"] <= summary["latency_p99_s"] <= summary["seconds"]
    assert 0 < summary["stall_s"] <= summary["seconds"]
    assert sum(line["batches"] for line in lines[:-1]) <= 20
    so_far = 0
    for line in lines[:-1]:  # each interval counts its own batches and says how many came so far
        so_far += line["batches"]
        assert line["total_batches"] == so_far
    assert list(summary["servers"]) == [ipc_url("zrpull").replace("zrpull+", "")]


def test_tensormon_reports_each_server(synthetic_server: StartProcess, ipc_url: Callable[..., str]) -> None:
    """With two servers (brace-expanded URL), per-server counts are what each sent and sum to the total."""
    synthetic_server(ipc_url("zrpush", "s0"), count=10, batch_size=4)
    synthetic_server(ipc_url("zrpush", "s1"), count=10, batch_size=3)
    output = invoke(tensormon.main, ipc_url("zrpull", "s{0,1}"), "--count", "20", "--json")
    summary = json.loads(output.splitlines()[-1])
    servers = summary["servers"]
    assert sorted((s["batches"], s["samples"]) for s in servers.values()) == [(10, 30), (10, 40)]
    assert summary["batches"] == 20 and summary["samples"] == 70
    assert sum(s["bytes"] for s in servers.values()) == summary["bytes"]


@pytest.mark.parametrize("display", ["--no-live", "--live"], ids=["plain-lines", "rich-live"])
def test_tensormon_prints_a_summary_line(
    synthetic_server: StartProcess, ipc_url: Callable[..., str], display: str
) -> None:
    """Plain and in-place displays both end with a summary line giving the counts and rates."""
    synthetic_server(ipc_url("zrpush"), count=8)
    output = invoke(tensormon.main, ipc_url("zrpull"), "-n", "8", "--interval", "0.001", display)
    assert "summary: 8 batches" in output and "samples/s" in output and "latency" in output
    if display == "--no-live":
        assert all("batches" in line for line in output.splitlines())


ZREQ_FACTORY = """
import numpy as np
from tensorcom.pipeline import Collate, Conveyer, Map, Partition, Range

def sample(index):
    return np.full((2, 2, 3), index % 256, np.uint8), index

def stream(*, seed, rank, world_size):
    return Conveyer([Range(1000), Partition(rank, world_size), Map(sample), Collate(5)])
"""


def test_tensormon_follows_a_zreq_stream(
    start_process: StartProcess, ipc_url: Callable[..., str], tmp_path: Path
) -> None:
    """Against a zrep server process, tensormon requests as the given rank and reports the last step."""
    (tmp_path / "zreq_factory.py").write_text(ZREQ_FACTORY)
    server_url = ipc_url("zrep", "request")
    serve = (
        "from tensorcom.server.request import RequestServer\n"
        "server = RequestServer('zreq_factory:stream', %r, workers=0)\n"
        "print('ready', flush=True)\n"
        "server.run()\n"
    )
    process = start_process(
        "-c", serve % server_url, env={**os.environ, "PYTHONPATH": str(tmp_path)}, stdout=subprocess.PIPE
    )
    assert read_line(process) == "ready\n"  # the server is bound: the client's first requests find it
    url = server_url.replace("zrep", "zreq")
    output = invoke(tensormon.main, url, "--rank", "1", "--world-size", "2", "-n", "12", "--json")
    summary = json.loads(output.splitlines()[-1])
    assert (summary["batches"], summary["samples"], summary["step"]) == (12, 60, 11)
    assert summary["bytes"] == 12 * (5 * 2 * 2 * 3 + 5 * 8)


def test_monitor_latency_and_stall_figures() -> None:
    """Latencies are the gaps between arrivals (per server too), stall the summed waits, rates over the time."""
    clock = iter([0.0]).__next__
    monitor = ThroughputMonitor(clock=clock)
    arrivals = [(1.0, "a", 0.5), (1.5, "b", 0.5), (2.5, "a", 1.0), (2.6, "b", 0.1)]
    for now, endpoint, waited in arrivals:
        monitor.record(endpoint, 10, 1000, waited, now=now)
    report = monitor.summary(now=4.0)
    assert report.first_batch == 1.0
    assert (report.total.batches, report.total.samples, report.total.nbytes) == (4, 40, 4000)
    assert report.total.latency_median == pytest.approx(np.median([0.5, 1.0, 0.1]))
    assert report.total.stall == pytest.approx(2.1) and report.total.stall_fraction == pytest.approx(2.1 / 4)
    assert report.total.megabytes_per_second == pytest.approx(4000 / 1e6 / 4)
    assert report.servers["a"].latency_median == pytest.approx(1.5)
    assert report.servers["b"].latency_p99 == pytest.approx(1.1)
    first = monitor.interval(now=2.0)
    second = monitor.interval(now=3.0)
    assert (first.total.batches, second.total.batches) == (4, 0) and second.total.seconds == 1.0


# tensorshow -----------------------------------------------------------------------------------------------------

COLOURS = np.array(
    [[255, 0, 0], [0, 255, 0], [0, 0, 255], [200, 100, 50], [10, 20, 30], [128, 128, 128]], np.uint8
)
SIZE = 8


def solid_images(colours: np.ndarray, layout: str, dtype: str) -> np.ndarray:
    """A batch of SIZE x SIZE images, image i filled with colours[i], in the given layout and value encoding."""
    images = np.broadcast_to(colours[:, None, None, :], (len(colours), SIZE, SIZE, 3)).astype(np.float64)
    if layout in ("nhw", "nhw1", "n1hw"):
        images = images[..., :1]
    if dtype == "unit":
        images = images / 255
    elif dtype == "imagenet":
        images = (images / 255 - IMAGENET_MEAN) / IMAGENET_STD
    if layout in ("nchw", "n1hw"):
        images = images.transpose(0, 3, 1, 2)
    elif layout == "nhw":
        images = images[..., 0]
    return np.ascontiguousarray(images.astype(np.uint8 if dtype == "uint8" else np.float32))


@pytest.mark.parametrize(
    "layout, dtype, tolerance",
    [
        ("nhwc", "uint8", 0),
        ("nchw", "unit", 0),
        ("nchw", "imagenet", 1),
        ("nhw", "uint8", 0),
        ("nhw1", "uint8", 0),
        ("n1hw", "unit", 0),
    ],
    ids=["nhwc-uint8", "nchw-float01", "nchw-imagenet", "grey-nhw", "grey-nhw1", "grey-n1hw-float"],
)
def test_tensorshow_grid_holds_the_sent_images(
    file_server: Callable[[str, Batches], object],
    ipc_url: Callable[..., str],
    tmp_path: Path,
    layout: str,
    dtype: str,
    tolerance: int,
) -> None:
    """Two batches of 3 solid images make a 3x2 grid of the expected size whose cells show the sent colours."""
    colours = COLOURS if layout in ("nhwc", "nchw") else np.repeat(COLOURS[:, :1], 3, axis=1)
    labels = np.arange(6, dtype=np.int64)
    batches = [[solid_images(colours[i : i + 3], layout, dtype), labels[i : i + 3]] for i in (0, 3)]
    file_server(ipc_url("zrpush"), batches)
    output_path = tmp_path / "grid.png"
    output = invoke(
        tensorshow.main,
        ipc_url("zrpull"),
        "-n",
        "2",
        "--output",
        str(output_path),
        "--scale",
        "4",
        "--columns",
        "3",
    )
    assert f"wrote {output_path}: 6 images from 2 batches in a 3x2 grid" in output
    picture = read_png(output_path)
    cell_width, cell_height = 4 * SIZE + 2 * 2, 4 * SIZE + 2 * 2 + 14  # padding 2 around, a 14 px label strip
    assert picture.shape == (2 * cell_height, 3 * cell_width, 3)
    for index, colour in enumerate(colours):
        row, column = divmod(index, 3)
        centre = picture[row * cell_height + 2 + 2 * SIZE, column * cell_width + 2 + 2 * SIZE]
        assert np.abs(centre.astype(int) - colour.astype(int)).max() <= tolerance, (index, centre, colour)
    strip = picture[4 * SIZE + 4 : cell_height, : cell_width - 1]
    assert strip.min() < 128  # the label is drawn in the strip under the image


def test_tensorshow_picks_the_array_and_stretches_other_floats(
    file_server: Callable[[str, Batches], object], ipc_url: Callable[..., str], tmp_path: Path
) -> None:
    """--index chooses the image array; floats outside [0,255] and ImageNet's range are min-max stretched."""
    images = np.zeros((2, 1, SIZE, SIZE), np.float32)
    images[:, :, :, SIZE // 2 :] = 1000.0
    images -= 500.0
    decoy = np.zeros((2, SIZE, SIZE), np.uint8)
    file_server(ipc_url("zrpush"), [[np.array([7, 9], np.int64), decoy, images]])
    output_path = tmp_path / "grid.png"
    invoke(tensorshow.main, ipc_url("zrpull"), "--index", "2", "-o", str(output_path), "--scale", "1")
    picture = read_png(output_path, "L")
    assert picture.shape == (SIZE + 4 + 14, 2 * (SIZE + 4))
    assert picture[2 + 4, 2 + 1] == 0 and picture[2 + 4, 2 + SIZE - 2] == 255


def test_tensorshow_writes_a_png_without_a_display(
    file_server: Callable[[str, Batches], object],
    ipc_url: Callable[..., str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With no DISPLAY and no --output, the grid goes to tensorshow.png, labelled with names from --classes."""
    classes = tmp_path / "names.json"
    classes.write_text(json.dumps({"0": ["n01440764", "tench"], "1": ["n01443537", "goldfish"]}))
    file_server(ipc_url("zrpush"), [[np.zeros((2, SIZE, SIZE, 3), np.uint8), np.array([0, 1])]])
    monkeypatch.chdir(tmp_path)
    result = CliRunner(env={"DISPLAY": None, "WAYLAND_DISPLAY": None}).invoke(
        tensorshow.main, [ipc_url("zrpull"), "--classes", str(classes)]
    )
    assert result.exit_code == 0, result.output
    assert "wrote tensorshow.png: 2 images" in result.output
    assert read_png(tmp_path / "tensorshow.png").shape[1] > 0


@pytest.mark.parametrize(
    "content, expected",
    [
        (["cat", "dog"], {0: "cat", 1: "dog"}),
        ({"3": "cat", "7": "dog"}, {3: "cat", 7: "dog"}),
        ({"0": ["n01440764", "tench"]}, {0: "tench"}),
    ],
    ids=["list", "object", "imagenet-style"],
)
def test_class_names_files(tmp_path: Path, content: object, expected: dict[int, str]) -> None:
    """Class names load from a JSON list, an object keyed by number, or ImageNet's [wnid, name] pairs."""
    path = tmp_path / "names.json"
    path.write_text(json.dumps(content))
    assert load_class_names(path) == expected


def test_display_images_clip_nan_and_keep_uint8() -> None:
    """uint8 images pass through untouched; NaN pixels of float images show black."""
    pixels = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    assert np.array_equal(to_display_images(pixels), pixels)
    floats = np.full((1, 3, 2, 2), 0.5, np.float32)
    floats[0, :, 0, 0] = np.nan
    shown = to_display_images(floats)
    assert shown[0, 0, 0].tolist() == [0, 0, 0] and shown[0, 1, 1].tolist() == [128, 128, 128]


# tensorstat -----------------------------------------------------------------------------------------------------


def stat_batches() -> Batches:
    """Three batches of different lengths: float values with NaN and Inf, int64 labels, uint8 images."""
    rng = np.random.default_rng(5)
    batches: Batches = []
    for length in (4, 6, 3):
        values = rng.normal(3.0, 2.0, (length, 5)).astype(np.float32)
        labels = rng.integers(0, 7, length, dtype=np.int64)
        images = rng.integers(0, 256, (length, 2, 2, 3), dtype=np.uint8)
        batches.append([values, labels, images])
    batches[0][0][0, 0] = np.nan
    batches[1][0][1, 2] = np.inf
    batches[1][0][2, 3] = -np.inf
    batches[2][0][0, :2] = np.nan
    return batches


def test_tensorstat_figures_equal_numpys(
    file_server: Callable[[str, Batches], object], ipc_url: Callable[..., str], tmp_path: Path
) -> None:
    """--json gives numpy's min, max, mean and std of the finite values, NaN/Inf counts, shapes and class counts."""
    batches = stat_batches()
    file_server(ipc_url("zrpush"), batches)
    plot = tmp_path / "hist.png"
    output = invoke(tensorstat.main, ipc_url("zrpull"), "-n", "3", "--json", "--plot", str(plot))
    report = json.loads(output.splitlines()[0])
    assert report["batches"] == 3 and len(report["positions"]) == 3
    for position, figures in enumerate(report["positions"]):
        everything = np.concatenate([batch[position].reshape(-1) for batch in batches])
        finite = everything[np.isfinite(everything)].astype(np.float64)
        assert figures["min"] == finite.min() and figures["max"] == finite.max()
        assert figures["mean"] == pytest.approx(finite.mean(), rel=1e-12)
        assert figures["std"] == pytest.approx(finite.std(), rel=1e-12)
        assert figures["nan"] == np.isnan(everything).sum() and figures["inf"] == np.isinf(everything).sum()
        assert figures["elements"] == everything.size
        assert figures["dtypes"] == {str(batches[0][position].dtype): 3}
        assert [s["shape"] for s in figures["shapes"]] == [list(batch[position].shape) for batch in batches]
    assert (report["positions"][0]["nan"], report["positions"][0]["inf"]) == (3, 2)
    labels = np.concatenate([batch[1] for batch in batches])
    assert report["positions"][1]["classes"] == {
        str(k): v for k, v in sorted(Counter(labels.tolist()).items())
    }
    assert "classes" not in report["positions"][0] and "classes" not in report["positions"][2]
    picture = read_png(plot)
    assert picture.shape == (round(3 * PANEL_HEIGHT * DPI), round(WIDTH * DPI), 3)
    panel = picture.shape[0] // 3
    for number in range(3):
        assert (picture[number * panel : (number + 1) * panel] != 255).any(axis=2).mean() > 0.01  # drawn on


def test_tensorstat_text_report(synthetic_server: StartProcess, ipc_url: Callable[..., str]) -> None:
    """The text report names each position's dtype and shapes, and lists the classes of the label array."""
    synthetic_server(ipc_url("zrpush"), count=3, batch_size=2)
    output = invoke(tensorstat.main, ipc_url("zrpull"), "-n", "3")
    assert output.splitlines()[:2] == ["3 batches", "[0] uint8  shapes (2, 8, 8, 3) x3"]
    assert "[1] int64  shapes (2,) x3" in output
    assert "classes (6 distinct): 0:1 1:1 2:1 3:1 4:1 5:1" in output


def test_statistics_merge_batches_like_one_array() -> None:
    """Figures merged over many uneven batches equal numpy's on the whole, for ints and floats alike."""
    rng = np.random.default_rng(0)
    for values in (rng.normal(1e6, 1.0, 1000), rng.integers(-50, 50, 1000)):
        statistics = ArrayStatistics()
        for chunk in np.split(values, [1, 7, 300, 301, 999]):
            statistics.update(chunk)
        assert statistics.minimum == values.min() and statistics.maximum == values.max()
        assert statistics.mean == pytest.approx(values.mean(), rel=1e-12)
        assert statistics.std == pytest.approx(values.std(), rel=1e-9)


# clean errors -----------------------------------------------------------------------------------------------------

PROGRAMS = ["tensormon", "tensorshow", "tensorstat"]


@pytest.mark.parametrize("program", PROGRAMS, ids=PROGRAMS)
def test_timeout_is_one_clean_line(program: str, tmp_path: Path) -> None:
    """With no server answering, each program ends after --timeout with one 'Error:' line and exit code 4."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            f"tensorcom_tools.{program}",
            f"zrpull+ipc://{tmp_path}/none",
            "--timeout",
            "0.5",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 4
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: no batch within 0.5 s from ipc://{tmp_path}/none")


@pytest.mark.parametrize(
    "program, url",
    [
        ("tensormon", "zpush://127.0.0.1:5"),
        ("tensorshow", "zfoo://127.0.0.1:5"),
        ("tensorstat", "zpull://nonsense"),
    ],
    ids=PROGRAMS,
)
def test_bad_url_is_one_clean_line(program: str, url: str) -> None:
    """A bad URL ends each program at once with one 'Error:' line quoting it and exit code 2."""
    result = subprocess.run(
        [sys.executable, "-m", f"tensorcom_tools.{program}", url], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and url in lines[0]


def test_request_options_need_zreq_urls() -> None:
    """--rank with a stream URL is refused with one clean line (exit code 2) before anything connects."""
    result = CliRunner().invoke(tensorstat.main, ["zrpull://127.0.0.1:5", "--rank", "1"])
    assert result.exit_code == 2
    assert result.output.strip() == "Error: --rank: only for zreq:// URLs. Found: zrpull://127.0.0.1:5"


# tensormon: what a person reads ----------------------------------------------------------------------------------


def test_tensormon_lines_name_the_one_server_and_count_batches_so_far(
    synthetic_server: StartProcess, ipc_url: Callable[..., str]
) -> None:
    """With one server, each plain line names its address; the batch count grows from line to line (the total so
    far) and ends at what was received, while batches/s is the interval's rate."""
    synthetic_server(ipc_url("zrpush"), count=40, batch_size=2, size=8)
    output = invoke(tensormon.main, ipc_url("zrpull"), "-n", "40", "--interval", "0.001", "--no-live")
    address = ipc_url("zrpull").replace("zrpull+", "")
    lines = [line for line in output.splitlines() if re.match(r"\s*[\d.]+ s  ", line)]
    assert lines, output
    totals = []
    for line in lines:
        match = re.fullmatch(
            rf"\s*[\d.]+ s  {re.escape(address)}\s+(\d+) batches  [\d.]+ batches/s  .*", line
        )
        assert match, line
        totals.append(int(match.group(1)))
    assert totals == sorted(totals) and totals[-1] <= 40 and len(set(totals)) > 1
    assert f"  {address}: 40 batches" in output  # the summary names it too


def test_tensormon_plots_rates_per_server(
    synthetic_server: StartProcess, ipc_url: Callable[..., str], tmp_path: Path
) -> None:
    """--plot writes batches/s and MB/s over time as a PNG: one line per server and one for all of them."""
    pytest.importorskip("matplotlib")
    synthetic_server(ipc_url("zrpush", "s0"), count=30, batch_size=4)
    synthetic_server(ipc_url("zrpush", "s1"), count=30, batch_size=3)
    plot = tmp_path / "rates.png"
    output = invoke(
        tensormon.main, ipc_url("zrpull", "s{0,1}"), "-n", "60", "--interval", "0.001", "--plot", str(plot)
    )
    assert f"wrote {plot}: rates over" in output
    assert read_png(plot).shape == (round(2 * PANEL_HEIGHT * DPI), round(WIDTH * DPI), 3)


def test_rate_charts_have_a_line_per_server_labelled_axes_and_a_legend() -> None:
    """The rate chart of two servers has, per panel, a line for each server and one for all, axis labels, ticks
    and a legend naming them; a server silent in an interval shows 0 there."""
    pytest.importorskip("matplotlib")
    clock = iter([0.0]).__next__
    monitor = ThroughputMonitor(clock=clock)
    history = []
    for second, endpoints in ((1.0, ["a", "b"]), (2.0, ["a"]), (3.0, ["a", "b", "b"])):
        for endpoint in endpoints:
            monitor.record(endpoint, 4, 1_000_000, 0.01, now=second - 0.5)
        history.append((second, monitor.interval(now=second)))
    charts = tensormon.rate_charts(history)
    assert list(charts) == ["batches/s", "MB/s"]
    assert [series.name for series in charts["batches/s"]] == ["a", "b", "all"]
    assert list(charts["batches/s"][1].values) == [1.0, 0.0, 2.0]
    assert list(charts["MB/s"][2].values) == [2.0, 1.0, 3.0]
    figure = rate_figure(charts, title="rates")
    for axes, label in zip(figure.axes, charts, strict=True):
        assert (axes.get_xlabel(), axes.get_ylabel()) == ("seconds since start", label)
        assert len(axes.get_lines()) == 3 and len(axes.get_yticks()) > 2
        assert [text.get_text() for text in axes.get_legend().get_texts()] == ["a", "b", "all"]


# tensorstat: histograms ------------------------------------------------------------------------------------------


def test_histograms_have_ticks_across_the_range_and_separated_bars() -> None:
    """A value histogram has ticks between its ends (not only min and max) and a gap between neighbouring bars;
    a label histogram has one bar per class, a tick under each, and gaps too; every panel labels its axes."""
    pytest.importorskip("matplotlib")
    statistics = BatchStatistics(sample_limit=10_000)
    rng = np.random.default_rng(1)
    for _ in range(4):
        statistics.update([rng.normal(0.0, 1.0, (16, 8)).astype(np.float32), rng.integers(0, 5, 16)])
    figure = histogram_figure(tensorstat.histograms(statistics))
    values, labels = figure.axes
    assert (values.get_xlabel(), values.get_ylabel(), labels.get_xlabel()) == ("value", "count", "label")
    low, high = values.get_xlim()
    inside = [tick for tick in values.get_xticks() if low < tick < high]
    assert len(inside) >= 3
    for axes in (values, labels):
        bars = sorted(axes.patches, key=lambda bar: bar.get_x())
        assert len(bars) > 1
        assert all(a.get_x() + a.get_width() < b.get_x() for a, b in pairwise(bars))
    assert [bar.get_x() + bar.get_width() / 2 for bar in labels.patches] == pytest.approx([0, 1, 2, 3, 4])
    assert list(labels.get_xticks()) == [0, 1, 2, 3, 4]
    assert labels.get_title(loc="left").startswith("[1] int64")


def test_a_discrete_histogram_needs_one_integer_per_bin() -> None:
    """Histogram(discrete=True) refuses bins that are not one integer wide, naming what it expected."""
    with pytest.raises(ConfigError, match="one bin per integer"):
        Histogram("t", [1, 2], 0.0, 4.0, discrete=True)
    with pytest.raises(ConfigError, match="high edge must be > its low edge"):
        Histogram("t", [1], 3.0, 3.0)


# output paths and optional libraries ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "program, option",
    [(tensorstat, "--plot"), (tensormon, "--plot"), (tensorshow, "--output")],
    ids=["tensorstat", "tensormon", "tensorshow"],
)
def test_an_output_in_a_missing_folder_fails_before_any_work(
    program: Any, option: str, tmp_path: Path, ipc_url: Callable[..., str]
) -> None:
    """An output file in a folder that does not exist ends the program at once (no server is even there) with one
    clean line naming the option, the folder and what is expected, and exit code 2."""
    path = tmp_path / "missing" / "out.png"
    started = time.monotonic()
    result = CliRunner().invoke(program.main, [ipc_url("zrpull"), option, str(path), "--timeout", "60"])
    assert result.exit_code == 2, result.output
    assert result.output.splitlines() == [
        f"Error: {option} {str(path)!r}: folder {str(path.parent)!r} does not exist; "
        "expected a file in an existing folder"
    ]
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("program", ["tensorstat", "tensormon"])
def test_plot_without_matplotlib_says_how_to_install_it(program: str, tmp_path: Path) -> None:
    """Where matplotlib cannot be imported, --plot fails at once with one line naming pip install
    'tensorcom[tools]' (exit code 2), before connecting."""
    code = (
        "import sys\n"
        "sys.modules['matplotlib'] = None  # as if it were not installed\n"
        f"from tensorcom_tools.{program} import main\n"
        "main()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, f"zrpull+ipc://{tmp_path}/none", "--plot", str(tmp_path / "p.png")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "Error: drawing charts needs matplotlib, which is not installed: pip install 'tensorcom[tools]'"
    ]


# tensorshow: class names from the server --------------------------------------------------------------------------


def test_tensorshow_captions_with_the_class_names_a_zreq_server_sends(
    start_process: StartProcess, tmp_path: Path
) -> None:
    """serve-imagenet-dir sends its class folder names in WELCOME: the connection exposes them and tensorshow
    captions with them without a names file; a names file still wins."""
    folder = make_image_folder(tmp_path / "images", corrupt=False)
    _, url = start_image_server(
        start_process, "imagenet_dir", tmp_path / "server.log", "-d", str(folder), "-b", "4", "--size", "16"
    )
    with Connection(url, timeout=60) as connection:
        assert connection.class_names == CLASSES
    output = invoke(tensorshow.main, url, "-o", str(tmp_path / "grid.png"))
    assert "captioned with class names from the server" in output
    names = tmp_path / "names.json"
    names.write_text(json.dumps(["tabby", "hound", "bird"]))
    output = invoke(tensorshow.main, url, "-o", str(tmp_path / "grid.png"), "--classes", str(names))
    assert "captioned with class names from --classes" in output


def test_servers_without_class_names_send_none(
    request_server: Callable[..., tuple[subprocess.Popen[bytes], str]],
) -> None:
    """A zreq server whose pipeline has no class names leaves them out: the connection's class_names is None."""
    _, url = request_server("factories:small")
    with Connection(url, timeout=60) as connection:
        assert connection.class_names is None
        connection.recv()
