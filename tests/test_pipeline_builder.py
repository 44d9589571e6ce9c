"""PipelineBuilder: sync and async ops, ordering, aggregation, errors with stage names, clean shutdown, resume."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from helpers import wait_until
from pipeline_harness import square

from tensorcom.errors import ConfigError, PipelineError, StateError
from tensorcom.pipeline import Range, collate
from tensorcom.pipeline.builder import PipelineBuilder


def _loop_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("tc-builder-loop")]


def _builder_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("tc-builder")]


@pytest.fixture
def no_loop_threads() -> Iterator[None]:
    """Fail a test that leaves a builder thread running (event loop, source puller or op thread)."""
    yield
    wait_until(lambda: not _builder_threads(), interval=0.01)
    assert not _builder_threads()


def slow_square(x: int) -> int:
    time.sleep(0.002 * (x % 3))
    return x * x


async def async_increment(x: int) -> int:
    await asyncio.sleep(0.001 * (x % 4))
    return x + 1


async def numbers(n: int) -> AsyncIterator[int]:
    for i in range(n):
        await asyncio.sleep(0)
        yield i


class AsyncNumbers:
    """A re-iterable async source (each __aiter__ starts over), so it can be resumed by replay."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __aiter__(self) -> AsyncIterator[int]:
        return numbers(self.n)


def explode_on_four(x: int) -> int:
    if x == 4:
        raise ValueError("bad sample")
    return x


@pytest.mark.parametrize("concurrency", [1, 4], ids=["serial", "concurrent"])
def test_sync_and_async_ops_in_input_order(concurrency: int, no_loop_threads: None) -> None:
    """Sync ops in threads and async ops on the loop keep input order at any concurrency."""
    p = (
        PipelineBuilder()
        .add_source(range(25))
        .pipe(slow_square, concurrency=concurrency)
        .pipe(async_increment, concurrency=concurrency)
        .add_sink(2)
        .build()
    )
    assert list(p) == [x * x + 1 for x in range(25)]


def test_completion_order_delivers_everything(no_loop_threads: None) -> None:
    """output_order='completion' delivers every item once (in any order) and refuses state()."""
    p = (
        PipelineBuilder()
        .add_source(range(30))
        .pipe(slow_square, concurrency=4, output_order="completion")
        .build()
    )
    assert sorted(p) == [x * x for x in range(30)]
    with pytest.raises(StateError, match="completion"):
        p.state()


def test_aggregate_and_collate(no_loop_threads: None) -> None:
    """aggregate(n) groups items (last group shorter unless drop_last) and collate stacks them."""
    p = PipelineBuilder().add_source(range(10)).aggregate(4).pipe(collate).build()
    batches = [b.tolist() for b in p]
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    q = PipelineBuilder().add_source(range(10)).aggregate(4, drop_last=True).build()
    assert [len(b) for b in q] == [4, 4]


def test_async_source(no_loop_threads: None) -> None:
    """An async iterable works as a source, and a re-iterable one resumes by replay."""
    assert list(PipelineBuilder().add_source(numbers(5)).pipe(square).build()) == [0, 1, 4, 9, 16]
    p = PipelineBuilder().add_source(AsyncNumbers(8)).build()
    assert [next(p) for _ in range(3)] == [0, 1, 2]
    state = p.state()
    p.close()
    q = PipelineBuilder().add_source(AsyncNumbers(8)).build()
    q.load_state(state)
    assert list(q) == [3, 4, 5, 6, 7]


def test_one_shot_async_source_cannot_replay(no_loop_threads: None) -> None:
    """Restarting an async generator source after it ran raises a clear StateError."""
    p = PipelineBuilder().add_source(numbers(5)).build()
    next(p)
    p.close()
    with pytest.raises(PipelineError) as info:
        next(p)
    assert isinstance(info.value.__cause__, StateError)


def test_op_exception_reaches_consumer_with_stage_name(no_loop_threads: None) -> None:
    """An op's exception arrives after the earlier items, naming the stage and input; the stream then goes on."""
    p = PipelineBuilder().add_source(range(10)).pipe(explode_on_four, concurrency=3).build()
    got = []
    with pytest.raises(PipelineError) as info:
        for x in p:
            got.append(x)
    assert got == [0, 1, 2, 3]
    assert "explode_on_four" in str(info.value) and "input 4" in str(info.value)
    assert isinstance(info.value.__cause__, ValueError)
    assert p.state()["stream"]["position"] == 5
    assert list(p) == [5, 6, 7, 8, 9]


def test_op_raising_stop_iteration_is_an_error_not_a_hang(no_loop_threads: None) -> None:
    """StopIteration cannot travel in a future: it reaches the consumer as a PipelineError naming the input."""

    def stop_on_two(x: int) -> int:
        if x == 2:
            raise StopIteration("done early")
        return x

    p = PipelineBuilder().add_source(range(5)).pipe(stop_on_two).build()
    assert [next(p), next(p)] == [0, 1]
    with pytest.raises(PipelineError, match="input 2: RuntimeError: op raised StopIteration"):
        next(p)
    p.close()


