# The SwiftLoader README's `loader.start(...)` line, run on tensorcom: only the import line changed
# (`from swift_loader import SwiftLoader` became `from tensorcom.loader import SwiftLoader`).
#
# The README gives the signature `loader.start(consumer_index: int, device: torch.device = None,
# to_device: Callable = None)`; filled in (marked "filled in"): a dataset and a loader to start, and the README's
# three cases: no device (batches stay numpy arrays), a device with the default move (every numpy array or tensor
# moved there), and a device with a `to_device(batch, device)` of one's own, called as the original calls it.
# The device is the first GPU if there is one, else the CPU. One JSON line shows what each consumer received.
# (torch is imported under the main guard only, so the loader's spawned processes, which import this file, start
# without it.)
from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from tensorcom.loader import SwiftLoader

if TYPE_CHECKING:
    import torch


class Dataset:
    """Filled in: sample i is ({"image": 4x4 float32 filled with i}, label i)."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, index: int) -> tuple[dict[str, np.ndarray], int]:
        return {"image": np.full((4, 4), index, np.float32)}, index


def half_precision_to_device(batch: object, device: torch.device) -> object:
    """Filled in: a to_device of one's own, in the original's shape: the whole batch and the device."""
    calls.append(str(device))
    if isinstance(batch, dict):
        return {key: half_precision_to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, list | tuple):
        return [half_precision_to_device(value, device) for value in batch]
    if isinstance(batch, np.ndarray):
        batch = torch.from_numpy(batch)
    return batch.half().to(device, non_blocking=True) if isinstance(batch, torch.Tensor) else batch


calls: list[str] = []


def describe(batch: object) -> object:
    """Filled in: where and what each leaf of a batch is."""
    if isinstance(batch, dict):
        return {key: describe(value) for key, value in batch.items()}
    if isinstance(batch, list | tuple):
        return [describe(value) for value in batch]
    if isinstance(batch, torch.Tensor):
        return f"{batch.dtype} on {batch.device.type}"
    return f"{type(batch).__module__}.{type(batch).__name__} {getattr(batch, 'dtype', '')}".strip()


def first_batch(device: torch.device | None, to_device: Callable | None) -> object:
    """Filled in: a loader started with these arguments, and what its first batch is."""
    loader = SwiftLoader(
        dataset_class=Dataset,
        dataset_kwargs={},
        batch_size=8,
        nb_consumer=1,
        worker_per_consumer=1,
        shuffle=False,
    )
    consumer_index = 0
    loader.start(consumer_index, device=device, to_device=to_device)
    batch = next(iter(loader))
    loader.close()
    return describe(batch)


if __name__ == "__main__":
    import torch

    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")  # filled in
    print(
        json.dumps(
            {
                "device": device.type,
                "no_device": first_batch(None, None),
                "default_move": first_batch(device, None),
                "own_to_device": first_batch(device, half_precision_to_device),
                "own_to_device_called_with": sorted(set(calls)),
            }
        ),
        flush=True,
    )
