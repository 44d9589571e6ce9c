"""The image servers as tensorcom 0.1's README and command lines use them: brace URLs are more publishers (one
process each, distinct shares), servers started separately draw distinct seeds, 0.1's flags work or are refused in
one line naming the replacement, and with no URL they publish on zpub://127.0.0.1:7880."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import READY_SECONDS, StartProcess, children_of, read_line, stderr_of
from imagenet_fixtures import CLASSES, PER_CLASS, make_image_folder, make_shards

from tensorcom import Connection

IMAGES = len(CLASSES) * PER_CLASS  # 12 readable images


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"), corrupt=False)


def start(
    start_process: StartProcess, log: Path, program: str, *args: str
) -> tuple[subprocess.Popen[bytes], list[str]]:
    """Start an image server program; return it and the client URLs of its ready line."""
    process = start_process(
        "-m", f"tensorcom_servers.{program}", *args, stdout=subprocess.PIPE, stderr_log=log
    )
    words = read_line(process, READY_SECONDS).split()
    assert words[:1] == ["ready"], (words, stderr_of(process))
    return process, words[1:]


def receive(urls: list[str], count: int) -> list[tuple[int, tuple[int, ...], bytes]]:
    """``count`` batches from ``urls``: (epoch, sample indices, image bytes) each."""
    with Connection(urls, timeout=60) as connection:
        got = []
        for _ in range(count):
            images, _labels = connection.recv()
            got.append((connection.last.epoch, tuple(connection.last.indices), images.tobytes()))
    return got


def first_epoch(connection: Any, batch_size: int = 2) -> list[tuple[int, tuple[int, ...]]]:
    """(epoch, indices) of the batches received until every batch of epoch 0 has come (publishers run unevenly, so
    one may be epochs ahead of another)."""
    got: list[tuple[int, tuple[int, ...]]] = []
    while sum(epoch == 0 for epoch, _ in got) < IMAGES // batch_size and len(got) < 1000:
        connection.recv()
        got.append((connection.last.epoch, tuple(connection.last.indices)))
    return got


def test_brace_urls_run_one_publisher_process_each_with_a_distinct_share(
    folder: Path, tmp_path: Path, start_process: StartProcess
) -> None:
    """`serve-imagenet-dir ... zpub+ipc://DIR/p{0..2}`: three publisher processes; a client of the same brace URL
    never gets a batch twice, and the first epoch of the three shares is the whole dataset, each image once."""
    url = f"zpub+ipc://{tmp_path}/p{{0..2}}"
    process, urls = start(
        start_process,
        tmp_path / "log",
        "imagenet_dir",
        "-d",
        str(folder),
        "-b",
        "2",
        "--size",
        "8",
        "-w",
        "0",
        url,
    )
    assert len(urls) == 3 and len(children_of(process.pid)) >= 3
    with Connection(urls, timeout=60) as connection:
        got = first_epoch(connection)
    assert len(set(got)) == len(got)
    assert sorted(index for epoch, indices in got if epoch == 0 for index in indices) == list(range(IMAGES))
    pids = set(re.findall(r"publisher \d of 3 \(pid (\d+)\)", (tmp_path / "log").read_text()))
    assert len(pids) == 3


def test_servers_started_separately_without_a_seed_send_different_streams(
    folder: Path, tmp_path: Path, start_process: StartProcess
) -> None:
    """Two servers with the same flags and no --seed draw (and log) distinct seeds; with the logged seed a server
    sends the same stream again."""
    args = ["-d", str(folder), "-b", "4", "--size", "8", "-w", "0"]
    streams, seeds = [], []
    for name in ("a", "b"):
        _, urls = start(
            start_process, tmp_path / f"{name}.log", "imagenet_dir", *args, f"zpush+ipc://{tmp_path}/{name}"
        )
        streams.append(receive(urls, 3))
        log = (tmp_path / f"{name}.log").read_text()
        found = re.search(r"stream seed (\d+), drawn at random", log)
        assert found, log
        seeds.append(found.group(1))
    assert seeds[0] != seeds[1] and streams[0] != streams[1]
    _, urls = start(
        start_process,
        tmp_path / "c.log",
        "imagenet_dir",
        *args,
        "--seed",
        seeds[0],
        f"zpush+ipc://{tmp_path}/c",
    )
    assert receive(urls, 3) == streams[0]
    assert "drawn at random" not in (tmp_path / "c.log").read_text()


def test_parallel_publishers_on_one_connecting_url(
    folder: Path, tmp_path: Path, start_process: StartProcess
) -> None:
    """0.1's `-P 2 zpush://...`: two processes push distinct shares into one client."""
    with Connection(f"zpull+ipc://{tmp_path}/in", timeout=60) as connection:
        start(
            start_process,
            tmp_path / "log",
            "imagenet_dir",
            *("-d", str(folder), "-b", "2", "--size", "8", "-w", "0", "-P", "2"),
            f"zpush+ipc://{tmp_path}/in",
        )
        got = first_epoch(connection)
    assert len(set(got)) == len(got)
    assert sorted(i for epoch, indices in got if epoch == 0 for i in indices) == list(range(IMAGES))


