"""Inputs where a differential run against the 0.1.0 wheel found 0.2.0 failing differently.

Each test names the item it guards; the choices for items 6-8 are listed in CHANGELOG.md.
"""

from __future__ import annotations

import io
import struct
import threading
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

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
            except Exception as err:  # noqa: BLE001 - recorded and checked below
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
