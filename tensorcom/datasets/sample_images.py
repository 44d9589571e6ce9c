"""A small generated ImageNet-style folder of real JPEG files, for demos, notebooks and tests.

:func:`make_sample_images` draws ``classes`` visually distinct kinds of picture (a disc, a square, stripes in two
directions, a checkerboard, a triangle, a ring, a cross, dots, a diagonal band), each with random colours, position,
size and noise, and writes them as ``DIR/train/CLASS/NNNN.JPEG``. The files depend only on the arguments, so every
run makes the same dataset; nothing is downloaded. A small CNN learns the classes in a few hundred steps.

Run ``python -m tensorcom.datasets.sample_images DIR`` to make one.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from tensorcom.errors import ConfigError

__all__ = ["SHAPES", "make_sample_images"]


def _disc(
    draw: Any, box: tuple[int, int, int, int], color: tuple[int, ...], rng: np.random.Generator
) -> None:
    draw.ellipse(box, fill=color)


def _square(
    draw: Any, box: tuple[int, int, int, int], color: tuple[int, ...], rng: np.random.Generator
) -> None:
    draw.rectangle(box, fill=color)


def _horizontal_stripes(
    draw: Any, box: tuple[int, int, int, int], color: tuple[int, ...], rng: np.random.Generator
) -> None:
    left, top, right, bottom = box
    step = max(2, (bottom - top) // int(rng.integers(3, 6)))
    for y in range(top, bottom, 2 * step):
        draw.rectangle((left, y, right, min(y + step - 1, bottom)), fill=color)


def _vertical_stripes(
    draw: Any, box: tuple[int, int, int, int], color: tuple[int, ...], rng: np.random.Generator
) -> None:
    left, top, right, bottom = box
    step = max(2, (right - left) // int(rng.integers(3, 6)))
    for x in range(left, right, 2 * step):
        draw.rectangle((x, top, min(x + step - 1, right), bottom), fill=color)


def _checkerboard(
    draw: Any, box: tuple[int, int, int, int], color: tuple[int, ...], rng: np.random.Generator
) -> None:
    left, top, right, bottom = box
    step = max(2, (right - left) // 4)
    for row, y in enumerate(range(top, bottom, step)):
        for column, x in enumerate(range(left, right, step)):
            if (row + column) % 2 == 0:
                draw.rectangle((x, y, min(x + step - 1, right), min(y + step - 1, bottom)), fill=color)


def _triangle(
    draw: Any, box: tuple[int, int, int, int], color: tuple[int, ...], rng: np.random.Generator
) -> None:
    left, top, right, bottom = box
    draw.polygon([((left + right) // 2, top), (right, bottom), (left, bottom)], fill=color)


def _ring(
    draw: Any, box: tuple[int, int, int, int], color: tuple[int, ...], rng: np.random.Generator
) -> None:
    width = max(2, (box[2] - box[0]) // 6)
    draw.ellipse(box, outline=color, width=width)


def _cross(
    draw: Any, box: tuple[int, int, int, int], color: tuple[int, ...], rng: np.random.Generator
) -> None:
    left, top, right, bottom = box
    thickness = max(2, (right - left) // 5)
    middle_x, middle_y = (left + right) // 2, (top + bottom) // 2
    draw.rectangle((middle_x - thickness, top, middle_x + thickness, bottom), fill=color)
    draw.rectangle((left, middle_y - thickness, right, middle_y + thickness), fill=color)


def _dots(
    draw: Any, box: tuple[int, int, int, int], color: tuple[int, ...], rng: np.random.Generator
) -> None:
    left, top, right, bottom = box
    radius = max(1, (right - left) // 10)
    for _ in range(int(rng.integers(6, 12))):
        x, y = int(rng.integers(left, right + 1)), int(rng.integers(top, bottom + 1))
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=color)


def _diagonal(
    draw: Any, box: tuple[int, int, int, int], color: tuple[int, ...], rng: np.random.Generator
) -> None:
    left, top, right, bottom = box
    width = max(2, (right - left) // 4)
    draw.line((left, top, right, bottom), fill=color, width=width)


SHAPES: dict[str, Callable[..., None]] = {
    "disc": _disc,
    "square": _square,
    "hstripes": _horizontal_stripes,
    "vstripes": _vertical_stripes,
    "checkers": _checkerboard,
    "triangle": _triangle,
    "ring": _ring,
    "cross": _cross,
    "dots": _dots,
    "diagonal": _diagonal,
}


def _picture(shape: Callable[..., None], size: int, rng: np.random.Generator) -> Any:
    from PIL import Image, ImageDraw

    background = tuple(int(v) for v in rng.integers(0, 110, 3))
    foreground = tuple(int(v) for v in rng.integers(150, 256, 3))
    image = Image.new("RGB", (size, size), background)
    extent = int(rng.integers(size // 2, size - size // 8))
    left = int(rng.integers(0, size - extent + 1))
    top = int(rng.integers(0, size - extent + 1))
    shape(ImageDraw.Draw(image), (left, top, left + extent - 1, top + extent - 1), foreground, rng)
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (size, size, 3), dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_sample_images(
    directory: str | os.PathLike[str],
    *,
    classes: int = 10,
    per_class: int = 30,
    size: int = 64,
    seed: int = 0,
    quality: int = 90,
) -> str:
    """Write ``classes`` x ``per_class`` JPEG files under ``directory/train/`` and return that directory.

    Class ``k`` is named ``{k:02d}_{shape}`` so the sorted order (the label order) is the class number. Files that
    already exist are kept, so a second call is cheap.
    """
    if not 1 <= classes <= len(SHAPES):
        raise ConfigError(f"classes must be in [1, {len(SHAPES)}]. Found: {classes}")
    if per_class < 1 or size < 8:
        raise ConfigError(f"per_class must be >= 1 and size >= 8. Found: {per_class}, {size}")
    root = os.fspath(directory)
    for number, (name, shape) in enumerate(list(SHAPES.items())[:classes]):
        folder = os.path.join(root, "train", f"{number:02d}_{name}")
        os.makedirs(folder, exist_ok=True)
        for item in range(per_class):
            path = os.path.join(folder, f"{item:04d}.JPEG")
            if os.path.exists(path):
                continue
            rng = np.random.default_rng([seed, number, item])
            temporary = f"{path}.{os.getpid()}.tmp"
            _picture(shape, size, rng).save(temporary, format="JPEG", quality=quality)
            os.replace(temporary, path)
    return root


def main(argv: list[str] | None = None) -> None:
    """``python -m tensorcom.datasets.sample_images DIR [PER_CLASS]``: make the sample folder and print where it is."""
    arguments = sys.argv[1:] if argv is None else argv
    if not 1 <= len(arguments) <= 2:
        raise SystemExit("usage: python -m tensorcom.datasets.sample_images DIR [PER_CLASS]")
    per_class = int(arguments[1]) if len(arguments) > 1 else 30
    root = make_sample_images(arguments[0], per_class=per_class)
    print(f"{root}: {per_class * len(SHAPES)} JPEG files in {len(SHAPES)} classes")  # noqa: T201


if __name__ == "__main__":
    main()
