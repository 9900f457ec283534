"""PSNR, SSIM, MS-SSIM and MAE on tensors, and the input checks every metric of :mod:`vae_toolkit.metrics` shares.

The functions here are re-exported by :mod:`vae_toolkit.metrics` (``metrics.psnr`` ...), which documents them.
Each takes the range of its inputs as ``input_range``: ``(-1, 1)`` (the library's convention, the default),
``(0, 1)`` or ``(0, 255)`` (floats, or uint8 tensors); every metric is defined on 0-255 levels, reached as
``(x - low) * 255 / (high - low)`` without rounding or clamping. Values beyond the declared range by more than
:data:`RANGE_TOLERANCE` of its width raise ``ValueError`` naming the range found (a 0-255 image declared as
``[-1, 1]`` is an error, not a 6 dB higher PSNR); NaN and inf are left to the metric (NaN for that image).
Grayscale batches ``[N, 1, H, W]`` are accepted by PSNR, SSIM, MS-SSIM and MAE.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = [
    "INPUT_RANGES",
    "MS_SSIM_MIN_SIDE",
    "RANGE_TOLERANCE",
    "SSIM_WINDOW",
    "InputRange",
    "Reduction",
    "check_images",
    "check_input_range",
    "described_range",
    "check_pair",
    "check_reduction",
    "gaussian_window",
    "mae",
    "ms_ssim",
    "psnr",
    "reduce",
    "ssim",
    "to_levels",
    "to_signed",
    "to_unit",
]

#: ``(low, high)`` of the images' values: one of :data:`INPUT_RANGES`.
InputRange = tuple[float, float]
#: The ranges a metric accepts: the library's ``[-1, 1]``, ``[0, 1]`` (torchvision's ``ToTensor``), 0-255 levels.
INPUT_RANGES: tuple[InputRange, ...] = ((-1.0, 1.0), (0.0, 1.0), (0.0, 255.0))
#: How far values may lie beyond the declared range, as a fraction of its width (a VAE's decoded images
#: overshoot ``[-1, 1]`` a little): ``[-1.5, 1.5]`` for ``(-1, 1)``, ``[-0.25, 1.25]`` for ``(0, 1)``.
RANGE_TOLERANCE = 0.25
#: ``"none"``: one value per image; ``"mean"`` / ``"sum"`` of them.
Reduction = Literal["none", "mean", "sum"]

SSIM_WINDOW = 11
_SSIM_SIGMA = 1.5
_SSIM_K = (0.01, 0.03)
_MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
#: pytorch-msssim's ms_ssim: the shorter side must exceed (11 - 1) * 2**4.
MS_SSIM_MIN_SIDE = (SSIM_WINDOW - 1) * 2 ** (len(_MS_SSIM_WEIGHTS) - 1) + 1


# --- inputs ------------------------------------------------------------------------------------------------


def check_input_range(input_range: object) -> InputRange:
    """``input_range`` as a ``(low, high)`` tuple of floats, one of :data:`INPUT_RANGES`.

    Raises:
        ValueError: another range.
    """
    try:
        low, high = (float(v) for v in input_range)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        low = high = math.nan
    if (low, high) not in INPUT_RANGES:
        raise ValueError(f"input_range must be (-1, 1), (0, 1) or (0, 255), got {input_range!r}")
    return low, high


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _describe(r: InputRange) -> str:
    return f"({_fmt(r[0])}, {_fmt(r[1])})"


def check_images(x: object, name: str, input_range: InputRange, channels: Sequence[int] = (3,)) -> torch.Tensor:
    """``x`` checked: a tensor ``[N, C, H, W]`` (``C`` in ``channels``), floating point (or uint8 declared 0-255),
    whose finite values lie in ``input_range`` up to :data:`RANGE_TOLERANCE`; returned as it is.

    Raises:
        TypeError: not a tensor, or not floating point (uint8 with a range other than ``(0, 255)``).
        ValueError: another shape, or values outside the declared range.
    """
    shape = "[N, 3, H, W]" if tuple(channels) == (3,) else "[N, 3, H, W] or [N, 1, H, W]"
    described = _describe(input_range)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {shape} in {described}, got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] not in channels:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}; add a batch dimension with x[None]")
    if x.dtype == torch.uint8:
        if input_range != (0.0, 255.0):
            raise TypeError(
                f"{name} is a uint8 tensor but input_range={described} was declared; declare uint8 images with "
                "input_range=(0, 255), or convert them with x.float() / 127.5 - 1"
            )
        return x
    if not x.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor in {described} (or uint8 with input_range=(0, 255)), "
            f"got {x.dtype}"
        )
    _check_values(x, name, input_range)
    return x


def _check_values(x: torch.Tensor, name: str, input_range: InputRange) -> None:
    if x.numel() == 0 or x.device.type == "meta":
        return
    low, high = input_range
    slack = RANGE_TOLERANCE * (high - low)
    with torch.no_grad():
        found_low, found_high = (float(v) for v in torch.aminmax(x.detach()))
        if not (math.isfinite(found_low) and math.isfinite(found_high)):  # NaN or inf: the metric's, not ours
            finite = torch.isfinite(x.detach())
            if not bool(finite.any()):
                return
            kept = x.detach()[finite]
            found_low, found_high = float(kept.min()), float(kept.max())
    if found_low >= low - slack and found_high <= high + slack:
        return
    fits = [r for r in INPUT_RANGES if found_low >= r[0] - RANGE_TOLERANCE * (r[1] - r[0])]
    fits = [r for r in fits if found_high <= r[1] + RANGE_TOLERANCE * (r[1] - r[0])]
    hint = f"pass input_range={_describe(fits[0])} if that is their range" if fits else "rescale them"
    raise ValueError(
        f"{name} holds values in [{_fmt(found_low)}, {_fmt(found_high)}], outside the declared input_range="
        f"{described_range(input_range)}; {hint}, or clamp them (x.clamp({_fmt(low)}, {_fmt(high)}))"
    )


def described_range(input_range: InputRange) -> str:
    """``input_range`` as it is written in messages and reports: ``(-1, 1)``."""
    return _describe(input_range)


def check_pair(
    x: object,
    y: object,
    input_range: object = (-1, 1),
    min_size: int = 1,
    what: str = "",
    channels: Sequence[int] = (1, 3),
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` and ``y`` checked (:func:`check_images`, same shape and device, sides of at least ``min_size``), in
    their common computation dtype (at least float32).

    Raises:
        TypeError, ValueError: as :func:`check_images`; different shapes or devices; images too small.
    """
    r = check_input_range(input_range)
    a, b = check_images(x, "x", r, channels), check_images(y, "y", r, channels)
    if a.shape != b.shape:
        raise ValueError(f"x and y differ in shape: {tuple(a.shape)} and {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"x and y are on different devices: {a.device} and {b.device}")
    if min(a.shape[-2:]) < min_size:
        raise ValueError(
            f"{what} needs images of at least {min_size}x{min_size} pixels, got {a.shape[-1]}x{a.shape[-2]} "
            "(width x height)"
        )
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return a.to(dtype), b.to(dtype)


def _scale(input_range: InputRange) -> float:
    """Levels per unit of the range: 127.5 for ``(-1, 1)``, 255 for ``(0, 1)``, 1 for ``(0, 255)``."""
    return 255.0 / (input_range[1] - input_range[0])


def to_levels(x: torch.Tensor, input_range: InputRange) -> torch.Tensor:
    """``x`` in ``input_range`` as levels 0-255, unrounded: ``(x + 1) * 127.5`` for ``(-1, 1)``."""
    low = input_range[0]
    shifted = x if low == 0 else x - low
    scale = _scale(input_range)
    return shifted if scale == 1 else shifted * scale


def to_signed(x: torch.Tensor, input_range: InputRange) -> torch.Tensor:
    """``x`` in ``input_range`` mapped to ``[-1, 1]`` (returned as it is when already so)."""
    if input_range == (-1.0, 1.0):
        return x
    if input_range == (0.0, 1.0):
        return 2 * x - 1  # lpips' normalize=True
    return x / 127.5 - 1


def to_unit(x: torch.Tensor, input_range: InputRange) -> torch.Tensor:
    """``x`` in ``input_range`` mapped to ``[0, 1]``: ``(x + 1) / 2``, ``x``, or ``x / 255`` (torchvision's
    ``ToTensor`` of uint8 images)."""
    if input_range == (-1.0, 1.0):
        return (x + 1) / 2
    if input_range == (0.0, 1.0):
        return x
    return x / 255


def check_reduction(reduction: object, allowed: Sequence[str] = ("none", "mean", "sum")) -> str:
    """``reduction`` checked against ``allowed``.

    Raises:
        ValueError: another value.
    """
    if not isinstance(reduction, str) or reduction not in allowed:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, allowed))}, got {reduction!r}")
    return reduction


def reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-image ``values`` ``[N]`` as they are (``"none"``), or their mean or sum (a 0-d tensor)."""
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values


# --- PSNR, MAE ---------------------------------------------------------------------------------------------


def psnr(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    input_range: InputRange = (-1, 1),
    reduction: Literal["none", "mean", "sum", "pooled"] = "none",
) -> torch.Tensor:
    """PSNR in dB per image, peak 255, of two batches ``[N, 3, H, W]`` (or ``[N, 1, H, W]``); ``inf`` where
    identical.

    ``10 log10(255^2 / MSE)`` with the MSE of the images as 0-255 levels (unrounded), which on whole-level images
    is :func:`vae_toolkit.evaluate.psnr` of the uint8 images.

    Args:
        x, y: The two batches, in ``input_range``.
        input_range: ``(-1, 1)`` (default), ``(0, 1)`` or ``(0, 255)`` (floats or uint8).
        reduction: ``"none"`` (one value per image), ``"mean"`` or ``"sum"`` of the per-image values, or
            ``"pooled"``: the PSNR of the MSE over all pixels of the batch, as torchmetrics'
            ``PeakSignalNoiseRatio`` computes it (lower than the mean of per-image values when errors vary).

    Raises:
        TypeError: not tensors, or not floating point (uint8 with a range other than ``(0, 255)``).
        ValueError: another shape, different shapes or devices, values outside ``input_range``, another
            ``input_range`` or ``reduction``.

    Example:
        >>> psnr(decoded, target, reduction="mean")  # doctest: +SKIP
        tensor(25.2)
    """
    check_reduction(reduction, ("none", "mean", "sum", "pooled"))
    a, b = check_pair(x, y, input_range)
    scale = _scale(check_input_range(input_range))
    mse = ((a - b) * scale).square().flatten(1).mean(1)
    if reduction == "pooled":
        return 10 * torch.log10(255.0**2 / mse.mean())
    return reduce(10 * torch.log10(255.0**2 / mse), reduction)


def mae(
    x: torch.Tensor, y: torch.Tensor, *, input_range: InputRange = (-1, 1), reduction: Reduction = "none"
) -> torch.Tensor:
    """Mean absolute error per image in levels 0-255 (``|x - y| * 127.5`` in ``[-1, 1]``) of two batches.

    Raises:
        TypeError, ValueError: as :func:`psnr`.
    """
    check_reduction(reduction)
    a, b = check_pair(x, y, input_range)
    scale = _scale(check_input_range(input_range))
    return reduce(((a - b) * scale).abs().flatten(1).mean(1), reduction)


# --- SSIM, MS-SSIM -----------------------------------------------------------------------------------------


def gaussian_window(channels: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The 11-tap Gaussian (sigma 1.5) normalised in float64, then cast to ``dtype``: ``[channels, 1, 1, 11]``.

    Normalising in float64 puts float32 SSIM within 2e-5 of scikit-image's float64 value on 8-bit images (the
    window of :mod:`vae_toolkit.evaluate`); pytorch-msssim's own window, normalised in float32, is 3e-5 off.
    """
    coords = torch.arange(SSIM_WINDOW, dtype=torch.float64) - SSIM_WINDOW // 2
    g = torch.exp(-(coords**2) / (2 * _SSIM_SIGMA**2))
    return (g / g.sum()).to(dtype).reshape(1, 1, 1, -1).repeat(channels, 1, 1, 1).to(device)


