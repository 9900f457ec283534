"""load_for_encoding (the dataset encoder's reader), open_image without the RGB copy, and available_cpus."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin

import vae_toolkit
from vae_toolkit import (
    ImageProcessingError,
    ImageProcessor,
    _cpus,
    available_cpus,
    image_utils,
    load_and_preprocess_image,
    load_for_encoding,
    open_image,
    pil_to_tensor,
)
from vae_toolkit.image_utils import center_crop_to_multiple


def _photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth shading, edges, fine texture and noise: content on which a DCT-scaled decode is realistic."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([x / width * 180 + 40, y / height * 160 + 50, (x + y) / (width + height) * 120 + 60], axis=-1)
    img += (30 * np.sin(x / 37.0 + seed) * np.cos(y / 23.0))[..., None]
    img[(x - width / 3) ** 2 + (y - height / 2) ** 2 < (height / 5) ** 2] += 50  # a disc with a sharp edge
    img += (6 * np.sin(x / 1.7) * np.sin(y / 2.3))[..., None]  # fine texture
    img += rng.normal(0.0, 3.0, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _stored(path: Path) -> tuple[str, tuple[int, int]]:
    """The file's own mode and size."""
    with Image.open(path) as img:
        return img.mode, img.size


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((((a.double() - b.double()) * 127.5) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A 1024x768 JPEG (large enough to be decoded at reduced scale for sizes <= 384) and smaller or other files."""
    d = tmp_path_factory.mktemp("load_for_encoding")
    big = _photo(1024, 768)
    paths = {
        "big_jpeg": d / "big.jpg",
        "small_jpeg": d / "small.jpg",
        "png": d / "big.png",
        "gray_jpeg": d / "gray.jpg",
        "rgba_png": d / "rgba.png",
        "odd_png": d / "odd.png",
    }
    Image.fromarray(big).save(paths["big_jpeg"], quality=90)
    Image.fromarray(big[:300, :400]).save(paths["small_jpeg"], quality=90)
    Image.fromarray(big).save(paths["png"])
    Image.fromarray(big).convert("L").save(paths["gray_jpeg"], quality=90)
    Image.fromarray(big[:100, :120]).convert("RGBA").save(paths["rgba_png"])
    Image.fromarray(big[:29, :37]).save(paths["odd_png"])
    return paths


class _DraftSpy:
    """Records each JPEG ``draft`` call and the size it leaves the image at."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[tuple[int, int], tuple[int, int]]] = []  # (size before, size after)
        original = JpegImagePlugin.JpegImageFile.draft

        def draft(img, mode, size):
            before = img.size
            result = original(img, mode, size)
            self.calls.append((before, img.size))
            return result

        monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", draft)


# --- the exact reader ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["big_jpeg", "small_jpeg", "png", "gray_jpeg", "rgba_png"])
@pytest.mark.parametrize("size", [64, 200, 512])
def test_exact_reader_is_pil_to_tensor_of_open_image_bit_for_bit(files, name, size):
    expected = pil_to_tensor(open_image(files[name]), target_size=size)
    out = load_for_encoding(files[name], size, exact=True)
    assert out.dtype == torch.float32 and out.shape == (3, size, size) and out.is_contiguous()
    assert torch.equal(out, expected)


def test_exact_reader_never_drafts(files, monkeypatch):
    spy = _DraftSpy(monkeypatch)
    load_for_encoding(files["big_jpeg"], 64, exact=True)
    assert spy.calls == []


# --- the fast reader ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "decoded"), [(384, (512, 384)), (256, (512, 384)), (128, (256, 192)), (64, (128, 96))]
)
def test_fast_reader_decodes_a_large_jpeg_at_the_largest_scale_that_covers_size(files, monkeypatch, size, decoded):
    spy = _DraftSpy(monkeypatch)
    fast = load_for_encoding(files["big_jpeg"], size)
    assert spy.calls == [((1024, 768), decoded)]  # 1/2, 1/2 (768 // 256 = 3), 1/4, 1/8: shorter side still >= size
    exact = load_for_encoding(files["big_jpeg"], size, exact=True)
    assert fast.dtype == torch.float32 and fast.shape == exact.shape == (3, size, size) and fast.is_contiguous()
    assert fast.min() >= -1 and fast.max() <= 1
    assert not torch.equal(fast, exact)  # it really took the other path...
    assert _psnr(fast, exact) > 40  # ...and gives the same picture


@pytest.mark.parametrize(("name", "size"), [("png", 128), ("small_jpeg", 256), ("big_jpeg", 385), ("gray_jpeg", 400)])
def test_fast_reader_equals_the_exact_one_for_pngs_and_jpegs_under_twice_the_size(files, monkeypatch, name, size):
    spy = _DraftSpy(monkeypatch)
    fast = load_for_encoding(files[name], size)
    assert spy.calls == []
    assert torch.equal(fast, load_for_encoding(files[name], size, exact=True))


def test_fast_reader_converts_a_grayscale_jpeg_to_rgb_as_the_exact_one(files):
    fast = load_for_encoding(files["gray_jpeg"], 128)
    assert torch.equal(fast[0], fast[1]) and torch.equal(fast[1], fast[2])
    assert _psnr(fast, load_for_encoding(files["gray_jpeg"], 128, exact=True)) > 40


def test_fast_reader_maps_the_full_image_when_the_scale_does_not_divide_its_size(tmp_path):
    # 1001x771 at 1/4 decodes to 251x193, of which the image covers 250.25x192.75: the resize reads that box,
    # so the output is aligned with the exact reader's (a plain resize of 251x193 would shift it).
    path = tmp_path / "odd.jpg"
    Image.fromarray(_photo(1001, 771, seed=3)).save(path, quality=90)
    fast, exact = load_for_encoding(path, 160), load_for_encoding(path, 160, exact=True)
    with Image.open(path) as img:
        img.draft("RGB", (160, 160))
        img.load()
        shifted = pil_to_tensor(img, target_size=160)
    assert img.size == (251, 193)
    assert _psnr(fast, exact) > _psnr(shifted, exact) + 1


def test_both_readers_turn_an_exif_rotated_jpeg_as_viewers_do(tmp_path, monkeypatch):
    # Stored landscape, left half dark, with EXIF "rotate 90 degrees clockwise to display": both readers apply the
    # tag (ImageOps.exif_transpose), so the dark half is on top in both; open_image keeps the stored pixels.
    from PIL import ImageOps

    arr = _photo(1024, 512)
    arr[:, :512] //= 4
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    path = tmp_path / "rotated.jpg"
    Image.fromarray(arr).save(path, quality=90, exif=exif)
    spy = _DraftSpy(monkeypatch)
    fast, exact = load_for_encoding(path, 128), load_for_encoding(path, 128, exact=True)
    assert len(spy.calls) == 1
    assert torch.equal(exact, pil_to_tensor(ImageOps.exif_transpose(open_image(path)), target_size=128))
    assert open_image(path).size == (1024, 512)
    assert _psnr(fast, exact) > 35
    for out in (fast, exact):
        assert out[:, :48, :].mean() < out[:, 80:, :].mean() - 0.5  # dark on top: turned as shown


def test_fast_reader_output_reproduces_across_threads(files):
    paths = [files["big_jpeg"], files["png"], files["small_jpeg"], files["gray_jpeg"]] * 2
    expected = [load_for_encoding(p, 96) for p in paths]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda p: load_for_encoding(p, 96), paths))
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_fast_reader_keeps_the_decompression_bomb_limit(files, monkeypatch):
    # The limit is checked on the file's own size, before a reduced decode could slip under it.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1024 * 768 // 3)  # twice this raises DecompressionBombError
    with pytest.raises(ImageProcessingError, match=r"big\.jpg: .*decompression bomb.*Raise PIL\.Image\.MAX_IMAGE"):
        load_for_encoding(files["big_jpeg"], 64)