class Samples:
    """A map-style dataset (not a range or list): reading an item may block, so a thread of its own reads it."""

    def __init__(self, n: int, fail_at: int | None = None) -> None:
        self.n, self.fail_at = n, fail_at
        self.threads: set[str] = set()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        self.threads.add(threading.current_thread().name)
        if index == self.fail_at:
            raise OSError(f"cannot read sample {index}")
        time.sleep(0.0005)
        return index


def test_dataset_sources_are_read_off_the_event_loop(no_loop_threads: None) -> None:
    """A dataset source is read by the source thread while ops run; a range source needs no thread."""
    samples = Samples(40)
    p = PipelineBuilder().add_source(samples).pipe(async_increment, concurrency=4).pipe(square).build()
    assert list(p) == [(x + 1) ** 2 for x in range(40)]
    assert samples.threads == {"tc-builder-source"}
    with PipelineBuilder().add_source(range(10)).pipe(square).build() as q:
        next(q)
        assert not [t for t in threading.enumerate() if t.name == "tc-builder-source"]


def test_source_failure_names_the_source_and_goes_on(no_loop_threads: None) -> None:
    """A failing read arrives after the items before it as a PipelineError for stage 'source'; then the rest."""
    p = PipelineBuilder().add_source(Samples(8, fail_at=3)).pipe(square).build()
    got = []
    with pytest.raises(PipelineError, match="stage 'source' failed: OSError: cannot read sample 3") as info:
        for x in p:
            got.append(x)
    assert got == [0, 1, 4]
    assert isinstance(info.value.__cause__, OSError)
    assert list(p) == [16, 25, 36, 49]


def test_source_only_and_many_cheap_items(no_loop_threads: None) -> None:
    """A pipeline with no stages delivers its source; thousands of cheap items keep input order at concurrency 4."""
    p = PipelineBuilder().add_source(range(6)).build()
    assert [next(p), next(p)] == [0, 1]
    state = p.state()
    p.close()
    q = PipelineBuilder().add_source(range(6)).build()
    q.load_state(state)
    assert list(q) == [2, 3, 4, 5]
    built = PipelineBuilder().add_source(range(5000)).pipe(square, concurrency=4).build(num_threads=2)
    assert list(built) == [x * x for x in range(5000)]


def test_break_shuts_down_and_resumes(no_loop_threads: None) -> None:
    """Breaking out of a for loop stops the loop thread; the state then resumes right after the last item."""
    p = PipelineBuilder().add_source(list(range(100))).pipe(square, concurrency=2).build()
    for x in p:
        if x == 25:
            break
    assert not _loop_threads()
    state = p.state()
    assert state["stream"]["position"] == 6
    q = PipelineBuilder().add_source(list(range(100))).pipe(square, concurrency=2).build()
    q.load_state(state)
    assert next(q) == 36
    q.close()


def test_skip_is_arithmetic_for_sequence_sources(no_loop_threads: None) -> None:
    """skip(k) over aggregate(n) moves a sequence source by k*n without running the ops."""
    calls: list[int] = []

    def record(x: int) -> int:
        calls.append(x)
        return x

    with PipelineBuilder().add_source(Range(10**9)).pipe(record).aggregate(8).build() as p:
        p.skip(10**6)
        assert next(p) == list(range(8 * 10**6, 8 * 10**6 + 8))
        assert min(calls) == 8 * 10**6


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda b: b.pipe(square), "needs a source first"),
        (lambda b: b.add_source([1]).pipe(square, concurrency=0), "concurrency must be an int > 0. Found: 0"),
        (lambda b: b.add_source([1]).pipe(square, output_order="random"), "output_order must be"),
        (lambda b: b.add_source([1]).aggregate(0), "aggregate size must be an int > 0. Found: 0"),
        (lambda b: b.add_source([1]).add_sink(2).pipe(square), "after add_sink"),
        (lambda b: b.add_source([1]).add_source([2]), "add_source was already called"),
        (lambda b: b.add_source([1]).add_sink(0), "buffer_size must be an int > 0. Found: 0"),
    ],
    ids=[
        "no-source",
        "zero-concurrency",
        "bad-order",
        "zero-aggregate",
        "pipe-after-sink",
        "two-sources",
        "zero-sink",
    ],
)
def test_bad_builder_configuration(build: object, message: str) -> None:
    """Mistakes in the builder raise ConfigError saying what is wrong."""
    with pytest.raises(ConfigError) as info:
        build(PipelineBuilder())  # type: ignore[operator]
    assert message in str(info.value)
