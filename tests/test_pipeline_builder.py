"""PipelineBuilder: sync and async ops, ordering, aggregation, errors with stage names, clean shutdown, resume."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
from helpers import assert_same_batch, wait_until
from pipeline_harness import check_resume_everywhere, collect, noisy, round_trip, square

from tensorcom.errors import ConfigError, PipelineError, StateError, Timeout
from tensorcom.pipeline import Conveyer, Map, Permutation, Pipeline, Range, collate
from tensorcom.pipeline.builder import BuiltPipeline, PipelineBuilder


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
    """Reading an async generator source after close() closed it raises a StateError saying why."""
    p = PipelineBuilder().add_source(numbers(5)).build()
    next(p)
    p.close()
    with pytest.raises(StateError, match="one-shot async iterator, closed when the pipeline stopped"):
        next(p)


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
    pipeline.close()  # an exception out of a for loop leaves the pipeline running, for the next loop
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


# -- sources that cannot rewind: generators and async generators (issue 22, item 1) -------------------------------


class Reiterable:
    """A re-iterable that is not a sequence: every __iter__ starts over."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.n))


def generator(n: int, closed: threading.Event | None = None) -> Iterator[int]:
    try:
        yield from range(n)
    finally:
        if closed is not None:
            closed.set()


async def async_generator(n: int, closed: threading.Event | None = None) -> AsyncIterator[int]:
    try:
        for i in range(n):
            await asyncio.sleep(0)
            yield i
    finally:
        if closed is not None:
            closed.set()


SOURCES: dict[str, Callable[[int], Any]] = {
    "list": lambda n: list(range(n)),
    "generator": generator,
    "async-generator": async_generator,
    "re-iterable": Reiterable,
    "async-re-iterable": AsyncNumbers,
}
ONE_SHOT = {"generator": generator, "async-generator": async_generator}


def every_outcome(pipeline: Pipeline) -> list[Any]:
    """Drive a pipeline with next() to its end: items as they are, failures as ('failed', input number, cause)."""
    out: list[Any] = []
    while True:
        try:
            out.append(next(pipeline))
        except StopIteration:
            return out
        except PipelineError as exc:
            out.append(("failed", str(exc).split("input ")[1].split(":")[0], type(exc.__cause__).__name__))


@pytest.mark.parametrize("concurrency", [1, 3], ids=["serial", "concurrent"])
@pytest.mark.parametrize("kind", list(SOURCES), ids=list(SOURCES))
def test_op_error_goes_on_with_the_next_items_from_any_source(
    kind: str, concurrency: int, no_loop_threads: None
) -> None:
    """A failed op reaches the consumer with the op's exception as __cause__, in its item's place, and the items
    after it follow, from a generator or async generator exactly as from a list, by next() or by for loops."""
    p = PipelineBuilder().add_source(SOURCES[kind](12)).pipe(explode_on_four, concurrency=concurrency).build()
    assert every_outcome(p) == [0, 1, 2, 3, ("failed", "4", "ValueError"), *range(5, 12)]
    q = PipelineBuilder().add_source(SOURCES[kind](12)).pipe(explode_on_four, concurrency=concurrency).build()
    got = []
    with pytest.raises(PipelineError, match="failed on input 4: ValueError: bad sample") as info:
        for x in q:
            got.append(x)
    assert got == [0, 1, 2, 3] and isinstance(info.value.__cause__, ValueError)
    assert q.state()["stream"]["position"] == 5
    assert list(q) == list(range(5, 12))