def test_load_for_encoding_is_exported():
    assert vae_toolkit.load_for_encoding is load_for_encoding
    assert "load_for_encoding" in vae_toolkit.__all__ and "available_cpus" in vae_toolkit.__all__


# --- size=None ----------------------------------------------------------------------------------


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("name", ["odd_png", "big_jpeg", "rgba_png"])
def test_no_size_crops_to_a_multiple_of_8_at_full_size(files, name, exact):
    expected = pil_to_tensor(center_crop_to_multiple(open_image(files[name]), 8))
    out = load_for_encoding(files[name], exact=exact)
    assert out.shape[1] % 8 == 0 and out.shape[2] % 8 == 0
    assert torch.equal(out, expected)


def test_no_size_on_an_odd_image_keeps_the_centre(files):
    out = load_for_encoding(files["odd_png"])  # 37x29 -> 32x24, offset (2, 2)
    assert out.shape == (3, 24, 32)
    assert torch.equal(out, pil_to_tensor(open_image(files["odd_png"]).crop((2, 2, 34, 26))))


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [None, 64])
@pytest.mark.parametrize("exact", [False, True])
def test_missing_file_names_the_path(tmp_path, size, exact):
    path = tmp_path / "nope.jpg"
    with pytest.raises(ImageProcessingError, match=r"Image file not found: .*nope\.jpg"):
        load_for_encoding(path, size, exact=exact)


