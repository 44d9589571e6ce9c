"""PipelineBuilder: sync and async ops, ordering, aggregation, errors with stage names, clean shutdown, resume."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from fractions import Fraction

import pytest
from helpers import wait_until
from pipeline_harness import square

from tensorcom.errors import ConfigError, PipelineError, StateError, Timeout
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
        (
            lambda b: b.add_source([1]).add_sink(-1),
            "buffer_size must be an int >= 0 (0: unbounded). Found: -1",
        ),
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


# -- SPDL's face: start/stop, auto_stop, get_item, get_iterator, its builder arguments --------------------------


def double(x: int) -> int:
    return 2 * x


def plus_one(x: int) -> int:
    return x + 1


def test_spdl_intro_example_with_start_and_stop(no_loop_threads: None) -> None:
    """SPDL's introductory pipeline gives SPDL's documented output with start(), iteration and stop()."""
    pipeline = (
        PipelineBuilder()
        .add_source(range(12))
        .pipe(double)
        .pipe(plus_one)
        .aggregate(3)
        .add_sink(3)
        .build(num_threads=1)
    )
    pipeline.start()
    assert _loop_threads()
    with pytest.raises(RuntimeError, match="already started"):
        pipeline.start()
    assert [item for item in pipeline] == [[1, 3, 5], [7, 9, 11], [13, 15, 17], [19, 21, 23]]
    pipeline.stop()
    pipeline.stop()  # safe twice


def test_auto_stop_starts_and_stops_and_stop_is_final(no_loop_threads: None) -> None:
    """auto_stop() starts on entry and stops on exit even after a break; a stopped pipeline yields nothing more,
    refuses to start, and still reports where the consumer stopped."""
    pipeline = (
        PipelineBuilder().add_source(range(20)).pipe(square, concurrency=2).add_sink(4).build(num_threads=2)
    )
    with pipeline.auto_stop():
        assert _loop_threads()
        got = []
        for item in pipeline.get_iterator(timeout=30):
            got.append(item)
            if len(got) == 5:
                break
    assert got == [0, 1, 4, 9, 16]
    assert not _loop_threads()
    assert list(pipeline) == []
    with pytest.raises(EOFError, match="stopped"):
        pipeline.get_item(timeout=1)
    with pytest.raises(PipelineError, match="stopped"):
        pipeline.start()
    assert pipeline.state()["stream"]["position"] == 5


def test_get_item_timeout_keeps_the_item_and_eof_at_the_end(no_loop_threads: None) -> None:
    """get_item(timeout=) raises TimeoutError while an op is still busy and then returns that same item; at the end
    get_item raises EOFError and get_iterator simply ends."""
    release = threading.Event()

    def wait_for_release(x: int) -> int:
        release.wait(60)
        return x

    pipeline = PipelineBuilder().add_source(range(3)).pipe(wait_for_release).build()
    with pytest.raises(TimeoutError, match="no item within 0.05 s") as info:
        pipeline.get_item(timeout=0.05)  # the op cannot finish before release is set: no guessed timing
    assert isinstance(info.value, Timeout) and pipeline.step == 0
    release.set()
    assert pipeline.get_item(timeout=30) == 0
    assert list(pipeline.get_iterator(timeout=30)) == [1, 2]
    with pytest.raises(EOFError, match="end"):
        pipeline.get_item()
    assert list(pipeline.get_iterator()) == []
    pipeline.stop()


def raise_on_even(x: int) -> int:
    if x % 2 == 0:
        raise ValueError(f"even {x}")
    return x


def test_max_failures_drops_and_logs_then_raises(
    no_loop_threads: None, caplog: pytest.LogCaptureFixture
) -> None:
    """Within max_failures failed items are logged and dropped (as in SPDL); the next failure is raised; build's
    max_failures applies to pipes without their own, and a Fraction is a rate of the calls."""
    with caplog.at_level(logging.WARNING, logger="tensorcom.pipeline.builder"):
        assert list(PipelineBuilder().add_source(range(8)).pipe(explode_on_four, max_failures=1).build()) == [
            0,
            1,
            2,
            3,
            5,
            6,
            7,
        ]
    assert "failed on input 4: ValueError: bad sample (dropped; max_failures=1)" in caplog.text
    pipeline = PipelineBuilder().add_source(range(8)).pipe(raise_on_even, max_failures=2).build()
    got = []
    with pytest.raises(PipelineError, match="input 4: ValueError: even 4") as info:
        for item in pipeline:
            got.append(item)
    assert got == [1, 3] and "max_failures=2 was exceeded" in "".join(info.value.__notes__)
    assert list(PipelineBuilder().add_source(range(8)).pipe(raise_on_even).build(max_failures=-1)) == [
        1,
        3,
        5,
        7,
    ]
    rate = PipelineBuilder().add_source(range(300)).pipe(raise_on_even, max_failures=Fraction(3, 5)).build()
    assert list(rate) == list(range(1, 300, 2))  # about half the calls fail: within 3/5
    strict = PipelineBuilder().add_source(range(300)).pipe(raise_on_even, max_failures=Fraction(1, 3)).build()
    got = []
    with pytest.raises(PipelineError, match="input 100: ValueError: even 100"):
        for item in strict:  # the rate is enforced from the 100th call on
            got.append(item)
    assert got == list(range(1, 100, 2))
    strict.close()


def test_executor_container_ops_and_unbounded_sink(no_loop_threads: None) -> None:
    """pipe(executor=) runs a sync op on that executor; a dict op maps by __getitem__; add_sink(0) has no limit."""
    names: set[str] = set()

    def record_thread(x: int) -> int:
        names.add(threading.current_thread().name)
        return x

    with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="user-executor") as executor:
        pipeline = (
            PipelineBuilder()
            .add_source(range(6))
            .pipe(record_thread, concurrency=2, executor=executor)
            .pipe({i: chr(ord("a") + i) for i in range(6)})
            .add_sink(0)
            .build(num_threads=1)
        )
        assert list(pipeline) == ["a", "b", "c", "d", "e", "f"]
    assert names and all(name.startswith("user-executor") for name in names)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda b: b.add_source([1], continuous=True),
            "add_source: continuous= (an SPDL argument) is not supported",
        ),
        (
            lambda b: b.add_source([1]).pipe(square, hooks=[]),
            "pipe: hooks= (an SPDL argument) is not supported",
        ),
        (
            lambda b: b.add_source([1]).pipe(square, concurency=2),
            "unknown argument 'concurency'. Did you mean 'concurrency'?",
        ),
        (
            lambda b: b.add_source([1]).aggregate(2, droplast=True),
            "unknown argument 'droplast'. Did you mean 'drop_last'?",
        ),
        (lambda b: b.add_source([1]).add_sink(2, size=3), "add_sink got an unknown argument 'size'"),
        (lambda b: b.add_source([1]).build(num_thread=2), "Did you mean 'num_threads'?"),
        (
            lambda b: b.add_source([1]).build(queue_class=list),
            "queue_class= (an SPDL argument) is not supported",
        ),
        (
            lambda b: b.add_source([1]).pipe(square, max_failures=Fraction(0)),
            "max_failures must be an int (< 0: no limit) or a Fraction in (0, 1]",
        ),
        (
            lambda b: b.add_source([1]).pipe(
                async_increment, executor=concurrent.futures.ThreadPoolExecutor(1)
            ),
            "executor= is for synchronous ops",
        ),
        (
            lambda b: b.add_source([1]).build().get_iterator(timout=3),
            "get_iterator got an unknown argument 'timout'",
        ),
        (
            lambda b: b.add_source([1]).build().get_item(timeout=-1),
            "timeout must be seconds >= 0 or None. Found: -1",
        ),
        (
            lambda b: b.add_source([1]).build().auto_stop(wait=1).__enter__(),
            "auto_stop got an unknown argument 'wait'",
        ),
    ],
    ids=[
        "continuous",
        "hooks",
        "misspelt-concurrency",
        "misspelt-drop-last",
        "sink-keyword",
        "misspelt-num-threads",
        "queue-class",
        "max-failures",
        "executor-async",
        "iterator-keyword",
        "negative-timeout",
        "auto-stop-keyword",
    ],
)
def test_spdl_arguments_without_meaning_and_unknown_ones_are_config_errors(
    call: object, message: str
) -> None:
    """Each argument SPDL has but tensorcom cannot honour, and each unknown one, is a one-line ConfigError."""
    with pytest.raises(ConfigError) as info:
        call(PipelineBuilder())  # type: ignore[operator]
    assert message in str(info.value) and "\n" not in str(info.value)


def test_spdl_arguments_that_change_nothing_are_accepted(no_loop_threads: None) -> None:
    """build() takes SPDL's report_stats_interval, stage_id and use_thread_output_queue; pipe its name."""
    pipeline = (
        PipelineBuilder()
        .add_source(range(4))
        .pipe(square, concurrency=2, name="square", output_order="input")
        .aggregate(2, drop_last=False)
        .add_sink(buffer_size=2)
        .build(num_threads=2, report_stats_interval=5, stage_id=3, use_thread_output_queue=True)
    )
    with pipeline.auto_stop(timeout=30):
        assert list(pipeline) == [[0, 1], [4, 9]]
