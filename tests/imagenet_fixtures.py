"""Helpers for the image tests: real JPEG folders and tar shards made with Pillow, and image server processes."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from helpers import StartProcess, wait_ready
from PIL import Image

from tensorcom.datasets.imagenet import ImageDirectory, write_shards

CLASSES = ("cat", "dog", "emu")  # sorted: labels 0, 1, 2
PER_CLASS = 4
CORRUPT = "dog/bad.JPEG"  # sorts after 0000..0003 in its class


def make_image_folder(root: Path, *, corrupt: bool = True, train: bool = True, size: int = 32) -> Path:
    """CLASSES x PER_CLASS real 32x32 JPEGs whose mean colour tells the class, a text file that is not an image,
    and (with ``corrupt``) one file that is not a JPEG at all. Returns the folder to pass as ``-d``."""
    base = root / "train" if train else root
    for label, name in enumerate(CLASSES):
        folder = base / name
        folder.mkdir(parents=True, exist_ok=True)
        for item in range(PER_CLASS):
            rng = np.random.default_rng([label, item])
            pixels = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
            pixels[..., label] += 200  # red, green or blue by class
            Image.fromarray(pixels).save(folder / f"{item:04d}.JPEG", quality=95)
    (base / CLASSES[0] / "README.txt").write_text("not an image")
    if corrupt:
        (base / CORRUPT).write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG" * 4)
    return root


def make_shards(folder: Path, target: Path, per_shard: int = 5) -> str:
    """Write the folder's images as WebDataset shards in index order; return the brace pattern naming them."""
    target.mkdir(parents=True, exist_ok=True)
    paths = write_shards(ImageDirectory(folder), str(target / "train-%03d.tar"), per_shard)
    return str(target / f"train-{{000..{len(paths) - 1:03d}}}.tar")


def start_image_server(
    start_process: StartProcess,
    program: str,
    log_file: Path,
    *args: str,
    url: str = "zrep://127.0.0.1:0",
    env: Mapping[str, str] | None = None,
) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``python -m tensorcom_servers.PROGRAM ARGS URL`` logging to ``log_file`` (with ``env`` added to this
    process's environment); return it and its client URL once it prints "ready"."""
    process = start_process(
        "-m",
        f"tensorcom_servers.{program}",
        *args,
        url,
        stdout=subprocess.PIPE,
        stderr_log=log_file,
        env={**os.environ, **(env or {})},
    )
    return process, wait_ready(process)
