"""Keras 3 adapter on the torch backend: model.fit trains from real server processes, PyDataset arguments that
cannot work are refused, and ConnectionCheckpoint resumes an interrupted fit on the batches it would have seen."""

from __future__ import annotations

import os

os.environ["KERAS_BACKEND"] = "torch"  # before keras is imported anywhere in this process

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from helpers import StartProcess, StartServer, assert_same_batches  # noqa: E402
from imagenet_fixtures import make_image_folder, start_image_server  # noqa: E402

keras = pytest.importorskip("keras")

from tensorcom import ConfigError  # noqa: E402
from tensorcom.adapters.keras import ConnectionCheckpoint, ConnectionPyDataset  # noqa: E402
from tensorcom.datasets.imagenet import directory_pipeline  # noqa: E402
from tensorcom.datasets.sample_images import make_sample_images  # noqa: E402

SIZE = 16

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "torch", reason="keras was loaded with another backend"
)


def small_model(classes: int) -> object:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((SIZE, SIZE, 3), dtype="uint8"),
            keras.layers.Rescaling(1 / 127.5, offset=-1),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(classes),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def test_fit_trains_from_a_server_and_the_loss_falls(tmp_path: Path, start_process: StartProcess) -> None:
    """model.fit(ConnectionPyDataset, steps_per_epoch=...) takes exactly one batch per step and the loss falls."""
    folder = make_sample_images(tmp_path / "sample", per_class=10, size=32)
    args = ("-d", folder, "-b", "16", "--size", str(SIZE), "-w", "1", "-q")
    _, url = start_image_server(start_process, "imagenet_dir", tmp_path / "server.log", *args)
    model = small_model(10)
    data = ConnectionPyDataset(url, seed=0, timeout=30)
    try:
        history = model.fit(data, epochs=3, steps_per_epoch=20, shuffle=False, verbose=0)  # type: ignore[attr-defined]
        assert data.count == 60 and data.last.step == 59
    finally:
        data.close()
    losses = history.history["loss"]
    assert losses[-1] < losses[0] - 0.2


def test_batches_follow_the_stream_and_resume_from_state(tmp_path: Path, start_process: StartProcess) -> None:
    """Whatever index Keras asks for, batches come in stream order; a dataset given state() continues it."""
    folder = make_image_folder(tmp_path / "images")
    args = ("-d", str(folder), "-b", "4", "--size", str(SIZE), "-w", "1", "-q")
    _, url = start_image_server(start_process, "imagenet_dir", tmp_path / "server.log", *args)
    with directory_pipeline(directory=str(folder), seed=3, batch_size=4, size=SIZE) as pipeline:
        expected = [next(pipeline) for _ in range(5)]
    first = ConnectionPyDataset(url, seed=3, batches=3, timeout=30)
    received = [first[2], first[0], first[1]]
    state = first.state_dict()
    assert first.state() == state
    first.close()
    second = ConnectionPyDataset(url, seed=3, state=state, timeout=30)
    received += [second[0], second[1]]
    second.close()
    assert first.num_batches == 3 and second.num_batches is None
    assert_same_batches(received, expected)
    assert all(isinstance(batch, tuple) and batch[1].dtype == np.int64 for batch in received)


def test_several_workers_are_refused() -> None:
    """A connection is read by one thread: asking Keras for worker threads fails with a ConfigError."""
    data = ConnectionPyDataset("zreq://127.0.0.1:9")
    data.workers = 4
    with pytest.raises(ConfigError, match="workers"):
        data[0]


@pytest.mark.parametrize(
    "argument, value",
    [("workers", 4), ("use_multiprocessing", True), ("max_queue_size", 10)],
    ids=["workers", "use_multiprocessing", "max_queue_size"],
)
def test_py_dataset_arguments_are_refused_at_construction(argument: str, value: object) -> None:
    """workers=, use_multiprocessing= and max_queue_size= raise a ConfigError naming the argument and why, before
    any connection is made."""
    with pytest.raises(ConfigError, match=rf"does not take {argument}= \(.+\)\. Found: {argument}={value!r}"):
        ConnectionPyDataset("zreq://127.0.0.1:9", **{argument: value})


class Recorder(keras.callbacks.Callback):
    """Records (step, sample indices) of every batch trained on, and can interrupt fit after a given batch."""

    def __init__(self, data: ConnectionPyDataset, stop_after: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.data = data
        self.stop_after = stop_after
        self.epoch = 0
        self.batches: list[tuple[int, list[int]]] = []

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self.batches.append((self.data.last.step, list(self.data.last.indices)))
        if (self.epoch, batch) == self.stop_after:
            raise KeyboardInterrupt("interrupted by the test")


def tiny_model() -> Any:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4, 4, 3), dtype="uint8"),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Flatten(),
            keras.layers.Dense(60),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def fit(
    url: str, backup: Path | None, stop_after: tuple[int, int] | None = None
) -> tuple[Any, Recorder, Any]:
    """4 epochs of 5 batches from a fresh model and dataset, with a ConnectionCheckpoint when ``backup`` is given."""
    model, data = tiny_model(), ConnectionPyDataset(url, seed=4, batches=5, timeout=30)
    recorder = Recorder(data, stop_after)
    checkpoint = None if backup is None else ConnectionCheckpoint(data, backup)
    callbacks = [recorder] if checkpoint is None else [checkpoint, recorder]
    try:
        model.fit(data, epochs=4, shuffle=False, verbose=0, callbacks=callbacks)  # type: ignore[attr-defined]
    except KeyboardInterrupt:
        pass
    finally:
        data.close()
    return model, recorder, checkpoint


@pytest.mark.filterwarnings(  # raised inside Keras' own save_weights on the torch backend with numpy 2
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)
def test_an_interrupted_fit_resumes_from_its_backup_on_the_same_batches(
    request_server: StartServer, tmp_path: Path
) -> None:
    """Interrupted in the middle of epoch 2 and started again, fit with ConnectionCheckpoint continues at epoch 2
    with epoch 1's weights and data position: it trains on exactly the batches (steps and samples) of epochs 2 and
    3 of an uninterrupted run and ends with the same weights; the backup is removed at the end."""
    _, url = request_server("factories:small", "repeating=true")
    model, uninterrupted, _ = fit(url, None)
    assert [step for step, _ in uninterrupted.batches] == list(range(20))
    backup = tmp_path / "backup"
    _, interrupted, _ = fit(url, backup, stop_after=(2, 2))
    assert interrupted.batches == uninterrupted.batches[:13]
    assert (backup / "backup.json").exists()
    resumed_model, resumed, checkpoint = fit(url, backup)
    assert checkpoint.restored_epoch == 2
    assert resumed.batches == uninterrupted.batches[10:]
    for expected, found in zip(model.get_weights(), resumed_model.get_weights(), strict=True):
        np.testing.assert_allclose(found, expected, rtol=1e-6, atol=1e-7)
    assert not backup.exists()