def test_the_0_1_flags_of_serve_imagenet_dir(
    folder: Path, tmp_path: Path, start_process: StartProcess
) -> None:
    """`--dir`, `-S` (folder order), `-n` (normalised floats), `-w`: the images come in folder order as float32."""
    _, urls = start(
        start_process,
        tmp_path / "log",
        "imagenet_dir",
        *(
            "--dir",
            str(folder),
            "-b",
            "4",
            "--size",
            "8",
            "-w",
            "0",
            "-S",
            "-n",
            "--no-augment",
            "--seed",
            "1",
        ),
        f"zpush+ipc://{tmp_path}/s",
    )
    with Connection(urls, timeout=60) as connection:
        images, labels = connection.recv()
        assert images.dtype == np.float32 and connection.last.indices == [0, 1, 2, 3]
        assert labels.tolist() == [0, 0, 0, 0]


def test_benchmark_mode_sends_one_batch_again_and_again(
    folder: Path, tmp_path: Path, start_process: StartProcess
) -> None:
    """0.1's `-B`: the first batch, made once, then sent again and again."""
    _, urls = start(
        start_process,
        tmp_path / "log",
        "imagenet_dir",
        *("-d", str(folder), "-b", "4", "--size", "8", "-w", "0", "-B"),
        f"zpush+ipc://{tmp_path}/s",
    )
    with Connection(urls, timeout=60) as connection:
        batches = [connection.recv() for _ in range(5)]
    assert all(np.array_equal(b[0], batches[0][0]) and np.array_equal(b[1], batches[0][1]) for b in batches)


def test_the_0_1_flags_of_serve_imagenet_shards(
    folder: Path, tmp_path: Path, start_process: StartProcess
) -> None:
    """`serve-imagenet-shards -u SHARDS -p 2 -N 0 -S zpush://...`: 0.1's names for shards, parallel publishers,
    DataLoader workers and shuffling."""
    shards = make_shards(folder, tmp_path / "shards")
    with Connection(f"zpull+ipc://{tmp_path}/in", timeout=60) as connection:
        start(
            start_process,
            tmp_path / "log",
            "imagenet_shards",
            *("-u", shards, "-b", "2", "--size", "8", "-N", "0", "-p", "2", "-S"),
            f"zpush+ipc://{tmp_path}/in",
        )
        got = first_epoch(connection)
    assert sorted(i for epoch, indices in got if epoch == 0 for i in indices) == list(range(IMAGES))


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tensorcom_servers.imagenet_dir", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["-r", "10"], "--report SECONDS"),
        (["-P", "2", "zpub://127.0.0.1:0"], "braces"),
    ],
    ids=["report-every-n-batches", "parallel-on-a-bound-url"],
)
def test_0_1_flags_without_a_meaning_here_are_one_line_errors(
    folder: Path, args: list[str], says: str
) -> None:
    """A 0.1 flag that has no meaning here exits 2 with one line that names what to use instead."""
    result = run("-d", str(folder), *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and says in lines[0], result.stderr


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_with_no_url_it_publishes_where_0_1_did(
    folder: Path, tmp_path: Path, start_process: StartProcess
) -> None:
    """No URL: zpub://127.0.0.1:7880, tensorcom 0.1's default (skipped when something else holds that port)."""
    if not port_is_free(7880):
        pytest.skip("port 7880 is in use on this machine")
    _, urls = start(
        start_process, tmp_path / "log", "imagenet_dir", "-d", str(folder), "-b", "2", "--size", "8"
    )
    assert urls == ["zsub://127.0.0.1:7880"]
    got: Any = receive(urls, 2)
    assert len(got) == 2


def test_serve_synthetic_with_braces_runs_one_publisher_per_url(
    tmp_path: Path, start_process: StartProcess
) -> None:
    """`serve-synthetic -n 12 zpub+ipc://DIR/p{0..2}`: three processes, publisher k sending batches k, k+3, ...; a
    client of the same braces gets batches 0..11 once each (their labels tell which)."""
    process, urls = start(
        start_process,
        tmp_path / "log",
        "synthetic",
        "-b",
        "4",
        "--size",
        "4",
        "-n",
        "12",
        f"zpub+ipc://{tmp_path}/p{{0..2}}",
    )
    assert len(urls) == 3 and len(children_of(process.pid)) >= 3
    with Connection(urls, timeout=60) as connection:
        steps = sorted(int(connection.recv()[1][0]) // 4 for _ in range(12))
    assert steps == list(range(12))
