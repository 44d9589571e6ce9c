"""ImageNet-style image datasets served deterministically: indexing, decoding, augmentation and pipelines.

Two sources of labelled images, each indexed once into a fixed, sorted order:

- :class:`ImageDirectory`: ``DIR/train/CLASS/*`` (or ``DIR/CLASS/*``). Classes are the sorted sub-folder names and
  labels are their 0-based positions (tensorcom 0.1 sent label - 1, a bug not repeated here). Files are sorted by
  their path relative to the class folder; only image extensions count.
- :class:`ImageShards`: local tar files in the WebDataset layout (``KEY.jpg`` + ``KEY.cls`` per sample). Shards
  are read in the order given (after brace expansion), members in tar order; ``.cls`` holds the 0-based label.
  :func:`write_shards` turns any dataset into such shards, in the same sample order.

:class:`ImageTransform` decodes one sample and augments it for training: a random resized crop (area 0.08-1,
aspect ratio 3/4-4/3, as torchvision's) and a horizontal flip, every random number drawn from the pipeline's
per-sample generator, so a zreq stream is a pure function of (seed, epoch, rank, world size, step). JPEGs are
decoded at 1/2, 1/4 or 1/8 scale when the crop still covers the output size at that scale (simplejpeg where
installed, with libjpeg's fast chroma upsampling; else Pillow's draft mode), see :class:`ImageTransform` for what
that changes; crop, resize and flip are one OpenCV warp where OpenCV is installed (box-averaged when the crop is
over 1.25 times the output, keeping Pillow's antialiasing), else one Pillow ``resize``. Output is uint8 HWC (or
float32 normalised with the ImageNet mean and standard deviation) and an int64 label; :func:`image_pipeline` writes
each image straight into its batch array.

**Unreadable images.** A sample whose file cannot be read or decoded is replaced by the next readable sample in
index order (``i + 1``, ``i + 2``, ... modulo the dataset size), with the augmentation parameters sample ``i``
would have had and the replacement's own label; the path is logged as a warning (once per process and path, then
at debug level). Because the rule depends only on the files, every server and worker makes the same replacement,
the batch keeps its size and step, and the stream stays deterministic. After
:data:`MAX_REPLACEMENTS` unreadable samples in a row the item fails (a pipeline error for that batch only).

:func:`image_pipeline` builds ``Permutation → Partition → Map(draws) → Collate → Map(decode)``; the factories
:func:`directory_pipeline` and :func:`shard_pipeline` work with ``tensorcom serve`` (the index is built once per
process); :mod:`tensorcom.cli.image_server` serves these pipelines as ``serve-imagenet-dir`` and
``serve-imagenet-shards``.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import math
import os
import tarfile
import threading
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import numpy as np

from tensorcom.errors import ConfigError, PipelineError, URLError
from tensorcom.urls import expand_braces, expand_urls

__all__ = [
    "BACKENDS",
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MAX_REPLACEMENTS",
    "ImageDataset",
    "ImageDirectory",
    "ImageShards",
    "ImageTransform",
    "directory_pipeline",
    "expand_shards",
    "image_pipeline",
    "shard_pipeline",
    "write_shards",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".webp", ".tif", ".tiff", ".gif"}
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_REPLACEMENTS = 64
_CROP_ATTEMPTS = 10
_EVAL_CROP_FRACTION = 0.875
_UNIFORMS = 4 * _CROP_ATTEMPTS + 1  # per attempt: area, log aspect ratio, left, top; then the flip
BACKENDS = ("auto", "opencv", "pillow")
_BILINEAR_LIMIT = 1.25  # OpenCV resize: plain bilinear up to this many input pixels per output pixel
_SIMPLEJPEG_COLORSPACES = frozenset({"YCbCr", "Gray"})


class ImageDataset(Protocol):
    """What :class:`ImageTransform` needs from a dataset: a length, bytes and a label per index, a name for logs."""

    digest: str

    def __len__(self) -> int: ...

    def read(self, index: int) -> bytes: ...

    def label(self, index: int) -> int: ...

    def describe(self, index: int) -> str: ...


def _digest(lines: Iterable[str]) -> str:
    hasher = hashlib.blake2b(digest_size=8)
    for line in lines:
        hasher.update(line.encode("utf-8", "surrogateescape"))
        hasher.update(b"\n")
    return hasher.hexdigest()


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


class ImageDirectory:
    """The images under ``DIR/train/CLASS/`` (or ``DIR/CLASS/``), in a fixed order, with 0-based class labels.

    Raises :class:`tensorcom.ConfigError` if the directory is missing or holds no class folder with images.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        given = os.fspath(directory)
        if not os.path.isdir(given):
            what = "is not a directory" if os.path.exists(given) else "does not exist"
            raise ConfigError(f"image directory {given!r} {what}")
        train = os.path.join(given, "train")
        self.root = train if os.path.isdir(train) else given
        try:
            class_names = sorted(
                entry.name
                for entry in os.scandir(self.root)
                if entry.is_dir() and not entry.name.startswith(".")
            )
        except OSError as error:
            raise ConfigError(f"cannot list image directory {self.root!r}: {error}") from error
        files: list[str] = []
        labels: list[int] = []
        classes: list[str] = []
        for name in class_names:
            found = _image_files(os.path.join(self.root, name))
            if not found:
                log.warning(
                    "class folder %s holds no images; it gets no label", os.path.join(self.root, name)
                )
                continue
            files.extend(os.path.join(name, file) for file in found)
            labels.extend([len(classes)] * len(found))
            classes.append(name)
        if not files:
            raise ConfigError(
                f"image directory {given!r} holds no images in class folders; expected DIR/train/CLASS/*.JPEG "
                f"or DIR/CLASS/*.jpg (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        self.classes = tuple(classes)
        self.files = files
        self.labels = np.asarray(labels, dtype=np.int64)
        self.digest = _digest(f"{label}\t{file}" for label, file in zip(labels, files, strict=True))

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return f"ImageDirectory({self.root!r}: {len(self)} images, {len(self.classes)} classes)"

    def path(self, index: int) -> str:
        """The file of sample ``index``."""
        return os.path.join(self.root, self.files[index])

    def read(self, index: int) -> bytes:
        with open(self.path(index), "rb") as file:
            return file.read()

    def label(self, index: int) -> int:
        return int(self.labels[index])

    def describe(self, index: int) -> str:
        return self.path(index)


def _image_files(folder: str) -> list[str]:
    """Image files below ``folder`` (recursively), as sorted paths relative to it."""
    found: list[str] = []
    for current, subfolders, names in os.walk(folder):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        relative = os.path.relpath(current, folder)
        found.extend(
            name if relative == "." else os.path.join(relative, name) for name in names if _is_image(name)
        )
    return sorted(found)


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Local shard paths from paths with braces (``/data/train-{0000..0146}.tar``) or ``file://`` URLs; a string
    may hold several, separated by whitespace.

    Remote URLs (``http://``, ``s3://``, ``pipe:``) are refused: shards are read with random access from local files.
    """
    paths: list[str] = []
    for item in expand_urls(spec) if isinstance(spec, str) else [p for s in spec for p in expand_braces(s)]:
        if item.startswith("file://"):
            item = item[len("file://") :]
        elif "://" in item or item.startswith("pipe:"):
            raise URLError(f"shards must be local files (or file:// URLs). Found: {item!r}")
        paths.append(item)
    if not paths:
        raise ConfigError(f"no shards given. Found: {spec!r}")
    return paths


class ImageShards:
    """The samples of local WebDataset tar shards (``KEY.jpg`` + ``KEY.cls``), in shard order then tar order.

    Indexing reads every tar header once and keeps the offset and size of each image, so a sample is one
    ``pread`` later. A sample's key is its member path up to the first dot of the file name; members of one sample
    must be adjacent, as WebDataset writes them. Samples without an image or a ``.cls`` are left out (logged).
    """

    def __init__(self, shards: str | Sequence[str]) -> None:
        self.shards = expand_shards(shards)
        missing = [path for path in self.shards if not os.path.isfile(path)]
        if missing:
            shown = ", ".join(repr(path) for path in missing[:3])
            raise ConfigError(f"{len(missing)} of {len(self.shards)} shards do not exist: {shown}")
        shard_numbers: list[int] = []
        offsets: list[int] = []
        sizes: list[int] = []
        labels: list[int] = []
        self.keys: list[str] = []
        for number, path in enumerate(self.shards):
            for key, offset, size, label in _shard_samples(path):
                shard_numbers.append(number)
                offsets.append(offset)
                sizes.append(size)
                labels.append(label)
                self.keys.append(key)
        if not self.keys:
            raise ConfigError(f"the shards hold no samples with an image and a .cls label: {self.shards[:3]}")
        self.shard_numbers = np.asarray(shard_numbers, dtype=np.int32)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.digest = _digest(
            f"{os.path.basename(self.shards[n])}\t{k}\t{s}\t{label}"
            for n, k, s, label in zip(shard_numbers, self.keys, sizes, labels, strict=True)
        )
        self._descriptors: dict[
            int, int
        ] = {}  # opened on first read in each process (pread: shareable on fork)

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        return f"ImageShards({len(self.shards)} shards, {len(self)} images)"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_descriptors"] = {}
        return state

    def __del__(self) -> None:
        for descriptor in getattr(self, "_descriptors", {}).values():
            try:
                os.close(descriptor)
            except OSError:
                pass

    def _descriptor(self, shard: int) -> int:
        descriptor = self._descriptors.get(shard)
        if descriptor is None:
            descriptor = self._descriptors[shard] = os.open(self.shards[shard], os.O_RDONLY)
        return descriptor

    def read(self, index: int) -> bytes:
        size = int(self.sizes[index])
        data = os.pread(self._descriptor(int(self.shard_numbers[index])), size, int(self.offsets[index]))
        if len(data) != size:
            raise OSError(f"short read: {len(data)} of {size} bytes (the shard changed since it was indexed)")
        return data

    def label(self, index: int) -> int:
        return int(self.labels[index])

    def describe(self, index: int) -> str:
        return f"{self.shards[int(self.shard_numbers[index])]}:{self.keys[index]}"


def _split_key(name: str) -> tuple[str, str]:
    folder, base = os.path.split(name)
    stem, dot, extension = base.partition(".")
    return (os.path.join(folder, stem) if folder else stem), extension.lower() if dot else ""


def _shard_samples(path: str) -> Iterable[tuple[str, int, int, int]]:
    """(key, image offset, image size, label) of each complete sample of one tar shard."""
    try:
        with tarfile.open(path, "r:") as archive:
            key: str | None = None
            image: tuple[int, int] | None = None
            label: int | None = None

            def finish() -> Iterable[tuple[str, int, int, int]]:
                if key is None:
                    return
                if image is None or label is None:
                    log.warning(
                        "shard %s: sample %r has no %s; left out",
                        path,
                        key,
                        "image" if image is None else ".cls",
                    )
                    return
                yield key, image[0], image[1], label

            for member in archive:
                if not member.isfile():
                    continue
                member_key, extension = _split_key(member.name)
                if member_key != key:
                    yield from finish()
                    key, image, label = member_key, None, None
                if "." + extension in IMAGE_EXTENSIONS and image is None:
                    image = (member.offset_data, member.size)
                elif extension == "cls":
                    reader = archive.extractfile(member)
                    text = reader.read().decode("ascii", "replace").strip() if reader is not None else ""
                    try:
                        label = int(text)
                    except ValueError:
                        raise ConfigError(
                            f"shard {path}: {member.name} must hold an integer label. Found: {text[:40]!r}"
                        ) from None
            yield from finish()
    except (tarfile.TarError, OSError) as error:
        raise ConfigError(f"cannot read shard {path!r}: {error}") from error


def write_shards(
    dataset: ImageDataset, pattern: str, samples_per_shard: int = 1000, extension: str = "jpg"
) -> list[str]:
    """Write ``dataset`` as WebDataset tar shards in its own sample order; return the paths written.

    ``pattern`` holds one ``%d``-style field for the shard number, e.g. ``/data/train-%06d.tar``. Sample ``i`` is
    stored as ``{i:08d}.{extension}`` (the image bytes as they are) and ``{i:08d}.cls`` (the label).
    """
    if samples_per_shard < 1:
        raise ConfigError(f"samples_per_shard must be >= 1. Found: {samples_per_shard}")
    try:
        pattern % 0
    except TypeError as error:
        raise ConfigError(
            f"pattern must hold one %d field for the shard number. Found: {pattern!r}"
        ) from error
    paths: list[str] = []
    for start in range(0, len(dataset), samples_per_shard):
        path = pattern % (start // samples_per_shard)
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as archive:
            for index in range(start, min(start + samples_per_shard, len(dataset))):
                for name, data in (
                    (f"{index:08d}.{extension}", dataset.read(index)),
                    (f"{index:08d}.cls", str(dataset.label(index)).encode("ascii")),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    info.mtime = 0
                    info.mode = 0o644
                    archive.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


_WARNED: set[str] = set()
_WARNED_LOCK = threading.Lock()


def _first_warning(description: str) -> bool:
    with _WARNED_LOCK:
        if description in _WARNED:
            return False
        _WARNED.add(description)
        return True


@functools.cache
def _opencv() -> Any:
    """The ``cv2`` module, or None where OpenCV is not installed."""
    try:
        import cv2
    except ImportError:
        return None
    return cv2


@functools.cache
def _decoding_opencv() -> Any:
    """``cv2``, set to one thread for this process the first time it resizes here: decoding scales with worker
    processes, and OpenCV's thread pool only spins beside them (measured: 1.6 CPU ms per image instead of 1.0)."""
    cv2 = _opencv()
    cv2.setNumThreads(1)
    return cv2


@functools.cache
def _simplejpeg() -> Any:
    """The ``simplejpeg`` module, or None where it is not installed."""
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


def _resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}. Found: {backend!r}")
    if backend == "auto":
        return "opencv" if _opencv() is not None else "pillow"
    if backend == "opencv" and _opencv() is None:
        raise ConfigError(
            "backend='opencv' needs OpenCV: pip install 'tensorcom[images]' (or opencv-python-headless)"
        )
    return backend


class ImageTransform:
    """Decode sample ``index`` of ``dataset`` and crop, flip and resize it to ``size`` x ``size``.

    Called as ``transform(index, rng)`` by a pipeline ``Map``; returns ``(image, label)`` with ``image`` uint8 HWC
    RGB (float32, normalised with ``mean``/``std`` in 0-1 units, when ``normalize``) and ``label`` an int64.
    With ``augment=False`` (evaluation) the crop is the central 87.5 % square and there is no flip. ``draft``
    enables reduced-size JPEG decoding (1/2, 1/4, 1/8) when the crop allows it, and fast chroma upsampling (below);
    ``draft=False`` decodes as torchvision does. ``backend`` chooses the resize:
    ``"opencv"`` (bilinear, or bilinear to an integer multiple of the output and then a box average when the crop
    is more than 1.25 times the output), ``"pillow"`` (Pillow's antialiased bilinear, as torchvision's PIL path),
    ``"auto"`` (OpenCV where installed; the process that decodes then runs OpenCV on one thread,
    ``cv2.setNumThreads(1)``). With OpenCV, JPEGs are decoded with simplejpeg where installed, else Pillow
    (both libjpeg-turbo); with ``draft`` simplejpeg also upsamples the chroma planes (4:2:0, 4:2:2) by replication
    rather than libjpeg's smoothing filter, 5 % less CPU per image. Measured on the benchmark's 500 x 375 JPEGs
    (``benchmarks/bench_imagenet.py``): 0.18 levels (of 255) per pixel apart on average from the exact decode,
    at most 0.54 for any image; up to 37 on single pixels at sharp colour edges; gray and 4:4:4 JPEGs are decoded
    exactly. Without ``draft``, or without simplejpeg, the decode is libjpeg's exact one, and simplejpeg and
    Pillow give the same pixels. The fingerprint names the decoder whenever the pixels depend on it, so servers
    that decode differently are never mixed in one stream. Unreadable samples are replaced as described in the
    module docstring.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        size: int = 224,
        *,
        normalize: bool = False,
        augment: bool = True,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        draft: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        backend: str = "auto",
    ) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"size must be an int >= 1. Found: {size!r}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ConfigError(f"scale must be (low, high) with 0 < low <= high <= 1. Found: {scale!r}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ConfigError(f"ratio must be (low, high) with 0 < low <= high. Found: {ratio!r}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ConfigError(f"mean and std must hold 3 values, std > 0. Found: {mean!r}, {std!r}")
        if len(dataset) < 1:
            raise ConfigError("the dataset holds no samples")
        try:
            import PIL.Image  # noqa: F401 - checked here so that a missing Pillow is not taken for unreadable files
        except ImportError as error:
            raise ConfigError(
                f"decoding images needs Pillow: pip install 'tensorcom[images]' ({error})"
            ) from None
        self.dataset = dataset
        self.size = size
        self.normalize = normalize
        self.augment = augment
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.draft = draft
        self.backend = _resolve_backend(backend)
        self._mean = np.asarray(mean, dtype=np.float32) * 255
        self._inverse_std = 1 / (np.asarray(std, dtype=np.float32) * 255)
        # the pipeline fingerprint names the map function: make it name the data, the output, the resize and the
        # JPEG decoder where it changes the pixels
        decoder = (
            ",jpeg=simplejpeg-fast-chroma"
            if draft and self.backend == "opencv" and _simplejpeg() is not None
            else ""
        )
        self.__qualname__ = (
            f"ImageTransform(size={size},normalize={normalize},augment={augment},scale={self.scale},"
            f"ratio={self.ratio},draft={draft},resize={self.backend}{decoder},data={dataset.digest})"
        )
        self.__name__ = "ImageTransform"

    def __repr__(self) -> str:
        return self.__qualname__

    @property
    def dtype(self) -> np.dtype[Any]:
        """The dtype of the images made: uint8, or float32 with ``normalize``."""
        return np.dtype(np.float32 if self.normalize else np.uint8)

    def __call__(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.int64]:
        uniforms = rng.random(_UNIFORMS) if self.augment else None
        image = np.empty((self.size, self.size, 3), self.dtype)
        return image, np.int64(self.fill(image, index, uniforms))

    def fill(self, out: np.ndarray, index: int, uniforms: np.ndarray | None) -> int:
        """Write sample ``index`` (or its replacement) into ``out`` (``size`` x ``size`` x 3, :attr:`dtype`) and
        return its label. ``uniforms`` are the sample's ``4 * 10 + 1`` draws (None: no augmentation)."""
        count = len(self.dataset)
        first_error: BaseException | None = None
        for attempt in range(min(MAX_REPLACEMENTS + 1, count)):
            sample = (index + attempt) % count
            try:
                self.load_into(out, sample, uniforms)
            except Exception as error:  # any failure to read or decode counts as an unreadable file
                first_error = first_error or error
                self._report(sample, error)
                continue
            if attempt:
                log.debug(
                    "sample %d replaced by sample %d (%s)", index, sample, self.dataset.describe(sample)
                )
            return self.dataset.label(sample)
        raise PipelineError(
            f"sample {index} ({self.dataset.describe(index)}) and the {min(MAX_REPLACEMENTS, count - 1)} samples "
            f"after it are unreadable; first error: {type(first_error).__name__}: {first_error}"
        ) from first_error

    def _report(self, sample: int, error: BaseException) -> None:
        description = self.dataset.describe(sample)
        level = logging.WARNING if _first_warning(description) else logging.DEBUG
        log.log(
            level,
            "unreadable image %s (%s: %s); sample %d is replaced by the next readable sample",
            description,
            type(error).__name__,
            error,
            sample,
        )

    def crop_box(
        self, width: int, height: int, uniforms: np.ndarray | None
    ) -> tuple[float, float, float, float]:
        """The crop (left, top, right, bottom) for an image of ``width`` x ``height`` given the sample's uniforms."""
        if uniforms is None:
            side = min(width, height) * _EVAL_CROP_FRACTION
            left, top = (width - side) / 2, (height - side) / 2
            return left, top, left + side, top + side
        area = width * height
        log_low, log_high = math.log(self.ratio[0]), math.log(self.ratio[1])
        for attempt in range(_CROP_ATTEMPTS):
            target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * uniforms[attempt])
            aspect = math.exp(log_low + (log_high - log_low) * uniforms[_CROP_ATTEMPTS + attempt])
            crop_width = round(math.sqrt(target * aspect))
            crop_height = round(math.sqrt(target / aspect))
            if 0 < crop_width <= width and 0 < crop_height <= height:
                horizontal = uniforms[2 * _CROP_ATTEMPTS + attempt]
                vertical = uniforms[3 * _CROP_ATTEMPTS + attempt]
                left = min(int(horizontal * (width - crop_width + 1)), width - crop_width)
                top = min(int(vertical * (height - crop_height + 1)), height - crop_height)
                return left, top, left + crop_width, top + crop_height
        aspect = width / height
        if aspect < self.ratio[0]:
            crop_width, crop_height = width, round(width / self.ratio[0])
        elif aspect > self.ratio[1]:
            crop_width, crop_height = round(height * self.ratio[1]), height
        else:
            crop_width, crop_height = width, height
        left, top = (width - crop_width) // 2, (height - crop_height) // 2
        return left, top, left + crop_width, top + crop_height

    def reduction(self, box: tuple[float, float, float, float]) -> int:
        """The JPEG DCT scaling (1, 2, 4 or 8) that still leaves the crop ``box`` at least ``size`` pixels wide
        and high; 1 without ``draft``."""
        if not self.draft:
            return 1
        smaller = min(box[2] - box[0], box[3] - box[1])
        for factor in (8, 4, 2):
            if smaller >= factor * self.size:
                return factor
        return 1

    def load(self, sample: int, uniforms: np.ndarray | None) -> np.ndarray:
        """Decode and transform one sample into a new array (no replacement: errors propagate)."""
        out = np.empty((self.size, self.size, 3), self.dtype)
        self.load_into(out, sample, uniforms)
        return out

    def load_into(self, out: np.ndarray, sample: int, uniforms: np.ndarray | None) -> None:
        """Decode and transform one sample into ``out`` (no replacement: errors propagate)."""
        data = self.dataset.read(sample)
        flip = uniforms is not None and uniforms[-1] < 0.5
        if self.backend == "opencv":
            target = out if not self.normalize else np.empty((self.size, self.size, 3), np.uint8)
            self._opencv_into(target, data, uniforms, flip)
            if self.normalize:
                np.multiply(np.subtract(target, self._mean, dtype=np.float32), self._inverse_std, out=out)
            return
        image = self._pillow(data, uniforms)
        if flip:
            image = image[:, ::-1]
        if self.normalize:
            np.multiply(np.subtract(image, self._mean, dtype=np.float32), self._inverse_std, out=out)
        else:
            out[...] = image

    def _pillow(self, data: bytes, uniforms: np.ndarray | None) -> np.ndarray:
        """Pillow: decode (draft mode for JPEG), then crop and resize in one antialiased bilinear ``resize``."""
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            box = self.crop_box(width, height, uniforms)
            factor = self._draft(image, box)
            if factor > 1:
                box = (box[0] / factor, box[1] / factor, box[2] / factor, box[3] / factor)
            rgb = image.convert("RGB") if image.mode != "RGB" else image
            rgb.load()
            result = rgb.resize((self.size, self.size), Image.Resampling.BILINEAR, box=box)
        array = np.asarray(result)
        if array.shape != (self.size, self.size, 3):
            raise ValueError(f"decoded image has shape {array.shape}, expected {(self.size, self.size, 3)}")
        return array

    def _draft(self, image: Any, box: tuple[float, float, float, float]) -> int:
        """Ask Pillow for a JPEG decode at 1/k scale; return the k it granted."""
        factor = self.reduction(box)
        if factor == 1 or image.format != "JPEG":
            return 1
        width, height = image.size
        granted = image.draft("RGB", (width // factor, height // factor))
        return 1 if granted is None else round(width / granted[1][2])

    def _decode(self, data: bytes, uniforms: np.ndarray | None) -> tuple[np.ndarray, int, tuple[float, ...]]:
        """RGB pixels (at 1/k scale for JPEGs), k, and the crop box in full-size coordinates."""
        from PIL import Image

        simplejpeg = _simplejpeg()
        if simplejpeg is not None and data[:2] == b"\xff\xd8":
            try:
                height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
                limit = Image.MAX_IMAGE_PIXELS
                # CMYK and YCCK go to Pillow, which converts them its own way; so do images Pillow refuses as bombs
                if colorspace in _SIMPLEJPEG_COLORSPACES and (limit is None or width * height <= limit):
                    box = self.crop_box(width, height, uniforms)
                    factor = self.reduction(box)
                    shape = (-(-height // factor), -(-width // factor))
                    pixels = simplejpeg.decode_jpeg(
                        data,
                        colorspace="RGB",
                        fastupsample=self.draft,
                        min_height=shape[0],
                        min_width=shape[1],
                    )
                    if pixels.shape[:2] == shape:
                        return pixels, factor, box
            except Exception:  # noqa: BLE001 - Pillow decides whether the file is readable, as without simplejpeg
                pass

        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            box = self.crop_box(width, height, uniforms)
            factor = self._draft(image, box)
            rgb = image.convert("RGB") if image.mode != "RGB" else image
            return np.asarray(rgb), factor, box

    def _opencv_into(self, out: np.ndarray, data: bytes, uniforms: np.ndarray | None, flip: bool) -> None:
        """Decode at the size needed, then crop, resize and flip in one affine warp of the decoded pixels into
        ``out`` (bilinear); a crop more than 1.25 times the output is warped to an integer multiple of it and box
        averaged down, which keeps the antialiasing of Pillow's resize."""
        cv2 = _decoding_opencv()
        pixels, factor, box = self._decode(data, uniforms)
        left, top, right, bottom = (v / factor for v in box)
        larger = max(right - left, bottom - top)
        multiple = 1 if larger <= _BILINEAR_LIMIT * self.size else math.ceil(larger / self.size)
        side = multiple * self.size
        x_step, y_step = (right - left) / side, (bottom - top) / side
        # output pixel x samples the decoded image at left + (x + 0.5) * x_step - 0.5 (pixel centres, as Pillow's
        # resize with a box), or mirrored: right - (x + 0.5) * x_step - 0.5
        if flip:
            row = [-x_step, 0.0, right - 0.5 * x_step - 0.5]
        else:
            row = [x_step, 0.0, left + 0.5 * x_step - 0.5]
        matrix = np.array([row, [0.0, y_step, top + 0.5 * y_step - 0.5]])
        flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
        border = cv2.BORDER_REPLICATE
        if multiple == 1:
            made = cv2.warpAffine(pixels, matrix, (side, side), dst=out, flags=flags, borderMode=border)
        else:
            enlarged = cv2.warpAffine(pixels, matrix, (side, side), flags=flags, borderMode=border)
            made = cv2.resize(enlarged, (self.size, self.size), dst=out, interpolation=cv2.INTER_AREA)
        if not np.may_share_memory(made, out):  # OpenCV allocates afresh when it cannot write into ``out``
            out[...] = made


class _AugmentationDraws:
    """Map function of :func:`image_pipeline`: a sample's index and its uniforms, drawn from its own generator
    exactly as :class:`ImageTransform` draws them, so a batch is what ``Map(transform) → Collate`` would give."""

    __name__ = "ImageAugmentationDraws"
    __qualname__ = f"ImageAugmentationDraws({_UNIFORMS})"

    def __call__(self, index: int, rng: np.random.Generator) -> tuple[int, np.ndarray]:
        return index, rng.random(_UNIFORMS)


class _BatchDecoder:
    """Map function of :func:`image_pipeline` over collated batches: decodes every sample of a batch straight into
    one preallocated ``(B, size, size, 3)`` array (no per-sample arrays to stack), labels beside it."""

    __name__ = "ImageBatches"

    def __init__(self, transform: ImageTransform) -> None:
        self.transform = transform
        self.__qualname__ = f"ImageBatches({transform.__qualname__})"

    def __call__(self, batch: Any) -> tuple[np.ndarray, np.ndarray]:
        indices, uniforms = batch if isinstance(batch, tuple) else (batch, None)
        transform = self.transform
        images = np.empty((len(indices), transform.size, transform.size, 3), transform.dtype)
        labels = np.empty(len(indices), np.int64)
        for slot, index in enumerate(indices.tolist()):
            labels[slot] = transform.fill(images[slot], index, None if uniforms is None else uniforms[slot])
        return images, labels


def image_pipeline(
    *,
    dataset: ImageDataset,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 64,
    size: int = 224,
    normalize: bool = False,
    augment: bool = True,
    workers: int = 0,
    repeating: bool = True,
    draft: bool = True,
    shuffle: bool = True,
    backend: str = "auto",
) -> Any:
    """``Permutation(len(dataset), seed) → Partition(rank, world_size) → Map(draws) → Collate(batch_size) →
    Map(decode)``: the batch of ``ImageTransform(dataset, size, ...)`` applied to each sample.

    Batches are ``(images, labels)``: ``images`` uint8 ``(B, size, size, 3)`` (float32 with ``normalize``),
    ``labels`` int64 ``(B,)``. Each sample's augmentation is drawn from its own generator (a ``Map`` keyed by
    seed, epoch and sample index, as :class:`ImageTransform` draws it); the decode then runs once per batch and
    writes every image into the batch array in place. ``workers > 0`` decodes in that many worker processes, a
    batch each (a ``DistributedBatchedMap``: same batches, same fingerprint). ``repeating`` goes on with a new
    order each epoch (``shuffle=False``: the dataset's own order, ``Range`` instead of ``Permutation``, every
    epoch). ``backend`` is :class:`ImageTransform`'s. The pipeline's ``class_names`` are the dataset's ``classes``
    (an :class:`ImageDirectory`'s class folders; None for shards), which a request server sends its clients so that
    tools caption images by name.
    """
    from tensorcom.pipeline import (
        Collate,
        Conveyer,
        DistributedBatchedMap,
        Map,
        Partition,
        Permutation,
        Range,
    )

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an int >= 1. Found: {batch_size!r}")
    if workers < 0:
        raise ConfigError(f"workers must be >= 0. Found: {workers}")
    transform = ImageTransform(
        dataset, size, normalize=normalize, augment=augment, draft=draft, backend=backend
    )
    decoder = _BatchDecoder(transform)
    decode: Any = (
        DistributedBatchedMap(decoder, n_workers=workers, buffer_size=2 * workers)
        if workers
        else Map(decoder)
    )
    stages: list[Any] = [
        (
            Permutation(len(dataset), seed=seed, repeating=repeating)
            if shuffle
            else Range(len(dataset), repeating=repeating)
        ),
        Partition(rank, world_size),
    ]
    if augment:
        stages.append(Map(_AugmentationDraws()))
    pipeline: Any = Conveyer([*stages, Collate(batch_size), decode])
    classes = getattr(dataset, "classes", None)
    pipeline.class_names = None if classes is None else tuple(classes)
    return pipeline


@functools.lru_cache(maxsize=4)
def _directory(directory: str) -> ImageDirectory:
    return ImageDirectory(directory)


@functools.lru_cache(maxsize=4)
def _shards(shards: str) -> ImageShards:
    return ImageShards(shards)


def directory_pipeline(
    *, directory: str, seed: int = 0, rank: int = 0, world_size: int = 1, **options: Any
) -> Any:
    """Factory for ``tensorcom serve tensorcom.datasets.imagenet:directory_pipeline -o directory=DIR``: the
    :func:`image_pipeline` of an :class:`ImageDirectory`, indexed once per process."""
    return image_pipeline(
        dataset=_directory(os.path.abspath(directory)), seed=seed, rank=rank, world_size=world_size, **options
    )


def shard_pipeline(*, shards: str, seed: int = 0, rank: int = 0, world_size: int = 1, **options: Any) -> Any:
    """Factory for ``tensorcom serve tensorcom.datasets.imagenet:shard_pipeline -o shards='/data/train-{0..9}.tar'``."""
    return image_pipeline(dataset=_shards(shards), seed=seed, rank=rank, world_size=world_size, **options)
