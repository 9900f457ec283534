"""Encode images to latents and decode them back, with the model's scaling and shift factors.

Diffusion models work on *scaled* latents: ``latents = (z - shift_factor) * scaling_factor``, where ``z``
is the VAE's latent (the posterior mean, or a sample of it). Forgetting the factor, or applying SD's
0.18215 to an SDXL (0.13025) or FLUX (0.3611, shift 0.1159) VAE, is a common silent bug. :func:`encode`
and :func:`decode` read both factors from ``vae.config``, so every registered VAE round-trips correctly.

Conventions shared by both functions:

- Inputs may live on any device and have any floating dtype; they are copied to the VAE's device and
  dtype and never modified.
- Outputs are on the VAE's device, in float32 (float64 for a float64 VAE), whatever the VAE's dtype.
- A ``[C, H, W]`` input gives a ``[C', H', W']`` output; a ``[N, C, H, W]`` batch gives a batch.
- Gradients are not switched off: :func:`decode` is differentiable, so latents can be optimised through
  it. Wrap calls in ``torch.no_grad()`` (or ``torch.inference_mode()``) when you do not need gradients;
  it saves a lot of memory.
- Tiling (``tile=``) temporarily changes the VAE's tiling mode and restores it afterwards, so do not
  share one VAE between threads that call these functions with different tiling choices.

diffusers is not imported here; any ``AutoencoderKL``-like model works.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from ._warnings import VAEToolkitWarning

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

__all__ = ["encode", "encode_distribution", "decode", "scaling_factors"]

logger = logging.getLogger(__name__)

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def scaling_factors(vae: AutoencoderKL) -> tuple[float, float]:
    """Return ``(scaling_factor, shift_factor)`` of ``vae.config``; a missing or ``None`` shift is ``0.0``.

    Example:
        >>> scaling_factors(vae)  # doctest: +SKIP
        (0.18215, 0.0)
    """
    config = getattr(vae, "config", None)
    scale = getattr(config, "scaling_factor", None)
    shift = getattr(config, "shift_factor", None)
    return (1.0 if scale is None else float(scale)), (0.0 if shift is None else float(shift))


def encode(
    vae: AutoencoderKL,
    images: torch.Tensor,
    *,
    sample: bool = False,
    generator: torch.Generator | list[torch.Generator] | None = None,
    tile: bool | None = None,
) -> torch.Tensor:
    """Encode images in ``[-1, 1]`` to scaled latents ``(z - shift_factor) * scaling_factor``.

    Args:
        vae: A diffusers ``AutoencoderKL`` (or a model with the same ``encode`` and ``config``).
        images: ``[N, 3, H, W]`` or ``[3, H, W]`` floating tensor in ``[-1, 1]``, any device and dtype.
        sample: Draw ``z`` from the latent distribution instead of taking its mean.
        generator: Random generator for ``sample=True`` (reproducible samples), or a list of one
            generator per image: then each image's noise depends on its own generator only, so a
            batch gives the same latents as encoding its images one at a time.
        tile: ``True`` to encode in tiles, ``False`` never to, ``None`` (default) to tile when the image
            is larger than ``vae.config.sample_size`` or the VAE already has tiling enabled.

    Returns:
        Latents on the VAE's device, float32 (float64 for a float64 VAE).

    Raises:
        TypeError: ``images`` is not a floating-point tensor.
        ValueError: wrong shape, or ``generator`` without ``sample=True``.

    Example:
        >>> x, _ = load_and_preprocess_image("photo.png")  # doctest: +SKIP
        >>> with torch.no_grad():
        ...     latents = encode(vae, x)                 # [1, 4, 64, 64], ready for a diffusion model
    """
    _check_tensor(images, "images", "images in [-1, 1]; use load_and_preprocess_image or pil_to_tensor")
    channels = getattr(getattr(vae, "config", None), "in_channels", 3)
    _check_shape(images, "images", channels)
    if generator is not None and not sample:
        raise ValueError("generator is only used with sample=True; pass sample=True or drop generator")
    if isinstance(generator, list) and len(generator) != (images.shape[0] if images.dim() == 4 else 1):
        raise ValueError(
            f"generator is a list of {len(generator)} generators for {images.shape[0] if images.dim() == 4 else 1} "
            "image(s); pass one generator per image"
        )
    dtype, device = _dtype_device(vae)
    out_dtype = _output_dtype(dtype)
    scale, shift = scaling_factors(vae)
    batched = images.dim() == 4
    x = (images if batched else images.unsqueeze(0)).to(device=device, dtype=dtype)
    height, width = x.shape[-2:]
    sample_h, sample_w = _sample_size(vae)
    with _tiling(vae, tile, height > sample_h or width > sample_w):
        dist = vae.encode(x).latent_dist
        z = dist.sample(generator=generator) if sample else dist.mean
    latents = (z.to(out_dtype) - shift) * scale
    return latents if batched else latents.squeeze(0)


def encode_distribution(
    vae: AutoencoderKL, images: torch.Tensor, *, tile: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The latent distribution of images in ``[-1, 1]``: its ``(mean, std)``, unscaled, as the VAE gives them.

    A sample is ``(mean + std * noise - shift_factor) * scaling_factor`` (what :func:`encode` with
    ``sample=True`` returns); ``mean`` and ``std`` are float32 (float64 for a float64 VAE) on the VAE's
    device. Arguments and errors as :func:`encode`.
    """
    _check_tensor(images, "images", "images in [-1, 1]; use load_and_preprocess_image or pil_to_tensor")
    _check_shape(images, "images", getattr(getattr(vae, "config", None), "in_channels", 3))
    dtype, device = _dtype_device(vae)
    out_dtype = _output_dtype(dtype)
    batched = images.dim() == 4
    x = (images if batched else images.unsqueeze(0)).to(device=device, dtype=dtype)
    sample_h, sample_w = _sample_size(vae)
    with _tiling(vae, tile, x.shape[-2] > sample_h or x.shape[-1] > sample_w):
        dist = vae.encode(x).latent_dist
        mean, std = dist.mean.to(out_dtype), dist.std.to(out_dtype)
    return (mean, std) if batched else (mean.squeeze(0), std.squeeze(0))


