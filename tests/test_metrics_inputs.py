"""vae_toolkit.metrics' inputs: the declared range (checked), grayscale batches, and ``reduction=``.

Weights are seeded random tensors in a temporary ``TORCH_HOME`` (``tests/metric_weights.py``); nothing is
downloaded. The reference of every range is the same metric of the same images in ``[-1, 1]``, which
``tests/test_metrics.py`` compares with scikit-image, pytorch-msssim, lpips and pytorch-fid.
"""

from __future__ import annotations

import math

import metric_weights as mw
import numpy as np
import pytest
import torch

from vae_toolkit import metrics, pixel_metrics


@pytest.fixture(scope="module")
def planted_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("torch_home")
    mw.plant(home / "hub" / "checkpoints")
    return home


@pytest.fixture(autouse=True)
def _torch_home(planted_home, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(planted_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _uint8_pair(seed: int, size: tuple[int, int], channels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(0, 256, (2, channels, *size), generator=g, dtype=torch.uint8)
    noise = torch.randint(-20, 21, u.shape, generator=g)
    return u, (u.int() + noise).clamp(0, 255).to(torch.uint8)


SIZES = {"psnr": (40, 48), "ssim": (40, 48), "mae": (40, 48), "ms_ssim": (161, 163), "lpips": (40, 48)}


def _declared(u: torch.Tensor, input_range: tuple[int, int], dtype: str) -> torch.Tensor:
    if dtype == "uint8":
        return u
    return {(0, 1): u / 255, (0, 255): u.float(), (-1, 1): u / 127.5 - 1}[input_range]


@pytest.mark.parametrize("name", list(SIZES))
@pytest.mark.parametrize(
    "input_range, dtype", [((0, 1), "float32"), ((0, 255), "float32"), ((0, 255), "uint8")], ids=str
)
def test_images_declared_with_their_range_give_the_signed_values(name, input_range, dtype):
    u, v = _uint8_pair(0, SIZES[name])
    f = getattr(metrics, name)
    reference = f(u / 127.5 - 1, v / 127.5 - 1)
    got = f(_declared(u, input_range, dtype), _declared(v, input_range, dtype), input_range=input_range)
    assert got.dtype == torch.float32 and got.shape == (2,)
    np.testing.assert_allclose(got.numpy(), reference.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(SIZES))
def test_a_0_255_image_declared_as_signed_raises_naming_the_range_found(name):
    u, v = _uint8_pair(1, SIZES[name])
    with pytest.raises(ValueError, match=r"x holds values in \[0, 255\], outside the declared input_range=\(-1, 1\)"):
        getattr(metrics, name)(u.float(), v.float())
    with pytest.raises(ValueError, match=r"pass input_range=\(0, 255\) if that is their range"):
        getattr(metrics, name)(u.float(), v.float(), input_range=(0, 1))


def test_a_0_1_image_declared_as_levels_is_accepted_but_0_255_as_0_1_is_not():
    u, v = _uint8_pair(2, (16, 16))
    assert torch.isfinite(metrics.psnr(u / 255, v / 255, input_range=(0, 255))).all()  # a subset: not detectable
    with pytest.raises(ValueError, match=r"y holds values in \[0, 255\].*input_range=\(0, 1\)"):
        metrics.psnr(u / 255, v.float(), input_range=(0, 1))


@pytest.mark.parametrize("input_range, inside, outside", [((-1, 1), 1.5, 1.51), ((0, 1), -0.25, -0.26)], ids=str)
def test_values_may_overshoot_by_a_quarter_of_the_range(input_range, inside, outside):
    x = torch.full((1, 3, 16, 16), float(input_range[0]))
    y = x.clone()
    y[0, 0, 0, 0] = inside
    assert torch.isfinite(metrics.mae(x, y, input_range=input_range)).all()
    y[0, 0, 0, 0] = outside
    with pytest.raises(ValueError, match="y holds values in"):
        metrics.mae(x, y, input_range=input_range)


def test_nan_and_inf_are_not_range_errors():
    x, y = mw.lpips_images(3, n=2)
    y[0, 0, 1, 1] = float("inf")
    y[1, 0, 1, 1] = float("nan")
    values = metrics.psnr(x, y)
    assert not torch.isfinite(values).any()


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda u: metrics.psnr(u, u, input_range=(0, 2)), ValueError,
         r"\(-1, 1\), \(0, 1\) or \(0, 255\), got \(0, 2\)"),
        (lambda u: metrics.ssim(u, u, input_range="0-255"), ValueError, r"input_range must be .* got '0-255'"),
        (lambda u: metrics.mae(u, u), TypeError, r"uint8 tensor but input_range=\(-1, 1\).*input_range=\(0, 255\)"),
        (lambda u: metrics.lpips(u, u, input_range=(0, 1)), TypeError, r"uint8 tensor but input_range=\(0, 1\)"),
        (lambda u: metrics.psnr(u.int(), u.int(), input_range=(0, 255)), TypeError, "floating-point.*torch.int32"),
        (lambda u: metrics.psnr(u.float(), u.float(), input_range=(0, 255), reduction="avg"), ValueError,
         r"reduction must be one of 'none', 'mean', 'sum', 'pooled', got 'avg'"),
        (lambda u: metrics.ssim(u.float(), u.float(), input_range=(0, 255), reduction="pooled"), ValueError,
         r"reduction must be one of 'none', 'mean', 'sum', got 'pooled'"),
        (lambda u: metrics.lpips(u.float(), u.float(), input_range=(0, 255), reduction=None), ValueError,
         "reduction must be"),
        (lambda u: metrics.psnr(u[:, :2], u[:, :2], input_range=(0, 255)), ValueError,
         r"\[N, 3, H, W\] or \[N, 1, H, W\], got \(2, 2, 40, 48\)"),
        (lambda u: metrics.LPIPS(input_range=(1, 2)), ValueError, "input_range must be"),
        (lambda u: metrics.FrechetInceptionDistance(64, input_range=(0, 128)), ValueError, "input_range must be"),
        (lambda u: metrics.inception_features(u, 64), TypeError, r"uint8 tensor but input_range=\(-1, 1\)"),
    ],
)  # fmt: skip
def test_bad_ranges_reductions_and_dtypes_are_clear_errors(call, error, match):
    u, _ = _uint8_pair(3, (40, 48))
    with pytest.raises(error, match=match):
        call(u)


