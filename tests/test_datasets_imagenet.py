"""ImageNet-style serving: folder and shard indexing, decoding and augmentation, and the serve-imagenet-dir and
serve-imagenet-shards programs end to end on real JPEG files."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import StartProcess, assert_same_batches, same_batches, wait_until
from imagenet_fixtures import CLASSES, CORRUPT, PER_CLASS, make_image_folder, make_shards, start_image_server
from PIL import Image
from pipeline_harness import check_resume_everywhere

from tensorcom import ConfigError, Connection, PipelineError, URLError
from tensorcom.datasets import imagenet
from tensorcom.datasets.imagenet import (
    ImageDirectory,
    ImageShards,
    ImageTransform,
    directory_pipeline,
    image_pipeline,
    write_shards,
)
from tensorcom.pipeline import Collate, Conveyer, Map, Partition, Permutation

SIZE = 16
BATCH = 4
HAVE_OPENCV = imagenet._opencv() is not None
HAVE_SIMPLEJPEG = imagenet._simplejpeg() is not None
BACKENDS = [
    "pillow",
    pytest.param("opencv", marks=pytest.mark.skipif(not HAVE_OPENCV, reason="OpenCV is not installed")),
]
needs_simplejpeg = pytest.mark.skipif(not HAVE_SIMPLEJPEG, reason="simplejpeg is not installed")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images")


def reference(folder: Path, seed: int, count: int, **options: object) -> list[tuple[np.ndarray, np.ndarray]]:
    """The first ``count`` batches of the folder's pipeline computed in this process."""
    with directory_pipeline(
        directory=str(folder), seed=seed, batch_size=BATCH, size=SIZE, **options
    ) as pipeline:
        return [next(pipeline) for _ in range(count)]


# indexing


def test_directory_classes_are_sorted_and_labels_start_at_zero(folder: Path) -> None:
    """train/CLASS folders give labels 0, 1, 2 in sorted order; non-image files are ignored, bad JPEGs indexed."""
    dataset = ImageDirectory(folder)
    assert dataset.classes == CLASSES
    assert len(dataset) == len(CLASSES) * PER_CLASS + 1
    for index in range(len(dataset)):
        assert CLASSES[dataset.label(index)] == Path(dataset.files[index]).parts[0]
    assert dataset.files.index(CORRUPT) == PER_CLASS + PER_CLASS  # after the four good dog images
    assert not any(file.endswith(".txt") for file in dataset.files)


def test_class_folders_directly_under_the_directory(tmp_path: Path) -> None:
    """DIR/CLASS/* works as well as DIR/train/CLASS/*."""
    make_image_folder(tmp_path, corrupt=False, train=False)
    dataset = ImageDirectory(tmp_path)
    assert dataset.classes == CLASSES and len(dataset) == len(CLASSES) * PER_CLASS


@pytest.mark.parametrize("kind", ["missing", "empty", "file"], ids=["missing", "empty", "file"])
def test_unusable_directory_is_a_config_error(tmp_path: Path, kind: str) -> None:
    """A missing, empty or non-directory path raises ConfigError quoting the path."""
    path = tmp_path / "data"
    if kind == "empty":
        (path / "train" / "cat").mkdir(parents=True)
    elif kind == "file":
        path.write_text("x")
    with pytest.raises(ConfigError, match="data"):
        ImageDirectory(path)


def test_shards_hold_the_folder_in_the_same_order(folder: Path, tmp_path: Path) -> None:
    """write_shards then ImageShards gives the same bytes and labels at every index, across several shards."""
    pattern = make_shards(folder, tmp_path / "shards", per_shard=5)
    directory, shards = ImageDirectory(folder), ImageShards(pattern)
    assert len(shards.shards) == 3 and len(shards) == len(directory)
    for index in range(len(directory)):
        assert shards.read(index) == directory.read(index)
        assert shards.label(index) == directory.label(index)


def test_remote_shard_urls_are_refused() -> None:
    """Shards are local files: http:// and pipe: are refused with a URLError."""
    for spec in ("http://example.com/train-{0..3}.tar", "pipe:curl x"):
        with pytest.raises(URLError, match="local"):
            ImageShards(spec)


def test_missing_shards_are_named(tmp_path: Path) -> None:
    """Shards that do not exist are a ConfigError naming them."""
    with pytest.raises(ConfigError, match="do not exist"):
        ImageShards(str(tmp_path / "train-{0..1}.tar"))


