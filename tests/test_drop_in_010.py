"""Inputs where a differential run against the 0.1.0 wheel found 0.2.0 failing differently.

Each test names the item it guards; the choices for items 6-8 are listed in CHANGELOG.md.
"""

from __future__ import annotations

import ast
import io
import struct
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

import vae_toolkit
from vae_toolkit import (
    ImageProcessingError,
    ImageProcessor,
    VAEToolkitWarning,
    load_and_preprocess_image,
    pil_to_tensor,
    tensor_to_pil,
)
from vae_toolkit.image_utils import load_images


def sd_values(rgb: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """0.1.0's value (v / 255 - 0.5) / 0.5 of an HWC uint8 array, computed as torchvision does in ``dtype``."""
    x = torch.from_numpy(rgb.copy()).permute(2, 0, 1).to(dtype).div(255)
    return x.sub(torch.tensor(0.5, dtype=dtype)).div(torch.tensor(0.5, dtype=dtype))


# --- 1. explicit-endian 16-bit modes ------------------------------------------------------------

ENDIAN_MODES = ["I;16B", "I;16L", "I;16N"]


@pytest.mark.parametrize("mode", ENDIAN_MODES)
@pytest.mark.parametrize("entry", ["pil_to_tensor", "transform", "preprocess_pil"])
def test_explicit_endian_16bit_images_convert_like_010(mode, entry):
    img = Image.frombytes(mode, (4, 4), bytes(range(32)))
    expected = sd_values(np.asarray(img.convert("RGB")))
    with pytest.warns(VAEToolkitWarning, match=rf"{mode} image with values in \[\d+, \d+\] is converted to 8-bit"):
        out = {
            "pil_to_tensor": lambda: pil_to_tensor(img),
            "transform": lambda: ImageProcessor(4).transform(img),
            "preprocess_pil": lambda: ImageProcessor(4).preprocess_pil(img)[0],
        }[entry]()
    assert torch.equal(out, expected)


@pytest.mark.parametrize("mode", ENDIAN_MODES)
def test_explicit_endian_16bit_images_within_8_bits_do_not_warn(mode):
    little = "I;16B" not in mode
    data = b"".join(bytes((v, 0) if little else (0, v)) for v in range(16))  # values 0..15
    img = Image.frombytes(mode, (4, 4), data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = pil_to_tensor(img, normalize=False)
    assert torch.equal(out[0].flatten() * 255, torch.arange(16, dtype=torch.float32))


def test_big_endian_16bit_tiff_loads_like_010(tmp_path):
    path = tmp_path / "be16.tif"
    Image.frombytes("I;16B", (4, 4), bytes(range(32))).save(path)
    with Image.open(path) as img:
        assert img.mode == "I;16B"  # how Pillow opens a big-endian 16-bit TIFF
        expected = sd_values(np.asarray(img.convert("RGB")))
    with pytest.warns(VAEToolkitWarning, match="I;16B image"):
        x, rgb = load_and_preprocess_image(path, target_size=4)
    assert torch.equal(x[0], expected) and rgb.mode == "RGB"
    with pytest.warns(VAEToolkitWarning, match="I;16B image"):
        assert torch.equal(load_images([path, path], target_size=4, num_workers=1)[1], expected)


# --- 2. every decode failure is an ImageProcessingError naming the file ------------------------


def dds_unknown_pixel_format() -> bytes:
    """A DDS header whose pixel-format flags are 0: Pillow raises NotImplementedError."""
    return b"DDS " + struct.pack("<I", 124) + struct.pack("<3I", 0x1007, 4, 4) + bytes(108)


def tiff_float_strip_offsets() -> bytes:
    """A TIFF whose StripOffsets tag is typed FLOAT: Pillow raises TypeError while decoding."""
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(buf, "TIFF")
    data = bytearray(buf.getvalue())
    ifd = struct.unpack("<I", data[4:8])[0]
    for i in range(struct.unpack("<H", data[ifd : ifd + 2])[0]):
        entry = ifd + 2 + 12 * i
        if struct.unpack("<H", data[entry : entry + 2])[0] == 273:  # StripOffsets
            data[entry + 2 : entry + 4] = struct.pack("<H", 11)  # FLOAT
    return bytes(data)


@pytest.mark.parametrize(
    "name, data, cause",
    [("bad.dds", dds_unknown_pixel_format(), NotImplementedError), ("bad.tif", tiff_float_strip_offsets(), TypeError)],
)
def test_corrupt_files_raise_image_processing_error_naming_the_file(tmp_path, name, data, cause):
    path = tmp_path / name
    path.write_bytes(data)
    for load in (lambda: load_and_preprocess_image(path, 4), lambda: load_images([path], 4)):
        with pytest.raises(ImageProcessingError, match=rf"Failed to load image .*{name}: {cause.__name__}") as info:
            load()
        assert isinstance(info.value.__cause__, cause)


def test_corrupt_tiff_opened_lazily_raises_image_processing_error(tmp_path):
    path = tmp_path / "bad.tif"
    path.write_bytes(tiff_float_strip_offsets())
    for convert in (pil_to_tensor, ImageProcessor(4).transform):
        with Image.open(path) as img:
            with pytest.raises(ImageProcessingError, match=r"cannot read .*bad\.tif .*TypeError") as info:
                convert(img)
        assert isinstance(info.value.__cause__, TypeError)


class OddDecoderError(Exception):
    """Stands for whatever a format plugin may raise tomorrow."""


@pytest.fixture
def odd_png_decoder(monkeypatch, tmp_path):
    path = tmp_path / "odd.png"
    Image.new("RGB", (4, 4)).save(path)

    def load(self):
        raise OddDecoderError("plugin bug")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", load)
    return path


@pytest.mark.parametrize("entry", ["load_and_preprocess_image", "load_images", "pil_to_tensor", "transform"])
def test_any_exception_while_decoding_becomes_image_processing_error(odd_png_decoder, entry):
    path = odd_png_decoder
    with Image.open(path) as img:
        calls = {
            "load_and_preprocess_image": lambda: load_and_preprocess_image(path, 4),
            "load_images": lambda: load_images([path, path], 4, num_workers=2),
            "pil_to_tensor": lambda: pil_to_tensor(img),
            "transform": lambda: ImageProcessor(4).transform(img),
        }
        with pytest.raises(ImageProcessingError, match=r"odd\.png.*OddDecoderError: plugin bug") as info:
            calls[entry]()
    assert isinstance(info.value.__cause__, OddDecoderError)


@pytest.mark.parametrize("entry", ["load_and_preprocess_image", "pil_to_tensor"])
def test_warnings_turned_into_errors_are_not_disguised(tmp_path, entry):
    """The clipping VAEToolkitWarning under an "error" filter reaches the caller as itself."""
    path = tmp_path / "wide.tif"
    Image.new("I", (4, 4), 1000).save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", VAEToolkitWarning)
        with Image.open(path) as img, pytest.raises(VAEToolkitWarning, match="converted to 8-bit RGB by clipping"):
            load_and_preprocess_image(path, 4) if entry == "load_and_preprocess_image" else pil_to_tensor(img)


# --- 3. zero-size 16/32-bit images --------------------------------------------------------------


@pytest.mark.parametrize("mode", ["I", "F", "I;16", "I;16L", "I;16B", "I;16N"])
def test_zero_size_wide_images_behave_like_any_empty_image(mode):
    img = Image.new(mode, (0, 5))
    # As 0.1.0 (and as for an empty RGB image): without resizing, an empty tensor.
    assert pil_to_tensor(img).shape == (3, 5, 0)
    with pytest.raises(ImageProcessingError, match=r"pil_to_tensor: cannot resize an image of size \(0, 5\) to 4x4"):
        pil_to_tensor(img, target_size=4)
    with pytest.raises(ImageProcessingError, match=r"ImageProcessor.transform: cannot resize an image of size"):
        ImageProcessor(4).preprocess_pil(img)


# --- 4. closed images ---------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["pil_to_tensor", "transform", "preprocess_pil"])
def test_image_closed_before_decoding_raises_image_processing_error(tmp_path, entry):
    path = tmp_path / "c.png"
    Image.new("RGB", (4, 4)).save(path)
    with Image.open(path) as img:
        pass
    convert = {
        "pil_to_tensor": pil_to_tensor,
        "transform": ImageProcessor(4).transform,
        "preprocess_pil": ImageProcessor(4).preprocess_pil,
    }[entry]
    with pytest.raises(ImageProcessingError, match=r"c\.png: it is a closed image .*call image\.load\(\) before"):
        convert(img)


def test_image_decoded_before_closing_still_converts(tmp_path):
    path = tmp_path / "c.png"
    Image.new("RGB", (4, 4), (255, 0, 0)).save(path)
    with Image.open(path) as img:
        img.load()
    assert pil_to_tensor(img)[:, 0, 0].tolist() == [1.0, -1.0, -1.0]


# --- 5. float64 values beyond float32 -------------------------------------------------------------


def test_huge_finite_float64_values_are_reported_as_such():
    t = torch.zeros(3, 2, 2, dtype=torch.float64)
    t[0, 0, 0], t[1, 0, 0] = 1e300, -1e300
    with pytest.warns(VAEToolkitWarning) as record:
        img = tensor_to_pil(t)
    messages = [str(w.message) for w in record]
    assert len(messages) == 1
    assert "2 of 12 float64 values are finite but beyond float32's range" in messages[0]
    assert "NaN" not in messages[0]
    assert img.getpixel((0, 0)) == (255, 0, 128)  # clamped, as 1.5 or -7 would be


def test_nan_and_huge_float64_values_are_counted_apart():
    t = torch.zeros(3, 2, 2, dtype=torch.float64)
    t[0, 0, 0], t[0, 0, 1], t[0, 1, 0] = 1e300, float("nan"), float("inf")
    with pytest.warns(VAEToolkitWarning) as record:
        tensor_to_pil(t)
    messages = sorted(str(w.message) for w in record)
    assert len(messages) == 2
    assert "1 of 12 float64 values are finite but beyond float32's range" in messages[0]
    assert "2 of 12 values are NaN or infinite" in messages[1]


# --- 6. ImageProcessor.transform converts any mode to RGB first (choice) -------------------------


@pytest.mark.parametrize("mode", ["L", "LA", "P", "F", "I", "I;16", "CMYK", "YCbCr", "LAB", "HSV", "RGBA", "1"])
def test_transform_converts_every_mode_to_rgb_first(mode):
    rgb = Image.fromarray(np.random.default_rng(6).integers(0, 256, (10, 12, 3), dtype=np.uint8))
    img = rgb.convert(mode) if mode not in ("LAB", "HSV") else Image.merge(mode, rgb.split())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VAEToolkitWarning)  # I/F/I;16 hold values <= 255 here; nothing to clip
        out = ImageProcessor(8).transform(img)
    assert out.shape == (3, 8, 8)
    assert torch.equal(out, ImageProcessor(8).transform(img.convert("RGB")))


def test_transform_is_a_plain_callable_without_torchvision_internals():
    transform = ImageProcessor(8).transform
    assert callable(transform) and not hasattr(transform, "transforms")
    assert repr(transform) == "Transform(resize=8, center_crop=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))"


# --- 7. ImageProcessor accepts any mean/std at construction (choice) -----------------------------


def test_image_processor_with_unused_bad_mean_loads_files_like_010(tmp_path):
    Image.new("RGB", (7, 7), (10, 20, 30)).save(tmp_path / "a.png")
    proc = ImageProcessor(7, (0.5, 0.5))
    x, _ = proc.load_and_preprocess(tmp_path / "a.png")
    assert torch.equal(x, load_and_preprocess_image(tmp_path / "a.png", 7)[0])
    with pytest.raises(ValueError, match=r"normalize_mean needs 3 values \(one per RGB channel\) or 1, got 2"):
        proc.transform(Image.new("RGB", (7, 7)))


# --- 8. tensors follow torch's default dtype, as 0.1.0 (choice) ----------------------------------


@pytest.fixture(params=[torch.float64, torch.float16, torch.bfloat16])
def default_dtype(request):
    saved = torch.get_default_dtype()
    torch.set_default_dtype(request.param)
    yield request.param
    torch.set_default_dtype(saved)


def test_every_image_to_tensor_function_follows_the_default_dtype(default_dtype, tmp_path):
    arr = np.random.default_rng(8).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    img = Image.fromarray(arr)
    expected = sd_values(arr, default_dtype)
    outputs = {
        "load_and_preprocess_image": load_and_preprocess_image(tmp_path / "a.png", 6)[0][0],
        "load_images": load_images([tmp_path / "a.png"] * 2, 6)[1],
        "pil_to_tensor": pil_to_tensor(img),
        "pil_to_tensor(target_size)": pil_to_tensor(img, target_size=6),
        "transform": ImageProcessor(6).transform(img),
        "preprocess_pil": ImageProcessor(6).preprocess_pil(img)[0],
    }
    for name, out in outputs.items():
        assert out.dtype == default_dtype, name
        assert torch.equal(out, expected), name
    unit = pil_to_tensor(img, normalize=False)
    assert unit.dtype == default_dtype
    assert torch.equal(unit, torch.from_numpy(arr.copy()).permute(2, 0, 1).to(default_dtype).div(255))


def test_float64_values_equal_010s():
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        out = pil_to_tensor(Image.new("RGB", (1, 1), (77, 0, 255)))
    finally:
        torch.set_default_dtype(saved)
    assert out[:, 0, 0].tolist() == [-0.39607843137254906, -1.0, 1.0]  # printed by vae-toolkit 0.1.0


def test_custom_mean_std_in_float64_match_torchvision_arithmetic(default_dtype):
    arr = np.random.default_rng(9).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out = ImageProcessor(8, mean, std).transform(Image.fromarray(arr))
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).to(default_dtype).div(255)
    expected = x.sub(torch.tensor(mean, dtype=default_dtype).view(-1, 1, 1))
    expected = expected.div(torch.tensor(std, dtype=default_dtype).view(-1, 1, 1))
    assert out.dtype == default_dtype and torch.equal(out, expected)