def decode(vae: AutoencoderKL, latents: torch.Tensor, *, tile: bool | None = None) -> torch.Tensor:
    """Decode scaled latents (as returned by :func:`encode`) to images in about ``[-1, 1]``.

    Computes ``vae.decode(latents / scaling_factor + shift_factor)``. The result is not clamped, and
    gradients flow back to ``latents``. When a float16/bfloat16 VAE overflows (NaN or inf in the output,
    typical of the original SDXL VAE), the decode is run again on a float32 copy of the VAE with a
    ``VAEToolkitWarning``; the VAE itself is left unchanged. This check reads the output once (a device sync).

    Args:
        vae: A diffusers ``AutoencoderKL`` (or a model with the same ``decode`` and ``config``).
        latents: ``[N, C, h, w]`` or ``[C, h, w]`` floating tensor, any device and dtype.
        tile: ``True`` to decode in tiles, ``False`` never to, ``None`` (default) to tile when the
            decoded image would be larger than ``vae.config.sample_size`` or the VAE already has
            tiling enabled.

    Returns:
        Images on the VAE's device, float32 (float64 for a float64 VAE).

    Raises:
        TypeError: ``latents`` is not a floating-point tensor.
        ValueError: wrong shape.

    Example:
        >>> latents = torch.zeros(1, 4, 64, 64, requires_grad=True)  # doctest: +SKIP
        >>> loss = (decode(vae, latents) - target).pow(2).mean()
        >>> loss.backward()                                            # latents.grad is set
    """
    _check_tensor(latents, "latents", "latents from vae_toolkit.latents.encode")
    channels = getattr(getattr(vae, "config", None), "latent_channels", None)
    _check_shape(latents, "latents", channels)
    dtype, device = _dtype_device(vae)
    out_dtype = _output_dtype(dtype)
    scale, shift = scaling_factors(vae)
    batched = latents.dim() == 4
    z = latents if batched else latents.unsqueeze(0)
    z = z.to(device=device, dtype=out_dtype) / scale + shift
    factor = _spatial_factor(vae)
    sample_h, sample_w = _sample_size(vae)
    large = z.shape[-2] * factor > sample_h or z.shape[-1] * factor > sample_w

    with _tiling(vae, tile, large):
        images = vae.decode(z.to(dtype)).sample
    if dtype in _LOW_PRECISION and not _all_finite(images):
        images = _decode_float32_retry(vae, z, images, tile, large)
    images = images.to(out_dtype)
    return images if batched else images.squeeze(0)


# --- helpers ------------------------------------------------------------------------------------