# decoding and augmentation


@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_have_the_requested_shape_dtype_and_labels(folder: Path, backend: str) -> None:
    """uint8 NHWC images of the requested size, int64 labels matching each sample's folder; the class colour
    survives the crop."""
    dataset = ImageDirectory(folder)
    with image_pipeline(dataset=dataset, seed=1, batch_size=BATCH, size=SIZE, backend=backend) as pipeline:
        for _ in range(6):
            (images, labels), meta = pipeline.next_with_meta()
            assert images.shape == (BATCH, SIZE, SIZE, 3) and images.dtype == np.uint8
            assert labels.dtype == np.int64
            for image, label, index in zip(images, labels, meta["indices"], strict=True):
                if dataset.files[index] != CORRUPT:
                    assert label == dataset.label(index)
                    assert int(np.argmax(image.reshape(-1, 3).mean(axis=0))) == label


@pytest.mark.parametrize("backend", BACKENDS)
def test_normalize_gives_float32_around_zero(folder: Path, backend: str) -> None:
    """--normalize sends float32 (x/255 - mean) / std of the very pixels sent without it."""
    images, _ = reference(folder, seed=0, count=1, normalize=True, backend=backend)[0]
    pixels, _ = reference(folder, seed=0, count=1, backend=backend)[0]
    assert images.dtype == np.float32 and images.shape == (BATCH, SIZE, SIZE, 3)
    assert -2.2 < images.min() and images.max() < 2.7
    expected = (pixels / np.float32(255) - np.float32(imagenet.IMAGENET_MEAN)) / np.float32(
        imagenet.IMAGENET_STD
    )
    assert np.allclose(images, expected, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_batches_other_seed_others(folder: Path, backend: str) -> None:
    """Augmentation depends on (seed, epoch, index) only: a repeat run is identical, another seed differs."""
    assert_same_batches(reference(folder, 5, 4, backend=backend), reference(folder, 5, 4, backend=backend))
    assert not same_batches(
        reference(folder, 5, 4, backend=backend), reference(folder, 6, 4, backend=backend)
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_are_the_per_sample_transform_collated(folder: Path, backend: str) -> None:
    """Decoding whole batches in place gives exactly Map(ImageTransform) -> Collate, with each sample's own
    generator, across epoch boundaries (13 samples, batches of 4) and with the corrupt file replaced."""
    dataset = ImageDirectory(folder)
    transform = ImageTransform(dataset, SIZE, backend=backend)
    per_sample = Conveyer(
        [Permutation(len(dataset), seed=9, repeating=True), Partition(0, 1), Map(transform), Collate(BATCH)]
    )
    with (
        per_sample,
        image_pipeline(dataset=dataset, seed=9, batch_size=BATCH, size=SIZE, backend=backend) as ours,
    ):
        for _ in range(8):  # 32 samples: more than two epochs
            (images, labels), meta = ours.next_with_meta()
            (expected_images, expected_labels), expected_meta = per_sample.next_with_meta()
            assert meta == expected_meta
            assert np.array_equal(images, expected_images) and np.array_equal(labels, expected_labels)


@pytest.mark.parametrize("augment", [True, False], ids=["augment", "central-crop"])
def test_batches_resume_at_every_step_and_with_decoding_workers(folder: Path, augment: bool) -> None:
    """The image pipeline resumes bit-identically from a state saved before any batch, also into a pipeline that
    decodes in a worker process (same fingerprint), and skip(k) lands where k batches land."""

    def make(workers: int) -> object:
        return image_pipeline(
            dataset=ImageDirectory(folder),
            seed=3,
            batch_size=BATCH,
            size=SIZE,
            augment=augment,
            workers=workers,
        )

    assert make(0).fingerprint == make(1).fingerprint  # type: ignore[attr-defined]
    check_resume_everywhere(lambda: make(0), 8, make_restored=lambda: make(1), fresh=False)  # type: ignore[arg-type]


def test_unreadable_image_is_replaced_by_the_next_readable_one(
    folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The corrupt file becomes the next sample (its image and its label), and its path is logged."""
    dataset = ImageDirectory(folder)
    bad = dataset.files.index(CORRUPT)
    transform = ImageTransform(dataset, SIZE)
    rng = np.random.default_rng(0)
    uniforms = np.random.default_rng(0).random(41)
    with caplog.at_level(logging.WARNING, logger="tensorcom.datasets.imagenet"):
        image, label = transform(bad, rng)
    assert label == dataset.label(bad + 1)
    assert np.array_equal(image, transform.load(bad + 1, uniforms))
    assert str(folder / "train" / CORRUPT) in caplog.text


def test_all_unreadable_fails_the_item(tmp_path: Path) -> None:
    """When every image is unreadable the item fails with a PipelineError naming the sample."""
    (tmp_path / "cat").mkdir()
    for item in range(3):
        (tmp_path / "cat" / f"{item}.jpg").write_bytes(b"junk")
    transform = ImageTransform(ImageDirectory(tmp_path), SIZE)
    with pytest.raises(PipelineError, match="unreadable"):
        transform(0, np.random.default_rng(0))


def test_crops_stay_inside_the_image() -> None:
    """Random resized crops lie inside the image with an area in the scale range (or the central fallback)."""
    transform = ImageTransform(_Fake(), SIZE)
    rng = np.random.default_rng(0)
    for width, height in [(32, 32), (500, 375), (40, 400), (1, 1)]:
        for _ in range(200):
            left, top, right, bottom = transform.crop_box(width, height, rng.random(41))
            assert 0 <= left < right <= width and 0 <= top < bottom <= height
            assert (right - left) * (bottom - top) <= width * height


def _gradient_jpeg(path: Path, width: int = 512, height: int = 512) -> None:
    """A smooth RGB gradient: reduced-size decoding changes it little."""
    x = np.linspace(0, 255, width, dtype=np.float32)
    y = np.linspace(0, 255, height, dtype=np.float32)
    pixels = np.stack(np.broadcast_arrays(x[None, :], y[:, None], 128 + 0 * x[None, :]), -1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path, quality=95)


@pytest.mark.parametrize("backend", BACKENDS)
def test_draft_mode_decodes_large_jpegs_at_reduced_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    """A 512x512 JPEG cropped to 16x16 is decoded at 1/4 or 1/8 scale (whichever decoder runs); the result is
    close to the full-size decode."""
    _gradient_jpeg(tmp_path / "cat" / "big.jpg")
    dataset = ImageDirectory(tmp_path)
    from PIL import JpegImagePlugin

    scales: list[float] = []
    original_draft = JpegImagePlugin.JpegImageFile.draft

    def spy_draft(
        self: JpegImagePlugin.JpegImageFile, mode: str | None, size: tuple[int, int] | None
    ) -> object:
        result = original_draft(self, mode, size)
        scales.append(512 / result[1][2] if result else 1.0)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy_draft)
    if HAVE_SIMPLEJPEG:
        simplejpeg = imagenet._simplejpeg()
        original_decode = simplejpeg.decode_jpeg

        def spy_decode(data: bytes, *args: object, **kwargs: object) -> np.ndarray:
            pixels: np.ndarray = original_decode(data, *args, **kwargs)
            scales.append(512 / pixels.shape[1])
            return pixels

        monkeypatch.setattr(simplejpeg, "decode_jpeg", spy_decode)
    for augment in (True, False):
        uniforms = np.random.default_rng(3).random(41) if augment else None
        transform = ImageTransform(dataset, SIZE, augment=augment, backend=backend)
        assert transform.reduction(transform.crop_box(512, 512, uniforms)) >= 4
        scales.clear()
        fast = transform.load(0, uniforms)
        assert min(scales) >= 4, f"decoded at scales {scales}"
        full = ImageTransform(dataset, SIZE, augment=augment, draft=False, backend=backend).load(0, uniforms)
        assert np.abs(fast.astype(int) - full.astype(int)).mean() < 6


def _odd_images(root: Path) -> ImageDirectory:
    """JPEGs of every kind the fast decoder must handle or hand over to Pillow, and a PNG, in one class folder."""
    rng = np.random.default_rng(7)
    folder = root / "odd"
    folder.mkdir(parents=True)
    noisy = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
    smooth = np.clip(noisy.astype(int) // 4 + np.arange(500)[None, :, None] // 3, 0, 255).astype(np.uint8)
    Image.fromarray(smooth).save(folder / "a-rgb.jpg", quality=90)
    Image.fromarray(smooth).save(folder / "b-progressive.jpg", quality=85, progressive=True)
    Image.fromarray(smooth).save(folder / "c-444.jpg", quality=90, subsampling=0)
    Image.fromarray(smooth[..., 0]).save(folder / "d-gray.jpg", quality=90)
    Image.fromarray(smooth).convert("CMYK").save(folder / "e-cmyk.jpg", quality=90)
    Image.fromarray(smooth).save(folder / "f-image.png")
    Image.fromarray(smooth[:200, :300]).save(folder / "g-small.jpg", quality=90)
    Image.fromarray(smooth[:1, :1]).save(folder / "h-one-pixel.jpg", quality=90)
    Image.fromarray(smooth[:40, :3]).save(folder / "i-thin.png")
    return ImageDirectory(root)


# the 4:2:0 JPEGs of _odd_images
_SUBSAMPLED = frozenset({"a-rgb.jpg", "b-progressive.jpg", "g-small.jpg", "h-one-pixel.jpg"})


@needs_simplejpeg
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("draft", [False, True], ids=["exact", "draft"])
def test_simplejpeg_and_pillow_decode_the_same_pixels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str, draft: bool
) -> None:
    """With or without simplejpeg the output is the same, byte for byte, for RGB (4:2:0, 4:4:4, progressive),
    grayscale, CMYK and one-pixel JPEGs and PNGs, at full size and at the reduced sizes draft mode picks: both run
    libjpeg-turbo with the same settings, and simplejpeg leaves what it does not convert like Pillow to Pillow.
    The one exception: in draft mode simplejpeg upsamples the chroma of 4:2:0 JPEGs fast, which moves their
    pixels a little (and only theirs), and the fingerprint says so, so that the two are never mixed."""
    dataset = _odd_images(tmp_path)
    transforms = [ImageTransform(dataset, size, backend=backend, draft=draft) for size in (100, 40)]
    draws = np.random.default_rng(0).random((16, 41))
    cases = [
        (transform, index, draws[k % len(draws)] if k % 3 else None)
        for transform in transforms
        for k, index in enumerate(list(range(len(dataset))) * 2)
    ]
    outputs = [transform.load(index, uniforms) for transform, index, uniforms in cases]
    monkeypatch.setattr(imagenet, "_simplejpeg", lambda: None)
    again = [transform.load(index, uniforms) for transform, index, uniforms in cases]
    fast_chroma = draft and transforms[0].backend == "opencv"
    moved = []
    for k, (a, b) in enumerate(zip(outputs, again, strict=True)):
        name = os.path.basename(dataset.path(cases[k][1]))
        if fast_chroma and name in _SUBSAMPLED:
            moved.append(np.abs(a.astype(int) - b.astype(int)).mean())
        else:
            assert np.array_equal(a, b), f"output {k} ({name}) differs without simplejpeg"
    if fast_chroma:
        assert 0 < max(moved) < 3, moved  # the fast upsampling is in effect, and changes little
    pillow_only = ImageTransform(dataset, 100, backend=backend, draft=draft)
    assert ("jpeg=simplejpeg-fast-chroma" in transforms[0].__qualname__) == fast_chroma
    assert "jpeg=" not in pillow_only.__qualname__
    assert (pillow_only.__qualname__ != transforms[0].__qualname__) == fast_chroma


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("simplejpeg", [True, False], ids=["simplejpeg", "pillow-decoder"])
def test_images_pillow_refuses_as_bombs_are_refused_by_every_decoder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str, simplejpeg: bool
) -> None:
    """A JPEG over Pillow's MAX_IMAGE_PIXELS is unreadable whichever decoder would run, so that both decoders
    replace the same samples."""
    dataset = _odd_images(tmp_path)
    if not simplejpeg:
        monkeypatch.setattr(imagenet, "_simplejpeg", lambda: None)
    elif not HAVE_SIMPLEJPEG:
        pytest.skip("simplejpeg is not installed")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500 * 375 // 4)
    with pytest.raises(Image.DecompressionBombError):
        ImageTransform(dataset, 32, backend=backend).load(0, None)


@pytest.mark.skipif(not HAVE_OPENCV, reason="OpenCV is not installed")
def test_opencv_resize_stays_close_to_pillows_antialiased_resize(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The OpenCV resize stays close to Pillow's antialiased bilinear (torchvision's) on a noise-heavy JPEG (the
    worst case for aliasing), for crops from 0.5x to 2.2x the output and the central crop, with draft mode on and
    off: under 1.25 levels (of 255) per pixel on average, under 3.5 for any one crop (plain bilinear: 2.5 and 6.7)."""
    dataset = _odd_images(tmp_path)
    draws = np.random.default_rng(1).random((40, 41))
    # the resize alone: both decode with the same settings (draft mode's fast chroma upsampling is simplejpeg's)
    monkeypatch.setattr(imagenet, "_simplejpeg", lambda: None)
    for draft in (True, False):
        opencv = ImageTransform(dataset, 224, backend="opencv", draft=draft)
        pillow = ImageTransform(dataset, 224, backend="pillow", draft=False)
        differences = [
            np.abs(opencv.load(index, uniforms).astype(int) - pillow.load(index, uniforms).astype(int)).mean()
            for index in (0, 2, 6)  # 500x375 4:2:0 and 4:4:4, 300x200
            for uniforms in [*draws, None]
        ]
        assert np.mean(differences) < 1.25 and max(differences) < 3.5, f"draft={draft}: {differences}"


def test_backend_is_checked_and_named_in_the_fingerprint(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unknown backend, or OpenCV asked for where it is missing, is a one-line ConfigError; pipelines that
    resize differently have different fingerprints (a zreq client refuses to mix their servers)."""
    dataset = ImageDirectory(folder)
    with pytest.raises(ConfigError, match="backend must be one of auto, opencv, pillow. Found: 'cuda'"):
        ImageTransform(dataset, SIZE, backend="cuda")
    pillow = image_pipeline(dataset=dataset, size=SIZE, backend="pillow")
    auto = image_pipeline(dataset=dataset, size=SIZE)
    assert (pillow.fingerprint == auto.fingerprint) == (not HAVE_OPENCV)
    assert "resize=pillow" in repr(ImageTransform(dataset, SIZE, backend="pillow"))
    monkeypatch.setattr(imagenet, "_opencv", lambda: None)
    assert ImageTransform(dataset, SIZE).backend == "pillow"
    with pytest.raises(ConfigError, match="backend='opencv' needs OpenCV"):
        ImageTransform(dataset, SIZE, backend="opencv")


class _Fake:
    digest = "fake"

    def __len__(self) -> int:
        return 1

    def read(self, index: int) -> bytes:
        raise OSError("no data")

    def label(self, index: int) -> int:
        return 0

    def describe(self, index: int) -> str:
        return "fake"


# the programs, end to end


def test_missing_directory_fails_with_one_line_error(tmp_path: Path) -> None:
    """serve-imagenet-dir on a missing directory exits 2 with one 'Error:' line, before opening any socket."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tensorcom_servers.imagenet_dir",
            "-d",
            str(tmp_path / "nowhere"),
            "zrep://127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"Error: image directory {str(tmp_path / 'nowhere')!r} does not exist"
    ]
    assert result.stdout == ""


def test_directory_server_streams_the_in_process_pipeline_bit_for_bit(
    folder: Path, tmp_path: Path, start_process: StartProcess
) -> None:
    """Two runs of serve-imagenet-dir with the same seed give identical batches, equal to the in-process pipeline;
    labels match each sample's class folder; the corrupt file is replaced and its path logged."""
    log_file = tmp_path / "server.log"
    args = ("-d", str(folder), "-b", str(BATCH), "--size", str(SIZE), "-w", "1", "-q")
    count = 12  # more than three epochs of 13 samples: the corrupt one is met
    expected = reference(folder, seed=11, count=count)
    dataset = ImageDirectory(folder)
    runs = []
    for _ in range(2):
        process, url = start_image_server(start_process, "imagenet_dir", log_file, *args)
        with Connection(url, seed=11, timeout=30) as connection:
            batches = []
            for _ in range(count):
                images, labels = connection.recv()
                assert images.shape == (BATCH, SIZE, SIZE, 3) and images.dtype == np.uint8
                assert labels.dtype == np.int64
                for label, index in zip(labels.tolist(), connection.last.indices, strict=True):
                    replaced = dataset.files[index] == CORRUPT
                    assert label == dataset.label(index + 1 if replaced else index)
                batches.append((images, labels))
        runs.append(batches)
        process.terminate()
        assert process.wait(timeout=20) == 0
    assert_same_batches(runs[0], expected)
    assert_same_batches(runs[1], expected)
    assert str(folder / "train" / CORRUPT) in log_file.read_text()


def test_exact_decode_serves_the_exact_pipeline(
    folder: Path, tmp_path: Path, start_process: StartProcess
) -> None:
    """serve-imagenet-dir --exact-decode sends the pipeline with ``draft=False`` bit for bit (its fingerprint
    differs from the default's), which is not the default stream."""
    args = ("-d", str(folder), "-b", str(BATCH), "--size", str(SIZE), "-w", "1", "-q", "--exact-decode")
    process, url = start_image_server(start_process, "imagenet_dir", tmp_path / "server.log", *args)
    with Connection(url, seed=3, timeout=30) as connection:
        received = [connection.recv() for _ in range(4)]
        state = connection.state()
    process.terminate()
    assert process.wait(timeout=20) == 0
    assert_same_batches(received, reference(folder, seed=3, count=4, draft=False))
    with directory_pipeline(directory=str(folder), seed=3, batch_size=BATCH, size=SIZE) as default:
        assert default.state()["fingerprint"] != state["fingerprint"]
        if HAVE_SIMPLEJPEG and HAVE_OPENCV:  # the default decodes 4:2:0 chroma fast: other pixels
            assert not same_batches(received, [next(default) for _ in range(4)])


def test_shard_server_sends_what_the_directory_server_sends(
    folder: Path, tmp_path: Path, start_process: StartProcess
) -> None:
    """serve-imagenet-shards on shards written from the folder gives the same stream as serve-imagenet-dir."""
    pattern = make_shards(folder, tmp_path / "shards", per_shard=4)
    common = ("-b", str(BATCH), "--size", str(SIZE), "-w", "1", "-q")
    received = []
    for program, source in (("imagenet_dir", ("-d", str(folder))), ("imagenet_shards", ("-s", pattern))):
        _, url = start_image_server(start_process, program, tmp_path / f"{program}.log", *source, *common)
        with Connection(url, seed=4, rank=1, world_size=2, timeout=30) as connection:
            received.append([connection.recv() for _ in range(6)])
    assert_same_batches(received[0], received[1])
    assert "train-002.tar:00000008" in (tmp_path / "imagenet_shards.log").read_text()  # the corrupt sample


@pytest.mark.parametrize(
    "server_scheme, client_scheme", [("zrpush", "zrpull"), ("zpub", "zsub")], ids=["push", "pub"]
)
def test_stream_mode_sends_the_seeded_pipeline(
    folder: Path, tmp_path: Path, start_process: StartProcess, server_scheme: str, client_scheme: str
) -> None:
    """With a stream URL the server runs its own --seed pipeline, sends batches with step metadata, and logs its
    rate in batches/s and images/s."""
    socket = tmp_path / "stream"
    _, _ = start_image_server(
        start_process,
        "imagenet_dir",
        tmp_path / "server.log",
        "-d",
        str(folder),
        "-b",
        str(BATCH),
        "--size",
        str(SIZE),
        "-w",
        "0",
        "--seed",
        "8",
        "--report",
        "0.2",
        url=f"{server_scheme}+ipc://{socket}",
    )
    with Connection(f"{client_scheme}+ipc://{socket}", timeout=30) as connection:
        received = [connection.recv() for _ in range(5)]
        assert connection.last.step == 4
    assert_same_batches(received, reference(folder, seed=8, count=5))
    wait_until(lambda: "images/s" in (tmp_path / "server.log").read_text())
    assert re.search(r"batches/s, \d+ images/s", (tmp_path / "server.log").read_text())


def test_tensorcom_serve_accepts_the_directory_factory(folder: Path, request_server: object) -> None:
    """`tensorcom serve tensorcom.datasets.imagenet:directory_pipeline -o directory=DIR` serves the same stream."""
    _, url = request_server(  # type: ignore[operator]
        "tensorcom.datasets.imagenet:directory_pipeline",
        f"directory={folder}",
        f"batch_size={BATCH}",
        f"size={SIZE}",
    )
    with Connection(url, seed=2, timeout=30) as connection:
        received = [connection.recv() for _ in range(3)]
    assert_same_batches(received, reference(folder, seed=2, count=3))


def test_write_shards_needs_a_number_field(folder: Path, tmp_path: Path) -> None:
    """A shard pattern without %d is refused."""
    with pytest.raises(ConfigError, match="%d"):
        write_shards(ImageDirectory(folder), str(tmp_path / "x.tar"))
