"""SwiftLoader end to end: real server and worker processes over ipc, checked against the in-process pipeline."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import loader_datasets as datasets
import numpy as np
import pytest
from helpers import WAIT_SECONDS, assert_same_batches, read_line, running, wait_until, wait_until_gone

from tensorcom import codec
from tensorcom.errors import ConfigError, PipelineError, RemoteError, StateError
from tensorcom.loader import LOADER_ID_VARIABLE, NearbyPermutation, SwiftLoader
from tensorcom.loader._pipeline import PipelineSpec, swift_pipeline
from tensorcom.loader._server import LogSpec
from tensorcom.loader._tree import unpack_tree
from tensorcom.loader._warm import WARM_ENDPOINT
from tensorcom.loader.swift import _Consumer
from tensorcom.protocol import flatten_batch, rebuild_batch

TESTS = Path(__file__).parent


# -- helpers ---------------------------------------------------------------------------------------------------


def loader_processes(loader_id: str) -> list[int]:
    """Live processes (from the process table) whose environment marks them as workers of this loader."""
    marker = f"{LOADER_ID_VARIABLE}={loader_id}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as stream:
                environment = stream.read().split(b"\0")
        except OSError:
            continue
        if marker in environment and running(int(entry)):
            found.append(int(entry))
    return found


def wait_for_workers(loader_id: str, count: int, seconds: float = WAIT_SECONDS) -> list[int]:
    """The loader's worker processes, once ``count`` of them show in the process table (they may still be
    starting: the environment of a process only shows once it has executed the interpreter)."""
    wait_until(lambda: len(loader_processes(loader_id)) >= count, seconds, interval=0.1)
    return loader_processes(loader_id)


def server_pid(loader: SwiftLoader) -> int:
    consumer = loader._consumer
    assert consumer is not None and consumer.process is not None
    return int(consumer.process.pid)


def labels_of(loader: SwiftLoader) -> list[list[int]]:
    """One epoch of batches as lists of labels, checking each batch against the indices the loader reports."""
    epoch = []
    for batch in loader:
        labels = batch["label"].tolist()
        assert labels == loader.last.indices
        assert batch["x"][:, 0].tolist() == labels
        epoch.append(labels)
    return epoch


def reference(
    dataset_class: Any,
    dataset_kwargs: dict[str, Any],
    n: int,
    *,
    seed: int,
    consumer: int = 0,
    nb_consumer: int = 1,
    batch_size: int = 4,
    epoch: int = 0,
    **spec: Any,
) -> Iterator[Any]:
    """The batches of one consumer's epoch computed in this process, sent through the codec and rebuilt."""
    full_spec = PipelineSpec(dataset_class, dataset_kwargs, n, batch_size, True, 5 * batch_size, **spec)
    with swift_pipeline(seed=seed, rank=consumer, world_size=nb_consumer, spec=full_spec) as pipeline:
        pipeline.set_epoch(epoch)
        for packed in pipeline:
            arrays, shape = flatten_batch(packed)
            received = rebuild_batch(codec.decode(codec.encode(arrays)), **shape)
            yield unpack_tree(received)[0]


# -- options and validation (no processes) ---------------------------------------------------------------------


def test_unknown_option_is_an_error_naming_it_and_the_known_ones() -> None:
    """A misspelt option raises ConfigError with the name, a suggestion and the list of known options."""
    with pytest.raises(
        ConfigError, match=r"unknown SwiftLoader option 'seeds'\. Did you mean 'seed'\?"
    ) as info:
        SwiftLoader(datasets.Labelled, {"n": 8}, batch_size=4, seeds=1)
    assert "data_queue_size" in str(info.value) and "max_buffer_size" in str(info.value)
    with pytest.raises(ConfigError, match="'prefetch_factor'"):
        SwiftLoader(datasets.Labelled, {"n": 8}, prefetch_factor=2)


