"""Encode images to the latents a diffusion model's pipeline uses, and decode them back.

Diffusion models work on *normalised* latents, and each autoencoder family normalises its own way: Stable
Diffusion scales (``z * 0.18215``), SD3 and FLUX.1 shift and scale, FLUX.2 patchifies 2x2 and batch-normalises,
Qwen-Image and Wan normalise each channel, SANA's DC-AE scales. Forgetting the step, or applying SD's 0.18215 to
an SDXL (0.13025) or FLUX (0.3611, shift 0.1159) VAE, is a common silent bug. :func:`encode` returns exactly what
the model's diffusers pipeline gives its denoiser (before packing latents into tokens), and :func:`decode`
inverts it as the pipeline decodes; both read the model's :func:`~vae_toolkit.latent_formats.latent_format`
(one per class in :data:`~vae_toolkit.latent_formats.SUPPORTED_CLASSES`).

Conventions shared by the functions:

- Images are in ``[-1, 1]``: ``[N, 3, H, W]`` or one ``[3, H, W]``; for the video-shaped classes
  (``AutoencoderKLQwenImage``, ``AutoencoderKLWan``) also videos ``[N, 3, T, H, W]`` with ``T = 1 + k * 4``.
- Latents are ``[N, C, h, w]`` (``[C, h, w]`` for one image) for every class, the frame axis of the
  video-shaped classes dropped for images; ``[N, C, T', h, w]`` for videos. ``h = H / spatial_factor``.
- Inputs may live on any device and have any floating dtype; they are copied to the VAE's device and
  dtype and never modified.
- Outputs are on the VAE's device, in float32 (float64 for a float64 VAE), whatever the VAE's dtype.
- Gradients are not switched off: :func:`decode` is differentiable, so latents can be optimised through
  it. Wrap calls in ``torch.no_grad()`` (or ``torch.inference_mode()``) when you do not need gradients;
  it saves a lot of memory.
- Tiling (``tile=``) temporarily changes the VAE's tiling mode and restores it afterwards, so do not
  share one VAE between threads that call these functions with different tiling choices.

diffusers is not imported here. A model of another diffusers class is refused (``UnsupportedVAEError``); an
object from outside diffusers with ``encode``/``decode``/``config`` like ``AutoencoderKL``'s is treated as one.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from ._warnings import VAEToolkitWarning
from .latent_formats import DCFormat, KLFormat, LatentFormat, latent_format, supported_class

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

__all__ = ["encode", "encode_distribution", "decode", "scaling_factors"]

logger = logging.getLogger(__name__)

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def scaling_factors(vae: AutoencoderKL) -> tuple[float, float]:
    """Return ``(scaling_factor, shift_factor)``: the model's latents are ``(z - shift_factor) * scaling_factor``.

    Read from ``vae.config``; a missing or ``None`` factor is ``1.0`` (scale) or ``0.0`` (shift). Defined for the
    classes whose convention is a scalar scale and shift: ``AutoencoderKL``, ``AutoencoderTiny``, and
    ``AutoencoderDC`` / ``AutoencoderKLHunyuanImage`` (shift ``0.0``). For the others use
    :func:`~vae_toolkit.latent_formats.latent_format`, which describes every class.

    Raises:
        ValueError: the class normalises otherwise (FLUX.2's batch norm, Qwen-Image's and Wan's per-channel
            mean and std).
        UnsupportedVAEError: a diffusers model of a class vae-toolkit does not support.

    Example:
        >>> scaling_factors(vae)  # doctest: +SKIP
        (0.18215, 0.0)
    """
    fmt, known = _format(vae)
    if not known:
        config = getattr(vae, "config", None)
        scale = getattr(config, "scaling_factor", None)
        shift = getattr(config, "shift_factor", None)
        return (1.0 if scale is None else float(scale)), (0.0 if shift is None else float(shift))
    if isinstance(fmt, KLFormat):
        return fmt.scaling_factor, fmt.shift_factor
    if isinstance(fmt, DCFormat):
        return fmt.scaling_factor, 0.0
    raise ValueError(
        f"scaling_factors: {fmt.class_name} has no scalar scaling/shift factor (its pipeline normalises with "
        f"{fmt.normalization!r}); use vae_toolkit.latent_formats.latent_format(vae) (process_in / process_out)"
    )


def encode(
    vae: AutoencoderKL,
    images: torch.Tensor,
    *,
    sample: bool = False,
    generator: torch.Generator | list[torch.Generator] | None = None,
    tile: bool | None = None,
) -> torch.Tensor:
    """Encode images in ``[-1, 1]`` to the latents the model's pipeline gives its denoiser.

    ``latent_format(vae).process_in(z)`` of the posterior's mode (or a sample) or of the deterministic latent:
    ``(z - shift_factor) * scaling_factor`` for ``AutoencoderKL`` and ``AutoencoderTiny``, FLUX.2's patchify and
    batch norm, Qwen-Image's and Wan's per-channel ``(z - mean) / std``, ``z * scaling_factor`` for DC-AE and
    HunyuanImage.

    Args:
        vae: A diffusers autoencoder of one of the supported classes (see
            :data:`~vae_toolkit.latent_formats.SUPPORTED_CLASSES`).
        images: ``[N, 3, H, W]`` or ``[3, H, W]`` floating tensor in ``[-1, 1]``, any device and dtype; for the
            video-shaped classes also ``[N, 3, T, H, W]``. ``H`` and ``W`` must be multiples of the model's
            spatial factor (``AutoencoderKL`` takes any size).
        sample: Draw ``z`` from the latent distribution instead of taking its mode (classes with a posterior).
        generator: Random generator for ``sample=True`` (reproducible samples), or a list of one
            generator per image: then each image's noise depends on its own generator only, so a
            batch gives the same latents as encoding its images one at a time.
        tile: ``True`` to encode in tiles (the class's own ``enable_tiling``), ``False`` never to, ``None``
            (default) to tile when the image is larger than ``vae.config.sample_size`` (classes that have one)
            or the VAE already has tiling enabled.

    Returns:
        Latents on the VAE's device, float32 (float64 for a float64 VAE): ``[N, C, h, w]`` (``[C, h, w]``) for
        images, ``[N, C, T', h, w]`` for videos.

    Raises:
        TypeError: ``images`` is not a floating-point tensor.
        ValueError: wrong shape or size, ``generator`` without ``sample=True``, or ``sample=True`` for a class
            without a posterior (``AutoencoderDC``, ``AutoencoderTiny``).
        UnsupportedVAEError: a diffusers model of another class.

    Example:
        >>> x, _ = load_and_preprocess_image("photo.png")  # doctest: +SKIP
        >>> with torch.no_grad():
        ...     latents = encode(vae, x)                 # [1, 4, 64, 64] for SD, ready for a diffusion model
    """
    fmt, known = _format(vae)
    _check_tensor(images, "images", "images in [-1, 1]; use load_and_preprocess_image or pil_to_tensor")
    is_video = _check_images(images, fmt, known)
    if sample and not fmt.has_posterior:
        raise ValueError(
            f"sample=True needs a latent distribution, and {fmt.class_name} has none (it encodes deterministically); "
            "pass sample=False"
        )
    count = images.shape[0] if images.dim() >= 4 else 1
    if generator is not None and not sample:
        raise ValueError("generator is only used with sample=True; pass sample=True or drop generator")
    if isinstance(generator, list) and len(generator) != count:
        raise ValueError(
            f"generator is a list of {len(generator)} generators for {count} image(s); pass one generator per image"
        )
    dtype, device = _dtype_device(vae)
    out_dtype = _output_dtype(dtype)
    batched = images.dim() >= 4
    x = (images if batched else images.unsqueeze(0)).to(device=device, dtype=dtype)
    one_frame = fmt.video and not is_video
    if one_frame:
        x = x.unsqueeze(2)
    output = _encode_output(vae, fmt, x, tile)
    z = _raw_latent(output, fmt, sample, generator)
    latents = fmt.process_in(z.to(out_dtype))
    if one_frame:
        latents = latents[:, :, 0]
    return latents if batched else latents.squeeze(0)


def encode_distribution(
    vae: AutoencoderKL, images: torch.Tensor, *, tile: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The latent distribution of images in ``[-1, 1]``: its ``(mean, std)``, as the model gives them.

    ``mean`` and ``std`` are the raw latent's, before the pipeline's normalisation: a sample of what
    :func:`encode` with ``sample=True`` returns is ``latent_format(vae).process_in(mean + std * noise)``
    (``(mean + std * noise - shift_factor) * scaling_factor`` for ``AutoencoderKL``). They are in the model's own
    layout: FLUX.2's before its 2x2 patchify (``[N, C/4, 2h, 2w]``), the video-shaped classes' without the frame
    axis for images. Float32 (float64 for a float64 VAE) on the VAE's device. Arguments and errors as
    :func:`encode`; a class without a posterior (``AutoencoderDC``, ``AutoencoderTiny``) raises ``ValueError``.
    """
    fmt, known = _format(vae)
    _check_tensor(images, "images", "images in [-1, 1]; use load_and_preprocess_image or pil_to_tensor")
    is_video = _check_images(images, fmt, known)
    if not fmt.has_posterior:
        raise ValueError(
            f"encode_distribution needs a latent distribution, and {fmt.class_name} has none (it encodes "
            "deterministically); use encode"
        )
    dtype, device = _dtype_device(vae)
    out_dtype = _output_dtype(dtype)
    batched = images.dim() >= 4
    x = (images if batched else images.unsqueeze(0)).to(device=device, dtype=dtype)
    one_frame = fmt.video and not is_video
    if one_frame:
        x = x.unsqueeze(2)
    dist = _encode_output(vae, fmt, x, tile).latent_dist
    mean, std = dist.mean.to(out_dtype), dist.std.to(out_dtype)
    if one_frame:
        mean, std = mean[:, :, 0], std[:, :, 0]
    return (mean, std) if batched else (mean.squeeze(0), std.squeeze(0))


def decode(vae: AutoencoderKL, latents: torch.Tensor, *, tile: bool | None = None) -> torch.Tensor:
    """Decode latents (as returned by :func:`encode`) to images in about ``[-1, 1]``, as the model's pipeline does.

    Computes ``vae.decode(latent_format(vae).process_out(latents))`` (``latents / scaling_factor + shift_factor``
    for ``AutoencoderKL``), taking the only frame of the video-shaped classes for image latents. The result is
    not clamped (Qwen-Image's and Wan's decoders clamp to ``[-1, 1]`` themselves), and gradients flow back to
    ``latents``. When a float16/bfloat16 VAE overflows (NaN or inf in the output, typical of the original SDXL
    VAE), the decode is run again on a float32 copy of the VAE with a ``VAEToolkitWarning``; the VAE itself is
    left unchanged. This check reads the output once (a device sync).

    Args:
        vae: A diffusers autoencoder of one of the supported classes.
        latents: ``[N, C, h, w]`` or ``[C, h, w]`` floating tensor, any device and dtype; ``[N, C, T', h, w]``
            for the video-shaped classes' videos.
        tile: ``True`` to decode in tiles (the class's own ``enable_tiling``), ``False`` never to, ``None``
            (default) to tile when the decoded image would be larger than ``vae.config.sample_size`` (classes
            that have one) or the VAE already has tiling enabled.

    Returns:
        Images on the VAE's device, float32 (float64 for a float64 VAE): ``[N, 3, H, W]`` (``[3, H, W]``), or
        ``[N, 3, T, H, W]`` for video latents.

    Raises:
        TypeError: ``latents`` is not a floating-point tensor.
        ValueError: wrong shape.
        UnsupportedVAEError: a diffusers model of another class.

    Example:
        >>> latents = torch.zeros(1, 4, 64, 64, requires_grad=True)  # doctest: +SKIP
        >>> loss = (decode(vae, latents) - target).pow(2).mean()
        >>> loss.backward()                                            # latents.grad is set
    """
    fmt, known = _format(vae)
    _check_tensor(latents, "latents", "latents from vae_toolkit.latents.encode")
    channels = fmt.latent_channels if known else getattr(getattr(vae, "config", None), "latent_channels", None)
    is_video = _check_shape(latents, "latents", channels, fmt.video)
    dtype, device = _dtype_device(vae)
    out_dtype = _output_dtype(dtype)
    batched = latents.dim() >= 4
    z = latents if batched else latents.unsqueeze(0)
    sample_h, sample_w = _sample_size(vae)
    large = z.shape[-2] * fmt.spatial_factor > sample_h or z.shape[-1] * fmt.spatial_factor > sample_w
    z = fmt.process_out(z.to(device=device, dtype=out_dtype))
    one_frame = fmt.video and not is_video
    if one_frame:
        z = z.unsqueeze(2)

    images = _decode_once(vae, z, dtype, tile, large, one_frame)
    if dtype in _LOW_PRECISION and not _all_finite(images):
        images = _decode_float32_retry(vae, fmt, z, images, tile, large, one_frame)
    images = images.to(out_dtype)
    return images if batched else images.squeeze(0)


# --- helpers ------------------------------------------------------------------------------------


# A model's format, read once and not per batch (FLUX.2's reads its bn buffers: a device sync on a GPU). Kept while
# the model lives, for the config object and the state of the bn buffers it was read from: a new config, weights
# loaded into the buffers (their version counter moves) or a move to another device reads it again.
_FORMATS: weakref.WeakKeyDictionary[Any, tuple[tuple[Any, ...], LatentFormat]] = weakref.WeakKeyDictionary()


def _format_stamp(vae: Any) -> tuple[Any, ...] | None:
    bn = getattr(vae, "bn", None)
    buffers = list(bn.buffers()) if isinstance(bn, torch.nn.Module) else []
    try:
        return (id(getattr(vae, "config", None)), *((b.data_ptr(), b._version) for b in buffers))
    except RuntimeError:  # inference tensors keep no version counter: nothing tells when they change
        return None


def _format(vae: Any) -> tuple[LatentFormat, bool]:
    """The model's latent format, and whether its class is a supported one (``False``: a duck-typed model)."""
    if supported_class(vae) is not None:
        stamp = _format_stamp(vae)
        cached = _FORMATS.get(vae) if stamp is not None else None
        if cached is not None and cached[0] == stamp:
            return cached[1], True
        fmt = latent_format(vae)
        if stamp is not None:
            with contextlib.suppress(TypeError):  # a model that takes no weak reference is read each time
                _FORMATS[vae] = (stamp, fmt)
        return fmt, True
    module = type(vae).__module__ or ""
    if module.split(".")[0] == "diffusers" or not (hasattr(vae, "encode") and hasattr(vae, "decode")):
        latent_format(vae)  # raises UnsupportedVAEError, listing the supported classes
    # An AutoencoderKL-like object from outside diffusers (a wrapper, say): the AutoencoderKL convention.
    config = getattr(vae, "config", None)
    scale = getattr(config, "scaling_factor", None)
    shift = getattr(config, "shift_factor", None)
    return (
        KLFormat(
            class_name="AutoencoderKL",
            latent_channels=int(getattr(config, "latent_channels", None) or 4),
            spatial_factor=_spatial_factor(vae),
            image_channels=int(getattr(config, "in_channels", None) or 3),
            scaling_factor=1.0 if scale is None else float(scale),
            shift_factor=0.0 if shift is None else float(shift),
        ),
        False,
    )


def _check_tensor(t: object, name: str, hint: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}; pass {hint}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}; pass {hint}")


def _check_shape(t: torch.Tensor, name: str, channels: int | None, video: bool = False) -> bool:
    """Check ``[N, C, H, W]`` / ``[C, H, W]`` (and ``[N, C, T, H, W]`` when ``video``); return whether it is 5-D."""
    if t.dim() not in ((3, 4, 5) if video else (3, 4)):
        layouts = "[N, C, H, W], [C, H, W] or (a video) [N, C, T, H, W]" if video else "[N, C, H, W] or [C, H, W]"
        raise ValueError(f"{name} must be {layouts}, got shape {tuple(t.shape)}")
    axis = 1 if t.dim() == 5 else -3
    if channels is not None and t.shape[axis] != channels:
        raise ValueError(f"{name} must have {channels} channels for this VAE, got shape {tuple(t.shape)}")
    if any(s == 0 for s in t.shape):
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    return t.dim() == 5


def _check_images(images: torch.Tensor, fmt: LatentFormat, known: bool) -> bool:
    """Check images for ``fmt``'s model; return whether they are a video."""
    if images.dim() == 5 and not fmt.video:
        raise ValueError(
            f"images of shape {tuple(images.shape)} look like videos [N, C, T, H, W]; {fmt.class_name} encodes "
            "images [N, 3, H, W] (videos need a video-shaped class: AutoencoderKLQwenImage, AutoencoderKLWan)"
        )
    is_video = _check_shape(images, "images", fmt.image_channels, fmt.video)
    if is_video and fmt.temporal_factor and (images.shape[2] - 1) % fmt.temporal_factor:
        t = fmt.temporal_factor
        raise ValueError(
            f"{fmt.class_name} encodes videos of 1 + {t}k frames (1, {1 + t}, {1 + 2 * t}, ...), got "
            f"{images.shape[2]} frames in shape {tuple(images.shape)}"
        )
    height, width = images.shape[-2:]
    f = fmt.spatial_factor
    if known and fmt.class_name != "AutoencoderKL" and (height % f or width % f):
        raise ValueError(
            f"images must be a multiple of {f} pixels high and wide for {fmt.class_name} (its spatial factor), "
            f"got {height}x{width} (H x W) in shape {tuple(images.shape)}; crop them to "
            f"{height - height % f}x{width - width % f}"
        )
    return is_video


def _encode_output(vae: Any, fmt: LatentFormat, x: torch.Tensor, tile: bool | None) -> Any:
    """``vae.encode(x)`` with the tiling mode ``tile`` asks for, where the class's tiled encode works."""
    sample_h, sample_w = _sample_size(vae)
    large = x.shape[-2] > sample_h or x.shape[-1] > sample_w
    if tile is not None and not isinstance(tile, bool):
        raise TypeError(f"tile must be True, False or None, got {tile!r}")
    if _tiled_encode_fails(fmt) and (tile or (tile is None and (large or getattr(vae, "use_tiling", False)))):
        if tile:
            warnings.warn(
                f"encode: {fmt.class_name}'s tiled encode fails in diffusers for this model "
                f"({fmt.latent_channels} latent channels); encoding each image in one pass (decode still tiles)",
                VAEToolkitWarning,
                stacklevel=3,
            )
        logger.info("Encoding with %s without tiling: its tiled encode fails in diffusers", fmt.class_name)
        tile, large = False, False
    with _tiling(vae, tile, large):
        return vae.encode(x)


def _tiled_encode_fails(fmt: LatentFormat) -> bool:
    """Whether the class's own tiled encode fails (diffusers 0.42): ``AutoencoderTiny._tiled_encode`` blends into
    a 4-channel buffer (TAESD3 and TAEF1 have 16), ``AutoencoderKLHunyuanImage.tiled_encode`` unpacks a 5-D shape
    from 4-D images."""
    if fmt.class_name == "AutoencoderKLHunyuanImage":
        return True
    return fmt.class_name == "AutoencoderTiny" and fmt.latent_channels != 4


def _raw_latent(
    output: Any, fmt: LatentFormat, sample: bool, generator: torch.Generator | list[torch.Generator] | None
) -> torch.Tensor:
    """The raw latent in ``vae.encode``'s output: the posterior's mode or a sample, or the deterministic latent."""
    dist = getattr(output, "latent_dist", None)
    if dist is not None:
        return dist.sample(generator=generator) if sample else dist.mean
    for name in ("latents", "latent"):  # AutoencoderTiny, AutoencoderDC
        z = getattr(output, name, None)
        if isinstance(z, torch.Tensor):
            return z
    raise TypeError(f"{fmt.class_name}.encode returned {type(output).__name__} without latent_dist, latents or latent")


def _decode_once(
    vae: Any, z: torch.Tensor, dtype: torch.dtype, tile: bool | None, large: bool, one_frame: bool
) -> torch.Tensor:
    with _tiling(vae, tile, large):
        images = vae.decode(z.to(dtype)).sample
    return images[:, :, 0] if one_frame else images


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


def _float32_copy(vae: Any, fmt: LatentFormat) -> Any:
    """A float32 copy of the VAE for decoding; the modules only encode uses are left out to save memory.

    They become empty modules rather than ``None``: some classes count the encoder's layers when they decode
    (``AutoencoderKLQwenImage.clear_cache``).
    """
    memo: dict[int, Any] = {}
    modules = getattr(vae, "_modules", {})
    for name in type(fmt).encoder_modules:
        if modules.get(name) is not None:
            memo[id(modules[name])] = torch.nn.Module()
    return copy.deepcopy(vae, memo).float()


def _decode_float32_retry(
    vae: Any,
    fmt: LatentFormat,
    z: torch.Tensor,
    images: torch.Tensor,
    tile: bool | None,
    large: bool,
    one_frame: bool,
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
    logger.info("Retrying a %s decode of %s in float32", name, fmt.class_name)
    vae32 = _float32_copy(vae, fmt)
    images = _decode_once(vae32, z, torch.float32, tile, large, one_frame)
    if not _all_finite(images):
        warnings.warn(
            "decode: the float32 retry also produced NaN/inf; the VAE weights or the latents are likely broken.",
            VAEToolkitWarning,
            stacklevel=3,
        )
    return images