@pytest.mark.parametrize("kind", list(SOURCES), ids=list(SOURCES))
def test_a_failure_under_aggregate_skips_its_group_from_any_source(kind: str, no_loop_threads: None) -> None:
    """Under aggregate, a failed item fails its whole group and the later groups are those of a run without it,
    for every kind of source; a failure after the aggregate does the same."""

    def explode_on_group_two(batch: list[int]) -> list[int]:
        if batch[0] == 6:
            raise KeyError("group two")
        return batch

    p = (
        PipelineBuilder()
        .add_source(SOURCES[kind](14))
        .pipe(explode_on_four, concurrency=2)
        .aggregate(3)
        .build()
    )
    assert every_outcome(p) == [[0, 1, 2], ("failed", "4", "ValueError"), [6, 7, 8], [9, 10, 11], [12, 13]]
    q = PipelineBuilder().add_source(SOURCES[kind](14)).aggregate(3).pipe(explode_on_group_two).build()
    assert every_outcome(q) == [
        [0, 1, 2],
        [3, 4, 5],
        ("failed", "[6, 7, 8]", "KeyError"),
        [9, 10, 11],
        [12, 13],
    ]


def test_a_source_that_raises_fails_one_item_and_ends_a_generator(no_loop_threads: None) -> None:
    """A generator that raises gives one failure naming the source (its exception the cause), then the end, since
    a generator that raised is finished; the state counts the failed read as an item."""

    def breaks_at_three() -> Iterator[int]:
        yield from range(3)
        raise OSError("disk gone")

    p = PipelineBuilder().add_source(breaks_at_three()).pipe(square).build()
    assert [next(p) for _ in range(3)] == [0, 1, 4]
    with pytest.raises(PipelineError, match="stage 'source' failed: OSError: disk gone") as info:
        next(p)
    assert isinstance(info.value.__cause__, OSError)
    assert p.state()["stream"] == {"position": 4}
    assert list(p) == []


STOPS: dict[str, Callable[[BuiltPipeline], None]] = {}


def _stop_by(name: str) -> Callable[[Callable[[BuiltPipeline], None]], Callable[[BuiltPipeline], None]]:
    def register(how: Callable[[BuiltPipeline], None]) -> Callable[[BuiltPipeline], None]:
        STOPS[name] = how
        return how

    return register


@_stop_by("break")
def _break(p: BuiltPipeline) -> None:
    for x in p:
        if x == 81:
            break


@_stop_by("close")
def _close(p: BuiltPipeline) -> None:
    assert [next(p) for _ in range(10)] == [x * x for x in range(10)]
    p.close()


@_stop_by("with")
def _with(p: BuiltPipeline) -> None:
    with p:
        assert [next(p) for _ in range(10)] == [x * x for x in range(10)]


@_stop_by("stop")
def _stop(p: BuiltPipeline) -> None:
    p.start()
    assert [p.get_item(timeout=30) for _ in range(10)] == [x * x for x in range(10)]
    p.stop()


@_stop_by("auto-stop-break")
def _auto_stop(p: BuiltPipeline) -> None:
    with p.auto_stop():
        for x in p.get_iterator(timeout=30):
            if x == 81:
                break


