"""tensor_to_pil on every kind of tensor, and pil_to_tensor / ImageProcessor over sizes, modes and arguments."""

from __future__ import annotations

import math
import sys
import warnings

import numpy as np
import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from PIL import Image

from vae_toolkit import ImageProcessingError, ImageProcessor, VAEToolkitWarning, pil_to_tensor, tensor_to_pil

FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _pixels(tensor: torch.Tensor) -> np.ndarray:
    """Round-to-nearest of (x + 1) * 127.5, clamped, as HWC uint8 (the documented tensor_to_pil result)."""
    x = tensor.detach().to(torch.float64).reshape(3, *tensor.shape[-2:]).numpy()
    return np.floor(np.clip((x + 1.0) * 127.5, 0, 255) + 0.5).astype(np.uint8).transpose(1, 2, 0)


# --- tensor_to_pil: bad input -------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, message",
    [
        ((3,), r"Expected tensor dimension 3 or 4, got 1 \(shape \(3,\)\); pass one image as \[3, H, W\]"),
        ((3, 8), r"Expected tensor dimension 3 or 4, got 2 \(shape \(3, 8\)\)"),
        ((1, 1, 3, 4, 4), r"Expected tensor dimension 3 or 4, got 5"),
        ((2, 3, 4, 4), r"Batch size must be 1, got 2 \(shape \(2, 3, 4, 4\)\); convert one image at a time"),
        ((0, 3, 4, 4), r"Batch size must be 1, got 0"),
        ((1, 4, 4, 4), r"Expected 3 channels, got 4 \(shape \(4, 4, 4\)\); pass RGB as \[3, H, W\]"),
        ((4, 4, 3), r"Expected 3 channels, got 4 .*permute\(2, 0, 1\)"),
        ((3, 0, 4), r"Cannot make an image of size 0 \(shape \(3, 0, 4\)\)"),
        ((1, 3, 4, 0), r"Cannot make an image of size 0"),
    ],
)
def test_tensor_to_pil_bad_shape(shape, message):
    with pytest.raises(ImageProcessingError, match=message):
        tensor_to_pil(torch.zeros(shape))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int32, torch.int64, torch.bool, torch.complex64])
def test_tensor_to_pil_non_float_dtype(dtype):
    tensor = torch.zeros(3, 4, 4, dtype=dtype)
    with pytest.raises(TypeError, match=rf"floating-point tensor in \[-1, 1\], got dtype {dtype}; convert") as info:
        tensor_to_pil(tensor)
    assert isinstance(info.value, ImageProcessingError)  # 0.1.0 code catching ImageProcessingError still works


@pytest.mark.parametrize("bad", [None, 1.0, [[[0.0]]], np.zeros((3, 4, 4), np.float32), Image.new("RGB", (4, 4))])
def test_tensor_to_pil_non_tensor(bad):
    with pytest.raises(TypeError, match=rf"expects a torch.Tensor, got {type(bad).__name__}") as info:
        tensor_to_pil(bad)
    assert isinstance(info.value, ImageProcessingError)


def test_tensor_to_pil_sparse_and_meta():
    with pytest.raises(TypeError, match=r"dense tensor, got layout torch.sparse_coo; call .to_dense\(\)"):
        tensor_to_pil(torch.zeros(3, 4, 4).to_sparse())
    with pytest.raises(ImageProcessingError, match=r"'meta' device .*holds no values"):
        tensor_to_pil(torch.zeros(3, 4, 4, device="meta"))


# --- tensor_to_pil: unusual but valid tensors ---------------------------------------------------


def test_tensor_to_pil_requires_grad():
    x = (torch.rand(1, 3, 5, 7) * 2 - 1).requires_grad_()
    y = x * 1.0  # non-leaf with a graph, like a decoder output
    for t in (x, y):
        image = tensor_to_pil(t)
        assert image.size == (7, 5)
        np.testing.assert_array_equal(np.asarray(image), _pixels(t))
    assert x.grad is None and y.requires_grad


