"""tensormon, tensorshow and tensorstat on tensorcom 0.1's command lines: the default URL (zsub://127.0.0.1:7880),
0.1's flags where they mean something here, and a one-line refusal naming the replacement where they do not."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import StartProcess, wait_ready
from PIL import Image

from tensorcom import codec
from tensorcom_tools import tensormon, tensorshow, tensorstat

Batches = list[list[np.ndarray]]
PROGRAMS = {"tensormon": tensormon, "tensorshow": tensorshow, "tensorstat": tensorstat}
ORIGINAL = os.environ.get("TENSORCOM_01_PYTHON")
DEFAULT_PORTS = (7880, 7881, 7882, 7883)  # 0.1's tensormon/tensorstat read 7880, its tensorshow 7880 to 7883
SIZE = 8
COLOURS = np.array(
    [[255, 0, 0], [0, 255, 0], [0, 0, 255], [200, 100, 50], [10, 20, 30], [128, 128, 128]], np.uint8
)
SERVE_FILES = (
    "import sys\n"
    "from tensorcom import codec, serve\n"
    "serve([codec.load(path) for path in sys.argv[2:]], sys.argv[1], linger=20)\n"
)
PUBLISH_01 = (
    "import time\n"
    "import numpy as np\n"
    "import tensorcom\n"
    "connection = tensorcom.Connection('zpub://127.0.0.1:7880')\n"
    "print('ready zsub://127.0.0.1:7880', flush=True)\n"
    "while True:\n"
    "    connection.send([np.full((3, 12, 12, 3), 7, np.uint8), np.arange(3, dtype=np.int32)])\n"
    "    time.sleep(0.01)\n"
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


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as zmq binds: TIME_WAIT does not count
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture
def default_ports() -> None:
    """Skip unless 127.0.0.1:7880 to 7883 are free: the default-URL tests bind 7880 and read 7880 to 7883."""
    busy = [port for port in DEFAULT_PORTS if not _port_is_free(port)]
    if busy:
        pytest.skip(f"127.0.0.1 port(s) {busy} in use; the default-URL tests need 7880 to 7883 to themselves")


@pytest.fixture
def default_publisher(default_ports: None, start_process: StartProcess) -> Iterator[subprocess.Popen[bytes]]:
    """serve-synthetic publishing 3 images of 12x12 per batch on zpub://127.0.0.1:7880, 0.1's default address."""
    process = start_process(
        "-m",
        "tensorcom_servers.synthetic",
        "-q",
        "-b",
        "3",
        "--size",
        "12",
        "zpub://127.0.0.1:7880",
        stdout=subprocess.PIPE,
    )
    wait_ready(process)
    yield process


