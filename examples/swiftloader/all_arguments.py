# The SwiftLoader README's "All Arguments", run on tensorcom: only the import line changed
# (`from swift_loader import SwiftLoader` became `from tensorcom.loader import SwiftLoader`).
#
# Every keyword argument the README lists, spelt as there (`seed_numer` included) and set to the README's default
# where it gives one. Where tensorcom differs (docs/migrating.md lists why):
# - `seed_numer`: the README's default is the time in ms, which differs between consumers' processes; here a fixed
#   number, the same in every process (tensorcom's default, without the argument, is 0);
# - `batch_encoder` / `batch_decoder`: the README's default is dill; here pickle (dill is no dependency of
#   tensorcom, and without these two arguments batches travel as .ten arrays and nothing is pickled);
# - `logger`: a dict with the README's keys, writing to a temporary folder;
# - `benchmark_file`: a file in that folder.
# Filled in (marked "filled in"): the dataset, the folder, `start()`, one epoch, and a JSON line with what the log
# file and the benchmark file received.
import json
import os
import pickle
import tempfile

import numpy as np

from tensorcom.loader import SwiftLoader


class Dataset:
    """Filled in: sample i is (a 2x2 int32 array filled with i, label i)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return np.full((2, 2), index, np.int32), index


if __name__ == "__main__":
    folder = tempfile.TemporaryDirectory(prefix="swiftloader-example-")  # filled in
    batch_size, worker_per_consumer, data_queue_size = 16, 2, 10  # filled in

    loader = SwiftLoader(
        dataset_class=Dataset,
        dataset_kwargs={"size": 100},
        batch_size=batch_size,
        nb_consumer=1,
        worker_per_consumer=worker_per_consumer,
        shuffle=True,
        seed_numer=20231112,
        data_queue_size=data_queue_size,
        message_queue_size=10,
        collate_fn=None,
        logger={"path": os.path.join(folder.name, "run"), "stdout": False, "level": "INFO"},
        batch_encoder=pickle.dumps,
        batch_decoder=pickle.loads,
        nearby_shuffle=5 * batch_size,
        benchmark=True,
        benchmark_file=os.path.join(folder.name, "benchmark.jsonl"),
        validate=True,
        multithread=True,
        max_nb_batch_on_device=1,
        max_buffer_size=max(2, data_queue_size // worker_per_consumer),
    )

    # filled in: one epoch, then what the files received
    loader.start(0)
    labels = [int(label) for _, batch_labels in loader for label in batch_labels]
    loader.close()
    with open(os.path.join(folder.name, "run_consumer0.log"), encoding="utf-8") as log:
        log_lines = log.read().splitlines()
    with open(os.path.join(folder.name, "benchmark.jsonl"), encoding="utf-8") as benchmark:
        records = [json.loads(line) for line in benchmark]
    print(
        json.dumps(
            {
                "seed": loader.seed,
                "labels_once_each": sorted(labels) == list(range(100)),
                "log_mentions_seed": any("seed=20231112" in line for line in log_lines),
                "benchmark_records": [
                    {key: record[key] for key in ("epoch", "complete", "batches", "samples")}
                    for record in records
                ],
            }
        ),
        flush=True,
    )
    folder.cleanup()
