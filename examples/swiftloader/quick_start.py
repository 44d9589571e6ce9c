# The SwiftLoader README's "Quick Start", run on tensorcom: only the import line changed
# (`from swift_loader import SwiftLoader` became `from tensorcom.loader import SwiftLoader`).
#
# Fixed in the seed: the program runs under `if __name__ == "__main__":`, as any program whose worker processes are
# spawned must (the original forks; tensorcom spawns, see docs/swiftloader.md).
# Filled in where the seed leaves the work to the user (marked "filled in"): a `Dataset` class with `__len__` and
# `__getitem__`, its `dataset_kwargs`, `nb_gpu`, `kwargs`, and then what the README says comes next: `start()`,
# one epoch read, and a JSON line showing that the consumer got every sample once, in batches of 32.
#
# With torchrun's variables (`torchrun --nproc_per_node=2 examples/swiftloader/quick_start.py`, CPU is enough),
# each process is one consumer (RANK) of WORLD_SIZE, and each gets its own half of every epoch.
import json
import os

import numpy as np

from tensorcom.loader import SwiftLoader


class Dataset:
    """Filled in: sample i is a small image filled with i and its label i."""

    def __init__(self, size: int, shape: tuple[int, ...]) -> None:
        self.size = size
        self.shape = shape

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return np.full(self.shape, index % 256, np.uint8), index


if __name__ == "__main__":
    dataset_kwargs = {"size": 200, "shape": (3, 8, 8)}  # filled in
    nb_gpu = int(os.environ.get("WORLD_SIZE", "1"))  # filled in: one consumer per GPU (per process)
    kwargs = {}  # filled in: the defaults (the default seed is the same in every consumer's process)

    # fmt: off
    loader = SwiftLoader(
        dataset_class=Dataset,
        dataset_kwargs=dataset_kwargs, # keyword-arguments for dataset construction,
        batch_size=32, # integer defining batch size
        nb_consumer=nb_gpu, # should be the number of GPUs used for training
        worker_per_consumer=4, # number of child processes that loads & batch data for a consumer (a GPU)
        shuffle=True,
        **kwargs,
    )
    # fmt: on

    # filled in: what comes next in the README
    loader.start(int(os.environ.get("RANK", "0")))
    sizes, labels = [], []
    for images, batch_labels in loader:
        sizes.append(len(images))
        labels += [int(label) for label in batch_labels]
    loader.close()
    print(
        json.dumps(
            {
                "consumer": int(os.environ.get("RANK", "0")),
                "nb_consumer": nb_gpu,
                "batches": len(sizes),
                "len": len(loader),
                "batch_sizes": sizes,
                "labels": labels,
            }
        ),
        flush=True,
    )