@pytest.mark.parametrize(
    "view",
    [
        lambda base: base.transpose(1, 2),
        lambda base: base.flip(-1),
        lambda base: base[:, ::2, 1::3],
        lambda base: base.permute(2, 0, 1)[:3].permute(1, 2, 0).transpose(1, 2),
        lambda base: base.expand(3, 6, 6) if base.shape[0] == 1 else base[:, :, :1].expand(3, 6, 6),
        lambda base: base.unsqueeze(0)[:, :, 1:, :-1],
    ],
    ids=["transpose", "flip", "strided", "permuted", "expanded", "batched-slice"],
)
def test_tensor_to_pil_non_contiguous_views(view):
    base = torch.rand(3, 6, 6) * 2.4 - 1.2
    t = view(base)
    before = base.clone()
    image = tensor_to_pil(t)
    assert image.mode == "RGB" and image.size == (t.shape[-1], t.shape[-2])
    np.testing.assert_array_equal(np.asarray(image), _pixels(t))
    assert torch.equal(base, before)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    "special, pixel",
    [(math.nan, 0), (math.inf, 255), (-math.inf, 0)],
    ids=["nan", "inf", "-inf"],
)
def test_tensor_to_pil_non_finite_warns(dtype, special, pixel):
    t = torch.zeros(3, 4, 4, dtype=dtype)
    t[1, 2, 3] = special
    t[0, 0, 0] = special
    before = t.clone()
    with pytest.warns(
        VAEToolkitWarning,
        match=r"2 of 48 values are NaN or infinite .*float16 VAE overflow.*"
        r"Decode in float32, or use an fp16-safe VAE",
    ) as record:
        image = tensor_to_pil(t)
    assert len(record) == 1
    assert record[0].filename == __file__  # points at the caller
    pixels = np.asarray(image)
    assert pixels[2, 3, 1] == pixel and pixels[0, 0, 0] == pixel
    assert (pixels[1:, :, 2] == 128).all()
    assert torch.equal(t.isnan(), before.isnan()) and torch.equal(t.nan_to_num(), before.nan_to_num())


def test_tensor_to_pil_finite_values_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensor_to_pil(torch.full((3, 4, 4), 1e30))  # huge but finite: clamped silently
        tensor_to_pil(torch.full((3, 4, 4), -65504.0, dtype=torch.float16))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_tensor_to_pil_never_modifies_its_input(dtype):
    t = (torch.randn(1, 3, 9, 5) * 3).to(dtype)
    t[0, 0, 0, 0] = math.nan
    t[0, 1, 0, 0] = math.inf
    before = t.clone()
    ptr, version = t.data_ptr(), t._version
    with pytest.warns(VAEToolkitWarning):
        tensor_to_pil(t)
    assert t.data_ptr() == ptr and t._version == version and t.dtype == dtype and t.shape == (1, 3, 9, 5)
    assert torch.equal(t.nan_to_num(), before.nan_to_num()) and torch.equal(t.isnan(), before.isnan())


# --- tensor_to_pil fuzz -------------------------------------------------------------------------

ALL_DTYPES = FLOAT_DTYPES + [torch.uint8, torch.int16, torch.int64, torch.bool]


@st.composite
def tensors(draw):
    if draw(st.booleans()):  # a valid image shape: [3, H, W] or [1, 3, H, W]
        shape = [1] * draw(st.integers(0, 1)) + [3, draw(st.integers(1, 9)), draw(st.integers(1, 9))]
    else:
        shape = draw(st.lists(st.integers(0, 5), max_size=5))
    dtype = draw(st.one_of(st.sampled_from(FLOAT_DTYPES), st.sampled_from(ALL_DTYPES)))
    kind = draw(st.sampled_from(["normal", "values", "wide"]))
    seed = draw(st.integers(0, 2**31))
    gen = torch.Generator().manual_seed(seed)
    if kind == "values":
        pool = torch.tensor(
            draw(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=8)),
            dtype=torch.float64,
        )
        data = pool[torch.randint(len(pool), shape, generator=gen)] if shape else pool[0]
    else:
        data = torch.randn(shape, generator=gen, dtype=torch.float64) * (1.5 if kind == "normal" else 1e4)
    if dtype == torch.bool:
        return data.nan_to_num() > 0
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        return data.nan_to_num().clamp(info.min, info.max).to(dtype)
    return data.to(dtype)


