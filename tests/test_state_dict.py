"""One checkpoint vocabulary: every face saves with state_dict() and continues exactly after load_state_dict(); the
zreq state carries the absolute step, older states still load, and connections move to an epoch or a step."""

from __future__ import annotations

import itertools
import json
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import factories
import msgpack
import pytest
from helpers import StartServer
from loader_datasets import Labelled

from tensorcom import ConfigError, Connection, Server, Timeout, URLError
from tensorcom.loader import SwiftLoader
from tensorcom.pipeline import Join, Permutation, Pipeline, PipelineBuilder

BEFORE, AFTER = 3, 4  # items taken before the state is saved, and after it is loaded

Opened = tuple[Any, Iterator[list[int]]]  # a face, and its items as the sample indices they hold
Opener = Callable[[], Opened]


def indices_of(batch: Any) -> list[int]:
    """The labels of an (images, labels) batch: the factories' labels are the samples' dataset indices."""
    return [int(label) for label in batch[1]]


def close(face: Any) -> None:
    face.close()


def check_continuation(open_face: Opener) -> None:
    """The loop every face goes through: take BEFORE items, save ``state_dict()`` (plain data: JSON and msgpack),
    open a fresh face, ``load_state_dict``, take AFTER items; they must be the uninterrupted face's items."""
    face, items = open_face()
    try:
        expected = [next(items) for _ in range(BEFORE + AFTER)]
    finally:
        close(face)
    face, items = open_face()
    try:
        seen = [next(items) for _ in range(BEFORE)]
        state = face.state_dict()
    finally:
        close(face)
    assert json.loads(json.dumps(state)) == state
    state = msgpack.unpackb(msgpack.packb(state), strict_map_key=False)
    face, items = open_face()
    try:
        face.load_state_dict(state)
        seen += [next(items) for _ in range(AFTER)]
    finally:
        close(face)
    assert len({tuple(item) for item in expected}) == len(expected), "the stream repeats itself"
    assert seen == expected


def pipeline_items(pipeline: Pipeline) -> Iterator[list[int]]:
    while True:
        _, meta = pipeline.next_with_meta()
        yield [*meta["indices"], *meta.get("sources", [])]


def open_conveyer(request: pytest.FixtureRequest) -> Opener:
    def opened() -> Opened:
        pipeline = factories.small(seed=4, rank=0, world_size=1)
        return pipeline, pipeline_items(pipeline)

    return opened


def open_join(request: pytest.FixtureRequest) -> Opener:
    def opened() -> Opened:
        sources = [(factories.small(seed=s, rank=0, world_size=1, n=40), w) for s, w in ((1, 0.7), (2, 0.3))]
        pipeline = Join(sources, seed=3)
        return pipeline, pipeline_items(pipeline)

    return opened


def times_ten(value: int) -> int:
    return value * 10


def open_builder(request: pytest.FixtureRequest) -> Opener:
    def opened() -> Opened:
        pipeline = (
            PipelineBuilder()
            .add_source(Permutation(60, seed=9))
            .pipe(times_ten, concurrency=2)
            .aggregate(4)
            .add_sink(2)
            .build()
        )
        return pipeline, pipeline_items(pipeline)

    return opened


def open_request_connection(request: pytest.FixtureRequest) -> Opener:
    request_server: StartServer = request.getfixturevalue("request_server")
    _, url = request_server("factories:small")

    def opened() -> Opened:
        connection = Connection(url, seed=5, timeout=30)
        return connection, (indices_of(connection.recv()) for _ in itertools.count())

    return opened


def open_stream_connection(request: pytest.FixtureRequest) -> Opener:
    ipc_url: Callable[..., str] = request.getfixturevalue("ipc_url")
    control = ipc_url("zreq", "control")
    server = Server(
        factories.small, ipc_url("zpush"), seed=6, control=ipc_url("zrep", "control"), send_timeout=8
    )

    def run() -> None:
        try:
            server.run()
        except Timeout:  # the test stopped reading; the server ends by itself
            pass

    threading.Thread(target=run, daemon=True).start()

    def opened() -> Opened:
        connection = Connection(ipc_url("zpull"), timeout=30, control=control)
        connection.set_epoch(0)  # every face starts at the start of the stream
        return connection, (indices_of(connection.recv()) for _ in itertools.count())

    return opened


def open_swift_loader(request: pytest.FixtureRequest) -> Opener:
    def opened() -> Opened:
        loader = SwiftLoader(
            dataset_class=Labelled,
            dataset_kwargs={"n": 60},
            batch_size=4,
            worker_per_consumer=1,
            seed_number=8,
            timeout=60,
        )
        loader.start(0)
        return loader, ([int(label) for label in batch["label"]] for batch in loader)

    return opened


def open_connection_dataset(request: pytest.FixtureRequest) -> Opener:
    from torch.utils.data import DataLoader

    from tensorcom.adapters.torch import ConnectionDataset

    request_server: StartServer = request.getfixturevalue("request_server")
    _, url = request_server("factories:small")

    def opened() -> Opened:
        dataset = ConnectionDataset(url, seed=7, batches=15, timeout=30)
        return dataset, (indices_of(batch) for batch in DataLoader(dataset, batch_size=None))

    return opened


