"""Keras 3 adapter on the torch backend: model.fit trains from a real serve-imagenet-dir process."""

from __future__ import annotations

import os

os.environ["KERAS_BACKEND"] = "torch"  # before keras is imported anywhere in this process

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from helpers import StartProcess, assert_same_batches  # noqa: E402
from imagenet_fixtures import make_image_folder, start_image_server  # noqa: E402

keras = pytest.importorskip("keras")

from tensorcom import ConfigError  # noqa: E402
from tensorcom.adapters.keras import ConnectionPyDataset  # noqa: E402
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
    state = first.state()
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
