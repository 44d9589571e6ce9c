"""PyTorch adapters: DeviceTransfer on CPU; ConnectionDataset under DataLoader(batch_size=None) against real server
processes: epochs of N batches, set_epoch, resume from state_dict (also through StatefulDataLoader when torchdata is
installed), loader workers and re-batching refused; and a tiny CNN whose loss falls on the sample images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import factories
import ml_dtypes
import numpy as np
import pytest
import torch
from helpers import StartProcess, StartServer, assert_same_batches
from imagenet_fixtures import make_image_folder, start_image_server
from torch.utils.data import DataLoader

from tensorcom import ConfigError
from tensorcom.adapters.device import DeviceTransfer
from tensorcom.adapters.torch import ConnectionDataset, normalize_images
from tensorcom.datasets.imagenet import directory_pipeline
from tensorcom.datasets.sample_images import make_sample_images

SIZE = 16
BATCH = 4


# DeviceTransfer


def test_arrays_become_tensors_sharing_memory_in_nested_batches() -> None:
    """Arrays in tuples, lists and dicts become tensors on the device without a copy; other leaves pass through."""
    images = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    labels = np.array([3, 4], dtype=np.int64)
    batch = {"x": (images, [labels, 7, "name"]), "w": torch.ones(2)}
    moved = DeviceTransfer("cpu")(batch)
    tensor = moved["x"][0]
    assert isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu"
    assert tensor.data_ptr() == images.ctypes.data  # no copy
    assert moved["x"][1][0].dtype == torch.int64 and moved["x"][1][1:] == [7, "name"]
    assert isinstance(moved["x"], tuple) and isinstance(moved["x"][1], list)
    assert moved["w"] is batch["w"]


def test_bfloat16_and_read_only_arrays() -> None:
    """bfloat16 arrays become bfloat16 tensors; a read-only array is copied instead of triggering torch's warning."""
    values = np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16)
    assert DeviceTransfer("cpu")([values])[0].dtype == torch.bfloat16
    frozen = np.ones(3, np.float32)
    frozen.flags.writeable = False
    tensor = DeviceTransfer()([frozen])[0]
    assert tensor.data_ptr() != frozen.ctypes.data and tensor.tolist() == [1.0, 1.0, 1.0]


def test_to_device_replaces_the_move() -> None:
    """A to_device callable receives every tensor and its result goes into the batch."""
    seen: list[torch.Tensor] = []

    def mark(tensor: torch.Tensor) -> str:
        seen.append(tensor)
        return "moved"

    assert DeviceTransfer("cpu", to_device=mark)((np.zeros(2), np.ones(1))) == ("moved", "moved")
    assert len(seen) == 2


@pytest.mark.parametrize(
    "options, message",
    [({"max_batches_on_device": 0}, "must be >= 1"), ({"device": "nonsense"}, "torch device")],
    ids=["no-batches", "bad-device"],
)
def test_bad_options_are_config_errors(options: dict[str, object], message: str) -> None:
    """Invalid settings raise ConfigError with the value."""
    with pytest.raises(ConfigError, match=message):
        DeviceTransfer(**options)  # type: ignore[arg-type]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when CUDA is absent")
def test_cuda_without_cuda_is_a_clear_error() -> None:
    """Asking for cuda where there is none fails at construction, not at the first batch."""
    with pytest.raises(ConfigError, match="CUDA is not available"):
        DeviceTransfer("cuda:0")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_transfer_bounds_batches_in_flight() -> None:
    """On CUDA: pinned staging, values intact, never more than max_batches_on_device copies outstanding."""
    transfer = DeviceTransfer("cuda", max_batches_on_device=2)
    for step in range(6):
        moved = transfer((np.full((256, 256), step, np.float32),))
        assert transfer.batches_in_flight <= 2
        assert moved[0].device.type == "cuda" and float(moved[0][0, 0]) == step
    transfer.synchronize()
    assert transfer.batches_in_flight == 0


def test_importing_device_does_not_import_torch() -> None:
    """tensorcom.adapters.device imports torch only when a batch is moved or a device is named."""
    code = "import sys, tensorcom.adapters.device; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_normalize_images_gives_nchw_float() -> None:
    """uint8 NHWC → float32 NCHW with (x/255 - mean)/std per channel."""
    images = torch.full((2, 4, 4, 3), 255, dtype=torch.uint8)
    result = normalize_images(images, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 0.5))
    assert result.shape == (2, 3, 4, 4) and result.dtype == torch.float32
    assert torch.allclose(result[:, 1], torch.full((2, 4, 4), 2.0))


# ConnectionDataset against a real server


@pytest.fixture
def image_server(tmp_path: Path, start_process: StartProcess) -> tuple[Path, str]:
    folder = make_image_folder(tmp_path / "images")
    args = ("-d", str(folder), "-b", str(BATCH), "--size", str(SIZE), "-w", "1", "-q")
    _, url = start_image_server(start_process, "imagenet_dir", tmp_path / "server.log", *args)
    return folder, url


