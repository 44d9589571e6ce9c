# The image pipeline of SPDL's "Pipeline Stages" document (source -> download -> batch -> decode, resize and send to
# the GPU -> sink), run on tensorcom: only the import line changed (`from spdl.dataloader import PipelineBuilder`
# became `from tensorcom.pipeline import PipelineBuilder`), and the doctest prompts became a script.
#
# Typos fixed in the seed: `PipelineBuiler` -> `PipelineBuilder`; `spdl.io.async_load_image_batch` is a coroutine,
# so `process` awaits it; `Iterator` and `Tensor`, used in the annotations, are imported.
# Filled in where the seed leaves the work to the user (marked "filled in"):
# - `source()` and `download()`: file:// URLs of 70 real JPEG files generated in a temporary folder, fetched with
#   urllib in a thread (a real download, on a local "server");
# - `spdl.io`'s GPU decoding (not part of tensorcom): the smallest stand-in with the same three calls, Pillow
#   decoding and resizing in threads, batched as uint8 NCHW, on the GPU named by `cuda_config` if there is one
#   (else the CPU);
# - consuming the pipeline as SPDL users do (`auto_stop()`, `get_iterator(timeout=...)`), with one JSON line
#   describing the batches.
import asyncio
import atexit
import io
import json
import shutil
import tempfile
import types
import urllib.request
from collections.abc import Iterator  # fixed: used below
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor  # fixed: used below

from tensorcom.pipeline import PipelineBuilder

IMAGES = Path(tempfile.mkdtemp(prefix="spdl-images-"))  # filled in: where the generated JPEG files are
atexit.register(shutil.rmtree, IMAGES, True)  # filled in: removed at exit
COUNT = 70  # filled in


def make_images() -> None:
    """Filled in: JPEG files of different sizes; file i is filled with the value i."""
    for i in range(COUNT):
        size = (40 + i % 5 * 20, 30 + i % 7 * 10)
        Image.fromarray(np.full((size[1], size[0], 3), i, np.uint8)).save(IMAGES / f"{i:03d}.jpg", quality=95)


async def _decode_resized(data: bytes, width: int, height: int) -> np.ndarray:
    def decode() -> np.ndarray:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB").resize((width, height))).transpose(2, 0, 1)

    return await asyncio.to_thread(decode)


async def _async_load_image_batch(
    data: list[bytes], width: int, height: int, cuda_config: dict[str, int] | None = None
) -> tuple[np.ndarray, str]:
    frames = await asyncio.gather(*(_decode_resized(item, width, height) for item in data))
    cuda = cuda_config is not None and torch.cuda.is_available()
    return np.stack(frames), f"cuda:{cuda_config['device_index']}" if cuda else "cpu"


def _to_torch(buffer: tuple[np.ndarray, str]) -> Tensor:
    array, device = buffer
    return torch.from_numpy(array).to(device, non_blocking=True)


# filled in: the three calls of spdl.io the example makes (instead of `import spdl.io`)
spdl = types.SimpleNamespace(
    io=types.SimpleNamespace(
        async_load_image_batch=_async_load_image_batch,
        cuda_config=lambda device_index: {"device_index": device_index},
        to_torch=_to_torch,
    )
)


def source() -> Iterator[str]:
    """Returns the list of URLs to fetch data from"""
    for path in sorted(IMAGES.glob("*.jpg")):  # filled in
        yield path.as_uri()


async def download(url: str) -> bytes:
    """Download data from the given URL"""

    def fetch() -> bytes:  # filled in
        with urllib.request.urlopen(url) as response:
            return response.read()

    return await asyncio.to_thread(fetch)


async def process(data: list[bytes]) -> Tensor:
    """Given raw image data, decode, resize, batch and transfer data to GPU"""
    buffer = await spdl.io.async_load_image_batch(  # fixed: awaited
        data,
        width=224,
        height=224,
        cuda_config=spdl.io.cuda_config(device_index=0),
    )
    return spdl.io.to_torch(buffer)


if __name__ == "__main__":
    make_images()  # filled in

    # fmt: off
    pipeline = (
        PipelineBuilder()
        .add_source(source())
        .pipe(download)
        .aggregate(32)
        .pipe(process)
        .add_sink(4)
        .build()
    )
    # fmt: on

    # filled in: consume it as SPDL users do
    batches = []
    with pipeline.auto_stop():
        for batch in pipeline.get_iterator(timeout=120):
            batches.append(batch)
    print(
        json.dumps(
            {
                "shapes": [list(batch.shape) for batch in batches],
                "dtype": str(batches[0].dtype),
                "devices": sorted({batch.device.type for batch in batches}),
                "cuda_available": torch.cuda.is_available(),
                "first_values": [int(value) for batch in batches for value in batch[:, 0, 112, 112]],
            }
        ),
        flush=True,
    )