@settings(max_examples=100, deadline=None, database=None)
@given(t=tensors(), transpose=st.booleans())
def test_fuzz_tensor_to_pil(t, transpose):
    if transpose and t.dim() >= 2:
        t = t.transpose(-1, -2)
    before = t.clone()
    valid_shape = (t.dim() == 3 or (t.dim() == 4 and t.shape[0] == 1)) and t.shape[-3] == 3 and min(t.shape[-2:]) > 0
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        try:
            image = tensor_to_pil(t)
        except TypeError as err:
            event("TypeError")
            assert not t.is_floating_point(), err
            assert isinstance(err, ImageProcessingError)
        except ImageProcessingError as err:
            event("ImageProcessingError")
            assert not valid_shape, err
        else:
            event("image")
            assert t.is_floating_point() and valid_shape
            assert image.mode == "RGB" and image.size == (t.shape[-1], t.shape[-2])
            finite = torch.isfinite(t).all()
            if not finite:
                assert any(
                    issubclass(w.category, VAEToolkitWarning) and "NaN or infinite" in str(w.message) for w in record
                )
            else:
                expected = _pixels(t.nan_to_num())
                assert np.abs(np.asarray(image).astype(int) - expected).max() <= 1
                if t.dtype in (torch.float32, torch.float64) and t.abs().max() < 1e4:
                    x = t.detach().to(torch.float64).reshape(3, *t.shape[-2:]).numpy()
                    v = np.clip((x + 1) * 127.5, 0, 255).transpose(1, 2, 0)
                    clear = np.abs(v - np.floor(v) - 0.5) > 1e-3
                    np.testing.assert_array_equal(np.asarray(image)[clear], expected[clear])
    assert t.dtype == before.dtype and t.shape == before.shape
    if t.is_floating_point() or t.is_complex():
        assert torch.equal(t.isnan(), before.isnan()) and torch.equal(t.nan_to_num(), before.nan_to_num())
    else:
        assert torch.equal(t, before)


# --- pil_to_tensor / ImageProcessor: bad arguments ----------------------------------------------


@pytest.mark.parametrize(
    "target, error, message",
    [
        (0, ValueError, r"target_size must be >= 1 .*got 0"),
        (-5, ValueError, r"target_size must be >= 1 .*got -5"),
        (8.0, TypeError, r"target_size must be an int .*got float: 8.0"),
        ("512", TypeError, r"target_size must be an int .*got str: '512'"),
        (True, TypeError, r"target_size must be an int .*got bool: True"),
        ((8, 8), TypeError, r"target_size must be an int .*got tuple: \(8, 8\)"),
    ],
)
def test_bad_target_size(target, error, message, tmp_path):
    img = Image.new("RGB", (9, 9))
    with pytest.raises(error, match=message) as info:
        pil_to_tensor(img, target_size=target)
    assert isinstance(info.value, ImageProcessingError)  # as in 0.1.0, where every failure was one
    with pytest.raises(error, match=message):
        ImageProcessor(target_size=target)
    path = tmp_path / "x.png"
    img.save(path)
    with pytest.raises(error, match=message):
        from vae_toolkit import load_and_preprocess_image

        load_and_preprocess_image(path, target_size=target)


def test_numpy_integer_target_size_is_accepted():
    img = Image.new("RGB", (9, 7))
    assert pil_to_tensor(img, target_size=np.int64(5)).shape == (3, 5, 5)
    proc = ImageProcessor(np.int32(6))
    assert proc.target_size == 6 and type(proc.target_size) is int
    assert proc.preprocess_pil(img).shape == (1, 3, 6, 6)


@pytest.mark.parametrize("size", [(0, 0), (0, 5), (5, 0)])
def test_zero_sized_image(size):
    img = Image.new("RGB", size)
    with pytest.raises(ValueError, match=rf"cannot resize an image of size \({size[0]}, {size[1]}\) to 4x4") as info:
        pil_to_tensor(img, target_size=4)
    assert isinstance(info.value, ImageProcessingError)
    with pytest.raises(ImageProcessingError, match=r"ImageProcessor.transform: cannot resize an image of size"):
        ImageProcessor(4).preprocess_pil(img)
    assert pil_to_tensor(img).shape == (3, size[1], size[0])  # no resize: an empty tensor, as in 0.1.0


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"normalize_mean": (0.5, 0.5)}, ValueError, r"normalize_mean needs 3 values .*or 1, got 2"),
        ({"normalize_std": [0.5] * 4}, ValueError, r"normalize_std needs 3 values .*or 1, got 4"),
        ({"normalize_mean": ("a", "b", "c")}, TypeError, r"normalize_mean must be 3 numbers .*got \('a', 'b', 'c'\)"),
        ({"normalize_mean": "0.5"}, TypeError, r"normalize_mean must be 3 numbers"),
        ({"normalize_std": None}, TypeError, r"normalize_std must be 3 numbers .*got None"),
        ({"normalize_std": (0.5, 0.0, 0.5)}, ValueError, r"normalize_std must not contain 0"),
        ({"normalize_std": (math.nan, 1, 1)}, ValueError, r"normalize_std must be finite numbers, got \(nan, 1, 1\)"),
        ({"normalize_mean": (math.inf, 1, 1)}, ValueError, r"normalize_mean must be finite numbers"),
        ({"normalize_std": (1e-46, 1, 1)}, ValueError, r"normalize_std must not contain 0 or values that are 0 in fl"),
    ],
)
def test_bad_image_processor_args_raise_when_the_transform_runs(kwargs, error, message, tmp_path):
    # As in 0.1.0 (torchvision's Normalize checks on call): an ImageProcessor used only for
    # load_and_preprocess never fails on mean/std; transform and preprocess_pil say what is wrong.
    proc = ImageProcessor(8, **kwargs)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "a.png")
    assert proc.load_and_preprocess(tmp_path / "a.png")[0].shape == (1, 3, 8, 8)
    for call in (proc.transform, proc.preprocess_pil):
        with pytest.raises(error, match=message) as info:
            call(Image.new("RGB", (9, 9)))
        assert isinstance(info.value, ImageProcessingError)  # what 0.1.0's preprocess_pil raised