def test_dataloader_yields_the_pipeline_as_tensors_and_resumes(image_server: tuple[Path, str]) -> None:
    """DataLoader(dataset, batch_size=None) yields the served batches as CPU tensors; a new dataset given
    state_dict() continues with exactly the next batches."""
    folder, url = image_server
    with directory_pipeline(directory=str(folder), seed=6, batch_size=BATCH, size=SIZE) as pipeline:
        expected = [next(pipeline) for _ in range(8)]
    with ConnectionDataset(url, seed=6, batches=5, device="cpu", timeout=30) as dataset:
        assert len(dataset) == 5
        first = [(images, labels) for images, labels in DataLoader(dataset, batch_size=None)]
        assert all(images.dtype == torch.uint8 and labels.dtype == torch.int64 for images, labels in first)
        assert dataset.last.step == 4
        state = dataset.state_dict()
    resumed = ConnectionDataset(url, seed=6, batches=3, timeout=30)
    resumed.load_state_dict(state)
    with resumed:
        rest = list(DataLoader(resumed, batch_size=None))
    received = [(images.numpy(), labels.numpy()) for images, labels in first + rest]
    assert_same_batches(received, expected)


def stateful_loader() -> Any:
    return pytest.importorskip("torchdata.stateful_dataloader").StatefulDataLoader


LOADERS = {"DataLoader": lambda: DataLoader, "StatefulDataLoader": stateful_loader}


@pytest.mark.parametrize(
    "url, workers, reason",
    [
        ("zreq://127.0.0.1:9", 1, "the same zreq stream"),
        ("zreq://127.0.0.1:9", 2, "the same zreq stream"),
        ("zsub://127.0.0.1:9", 2, "receive every batch"),
        ("zrpull://127.0.0.1:9", 1, "split the stream"),
    ],
    ids=["zreq-1", "zreq-2", "zsub-2", "zrpull-1"],
)
def test_every_loader_worker_count_is_refused(url: str, workers: int, reason: str) -> None:
    """num_workers >= 1 raises a ConfigError (raised by the worker before it connects) saying why, and to use 0."""
    loader = DataLoader(ConnectionDataset(url, batches=2), batch_size=None, num_workers=workers)
    iterator = iter(loader)
    try:
        with pytest.raises(ConfigError, match=f"num_workers={workers}") as raised:
            next(iterator)
    finally:
        iterator._shutdown_workers()  # type: ignore[attr-defined]
    assert reason in str(raised.value) and "Use num_workers=0" in str(raised.value)


@pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning")  # torchdata 0.11 on a newer torch
@pytest.mark.parametrize("loader_kind", ["DataLoader", "StatefulDataLoader"], ids=str)
@pytest.mark.parametrize("options", [{}, {"batch_size": 4}], ids=["default-batch-size", "batch-size-4"])
def test_a_dataloader_that_batches_again_is_refused(options: dict[str, Any], loader_kind: str) -> None:
    """DataLoader(dataset) (batch_size=1) or any batch_size but None fails when iteration starts, before connecting,
    instead of yielding batches of batches."""
    make_loader = LOADERS[loader_kind]()
    loader = make_loader(ConnectionDataset("zreq://127.0.0.1:9", batches=2), **options)
    with pytest.raises(ConfigError, match="batch_size=None"):
        iter(loader)


# Epochs, set_epoch and resume against a real `tensorcom serve`

N = 10  # batches per epoch of the dataset
PIPELINES = {
    "repeating": ("repeating=true",),  # one endless stream: epoch e is steps [e * N, (e + 1) * N)
    "epochs-of-N": ("n=40",),  # 40 samples in batches of 4: the pipeline's epochs are N batches
}


def served_epochs(kind: str, epochs: int) -> list[list[tuple[list[int], int]]]:
    """(sample indices, step) of every batch of the dataset's first ``epochs`` epochs, computed in this process."""
    options: dict[str, Any] = {"repeating": True} if kind == "repeating" else {"n": 40}
    result = []
    for epoch in range(epochs):
        with factories.small(seed=5, rank=0, world_size=1, **options) as pipeline:
            if kind == "repeating":
                pipeline.skip(epoch * N)
            else:
                pipeline.set_epoch(epoch)
            batches = [pipeline.next_with_meta() for _ in range(N)]
        result.append([(batch[1].tolist(), meta["step"]) for batch, meta in batches])
    return result


def seen(dataset: ConnectionDataset, batch: Any) -> tuple[list[int], int]:
    return batch[1].tolist(), dataset.last.step


@pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning")  # torchdata 0.11 on a newer torch
@pytest.mark.parametrize("loader_kind", list(LOADERS), ids=list(LOADERS))
@pytest.mark.parametrize("kind", list(PIPELINES), ids=list(PIPELINES))
def test_a_resume_k_batches_into_an_epoch_delivers_the_rest_then_full_epochs(
    request_server: StartServer, kind: str, loader_kind: str
) -> None:
    """batches=N: len is N; interrupted after 2 batches of epoch 0 and resumed, the run sees 2 + 8 + 10 = 20 batches,
    the same ones and with the same step numbers as two uninterrupted epochs (DataLoader and StatefulDataLoader,
    with set_epoch called as DistributedSampler users do)."""
    make_loader = LOADERS[loader_kind]()
    _, url = request_server("factories:small", *PIPELINES[kind])
    expected = served_epochs(kind, 2)
    dataset = ConnectionDataset(url, seed=5, batches=N, timeout=30)
    loader = make_loader(dataset, batch_size=None)
    assert len(dataset) == len(loader) == N
    received: list[tuple[list[int], int]] = []
    with dataset:
        dataset.set_epoch(0)
        for batch in loader:
            received.append(seen(dataset, batch))
            if len(received) == 2:
                saved = loader.state_dict() if loader_kind == "StatefulDataLoader" else dataset.state_dict()
                break
    assert json.loads(json.dumps(saved)) == saved
    resumed = ConnectionDataset(url, seed=5, batches=N, timeout=30)
    loader = make_loader(resumed, batch_size=None)
    if loader_kind == "StatefulDataLoader":
        loader.load_state_dict(saved)
    else:
        resumed.load_state_dict(saved)
    per_epoch = []
    with resumed:
        for epoch in range(2):
            resumed.set_epoch(epoch)  # the epoch it stands in already: keeps the restored position
            batches = [seen(resumed, batch) for batch in loader]
            per_epoch.append(len(batches))
            received += batches
        assert (resumed.epoch, resumed.position) == (2, 0)
    assert per_epoch == [N - 2, N]
    assert received == expected[0] + expected[1]


@pytest.mark.parametrize("kind", list(PIPELINES), ids=list(PIPELINES))
def test_set_epoch_moves_to_the_start_of_any_epoch(request_server: StartServer, kind: str) -> None:
    """set_epoch(e) jumps (forward or back, mid-epoch or fresh) to the first batch of epoch e; set_epoch of the
    current epoch keeps the position."""
    _, url = request_server("factories:small", *PIPELINES[kind])
    expected = served_epochs(kind, 3)
    with ConnectionDataset(url, seed=5, batches=N, timeout=30) as dataset:
        loader = DataLoader(dataset, batch_size=None)
        dataset.set_epoch(2)
        assert [seen(dataset, batch) for batch in loader] == expected[2]
        dataset.set_epoch(0)
        iterator = iter(loader)
        first = [seen(dataset, next(iterator)) for _ in range(3)]
        dataset.set_epoch(0)
        rest = [seen(dataset, batch) for batch in iterator]
        assert first + rest == expected[0]
        dataset.set_epoch(1)
        assert [seen(dataset, batch) for batch in loader] == expected[1]


def test_a_pipeline_whose_epochs_differ_from_batches_is_refused(request_server: StartServer) -> None:
    """With a pipeline that ends its epochs (10 batches here), batches=4 is refused where the pipeline's epoch ends
    inside one of the dataset's, naming both numbers."""
    _, url = request_server("factories:small", "n=40")
    with ConnectionDataset(url, seed=5, batches=4, timeout=30) as dataset:
        loader = DataLoader(dataset, batch_size=None)
        assert len(list(loader)) == len(list(loader)) == 4
        with pytest.raises(ConfigError, match=r"after 10 batches, 2 batches into epoch 2.*Found: batches=4"):
            list(loader)


def test_batches_none_iterates_the_pipelines_epochs(request_server: StartServer) -> None:
    """batches=None: an iteration is one epoch of a pipeline that ends its epochs; set_epoch(e) starts its epoch e,
    and a resume mid-epoch delivers the rest of it."""
    _, url = request_server("factories:small", "n=40")
    expected = served_epochs("epochs-of-N", 3)
    with ConnectionDataset(url, seed=5, timeout=30) as dataset:
        loader = DataLoader(dataset, batch_size=None)
        assert [seen(dataset, batch) for batch in loader] == expected[0]
        dataset.set_epoch(2)
        iterator = iter(loader)
        head = [seen(dataset, next(iterator)) for _ in range(4)]
        state = dataset.state_dict()
    resumed = ConnectionDataset(url, seed=5, timeout=30, state=state)
    with resumed:
        resumed.set_epoch(2)
        assert head + [seen(resumed, batch) for batch in DataLoader(resumed, batch_size=None)] == expected[2]
        assert resumed.epoch == 3


def test_a_small_cnn_learns_from_the_sample_images(tmp_path: Path, start_process: StartProcess) -> None:
    """A tiny CNN trained through DataLoader(ConnectionDataset) on the generated sample set: the loss falls."""
    folder = make_sample_images(tmp_path / "sample", per_class=10, size=32)
    args = ("-d", folder, "-b", "16", "--size", str(SIZE), "-w", "1", "-q")
    _, url = start_image_server(start_process, "imagenet_dir", tmp_path / "server.log", *args)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(32, 10),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    with ConnectionDataset(url, seed=0, batches=60, device="cpu", timeout=30) as dataset:
        for images, labels in DataLoader(dataset, batch_size=None):
            loss = torch.nn.functional.cross_entropy(model(normalize_images(images)), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert len(losses) == 60
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.2
