"""tensorshow: a labelled grid of the images in the next batches from one or more URLs."""

from __future__ import annotations

import math
import os
import sys

import click
import numpy as np

from tensorcom.cli import TensorcomCommand, check_output_path, version_option
from tensorcom.errors import ConfigError
from tensorcom.monitoring.grids import (
    LAYOUTS,
    NORMALISATIONS,
    find_image_array,
    find_label_array,
    load_class_names,
    make_grid,
    require_pillow,
    to_display_images,
)
from tensorcom_tools._connect import HELP_OPTIONS, connection_options, open_connection, refused_option

DEFAULT_OUTPUT = "tensorshow.png"
DEFAULT_URLS = ("zsub://127.0.0.1:788{0..3}",)
"""tensorcom 0.1's tensorshow read the four publishers on ports 7880 to 7883 of this host when given no URL."""
MODES = ("imgclass", "img2img")


def has_display() -> bool:
    """Whether a window can be opened: an X or Wayland display, or a desktop platform that always has one."""
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")) or sys.platform in (
        "darwin",
        "win32",
    )


@click.command(cls=TensorcomCommand, context_settings=HELP_OPTIONS)
@version_option("tensorshow")
@connection_options(
    DEFAULT_URLS,
    timeout_note=" (tensorcom 0.1's --timeout -1 waited for a click between images; here the grid stays until "
    "you close it: drop it)",
)
@click.option(
    "-n", "--count", type=click.IntRange(min=1), default=1, show_default=True, help="Batches to show."
)
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False), default=None, help="Write the grid to this PNG file."
)
@click.option(
    "-m",
    "--mode",
    type=click.Choice(MODES),
    default="imgclass",
    show_default=True,
    help="imgclass: images captioned with their classes; img2img: the images of two arrays side by side, in "
    "pairs (tensorcom 0.1's -m).",
)
@click.option(
    "-b",
    "--unbatched",
    is_flag=True,
    help="Each message is one sample, not a batch (tensorcom 0.1's -b): an image and its label.",
)
@click.option(
    "-B",
    "--perbatch",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Show at most N images of each batch (tensorcom 0.1's -B) [default: all].",
)
@click.option(
    "-C",
    "--classes",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="JSON file of class names (default: the names a zreq server sends, if any). -C is tensorcom 0.1's "
    "spelling.",
)
@refused_option(
    "-t",
    reason="tensorcom 0.1's seconds each image stayed on screen; tensorshow now draws all the images at once, in "
    "one grid that stays until you close it: drop -t (--timeout here is the seconds to wait for a batch)",
    help="tensorcom 0.1's seconds per image: refused, the grid shows every image at once. Not --timeout, which "
    "here is the seconds to wait for a batch.",
    metavar="SECONDS",
)
@click.option(
    "--index",
    type=click.IntRange(min=0),
    default=None,
    help="Array holding the images (default: first 3-D/4-D).",
)
@click.option(
    "--label-index",
    type=click.IntRange(min=-1),
    default=None,
    help="Array holding the labels (default: first 1-D integer array; -1: no labels).",
)
@click.option("--layout", type=click.Choice(LAYOUTS), default="auto", show_default=True, help="Image layout.")
@click.option(
    "--normalise",
    type=click.Choice(NORMALISATIONS),
    default="auto",
    show_default=True,
    help="How float images map to pixels (auto: [0,1], [0,255], ImageNet mean/std, else min-max per image).",
)
@click.option(
    "--max-images", type=click.IntRange(min=1), default=64, show_default=True, help="Images at most."
)
@click.option(
    "--columns", type=click.IntRange(min=1), default=None, help="Grid columns (default: near square)."
)
@click.option(
    "--scale", type=click.IntRange(min=1), default=None, help="Whole zoom factor (default: to ~96 px)."
)
def main(
    urls: tuple[str, ...],
    timeout: float,
    seed: int | None,
    rank: int | None,
    world_size: int | None,
    count: int,
    output: str | None,
    mode: str,
    unbatched: bool,
    perbatch: int | None,
    classes: str | None,
    index: int | None,
    label_index: int | None,
    layout: str,
    normalise: str,
    max_images: int,
    columns: int | None,
    scale: int | None,
) -> None:
    """Show the images of the next --count batches from URLS in a grid, labelled with their classes.

    Writes a PNG when --output is given or no display is available (to tensorshow.png), opens a window otherwise.
    Images may be NHWC or NCHW, uint8 or float (normalised for display), colour or greyscale. Captions are class
    names from --classes, else those a zreq server sends (serve-imagenet-dir sends its class folder names; stream
    servers send none), else the label values. With --mode img2img, each image of the first image array is shown
    beside the same image of the next one (input and target), captioned with its number and array position.

    With no URLS it reads zsub://127.0.0.1:788{0..3}, as tensorcom 0.1 did; several URLS (or a brace URL) are read
    together. tensorcom 0.1's flags: -b, -m, -B N, -C FILE; -t is refused (0.1's seconds per image), and --timeout
    keeps its meaning here: the seconds to wait for a batch.
    """
    if mode == "img2img":
        for given, name in ((label_index, "--label-index"), (classes, "-C/--classes")):
            if given is not None:
                raise ConfigError(f"{name}: not used with --mode img2img, whose pairs carry no labels")
    require_pillow()  # before connecting: a missing Pillow or an unwritable output fails at once
    path = output if output is not None else None if has_display() else DEFAULT_OUTPUT  # None: a window
    if path is not None:
        check_output_path(path, "--output")
    names = load_class_names(classes) if classes else {}
    named_by = "--classes" if classes else ""
    images: list[np.ndarray] = []
    labels: list[str] = []
    with open_connection(urls, timeout, seed=seed, rank=rank, world_size=world_size) as connection:
        sent = getattr(connection, "class_names", None)  # what a zreq server sent when the connection opened
        if not classes and sent:
            names, named_by = dict(enumerate(sent)), "the server"
        for _ in range(count):
            batch = [np.asarray(array) for array in connection.recv()]
            if unbatched:
                batch = [array[np.newaxis] for array in batch]
            if mode == "img2img":
                shown, texts = _pairs(batch, index, layout, normalise, perbatch)
                images.append(shown)
                labels += texts
                continue
            position = find_image_array(batch) if index is None else index
            if position >= len(batch):
                raise ConfigError(f"--index {position}: the batch has only {len(batch)} arrays")
            found = find_label_array(batch, position) if label_index is None else label_index
            shown = to_display_images(batch[position], layout=layout, normalisation=normalise)[:perbatch]
            images.append(shown)
            if found is not None and found >= 0:
                if found >= len(batch):
                    raise ConfigError(f"--label-index {found}: the batch has only {len(batch)} arrays")
                labels += _label_texts(batch[found], len(shown), names)
            else:
                labels += [""] * len(shown)
    sizes = {image.shape[1:] for image in images}
    if len(sizes) > 1:
        raise ConfigError(f"the batches hold images of different sizes: {sorted(sizes)}")
    grid_images = np.concatenate(images)[:max_images]
    grid_labels = labels[:max_images] if any(labels) else None
    if mode == "img2img" and columns is None:
        columns = 2 * math.ceil(math.sqrt(len(grid_images) / 2))  # whole pairs on each row
    picture, grid = make_grid(grid_images, grid_labels, columns=columns, scale=scale)
    what = "image pairs" if mode == "img2img" else "images"
    shown_count = grid.count // 2 if mode == "img2img" else grid.count
    description = f"{shown_count} {what} from {count} batch{'es' if count > 1 else ''} in a {grid.columns}x{grid.rows} grid, {grid.size[0]}x{grid.size[1]} px"
    if grid_labels is not None and named_by and mode == "imgclass":
        description += f", captioned with class names from {named_by}"
    if path is None:
        picture.show(title="tensorshow")
        click.echo(f"showing {description}")
        return
    try:
        picture.save(path, format="PNG")
    except OSError as error:
        raise ConfigError(f"cannot write {path!r}: {error}") from error
    click.echo(f"wrote {path}: {description}")


def _pairs(
    batch: list[np.ndarray], index: int | None, layout: str, normalise: str, perbatch: int | None
) -> tuple[np.ndarray, list[str]]:
    """img2img: the images of the first image array (or --index) and of the next image array after it,
    interleaved (first, second, first, second, ...), each captioned "NUMBER [POSITION]"; a smaller image is
    padded with black to the larger's size."""
    first = find_image_array(batch) if index is None else index
    if first >= len(batch):
        raise ConfigError(f"--index {first}: the batch has only {len(batch)} arrays")
    rest = batch[first + 1 :]
    try:
        second = first + 1 + find_image_array(rest)
    except ConfigError:
        shapes = ", ".join(str(array.shape) for array in batch)
        raise ConfigError(
            f"--mode img2img needs a second image array after array {first}. Found shapes: {shapes}"
        ) from None
    left = to_display_images(batch[first], layout=layout, normalisation=normalise)
    right = to_display_images(batch[second], layout=layout, normalisation=normalise)
    count = min(len(left), len(right), perbatch or len(left))
    height = max(left.shape[1], right.shape[1])
    width = max(left.shape[2], right.shape[2])
    pairs = np.zeros((count, 2, height, width, 3), dtype=np.uint8)
    pairs[:, 0, : left.shape[1], : left.shape[2]] = left[:count]
    pairs[:, 1, : right.shape[1], : right.shape[2]] = right[:count]
    texts = [f"{number} [{position}]" for number in range(count) for position in (first, second)]
    return pairs.reshape(2 * count, height, width, 3), texts


def _label_texts(values: np.ndarray, count: int, names: dict[int, str]) -> list[str]:
    """One text per image: the class name where known, else the value; blank for images without a value."""
    flat = values.reshape(-1)[:count]
    integer = flat.dtype.kind in "iu"
    texts = [names.get(int(v), str(v)) if integer else str(v) for v in flat.tolist()]
    return texts + [""] * (count - len(texts))


if __name__ == "__main__":
    main()