@pytest.mark.parametrize("name", ["psnr", "ssim", "ms_ssim", "mae", "lpips"])
def test_grayscale_equals_the_channel_repeated(name):
    u, v = _uint8_pair(4, SIZES[name], channels=1)
    x, y = u / 127.5 - 1, v / 127.5 - 1
    f = getattr(metrics, name)
    got = f(x, y)
    expected = f(x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1))
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-6, atol=1e-7)


def test_lpips_module_takes_its_declared_range():
    u, v = _uint8_pair(5, (40, 48))
    module = metrics.LPIPS("alex", input_range=(0, 255))
    assert module.input_range == (0.0, 255.0)
    np.testing.assert_allclose(
        module(u, v).numpy(), metrics.lpips(u / 127.5 - 1, v / 127.5 - 1).numpy(), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("name", ["psnr", "ssim", "mae", "lpips"])
def test_reduction_mean_and_sum_reduce_the_per_image_values(name):
    x, y = mw.lpips_images(6, n=3)
    f = getattr(metrics, name)
    values = f(x, y)
    torch.testing.assert_close(f(x, y, reduction="mean"), values.mean(), rtol=0, atol=0)
    torch.testing.assert_close(f(x, y, reduction="sum"), values.sum(), rtol=0, atol=0)


def test_pooled_psnr_is_the_psnr_of_the_mse_over_every_pixel():
    """torchmetrics' PeakSignalNoiseRatio(data_range=255) pools the squared error of the whole batch."""
    u, v = _uint8_pair(7, (16, 20))
    v[1] = u[1]  # an identical image: per-image PSNR inf, pooled finite
    a, b = u.double().numpy(), v.double().numpy()
    expected = 10 * math.log10(255**2 / np.mean((a - b) ** 2))
    got = metrics.psnr(u, v, input_range=(0, 255), reduction="pooled")
    assert got.shape == () and float(got) == pytest.approx(expected, rel=1e-6)
    assert metrics.psnr(u, v, input_range=(0, 255), reduction="mean") == float("inf")


def test_fid_features_of_each_range_are_those_of_signed_images():
    real = mw.fid_images(21, 3)
    u = ((real + 1) * 127.5).round().to(torch.uint8)
    signed = metrics.inception_features(real, 64)
    for input_range, images in (((0, 255), u), ((0, 255), u.float()), ((0, 1), u / 255)):
        got = metrics.inception_features(images, 64, input_range=input_range)
        torch.testing.assert_close(got, signed, rtol=1e-5, atol=1e-5 * float(signed.abs().max()))


def test_fid_accepts_uint8_declared_as_levels_and_refuses_levels_declared_as_signed():
    real, fake = mw.fid_sets(3)
    fid = metrics.FrechetInceptionDistance(64, input_range=(0, 255))
    fid.update(((real + 1) * 127.5).round().to(torch.uint8), True)
    assert fid.num_real == 3
    signed = metrics.FrechetInceptionDistance(64)
    with pytest.raises(ValueError, match=r"images holds values in \[0, 255\]"):
        signed.update((real + 1) * 127.5, real=False)
    assert signed.num_fake == 0


def test_the_tolerance_is_a_quarter_of_the_range():
    assert pixel_metrics.RANGE_TOLERANCE == 0.25
