"""Turn image batches into pictures people can look at: what ``tensorshow`` draws.

:func:`to_display_images` brings a batch in any common layout (NHWC, NCHW, greyscale NHW / NHW1 / N1HW) and type
(uint8, float in [0, 1] or [0, 255], ImageNet-normalised float, anything else by min-max) to uint8 NHWC RGB.
:class:`GridLayout` places images in a grid with a label strip under each, and :func:`make_grid` draws it with
Pillow (imported on first use; it comes with the ``tools`` extra).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tensorcom.datasets import imagenet
from tensorcom.errors import ConfigError

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LAYOUTS",
    "NORMALISATIONS",
    "GridLayout",
    "find_image_array",
    "find_label_array",
    "load_class_names",
    "make_grid",
    "require_pillow",
    "to_display_images",
]

IMAGENET_MEAN = np.array(imagenet.IMAGENET_MEAN)
IMAGENET_STD = np.array(imagenet.IMAGENET_STD)
# ImageNet-normalised pixels lie in [(0 - mean) / std, (1 - mean) / std] = about [-2.12, 2.64]
_IMAGENET_RANGE = (
    float(np.min(-IMAGENET_MEAN / IMAGENET_STD)),
    float(np.max((1 - IMAGENET_MEAN) / IMAGENET_STD)),
)
_CHANNELS = (1, 3, 4)
LAYOUTS = ("auto", "nhwc", "nchw")
NORMALISATIONS = ("auto", "minmax", "unit", "imagenet", "none")


def require_pillow() -> Any:
    """Import Pillow's Image module, or explain how to install it."""
    try:
        from PIL import Image
    except ImportError as error:  # pragma: no cover - Pillow is part of the tools and test extras
        raise ConfigError("drawing pictures needs Pillow: pip install 'tensorcom[tools]'") from error
    return Image


def _is_image_shape(shape: tuple[int, ...]) -> bool:
    return len(shape) == 3 or (len(shape) == 4 and (shape[-1] in _CHANNELS or shape[1] in _CHANNELS))


def find_image_array(batch: Sequence[Any]) -> int:
    """The position of the first array in the batch that looks like a batch of images (3-D, or 4-D with 1, 3 or
    4 channels first or last)."""
    for position, array in enumerate(batch):
        if _is_image_shape(tuple(getattr(array, "shape", ()))):
            return position
    shapes = ", ".join(str(tuple(getattr(a, "shape", ()))) for a in batch)
    raise ConfigError(
        f"no array in the batch looks like images (N,H,W[,C] or N,C,H,W). Found shapes: {shapes}"
    )


def find_label_array(batch: Sequence[Any], images: int) -> int | None:
    """The position of the first 1-D integer array with one entry per image, or None if there is none."""
    count = np.asarray(batch[images]).shape[0]
    for position, array in enumerate(batch):
        value = np.asarray(array)
        if position != images and value.ndim == 1 and value.dtype.kind in "iu" and value.shape[0] == count:
            return position
    return None


def _to_nhwc(array: np.ndarray, layout: str) -> np.ndarray:
    if layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {', '.join(LAYOUTS)}. Found: {layout!r}")
    if array.ndim == 3:
        return array[..., np.newaxis]
    if array.ndim != 4:
        raise ConfigError(f"images must be 3-D (N,H,W) or 4-D (NHWC or NCHW). Found shape {array.shape}")
    if layout == "auto":
        layout = "nhwc" if array.shape[-1] in _CHANNELS else "nchw"
    if layout == "nchw":
        array = array.transpose(0, 2, 3, 1)
    if array.shape[-1] not in _CHANNELS:
        raise ConfigError(f"images must have 1, 3 or 4 channels. Found shape {array.shape} read as {layout}")
    return array


def _choose_normalisation(values: np.ndarray, channels: int) -> str:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return "minmax"
    low, high = float(finite.min()), float(finite.max())
    if low >= 0 and high <= 1:
        return "unit"
    if low >= 0 and high <= 255:
        return "none"
    if channels == 3 and _IMAGENET_RANGE[0] - 0.01 <= low < 0 and high <= _IMAGENET_RANGE[1] + 0.01:
        return "imagenet"
    return "minmax"


def to_display_images(array: Any, *, layout: str = "auto", normalisation: str = "auto") -> np.ndarray:
    """Return a batch of images as uint8 NHWC with 3 channels (greyscale repeated, alpha dropped).

    ``layout``: "nhwc", "nchw", or "auto" (4-D arrays whose last axis has 1, 3 or 4 entries are NHWC, others NCHW;
    3-D arrays are greyscale NHW). uint8 images are shown as they are; others are mapped by ``normalisation``:
    "unit" scales [0, 1] by 255, "none" clips to [0, 255], "imagenet" undoes the ImageNet mean/std normalisation,
    "minmax" stretches each image from its own minimum to its maximum, and "auto" picks the first that fits the
    batch's range in that order (ImageNet only for 3 channels, min-max otherwise). NaN and Inf show as black.
    """
    if normalisation not in NORMALISATIONS:
        raise ConfigError(
            f"normalisation must be one of {', '.join(NORMALISATIONS)}. Found: {normalisation!r}"
        )
    images = _to_nhwc(np.asarray(array), layout)
    if images.shape[-1] == 4:
        images = images[..., :3]
    if images.dtype != np.uint8:
        values = images.astype(np.float64)
        mode = _choose_normalisation(values, images.shape[-1]) if normalisation == "auto" else normalisation
        if mode == "unit":
            values = values * 255
        elif mode == "imagenet":
            if images.shape[-1] != 3:
                raise ConfigError(f"ImageNet normalisation needs 3 channels. Found shape {images.shape}")
            values = (values * IMAGENET_STD + IMAGENET_MEAN) * 255
        elif mode == "minmax":
            values = _stretch_each(values)
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        images = np.rint(np.clip(values, 0, 255)).astype(np.uint8)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return np.ascontiguousarray(images)