@pytest.mark.parametrize("exact", [False, True])
def test_corrupt_file_names_the_path(tmp_path, exact):
    path = tmp_path / "corrupt.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with pytest.raises(ImageProcessingError, match=r"Failed to load image .*corrupt\.jpg") as info:
        load_for_encoding(path, 64, exact=exact)
    assert info.value.__cause__ is not None


@pytest.mark.parametrize("exact", [False, True])
def test_truncated_large_jpeg_names_the_path(files, tmp_path, exact):
    path = tmp_path / "truncated.jpg"
    path.write_bytes(files["big_jpeg"].read_bytes()[:20_000])
    with pytest.raises(ImageProcessingError, match=r"Failed to load image .*truncated\.jpg: OSError: .*truncated"):
        load_for_encoding(path, 64, exact=exact)


def test_image_smaller_than_8_pixels_without_size_names_the_path(tmp_path):
    path = tmp_path / "thin.png"
    Image.new("RGB", (5, 40)).save(path)
    with pytest.raises(ValueError, match=r"thin\.png: image is 5x40; it needs at least 8x8 pixels") as info:
        load_for_encoding(path)
    assert isinstance(info.value, ImageProcessingError)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"size": 0}, ValueError, r"target_size must be >= 1 .* got 0"),
        ({"size": 64.0}, TypeError, r"target_size must be an int .* got float: 64\.0"),
        ({"size": True}, TypeError, r"target_size must be an int .* got bool"),
        ({"size": 64, "exact": "yes"}, TypeError, r"exact must be True or False, got str: 'yes'"),
        ({"size": 64, "exact": 1}, TypeError, r"exact must be True or False, got int: 1"),
    ],
)
def test_invalid_arguments(files, kwargs, error, match):
    with pytest.raises(error, match=match) as info:
        load_for_encoding(files["png"], **kwargs)
    assert isinstance(info.value, ImageProcessingError)


def test_size_is_keyword_or_positional_and_exact_keyword_only(files):
    with pytest.raises(TypeError, match="positional"):
        load_for_encoding(files["png"], 64, True)  # type: ignore[misc]


# --- no full-size copy of RGB images ------------------------------------------------------------