def invoke(program: click.Command, *args: str) -> str:
    """Run a program in process with CliRunner; return its output after checking it succeeded."""
    result = CliRunner().invoke(program, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def run_program(program: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a program as its own process, as a user types it."""
    return subprocess.run(
        [sys.executable, "-m", f"tensorcom_tools.{program}", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def solid(colours: np.ndarray, size: int = SIZE) -> np.ndarray:
    """A batch of size x size NHWC uint8 images, image i filled with colours[i]."""
    return np.ascontiguousarray(np.broadcast_to(colours[:, None, None, :], (len(colours), size, size, 3)))


def cell_centres(path: Path, columns: int, scale: int, cells: int, size: int = SIZE) -> list[np.ndarray]:
    """The centre pixel of each of the first ``cells`` cells of a tensorshow grid (padding 2, a 14 px caption)."""
    with Image.open(path) as image:
        picture = np.asarray(image.convert("RGB"))
    width, height = scale * size + 4, scale * size + 4 + 14
    assert picture.shape[1] == columns * width
    centres = []
    for index in range(cells):
        row, column = divmod(index, columns)
        centres.append(picture[row * height + 2 + scale * size // 2, column * width + 2 + scale * size // 2])
    return centres


def plain_reports(output: str) -> list[tuple[str, int]]:
    """(server, batches so far) of each report line tensormon prints (not the summary)."""
    found = re.findall(r"^\s+\d+\.\d s\s+(\S+)\s+(\d+) batches", output, flags=re.MULTILINE)
    return [(name, int(batches)) for name, batches in found]


# with no URL: 0.1's default ----------------------------------------------------------------------------------------


def test_tensormon_with_no_url_reads_port_7880(default_publisher: subprocess.Popen[bytes]) -> None:
    """`tensormon -c 4` with no URL reads the publisher on 127.0.0.1:7880, as 0.1's did."""
    output = invoke(tensormon.main, "-c", "4", "--no-live")
    assert "summary: 4 batches" in output
    assert "tcp://127.0.0.1:7880: 4 batches" in output


def test_tensorstat_with_no_url_reads_port_7880(default_publisher: subprocess.Popen[bytes]) -> None:
    """`tensorstat -c 3` with no URL reads the publisher on 127.0.0.1:7880 and describes its batches."""
    output = invoke(tensorstat.main, "-c", "3")
    assert output.startswith("3 batches\n")
    assert "[0] uint8  shapes (3, 12, 12, 3) x3" in output
    assert "[1] int64  shapes (3,) x3" in output


def test_tensorshow_with_no_url_reads_ports_7880_to_7883(
    default_publisher: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    """`tensorshow` with no URL reads the publishers on 127.0.0.1:7880 to 7883 (here only 7880 sends)."""
    output = invoke(tensorshow.main, "-o", str(tmp_path / "grid.png"))
    assert f"wrote {tmp_path / 'grid.png'}: 3 images from 1 batch" in output


@pytest.mark.skipif(not ORIGINAL, reason="set TENSORCOM_01_PYTHON (make interop) to run against 0.1")
def test_a_01_publisher_feeds_tensorstat_with_no_url(default_ports: None, tmp_path: Path) -> None:
    """tensorcom 0.1's own Connection publishing on its default port reaches `tensorstat -c 3` with no URL."""
    publisher = subprocess.Popen(
        [str(ORIGINAL), "-c", PUBLISH_01], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path
    )  # run from an empty folder: from /work/main, "import tensorcom" would find ours
    try:
        wait_ready(publisher)
        output = invoke(tensorstat.main, "-c", "3", "--json")
    finally:
        publisher.kill()
        publisher.communicate(timeout=60)
    figures = json.loads(output)
    assert figures["batches"] == 3
    images, labels = figures["positions"][:2]
    assert (
        images["shapes"] == [{"shape": [3, 12, 12, 3], "batches": 3}] and images["min"] == images["max"] == 7
    )
    assert labels["classes"] == {"0": 3, "1": 3, "2": 3}


# 0.1's flags that mean something here --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [("-c", "12", "-r", "4"), ("--count", "12", "--report", "4")],
    ids=["short", "long"],
)
def test_tensormon_reports_every_n_batches(
    synthetic_server: StartProcess, ipc_url: Callable[..., str], flags: tuple[str, ...]
) -> None:
    """0.1's `tensormon -c 12 -r 4 URL`: a report every 4 batches (4, 8, 12 so far), then a summary of 12."""
    synthetic_server(ipc_url("zrpush"), count=12)
    output = invoke(tensormon.main, *flags, ipc_url("zrpull"), "--no-live")
    server = ipc_url("zrpull").replace("zrpull+", "")
    assert plain_reports(output) == [(server, 4), (server, 8), (server, 12)]
    assert "summary: 12 batches" in output


def test_tensormon_reads_every_url_given(synthetic_server: StartProcess, ipc_url: Callable[..., str]) -> None:
    """Two positional URLs are one connection to both: each server's batches are counted under its name."""
    synthetic_server(ipc_url("zrpush", "a"), count=10, batch_size=4)
    synthetic_server(ipc_url("zrpush", "b"), count=10, batch_size=3)
    output = invoke(tensormon.main, ipc_url("zrpull", "a"), ipc_url("zrpull", "b"), "-c", "20", "--json")
    summary = json.loads(output.splitlines()[-1])
    servers = {name.rsplit("/", 1)[1]: figures for name, figures in summary["servers"].items()}
    assert {name: (s["batches"], s["samples"]) for name, s in servers.items()} == {
        "a": (10, 40),
        "b": (10, 30),
    }


def test_tensorstat_reads_every_url_given_and_20_batches_by_default(
    synthetic_server: StartProcess, ipc_url: Callable[..., str]
) -> None:
    """`tensorstat URL URL` reads both servers, 20 batches as 0.1 did without -c."""
    synthetic_server(ipc_url("zrpush", "a"), count=10, batch_size=4)
    synthetic_server(ipc_url("zrpush", "b"), count=10, batch_size=3)
    output = invoke(tensorstat.main, ipc_url("zrpull", "a"), ipc_url("zrpull", "b"))
    assert output.startswith("20 batches\n")
    assert (
        "shapes (4, 8, 8, 3) x10, (3, 8, 8, 3) x10" in output
        or "(3, 8, 8, 3) x10, (4, 8, 8, 3) x10" in output
    )


@pytest.mark.parametrize("unbatched", [True, False], ids=["-b", "without-b"])
def test_tensorstat_unbatched_counts_single_labels_as_classes(
    file_server: Callable[[str, Batches], object], ipc_url: Callable[..., str], unbatched: bool
) -> None:
    """0.1's `tensorstat -b -c 5 URL` on single samples: a batch axis is added, so the labels are classes."""
    samples = [[solid(COLOURS[i : i + 1])[0], np.array(i % 2, np.int64)] for i in range(5)]
    file_server(ipc_url("zrpush"), samples)
    flags = ["-b"] if unbatched else []
    output = invoke(tensorstat.main, *flags, "-c", "5", ipc_url("zrpull"), "--json")
    images, labels = json.loads(output)["positions"]
    if unbatched:
        assert images["shapes"] == [{"shape": [1, 8, 8, 3], "batches": 5}]
        assert labels["shapes"] == [{"shape": [1], "batches": 5}]
        assert labels["classes"] == {"0": 3, "1": 2}
    else:
        assert images["shapes"] == [{"shape": [8, 8, 3], "batches": 5}]
        assert labels["shapes"] == [{"shape": [], "batches": 5}]
        assert "classes" not in labels


def test_tensorshow_unbatched_samples_with_class_names(
    file_server: Callable[[str, Batches], object], ipc_url: Callable[..., str], tmp_path: Path
) -> None:
    """0.1's `tensorshow -b -C names.json URL`: each message is one image and its label, captioned by name."""
    samples = [[solid(COLOURS[i : i + 1])[0], np.array(i, np.int64)] for i in range(3)]
    file_server(ipc_url("zrpush"), samples)
    names = tmp_path / "names.json"
    names.write_text(json.dumps(["cat", "dog", "owl"]))
    grid = tmp_path / "grid.png"
    output = invoke(
        tensorshow.main, "-b", "-C", str(names), ipc_url("zrpull"), "-n", "3", "-o", str(grid), "--scale", "4"
    )
    assert f"wrote {grid}: 3 images from 3 batches in a 2x2 grid" in output
    assert "captioned with class names from --classes" in output
    for centre, colour in zip(cell_centres(grid, 2, 4, 3), COLOURS[:3], strict=True):
        assert centre.tolist() == colour.tolist()


def test_tensorshow_perbatch_takes_the_first_images_of_each_batch(
    file_server: Callable[[str, Batches], object], ipc_url: Callable[..., str], tmp_path: Path
) -> None:
    """0.1's `tensorshow -B 2 URL`: at most 2 images of each batch (here 2 batches of 3)."""
    labels = np.arange(6, dtype=np.int64)
    file_server(ipc_url("zrpush"), [[solid(COLOURS[i : i + 3]), labels[i : i + 3]] for i in (0, 3)])
    grid = tmp_path / "grid.png"
    output = invoke(
        tensorshow.main,
        "-B",
        "2",
        ipc_url("zrpull"),
        "-n",
        "2",
        "-o",
        str(grid),
        "--scale",
        "4",
        "--columns",
        "4",
    )
    assert f"wrote {grid}: 4 images from 2 batches in a 4x1 grid" in output
    centres = cell_centres(grid, 4, 4, 4)
    assert [centre.tolist() for centre in centres] == COLOURS[[0, 1, 3, 4]].tolist()


def test_tensorshow_img2img_shows_pairs_side_by_side(
    file_server: Callable[[str, Batches], object], ipc_url: Callable[..., str], tmp_path: Path
) -> None:
    """0.1's `tensorshow -m img2img URL`: image k of the first array beside image k of the second; a smaller
    second image is padded with black."""
    targets = solid(COLOURS[3:6], size=SIZE // 2)
    file_server(ipc_url("zrpush"), [[solid(COLOURS[:3]), targets]])
    grid = tmp_path / "grid.png"
    output = invoke(
        tensorshow.main, "-m", "img2img", ipc_url("zrpull"), "-o", str(grid), "--scale", "4", "--columns", "2"
    )
    assert f"wrote {grid}: 3 image pairs from 1 batch in a 2x3 grid" in output
    with Image.open(grid) as image:
        picture = np.asarray(image.convert("RGB"))
    width, height = 4 * SIZE + 4, 4 * SIZE + 4 + 14
    for pair in range(3):
        top = pair * height + 2
        assert picture[top + 2 * SIZE, 2 + 2 * SIZE].tolist() == COLOURS[pair].tolist()
        assert (
            picture[top + SIZE, width + 2 + SIZE].tolist() == COLOURS[3 + pair].tolist()
        )  # inside the target
        assert picture[top + 3 * SIZE, width + 2 + 3 * SIZE].tolist() == [0, 0, 0]  # its padding


# 0.1's flags that mean nothing here: one line naming the replacement ------------------------------------------------


@pytest.mark.parametrize(
    "program, args, expected",
    [
        ("tensormon", ["-R"], "Error: -R/--raw: tensorcom 0.1's undecoded mode"),
        ("tensormon", ["--raw", "zsub://127.0.0.1:7880"], "drop -R"),
        (
            "tensorstat",
            ["-r"],
            "Error: -r/--raw: tensorcom 0.1 printed only the throughput with it; for that use tensormon -c N",
        ),
        ("tensorstat", ["-c", "5", "--raw"], "use tensormon -c N"),
        ("tensorshow", ["-t", "5"], "Error: -t: tensorcom 0.1's seconds each image stayed on screen"),
        (
            "tensorshow",
            ["-t", "-1", "zsub://127.0.0.1:7880"],
            "drop -t (--timeout here is the seconds to wait",
        ),
        (
            "tensorshow",
            ["--timeout", "-1"],
            "Error: --timeout must be > 0 (seconds to wait for a batch). Found: -1 "
            "(tensorcom 0.1's --timeout -1 waited for a click",
        ),
        ("tensormon", ["-r", "5", "--interval", "2"], "Error: -r/--report and --interval: give one"),
        (
            "tensorshow",
            ["-m", "img2img", "--label-index", "1"],
            "Error: --label-index: not used with --mode img2img",
        ),
    ],
    ids=[
        "tensormon-R",
        "tensormon--raw",
        "tensorstat-r",
        "tensorstat--raw",
        "tensorshow-t",
        "tensorshow-t-negative",
        "tensorshow--timeout-1",
        "tensormon-report-and-interval",
        "tensorshow-img2img-label-index",
    ],
)
def test_a_flag_without_meaning_here_is_one_line(program: str, args: list[str], expected: str) -> None:
    """A 0.1 flag with no meaning here ends the program at once (nothing connects, so no timeout) with one line
    naming what to use instead, and exit code 2."""
    result = run_program(program, *args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expected in lines[0], lines


# --help ---------------------------------------------------------------------------------------------------------


FLAGS_01 = {
    "tensormon": ["-R", "--raw", "-r", "--report", "-c", "--count"],
    "tensorshow": ["-b", "--unbatched", "-m", "--mode", "-B", "--perbatch", "-C", "--classes", "-t"],
    "tensorstat": ["-b", "--unbatched", "-c", "--count", "-r", "--raw"],
}


@pytest.mark.parametrize("program", list(PROGRAMS), ids=list(PROGRAMS))
def test_help_says_what_each_01_flag_does_here(program: str) -> None:
    """`-h` works as in 0.1; every 0.1 flag is listed, its help naming 0.1, and the default URL is stated."""
    result = CliRunner().invoke(PROGRAMS[program].main, ["-h"], prog_name=program)
    assert result.exit_code == 0 and result.output.startswith(f"Usage: {program} [OPTIONS] [URLS]...")
    default = "zsub://127.0.0.1:788{0..3}" if program == "tensorshow" else "zsub://127.0.0.1:7880"
    assert f"With no URLS it reads {default}, as tensorcom 0.1 did" in " ".join(result.output.split())
    command: click.Command = PROGRAMS[program].main
    for flag in FLAGS_01[program]:
        options = [p for p in command.params if isinstance(p, click.Option) and flag in p.opts]
        assert len(options) == 1, flag
        assert "tensorcom 0.1" in (options[0].help or ""), flag
        assert flag in result.output


@pytest.mark.skipif(not ORIGINAL, reason="set TENSORCOM_01_PYTHON (make interop) to run against 0.1")
@pytest.mark.parametrize("program", list(PROGRAMS), ids=list(PROGRAMS))
def test_every_flag_of_01s_script_is_known(program: str) -> None:
    """Every flag that 0.1's installed script declares is an option of ours (used or refused), never 'no such
    option'."""
    script = Path(str(ORIGINAL)).parent / program
    declared = re.findall(r"add_argument\(((?:\"-[^\"]+\",\s*)+)", script.read_text())
    flags = [flag for group in declared for flag in re.findall(r"\"(-[^\"]+)\"", group)]
    assert flags, f"no flags found in {script}"
    known = {opt for p in PROGRAMS[program].main.params for opt in p.opts}
    missing = [flag for flag in flags if flag not in known]
    assert missing == [], missing
