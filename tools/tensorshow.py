"""tensorshow: a labelled grid of the images in the next batches from one or more URLs."""

from __future__ import annotations

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
from tensorcom_tools._connect import connection_options, open_connection

DEFAULT_OUTPUT = "tensorshow.png"


def has_display() -> bool:
    """Whether a window can be opened: an X or Wayland display, or a desktop platform that always has one."""
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")) or sys.platform in (
        "darwin",
        "win32",
    )


@click.command(cls=TensorcomCommand)
@version_option("tensorshow")
@connection_options
@click.option(
    "-n", "--count", type=click.IntRange(min=1), default=1, show_default=True, help="Batches to show."
)
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False), default=None, help="Write the grid to this PNG file."
)
@click.option(
    "--classes",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="JSON file of class names (default: the names a zreq server sends, if any).",
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
    servers send none), else the label values.
    """
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
            position = find_image_array(batch) if index is None else index
            if position >= len(batch):
                raise ConfigError(f"--index {position}: the batch has only {len(batch)} arrays")
            found = find_label_array(batch, position) if label_index is None else label_index
            shown = to_display_images(batch[position], layout=layout, normalisation=normalise)
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
    picture, grid = make_grid(grid_images, grid_labels, columns=columns, scale=scale)
    description = f"{grid.count} images from {count} batch{'es' if count > 1 else ''} in a {grid.columns}x{grid.rows} grid, {grid.size[0]}x{grid.size[1]} px"
    if grid_labels is not None and named_by:
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


def _label_texts(values: np.ndarray, count: int, names: dict[int, str]) -> list[str]:
    """One text per image: the class name where known, else the value; blank for images without a value."""
    flat = values.reshape(-1)[:count]
    integer = flat.dtype.kind in "iu"
    texts = [names.get(int(v), str(v)) if integer else str(v) for v in flat.tolist()]
    return texts + [""] * (count - len(texts))


if __name__ == "__main__":
    main()