class _CopySpy:
    """Counts ``convert`` and ``copy`` calls on PIL images, by source mode."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, str]] = []
        lock = threading.Lock()
        convert, copy = Image.Image.convert, Image.Image.copy

        def spy_convert(img, *args, **kwargs):
            with lock:
                self.calls.append(("convert", img.mode))
            return convert(img, *args, **kwargs)

        def spy_copy(img):
            with lock:
                self.calls.append(("copy", img.mode))
            return copy(img)

        monkeypatch.setattr(Image.Image, "convert", spy_convert)
        monkeypatch.setattr(Image.Image, "copy", spy_copy)


@pytest.mark.parametrize("name", ["big_jpeg", "png", "small_jpeg"])
def test_rgb_files_are_not_copied(files, monkeypatch, name):
    spy = _CopySpy(monkeypatch)
    img = open_image(files[name])
    for size, exact in ((None, False), (64, True), (64, False)):
        load_for_encoding(files[name], size, exact=exact)
    with Image.open(files[name]) as lazy:
        ImageProcessor(64).preprocess_pil(lazy)
        pil_to_tensor(lazy, target_size=64)
    assert spy.calls == []
    assert type(img) is Image.Image and img.mode == "RGB"  # the same kind of object convert("RGB") returned
    assert img.size == _stored(files[name])[1]


def test_load_and_preprocess_image_does_not_copy_an_rgb_file(tmp_path, monkeypatch):
    path = tmp_path / "sq.jpg"
    Image.fromarray(_photo(64, 64)).save(path, quality=90)
    spy = _CopySpy(monkeypatch)
    x, img = load_and_preprocess_image(path, target_size=64)
    y, _ = ImageProcessor(64).load_and_preprocess(path)
    assert spy.calls == []
    assert torch.equal(x, y)
    assert torch.equal(x[0], pil_to_tensor(img))
    with Image.open(path) as reference:  # the pixels and info of 0.1.0's convert("RGB")
        converted = reference.convert("RGB")
    assert np.array_equal(np.asarray(img), np.asarray(converted)) and img.info == converted.info


@pytest.mark.parametrize("name", ["gray_jpeg", "rgba_png"])
def test_other_modes_are_still_converted(files, monkeypatch, name):
    spy = _CopySpy(monkeypatch)
    img = open_image(files[name])
    assert img.mode == "RGB" and ("convert", _stored(files[name])[0]) in spy.calls


def test_open_image_result_is_independent_of_the_file(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(_photo(40, 30)).save(path)
    img = open_image(path)
    before = np.asarray(img).copy()
    os.remove(path)  # closed on return, and the pixels are in memory
    img.putpixel((0, 0), (1, 2, 3))
    assert np.array_equal(np.asarray(img)[1:], before[1:])


# --- available_cpus -----------------------------------------------------------------------------


@pytest.fixture
def no_cgroup(monkeypatch, tmp_path):
    monkeypatch.setattr(_cpus, "_CGROUP_CPU_MAX", str(tmp_path / "absent"))


def test_available_cpus_follows_the_affinity_mask(monkeypatch, no_cgroup):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert available_cpus() == 3


def test_available_cpus_falls_back_to_cpu_count(monkeypatch, no_cgroup):
    def refuse(pid):
        raise OSError("not permitted")

    monkeypatch.setattr(os, "sched_getaffinity", refuse, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert available_cpus() == 6
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # macOS, Windows
    assert available_cpus() == 6
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert available_cpus() == 1


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [("150000 100000\n", 2), ("50000 100000\n", 1), ("800000 100000\n", 4), ("max 100000\n", 4), ("garbage", 4)],
)
def test_available_cpus_respects_a_cgroup_quota(monkeypatch, tmp_path, cpu_max, expected):
    quota = tmp_path / "cpu.max"
    quota.write_text(cpu_max)
    monkeypatch.setattr(_cpus, "_CGROUP_CPU_MAX", str(quota))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert available_cpus() == expected


def test_load_images_uses_available_cpus_by_default(files, monkeypatch):
    seen = []

    class Pool(ThreadPoolExecutor):
        def __init__(self, max_workers=None, **kwargs):
            seen.append(max_workers)
            super().__init__(max_workers=max_workers, **kwargs)

    monkeypatch.setattr(image_utils, "available_cpus", lambda: 3)
    monkeypatch.setattr(image_utils, "ThreadPoolExecutor", Pool)
    square = files["png"].parent / "square.png"
    Image.fromarray(_photo(16, 16)).save(square)
    vae_toolkit.load_images([square] * 5, target_size=16)
    assert seen == [3]
