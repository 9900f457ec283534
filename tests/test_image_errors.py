"""Bad image files and bad tensors: a documented result or an ``ImageProcessingError`` that names the
file and the reason, with the cause chained; never a bare PIL/numpy/torch error, never a leaked file."""

from __future__ import annotations

import contextlib
import gc
import io
import os
import re
import sys
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps, UnidentifiedImageError

from vae_toolkit import (
    ImageProcessingError,
    ImageProcessor,
    VAEToolkitWarning,
    load_and_preprocess_image,
    pil_to_tensor,
    tensor_to_pil,
)
from vae_toolkit.image_utils import load_images

RNG = np.random.default_rng(20261)
PIXELS = RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)


def _encoded(fmt: str, arr: np.ndarray = PIXELS, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


PNG = _encoded("PNG")
JPEG = _encoded("JPEG", quality=95)
JPEG_SCAN = JPEG.index(b"\xff\xda")  # start of the entropy-coded data: headers before it are complete


@contextlib.contextmanager
def no_leaked_files():
    """Fail if the block leaves a file descriptor open or an unclosed file to the garbage collector.

    Objects older than the block are frozen, so ``gc.collect()`` only walks what the block created (fast).
    """
    unraisable = []
    old_hook = sys.unraisablehook
    sys.unraisablehook = unraisable.append
    fds_before = set(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else set()
    gc.freeze()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ResourceWarning)
            try:
                yield
            finally:
                gc.collect()
    finally:
        gc.unfreeze()
        sys.unraisablehook = old_hook
    fds_after = set(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else set()
    assert [u.exc_value for u in unraisable] == []
    assert fds_after <= fds_before, f"file descriptors left open: {fds_after - fds_before}"


def test_leak_check_detects_a_leak(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"x")
    with pytest.raises(AssertionError, match="ResourceWarning|file descriptors left open"):
        with no_leaked_files():
            handle = open(path, "rb")  # leaked on purpose
            del handle


# --- unreadable files: every entry point --------------------------------------------------------

# name -> (file contents, or None for "missing" / "dir"; message pattern; cause type)
BAD_FILES = {
    "missing.png": (None, r"Image file not found: {path}$", FileNotFoundError),
    "directory.png": ("dir", r"Failed to load image {path}: it is a directory", IsADirectoryError),
    "empty.png": (b"", r"Failed to load image {path}: not an image PIL can read", UnidentifiedImageError),
    "truncated.png": (PNG[: len(PNG) // 2], r"Failed to load image {path}: OSError: .*truncated", OSError),
    "truncated.jpg": (JPEG[: len(JPEG) // 2], r"(?i)Failed to load image {path}: OSError: .*truncated", OSError),
    "truncated_scan.jpg": (JPEG[: JPEG_SCAN + 40], r"(?i)Failed to load image {path}: OSError: .*truncated", OSError),
    "text.png": (
        b"this is not a PNG\n" * 10,
        r"Failed to load image {path}: not an image PIL can read",
        UnidentifiedImageError,
    ),
    "binary.dat": (
        bytes(RNG.integers(0, 256, 4096, dtype=np.uint8)),
        r"Failed to load image {path}: not an image",
        UnidentifiedImageError,
    ),
    "png_header_only.png": (PNG[:40], r"Failed to load image {path}: ", (OSError, SyntaxError)),
}


def _make_bad(tmp_path, name):
    contents = BAD_FILES[name][0]
    path = tmp_path / name
    if contents == "dir":
        path.mkdir()
    elif contents is not None:
        path.write_bytes(contents)
    return path


def _check_error(info, name, path):
    _, pattern, cause = BAD_FILES[name]
    assert re.search(pattern.format(path=re.escape(str(path))), str(info.value)), str(info.value)
    assert isinstance(info.value.__cause__, cause), repr(info.value.__cause__)


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_load_and_preprocess_image_bad_file(tmp_path, name):
    path = _make_bad(tmp_path, name)
    for arg in (path, str(path)):
        with no_leaked_files(), pytest.raises(ImageProcessingError) as info:
            load_and_preprocess_image(arg, target_size=16)
        _check_error(info, name, path)


@pytest.mark.parametrize("name", list(BAD_FILES))
@pytest.mark.parametrize("num_workers", [1, 2])
def test_load_images_bad_file(tmp_path, name, num_workers):
    good = tmp_path / "good.png"
    good.write_bytes(PNG)
    path = _make_bad(tmp_path, name)
    with no_leaked_files(), pytest.raises(ImageProcessingError) as info:
        load_images([good, path, good], target_size=16, num_workers=num_workers)
    _check_error(info, name, path)


@pytest.mark.parametrize("name", ["truncated.png", "truncated_scan.jpg"])
@pytest.mark.parametrize("target_size", [None, 8])
def test_pil_to_tensor_on_lazily_opened_truncated_file(tmp_path, name, target_size):
    path = _make_bad(tmp_path, name)
    with no_leaked_files():
        with Image.open(path) as img:  # opens fine; the pixel data is missing
            with pytest.raises(
                ImageProcessingError,
                match=rf"(?i)pil_to_tensor: cannot read {re.escape(str(path))}.*"
                r"OSError: .*truncated",
            ) as info:
                pil_to_tensor(img, target_size=target_size)
            assert isinstance(info.value.__cause__, OSError)
            with pytest.raises(ImageProcessingError, match=r"(?i)ImageProcessor.transform: cannot read .*truncated"):
                ImageProcessor(8).preprocess_pil(img)


def test_pil_to_tensor_on_closed_image(tmp_path):
    path = tmp_path / "ok.png"
    path.write_bytes(PNG)
    img = Image.open(path)
    img.close()
    with pytest.raises(ImageProcessingError, match=rf"cannot read {re.escape(str(path))}.*closed image") as info:
        pil_to_tensor(img)
    assert isinstance(info.value.__cause__, ValueError)


@pytest.mark.parametrize("bad", [123, None, 3.5, ["a.png"], {"path": "a.png"}])
def test_load_and_preprocess_image_non_path(bad):
    with pytest.raises(TypeError, match=r"image_path must be a str or pathlib.Path .*got " + type(bad).__name__):
        load_and_preprocess_image(bad)
    with pytest.raises(ImageProcessingError, match="image_path must be"):  # 0.1.0 raised ImageProcessingError
        load_and_preprocess_image(bad)


def test_load_and_preprocess_image_accepts_open_binary_file():
    tensor, image = load_and_preprocess_image(io.BytesIO(PNG), target_size=16)
    assert tensor.shape == (1, 3, 16, 16) and image.mode == "RGB"


@pytest.mark.parametrize("bad", [object(), "img", b"img", np.zeros((4, 4, 3), np.uint8), torch.zeros(3, 4, 4)])
@pytest.mark.parametrize("func", [pil_to_tensor, ImageProcessor(8).preprocess_pil], ids=["pil_to_tensor", "proc"])
def test_pil_functions_reject_non_images(bad, func):
    with pytest.raises(TypeError, match=r"expects a PIL.Image.Image, got " + type(bad).__name__) as info:
        func(bad)
    assert isinstance(info.value, ImageProcessingError)


# --- readable but unusual images: the documented result -----------------------------------------


def _write(tmp_path, img, name, **kwargs):
    path = tmp_path / name
    img.save(path, **kwargs)
    return path


def _loaded_pixels(path, size):
    with no_leaked_files():
        tensor, image = load_and_preprocess_image(path, target_size=size)
        batch = load_images([path], target_size=size, num_workers=1)
    assert torch.equal(batch, tensor)
    pixels = np.asarray(image)
    np.testing.assert_array_equal(np.asarray(tensor_to_pil(tensor)), pixels)
    return pixels


def test_rgba_drops_alpha(tmp_path):
    arr = RNG.integers(0, 256, (16, 16, 4), dtype=np.uint8)
    arr[0, 0, 3] = 0  # fully transparent pixels keep their stored colour
    pixels = _loaded_pixels(_write(tmp_path, Image.fromarray(arr, "RGBA"), "rgba.png"), 16)
    np.testing.assert_array_equal(pixels, arr[..., :3])


def test_la_expands_gray(tmp_path):
    gray = RNG.integers(0, 256, (16, 16), dtype=np.uint8)
    img = Image.merge("LA", [Image.fromarray(gray, "L"), Image.fromarray(gray[::-1].copy(), "L")])
    pixels = _loaded_pixels(_write(tmp_path, img, "la.png"), 16)
    np.testing.assert_array_equal(pixels, np.repeat(gray[..., None], 3, axis=-1))


def test_palette_is_looked_up(tmp_path):
    index = RNG.integers(0, 256, (16, 16), dtype=np.uint8)
    palette = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
    img = Image.frombytes("P", (16, 16), index.tobytes())
    img.putpalette(palette.tobytes())
    pixels = _loaded_pixels(_write(tmp_path, img, "p.png"), 16)
    np.testing.assert_array_equal(pixels, palette[index])


def test_cmyk_uses_pil_conversion(tmp_path):
    arr = RNG.integers(0, 256, (16, 16, 4), dtype=np.uint8)
    img = Image.frombytes("CMYK", (16, 16), arr.tobytes())
    pixels = _loaded_pixels(_write(tmp_path, img, "cmyk.tif"), 16)
    np.testing.assert_array_equal(pixels, np.asarray(img.convert("RGB")))


def test_16bit_within_8bit_range_is_exact(tmp_path):
    gray = RNG.integers(0, 256, (16, 16)).astype(np.uint16)
    path = _write(tmp_path, Image.fromarray(gray), "i16.png")
    with Image.open(path) as img:
        assert img.mode == "I;16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pixels = _loaded_pixels(path, 16)
    np.testing.assert_array_equal(pixels, np.repeat(gray[..., None], 3, axis=-1).astype(np.uint8))


def test_16bit_full_range_saturates_with_a_warning(tmp_path):
    gray = RNG.integers(0, 65536, (16, 16)).astype(np.uint16)
    path = _write(tmp_path, Image.fromarray(gray), "i16.png")
    expected = np.repeat(np.minimum(gray, 255)[..., None], 3, axis=-1).astype(np.uint8)  # PIL's conversion
    pattern = rf"{re.escape(str(path))}: I;16 image with values in \[\d+, \d+\] is converted .* clipping .*Scale it"
    with pytest.warns(VAEToolkitWarning, match=pattern):
        tensor, image = load_and_preprocess_image(path, target_size=16)
    np.testing.assert_array_equal(np.asarray(image), expected)
    with Image.open(path) as img, pytest.warns(VAEToolkitWarning, match="I;16 image with values in"):
        np.testing.assert_array_equal(np.asarray(tensor_to_pil(pil_to_tensor(img))), expected)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_not_applied(tmp_path, orientation):
    arr = RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _write(tmp_path, Image.fromarray(arr), "exif.png", exif=exif)
    with Image.open(path) as img:
        assert img.getexif()[0x0112] == orientation  # the tag is there, and applying it would change pixels
        assert not np.array_equal(np.asarray(ImageOps.exif_transpose(img)), arr)
        np.testing.assert_array_equal(np.asarray(tensor_to_pil(pil_to_tensor(img))), arr)
    np.testing.assert_array_equal(_loaded_pixels(path, 16), arr)


# --- decompression bombs ------------------------------------------------------------------------


@pytest.fixture
def bomb(tmp_path, monkeypatch):
    """A 40x40 PNG (1600 pixels); the test lowers PIL.Image.MAX_IMAGE_PIXELS below it."""
    path = tmp_path / "bomb.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(path)
    return lambda limit: (monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit), path)[1]


@pytest.mark.parametrize("loader", ["load_and_preprocess_image", "load_images"])
def test_decompression_bomb_over_twice_the_limit_is_an_error(bomb, loader):
    path = bomb(700)
    with (
        no_leaked_files(),
        pytest.raises(
            ImageProcessingError,
            match=rf"Failed to load image {re.escape(str(path))}:"
            r" .*1600 pixels.*Raise PIL.Image.MAX_IMAGE_PIXELS",
        ) as info,
    ):
        if loader == "load_images":
            load_images([path], target_size=40)
        else:
            load_and_preprocess_image(path, target_size=40)
    assert isinstance(info.value.__cause__, Image.DecompressionBombError)


def test_decompression_bomb_over_the_limit_warns_and_loads(bomb):
    path = bomb(1000)
    with no_leaked_files(), pytest.warns(Image.DecompressionBombWarning, match="1600 pixels"):
        tensor, _ = load_and_preprocess_image(path, target_size=40)
    assert tensor.shape == (1, 3, 40, 40)


def test_decompression_bomb_warning_as_error_is_an_image_processing_error(bomb):
    path = bomb(1000)
    with no_leaked_files(), warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        pattern = rf"Failed to load image {re.escape(str(path))}: .*1600"
        with pytest.raises(ImageProcessingError, match=pattern) as info:
            load_and_preprocess_image(path, target_size=40)
    assert isinstance(info.value.__cause__, Image.DecompressionBombWarning)


# --- fuzz: corrupted files ----------------------------------------------------------------------


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    source=st.sampled_from(["png", "jpeg"]),
    cut=st.integers(0, 10_000),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), max_size=8),
)
def test_fuzz_corrupted_files(tmp_path, source, cut, flips):
    data = bytearray(PNG if source == "png" else JPEG)
    for pos, xor in flips:
        data[pos % len(data)] ^= xor
    data = bytes(data[: max(cut, 0)]) if cut < len(data) else bytes(data)
    path = tmp_path / f"fuzz.{source}"
    path.write_bytes(data)
    with no_leaked_files(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PIL may warn about odd metadata
        try:
            tensor, image = load_and_preprocess_image(path, target_size=16)
        except ImageProcessingError as err:
            assert str(path) in str(err)
            assert err.__cause__ is not None or "does not match required size" in str(err)
        else:
            assert tensor.shape == (1, 3, 16, 16) and tensor.dtype == torch.float32
            assert image.mode == "RGB"
            assert -1.0 <= float(tensor.min()) and float(tensor.max()) <= 1.0
