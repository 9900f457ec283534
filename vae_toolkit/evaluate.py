"""How much a VAE loses on a folder of images: metrics per image and per model, and a report to look at.

:func:`evaluate` runs every image of a folder through one or more VAEs (encode, decode, the lossless
:func:`~vae_toolkit.image_utils.tensor_to_pil` of the decoded tensor) and compares the prepared original with
that uint8 reconstruction, exactly what a user would save and look at. :meth:`EvaluationResult.save_report`
writes ``metrics.csv``, ``summary.json``, pictures under ``images/`` and a self-contained ``index.html``.

The metrics carry their definitions (:data:`DEFINITIONS`):

- ``psnr``: ``10 log10(255^2 / MSE)`` in dB on the uint8 values; identical images give ``inf``.
- ``ssim``: Wang et al. 2004 with an 11x11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03, data range 255,
  averaged over R, G, B: the value of ``skimage.metrics.structural_similarity(a, b, gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=-1)``. Computed by pytorch-msssim
  in float64 with an exact float64 window (its default float32 window is 3e-5 off).
- ``ms_ssim``: the 5-scale MS-SSIM of Wang et al. 2003 (weights 0.0448, 0.2856, 0.3001, 0.2363, 0.1333, the
  same window, 2x2 average pooling between scales) by pytorch-msssim; empty (``None``) for images whose
  shorter side is 160 pixels or less, too small for 5 scales of an 11-pixel window.
- ``mae``: the mean absolute difference of the uint8 values.
- ``lpips``: only when the ``lpips`` package, ``torchvision`` and the AlexNet weights are all present locally
  (nothing is ever downloaded); otherwise the column is left out and a log line says what to install.

pytorch-msssim (the ``eval`` extra: ``pip install "vae-toolkit[eval]"``) is imported on the first
evaluation, never by ``import vae_toolkit``.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import latents
from .device_manager import DeviceManager

if TYPE_CHECKING:
    from diffusers import AutoencoderKL
    from PIL import Image

logger = logging.getLogger(__name__)


def _array(image: Image.Image | np.ndarray) -> np.ndarray:
    """An ``[H, W, 3]`` uint8 array of an RGB PIL image or an array."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(
            f"expected an RGB image or a uint8 array of shape [H, W, 3], got dtype {arr.dtype} shape {arr.shape}"
        )
    return arr


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"the images differ in size: {a.shape} and {b.shape}; compare images of equal size")


def psnr(original: Image.Image | np.ndarray, reconstruction: Image.Image | np.ndarray) -> float:
    """PSNR in dB of two RGB images on their uint8 values (peak 255); ``inf`` when they are identical.

    Raises:
        ValueError: not RGB uint8 images, or of different sizes.
    """
    a, b = _array(original), _array(reconstruction)
    _check_pair(a, b)
    diff = a.astype(np.int32) - b.astype(np.int32)
    mse = float(np.mean(diff * diff, dtype=np.float64))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def reconstruct(
    vae: AutoencoderKL, images: torch.Tensor, *, timings: dict[str, float] | None = None
) -> list[Image.Image]:
    """Encode and decode a batch; return the lossless ``tensor_to_pil`` of each decoded image.

    Args:
        vae: A loaded ``AutoencoderKL`` (any device and dtype).
        images: ``[N, 3, H, W]`` in ``[-1, 1]`` (as ``pil_to_tensor`` gives them), any device.
        timings: When given, ``"encode"`` and ``"decode"`` seconds (device synchronised) are added to it.

    Returns:
        ``N`` RGB PIL images, the reconstructions a user would save.
    """
    from .image_utils import tensor_to_pil

    sync = DeviceManager(_device(vae)).synchronize
    with torch.inference_mode():
        start = time.perf_counter()
        z = latents.encode(vae, images)
        sync()
        middle = time.perf_counter()
        y = latents.decode(vae, z)
        sync()
        end = time.perf_counter()
    if timings is not None:
        timings["encode"] = timings.get("encode", 0.0) + middle - start
        timings["decode"] = timings.get("decode", 0.0) + end - middle
    return [tensor_to_pil(t) for t in y]


def _device(vae: Any) -> torch.device:
    device = getattr(vae, "device", None)
    return device if isinstance(device, torch.device) else next(vae.parameters()).device


__all__ = ["psnr", "reconstruct"]
