# The Conveyer README's "Usage" program, run on tensorcom: only the import line changed
# (`from conveyer import ...` became `from tensorcom.pipeline import ...`).
#
# Typos fixed in the seed: `os.glob` does not exist, so `glob.glob` (with `import glob`); a stray `)` after
# "when you need to resume ...".
# Filled in where the seed leaves the work to the user (each part marked "filled in"):
# - load_image: Pillow decodes a real JPEG. The seed's Permutation yields indices, so the `path` it receives is an
#   index into the sorted file list;
# - the images: 40 small JPEGs generated in a temporary folder, which the program runs in, so the seed's
#   'path/to/images/*.jpg' is used as written;
# - the process group dist.get_rank() needs: gloo, with torchrun's variables (`torchrun --nproc_per_node=2
#   examples/conveyer/usage.py`) or a world of one;
# - `Conveyer(...)`: the same stages again;
# - at the end, the seed's promises checked and printed as one JSON line per rank: every rank gets distinct data,
#   the state is the same on every rank, and the rebuilt pipeline's next batch is the one the first would have
#   given.
import glob
import json
import os
import tempfile

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from tensorcom.pipeline import Collate, Conveyer, DistributedBatchedMap, Partition, Permutation

IMAGES_VARIABLE = "CONVEYER_EXAMPLE_IMAGES"  # filled in: where the worker processes find the images


def load_image(path: str) -> dict[str, torch.Tensor]:
    # up to you to implement this.
    # filled in: `path` is the index the Permutation gave; decode that file
    files = sorted(glob.glob(os.path.join(os.environ[IMAGES_VARIABLE], "*.jpg")))
    with Image.open(files[path]) as image:
        return dict(image=torch.from_numpy(np.array(image.convert("RGB"))))


def make_images(folder: str, count: int = 40) -> None:
    """Filled in: JPEG number i is filled with the value i, so a batch shows which files it holds."""
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        Image.fromarray(np.full((16, 16, 3), i, np.uint8)).save(
            os.path.join(folder, f"{i:04d}.jpg"), quality=95
        )


def init_distributed() -> None:
    """Filled in: a gloo process group from torchrun's variables, or a world of one."""
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    else:
        dist.init_process_group(
            "gloo", init_method=f"file://{os.path.abspath('store')}", rank=0, world_size=1
        )


# fmt: off
if __name__ == '__main__':
    workdir = tempfile.TemporaryDirectory(prefix="conveyer-example-")  # filled in
    os.chdir(workdir.name)  # filled in
    make_images("path/to/images")  # filled in
    os.environ[IMAGES_VARIABLE] = os.path.abspath("path/to/images")  # filled in
    init_distributed()  # filled in

    all_files = glob.glob('path/to/images/*.jpg')
    pipeline = Conveyer([
        # We want a random permutation of all available files.
        Permutation(len(all_files)),
        # Each GPU gets its own partition of that permutation. This must always occur before distributed work!
        Partition(dist.get_rank(), dist.get_world_size()),
        # Load images in parallel.
        DistributedBatchedMap(load_image, n_workers=4),
        # Collage several images into a batch.
        Collate(batch_size=8),
    ])

    # Grab a batch! Note that every rank gets distinct data.
    batch = pipeline()
    first_indices = pipeline.last_indices  # filled in
    # ... do some training or whatever ...
    state = pipeline.state()
    torch.save(state, "dataset_state.pt")  # The same state is shared across ranks.
    expected = pipeline()  # filled in: what the first pipeline gives next
    expected_indices = pipeline.last_indices  # filled in
    pipeline.close()  # filled in: stop its worker processes
    # ... when you need to resume ...
    pipeline = Conveyer([  # filled in: the same stages
        Permutation(len(all_files)),
        Partition(dist.get_rank(), dist.get_world_size()),
        DistributedBatchedMap(load_image, n_workers=4),
        Collate(batch_size=8),
    ])
    pipeline.load_state(torch.load("dataset_state.pt"))
    # fmt: on

    # filled in: the promises, shown
    resumed = pipeline()
    pixels = [int(value) for value in batch["image"][:, 0, 0, 0]]
    print(json.dumps({
        "rank": dist.get_rank(),
        "world_size": dist.get_world_size(),
        "files": len(all_files),
        "first_batch": first_indices,
        "first_batch_pixels": pixels,
        "state": state,
        "resumed_batch": pipeline.last_indices,
        "resumed_equals_expected": pipeline.last_indices == expected_indices
        and torch.equal(resumed["image"], expected["image"]),
    }), flush=True)
    pipeline.close()
    dist.destroy_process_group()
    os.chdir(os.path.dirname(workdir.name))
    workdir.cleanup()
