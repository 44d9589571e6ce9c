"""Map and DistributedBatchedMap: input order, per-sample rng, worker errors and deaths, no orphan processes."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Iterator

import pytest
from helpers import wait_until_gone
from pipeline_harness import (
    exit_on_five,
    fail_on_seven,
    hang_on_three,
    kill_on_five,
    make_sample,
    noisy,
    square,
)

from tensorcom.errors import ConfigError, PipelineError, WorkerError
from tensorcom.pipeline import (
    Collate,
    Conveyer,
    DistributedBatchedMap,
    Join,
    Map,
    Partition,
    Permutation,
    Range,
)
from tensorcom.pipeline.map import DistributedBatchedMap as _DBM


def _worker_pids(stage: _DBM) -> list[int]:
    pool = stage._pool
    return [] if pool is None else [p.pid for p in pool._processes if p.pid is not None]


@pytest.fixture
def no_orphans() -> Iterator[None]:
    """Fail a test that leaves worker processes running after it ends."""
    before = set(multiprocessing.active_children())
    yield
    left = [p for p in multiprocessing.active_children() if p not in before]
    assert not left, f"worker processes left running: {left}"


@pytest.mark.parametrize(
    ("workers", "buffer"), [(1, None), (2, None), (2, 1), (2, 7)], ids=["1w", "2w", "2w-buf1", "2w-buf7"]
)
def test_results_come_back_in_input_order(workers: int, buffer: int | None, no_orphans: None) -> None:
    """Whatever the worker count and buffer, results equal the in-process Map's, in input order."""
    expected = list(Conveyer([Permutation(40, seed=1), Map(square)]))
    with Conveyer([Permutation(40, seed=1), DistributedBatchedMap(square, workers, buffer_size=buffer)]) as p:
        assert list(p) == expected


def test_rng_is_the_same_in_any_process(no_orphans: None) -> None:
    """A map fn taking rng draws the same numbers in process, in 1 or 2 workers, on any rank."""
    in_process = sorted(Conveyer([Permutation(30, seed=4), Map(noisy)]))
    for workers in (1, 2):
        with Conveyer([Permutation(30, seed=4), DistributedBatchedMap(noisy, workers)]) as p:
            assert list(p) == [x for x in Conveyer([Permutation(30, seed=4), Map(noisy)])]
    by_rank = sorted(
        x for r in range(3) for x in Conveyer([Permutation(30, seed=4), Partition(r, 3), Map(noisy)])
    )
    assert by_rank == in_process


def test_rng_depends_on_seed_and_epoch() -> None:
    """The same sample index draws different numbers in another epoch or with another seed."""

    def draws(seed: int, epoch: int) -> dict[int, float]:
        return dict(Conveyer([Permutation(10, seed=seed, epoch=epoch), Map(noisy)]))

    assert draws(1, 0) == draws(1, 0)
    assert draws(1, 0) != draws(1, 1)
    assert draws(1, 0) != draws(2, 0)
    assert draws(1, 0) != dict(Conveyer([Permutation(10, seed=1), Map(noisy, seed=99)]))


def test_map_exception_has_a_note_and_stream_continues() -> None:
    """An in-process Map lets fn's exception through with a note, then continues after it with aligned steps."""
    p = Conveyer([Range(10), Map(fail_on_seven)])
    assert [next(p) for _ in range(7)] == list(range(7))
    with pytest.raises(KeyError) as info:
        next(p)
    assert any("fail_on_seven" in note and "sample index 7" in note for note in info.value.__notes__)
    assert p.next_with_meta() == (8, {"epoch": 0, "indices": [8], "step": 8})


def test_map_stop_iteration_is_not_end_of_stream() -> None:
    """A StopIteration raised inside fn becomes a PipelineError instead of silently ending the stream."""

    def stop(_: int) -> int:
        raise StopIteration

    with pytest.raises(PipelineError, match="raised StopIteration"):
        next(Conveyer([Range(3), Map(stop)]))


def test_worker_exception_reaches_caller(no_orphans: None) -> None:
    """An exception in a worker raises WorkerError naming the stage and input index, with the cause attached."""
    with Conveyer([Range(20), DistributedBatchedMap(fail_on_seven, n_workers=2)]) as p:
        assert [next(p) for _ in range(7)] == list(range(7))
        with pytest.raises(WorkerError) as info:
            next(p)
        message = str(info.value)
        assert "fail_on_seven" in message and "input #7" in message and "sample index 7" in message
        assert isinstance(info.value.__cause__, KeyError)
        assert any("remote traceback" in n for n in info.value.__notes__)
        assert p.state()["stream"]["position"] == 8
        assert list(p) == list(range(8, 20))


@pytest.mark.parametrize("fn", [exit_on_five, kill_on_five], ids=["os-exit", "sigkill"])
def test_worker_death_is_detected(fn: Callable[[int], int], no_orphans: None) -> None:
    """A dying worker raises WorkerError after the earlier items (no hang), stops all workers, and moves past it."""
    stage = DistributedBatchedMap(fn, n_workers=2)
    with Conveyer([Range(20), stage]) as p:
        got = []
        with pytest.raises(WorkerError, match="died") as info:
            for _ in range(20):
                got.append(next(p))
                pids = _worker_pids(stage)
        assert got == list(range(5)) and "sample index 5" in str(info.value)
        assert stage._pool is None and wait_until_gone(pids, reaped=True) == []
        assert p.state()["stream"]["position"] == 6
        assert next(p) == 6