def _stretch_each(values: np.ndarray) -> np.ndarray:
    """Rescale every image to [0, 255] by its own finite minimum and maximum (a flat image becomes black)."""
    result = np.zeros_like(values)
    for index, image in enumerate(values):
        finite = image[np.isfinite(image)]
        if finite.size == 0:
            continue
        low, high = float(finite.min()), float(finite.max())
        if high > low:
            result[index] = (image - low) * (255 / (high - low))
    return result


def load_class_names(path: str | os.PathLike[str]) -> dict[int, str]:
    """Read class names from JSON: a list (index i names class i) or an object keyed by class number, whose values
    are names or lists ending with the name (as in ImageNet's ``{"0": ["n01440764", "tench"], ...}``)."""
    try:
        with open(path, encoding="utf-8") as stream:
            data = json.load(stream)
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read class names from {os.fspath(path)!r}: {error}") from error
    items: list[tuple[Any, Any]]
    if isinstance(data, list):
        items = list(enumerate(data))
    elif isinstance(data, Mapping):
        items = list(data.items())
    else:
        raise ConfigError(
            f"{os.fspath(path)!r}: expected a JSON list or object of class names. Found: {data!r:.60}"
        )
    names: dict[int, str] = {}
    for key, value in items:
        if isinstance(value, list) and value:
            value = value[-1]
        try:
            names[int(key)] = str(value)
        except ValueError as error:
            raise ConfigError(f"{os.fspath(path)!r}: class keys must be integers. Found: {key!r}") from error
    return names


@dataclass(frozen=True)
class GridLayout:
    """Where each image goes in a grid: cells of ``padding`` around the (scaled) image, a label strip below it."""

    count: int
    image_height: int
    image_width: int
    columns: int
    padding: int = 2
    label_height: int = 0

    def __post_init__(self) -> None:
        for name in ("count", "image_height", "image_width", "columns"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1. Found: {getattr(self, name)}")
        if self.padding < 0 or self.label_height < 0:
            raise ConfigError(
                f"padding and label_height must be >= 0. Found: {self.padding}, {self.label_height}"
            )

    @property
    def rows(self) -> int:
        return math.ceil(self.count / self.columns)

    @property
    def cell_width(self) -> int:
        return self.image_width + 2 * self.padding

    @property
    def cell_height(self) -> int:
        return self.image_height + 2 * self.padding + self.label_height

    @property
    def size(self) -> tuple[int, int]:
        """The picture's (width, height) in pixels."""
        return self.columns * self.cell_width, self.rows * self.cell_height

    def image_origin(self, index: int) -> tuple[int, int]:
        """The (x, y) of the top-left pixel of image ``index`` (images fill rows left to right)."""
        row, column = divmod(index, self.columns)
        return column * self.cell_width + self.padding, row * self.cell_height + self.padding


def make_grid(
    images: np.ndarray,
    labels: Sequence[str] | None = None,
    *,
    columns: int | None = None,
    scale: int | None = None,
    min_size: int = 96,
) -> tuple[Image.Image, GridLayout]:
    """Draw uint8 NHWC RGB images in a grid, each with its label (if given) underneath; return the picture and
    its layout. ``columns`` defaults to a near-square grid; ``scale`` (a whole factor, nearest-neighbour) defaults
    to the smallest that makes an image at least ``min_size`` pixels on its longer side."""
    pillow = require_pillow()
    from PIL import ImageDraw

    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or len(images) == 0:
        raise ConfigError(
            f"make_grid needs a non-empty uint8 NHWC RGB batch. Found {images.dtype} {images.shape}"
        )
    if labels is not None and len(labels) != len(images):
        raise ConfigError(f"need one label per image: {len(images)} images, {len(labels)} labels")
    count, height, width, _ = images.shape
    if scale is None:
        scale = max(1, math.ceil(min_size / max(height, width)))
    if scale < 1:
        raise ConfigError(f"scale must be >= 1. Found: {scale}")
    columns = columns or math.ceil(math.sqrt(count))
    layout = GridLayout(count, height * scale, width * scale, columns, label_height=14 if labels else 0)
    picture = pillow.new("RGB", layout.size, (255, 255, 255))
    draw = ImageDraw.Draw(picture)
    for index, image in enumerate(images):
        if scale > 1:
            image = image.repeat(scale, axis=0).repeat(scale, axis=1)
        x, y = layout.image_origin(index)
        picture.paste(pillow.fromarray(image, "RGB"), (x, y))
        if labels:
            text = _fit(draw, labels[index], layout.cell_width - 2)
            draw.text((x, y + layout.image_height + layout.padding), text, fill=(0, 0, 0))
    return picture, layout


def _fit(draw: Any, text: str, width: int) -> str:
    """Shorten text with an ellipsis until it fits ``width`` pixels."""
    if draw.textlength(text) <= width:
        return text
    while text and draw.textlength(text + "...") > width:
        text = text[:-1]
    return text + "..." if text else ""