def _local_collate(samples: list[Any]) -> Any:
    return samples


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"batch_size": 0}, "batch_size must be an int >= 1"),
        ({"nb_consumer": -1}, "nb_consumer must be an int >= 1"),
        ({"data_queue_size": 0}, "data_queue_size must be an int >= 1"),
        ({"collate_fn": lambda samples: samples}, "collate_fn must be defined at module level"),
        ({"batch_encoder": datasets.to_bytes}, "batch_encoder and batch_decoder go together"),
        ({"logger": {"path": "x", "colour": True}}, "logger dict keys must be among path, stdout, level"),
        ({"logger": {"level": "LOUD"}}, "logger level must be"),
        ({"seed_number": -3}, r"seed_number must be an int in \[0, 2\*\*64\)"),
        ({"seed_numer": "7"}, r"seed_numer must be an int in \[0, 2\*\*64\) or None\. Found: '7'"),
        ({"seed": 1, "seed_numer": 1}, r"seed and seed_numer are one option \(the seed\): give one"),
    ],
    ids=[
        "batch-size",
        "consumers",
        "queue",
        "lambda",
        "encoder-alone",
        "logger-key",
        "logger-level",
        "seed",
        "seed-numer",
        "two-seeds",
    ],
)
def test_bad_options_are_config_errors(arguments: dict[str, Any], message: str) -> None:
    """Each bad value is refused at construction with a message naming it."""
    with pytest.raises(ConfigError, match=message):
        SwiftLoader(datasets.Labelled, {"n": 8}, **{"validate": False, **arguments})


@pytest.mark.parametrize(
    "name", ["seed", "seed_numer", "seed_number"], ids=["code", "readme", "tensorcom-0.2"]
)
def test_the_seed_has_three_spellings(name: str) -> None:
    """seed= (what the original reads), seed_numer= (its README) and seed_number= (tensorcom 0.2) are one option."""
    loader = SwiftLoader(datasets.Labelled, {"n": 8}, batch_size=4, validate=False, **{name: 1234})
    assert loader.seed == loader.seed_number == loader.options.seed == 1234