def open_py_dataset(request: pytest.FixtureRequest) -> Opener:
    os.environ.setdefault(
        "KERAS_BACKEND", "torch"
    )  # if keras is not loaded yet; test_adapters_keras does the same
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip("keras was loaded with another backend")
    from tensorcom.adapters.keras import ConnectionPyDataset

    request_server: StartServer = request.getfixturevalue("request_server")
    _, url = request_server("factories:small")

    def opened() -> Opened:
        data = ConnectionPyDataset(url, seed=8, batches=5, timeout=30)
        return data, (indices_of(data[index % 5]) for index in itertools.count())

    return opened


FACES = {
    "Conveyer": open_conveyer,
    "Join": open_join,
    "PipelineBuilder": open_builder,
    "RequestConnection": open_request_connection,
    "StreamConnection": open_stream_connection,
    "SwiftLoader": open_swift_loader,
    "ConnectionDataset": open_connection_dataset,
    "ConnectionPyDataset": open_py_dataset,
}


@pytest.mark.parametrize("face", list(FACES), ids=list(FACES))
def test_every_face_continues_exactly_after_load_state_dict(
    face: str, request: pytest.FixtureRequest
) -> None:
    """Pipelines, both kinds of Connection, SwiftLoader and both framework datasets: state_dict() after k items,
    load_state_dict() in a fresh one, and the items that follow are those of an uninterrupted run."""
    check_continuation(FACES[face](request))


@pytest.mark.parametrize("name", ["load_state", "set_state", "load_state_dict"], ids=str)
def test_the_older_names_are_aliases(name: str) -> None:
    """state() is state_dict(), and load_state/set_state restore as load_state_dict does."""
    with factories.small(seed=1, rank=0, world_size=1) as pipeline:
        next(pipeline)
        state = pipeline.state_dict()
        assert pipeline.state() == state
        expected = indices_of(next(pipeline))
    with factories.small(seed=1, rank=0, world_size=1) as pipeline:
        getattr(pipeline, name)(state)
        assert indices_of(next(pipeline)) == expected


def test_a_zreq_state_carries_the_absolute_step_and_an_older_state_still_loads(
    request_server: StartServer,
) -> None:
    """After a resume, last.step goes on from the saved step; a format-1 state (no "step") resumes the same way,
    its step read from the pipeline's state."""
    _, url = request_server("factories:small")
    with Connection(url, seed=2, timeout=30) as connection:
        for _ in range(5):
            connection.recv()
        state = connection.state_dict()
        expected = [indices_of(connection.recv()) for _ in range(2)]
    assert state["step"] == 5 and state["format"] == 2
    older = {key: value for key, value in state.items() if key != "step"} | {"format": 1}
    for saved in (state, older):
        with Connection(url, seed=2, timeout=30, state=saved) as connection:
            assert connection.state_dict()["step"] == 5
            assert indices_of(connection.recv()) == expected[0] and connection.last.step == 5
            assert indices_of(connection.recv()) == expected[1] and connection.last.step == 6
            assert connection.state_dict()["step"] == 7


def test_a_zreq_connection_moves_to_an_epoch_or_a_step(request_server: StartServer) -> None:
    """set_epoch(e) starts epoch e at step 0; seek_step(s) continues at step s of the stream; a state taken right
    after a move resumes there."""
    _, url = request_server("factories:small", "repeating=true")
    with factories.small(seed=3, rank=0, world_size=1, repeating=True) as pipeline:
        stream = [indices_of(next(pipeline)) for _ in range(20)]
    with factories.small(seed=3, rank=0, world_size=1, repeating=True) as pipeline:
        pipeline.set_epoch(2)
        epoch_two = indices_of(next(pipeline))
    with Connection(url, seed=3, timeout=30) as connection:
        connection.recv()
        connection.seek_step(17)
        assert indices_of(connection.recv()) == stream[17] and connection.last.step == 17
        connection.seek_step(4)
        moved = connection.state_dict()
        connection.set_epoch(2)
        assert indices_of(connection.recv()) == epoch_two
        assert (connection.last.step, connection.last.epoch) == (0, 2)
    with Connection(url, seed=3, timeout=30, state=moved) as connection:
        assert indices_of(connection.recv()) == stream[4] and connection.last.step == 4


def test_a_stream_connection_moves_only_through_a_control_socket(ipc_url: Callable[..., str]) -> None:
    """Without control=, load_state_dict and set_epoch on a stream connection say how to make them work; a control
    URL that cannot be one is refused when the connection is made."""
    with Connection(ipc_url("zpull"), timeout=1) as connection:
        with pytest.raises(ConfigError, match="control="):
            connection.load_state_dict({"pipeline": {}})
        with pytest.raises(ConfigError, match="control="):
            connection.set_epoch(1)
    with pytest.raises(URLError, match="a control cannot use a zpub"):  # before any socket opens
        Connection(ipc_url("zpull"), control="zpub://127.0.0.1:5")