def test_image_processor_mean_std_tensors_that_require_grad_are_constants():
    img = Image.fromarray(np.random.default_rng(5).integers(0, 256, (12, 10, 3), dtype=np.uint8))
    mean = torch.tensor([0.485, 0.456, 0.406], requires_grad=True)
    std = torch.tensor([0.229, 0.224, 0.225], requires_grad=True)
    out = ImageProcessor(8, mean, std).preprocess_pil(img)
    expected = ImageProcessor(8, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)).preprocess_pil(img)
    assert torch.equal(out, expected) and not out.requires_grad


@pytest.mark.parametrize("mean, std", [(0.5, 0.5), ([0.5], [0.5]), (np.array([0.5] * 3), torch.tensor([0.5] * 3))])
def test_image_processor_broadcasts_one_value_like_010(mean, std):
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (12, 10, 3), dtype=np.uint8))
    proc = ImageProcessor(8, normalize_mean=mean, normalize_std=std)
    assert proc.normalize_mean is mean and proc.normalize_std is std
    assert torch.equal(proc.preprocess_pil(img), ImageProcessor(8).preprocess_pil(img))


# --- pil_to_tensor / ImageProcessor fuzz --------------------------------------------------------

MODES = ["RGB", "L", "RGBA", "P", "LA", "CMYK", "I;16", "1", "F", "I"]


def _make_image(mode: str, w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "F":
        return Image.fromarray(rng.uniform(-20, 300, (h, w)).astype(np.float32))
    if mode == "I":
        return Image.fromarray(rng.integers(-300, 600, (h, w), dtype=np.int32))
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 400, (h, w), dtype=np.uint16))
    if mode == "1":
        return Image.fromarray(rng.integers(0, 2, (h, w), dtype=np.uint8) * 255).convert("1")
    bands = {"RGB": 3, "L": 1, "RGBA": 4, "P": 1, "LA": 2, "CMYK": 4}[mode]
    img = Image.frombytes(mode, (w, h), rng.integers(0, 256, w * h * bands, dtype=np.uint8).tobytes())
    if mode == "P":
        img.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
    return img


sizes = st.one_of(st.integers(1, 64), st.integers(1, 300), st.integers(1, 2048))