_DEFAULT_SEED_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import loader_datasets
from tensorcom.loader import SwiftLoader
loader = SwiftLoader(loader_datasets.Labelled, {{"n": 8}}, batch_size=4, nb_consumer=2, validate=False)
print(loader.seed, loader.options.multithread)
"""


def test_the_default_seed_is_the_same_in_every_consumer_process() -> None:
    """Without a seed, loaders built in different processes (one per consumer) agree on it, so their shares of an
    epoch do not overlap; multithread defaults to True as the original README says."""
    outputs = [
        subprocess.run(
            [sys.executable, "-c", _DEFAULT_SEED_SCRIPT.format(tests=str(TESTS))],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout.split()
        for _ in range(2)
    ]
    assert outputs == [["0", "True"], ["0", "True"]]


def test_start_refuses_a_consumer_index_out_of_range() -> None:
    """start() checks the index before starting anything."""
    with SwiftLoader(datasets.Labelled, {"n": 8}, batch_size=4, nb_consumer=2, seed_number=1) as loader:
        with pytest.raises(ConfigError, match=r"consumer_index must be in \[0, 2\)\. Found: 2"):
            loader.start(2)
        with pytest.raises(ConfigError, match="call loader.start"):
            next(iter(loader))


def test_validate_reports_a_broken_dataset_before_any_worker_starts() -> None:
    """A __getitem__ that raises (named with its index) or a failing constructor fails in the parent, at once."""
    import multiprocessing

    with pytest.raises(
        PipelineError, match=r"validation failed.*dataset\[2\].*ValueError: record 2 is corrupt"
    ):
        SwiftLoader(datasets.Faulty, {"n": 20, "raise_at": (2,)}, batch_size=4, shuffle=False, seed_number=1)
    with pytest.raises(PipelineError, match="BrokenConstructor.*FileNotFoundError"):
        SwiftLoader(datasets.BrokenConstructor, {}, batch_size=4, seed_number=1)
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize(
    "logger, path",
    [
        ("/tmp/logs/run", "/tmp/logs/run_consumer2.log"),
        ("/tmp/logs/", "/tmp/logs/consumer2.log"),
        ({"path": "/tmp/logs/run-", "level": "warning"}, "/tmp/logs/run-consumer2.log"),
        ({"stdout": True}, None),
    ],
    ids=["prefix", "folder", "dict", "stdout-only"],
)
def test_logger_option_names_one_file_per_consumer(logger: Any, path: str | None) -> None:
    """A file prefix (or a dict's path) becomes one log file per consumer."""
    spec = LogSpec.parse(logger, 2)
    assert spec is not None and spec.path == path
    assert spec.level == (logging.WARNING if isinstance(logger, dict) and "level" in logger else logging.INFO)


def test_length_is_batches_per_consumer_per_epoch() -> None:
    """len(loader) counts this consumer's batches: its share of the epoch, the last batch possibly short."""
    loader = SwiftLoader(datasets.Labelled, {"n": 30}, batch_size=4, nb_consumer=4, seed_number=1)
    assert len(loader) == 2  # consumer 0 (before start): positions 0, 4, ..., 28 → 8 samples
    assert [SwiftLoader.batches_per_epoch(30, i, 4, 4) for i in range(4)] == [2, 2, 2, 2]
    assert [SwiftLoader.batches_per_epoch(10, i, 3, 3) for i in range(3)] == [2, 1, 1]
    assert loader.dataset_length == 30
    loader.close()


# -- the order of an epoch (in process) ------------------------------------------------------------------------


def test_nearby_shuffle_keeps_every_sample_within_its_window() -> None:
    """Every window of consecutive positions reads exactly one window of indices; orders change per epoch."""
    n, window = 103, 10
    orders = []
    for epoch in range(2):
        source = NearbyPermutation(n, window, seed=5, epoch=epoch)
        order = list(source)
        assert sorted(order) == list(range(n))
        assert order == [source.index_at(p, epoch) for p in range(n)]  # random access agrees with iteration
        for start in range(0, n, window):
            block = order[start : start + window]
            first = block[0] // window * window
            assert sorted(block) == list(range(first, min(first + window, n)))
        assert order[100:] != [100, 101, 102] or epoch > 0  # the short window comes last, shuffled too
        assert sorted(order[100:]) == [100, 101, 102]
        orders.append(order)
    assert orders[0] != orders[1]
    assert [orders[0][i] // window for i in range(0, 100, window)] != list(range(10))  # windows are shuffled


def test_nearby_shuffle_golden_order() -> None:
    """The order for a fixed seed is pinned, so a change to it cannot go unnoticed."""
    source = NearbyPermutation(12, 4, seed=7)
    assert list(source) == GOLDEN_NEARBY


GOLDEN_NEARBY = [9, 10, 8, 11, 0, 3, 1, 2, 7, 5, 4, 6]


def test_nearby_shuffle_state_and_fingerprint() -> None:
    """The source resumes from its state and refuses a state saved with another seed."""
    source = NearbyPermutation(50, 8, seed=3)
    first = [next(source) for _ in range(13)]
    state = source.state()
    rest = list(source)
    again = NearbyPermutation(50, 8, seed=3)
    again.load_state(json.loads(json.dumps(state)))
    assert list(again) == rest and sorted(first + rest) == list(range(50))
    with pytest.raises(StateError):
        NearbyPermutation(50, 8, seed=4).load_state(state)


def test_loader_pipeline_batches_follow_the_nearby_windows() -> None:
    """With one consumer, nearby_shuffle=8 and batches of 4, every two batches hold exactly one window."""
    batches = [b["label"].tolist() for b in reference(datasets.Labelled, {"n": 40}, 40, seed=9, batch_size=4)]
    assert len(batches) == 10
    spec = PipelineSpec(datasets.Labelled, {"n": 40}, 40, 4, True, 8)
    with swift_pipeline(seed=9, rank=0, world_size=1, spec=spec) as pipeline:
        labels = [unpack_tree(packed)[0]["label"].tolist() for packed in pipeline]
    for i in range(0, 10, 2):
        window = labels[i] + labels[i + 1]
        assert sorted(window) == list(range(min(window) // 8 * 8, min(window) // 8 * 8 + 8))


def test_batches_keep_their_structure_tensors_and_strings() -> None:
    """Nested dicts and lists of tensors, numpy scalars and strings survive the trip through the codec."""
    batch = next(reference(datasets.Mixed, {}, 12, seed=1, batch_size=3))
    import torch

    assert isinstance(batch["image"], torch.Tensor) and batch["image"].shape == (3, 2, 2)
    labels = batch["image"][:, 0, 0].long().tolist()
    assert batch["name"] == [f"sample-{i}" for i in labels]
    assert isinstance(batch["pair"], list) and batch["pair"][0].tolist() == labels
    assert batch["pair"][1].dtype == np.int16 and batch["pair"][1][:, 1].tolist() == [-i for i in labels]


# -- real processes --------------------------------------------------------------------------------------------


def test_consumers_are_disjoint_and_complete_and_each_epoch_has_a_new_order() -> None:
    """Two consumers split every epoch exactly; iteration stops at the epoch's end and the next starts anew."""
    loaders = [
        SwiftLoader(
            datasets.Labelled, {"n": 30}, batch_size=4, nb_consumer=2, worker_per_consumer=1, seed_number=11
        )
        for _ in range(2)
    ]
    with loaders[0], loaders[1]:
        for index, loader in enumerate(loaders):
            loader.start(index)
        epochs = []
        for epoch in range(2):
            shares = [labels_of(loader) for loader in loaders]
            assert [len(share) for share in shares] == [len(loader) for loader in loaders] == [4, 4]
            assert all(loader.last.epoch == epoch for loader in loaders)
            flat = [[label for batch in share for label in batch] for share in shares]
            assert not set(flat[0]) & set(flat[1])
            assert sorted(flat[0] + flat[1]) == list(range(30))
            epochs.append(flat)
        assert epochs[0] != epochs[1]
        assert epochs[0][0][:4] == GOLDEN_FIRST_BATCH
        pids = [server_pid(loader) for loader in loaders]
        workers = [pid for loader in loaders for pid in wait_for_workers(loader.id, 1)]
        assert len(workers) == 2
    assert wait_until_gone(pids + workers) == []


GOLDEN_FIRST_BATCH = [12, 13, 8, 5]


@pytest.mark.parametrize("workers", [1, 2, 4], ids=["1-worker", "2-workers", "4-workers"])
def test_batches_are_identical_whatever_worker_per_consumer(workers: int) -> None:
    """With a fixed seed, the batches (per-sample randomness included) equal the in-process pipeline's."""
    expected = [
        *reference(datasets.Noisy, {"n": 26}, 26, seed=21, consumer=1, nb_consumer=2, getitem_wants_rng=True),
        *reference(
            datasets.Noisy, {"n": 26}, 26, seed=21, consumer=1, nb_consumer=2, epoch=1, getitem_wants_rng=True
        ),
    ]
    with SwiftLoader(
        datasets.Noisy,
        {"n": 26},
        batch_size=4,
        nb_consumer=2,
        worker_per_consumer=workers,
        seed_number=21,
        warm_start=False,  # every batch from the workers
    ) as loader:
        loader.start(1)
        received = list(loader) + list(loader)
    assert len(received) == 8
    assert_same_batches(received, expected)


def batch_as_int64(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    """A to_device in the original SwiftLoader's shape: the whole batch and the device."""
    import torch

    return {
        **batch,
        "x": torch.from_numpy(batch["x"]).to(device=device, dtype=torch.int64),
        "device": str(device),
    }


def test_resume_mid_epoch_is_exact_in_both_receiving_modes() -> None:
    """A state saved after 3 batches continues with exactly the rest, in an unthreaded loader and in a new
    threaded one (which also applies a to_device(batch, device) function)."""
    import torch

    options: dict[str, Any] = {"batch_size": 4, "nb_consumer": 1, "worker_per_consumer": 1, "seed_number": 4}
    with SwiftLoader(datasets.Labelled, {"n": 36}, multithread=False, **options) as loader:
        loader.start(0)
        batches = iter(loader)
        before = [next(batches)["label"].tolist() for _ in range(3)]
        state = json.loads(json.dumps(loader.state()))  # plain data
        rest = [batch["label"].tolist() for batch in batches]
        assert len(before + rest) == 9 and sorted(sum(before + rest, [])) == list(range(36))
        loader.load_state(state)
        assert [batch["label"].tolist() for batch in loader] == rest
        next_epoch = [batch["label"].tolist() for batch in loader]
    with SwiftLoader(
        datasets.Labelled, {"n": 36}, multithread=True, max_buffer_size=2, **options
    ) as threaded:
        threaded.load_state(state)
        threaded.start(0, device=torch.device("cpu"), to_device=batch_as_int64)  # in the receiver thread
        resumed = list(threaded)
        assert all(batch["x"].dtype == torch.int64 and batch["device"] == "cpu" for batch in resumed)
        assert [batch["label"].tolist() for batch in resumed] == rest
        assert threaded.last.epoch == 0
        assert [batch["label"].tolist() for batch in threaded] == next_epoch
        with pytest.raises(StateError, match="saved with seed 5; this loader has seed 4"):
            threaded.load_state({**state, "seed_number": 5})


def test_logger_benchmark_file_custom_collate_and_device(tmp_path: Path) -> None:
    """A logger dict writes the seed to its file, benchmark_file gets a JSON line per epoch, device='cpu' gives
    torch tensors, and a collate_fn shapes the batch."""
    import torch

    benchmark_file = tmp_path / "bench.jsonl"
    with SwiftLoader(
        datasets.Labelled,
        {"n": 12},
        batch_size=4,
        worker_per_consumer=1,
        seed_number=77,
        collate_fn=datasets.stack_labels,
        logger={"path": str(tmp_path / "logs" / "run"), "stdout": False, "level": "DEBUG"},
        benchmark=True,
        benchmark_file=str(benchmark_file),
        warm_start=False,  # the server process logs before the first batch
    ) as loader:
        loader.start(0, device="cpu")
        batches = list(loader)
    assert len(batches) == 3
    for batch in batches:
        assert isinstance(batch["total"], torch.Tensor) and batch["total"].device.type == "cpu"
        assert batch["total"].tolist() == [float(sum(batch["labels"]))] * 3
    assert sorted(label for batch in batches for label in batch["labels"]) == list(range(12))
    text = (tmp_path / "logs" / "run_consumer0.log").read_text()
    # the server process logs there too
    assert "seed=77" in text and "tensorcom.server.request" in text
    records = [json.loads(line) for line in benchmark_file.read_text().splitlines()]
    assert records[0]["epoch"] == 0 and records[0]["complete"] and records[0]["samples"] == 12
    assert {"loading_s", "batching_s", "encoding_s", "waiting_s", "decoding_s", "transfer_s"} <= records[
        0
    ].keys()


def test_next_reads_epoch_by_epoch_and_to_device_needs_a_device(caplog: pytest.LogCaptureFixture) -> None:
    """next(loader) reads batches as the original allows (StopIteration at the epoch's end, then the next epoch);
    a to_device given without a device is not called (as in the original), and a warning says so."""
    calls: list[Any] = []
    with SwiftLoader(
        datasets.Labelled, {"n": 8}, batch_size=4, worker_per_consumer=1, shuffle=False, seed=1
    ) as loader:
        with caplog.at_level(logging.WARNING, logger="tensorcom.loader.swift"):
            loader.start(0, to_device=lambda batch, device: calls.append(device))
        assert "to_device is only called with a device" in caplog.text
        first = [next(loader), next(loader)]
        with pytest.raises(StopIteration):
            next(loader)
        second = next(loader)
    assert [batch["label"].tolist() for batch in first] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert second["label"].tolist() == [0, 1, 2, 3] and loader.last.epoch == 1
    assert isinstance(second["x"], np.ndarray) and calls == []


@pytest.mark.parametrize("multithread", [False, True], ids=["inline", "receiver-thread"])
def test_batch_encoder_and_decoder_are_used(multithread: bool) -> None:
    """batch_encoder runs in the workers (bytes on the wire), batch_decoder in the consumer; a batch the decoder
    refuses is reported and the epoch goes on."""
    with SwiftLoader(
        datasets.Labelled,
        {"n": 15},
        batch_size=5,
        worker_per_consumer=1,
        shuffle=False,
        seed_number=1,
        batch_encoder=datasets.to_bytes,
        batch_decoder=datasets.from_bytes,
        multithread=multithread,
        validate=False,
    ) as loader:
        loader.start(0)
        batches = iter(loader)
        assert next(batches) == [0, 1, 2, 3, 4]
        with pytest.raises(ValueError, match="label 7"):
            next(batches)
        assert list(loader) == [[10, 11, 12, 13, 14]]


def test_worker_errors_reach_the_consumer_and_a_crash_leaves_no_orphans() -> None:
    """A raising __getitem__ surfaces with its index and the epoch goes on; a worker killed three times over one
    batch surfaces too; after close() no server or worker process is left and the socket folder is gone."""
    loader = SwiftLoader(
        datasets.Faulty,
        {"n": 32, "raise_at": (13,), "exit_at": (26,)},
        batch_size=4,
        worker_per_consumer=2,
        shuffle=False,
        validate=False,
        warm_start=False,  # os._exit must run in a worker, never here
        seed_number=1,
        data_queue_size=1,
    )
    loader.start(0)
    outcomes: list[Any] = []
    while len(outcomes) < 8:
        try:
            outcomes.extend(batch["label"].tolist() for batch in loader)
            break
        except RemoteError as error:
            outcomes.append(str(error))
    assert outcomes[:3] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert "dataset[13]" in outcomes[3] and "record 13 is corrupt" in outcomes[3]
    assert outcomes[4:6] == [[16, 17, 18, 19], [20, 21, 22, 23]]
    assert "killed 3 worker processes" in outcomes[6]
    assert outcomes[7:] == [[28, 29, 30, 31]]
    pids = [server_pid(loader), *wait_for_workers(loader.id, 2)]
    assert len(pids) == 3
    folder = loader._consumer.folder if loader._consumer else None
    loader.close()
    assert wait_until_gone(pids) == [] and loader_processes(loader.id) == []
    assert folder is not None and not os.path.exists(folder)


_SCRIPT = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C works even if the test runs in a background job
sys.path.insert(0, {tests!r})
import loader_datasets
from tensorcom.loader import SwiftLoader

if __name__ == "__main__":
    loader = SwiftLoader(loader_datasets.Labelled, {{"n": 20}}, batch_size=4, worker_per_consumer=2, seed_number=3)
    loader.start(0)
    batches = iter(loader)
    next(batches)
    print(loader.id, loader._consumer.process.pid, loader._consumer.folder, flush=True)
    if {ending!r} == "exit":
        sys.stdin.readline()  # the test has seen the workers; now leave without close()
    elif {ending!r} == "kill":
        time.sleep(60)
    elif {ending!r} == "sigint":
        print("reading", flush=True)
        while True:  # Ctrl-C arrives while the loader is reading
            for _ in loader:
                pass
"""


@pytest.mark.parametrize("ending", ["exit", "kill", "sigint"], ids=["interpreter-exit", "kill-9", "ctrl-c"])
def test_no_process_or_socket_outlives_the_loader_process(tmp_path: Path, ending: str) -> None:
    """Leaving the interpreter without close(), being killed with SIGKILL, or Ctrl-C (SIGINT to the whole process
    group) leaves no process and no files."""
    script = tmp_path / "use_loader.py"
    script.write_text(_SCRIPT.format(tests=str(TESTS), ending=ending))
    process = subprocess.Popen(
        [sys.executable, str(script)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        loader_id, pid, folder = read_line(process).split()
        workers = wait_for_workers(loader_id, 2)
        assert len(workers) == 2 and running(int(pid))
        assert process.stdin is not None
        process.stdin.close()
        if ending == "kill":
            process.send_signal(signal.SIGKILL)
        elif ending == "sigint":
            assert read_line(process) == "reading\n"
            os.killpg(process.pid, signal.SIGINT)
        expected = {"exit": 0, "kill": -signal.SIGKILL, "sigint": -signal.SIGINT}[
            ending
        ]  # Python re-raises SIGINT
        assert process.wait(timeout=60) == expected  # the loader gives its own teardown up to 30 s
        assert wait_until_gone([int(pid), *workers]) == []
        assert loader_processes(loader_id) == []
        assert wait_until(lambda: not os.path.exists(folder)), f"{folder} is still there"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                stream.close()


# -- warm start: batches computed here until the workers are ready ---------------------------------------------


@pytest.fixture
def held_back(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """While the returned event is clear, the workers may not take over from the warm start; once it is set, the
    next batch is the workers' as soon as the server process is ready."""
    gate = threading.Event()
    take_over = _Consumer.take_over

    def gated(consumer: _Consumer) -> None:
        if gate.is_set():
            take_over(consumer)

    monkeypatch.setattr(_Consumer, "take_over", gated)
    return gate


def server_ready(loader: SwiftLoader) -> bool:
    consumer = loader._consumer
    return consumer is not None and consumer.readiness is not None and consumer.readiness.poll(0)


def with_meta(loader: SwiftLoader, count: int | None = None) -> list[tuple[Any, Any, Any, dict[str, Any]]]:
    """(batch, (step, epoch, indices), endpoint, state after it) for ``count`` batches (default: the epoch)."""
    out = []
    batches = iter(loader)
    for batch in batches if count is None else (next(batches) for _ in range(count)):
        out.append(
            (
                batch,
                (loader.last.step, loader.last.epoch, loader.last.indices),
                loader.last.endpoint,
                json.loads(json.dumps(loader.state())),
            )
        )
    return out


@pytest.mark.parametrize("multithread", [False, True], ids=["inline", "receiver-thread"])
def test_warm_start_hands_over_to_the_workers_exactly(held_back: threading.Event, multithread: bool) -> None:
    """Batches computed here until the server is ready, then the workers' from exactly the next step: batches,
    steps, epochs, indices and the state after every batch equal a loader that waits for its workers."""
    options: dict[str, Any] = {
        "batch_size": 3,
        "nb_consumer": 2,
        "worker_per_consumer": 2,
        "seed_number": 8,
        "multithread": multithread,
    }
    with SwiftLoader(datasets.Noisy, {"n": 61}, warm_start=False, **options) as cold:
        cold.start(1)
        expected = with_meta(cold) + with_meta(cold)
    with SwiftLoader(datasets.Noisy, {"n": 61}, max_buffer_size=2, **options) as warm:
        warm.start(1)
        got = with_meta(warm, 3)
        assert wait_until(lambda: server_ready(warm)), "the server process never said it was ready"
        held_back.set()
        got += with_meta(warm)
        got += with_meta(warm)
    assert len(got) == len(expected) == 20
    assert_same_batches([g[0] for g in got], [e[0] for e in expected])
    assert [g[1] for g in got] == [e[1] for e in expected]
    assert [g[3] for g in got] == [e[3] for e in expected]
    sources = [g[2] == WARM_ENDPOINT for g in got]
    assert (
        sources[:3] == [True] * 3 and sources[-12:] == [False] * 12
    )  # at most the receiver's lead in between
    assert all(e[2] != WARM_ENDPOINT for e in expected)


def test_warm_state_resumes_anywhere_and_a_failed_step_is_reported_the_same(
    held_back: threading.Event,
) -> None:
    """A state saved during the warm start resumes exactly in a loader that waits for its workers (and the other
    way round, into a warm start); a failing __getitem__ is a RemoteError naming the index in both, the epoch
    goes on, and the states around it agree."""
    options: dict[str, Any] = {
        "batch_size": 4,
        "worker_per_consumer": 1,
        "shuffle": False,
        "seed_number": 2,
        "multithread": False,
    }
    kwargs = {"n": 28, "raise_at": (9,)}

    def run(loader: SwiftLoader) -> list[Any]:
        outcomes: list[Any] = []
        while len(outcomes) < 7:
            try:
                for batch in loader:
                    outcomes.append((batch["label"].tolist(), loader.state()))
                break
            except RemoteError as error:
                outcomes.append((f"failed: {'dataset[9]' in str(error)}", loader.state()))
        return outcomes

    with SwiftLoader(datasets.Faulty, kwargs, warm_start=False, validate=False, **options) as cold:
        cold.start(0)
        expected = run(cold)
    assert [o[0] for o in expected] == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        "failed: True",
        *[[i, i + 1, i + 2, i + 3] for i in range(12, 28, 4)],
    ]
    with (
        SwiftLoader(datasets.Faulty, kwargs, validate=False, **options) as warm,
        SwiftLoader(datasets.Faulty, kwargs, warm_start=False, validate=False, **options) as cold,
    ):
        warm.start(0)
        assert run(warm) == expected  # all of it here: the workers are held back
        cold.start(0)
        for k, (_, state) in enumerate(expected[:-1]):
            warm.load_state(state)
            cold.load_state(state)
            assert run(warm) == run(cold), f"resumed after outcome {k}"
            if not isinstance(expected[k][0], str):
                warm.load_state(state)
                assert [o[0] for o in run(warm)] == [o[0] for o in expected[k + 1 :]]
        assert cold.last.endpoint != WARM_ENDPOINT and warm.last.endpoint == WARM_ENDPOINT


def test_validation_batch_is_consumer_zeros_first_and_not_computed_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With validate and warm_start, the batch validation computed is consumer 0's first batch: __getitem__ runs
    once per sample of it in this process."""
    calls: list[int] = []
    getitem = datasets.Labelled.__getitem__

    def counted(self: datasets.Labelled, index: int) -> dict[str, Any]:
        calls.append(index)
        return getitem(self, index)

    monkeypatch.setattr(datasets.Labelled, "__getitem__", counted)
    with SwiftLoader(
        datasets.Labelled, {"n": 16}, batch_size=4, shuffle=False, seed=1, multithread=False
    ) as loader:
        assert calls == [0, 1, 2, 3]
        loader.start(0)
        first = next(iter(loader))
        assert first["label"].tolist() == [0, 1, 2, 3] and calls == [0, 1, 2, 3]


# -- drop_last ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("warm_start", [False, True], ids=["workers", "warm"])
def test_drop_last_gives_every_consumer_the_same_full_batches(warm_start: bool) -> None:
    """drop_last: no short batch, and every consumer gets len(dataset) // nb_consumer // batch_size batches
    (here shares of 6 and 5 samples would hold 2 and 1 full batches)."""
    n, consumers, batch_size = 11, 2, 3
    assert [SwiftLoader.batches_per_epoch(n, i, consumers, batch_size) for i in range(2)] == [2, 2]
    assert [SwiftLoader.batches_per_epoch(n, i, consumers, batch_size, drop_last=True) for i in range(2)] == [
        1,
        1,
    ]
    loaders = [
        SwiftLoader(
            datasets.Noisy,
            {"n": n},
            batch_size=batch_size,
            nb_consumer=consumers,
            worker_per_consumer=1,
            seed=6,
            drop_last=True,
            warm_start=warm_start,
        )
        for _ in range(consumers)
    ]
    with loaders[0], loaders[1]:
        for index, loader in enumerate(loaders):
            loader.start(index)
        epochs = [[list(loader) for loader in loaders] for _ in range(2)]
        assert [len(loader) for loader in loaders] == [1, 1]
    for epoch, shares in enumerate(epochs):
        assert [len(share) for share in shares] == [1, 1]
        for consumer, share in enumerate(shares):
            expected = list(
                reference(
                    datasets.Noisy,
                    {"n": n},
                    n,
                    seed=6,
                    consumer=consumer,
                    nb_consumer=consumers,
                    batch_size=batch_size,
                    epoch=epoch,
                    getitem_wants_rng=True,
                    drop_last=True,
                )
            )
            assert_same_batches(share, expected)
            assert all(len(batch[1]) == batch_size for batch in share)


def test_drop_last_with_too_few_samples_for_one_batch_is_a_clear_error() -> None:
    """Validation says so when drop_last leaves consumer 0 no batch at all."""
    with pytest.raises(PipelineError, match="consumer 0 gets no batch from a dataset of 5 samples"):
        SwiftLoader(datasets.Labelled, {"n": 5}, batch_size=3, nb_consumer=2, drop_last=True)


_MAIN_SCRIPT = """
import json, sys, time
import numpy as np
from tensorcom.loader import SwiftLoader
from tensorcom.loader._warm import WARM_ENDPOINT


class Squares:  # defined in the main script: spawned processes know it as __mp_main__.Squares
    def __len__(self):
        return 40

    def __getitem__(self, index):
        return np.full(2, index * index, np.int64)


if __name__ == "__main__":
    with SwiftLoader(Squares, {}, batch_size=4, worker_per_consumer=1, seed=3, multithread=False) as loader:
        loader.start(0)
        sources, deadline = [], time.monotonic() + 120
        while all(source == WARM_ENDPOINT for source in sources):  # until the workers have taken over
            for batch in loader:
                sources.append(loader.last.endpoint)
            if time.monotonic() > deadline:
                break
    print(json.dumps({"warm": sources.count(WARM_ENDPOINT), "workers": len(sources) - sources.count(WARM_ENDPOINT)}))
"""


def test_a_dataset_defined_in_the_main_script_is_handed_over(tmp_path: Path) -> None:
    """A dataset class from the main script has the same pipeline fingerprint here and in the spawned workers (which
    know the script as __mp_main__), so the workers accept the warm start's state and take over."""
    script = tmp_path / "main_dataset.py"
    script.write_text(_MAIN_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["warm"] >= 1 and result["workers"] >= 1