def test_timeout_raises_and_kills_workers(no_orphans: None) -> None:
    """No result within timeout raises WorkerError and the stuck worker is stopped."""
    stage = DistributedBatchedMap(hang_on_three, n_workers=1, timeout=60)
    with Conveyer([Range(10), stage]) as p:
        assert [next(p) for _ in range(3)] == [0, 1, 2]  # the worker has started: its start-up is not timed
        pids = _worker_pids(stage)
        stage.timeout = 2  # the hang lasts 60 s, so only the timeout can end the wait
        started = time.monotonic()
        with pytest.raises(WorkerError, match="timeout=2 s"):
            next(p)
        assert time.monotonic() - started < 30
        assert wait_until_gone(pids, reaped=True) == []


def test_close_stops_workers_mid_stream(no_orphans: None) -> None:
    """close() with items in flight stops every worker and keeps the delivered position for a later resume."""
    stage = DistributedBatchedMap(make_sample, n_workers=2, buffer_size=6)
    p = Conveyer([Permutation(50, seed=1), stage])
    for _ in range(3):
        next(p)
    pids = _worker_pids(stage)
    assert len(pids) == 2
    state = p.state()
    p.close()
    assert wait_until_gone(pids, reaped=True) == [] and p.state() == state
    p.close()


def test_garbage_collection_stops_workers(no_orphans: None) -> None:
    """Dropping the last reference to a pipeline stops its workers."""
    stage = DistributedBatchedMap(square, n_workers=2)
    p = Conveyer([Range(50), stage])
    next(p)
    pids = _worker_pids(stage)
    del p, stage
    import gc

    gc.collect()
    assert wait_until_gone(pids, reaped=True) == []


@pytest.mark.parametrize(
    "stage",
    [lambda: Map(fail_on_seven), lambda: DistributedBatchedMap(fail_on_seven, n_workers=2)],
    ids=["map", "dbm"],
)
def test_failed_item_skips_its_whole_batch(stage: Callable[[], Map], no_orphans: None) -> None:
    """An error inside a batch skips that batch only, so later batches are the same as without the error."""
    with Conveyer([Range(16), stage(), Collate(4)]) as p:
        assert next(p).tolist() == [0, 1, 2, 3]
        with pytest.raises((KeyError, WorkerError)) as info:
            next(p)
        assert any("whole batch was skipped" in note for note in info.value.__notes__)
        assert p.state()["stream"]["position"] == 8
        assert [b.tolist() for b in p] == [[8, 9, 10, 11], [12, 13, 14, 15]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_workers": 0}, "n_workers must be an int > 0. Found: 0"),
        ({"n_workers": 1, "buffer_size": 0}, "buffer_size must be an int > 0. Found: 0"),
        ({"n_workers": 1, "timeout": -1}, "timeout must be > 0 seconds or None. Found: -1"),
    ],
    ids=["zero-workers", "zero-buffer", "negative-timeout"],
)
def test_bad_worker_arguments(kwargs: dict[str, object], message: str) -> None:
    """Invalid worker settings raise ConfigError quoting the value."""
    with pytest.raises(ConfigError) as info:
        DistributedBatchedMap(square, **kwargs)  # type: ignore[arg-type]
    assert message in str(info.value)


def test_failures_keep_later_steps_in_place(no_orphans: None) -> None:
    """After failures anywhere (Join source, Partition, workers), every later item and step equals a clean run's."""

    def make(fn: Callable[[int], int]) -> Join:
        return Join(
            [
                (Conveyer([Range(30, repeating=True), Partition(1, 2), DistributedBatchedMap(fn, 2)]), 0.5),
                (Range(40, repeating=True), 0.5),
            ],
            seed=3,
        )

    reference = make(square)
    clean = [reference.next_with_meta() for _ in range(20)]
    reference.close()
    with make(fail_on_seven) as faulty:
        got: list[dict[str, object] | None] = []
        for _ in range(20):
            try:
                got.append(faulty.next_with_meta()[1])
            except WorkerError:
                got.append(None)
    failed = [i for i, meta in enumerate(got) if meta is None]
    assert len(failed) == 1
    assert [m for m in got if m is not None] == [m for i, (_, m) in enumerate(clean) if i not in failed]


def test_a_script_function_has_the_same_fingerprint_in_spawned_processes() -> None:
    """A map function defined in a script is in ``__main__`` there and in ``__mp_main__`` in the processes
    multiprocessing spawns; the pipeline's fingerprint is the same in both (a zreq or SwiftLoader server checks it)."""

    def make(module: str) -> str:
        def double(index: int) -> int:
            return 2 * index

        double.__module__ = module
        return Conveyer([Range(4), Map(double)]).fingerprint

    assert make("__mp_main__") == make("__main__") != make("elsewhere")
