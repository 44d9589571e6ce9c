"""The seed documents' examples (examples/conveyer, examples/swiftloader, examples/spdl) run as programs and keep
their documents' promises: each runs in a fresh interpreter and prints one JSON line per process, checked here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
RUN_SECONDS = 240  # torch imports and spawned processes on a busy 2-core machine


def run_example(
    arguments: list[str], cwd: Path, env: dict[str, str] | None = None, processes: int = 1
) -> list[dict[str, Any]]:
    """Run a program to its end and return the JSON lines it printed (one per process); fail with its stderr."""
    completed = subprocess.run(
        arguments,
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=RUN_SECONDS,
    )
    assert completed.returncode == 0, (
        f"{arguments} exited with {completed.returncode}:\n{completed.stderr[-4000:]}"
    )
    lines = [json.loads(line) for line in completed.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == processes, completed.stdout
    return lines


def example(name: str) -> list[str]:
    return [sys.executable, str(EXAMPLES / name)]


# -- Conveyer ----------------------------------------------------------------------------------------------------


def check_conveyer_rank(result: dict[str, Any], world_size: int) -> None:
    assert result["world_size"] == world_size and result["files"] == 40
    assert len(result["first_batch"]) == 8
    assert result["first_batch_pixels"] == result["first_batch"]  # each image decoded is the file it names
    assert result["state"]["step"] == 1 and result["state"]["stream"]["position"] == 8 * world_size
    assert result["resumed_equals_expected"] is True
    assert not set(result["resumed_batch"]) & set(result["first_batch"])


@pytest.mark.timeout(RUN_SECONDS + 60)
def test_conveyer_usage_saves_rebuilds_and_resumes_exactly(tmp_path: Path) -> None:
    """The Usage program (one rank): a batch of 8 decoded JPEGs, the state saved with torch.save, the pipeline
    rebuilt and loaded, and its next batch the one the first pipeline would have given."""
    [result] = run_example(example("conveyer/usage.py"), tmp_path)
    assert result["rank"] == 0
    check_conveyer_rank(result, 1)


@pytest.mark.timeout(2 * RUN_SECONDS)
def test_conveyer_usage_under_torchrun_gives_each_rank_distinct_data_and_one_state(tmp_path: Path) -> None:
    """Under torchrun with two ranks, the ranks' batches are disjoint and their saved states are identical."""
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    results = run_example(
        [torchrun, "--standalone", "--nproc_per_node=2", str(EXAMPLES / "conveyer/usage.py")],
        tmp_path,
        processes=2,
    )
    by_rank = {result["rank"]: result for result in results}
    assert sorted(by_rank) == [0, 1]
    for result in results:
        check_conveyer_rank(result, 2)
    assert not set(by_rank[0]["first_batch"]) & set(by_rank[1]["first_batch"])
    assert by_rank[0]["state"] == by_rank[1]["state"]


def test_conveyer_join_mixes_by_weight_and_covers_an_epoch(tmp_path: Path) -> None:
    """The Join example: 70/25/5 in every 20 items, and weights set to sizes read each dataset exactly once."""
    [result] = run_example(example("conveyer/join.py"), tmp_path)
    assert result == {
        "first_200": {"imagenet": 140, "lsun": 50, "cifar1k": 10},
        "every_20_in_proportion": True,
        "epoch_items": 2000,
        "epoch_complete": {"imagenet": True, "lsun": True, "cifar1k": True},
    }


# -- SwiftLoader -------------------------------------------------------------------------------------------------


def test_swiftloader_quick_start_reads_one_epoch(tmp_path: Path) -> None:
    """The Quick Start loader, started as consumer 0 of 1, gives every sample once in batches of 32."""
    [result] = run_example(example("swiftloader/quick_start.py"), tmp_path)
    assert result["batches"] == result["len"] == 7
    assert result["batch_sizes"] == [32] * 6 + [8]
    assert sorted(result["labels"]) == list(range(200)) and result["labels"] != list(range(200))


def test_swiftloader_quick_start_consumers_split_the_epoch(tmp_path: Path) -> None:
    """Two consumer processes (RANK 0 and 1 of WORLD_SIZE 2) with the default seed get disjoint halves."""
    processes = [
        subprocess.Popen(
            example("swiftloader/quick_start.py"),
            cwd=tmp_path,
            env={**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=RUN_SECONDS)
        assert process.returncode == 0, stderr[-4000:]
        results.append(json.loads(stdout.splitlines()[-1]))
    assert [result["consumer"] for result in results] == [0, 1]
    assert [len(result["labels"]) for result in results] == [100, 100]
    assert sorted(results[0]["labels"] + results[1]["labels"]) == list(range(200))


def test_swiftloader_start_with_and_without_device_and_to_device(tmp_path: Path) -> None:
    """start() without a device keeps numpy arrays; with one, the default move gives tensors there; a
    to_device(batch, device) of one's own is called with the device, as the original calls it."""
    [result] = run_example(example("swiftloader/start.py"), tmp_path)
    device = result["device"]
    assert result["no_device"] == [{"image": "numpy.ndarray float32"}, "numpy.ndarray int64"]
    assert result["default_move"] == [{"image": f"torch.float32 on {device}"}, f"torch.int64 on {device}"]
    assert result["own_to_device"] == [{"image": f"torch.float16 on {device}"}, f"torch.float16 on {device}"]
    assert result["own_to_device_called_with"] in (["cpu"], ["cuda:0"])


def test_swiftloader_all_arguments_are_accepted_and_used(tmp_path: Path) -> None:
    """Every README keyword (seed_numer, logger dict, pickle encoder, benchmark_file, ...) is accepted and used."""
    [result] = run_example(example("swiftloader/all_arguments.py"), tmp_path)
    assert result == {
        "seed": 20231112,
        "labels_once_each": True,
        "log_mentions_seed": True,
        "benchmark_records": [{"epoch": 0, "complete": True, "batches": 7, "samples": 100}],
    }


# -- SPDL --------------------------------------------------------------------------------------------------------


def test_spdl_sources_file_folders_and_async_bucket(tmp_path: Path) -> None:
    """The three source examples feed pipelines: paths from a file, files found in folders, an async listing."""
    [result] = run_example(example("spdl/sources.py"), tmp_path)
    assert result == {"file": [1, 2, 3, 4, 5, 6], "folders": [1, 2, 3, 4, 5, 6], "bucket": [2, 4, 6, 12]}


def test_spdl_image_pipeline_downloads_batches_and_decodes(tmp_path: Path) -> None:
    """The image pipeline: 70 JPEGs downloaded, aggregated by 32, decoded and resized to 224x224 uint8 tensors
    on the GPU if there is one, in source order."""
    [result] = run_example(example("spdl/image_batches.py"), tmp_path)
    assert result["shapes"] == [[32, 3, 224, 224], [32, 3, 224, 224], [6, 3, 224, 224]]
    assert result["dtype"] == "torch.uint8"
    assert result["devices"] == (["cuda"] if result["cuda_available"] else ["cpu"])
    assert result["first_values"] == list(range(70))
