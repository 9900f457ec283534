"""The adapter shape of docs/metrics.md ("GLO's metric tests against vae-toolkit"), against GLO's expectations.

Generative-Latent-Optimization (GLO) measures [0, 1] images with its own PSNR (one MSE over the batch), SSIM, MSE,
MAE (in [0, 1] units), LPIPS (lpips package) and FID (pytorch-fid between two folders). The adapters below are the
few lines each of its classes becomes over :mod:`vae_toolkit.metrics`; the expected values are those GLO's own tests
state (``tests/unit/test_metrics/test_image_metrics.py`` and ``test_individual_metrics.py`` of its repository),
written out here: none of GLO's code is needed. Weights are seeded random tensors in the real files' layout
(``tests/metric_weights.py``), offline.
"""

from __future__ import annotations

import math
from pathlib import Path

import metric_weights as mw
import numpy as np
import pytest
import torch
from PIL import Image

from vae_toolkit import fid, metrics

UNIT = (0, 1)


# --- the adapters (docs/metrics.md) --------------------------------------------------------------------------


def glo_psnr(img1: torch.Tensor, img2: torch.Tensor) -> float:
    """GLO's ``calculate_psnr``: ``10 log10(1 / mse_loss(img1, img2))``, one MSE over the whole batch."""
    return float(metrics.psnr(img1, img2, input_range=UNIT, reduction="pooled"))


def glo_ssim(img1: torch.Tensor, img2: torch.Tensor) -> float:
    return float(metrics.ssim(img1, img2, input_range=UNIT, reduction="mean"))


def glo_mae(img1: torch.Tensor, img2: torch.Tensor) -> float:
    """GLO's MAE is in [0, 1] units; the library's in levels 0-255."""
    return float(metrics.mae(img1, img2, input_range=UNIT, reduction="mean")) / 255


def glo_mse(img1: torch.Tensor, img2: torch.Tensor) -> float:
    return float(torch.nn.functional.mse_loss(img1, img2))  # the library has no MSE: one line of torch


def glo_lpips(img1: torch.Tensor, img2: torch.Tensor, net: str = "alex") -> float:
    """GLO's ``LPIPSMetric.calculate``: images entirely in [0, 1] are taken as [0, 1], others as [-1, 1]."""

    def declared(x: torch.Tensor) -> tuple[int, int]:
        return UNIT if bool(x.min() >= 0) and bool(x.max() <= 1) else (-1, 1)

    r1, r2 = declared(img1), declared(img2)
    a = img1 * 2 - 1 if r1 == UNIT else img1
    b = img2 * 2 - 1 if r2 == UNIT else img2
    return metrics.lpips(a, b, net=net, reduction="mean").item()  # type: ignore[arg-type]


def glo_fid(created: Path, original: Path, dims: int = 2048) -> float:
    """GLO's ``DatasetFIDEvaluator.evaluate_created_dataset_vs_original(created, original).fid_score``."""
    value = fid.fid_between(original, created, dims=dims, batch_size=50, device="cpu").fid
    assert value is not None
    return value


# --- GLO's expectations ---------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _weights(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.getbasetemp() / "glo_torch_home"
    mw.plant(home / "hub" / "checkpoints")
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _noisy(seed: int, shape: tuple[int, ...], sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    a = torch.rand(shape)
    return a, torch.clamp(a + torch.randn_like(a) * sigma, 0, 1)


def test_psnr_is_glos_pooled_formula_and_inf_for_identical_images():
    a, b = _noisy(42, (4, 3, 16, 16), 0.05)
    expected = 10 * math.log10(1.0 / float(torch.nn.functional.mse_loss(a, b)))
    assert glo_psnr(a, b) == pytest.approx(expected, abs=1e-4)
    assert glo_psnr(a, a.clone()) == float("inf")  # test_psnr_identical_images


def test_extreme_values_give_glos_exact_numbers():
    zeros, ones = torch.zeros(1, 3, 16, 16), torch.ones(1, 3, 16, 16)
    assert glo_psnr(zeros, ones) == 0.0  # test_extreme_image_values: "PSNR is 0 for maximum difference"
    assert glo_mse(zeros, ones) == 1.0 and glo_mae(zeros, ones) == 1.0
    assert 0 <= glo_ssim(zeros, ones) <= 1


def test_constant_images_give_glos_mse_and_mae():
    a, b = torch.full((1, 3, 16, 16), 0.5), torch.full((1, 3, 16, 16), 0.7)  # test_zero_variance_images
    assert glo_psnr(a, b) > 0
    assert abs(glo_mse(a, b) - 0.04) < 1e-6 and abs(glo_mae(a, b) - 0.2) < 1e-6


def test_grayscale_and_its_rgb_repeat_agree_as_glo_expects():
    gray1, gray2 = _noisy(42, (1, 1, 16, 16), 0.1)  # test_grayscale_vs_rgb_consistency
    rgb1, rgb2 = gray1.repeat(1, 3, 1, 1), gray2.repeat(1, 3, 1, 1)
    assert abs(glo_psnr(gray1, gray2) - glo_psnr(rgb1, rgb2)) < 1e-6
    assert abs(glo_ssim(gray1, gray2) - glo_ssim(rgb1, rgb2)) < 1e-4


def test_ssim_bounds_and_identity_as_glo_expects():
    a, b = _noisy(42, (1, 3, 32, 32), 0.1)  # test_ssim_calculation_normal, test_ssim_identical_images
    assert 0 <= glo_ssim(a, b) <= 1
    assert abs(glo_ssim(a, a.clone()) - 1.0) < 1e-4


def test_lpips_of_identical_images_is_lower_as_glo_expects():
    torch.manual_seed(42)  # test_lpips_real_package_if_available
    img1, img3 = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    for net in ("alex", "vgg", "squeeze"):
        assert glo_lpips(img1, img1.clone(), net) <= glo_lpips(img1, img3, net)
    # GLO's range rule: the same images given in [0, 1] and in [-1, 1] give one value
    assert glo_lpips(img1, img3) == pytest.approx(glo_lpips(img1 * 2 - 1, img3 * 2 - 1), abs=1e-6)


def test_fid_of_two_folders_is_a_non_negative_float_as_glo_expects(tmp_path):
    rng = np.random.default_rng(0)  # test_fid_real_package_if_available: 10 images per folder
    for name, shift in (("created", 0), ("original", 40)):
        (tmp_path / name).mkdir()
        for i in range(10):
            pixels = np.clip(rng.normal(120 + shift, 40, (64, 64, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / name / f"{i:05d}.png")
    value = glo_fid(tmp_path / "created", tmp_path / "original", dims=64)  # 64-d: no 2048x2048 square root here
    assert isinstance(value, float) and value >= 0
    assert glo_fid(tmp_path / "created", tmp_path / "created", dims=64) == pytest.approx(0, abs=1e-6)