@settings(max_examples=80, deadline=None, database=None)
@given(
    mode=st.sampled_from(MODES),
    w=sizes,
    h=sizes,
    target=st.one_of(st.none(), st.integers(1, 48), st.integers(1, 600)),
    normalize=st.booleans(),
    use_processor=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_fuzz_pil_to_tensor(mode, w, h, target, normalize, use_processor, seed):
    if w * h > 1_200_000:  # keep the run short: a few large images, not many
        h = max(1, 1_200_000 // w)
    img = _make_image(mode, w, h, seed)
    before = img.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VAEToolkitWarning)  # 16/32-bit values outside [0, 255] saturate
        if use_processor and target is not None:
            out = ImageProcessor(target).preprocess_pil(img)
            assert out.shape == (1, 3, target, target)
            lo, hi = -1.0, 1.0
            expected = pil_to_tensor(img, target_size=target)
            assert torch.equal(out[0], expected)
        else:
            out = pil_to_tensor(img, target_size=target, normalize=normalize)
            assert out.shape == ((3, target, target) if target else (3, h, w))
            lo, hi = (-1.0, 1.0) if normalize else (0.0, 1.0)
            assert torch.equal(out, pil_to_tensor(img.convert("RGB"), target_size=target, normalize=normalize))
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert lo <= float(out.min()) and float(out.max()) <= hi
    assert img.mode == mode and img.size == (w, h) and img.tobytes() == before.tobytes()  # input untouched


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_tensor_to_pil_cuda_tensor(dtype):
    cpu = (torch.rand(1, 3, 6, 5) * 2.2 - 1.1).to(dtype)
    gpu = cpu.to("cuda").requires_grad_(dtype != torch.bfloat16)
    before = gpu.detach().clone()
    image = tensor_to_pil(gpu)
    assert gpu.device.type == "cuda" and torch.equal(gpu.detach(), before)
    np.testing.assert_array_equal(np.asarray(image), np.asarray(tensor_to_pil(cpu)))


@pytest.mark.skipif(not torch.backends.mps.is_available(), reason="needs Apple MPS")
def test_tensor_to_pil_mps_tensor():
    cpu = torch.rand(3, 6, 5) * 2 - 1
    np.testing.assert_array_equal(np.asarray(tensor_to_pil(cpu.to("mps"))), np.asarray(tensor_to_pil(cpu)))


# --- center_crop_to_multiple / image_extensions -----------------------------------------------------


@pytest.mark.parametrize(
    ("size", "multiple", "box"),
    [((37, 33), 8, (2, 0, 34, 32)), ((16, 24), 8, None), ((10, 9), 4, (1, 0, 9, 8)), ((8, 70), 8, (0, 3, 8, 67))],
)
def test_center_crop_to_multiple(size, multiple, box):
    from vae_toolkit.image_utils import center_crop_to_multiple

    img = Image.fromarray(np.arange(size[0] * size[1] * 3, dtype=np.uint8).reshape(size[1], size[0], 3))
    out = center_crop_to_multiple(img, multiple)
    if box is None:
        assert out is img
    else:
        assert out.size == (box[2] - box[0], box[3] - box[1])
        assert np.array_equal(np.asarray(out), np.asarray(img.crop(box)))


@pytest.mark.parametrize("size", [(5, 40), (40, 7), (0, 0)])
def test_center_crop_to_multiple_too_small(size):
    from vae_toolkit.image_utils import center_crop_to_multiple

    with pytest.raises(ValueError, match=rf"image is {size[0]}x{size[1]}; it needs at least 8x8 pixels") as info:
        center_crop_to_multiple(Image.new("RGB", size))
    assert isinstance(info.value, ImageProcessingError)


def test_image_extensions():
    from vae_toolkit.image_utils import image_extensions

    extensions = image_extensions()
    assert {".png", ".jpg", ".jpeg", ".webp", ".tif"} <= extensions
    assert ".txt" not in extensions and all(e == e.lower() and e.startswith(".") for e in extensions)


@pytest.mark.parametrize("size", [(1, 1), (513, 7), (7, 513), (300, 260)])
@pytest.mark.parametrize("pillow_internals", [True, False])
def test_band_bytes_is_tobytes(size, pillow_internals, monkeypatch):
    """The one-buffer band packing gives ``tobytes("raw", band)`` byte for byte, and falls back to it."""
    from vae_toolkit._pixels import band_bytes

    calls = []
    if not pillow_internals:  # a Pillow whose _getencoder differs: the public tobytes is used
        real = Image._getencoder

        def changed(*args, **kwargs):
            if sys._getframe(1).f_code.co_name == "band_bytes":  # tobytes' own calls go through
                calls.append(args)
                raise TypeError("_getencoder() takes other arguments here")
            return real(*args, **kwargs)

        monkeypatch.setattr(Image, "_getencoder", changed)
    rng = np.random.default_rng(size[0] * 1000 + size[1])
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    for band in "RGB":
        assert band_bytes(img, band) == img.tobytes("raw", band)
    assert len(calls) == (0 if pillow_internals else 3)


def test_band_bytes_loads_a_lazily_opened_image(tmp_path):
    from vae_toolkit._pixels import band_bytes

    path = tmp_path / "a.png"
    Image.fromarray(np.arange(5 * 6 * 3, dtype=np.uint8).reshape(5, 6, 3)).save(path)
    with Image.open(path) as img:
        assert band_bytes(img, "G") == np.arange(5 * 6 * 3, dtype=np.uint8).reshape(5, 6, 3)[..., 1].tobytes()