# --- 9. a lazily opened image shared between threads ---------------------------------------------


def test_lazily_opened_image_shared_between_threads_converts_correctly(tmp_path):
    path = tmp_path / "noise.png"
    arr = np.random.default_rng(10).integers(0, 256, (192, 192, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    expected = sd_values(arr)
    threads, rounds = 6, 8
    for _ in range(rounds):
        img = Image.open(path)
        barrier = threading.Barrier(threads)
        results: list[object] = [None] * threads

        def work(i: int, img: Image.Image = img, barrier: threading.Barrier = barrier, results=results) -> None:
            barrier.wait()
            try:
                results[i] = pil_to_tensor(img)
            except Exception as err:
                results[i] = err

        pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        img.close()
        for result in results:
            assert isinstance(result, torch.Tensor), repr(result)
            assert torch.equal(result, expected)


# --- the clipping warning points at the caller, whatever the entry point ---------------------------------


@pytest.mark.parametrize("entry", ["load_and_preprocess_image", "pil_to_tensor", "transform", "preprocess_pil"])
def test_clipping_warning_points_at_the_callers_line(tmp_path, entry):
    path = tmp_path / "wide.tif"
    Image.new("I", (4, 4), 1000).save(path)
    with Image.open(path) as img, pytest.warns(VAEToolkitWarning, match="converted to 8-bit RGB") as record:
        {
            "load_and_preprocess_image": lambda: load_and_preprocess_image(path, 4),
            "pil_to_tensor": lambda: pil_to_tensor(img),
            "transform": lambda: ImageProcessor(4).transform(img),
            "preprocess_pil": lambda: ImageProcessor(4).preprocess_pil(img),
        }[entry]()
    assert [w.filename for w in record] == [__file__]


# --- 10. residue of the 69k-case differential run ----------------------------------------------------


def normalize_010(arr: np.ndarray, mean, std, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """torchvision's ToTensor + Normalize (what 0.1.0's ImageProcessor.transform ran) on an HWC uint8 array:
    ``mean`` / ``std`` become tensors in ``dtype``, a 1-D one viewed as ``(-1, 1, 1)``, then broadcast."""
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous().to(dtype).div(255)
    m, s = torch.as_tensor(mean, dtype=dtype), torch.as_tensor(std, dtype=dtype)
    m = m.view(-1, 1, 1) if m.ndim == 1 else m
    s = s.view(-1, 1, 1) if s.ndim == 1 else s
    return x.sub_(m).div_(s)


BAD_NORM = [
    ({"normalize_mean": (0.5, 0.5)}, ValueError, r"normalize_mean needs 3 values \(one per RGB channel\) or 1, got 2"),
    ({"normalize_std": (0.5,) * 4}, ValueError, r"normalize_std needs 3 values \(one per RGB channel\) or 1, got 4"),
    ({"normalize_mean": (float("nan"), 0.5, 0.5)}, ValueError, r"normalize_mean must be finite numbers, got \(nan"),
    ({"normalize_std": (0.5, float("nan"), 0.5)}, ValueError, r"normalize_std must be finite numbers, got \(0\.5, n"),
    ({"normalize_mean": None}, TypeError, r"normalize_mean must be 3 numbers \(one per RGB channel\).*got None"),
    ({"normalize_std": None}, TypeError, r"normalize_std must be 3 numbers \(one per RGB channel\).*got None"),
    ({"normalize_std": (0.5, 0, 0.5)}, ValueError, r"normalize_std must not contain 0 .*got \(0\.5, 0, 0\.5\)"),
    ({"normalize_std": (1e-46, 1, 1)}, ValueError, r"normalize_std must not contain 0 or values that are 0 in fl"),
    ({"normalize_mean": [[0.1, 0.5, 0.9]]}, ValueError, r"normalize_mean of shape \(1, 3\) does not broadcast over "
     r"the image tensor of shape \(3, 8, 8\) \(ImageProcessor\(target_size=8\)\)"),
    ({"normalize_std": np.ones((1, 3, 1, 1))}, ValueError, r"normalize_std has 4 dimensions \(shape \(1, 3, 1, 1\)\)"),
]  # fmt: skip


@pytest.mark.parametrize("kwargs, builtin, message", BAD_NORM)
@pytest.mark.parametrize("entry", ["preprocess_pil", "transform"])
def test_bad_mean_std_raise_image_processing_error_that_is_also_the_builtin(tmp_path, kwargs, builtin, message, entry):
    proc = ImageProcessor(8, **kwargs)
    img = Image.new("RGB", (10, 9), (1, 2, 3))
    with pytest.raises(ImageProcessingError, match=message) as info:  # what 0.1.0 raised from preprocess_pil
        getattr(proc, entry)(img)
    assert isinstance(info.value, builtin)  # what 0.2.0 raised before, and what the class docstring promises
    # load_and_preprocess never used mean/std (0.1.0 neither): it still loads.
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "a.png")
    assert torch.equal(
        proc.load_and_preprocess(tmp_path / "a.png")[0], load_and_preprocess_image(tmp_path / "a.png", 8)[0]
    )


@pytest.mark.parametrize("name", ["truncated.png", "closed.png"])
@pytest.mark.parametrize("entry", ["transform", "preprocess_pil", "pil_to_tensor"])
def test_unreadable_image_error_keeps_pils_error_family(tmp_path, name, entry):
    """0.1.0's transform let PIL's OSError (truncated) / ValueError (closed) through: both still catch it."""
    path = tmp_path / name
    Image.fromarray(np.random.default_rng(11).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    if name == "truncated.png":
        path.write_bytes(path.read_bytes()[:300])
        family, pattern = OSError, r"cannot read .*truncated\.png \(mode 'RGB'\) as RGB: OSError: .*truncated"
    else:
        family, pattern = ValueError, r"cannot read .*closed\.png: it is a closed image .*call image\.load\(\) before"
    img = Image.open(path)
    if name == "closed.png":
        img.close()
    convert = {
        "transform": ImageProcessor(8).transform,
        "preprocess_pil": ImageProcessor(8).preprocess_pil,
        "pil_to_tensor": pil_to_tensor,
    }[entry]
    try:
        with pytest.raises(family, match=pattern) as info:
            convert(img)
    finally:
        img.close()
    assert isinstance(info.value, ImageProcessingError)
    assert isinstance(info.value.__cause__, family)


@pytest.fixture
def library_warnings_ignored():
    """0.1.0 code run under ``-W error``, with the one line of the upgrade notes added."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any other warning, numpy's RuntimeWarnings included, fails the test
        warnings.filterwarnings("ignore", category=VAEToolkitWarning)
        yield


WIDE = {"I": 1000, "I;16": 40000, "F": -3.5}


@pytest.mark.parametrize("mode", list(WIDE))
@pytest.mark.parametrize(
    "entry", ["load_and_preprocess_image", "load_images", "pil_to_tensor", "transform", "preprocess_pil"]
)
def test_wide_images_under_error_filter_return_010s_values(tmp_path, library_warnings_ignored, mode, entry):
    arr = np.full((4, 4), WIDE[mode], dtype={"I": np.int32, "I;16": np.uint16, "F": np.float32}[mode])
    arr[0, :2] = (7, 200)
    img = Image.fromarray(arr)
    assert img.mode == mode
    path = tmp_path / "wide.tif"
    img.save(path)
    expected = sd_values(np.asarray(img.convert("RGB")))  # PIL's saturating convert, as in 0.1.0
    out = {
        "load_and_preprocess_image": lambda: load_and_preprocess_image(path, 4)[0][0],
        "load_images": lambda: load_images([path], 4)[0],
        "pil_to_tensor": lambda: pil_to_tensor(img),
        "transform": lambda: ImageProcessor(4).transform(img),
        "preprocess_pil": lambda: ImageProcessor(4).preprocess_pil(img)[0],
    }[entry]()
    assert torch.equal(out, expected)


def test_wide_image_warning_is_the_librarys_category():
    img = Image.new("I", (4, 4), 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(VAEToolkitWarning, match=r"I image with values in \[1000, 1000\] is converted to 8-bit"):
            pil_to_tensor(img)


def test_tensor_to_pil_beyond_float32_under_error_filter_returns_010s_pixels(library_warnings_ignored):
    t = torch.tensor([1e300, -1e300, 1.0, -1.0], dtype=torch.float64).repeat(3, 2, 1)  # [3, 2, 4]
    img = tensor_to_pil(t)
    # 0.1.0: ((t + 1) / 2).clamp(0, 1) * 255 truncated to uint8, exact for these values
    expected = (((t + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(img), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(VAEToolkitWarning, match="12 of 24 float64 values are finite but beyond float32's range"):
            tensor_to_pil(t)


@pytest.mark.parametrize(
    "mean, std, which",
    [((0.5,) * 3, (1e39,) * 3, "normalize_std"), ((1e39, 0.5, 0.5), (0.5,) * 3, "normalize_mean"),
     ((0.5,) * 3, [[1e39, 1.0, 2.0]], "normalize_std")],
)  # fmt: skip
@pytest.mark.parametrize("entry", ["transform", "preprocess_pil"])
def test_mean_std_beyond_float32_under_error_filter_return_010s_values(
    library_warnings_ignored, mean, std, which, entry
):
    arr = np.random.default_rng(12).integers(0, 256, (3, 3, 3), dtype=np.uint8)
    proc = ImageProcessor(3, mean, std)
    out = getattr(proc, entry)(Image.fromarray(arr))
    out = out[0] if entry == "preprocess_pil" else out
    assert torch.equal(out, normalize_010(arr, mean, std))  # zeros for std 1e39, -inf for mean 1e39
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(VAEToolkitWarning, match=rf"{which} holds \d value\(s\) beyond the range of float32"):
            getattr(proc, entry)(Image.fromarray(arr))


def test_mean_std_beyond_float32_do_not_warn_in_float64():
    arr = np.random.default_rng(13).integers(0, 256, (3, 3, 3), dtype=np.uint8)
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = ImageProcessor(3, (0.5,) * 3, (1e39,) * 3).transform(Image.fromarray(arr))
    finally:
        torch.set_default_dtype(saved)
    assert torch.equal(out, normalize_010(arr, (0.5,) * 3, (1e39,) * 3, torch.float64)) and out.abs().max() > 0


@pytest.fixture(params=[torch.float32, torch.float64, torch.float16, torch.bfloat16])
def any_default_dtype(request):
    saved = torch.get_default_dtype()
    torch.set_default_dtype(request.param)
    yield request.param
    torch.set_default_dtype(saved)


@pytest.mark.parametrize(
    "mean, std",
    [
        ([[0.1, 0.5, 0.9]], (0.5, 0.5, 0.5)),  # per image column, the case the differential run found
        ([[0.1], [0.5], [0.9]], (0.5, 0.5, 0.5)),  # per row
        ((0.5, 0.5, 0.5), [[0.2, 0.3, 0.4]]),  # std per column
        ([[[0.1, 0.2, 0.3]], [[0.4, 0.5, 0.6]], [[0.7, 0.8, 0.9]]], [[0.25]]),  # [3, 1, 3], std (1, 1)
        (np.linspace(0, 1, 9).reshape(3, 3), np.full((3, 3, 3), 0.3)),  # a full [H, W] mean and [3, H, W] std
        (torch.tensor([[0.1, 0.5, 0.9]], requires_grad=True), 0.5),
    ],
)
@pytest.mark.parametrize("entry", ["transform", "preprocess_pil"])
def test_2d_and_3d_mean_std_broadcast_as_in_010(mean, std, entry, any_default_dtype):
    img = Image.fromarray(np.random.default_rng(14).integers(0, 256, (5, 4, 3), dtype=np.uint8))
    levels = np.asarray(img.resize((3, 3), Image.Resampling.BILINEAR))  # short side 4 -> 3, long 5 -> int(3.75)
    out = getattr(ImageProcessor(3, mean, std), entry)(img)
    out = out[0] if entry == "preprocess_pil" else out
    m = mean.detach() if isinstance(mean, torch.Tensor) else mean
    assert out.dtype == any_default_dtype and not out.requires_grad
    assert torch.equal(out, normalize_010(levels, m, std, any_default_dtype))


def test_2d_mean_is_per_column_not_per_channel():
    img = Image.fromarray(np.random.default_rng(15).integers(0, 256, (3, 3, 3), dtype=np.uint8))
    per_column = ImageProcessor(3, [[0.1, 0.5, 0.9]]).transform(img)
    per_channel = ImageProcessor(3, [0.1, 0.5, 0.9]).transform(img)
    x = ImageProcessor(3, 0.0, 1.0).transform(img)  # v / 255
    assert torch.equal(per_column[:, :, 2], (x[:, :, 2] - torch.tensor(0.9)) / torch.tensor(0.5))
    assert torch.equal(per_channel[2], (x[2] - torch.tensor(0.9)) / torch.tensor(0.5))
    assert not torch.equal(per_column, per_channel)


# --- 11. one warning category ----------------------------------------------------------------------


def _warn_calls() -> list[tuple[str, int, ast.Call]]:
    calls = []
    for path in sorted(Path(vae_toolkit.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("warnings.warn", "warn"):
                calls.append((path.name, node.lineno, node))
    return calls


def test_every_library_warning_is_a_vae_toolkit_warning():
    assert issubclass(VAEToolkitWarning, UserWarning) and "VAEToolkitWarning" in vae_toolkit.__all__
    calls = _warn_calls()
    assert len(calls) >= 10  # the scan sees the calls (image_utils, device_manager, latents, model_config)
    wrong = []
    for name, line, call in calls:
        category = (
            call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "category"), None)
        )
        if category is None or ast.unparse(category) != "VAEToolkitWarning":
            wrong.append(f"{name}:{line}")
    assert wrong == []


CODE_010 = """
import torch
from PIL import Image
from vae_toolkit import ImageProcessor, pil_to_tensor, tensor_to_pil

def test_010_code():
    assert pil_to_tensor(Image.new("I", (2, 2), 1000)).min().item() == 1.0
    assert tensor_to_pil(torch.full((3, 2, 2), 1e300, dtype=torch.float64)).getpixel((0, 0)) == (255, 255, 255)
    y = ImageProcessor(2, (0.5,) * 3, (1e39,) * 3).preprocess_pil(Image.new("RGB", (2, 2)))
    assert y.abs().max().item() == 0.0
"""


@pytest.mark.parametrize("filters", [["-W", "error"], ["-W", "error", "-W", "ignore::vae_toolkit.VAEToolkitWarning"]])
def test_pytest_w_error_with_one_filter_line_runs_010_code(tmp_path, filters):
    """``pytest -W error``: the library's warnings fail 0.1.0 code; the one line of the upgrade notes (here as
    ``-W ignore::vae_toolkit.VAEToolkitWarning``) lets it pass, so no other warning (numpy's) escapes."""
    (tmp_path / "test_old.py").write_text(CODE_010, encoding="utf-8")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *filters, "test_old.py"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    if len(filters) == 2:
        assert out.returncode == 1, out.stdout
        assert "vae_toolkit.VAEToolkitWarning: I image of size (2, 2)" in out.stdout
    else:
        assert out.returncode == 0 and "1 passed" in out.stdout and "warning" not in out.stdout, out.stdout