def _check_tensor(t: object, name: str, hint: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}; pass {hint}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}; pass {hint}")


def _check_shape(t: torch.Tensor, name: str, channels: int | None) -> None:
    if t.dim() not in (3, 4):
        raise ValueError(f"{name} must be [N, C, H, W] or [C, H, W], got shape {tuple(t.shape)}")
    if channels is not None and t.shape[-3] != channels:
        raise ValueError(f"{name} must have {channels} channels for this VAE, got shape {tuple(t.shape)}")
    if t.shape[-1] == 0 or t.shape[-2] == 0 or (t.dim() == 4 and t.shape[0] == 0):
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")


def _dtype_device(vae: Any) -> tuple[torch.dtype, torch.device]:
    dtype, device = getattr(vae, "dtype", None), getattr(vae, "device", None)
    if isinstance(dtype, torch.dtype) and isinstance(device, torch.device):
        return dtype, device
    param = next(vae.parameters())
    return param.dtype, param.device


def _output_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _sample_size(vae: Any) -> tuple[float, float]:
    size = getattr(getattr(vae, "config", None), "sample_size", None)
    if size is None:
        return float("inf"), float("inf")
    if isinstance(size, (list, tuple)):
        return (size[0], size[1]) if len(size) > 1 else (size[0], size[0])
    return size, size


def _spatial_factor(vae: Any) -> int:
    blocks = getattr(getattr(vae, "config", None), "block_out_channels", None)
    return 2 ** (len(blocks) - 1) if blocks else 8


def _all_finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t.detach()).all())


@contextmanager
def _tiling(vae: Any, tile: bool | None, large: bool) -> Iterator[None]:
    """Set the VAE's tiling mode for one call and restore the previous mode afterwards."""
    if tile is not None and not isinstance(tile, bool):
        raise TypeError(f"tile must be True, False or None, got {tile!r}")
    previous = bool(getattr(vae, "use_tiling", False))
    want = previous or large if tile is None else tile
    if want == previous:
        yield
        return
    if not (hasattr(vae, "enable_tiling") and hasattr(vae, "disable_tiling")):
        if tile:
            raise TypeError(f"tile=True needs a VAE with enable_tiling()/disable_tiling(); got {type(vae).__name__}")
        yield
        return
    _set_tiling(vae, want)
    try:
        yield
    finally:
        _set_tiling(vae, previous)


def _set_tiling(vae: Any, on: bool) -> None:
    if on:
        vae.enable_tiling()
    else:
        vae.disable_tiling()


def _float32_copy(vae: Any) -> Any:
    """A float32 copy of the VAE for decoding; the encoder is left out (set to None) to save memory."""
    memo: dict[int, Any] = {}
    modules = getattr(vae, "_modules", {})
    for name in ("encoder", "quant_conv"):
        if modules.get(name) is not None:
            memo[id(modules[name])] = None
    return copy.deepcopy(vae, memo).float()


def _decode_float32_retry(
    vae: Any, z: torch.Tensor, images: torch.Tensor, tile: bool | None, large: bool
) -> torch.Tensor:
    """Decode ``z`` again on a float32 copy of ``vae`` after its low-precision ``images`` came out non-finite."""
    name = str(images.dtype).removeprefix("torch.")
    if not _all_finite(z):
        warnings.warn(
            f"decode: the output of the {name} VAE contains NaN/inf, and so do the latents given to it; "
            "not retrying in float32. Check the code that produced the latents.",
            VAEToolkitWarning,
            stacklevel=3,
        )
        return images
    warnings.warn(
        f"decode: the {name} VAE produced NaN/inf (a {name} overflow, typical of the original SDXL VAE); "
        "decoded again on a float32 copy, which costs time and memory. Load the VAE in float32 "
        "(load_sd_vae(..., dtype=torch.float32)) or use an fp16-safe VAE such as 'sdxl-fp16-fix'.",
        VAEToolkitWarning,
        stacklevel=3,
    )
    logger.info("Retrying a %s decode in float32", name)
    vae32 = _float32_copy(vae)
    with _tiling(vae32, tile, large):
        images = vae32.decode(z.to(torch.float32)).sample
    if not _all_finite(images):
        warnings.warn(
            "decode: the float32 retry also produced NaN/inf; the VAE weights or the latents are likely broken.",
            VAEToolkitWarning,
            stacklevel=3,
        )
    return images