@pytest.mark.parametrize("how", list(STOPS), ids=list(STOPS))
@pytest.mark.parametrize("kind", list(ONE_SHOT), ids=list(ONE_SHOT))
def test_early_stop_is_silent_stops_every_thread_and_closes_the_generator(
    kind: str,
    how: str,
    no_loop_threads: None,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """break, close(), leaving a with block, stop() and auto_stop() raise and print nothing, stop every builder
    thread (the fixture) and close the source: the generator's finally runs. The state still says where the
    consumer stopped; reading on raises StateError saying why, or (after stop) nothing comes out."""
    closed = threading.Event()
    p = PipelineBuilder().add_source(ONE_SHOT[kind](10**6, closed)).pipe(square, concurrency=2).build()
    with caplog.at_level(logging.DEBUG, logger="tensorcom"):
        STOPS[how](p)
        assert wait_until(closed.is_set, 30), "the generator's finally did not run"
    assert p.state()["stream"] == {"position": 10}
    if how in ("stop", "auto-stop-break"):  # stop() is final
        assert list(p) == []
    else:
        with pytest.raises(StateError, match="cannot"):
            next(p)
    assert capsys.readouterr().err == ""
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    fresh = PipelineBuilder().add_source(ONE_SHOT[kind](13)).pipe(square, concurrency=2).build()
    fresh.load_state(p.state())
    assert list(fresh) == [100, 121, 144]


@pytest.mark.parametrize("kind", list(ONE_SHOT), ids=list(ONE_SHOT))
def test_one_shot_source_refuses_going_back_and_reads_forward(kind: str, no_loop_threads: None) -> None:
    """A one-shot source cannot go back once read (StateError saying so), while a state ahead of what was read
    loads: the items in between are read and dropped."""
    p = PipelineBuilder().add_source(ONE_SHOT[kind](100)).pipe(square).build()
    early = [next(p) for _ in range(3)]
    state = p.state()
    assert early == [0, 1, 4] and next(p) == 9
    with pytest.raises(StateError, match="one-shot"):
        p.load_state(state)
    p.close()
    if kind == "generator":
        q = PipelineBuilder().add_source(generator(100)).pipe(square).build()
        assert next(q) == 0
        ahead = q.state()
        ahead["stream"]["position"] = 50
        q.load_state(ahead)
        assert next(q) == 2500
        q.close()


def check_resume_into_fresh_sources(
    make: Callable[[], Pipeline], n_items: int
) -> list[tuple[Any, dict[str, Any]]]:
    """The checkpoint-at-every-step check for one-shot sources: save the state before every item, load each into a
    pipeline over a *fresh* source and compare the rest of the stream (items, metadata, final state); skip(k) on
    a fresh pipeline lands on item k. (A one-shot source cannot go back, so nothing loads into a pipeline that read
    past the state.)"""
    reference = make()
    try:
        states = [round_trip(reference.state())]
        items: list[tuple[Any, dict[str, Any]]] = []
        for _ in range(n_items):
            try:
                items.append(reference.next_with_meta())
            except StopIteration:
                break
            states.append(round_trip(reference.state()))
    finally:
        reference.close()
    for k, state in enumerate(states):
        with make() as target:
            target.load_state(state)
            assert target.state() == state, f"state changed by loading it at step {k}"
            rest = collect(target, len(items) - k + 1)
            assert len(rest) == len(items) - k, (
                f"restored at step {k}: {len(rest)} items, not {len(items) - k}"
            )
            for j, ((a, meta_a), (b, meta_b)) in enumerate(zip(items[k:], rest, strict=True)):
                assert meta_a == meta_b, f"restored at step {k}, item {k + j}: meta {meta_a} != {meta_b}"
                assert_same_batch(a, b, f"restored at step {k}, item {k + j}")
            assert target.state() == states[-1], f"restored at step {k}: final state differs"
    for k in range(len(items)):
        with make() as target:
            target.skip(k)
            assert target.state() == states[k], f"skip({k}) state {target.state()} != {states[k]}"
            item, meta = target.next_with_meta()
            assert meta == items[k][1]
            assert_same_batch(item, items[k][0], f"skip({k})")
    return items


def augment(x: int, rng: np.random.Generator) -> np.ndarray:
    """An augmenting op: the sample plus noise from its per-sample generator."""
    return np.float64(x) + rng.normal(size=3)


async def augment_async(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    await asyncio.sleep(0.0005 * (int(x[0]) % 3))
    return x * rng.uniform(0.5, 1.5, size=x.shape)


def builder_over(source: Any, concurrency: int = 3) -> BuiltPipeline:
    return (
        PipelineBuilder()
        .add_source(source)
        .pipe(slow_square, concurrency=concurrency)
        .pipe(augment, concurrency=concurrency)
        .pipe(augment_async, concurrency=concurrency)
        .aggregate(4)
        .pipe(collate)
        .add_sink(2)
        .build()
    )


@pytest.mark.parametrize("kind", list(SOURCES), ids=list(SOURCES))
def test_resume_at_every_step_from_any_source(kind: str, no_loop_threads: None) -> None:
    """Checkpoint before every batch, restore, and get the same rest of the stream bit for bit, from lists,
    re-iterables, generators and async generators alike (one-shot ones restored over a fresh source); every kind
    of source gives the same batches."""
    if kind in ONE_SHOT:
        items = check_resume_into_fresh_sources(lambda: builder_over(SOURCES[kind](22)), n_items=8)
    else:
        items = check_resume_everywhere(lambda: builder_over(SOURCES[kind](22)), n_items=8, skip_checks=3)
    reference = list(builder_over(list(range(22))))
    assert len(items) == len(reference) == 6
    for (batch, _), expected in zip(items, reference, strict=True):
        assert_same_batch(batch, expected)


# -- concurrency=N is a hard bound (issue 22, item 2) -------------------------------------------------------------


class InFlight:
    """Counts the calls of an op running at once, and the most seen."""

    def __init__(self) -> None:
        self.now = self.most = 0
        self.lock = threading.Lock()

    def enter(self) -> None:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)

    def leave(self) -> None:
        with self.lock:
            self.now -= 1


HOLD_S = 0.02  # how long a call stays in flight once the limit was reached, for excess calls to show


def counted_op(meter: InFlight, limit: int, is_async: bool) -> Callable[[int], Any]:
    """An op whose calls wait until ``limit`` of them ran at once (so the limit is reached, not just respected),
    then stay a moment so that any call beyond the limit would overlap them."""

    def sync_op(x: int) -> int:
        meter.enter()
        try:
            wait_until(lambda: meter.most >= limit, 30, interval=0.001)
            time.sleep(HOLD_S)
            return x
        finally:
            meter.leave()

    async def async_op(x: int) -> int:
        meter.enter()
        try:
            deadline = time.monotonic() + 30
            while meter.most < limit and time.monotonic() < deadline:
                await asyncio.sleep(0.001)
            await asyncio.sleep(HOLD_S)
            return x
        finally:
            meter.leave()

    return async_op if is_async else sync_op


@pytest.mark.parametrize("order", ["input", "completion"])
@pytest.mark.parametrize("before", [0, 4], ids=["alone", "after-concurrency-4"])
@pytest.mark.parametrize("limit", [1, 3], ids=["limit-1", "limit-3"])
@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_concurrency_is_a_hard_bound(
    is_async: bool, limit: int, before: int, order: str, no_loop_threads: None
) -> None:
    """An op never runs more than concurrency=N calls at once, sync or async, in either order, whatever stage
    stands before it; and it does reach N."""
    meter = InFlight()
    builder = PipelineBuilder().add_source(range(16))
    if before:
        builder.pipe(async_increment if is_async else slow_square, concurrency=before)
    builder.pipe(counted_op(meter, limit, is_async), concurrency=limit, output_order=order)  # type: ignore[arg-type]
    assert len(list(builder.build())) == 16
    assert meter.most == limit


def test_concurrency_bound_holds_with_more_op_threads_than_it(no_loop_threads: None) -> None:
    """With num_threads above an op's concurrency, the op threads still run concurrency calls of it at most, while
    another stage uses the spare threads."""
    meter, other = InFlight(), InFlight()
    p = (
        PipelineBuilder()
        .add_source(range(16))
        .pipe(counted_op(other, 4, False), concurrency=4)
        .pipe(counted_op(meter, 2, False), concurrency=2)
        .build(num_threads=8)
    )
    assert list(p) == list(range(16))
    assert (meter.most, other.most) == (2, 4)


def test_concurrency_bound_holds_with_a_user_executor(no_loop_threads: None) -> None:
    """A sync op on the user's executor (with more threads than its concurrency) runs concurrency calls at most."""
    meter = InFlight()
    with concurrent.futures.ThreadPoolExecutor(6) as executor:
        p = (
            PipelineBuilder()
            .add_source(range(16))
            .pipe(counted_op(meter, 2, False), concurrency=2, executor=executor)
            .build()
        )
        assert list(p) == list(range(16))
    assert meter.most == 2


# -- per-sample generators for ops that ask for one (issue 22, item 4) ---------------------------------------------


async def noisy_async(x: int, rng: np.random.Generator) -> tuple[int, float]:
    await asyncio.sleep(0)
    return x, float(rng.random())


def noisy_pipeline(
    source: Any, op: Callable[..., Any], concurrency: int, num_threads: int | None
) -> list[Any]:
    built = (
        PipelineBuilder().add_source(source).pipe(op, concurrency=concurrency).build(num_threads=num_threads)
    )
    return list(built)


@pytest.mark.parametrize("op", [noisy, noisy_async], ids=["sync", "async"])
@pytest.mark.parametrize(
    "make_source",
    [
        lambda: Permutation(40, seed=3),
        lambda: list(range(40)),
        lambda: generator(40),
        lambda: async_generator(40),
    ],
    ids=["permutation", "list", "generator", "async-generator"],
)
def test_rng_ops_are_bit_identical_across_threads_and_concurrency(
    make_source: Callable[[], Any], op: Callable[..., Any], no_loop_threads: None
) -> None:
    """An op with an rng parameter gets a generator keyed by (seed, epoch, index): the same numbers with 1 or 4
    threads and concurrency 1 or 8, and the same as Map gives (the source's seed; 0 for other sources)."""
    runs = [noisy_pipeline(make_source(), op, c, t) for c, t in [(1, 1), (8, 4), (8, 1), (1, 4)]]
    assert all(run == runs[0] for run in runs[1:])
    assert len({value for _, value in runs[0]}) == 40
    source = make_source()
    if not isinstance(source, AsyncIterator):
        assert runs[0] == list(Conveyer([source, Map(noisy)]))


def test_rng_seed_of_a_pipe_and_its_checks(no_loop_threads: None) -> None:
    """pipe(seed=) keys the generator as Map(seed=) does, changes the numbers and the fingerprint; seed= for an
    op without an rng parameter is a one-line ConfigError."""
    seeded = noisy_pipeline_seeded(7)
    assert seeded == list(Conveyer([Range(10), Map(noisy, seed=7)]))
    assert seeded != noisy_pipeline_seeded(None) and seeded == noisy_pipeline_seeded(7)
    fingerprints = {
        PipelineBuilder().add_source(range(10)).pipe(noisy, seed=seed).build().fingerprint
        for seed in (None, 7, 8)
    }
    assert len(fingerprints) == 3
    with pytest.raises(ConfigError, match="seed= is for ops that take a per-sample generator"):
        PipelineBuilder().add_source(range(10)).pipe(square, seed=7)
    with pytest.raises(ConfigError, match="seed must be an int"):
        PipelineBuilder().add_source(range(10)).pipe(noisy, seed=-1)


def noisy_pipeline_seeded(seed: int | None) -> list[Any]:
    return list(PipelineBuilder().add_source(range(10)).pipe(noisy, seed=seed, concurrency=3).build())


def test_rng_ops_resume_at_every_step_with_a_permutation_source(no_loop_threads: None) -> None:
    """An augmenting builder pipeline over a repeating Permutation resumes bit for bit from every step, into
    pipelines with other thread counts and concurrency."""

    def make(concurrency: int, threads: int) -> BuiltPipeline:
        return (
            PipelineBuilder()
            .add_source(Permutation(9, seed=11, repeating=True))
            .pipe(augment, concurrency=concurrency)
            .pipe(noisy_async, concurrency=concurrency)
            .aggregate(2)
            .pipe(collate)
            .build(num_threads=threads)
        )

    check_resume_everywhere(lambda: make(1, 1), n_items=12, make_restored=lambda: make(8, 4), skip_checks=3)


# -- output_order="completion" resumes exactly (issue 22, item 4) ------------------------------------------------


def shuffled_delay(x: int) -> int:
    """Items finish out of order: the delay depends on the item, not on timing."""
    time.sleep(0.001 * ((x * 7) % 5))
    return x


def completion_pipeline(source: Any, concurrency: int = 4) -> BuiltPipeline:
    return (
        PipelineBuilder()
        .add_source(source)
        .pipe(shuffled_delay, concurrency=concurrency, output_order="completion")
        .pipe(noisy, concurrency=2)
        .build()
    )


@pytest.mark.parametrize("kind", ["list", "generator"])
def test_completion_order_resumes_at_every_step_with_nothing_repeated_or_lost(
    kind: str, no_loop_threads: None
) -> None:
    """Stop after any number of items in completion order, save the state, load it into a fresh pipeline: the
    items delivered before and after are every item exactly once, each bit-identical to an uninterrupted run."""
    n = 20
    expected = dict(noisy_pipeline(list(range(n)), noisy, 1, 1))
    for k in range(n + 1):
        with completion_pipeline(SOURCES[kind](n)) as first:
            before = [next(first) for _ in range(k)]
            state = round_trip(first.state())
        assert sum(count for _, count in state["stream"]["delivered"]) <= 4 * 4
        with completion_pipeline(SOURCES[kind](n)) as second:
            second.load_state(state)
            assert second.state() == state
            after = list(second)
        together = before + after
        assert sorted(x for x, _ in together) == list(range(n)), f"stopped after {k}: {together}"
        assert all(expected[x] == value for x, value in together), f"stopped after {k}: values differ"


def test_completion_order_records_items_delivered_past_a_slow_one(no_loop_threads: None) -> None:
    """Items that overtake a slow one are recorded beyond the low-water mark (which stays at the slow item); at
    most a bounded window of items overtakes it; a resumed run computes the slow item and none of the others."""
    release = threading.Event()

    def counting(calls: list[int]) -> Callable[[int], int]:
        def slow_zero(x: int) -> int:  # the same name in both pipelines, so the same fingerprint
            calls.append(x)
            if x == 0:
                release.wait(60)
            return x

        return slow_zero

    p = (
        PipelineBuilder()
        .add_source(range(30))
        .pipe(counting([]), concurrency=2, output_order="completion")
        .build()
    )
    try:
        ahead = [p.get_item(timeout=30) for _ in range(7)]
        with pytest.raises(TimeoutError):  # a window of 4 x concurrency inputs: item 8 waits for item 0
            p.get_item(timeout=1)
        state = round_trip(p.state())
    finally:
        release.set()
        p.close()
    assert sorted(ahead) == list(range(1, 8))
    assert state["stream"] == {"source": {"epoch": 0, "position": 0}, "delivered": [[1, 7]]}
    calls: list[int] = []
    q = (
        PipelineBuilder()
        .add_source(range(30))
        .pipe(counting(calls), concurrency=2, output_order="completion")
        .build()
    )
    q.load_state(state)
    assert sorted(q) == [0, *range(8, 30)]
    assert sorted(calls) == [0, *range(8, 30)]
    q.load_state(state)
    q.skip(3)  # in completion order skip takes (and drops) items
    assert len(list(q)) == 20


@pytest.mark.parametrize(
    ("delivered", "message"),
    [
        ({"a": 1}, "delivered must be a list of [first, count] runs"),
        ([[0, 2]], "each delivered run must be [first >= 1, count >= 1]. Found: [0, 2]"),
        ([[1, True]], "each delivered run must be"),
        ([[1, 2**40]], "more than a state records"),
    ],
    ids=["not-a-list", "offset-zero", "bool", "huge"],
)
def test_completion_order_refuses_a_bad_delivered_record(delivered: Any, message: str) -> None:
    """A delivered record that is not runs of offsets >= 1 is a StateError saying what is wrong."""
    p = completion_pipeline(range(5))
    state = p.state()
    state["stream"]["delivered"] = delivered
    with pytest.raises(StateError) as info:
        p.load_state(state)
    assert message in str(info.value)


def test_dropped_and_left_over_items_count_as_delivered(no_loop_threads: None) -> None:
    """Items dropped within max_failures and the group drop_last leaves out move the state on, in either order."""
    for order in ("input", "completion"):
        p = (
            PipelineBuilder()
            .add_source(generator(11))
            .pipe(explode_on_four, max_failures=1, output_order=order)  # type: ignore[arg-type]
            .aggregate(3, drop_last=True)
            .build()
        )
        assert sorted(x for group in p for x in group) == [0, 1, 2, 3, 5, 6, 7, 8, 9]
        stream = p.state()["stream"]
        assert (stream if order == "input" else stream["source"]) == {"position": 11}