def _blur(x: torch.Tensor, win: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter without padding, rows then columns (pytorch-msssim's ``gaussian_filter``)."""
    channels = x.shape[1]
    x = F.conv2d(x, win.transpose(2, 3), groups=channels)
    return F.conv2d(x, win, groups=channels)


def _layout(x: torch.Tensor) -> torch.Tensor:
    """Channels-last on a CPU, where oneDNN's depthwise convolutions run 3-5x faster so; values agree to 1e-7."""
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x


def _ssim_terms(a: torch.Tensor, b: torch.Tensor, win: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and channel ``(ssim, cs)`` of two batches of levels 0-255: pytorch-msssim's ``_ssim``."""
    c1 = (_SSIM_K[0] * 255) ** 2
    c2 = (_SSIM_K[1] * 255) ** 2
    mu1, mu2 = _blur(a, win), _blur(b, win)
    mu1_sq, mu2_sq, mu1_mu2 = mu1.pow(2), mu2.pow(2), mu1 * mu2
    sigma1_sq = _blur(a * a, win) - mu1_sq
    sigma2_sq = _blur(b * b, win) - mu2_sq
    sigma12 = _blur(a * b, win) - mu1_mu2
    cs_map = (2 * sigma12 + c2) / (sigma1_sq + sigma2_sq + c2)
    ssim_map = ((2 * mu1_mu2 + c1) / (mu1_sq + mu2_sq + c1)) * cs_map
    return ssim_map.flatten(2).mean(-1), cs_map.flatten(2).mean(-1)


def ssim(
    x: torch.Tensor, y: torch.Tensor, *, input_range: InputRange = (-1, 1), reduction: Reduction = "none"
) -> torch.Tensor:
    """SSIM per image of two batches ``[N, 3, H, W]`` (or ``[N, 1, H, W]``) (see ``metrics.DEFINITIONS``).

    Computed on the images as 0-255 levels with data range 255: on whole-level images, scikit-image's
    ``structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255,
    channel_axis=-1)`` of the uint8 images within 2e-5, and :func:`vae_toolkit.evaluate.ssim`; averaged over the
    channels.

    Raises:
        TypeError, ValueError: as :func:`psnr`; ValueError also for a side shorter than 11 pixels (the window).
    """
    check_reduction(reduction)
    a, b = check_pair(x, y, input_range, SSIM_WINDOW, "SSIM")
    r = check_input_range(input_range)
    win = gaussian_window(a.shape[1], a.device, a.dtype)
    per_channel, _ = _ssim_terms(_layout(to_levels(a, r)), _layout(to_levels(b, r)), win)
    return reduce(per_channel.mean(1), reduction)


def ms_ssim(
    x: torch.Tensor, y: torch.Tensor, *, input_range: InputRange = (-1, 1), reduction: Reduction = "none"
) -> torch.Tensor:
    """5-scale MS-SSIM per image of two batches, as pytorch-msssim 1.0's ``ms_ssim`` with the window of
    :func:`ssim` (see ``metrics.DEFINITIONS``).

    Raises:
        TypeError, ValueError: as :func:`psnr`; ValueError also for a side shorter than 161 pixels
            (:data:`MS_SSIM_MIN_SIDE`, 5 scales of an 11-pixel window).
    """
    check_reduction(reduction)
    a, b = check_pair(x, y, input_range, MS_SSIM_MIN_SIDE, "MS-SSIM")
    r = check_input_range(input_range)
    win = gaussian_window(a.shape[1], a.device, a.dtype)
    a, b = _layout(to_levels(a, r)), _layout(to_levels(b, r))
    mcs: list[torch.Tensor] = []
    per_channel = a.new_empty(0)
    for level in range(len(_MS_SSIM_WEIGHTS)):
        per_channel, cs = _ssim_terms(a, b, win)
        if level < len(_MS_SSIM_WEIGHTS) - 1:
            mcs.append(torch.relu(cs))
            padding = (a.shape[2] % 2, a.shape[3] % 2)
            a = F.avg_pool2d(a, kernel_size=2, padding=padding)
            b = F.avg_pool2d(b, kernel_size=2, padding=padding)
    stacked = torch.stack([*mcs, torch.relu(per_channel)], dim=0)  # (scale, image, channel)
    weights = stacked.new_tensor(_MS_SSIM_WEIGHTS).view(-1, 1, 1)
    return reduce(torch.prod(stacked**weights, dim=0).mean(1), reduction)
